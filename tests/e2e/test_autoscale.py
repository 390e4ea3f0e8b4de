"""router.autoscale on a live tiny-model cluster: load stepped up then down, the decode pool follows (growing
once the load has held past the upscale delay, shrinking once it has stayed low past the downscale delay, its
leaving replica draining), within a bounded time; every request sent ends with the offline engine's tokens.
Once by load (target_ongoing_requests), once by the planner (a profile measured here, the observed rate)."""
from __future__ import annotations

import asyncio
import time

import pytest

from engine import LLM, SamplingParams
from pdserve import AsyncClient
from pdserve.config import AutoscaleConfig
from pdserve.launch import start_cluster
from tests.e2e.conftest import small_cluster
from tests.kv_transfer.test_shm_transfer import prompts_of

PROMPTS = prompts_of([40, 50, 60, 70], seed=11)
PARAMS = dict(temperature=0, max_tokens=160, ignore_eos=True)
PARAMS_SHORT = dict(PARAMS, max_tokens=24)
FOLLOW_S = 30.0  # a pool must have followed the load within this long of its step


@pytest.fixture(scope="module")
def want(tiny_model) -> list[list[int]]:
    return [o.token_ids for o in LLM(tiny_model, num_kv_blocks=256).generate(PROMPTS, SamplingParams(**PARAMS))]


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_model):
    autoscale = AutoscaleConfig(enabled=True, prefill=(1, 1), decode=(1, 2), every_s=0.25, window_s=4.0,
                                upscale_delay_s=1.0, downscale_delay_s=3.0, target_ongoing_requests=2)
    config = small_cluster(tiny_model, local_prefill_threshold=8, drain_timeout_s=0.5, autoscale=autoscale)
    with start_cluster(config, progress=None) as c:
        yield c


def decode_replicas(cluster) -> int:
    return len(cluster.router.placement.decode)


def test_the_decode_pool_follows_a_load_stepped_up_then_down(cluster, want):
    got: list[tuple[int, list[int], str]] = []  # (prompt, tokens, finish reason) of every request sent
    timeline: list[tuple[float, int]] = []  # (seconds since the step, decode replicas)

    async def streams(concurrency: int, until) -> None:
        """`concurrency` clients, each sending one request after another, until until() holds."""
        async def one(k: int) -> None:
            i = k
            while not until():
                tokens, reason = [], ""
                async for chunk in c.stream(PROMPTS[i % len(PROMPTS)], **PARAMS):
                    tokens += chunk.token_ids
                    reason = chunk.finish_reason or reason
                got.append((i % len(PROMPTS), tokens, reason))
                i += concurrency

        async with AsyncClient(cluster.address, timeout=120) as c:
            await asyncio.gather(*(one(k) for k in range(concurrency)))

    def watch(t0: float, target: int, after_s: float = 0.0):
        """until(): the pool has `target` replicas (and after_s more have passed), or FOLLOW_S is up."""
        reached: list[float] = []

        def until() -> bool:
            now, n = time.monotonic(), decode_replicas(cluster)
            timeline.append((now - t0, n))
            if n == target and not reached:
                reached.append(now)
            return bool(reached) and now - reached[0] >= after_s or now - t0 > FOLLOW_S
        return until, reached

    assert decode_replicas(cluster) == 1
    t_up = time.monotonic()
    until, grown = watch(t_up, 2, after_s=2.0)  # 6 requests running: ceil(6 / 2) = 3 wanted, 2 at most
    asyncio.run(streams(6, until))
    assert grown, f"the decode pool did not grow within {FOLLOW_S:g} s: {timeline[-5:]}"
    assert 1.0 <= grown[0] - t_up <= FOLLOW_S  # not before the upscale delay
    t_down = time.monotonic()
    until, shrunk = watch(t_down, 1)  # 1 request running: 1 wanted
    asyncio.run(streams(1, until))
    assert shrunk, f"the decode pool did not shrink within {FOLLOW_S:g} s: {timeline[-5:]}"
    assert shrunk[0] - t_down <= FOLLOW_S
    # not before the downscale delay: the load fell as the 6 clients' last requests ended (before t_down), so
    # count from the last decision that still wanted 2
    decisions = cluster.supervisor.decisions
    last_two = max(t for t, _, d in decisions if d.wanted["decode"] == 2)
    (shrink_at,) = [t for t, _, d in decisions if d.resize.get("decode") == 1]
    assert shrink_at - last_two >= 3.0 - 0.05  # the delay (times read just after each decision)

    # no request lost: each one sent ended with all its tokens, the offline engine's
    assert len(got) >= 7
    for i, tokens, reason in got:
        assert tokens == want[i] and reason == "length"
    assert max(d.wanted["decode"] for _, _, d in decisions) == 2 and not cluster.supervisor.failures
    rates = [rate for t, rate, _ in decisions if t_up + 2 < t < t_down]  # what the planner would plan for
    assert rates and min(rates) > 0
    sample = cluster.router.metrics.registry.get_sample_value
    assert sample("pdserve_autoscale_wanted_replicas", {"model": cluster.router.model_name, "pool": "decode"}) == 1


@pytest.fixture(scope="module")
def tiny_profile(tiny_model, tmp_path_factory) -> str:
    """The tiny model's step models, measured here (about a second)."""
    from pdserve.cli import main

    out = str(tmp_path_factory.mktemp("profile") / "tiny.json")
    assert main(["profile", "--model", tiny_model, "--out", out, "--quick", "--reps", "2",
                 "--decode-max-num-batched-tokens", "128", "--decode-num-kv-blocks", "256"]) == 0
    return out


def test_the_planner_sizes_the_pool_for_the_rate_it_observes(ray_local, tiny_model, tiny_profile, want):
    """No target_ongoing_requests: the planner alone decides, simulating the profile at headroom x the observed
    rate. The tiny model serves hundreds of requests a second on one replica, so the headroom is set to make
    ~4 req/s arriving stand for what one replica cannot hold (found with the same Autoscaler the loop runs)."""
    from planner.autoscale import Autoscaler
    from planner.cost import Profile

    mix = [(len(p), PARAMS_SHORT["max_tokens"]) for p in PROMPTS]
    config = small_cluster(tiny_model, local_prefill_threshold=8, drain_timeout_s=0.5, profile=tiny_profile,
                           ttft_slo_s=0.05, tpot_slo_s=0.01)
    config = config.replace(**{"prefill.replicas": 0, "decode.num_kv_blocks": 256})
    probe = Autoscaler(config.replace(**{"router.autoscale": AutoscaleConfig(enabled=True, prefill=(0, 0),
                                                                             decode=(1, 2), headroom=1.0)}),
                       Profile.load(tiny_profile))
    hi = 1.0
    while probe.plan(hi, mix)["decode"] < 2:  # the rate past which one replica falls short, in the simulator
        hi *= 2
        assert hi < 1e6
    autoscale = AutoscaleConfig(enabled=True, prefill=(0, 0), decode=(1, 2), every_s=0.25, window_s=3.0,
                                upscale_delay_s=1.0, downscale_delay_s=2.0, headroom=hi / 2.0)
    with start_cluster(config.replace(**{"router.autoscale": autoscale}), progress=None) as cluster:
        got, t0 = [], time.monotonic()

        async def send(rate: float, until) -> None:
            async with AsyncClient(cluster.address, timeout=60) as c:
                tasks, i = [], 0
                while not until():
                    tasks.append(asyncio.create_task(c.generate(PROMPTS[i % len(PROMPTS)], **PARAMS_SHORT)))
                    i += 1
                    await asyncio.sleep(1 / rate)
                for i, t in enumerate(tasks):
                    got.append((i % len(PROMPTS), (await t).token_ids))

        asyncio.run(send(4.0, lambda: decode_replicas(cluster) == 2 or time.monotonic() - t0 > FOLLOW_S))
        assert decode_replicas(cluster) == 2, "the planner did not grow the pool at ~4 req/s"
        t1 = time.monotonic()
        while decode_replicas(cluster) == 2 and time.monotonic() - t1 < FOLLOW_S:  # nothing arrives now
            time.sleep(0.1)
        assert decode_replicas(cluster) == 1 and time.monotonic() - t1 >= 2.0
        for i, tokens in got:
            assert tokens == want[i][:PARAMS_SHORT["max_tokens"]]
        planned = [d.planned["decode"] for _, rate, d in cluster.supervisor.decisions if d.planned]
        assert 2 in planned and planned[-1] == 1 and cluster.supervisor.autoscaler.simulations > 0
        assert type(cluster.supervisor.autoscaler.answers.executor).__name__ == "ProcessPoolExecutor"  # off the router's GIL
