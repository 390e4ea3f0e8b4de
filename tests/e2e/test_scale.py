"""Resizing pools while serving, on a tiny model (ipc backend): a new replica is wired into the KV
transport and takes requests with the offline engine's tokens; a leaving replica drains, and what
still runs on it when its drain time is up continues on another replica, token for token."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from engine import LLM, SamplingParams
from kv_transfer.metadata import pool_path
from pdserve import AsyncClient, Client, RequestError
from pdserve.cli import main
from pdserve.launch import start_cluster
from tests.e2e.conftest import small_cluster, wait_idle
from tests.kv_transfer.test_shm_transfer import prompts_of

PROMPTS = prompts_of([60, 61], seed=8)  # over local_prefill_threshold: disaggregated
LONG = dict(temperature=0, max_tokens=900, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_model):
    with start_cluster(small_cluster(tiny_model, local_prefill_threshold=8), progress=None) as c:
        yield c


@pytest.fixture(scope="module")
def want(tiny_model) -> list[list[int]]:
    return [o.token_ids for o in LLM(tiny_model, num_kv_blocks=256).generate(PROMPTS, SamplingParams(**LONG))]


def replicas(client: Client, role: str) -> list:
    return [r for p in client.status().pools if p.role == role for r in p.replicas]


def test_a_pool_grows_and_shrinks_while_serving(cluster, want) -> None:
    with Client(cluster.address, timeout=120) as client:
        grown = client.scale("decode", 2)
        assert (grown.replicas, grown.added, grown.removed) == (2, 1, 0)
        assert [r.healthy for r in replicas(client, "decode")] == [True, True]
        new_pool = cluster.pools.pool_names[1]
        assert pool_path(new_pool).exists()

        async def both():  # one after the other, most_free_blocks puts them on different replicas
            async with AsyncClient(cluster.address, timeout=120) as c:
                streams, firsts = [], []
                for p in PROMPTS:
                    streams.append(c.stream(p, **LONG))
                    firsts.append(await anext(streams[-1]))
                assert all(r.kv_blocks_used for r in replicas(client, "decode"))
                shrink = asyncio.create_task(asyncio.to_thread(client.scale, "decode", 1, drain_timeout_s=0.05))
                rests = await asyncio.gather(*(rest(s) for s in streams))
                return [[f, *r] for f, r in zip(firsts, rests)], await shrink

        async def rest(stream) -> list:
            return [chunk async for chunk in stream]

        moved = cluster.router.metrics.migrations._value.get()

        outs, shrunk = asyncio.run(both())
        assert (shrunk.replicas, shrunk.added, shrunk.removed) == (1, 0, 1)
        assert cluster.router.metrics.migrations._value.get() == moved + 1
        for chunks, w in zip(outs, want):  # the one on decode/1 moved to decode/0 mid-stream
            assert [t for c in chunks for t in c.token_ids] == w and chunks[-1].finish_reason == "length"
        assert len(replicas(client, "decode")) == 1 and not pool_path(new_pool).exists()
        assert not any(wait_idle(client).values())


def test_the_prefill_pool_goes_to_zero_and_back(cluster, want) -> None:
    with Client(cluster.address, timeout=120) as client:
        assert client.scale("prefill", 0).replicas == 0
        got = client.generate(PROMPTS[0], **{**LONG, "max_tokens": 16})
        assert got.token_ids == want[0][:16] and got.timings["path"] == "local"
        limits = cluster.router.limits  # as if the cluster had started without a prefill pool:
        cluster.router.limits = dataclasses.replace(limits, prefill_kv_tokens=None)  # growing one sets the limit
        assert main(["scale", "prefill", "2", "--address", cluster.address]) == 0
        assert cluster.router.limits == limits
        assert [r.healthy for r in replicas(client, "prefill")] == [True, True]
        for _ in range(2):  # each prefill replica in turn (least_tokens ties go to the first)
            got = client.generate(PROMPTS[1], **{**LONG, "max_tokens": 16})
            assert got.token_ids == want[1][:16] and got.timings["path"] == "disaggregated"
        for pool, n, drain in (("decode", 0, 0.0), ("lunch", 1, 0.0), ("prefill", 1000, 0.0), ("prefill", 1, -1.0),
                               ("prefill", 1, float("nan")), ("prefill", 1, float("inf"))):
            with pytest.raises(RequestError) as err:
                client.scale(pool, n, drain_timeout_s=drain)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (pool, n, drain)
        assert not any(wait_idle(client).values())


def test_a_replica_ray_cannot_place_is_refused_and_leaves_no_placement_group(cluster) -> None:
    from ray.util import placement_group_table

    def pending() -> list:
        return [g for g in placement_group_table().values() if g["state"] not in ("CREATED", "REMOVED")]

    before = len(cluster.router.placement.decode)
    with pytest.raises(RuntimeError, match="cannot place a DecodeWorker replica within 0.5 s"):
        cluster.supervisor.scale("decode", 64, 0.1, placement_timeout_s=0.5)  # 8 Ray CPUs in the tests
    assert len(cluster.router.placement.decode) == before and not pending()
    created = sum(g["state"] == "CREATED" for g in placement_group_table().values())
    assert created == len(cluster.pools.groups["prefill"]) + len(cluster.pools.groups["decode"])


def test_a_shrinking_pool_gives_up_a_dead_replica_before_a_healthy_one(cluster, want) -> None:
    import ray

    with Client(cluster.address, timeout=120) as client:
        assert client.scale("decode", 2).replicas == 2
        first, second = cluster.router.placement.decode
        survivor_pool = cluster.pools.pool_names[1]
        dead_pool = cluster.pools.pool_names[0]
        cluster.supervisor.replace_dead = False  # left dead, so that the shrink has to choose
        try:
            ray.kill(first.actor)
            deadline = time.monotonic() + 30
            while first.healthy and time.monotonic() < deadline:  # the router's stats poll finds it dead
                time.sleep(0.05)
            assert not first.healthy
            shrunk = client.scale("decode", 1, drain_timeout_s=0.05)
        finally:
            cluster.supervisor.replace_dead = True
        assert (shrunk.replicas, shrunk.removed) == (1, 1)
        # the healthy one stays, under the first index and name
        assert cluster.router.placement.decode == [second] and second.name == "decode/0"
        assert cluster.pools.pool_names == [survivor_pool] and cluster.pools.actors["decode"] == [second.actor]
        assert pool_path(survivor_pool).exists() and not pool_path(dead_pool).exists()
        assert [r.healthy for r in replicas(client, "decode")] == [True]
        got = client.generate(PROMPTS[0], **{**LONG, "max_tokens": 16})
        assert got.token_ids == want[0][:16] and got.timings["decode_replica"] == "decode/0"
        assert not any(wait_idle(client).values())


def test_a_placement_answered_after_its_replica_left_the_pool_goes_to_another(cluster) -> None:
    """A request's add_local (or reserve) still on its way back while its replica drains and leaves the pool: the
    router no longer reads that replica's events, so the request goes to the next replica rather than wait there
    for tokens that never come."""
    from kv_transfer.wiring import drop_decode
    from router.placement import Placed

    with Client(cluster.address, timeout=120) as client:
        assert client.scale("decode", 2).replicas == 2
    router = cluster.router

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, cluster.server.loop).result(timeout=60)

    stay, leave = router.placement.decode
    with cluster.supervisor._lock:  # as a scale-down does, but its actor still answers: the removal comes first
        on_loop(router.remove_replica(leave))
        p = Placed("late")
        try:
            params = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
            assert on_loop(router.placement.place_decode(p, PROMPTS[0], params, local=True, order=[leave]))
            assert p.decode is stay and stay.in_flight == 1
        finally:
            on_loop(router.placement.release(p))
            drop_decode([r.actor for r in router.placement.prefill], cluster.pools.pool_names[1])
            cluster.pools.remove_last("decode")
    with Client(cluster.address, timeout=120) as client:
        assert [r.healthy for r in replicas(client, "decode")] == [True]
        assert not any(wait_idle(client).values())
