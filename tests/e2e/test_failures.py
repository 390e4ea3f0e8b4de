"""Replicas that die mid-request, on the default model, for both KV backends, with nothing
replaced (tests/e2e/test_healing.py has that): a dead prefill replica's request is prefilled again
elsewhere (another prefill replica, then the decode replica itself) with the same tokens; a
request whose decode replica dies mid-transfer or mid-stream continues on another decode replica
with exactly the tokens of a fault-free run (greedy and seeded), and the prefill replica that was
sending to the dead one goes on serving the others. With no decode replica left, both front doors
say so. Either way no KV block stays held on the replicas still alive."""
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
    """Two prefill and three decode replicas; the tests below kill them one by one, in order."""
    config = small_cluster("default", migration_wait_s=2.0).replace(
        kv_backend=request.param, replace_dead_replicas=False,
        **{"prefill.replicas": 2, "decode.replicas": 3, "decode.num_kv_blocks": 512})
    with start_cluster(config, progress=None) as c:
        yield c


@pytest.fixture(scope="module")
def offline():
    return LLM("default", num_kv_blocks=256)


@pytest.fixture(scope="module")
def want_out(offline):
    return offline.generate(LONG, SamplingParams(**PARAMS))[0]


@pytest.fixture(scope="module")
def want(want_out):
    return want_out.token_ids


def pools(client: Client) -> dict:
    return {f"{p.role}/{r.index}": r for p in client.status().pools for r in p.replicas}


def healthy(client: Client, role: str) -> list[str]:
    return [name for name, r in pools(client).items() if r.healthy and name.startswith(role)]


def blocks_held(client: Client, timeout_s: float = 5.0) -> dict[str, int]:
    """The KV blocks the live replicas hold, once they are back to 0 (or the timeout says they are not)."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = {name: r.kv_blocks_used for name, r in pools(client).items() if r.healthy and r.kv_blocks_used}
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.1)


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


# The tests kill replicas one by one and each counts from what is alive when it starts, so any one of
# them also runs alone (-k); each needs one more replica of the pool it kills than it leaves.


def test_a_prefill_replica_dying_mid_prefill_is_replaced(cluster, want) -> None:
    with Client(cluster.address, timeout=120) as client:
        before = healthy(client, "prefill")
        assert len(before) >= 2
        killer = kill_during_prefill(cluster, "prefill")
        out = client.generate(LONG, **PARAMS)
        killer.join()
        assert out.token_ids == want and out.timings["path"] == "disaggregated"
        after = healthy(client, "prefill")
        assert out.timings["prefill_replica"] in after and len(after) == len(before) - 1
        assert not blocks_held(client)


def test_a_decode_replica_dying_mid_transfer_moves_the_request(cluster, offline) -> None:
    # a prompt no replica has cached (a decode replica that held LONG's KV would prefill it itself: no transfer)
    prompt = "Another telling. " + LONG
    want_out = offline.generate(prompt, SamplingParams(**PARAMS))[0]
    with Client(cluster.address, timeout=120) as client:
        decode, prefill = healthy(client, "decode"), healthy(client, "prefill")
        assert len(decode) >= 2 and prefill
        killer = kill_during_prefill(cluster, "decode")
        out = client.generate(prompt, request_id="moved", **PARAMS)
        killer.join()
        assert out.token_ids == want_out.token_ids and out.prompt_tokens == len(want_out.prompt_token_ids)
        assert not blocks_held(client)  # the prefill replica finished the step it was in, and freed
        assert len(healthy(client, "decode")) == len(decode) - 1
        assert healthy(client, "prefill") == prefill  # the sender to the dead one still serves
        # the dead replicas' prefix caches left the router's index; the live ones' are there
        replicas = cluster.server.router.placement.replicas
        assert all(not r.cache.keys for r in replicas if not r.healthy)
        assert any(r.cache.keys for r in replicas if r.healthy and r.role == "decode")


def test_with_no_prefill_replica_left_the_decode_replica_prefills(cluster, want) -> None:
    with Client(cluster.address, timeout=120) as client:
        for name in healthy(client, "prefill")[1:]:  # all but one (none when the tests above ran)
            ray.kill(cluster.prefill[int(name.split("/")[1])])
        deadline = time.monotonic() + 10
        while len(healthy(client, "prefill")) > 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        killer = kill_during_prefill(cluster, "prefill")  # the last one, mid-prefill
        out = client.generate(LONG, **PARAMS)
        killer.join()
        assert out.token_ids == want and out.timings["path"] == "local"
        assert not healthy(client, "prefill")
        assert not blocks_held(client)
        # and it keeps serving
        assert client.generate("The capital of France is", max_tokens=4, temperature=0).token_ids


def test_a_decode_replica_dying_mid_stream_continues_the_stream_exactly(cluster, offline) -> None:
    """A seeded sampled request: the continuation samples each position with the same seed, so the
    client's stream is the fault-free one, no token missing or repeated."""
    prompt, params = "Write a long essay about the sea.", dict(temperature=0.8, seed=7, max_tokens=160, ignore_eos=True)
    want = offline.generate(prompt, SamplingParams(**params))[0]
    with Client(cluster.address, timeout=120) as client:
        decode = healthy(client, "decode")
        assert len(decode) >= 2
        stream = client.stream(prompt, request_id="streaming", **params)
        chunks = [next(stream)]
        running = [i for i in range(3) if pools(client)[f"decode/{i}"].healthy and pools(client)[f"decode/{i}"].running]
        ray.kill(cluster.decode[running[0]])
        gaps, last = [], time.monotonic()
        for chunk in stream:
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
            chunks.append(chunk)
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text and chunks[-1].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 160 and max(gaps) < 10
        assert len(healthy(client, "decode")) == len(decode) - 1
        assert not blocks_held(client)


def test_with_no_decode_replica_left_both_front_doors_say_unavailable(cluster) -> None:
    with Client(cluster.address, timeout=60) as client:
        for i, replica in enumerate(cluster.decode):
            if pools(client)[f"decode/{i}"].healthy:
                ray.kill(replica)
        base = f"http://{cluster.http_address}"
        deadline = time.monotonic() + 2  # within a stats poll or two (0.25 s each) of the deaths
        while httpx.get(f"{base}/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 with every decode replica dead"
            time.sleep(0.1)
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        with pytest.raises(RequestError) as err:
            client.generate("Hi", max_tokens=4)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
