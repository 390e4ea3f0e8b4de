"""Prefix caching with real models: the same greedy tokens, seeded samples and logprobs with the
cache on as off, on every tiny arch and the default model, through shared prefixes, full hits,
eviction, preemption, tensor parallelism and a reservation whose KV lands from a prefill engine;
num_cached_tokens exactly what the design promises: (num_tokens - 1) // block_size full blocks at most."""
from __future__ import annotations

import random
import uuid

import pytest
import torch

from engine import LLM, LLMEngine, SamplingParams
from engine.block_manager import BlockManager
from engine.llm_engine import RequestOutput
from engine.metrics import StepMetrics, engine_stats
from engine.sequence import Sequence
from tests.engine.tiny_models import ARCHS

BS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=16, ignore_eos=True)
ROOMY = dict(block_size=BS, num_kv_blocks=256)
# 16 blocks: the second wave needs ~20 at once, so running sequences are preempted and cached blocks evicted
TIGHT = dict(block_size=BS, num_kv_blocks=16, max_num_batched_tokens=24, max_prefill_chunk=16)

_rng = random.Random(0)
P = [_rng.randrange(512) for _ in range(43)]  # 5 full blocks and 3 tokens
Q = [_rng.randrange(512) for _ in range(24)]  # exactly 3 full blocks


def cached_len(num_tokens: int) -> int:
    """What a prompt whose every full block is cached reports: the last token is always computed."""
    return (num_tokens - 1) // BS * BS


def waves(llm: LLM, between=lambda: None) -> list[RequestOutput]:
    """Two waves of requests, the second after the first finished, so it finds the first's KV."""
    first = llm.generate([P, Q], [GREEDY, SAMPLED])
    between()
    out_p = first[0].token_ids
    second = llm.generate([
        P[:-1] + [(P[-1] + 1) % 512],  # all but the last token shared
        P + out_p[:9],  # an exact prefix of the first request's prompt + output
        P,  # the same prompt again: every full block cached, the 3 tokens after them computed
        Q,  # again, seeded sampling: a whole number of blocks, all cached, so its last block is computed again
    ], [GREEDY, GREEDY, GREEDY, SAMPLED])
    return first + second


def assert_same(got: list[RequestOutput], want: list[RequestOutput]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids, f"a prompt of {len(g.prompt_token_ids)} tokens diverges"
        if w.logprobs is not None:
            torch.testing.assert_close(torch.tensor([lp.logprob for lp in g.logprobs]),
                                       torch.tensor([lp.logprob for lp in w.logprobs]), atol=1e-3, rtol=0)
            assert [list(lp.top) for lp in g.logprobs] == [list(lp.top) for lp in w.logprobs]


def assert_cache_consistent(bm: BlockManager) -> None:
    """Nothing held once every request is done; the cache's two maps agree; every block is free."""
    assert bm.num_free_blocks == bm.num_blocks and sum(bm.ref_counts) == 0
    assert {b: h for h, b in bm.cached_blocks.items()} == {b: h for b, h in enumerate(bm.block_hashes) if h}


@pytest.fixture(scope="module")
def uncached(tiny_checkpoints) -> dict[str, list[RequestOutput]]:
    """The reference: each arch's waves with the prefix cache off."""
    cache = {}
    for arch in ARCHS:
        llm = LLM(str(tiny_checkpoints[arch]), enable_prefix_caching=False, **ROOMY)
        assert not llm.engine.block_manager.enable_caching
        cache[arch] = waves(llm)
        assert all(o.num_cached_tokens == 0 for o in cache[arch])
        assert llm.engine.block_manager.cached_blocks == {}
    return cache


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_equals_uncached(tiny_checkpoints, uncached, arch: str) -> None:
    llm = LLM(str(tiny_checkpoints[arch]), **ROOMY)  # the cache is on by default
    got = waves(llm)
    assert_same(got, uncached[arch])
    assert [o.num_cached_tokens for o in got] == [0, 0, cached_len(43), cached_len(52), cached_len(43), 16]
    sched = llm.engine.scheduler
    assert sched.prefix_cache_queries == 43 + 24 + 43 + 52 + 43 + 24
    assert sched.prefix_cache_hits == sum(o.num_cached_tokens for o in got)
    stats = engine_stats(llm.engine, StepMetrics(), {})
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (229, 40 + 48 + 40 + 16)
    assert_cache_consistent(llm.engine.block_manager)


@pytest.mark.parametrize("arch", ARCHS)
def test_eviction_and_preemption_keep_the_tokens(tiny_checkpoints, uncached, arch: str) -> None:
    llm = LLM(str(tiny_checkpoints[arch]), **TIGHT)
    bm = llm.engine.block_manager
    after_first: dict[bytes, int] = {}
    got = waves(llm, lambda: after_first.update(bm.cached_blocks))
    assert_same(got, uncached[arch])
    assert sum(o.num_preemptions for o in got) > 0
    assert llm.engine.scheduler.prefix_cache_hits > 0
    assert len(after_first) == 7 + 4  # the first wave's full blocks whose KV was computed: 11 of the 16
    # the second wave needed the space of some (a block recomputed later may be cached again, elsewhere)
    assert after_first.items() - bm.cached_blocks.items()
    assert_cache_consistent(bm)


def test_the_default_model_cached_equals_uncached() -> None:
    llm = LLM("default", max_num_batched_tokens=64)
    chats = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name a color.")]
    a, b = (llm.apply_chat_template(c) for c in chats)  # the same system prompt and template
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)

    def run() -> list[RequestOutput]:
        first = llm.generate([a], params)
        return first + llm.generate([a, b, a + first[0].token_ids[:5]], params)

    got = run()
    assert [o.num_cached_tokens for o in got[:2]] == [0, (len(a) - 1) // 16 * 16]
    assert got[2].num_cached_tokens > 0 and got[3].num_cached_tokens == (len(a) + 4) // 16 * 16
    llm.engine.block_manager.enable_caching = False
    llm.engine.block_manager.reset_prefix_cache()
    want = run()
    assert all(o.num_cached_tokens == 0 for o in want)
    assert_same(got, want)
    assert "Paris" in got[0].text


def test_tensor_parallel_shares_the_prefix(ray_local, tiny_checkpoints, uncached) -> None:
    from replica.ranks import start_followers

    with LLM(str(tiny_checkpoints["qwen3"]), tensor_parallel_size=2, num_threads=1, rank_launcher=start_followers,
             **ROOMY) as llm:
        got = waves(llm)
    assert_same(got, uncached["qwen3"])
    assert got[4].num_cached_tokens == cached_len(43)


@pytest.fixture
def pool_name():
    from kv_transfer.shm import unlink_pool

    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    unlink_pool(name)


def test_reserved_blocks_are_findable_once_their_kv_landed(tiny_checkpoints, pool_name) -> None:
    from tests.kv_transfer.test_shm_transfer import generate_on, make_pair

    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    sender, receiver, prefill, decode = make_pair(str(tiny_checkpoints["llama"]), pool_name)  # decode: blocks of 8
    want = generate_on(prefill, [P], greedy)[0]  # P is cached on the prefill side now ...
    hits_before = prefill.scheduler.prefix_cache_hits
    target = receiver.reserve(P, greedy, "r")
    sender.add(P, greedy, target)
    probe = Sequence(P, greedy, seed=0)
    assert decode.block_manager.match_prefix(probe) == []  # reserved: no KV there yet
    done = []
    while not done:
        done = sender.step()
        assert decode.block_manager.match_prefix(probe) == []  # the KV is landing, not committed
    # the prefill side took P's first two blocks from its cache, and sent them from there with the rest
    assert prefill.scheduler.prefix_cache_hits == hits_before + 32
    receiver.commit("r", done[0].first_token, done[0].logprobs)
    assert decode.block_manager.match_prefix(probe) == list(target.block_ids[:5])  # landed: findable
    outs = {}
    while decode.has_unfinished():
        outs.update((o.request_id, o) for o in decode.step())
    assert outs["r"].token_ids == want
    again = decode.add_request(P, greedy)  # served from the blocks the prefill engine wrote
    while decode.has_unfinished():
        outs.update((o.request_id, o) for o in decode.step())
    assert outs[again.request_id].token_ids == want
    assert outs[again.request_id].num_cached_tokens == cached_len(43)
    assert_cache_consistent(decode.block_manager)


def test_enable_prefix_caching_is_an_engine_option(tiny_checkpoints) -> None:
    on = LLMEngine.from_model(str(tiny_checkpoints["llama"]), num_kv_blocks=16)
    off = LLMEngine.from_model(str(tiny_checkpoints["llama"]), num_kv_blocks=16, enable_prefix_caching=False)
    assert on.config.options.enable_prefix_caching and on.block_manager.enable_caching
    assert not off.config.options.enable_prefix_caching and not off.block_manager.enable_caching
