"""Replicas that die mid-request, on the default model, for both KV backends: a dead prefill
replica's request is prefilled again elsewhere (another prefill replica, then the decode replica
itself) with the same tokens; a dead decode replica fails its requests at once with UNAVAILABLE
naming them, and the prefill replica that was sending to it goes on serving the others. Either
way no KV block stays held on the replicas still alive."""
from __future__ import annotations

import threading
import time

import grpc
import httpx
import pytest
import ray

from engine import LLM, SamplingParams
from pdserve import Client, RequestError
from pdserve.launch import start_cluster
from tests.e2e.conftest import small_cluster

LONG = "The history of the river valley, told slowly. " * 120  # ~1300 tokens: a few seconds of prefill
PARAMS = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module", params=["ipc", "collective"])
def cluster(ray_local, request):
    """Two replicas per pool; the tests below kill them one by one, in order (none is replaced:
    tests/e2e/test_healing.py has that)."""
    config = small_cluster("default").replace(kv_backend=request.param, replace_dead_replicas=False, **{
        "prefill.replicas": 2, "decode.replicas": 2, "decode.num_kv_blocks": 512})
    with start_cluster(config, progress=None) as c:
        yield c


@pytest.fixture(scope="module")
def want():
    llm = LLM("default", num_kv_blocks=256)
    return llm.generate(LONG, SamplingParams(**PARAMS))[0].token_ids


def pools(client: Client) -> dict:
    return {f"{p.role}/{r.index}": r for p in client.status().pools for r in p.replicas}


def kill_during_prefill(cluster, role: str) -> threading.Thread:
    """Kill the replica of `role` that is busy with the long prompt, while it is being prefilled."""
    def run():
        with Client(cluster.address) as client:
            for _ in range(400):
                busy = [name for name, r in pools(client).items() if r.healthy and name.startswith(role)
                        and (r.waiting_prefill_tokens > 0 or r.kv_blocks_used > 0)]
                prefilling = any(r.waiting_prefill_tokens > 0 for name, r in pools(client).items()
                                 if name.startswith("prefill"))
                if busy and prefilling:
                    index = int(busy[0].split("/")[1])
                    ray.kill((cluster.prefill if role == "prefill" else cluster.decode)[index])
                    return
                time.sleep(0.02)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_prefill_replica_dying_mid_prefill_is_replaced(cluster, want) -> None:
    with Client(cluster.address, timeout=120) as client:
        killer = kill_during_prefill(cluster, "prefill")
        out = client.generate(LONG, **PARAMS)
        killer.join()
        assert out.token_ids == want and out.timings["path"] == "disaggregated"
        status = pools(client)
        survivor = out.timings["prefill_replica"]
        assert status[survivor].healthy and sum(not status[f"prefill/{i}"].healthy for i in (0, 1)) == 1
        assert not any(r.kv_blocks_used for r in status.values() if r.healthy)


def test_a_decode_replica_dying_mid_transfer_fails_the_request_and_frees_the_prefill(cluster) -> None:
    with Client(cluster.address, timeout=120) as client:
        killer = kill_during_prefill(cluster, "decode")
        with pytest.raises(RequestError) as err:
            client.generate(LONG, request_id="doomed", **PARAMS)
        killer.join()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "doomed" in err.value.details
        assert "decode/" in err.value.details
        time.sleep(0.5)  # the prefill replica finishes the step it was in
        status = pools(client)
        assert sum(r.healthy for name, r in status.items() if name.startswith("decode")) == 1
        assert sum(r.healthy for name, r in status.items() if name.startswith("prefill")) == 1  # still serving
        assert not any(r.kv_blocks_used for r in status.values() if r.healthy)


def test_with_no_prefill_replica_left_the_decode_replica_prefills(cluster, want) -> None:
    with Client(cluster.address, timeout=120) as client:
        killer = kill_during_prefill(cluster, "prefill")  # the last one
        out = client.generate(LONG, **PARAMS)
        killer.join()
        assert out.token_ids == want and out.timings["path"] == "local"
        status = pools(client)
        assert not any(r.healthy for name, r in status.items() if name.startswith("prefill"))
        assert not any(r.kv_blocks_used for r in status.values() if r.healthy)
        # and it keeps serving
        assert client.generate("The capital of France is", max_tokens=4, temperature=0).token_ids


def test_a_decode_replica_dying_mid_stream_fails_its_requests_fast(cluster) -> None:
    with Client(cluster.address, timeout=120) as client:
        stream = client.stream("Write a long essay about the sea.", request_id="streaming", max_tokens=1000,
                               ignore_eos=True)
        next(stream)
        live = [i for i in (0, 1) if pools(client)[f"decode/{i}"].healthy]
        ray.kill(cluster.decode[live[0]])
        start = time.monotonic()
        with pytest.raises(RequestError) as err:
            list(stream)
        assert time.monotonic() - start < 10
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "streaming" in err.value.details


def test_with_no_decode_replica_left_both_front_doors_say_unavailable(cluster) -> None:
    with Client(cluster.address, timeout=60) as client:
        for i, replica in enumerate(cluster.decode):
            if pools(client)[f"decode/{i}"].healthy:
                ray.kill(replica)
        base = f"http://{cluster.http_address}"
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 with every decode replica dead"
            time.sleep(0.1)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        with pytest.raises(RequestError) as err:
            client.generate("Hi", max_tokens=4)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
