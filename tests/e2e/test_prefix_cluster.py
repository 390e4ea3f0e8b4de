"""Prefix caching across the split, on a real cluster (one prefill, two decode replicas, the tiny
model): a conversation's next turn goes to the decode replica that holds its history, is prefilled
there when only a short tail is new, sends only the KV that replica lacks when the tail is long, and
every answer equals one engine's with the cache off."""
from __future__ import annotations

import time

import pytest

from engine import LLM, SamplingParams
from pdserve import Client
from pdserve.launch import start_cluster
from tests.e2e.conftest import small_cluster, wait_idle
from tests.kv_transfer.test_shm_transfer import prompts_of

ANSWER = 24
GREEDY = SamplingParams(temperature=0, max_tokens=ANSWER, ignore_eos=True)


def stats_of(client: Client) -> dict[str, object]:
    return {f"{p.role}/{r.index}": r for p in client.status().pools for r in p.replicas}


def wait_for_index(cluster, replica: str, min_keys: int, timeout_s: float = 10.0) -> None:
    """Until the router's index of `replica` holds min_keys block keys (the stats poll brings them)."""
    router = cluster.server.router
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(next(r for r in router.placement.replicas if r.name == replica).cache.keys) >= min_keys:
            return
        time.sleep(0.05)
    raise AssertionError(f"the router's index of {replica} did not fill")


def test_conversations_follow_their_cache_and_equal_the_uncached_engine(ray_local, tiny_model) -> None:
    config = small_cluster(tiny_model, local_prefill_threshold=32, prefill_policy="prefix_aware",
                           decode_policy="prefix_aware").replace(**{"decode.replicas": 2})
    reference = LLM(tiny_model, num_kv_blocks=256, enable_prefix_caching=False)
    system = prompts_of([100], seed=11)[0]
    mc = reference.engine.config.model_config
    kv_bytes_per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * 4
    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=120) as client:
        histories, where = {}, {}
        for turn in range(3):
            for conv in ("a", "b"):
                # turn 0: the shared system prompt and a question; later turns add a long (40) or short (5) message
                new = prompts_of([20 if turn == 0 else 40 if turn == 1 else 5], seed=100 * turn + ord(conv))[0]
                prompt = histories.get(conv, system) + new
                saved = stats_of(client)[where[conv]].kv_bytes_saved if conv in where else 0
                out = client.generate(prompt, temperature=0, max_tokens=ANSWER, ignore_eos=True)
                assert out.token_ids == reference.generate([prompt], GREEDY)[0].token_ids, (conv, turn)
                decode = out.timings["decode_replica"]
                if turn == 0:
                    where[conv] = decode
                else:
                    assert decode == where[conv], (conv, turn)  # the replica that holds its history
                    # the decode replica holds all but the new message and the last answer token (whose KV
                    # was never computed), in whole blocks of 16
                    held = (len(histories[conv]) - 1) // 16 * 16
                    # a long new message is prefilled on the prefill replica, a short one where the history is
                    assert out.timings["path"] == ("disaggregated" if turn == 1 else "local"), (conv, turn)
                    if turn == 1:  # what the decode replica held was not sent; the prefill replica computed
                        # from what it held itself (at least the system prompt: conversation a's first turn)
                        assert stats_of(client)[decode].kv_bytes_saved - saved == held * kv_bytes_per_token
                        assert out.cached_tokens >= 96, conv
                    else:
                        assert out.cached_tokens == held, conv
                histories[conv] = prompt + out.token_ids
                wait_for_index(cluster, decode, (len(histories[conv]) - 1) // 16)
        stats = stats_of(client)
        for name in set(where.values()):
            assert stats[name].prefix_cache_hits > 0 and stats[name].kv_bytes_saved > 0
        assert not any(wait_idle(client).values())


@pytest.mark.parametrize("backend,decode_tp", [("ipc", 1), ("collective", 2)])
def test_a_prefill_replica_sends_what_its_cache_holds_to_a_decode_replica_that_lacks_it(
        ray_local, tiny_model, backend, decode_tp) -> None:
    """Round-robin placement sends the second prompt to the other decode replica, which holds none of it;
    the prefill replica (TP 2: each rank reads its own heads from its own cache) sends the blocks its
    cache holds of it with the rows it computes, re-sharded to the decode replica's TP."""
    config = small_cluster(tiny_model, local_prefill_threshold=1, prefill_policy="round_robin",
                           decode_policy="round_robin").replace(kv_backend=backend, **{
                               "decode.replicas": 2, "prefill.tensor_parallel_size": 2,
                               "decode.tensor_parallel_size": decode_tp})
    reference = LLM(tiny_model, num_kv_blocks=256, enable_prefix_caching=False)
    first = prompts_of([120], seed=21)[0]
    second = first + prompts_of([30], seed=22)[0]
    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=120) as client:
        a = client.generate(first, temperature=0, max_tokens=ANSWER, ignore_eos=True)
        b = client.generate(second, temperature=0, max_tokens=ANSWER, ignore_eos=True)
        assert a.timings["decode_replica"] != b.timings["decode_replica"]
        assert b.timings["path"] == "disaggregated" and b.cached_tokens == 112  # the prefill side's 7 blocks
        assert [a.token_ids, b.token_ids] == [o.token_ids for o in reference.generate([first, second], GREEDY)]
        assert not any(wait_idle(client).values())
