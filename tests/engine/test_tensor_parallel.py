"""Tensor and expert parallelism across Ray actors (gloo on loopback): the same greedy tokens
as one rank, exactly two all-reduces per dense block, and failures that say what to do."""
from __future__ import annotations

import threading
import time

import pytest
import ray

from engine import LLM, SamplingParams
from engine.distributed import CollectiveCounter, get_tp_group
from replica.ranks import start_followers
from tests.engine.tiny_models import make_tiny_checkpoint
from tests.kv_transfer.test_shm_transfer import prompts_of

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
PROMPTS = prompts_of([1, 7, 40, 130, 300])  # mixed lengths; with a budget of 64 the long ones are chunked
OPTS = dict(num_kv_blocks=256, max_num_batched_tokens=64, num_threads=1)


def generate(model: str, **kw) -> tuple[list[list[int]], CollectiveCounter, int]:
    with LLM(model, **OPTS, **kw, rank_launcher=start_followers) as llm:
        counter = get_tp_group().counter = CollectiveCounter()
        out = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        get_tp_group().counter = None
        return out, counter, llm.engine.config.model_config.num_hidden_layers


@pytest.fixture(scope="module")
def single_rank(tiny_checkpoints):
    cache = {}

    def tokens(arch: str) -> list[list[int]]:
        if arch not in cache:
            cache[arch] = generate(str(tiny_checkpoints[arch]))[0]
        return cache[arch]
    return tokens


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("llama", 4), ("qwen3", 2), ("qwen3", 4), ("qwen2", 2)])
def test_tensor_parallel_equals_one_rank(ray_local, tiny_checkpoints, single_rank, arch, tp) -> None:
    got, counter, layers = generate(str(tiny_checkpoints[arch]), tensor_parallel_size=tp)
    assert got == single_rank(arch)
    steps = counter.calls["all_gather"]  # one logits gather per step that samples (every step here)
    # two all-reduces per dense block (o_proj, down_proj) and one for the vocab-parallel embedding
    assert counter.calls["all_reduce"] == steps * (2 * layers + 1)
    assert "all_to_all" not in counter.calls


@pytest.mark.parametrize("arch,ep", [("mixtral", 2), ("mixtral", 4), ("qwen3_moe", 2), ("qwen3_moe", 4)])
def test_expert_parallel_equals_one_rank(ray_local, tiny_checkpoints, single_rank, arch, ep) -> None:
    got, counter, layers = generate(str(tiny_checkpoints[arch]), tensor_parallel_size=ep, expert_parallel=True)
    assert got == single_rank(arch)
    steps = counter.calls["all_gather"] // (layers + 1)  # per MoE layer the token slices, plus the logits
    assert counter.calls["all_reduce"] == steps * (layers + 1)  # attention's o_proj only, and the embedding
    assert counter.calls["all_to_all"] == steps * layers * 3  # dispatch (states, expert ids), combine
    assert counter.bytes["all_to_all"] > 0
    print(f"{arch} EP={ep}: all-to-all {counter.bytes['all_to_all'] / 1e6:.2f} MB over {steps} steps")


def test_moe_tensor_parallel_without_expert_parallel(ray_local, tiny_checkpoints, single_rank) -> None:
    got, counter, layers = generate(str(tiny_checkpoints["qwen3_moe"]), tensor_parallel_size=2)
    assert got == single_rank("qwen3_moe")
    assert counter.calls["all_reduce"] == counter.calls["all_gather"] * (2 * layers + 1)


def test_default_model_at_tp3_equals_tp1(ray_local) -> None:
    params = SamplingParams(temperature=0, max_tokens=24)
    messages = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name a color.")]
    with LLM("default", num_kv_blocks=64, num_threads=1) as llm:
        want = [o.token_ids for o in llm.chat(messages, params)]
    with LLM("default", num_kv_blocks=64, num_threads=1, tensor_parallel_size=3, rank_launcher=start_followers) as llm:
        assert [o.token_ids for o in llm.chat(messages, params)] == want


def test_a_degree_that_does_not_divide_the_heads_names_the_valid_ones(tiny_checkpoints) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not fit .* valid degrees: 1, 2, 4"):
        LLM(str(tiny_checkpoints["llama"]), tensor_parallel_size=3)
    with pytest.raises(ValueError, match=r"valid degrees: 1, 3$"):
        LLM("default", tensor_parallel_size=2)


def test_ranks_need_a_launcher_from_the_caller(tiny_checkpoints) -> None:
    # the engine knows no Ray: without a launcher it says which one to pass, before any rank starts
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs a rank launcher .* "
                                         r"rank_launcher=replica\.ranks\.start_followers"):
        LLM(str(tiny_checkpoints["llama"]), tensor_parallel_size=2)
    assert get_tp_group().world_size == 1


def test_more_ranks_than_ray_can_place(ray_local, tmp_path) -> None:
    model = make_tiny_checkpoint("llama", tmp_path / "wide", num_attention_heads=16, num_key_value_heads=16,
                                 hidden_size=64)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=16 needs 15 more ranks .* CPUs free"):
        LLM(str(model), tensor_parallel_size=16, rank_launcher=start_followers)


def test_a_rank_that_dies_mid_step_fails_the_replica_fast(ray_local, tiny_checkpoints) -> None:
    llm = LLM(str(tiny_checkpoints["llama"]), num_kv_blocks=256, tensor_parallel_size=2, num_threads=1,
              rank_launcher=start_followers)
    follower = llm.engine.followers.actors[0]
    killed_at: list[float] = []
    killer = threading.Timer(1.0, lambda: (ray.kill(follower), killed_at.append(time.monotonic())))
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="lost a rank"):
            llm.generate([[1, 2, 3]] * 4, SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))
        failed_after = time.monotonic() - killed_at[0]
        print(f"the replica failed {failed_after:.2f} s after its rank was killed")
        assert failed_after < 1.0  # the README's "within a second"
    finally:
        killer.cancel()
        llm.shutdown()


def test_an_llm_dropped_without_shutdown_releases_its_ranks(ray_local, tiny_checkpoints, single_rank) -> None:
    """vLLM users make engines one after another without `with` or shutdown(): a dropped TP engine's
    ranks and process group go with it, and the next engine in the process, TP 1 or 2, works."""
    import gc

    import torch.distributed as dist

    path = str(tiny_checkpoints["llama"])
    llm = LLM(path, **OPTS, tensor_parallel_size=2, rank_launcher=start_followers)
    followers = llm.engine.followers.actors
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == single_rank("llama")
    del llm
    gc.collect()
    assert not dist.is_initialized()
    for actor in followers:  # the follower rank is gone too
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
    assert [o.token_ids for o in LLM(path, **OPTS).generate(PROMPTS, GREEDY)] == single_rank("llama")
    again = LLM(path, **OPTS, tensor_parallel_size=2, rank_launcher=start_followers)
    assert [o.token_ids for o in again.generate(PROMPTS, GREEDY)] == single_rank("llama")
    del again  # and once more without shutdown: the next test's engines start clean
