"""Supervision on a real cluster (a tiny model, the ipc backend): a replica whose actor is killed is
replaced by a new one, wired into the KV transport and put back into placement; meanwhile the
health service says NOT_SERVING while no path can serve. Afterwards requests take the
disaggregated path again with the offline engine's tokens, the dead pool's shared memory is gone,
and status and metrics count the restart."""
from __future__ import annotations

import time

import grpc
import httpx
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import LLM, SamplingParams
from kv_transfer.metadata import pool_path
from pdserve import Client
from pdserve.cli import format_status
from pdserve.launch import start_cluster
from tests.e2e.conftest import small_cluster, wait_idle
from tests.kv_transfer.test_shm_transfer import prompts_of

PROMPT = prompts_of([60], seed=5)[0]  # over local_prefill_threshold: disaggregated


@pytest.fixture(scope="module")
def cluster(ray_local, tiny_model):
    with start_cluster(small_cluster(tiny_model, local_prefill_threshold=8), progress=None) as c:
        yield c


@pytest.fixture(scope="module")
def want(tiny_model) -> list[int]:
    return LLM(tiny_model, num_kv_blocks=64).generate([PROMPT], SamplingParams(temperature=0, max_tokens=16,
                                                                                ignore_eos=True))[0].token_ids


def replica(client: Client, role: str):
    return next(r for p in client.status().pools if p.role == role for r in p.replicas)


def wait_for(check, timeout_s: float, what: str, every_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(every_s)
    return got


def serving(cluster) -> int:
    with grpc.insecure_channel(cluster.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_a_dead_decode_replica_is_replaced_and_its_stream_goes_on(cluster, tiny_model, want) -> None:
    """The only decode replica dies mid-stream: health says NOT_SERVING until its replacement is up,
    and the stream, which waited for it, goes on with the fault-free tokens."""
    old_pool = cluster.pools.pool_names[0]
    assert pool_path(old_pool).exists()
    long = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    want_long = LLM(tiny_model, num_kv_blocks=128).generate([PROMPT], long)[0].token_ids
    with Client(cluster.address, timeout=60) as client:
        stream = client.stream(PROMPT, max_tokens=900, ignore_eos=True, temperature=0)
        chunks = [next(stream)]
        ray.kill(cluster.decode[0])
        killed_at = time.monotonic()
        # the router polls every replica every 0.25 s: health turns within a poll or two of the death
        wait_for(lambda: serving(cluster) == health_pb2.HealthCheckResponse.NOT_SERVING, 2, "NOT_SERVING")
        print(f"NOT_SERVING {time.monotonic() - killed_at:.2f} s after the kill")
        wait_for(lambda: serving(cluster) == health_pb2.HealthCheckResponse.SERVING, 90, "SERVING again")
        chunks += list(stream)
        assert [t for c in chunks for t in c.token_ids] == want_long and chunks[-1].finish_reason == "length"
        r = replica(client, "decode")
        assert r.healthy and r.restarts == 1
        table = [line.split() for line in format_status(client.status()).splitlines()[1:]]
        assert dict(zip(table[0], next(row for row in table if row[0] == "decode")))["restarts"] == "1"
        got = client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0)
        assert got.token_ids == want and got.timings["path"] == "disaggregated"  # the old prefill maps the new pool
        assert not any(wait_idle(client).values())
    assert not pool_path(old_pool).exists() and pool_path(cluster.pools.pool_names[0]).exists()
    assert httpx.get(f"http://{cluster.http_address}/health", timeout=10).status_code == 200


def test_a_dead_prefill_replica_is_replaced(cluster, want) -> None:
    """Meanwhile the decode replica prefills; then the new prefill replica takes prompts again."""
    with Client(cluster.address, timeout=60) as client:
        ray.kill(cluster.prefill[0])
        wait_for(lambda: not replica(client, "prefill").healthy, 10, "the dead prefill replica marked down")
        r = replica(client, "prefill")
        assert r.mfu == 0 and r.tokens_processed == 0  # its last figures are gone from status
        got = client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0)
        assert got.token_ids == want  # meanwhile the decode replica prefills it
        wait_for(lambda: replica(client, "prefill").restarts == 1 and replica(client, "prefill").healthy, 90,
                 "the prefill replica back", every_s=0.2)
        got = client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0)
        assert got.token_ids == want and got.timings["path"] == "disaggregated"
        assert not any(wait_idle(client).values())
    metrics = httpx.get(f"http://127.0.0.1:{cluster.server.metrics_port}/metrics", timeout=10).text
    for pool in ("prefill", "decode"):
        assert any(line.startswith("pdserve_replica_restarts_total") and f'pool="{pool}"' in line
                   and line.endswith(" 1.0") for line in metrics.splitlines()), metrics


def test_a_replacement_that_fails_to_start_is_killed_and_tried_again(cluster, want, monkeypatch) -> None:
    """The first starts of a dead decode replica's successor give up (its info() past the start timeout):
    each such actor is killed and the replica keeps its placement group, so a later round's start takes
    it; once one is up, the pools left behind (the dead replica's, the failed starts') are gone, and no
    placement group leaked."""
    from ray.util import placement_group_table

    import pdserve.supervisor as supervisor

    dead_pool, failures = cluster.pools.pool_names[0], len(cluster.supervisor.failures)
    monkeypatch.setattr(supervisor, "START_TIMEOUT_S", 0.001)
    with Client(cluster.address, timeout=60) as client:
        restarts = replica(client, "decode").restarts
        ray.kill(cluster.decode[0])
        wait_for(lambda: len(cluster.supervisor.failures) > failures, 30, "a failed start", every_s=0.1)
        failed_pool = cluster.pools.pool_names[0]
        assert failed_pool != dead_pool and "Timeout" in cluster.supervisor.failures[-1][1]
        monkeypatch.setattr(supervisor, "START_TIMEOUT_S", 900.0)
        wait_for(lambda: replica(client, "decode").restarts == restarts + 1 and replica(client, "decode").healthy,
                 90, "the decode replica back", every_s=0.2)
        got = client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0)
        assert got.token_ids == want and got.timings["path"] == "disaggregated"
        assert not any(wait_idle(client).values())
    assert not pool_path(dead_pool).exists() and not pool_path(failed_pool).exists()
    created = sum(g["state"] == "CREATED" for g in placement_group_table().values())
    assert created == len(cluster.pools.groups["prefill"]) + len(cluster.pools.groups["decode"])


def test_on_the_collective_backend_replicas_are_replaced_and_pools_resize(ray_local, tiny_model, want) -> None:
    """The same supervision where KV moves over gloo: each (prefill, decode) pair of replicas has a group
    of its own, so a replacement or a newcomer forms groups with the live replicas of the other pool."""
    long = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    want_long = LLM(tiny_model, num_kv_blocks=128).generate([PROMPT], long)[0].token_ids
    config = small_cluster(tiny_model, local_prefill_threshold=8).replace(kv_backend="collective")
    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=60) as client:
        assert client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0).token_ids == want
        # the decode replica dies mid-stream: the stream waits for its replacement and goes on exactly
        stream = client.stream(PROMPT, max_tokens=900, ignore_eos=True, temperature=0)
        chunks = [next(stream)]
        ray.kill(cluster.decode[0])
        chunks += list(stream)
        assert [t for c in chunks for t in c.token_ids] == want_long
        assert replica(client, "decode").restarts == 1
        got = client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0)
        assert got.token_ids == want and got.timings["path"] == "disaggregated"  # the old prefill reaches the new
        # the prefill replica dies: replaced, and its pair group with the decode replica formed again
        ray.kill(cluster.prefill[0])
        wait_for(lambda: replica(client, "prefill").restarts == 1 and replica(client, "prefill").healthy, 90,
                 "the prefill replica back", every_s=0.2)
        got = client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0)
        assert got.token_ids == want and got.timings["path"] == "disaggregated"
        # a second decode replica joins (pairs with the prefill replica), takes a request, then leaves
        assert client.scale("decode", 2).replicas == 2
        prompts = prompts_of([60, 61, 62, 63], seed=11)
        wants = [o.token_ids for o in LLM(tiny_model, num_kv_blocks=128).generate(
            prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]
        outs = [client.generate(p, max_tokens=16, ignore_eos=True, temperature=0) for p in prompts]
        assert [o.token_ids for o in outs] == wants
        assert {o.timings["decode_replica"] for o in outs} == {"decode/0", "decode/1"}
        assert {o.timings["path"] for o in outs} == {"disaggregated"}
        assert client.scale("decode", 1).replicas == 1
        assert client.generate(PROMPT, max_tokens=16, ignore_eos=True, temperature=0).token_ids == want
        assert not any(wait_idle(client).values())
        assert cluster.supervisor.failures == []
