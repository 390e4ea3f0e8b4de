"""The cluster on a tiny random model (no tokenizer: prompts are token ids): admission under
overload, logprobs through the split, and a router process that never imports torch."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import httpx
import pytest

from engine import LLM, SamplingParams
from pdserve import AsyncClient, Client, RequestError
from pdserve.launch import start_cluster
from tests.e2e.conftest import listening_beyond_loopback, small_cluster, wait_idle
from tests.kv_transfer.test_shm_transfer import prompts_of

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def generate_all(address: str, prompts) -> list:
    """Every prompt at once through the async SDK, greedy, 48 tokens (as GREEDY)."""
    async def run():
        async with AsyncClient(address, timeout=120) as client:
            return await asyncio.gather(*(client.generate(p, temperature=0, max_tokens=48, ignore_eos=True)
                                          for p in prompts))
    return asyncio.run(run())


@pytest.fixture(scope="module")
def tiny_cluster(ray_local, tiny_model):
    config = small_cluster(tiny_model, max_ongoing_requests=2, max_queued_requests=3, local_prefill_threshold=8)
    with start_cluster(config, progress=None) as c:
        yield c


def test_overload_refuses_the_excess_and_serves_every_admitted_request(tiny_cluster) -> None:
    prompts = prompts_of([100] * 10, seed=1)  # 2 running + 3 queued fit; 5 are refused

    async def run():
        async with AsyncClient(tiny_cluster.address, timeout=120) as client:
            return await asyncio.gather(*(client.generate(p, max_tokens=200, ignore_eos=True, temperature=0)
                                          for p in prompts), return_exceptions=True)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, RequestError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(refused) == 5 and len(served) == 5, results
    assert all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_requests" in r.details for r in refused)
    assert all(len(r.token_ids) == 200 and r.finish_reason == "length" for r in served)
    with Client(tiny_cluster.address) as client:
        assert not any(wait_idle(client).values())


def test_overload_through_http_is_a_429_with_retry_after(tiny_cluster) -> None:
    prompts = prompts_of([100] * 10, seed=3)  # as above: 5 served, 5 refused
    url = f"http://{tiny_cluster.http_address}/v1/completions"

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(url, json={
                "prompt": p, "max_tokens": 200, "ignore_eos": True, "temperature": 0}) for p in prompts))

    responses = asyncio.run(run())
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) == 5 and sum(r.status_code == 200 for r in responses) == 5, [r.status_code for r in responses]
    for r in refused:
        assert r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "max_queued_requests" in r.json()["error"]["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 200 for r in responses if r.status_code == 200)
    with Client(tiny_cluster.address) as client:
        assert not any(wait_idle(client).values())


def test_logprobs_and_text_rules_through_the_split(tiny_cluster, tiny_model) -> None:
    prompts = prompts_of([3, 40, 130], seed=2)  # local, then disaggregated (chunked: budget 128)
    params = SamplingParams(temperature=0.7, seed=9, max_tokens=12, logprobs=3, ignore_eos=True)
    want = LLM(tiny_model, num_kv_blocks=64).generate(prompts, params)
    with Client(tiny_cluster.address, timeout=60) as client:
        for prompt, w in zip(prompts, want):
            got = client.generate(prompt, temperature=0.7, seed=9, max_tokens=12, logprobs=3, ignore_eos=True)
            assert got.token_ids == w.token_ids
            for g, lp in zip(got.logprobs, w.logprobs):
                assert g.token_id == lp.token_id and abs(g.logprob - lp.logprob) < 1e-4
                assert [t for t, _ in g.top] == list(lp.top)
        with pytest.raises(RequestError, match="no tokenizer"):
            client.generate("text needs a tokenizer", max_tokens=4)
        assert client.list_models()[0].vocab_size == 512


def test_a_first_token_that_ends_the_request_never_waits_for_the_decode_replica(tiny_cluster, tiny_model) -> None:
    # its only token, or a stop token: the request ends with the prefill's answer (no commit: transfer_ms 0), as
    # the engine would end it, and its reserved decode blocks come back
    prompt = prompts_of([40], seed=4)[0]  # over the threshold: prefilled on the prefill replica
    first = LLM(tiny_model, num_kv_blocks=64).generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0]
    with Client(tiny_cluster.address, timeout=60) as client:
        for kw, reason in (({"max_tokens": 1}, "length"), ({"max_tokens": 6, "stop_token_ids": first.token_ids},
                                                          "stop")):
            got = client.generate(prompt, temperature=0, ignore_eos=True, **kw)
            assert got.token_ids == first.token_ids and got.finish_reason == reason
            assert got.timings["path"] == "disaggregated" and got.timings["transfer_ms"] == 0.0
        got = client.generate(prompt, temperature=0, ignore_eos=True, max_tokens=2)  # a decode: a commit
        assert len(got.token_ids) == 2 and got.timings["transfer_ms"] > 0.0
        assert not any(wait_idle(client).values())


def test_the_process_that_runs_the_router_never_imports_torch(tiny_model) -> None:
    script = textwrap.dedent(f"""
        import sys
        import pdserve
        from pdserve.config import ClusterConfig, RouterConfig
        config = ClusterConfig(model={tiny_model!r}, name="notorch",
                               router=RouterConfig(port=0, metrics_port=0, http_port=0))
        with pdserve.start_cluster(config, progress=None) as cluster:
            out = pdserve.Client(cluster.address).generate([1, 2, 3, 4, 5] * 5, max_tokens=4, temperature=0)
            assert len(out.token_ids) == 4 and out.timings["path"] == "disaggregated"
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "engine", "kv_transfer"))
            # the torch-free modules the face uses: the engine's option list, the KV wiring (Ray calls)
            light = ("engine", "engine.options", "kv_transfer", "kv_transfer.wiring")
            print("heavy:", [m for m in loaded if m not in light])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "heavy: []" in run.stdout


@pytest.mark.parametrize("backend,prefill_tp,decode_tp", [
    ("ipc", 1, 2), ("ipc", 2, 1), ("ipc", 2, 2), ("ipc", 1, 4),
    ("collective", 1, 2), ("collective", 2, 1), ("collective", 2, 2), ("collective", 2, 4), ("collective", 4, 2)])
def test_kv_is_resharded_between_tensor_parallel_degrees(ray_local, tiny_model, backend, prefill_tp,
                                                         decode_tp) -> None:
    """The tiny model has 2 KV heads: at TP 4 each is held by two ranks (replicated; on the prefill
    side only one of them sends it)."""
    config = small_cluster(tiny_model, local_prefill_threshold=1).replace(kv_backend=backend, **{
        "prefill.tensor_parallel_size": prefill_tp, "decode.tensor_parallel_size": decode_tp})
    prompts = prompts_of([5, 60, 200, 300], seed=3)  # the long ones take several 128-token chunks
    want = [o.token_ids for o in LLM(tiny_model, num_kv_blocks=128).generate(prompts, GREEDY)]

    with start_cluster(config, progress=None) as cluster:
        got = generate_all(cluster.address, prompts)
        assert [g.token_ids for g in got] == want
        assert {g.timings["path"] for g in got} == {"disaggregated"}
        with Client(cluster.address) as client:
            status = client.status()
            assert [r.tensor_parallel_size for p in status.pools for r in p.replicas] == [prefill_tp, decode_tp]
            assert status.kv_backend == backend
            assert not any(wait_idle(client).values())


def test_collective_aborts_free_every_rank_and_never_touch_reused_blocks(ray_local, tiny_model) -> None:
    """Collective backend, both pools at TP 2: requests whose deadlines pass mid-prefill or
    mid-decode free their blocks on both pools (every decode rank forgets the transfer before its
    blocks are reused), and the requests around them, and after them in those blocks, stay exact."""
    config = small_cluster(tiny_model, local_prefill_threshold=1).replace(kv_backend="collective", **{
        "prefill.tensor_parallel_size": 2, "decode.tensor_parallel_size": 2})
    prompts = prompts_of([300, 250, 200, 150, 280, 60], seed=8)
    want = [o.token_ids for o in LLM(tiny_model, num_kv_blocks=128).generate(prompts, GREEDY)]

    async def run(address: str):
        async with AsyncClient(address, timeout=120) as client:
            doomed = [client.generate(p, max_tokens=400, ignore_eos=True, timeout=0.1 + 0.3 * i)
                      for i, p in enumerate(prompts)]
            kept = [client.generate(p, temperature=0, max_tokens=48, ignore_eos=True) for p in prompts]
            return await asyncio.gather(*doomed, *kept, return_exceptions=True)

    with start_cluster(config, progress=None) as cluster, Client(cluster.address) as client:
        results = asyncio.run(run(cluster.address))
        assert all(isinstance(r, RequestError) and r.code == grpc.StatusCode.DEADLINE_EXCEEDED
                   for r in results[:len(prompts)]), results
        assert [r.token_ids for r in results[len(prompts):]] == want
        assert not any(wait_idle(client).values())
        assert [g.token_ids for g in generate_all(cluster.address, prompts)] == want  # in the freed blocks


def test_a_colocated_cluster_prefills_on_the_decode_replica(ray_local, tiny_model) -> None:
    """prefill.replicas 0: one pool that prefills (chunked) and decodes, the benchmark's baseline."""
    config = small_cluster(tiny_model).replace(**{"prefill.replicas": 0, "decode.num_cpus": 2, "decode.num_threads": 2})
    prompts = prompts_of([5, 200, 300], seed=4)
    want = [o.token_ids for o in LLM(tiny_model, num_kv_blocks=128).generate(prompts, GREEDY)]
    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=60) as client:
        got = [client.generate(p, temperature=0, max_tokens=48, ignore_eos=True) for p in prompts]
        assert [g.token_ids for g in got] == want
        assert {g.timings["path"] for g in got} == {"local"}
        assert [p.role for p in client.status().pools] == ["prefill", "decode"]


def test_the_collective_backend_in_the_cluster(ray_local, tiny_model) -> None:
    """KV over a gloo group of the cluster's own (works across hosts), two decode replicas."""
    config = small_cluster(tiny_model, local_prefill_threshold=1, decode_policy="round_robin").replace(
        kv_backend="collective", **{"decode.replicas": 2})
    prompts = prompts_of([5, 60, 200, 300], seed=6)
    want = [o.token_ids for o in LLM(tiny_model, num_kv_blocks=128).generate(prompts, GREEDY)]

    with start_cluster(config, progress=None) as cluster:
        got = generate_all(cluster.address, prompts)
        assert [g.token_ids for g in got] == want
        assert {g.timings["decode_replica"] for g in got} == {"decode/0", "decode/1"}
        with Client(cluster.address) as client:
            assert client.status().kv_backend == "collective"
            assert not any(wait_idle(client).values())


def test_tensor_parallel_and_collective_rendezvous_listen_on_loopback_only(ray_local, tiny_model) -> None:
    """The stores and gloo groups of TP ranks and of the KV pair groups bind 127.0.0.1, not every interface."""
    config = small_cluster(tiny_model, local_prefill_threshold=1).replace(
        kv_backend="collective", **{"decode.tensor_parallel_size": 2})
    with start_cluster(config, progress=None) as cluster:
        assert generate_all(cluster.address, prompts_of([40], seed=2))[0].token_ids
        assert not listening_beyond_loopback(), listening_beyond_loopback()


def test_a_dead_tensor_parallel_rank_gets_its_replica_replaced(ray_local, tiny_model) -> None:
    """Rank 1 of the decode replica dies: its engine fails at the next step instead of hanging, the
    supervisor replaces the whole replica (both ranks), and the request that hit the dead rank goes
    on there with the fault-free tokens."""
    import ray

    want = LLM(tiny_model, num_kv_blocks=64).generate([[1, 2, 3]], SamplingParams(
        temperature=0, max_tokens=400, ignore_eos=True))[0].token_ids
    config = small_cluster(tiny_model, local_prefill_threshold=1).replace(**{"decode.tensor_parallel_size": 2})
    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=60) as client:
        assert len(client.generate([1, 2, 3], max_tokens=4, temperature=0).token_ids) == 4
        (rank1,) = ray.get(cluster.decode[0].rank_actors.remote())
        ray.kill(rank1)
        start = time.monotonic()
        got = client.generate([1, 2, 3], request_id="after", max_tokens=400, ignore_eos=True, temperature=0)
        assert got.token_ids == want and time.monotonic() - start < 60
        decode = [r for p in client.status().pools if p.role == "decode" for r in p.replicas]
        assert [(r.healthy, r.restarts, r.tensor_parallel_size) for r in decode] == [(True, 1, 2)]
        (new_rank1,) = ray.get(cluster.decode[0].rank_actors.remote())
        assert new_rank1._actor_id != rank1._actor_id


def test_a_reservation_whose_kv_never_comes_is_freed_at_its_lease_end(ray_local, tiny_model) -> None:
    """A decode reservation no sender writes to (one that vanished without a word): its blocks are
    freed at the lease's end plus the grace period, counted, and the replica goes on serving exactly."""
    import re

    import ray

    config = small_cluster(tiny_model, local_prefill_threshold=1).replace(kv_lease_s=1.0)
    prompt = prompts_of([40], seed=9)[0]
    want = LLM(tiny_model, num_kv_blocks=64).generate([prompt], GREEDY)[0].token_ids

    def decode_blocks(client: Client) -> int:
        return client.status().pools[1].replicas[0].kv_blocks_used

    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=60) as client:
        reservation = ray.get(cluster.decode[0].reserve.remote(prompt, {"temperature": 0, "max_tokens": 4}, "orphan"))
        reserved_at = time.monotonic()
        assert reservation is not None and not reservation.local and reservation.block_ids
        deadline = reserved_at + 20
        while decode_blocks(client) == 0:  # the router's stats poll sees the blocks held
            assert time.monotonic() < deadline
            time.sleep(0.1)
        while decode_blocks(client) > 0:
            assert time.monotonic() < deadline, "the orphan reservation was never freed"
            time.sleep(0.1)
        held = time.monotonic() - reserved_at
        assert held >= 1.0 + 5.0 - 0.5, held  # not before the lease (1 s) plus the grace (5 s)
        metrics = httpx.get(f"http://127.0.0.1:{cluster.server.metrics_port}/metrics", timeout=10).text
        assert re.search(r'pdserve_kv_leases_expired_total\{[^}]*pool="decode",replica="0"\} 1\.0', metrics), \
            [line for line in metrics.splitlines() if "leases_expired" in line]
        got = client.generate(prompt, temperature=0, max_tokens=48, ignore_eos=True)
        assert got.token_ids == want and got.timings["path"] == "disaggregated"
        assert not any(wait_idle(client).values())


@pytest.mark.parametrize("backend", ["ipc", "collective"])
def test_tensor_parallel_followers_of_both_pools_die(ray_local, tiny_model, backend) -> None:
    """TP 2 on both sides: rank 1 of the prefill replica dies mid-prefill, then rank 1 of the decode
    replica mid-stream. Each replica fails at its next step (or at the call that finds the rank gone),
    is replaced whole (both ranks) and wired in again (shared memory, or its pair groups), and every
    request goes on with the fault-free tokens."""
    import threading

    import ray

    config = small_cluster(tiny_model, local_prefill_threshold=8).replace(
        kv_backend=backend, **{"prefill.tensor_parallel_size": 2, "decode.tensor_parallel_size": 2,
                                    "prefill.max_num_batched_tokens": 32})
    prompts = prompts_of([480] * 4, seed=13)  # ~60 prefill steps of 32 tokens
    long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)  # 980 of the model's 1024 positions
    offline = LLM(tiny_model, num_kv_blocks=256)
    want = [o.token_ids for o in offline.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                                          ignore_eos=True))]
    want_long = offline.generate([prompts[0]], long)[0].token_ids

    def replica(client: Client, role: str):
        return next(r for p in client.status().pools if p.role == role for r in p.replicas)

    def back(client: Client, role: str) -> None:
        deadline = time.monotonic() + 90
        while not (replica(client, role).restarts == 1 and replica(client, role).healthy):
            assert time.monotonic() < deadline, f"the {role} replica never came back"
            time.sleep(0.2)

    with start_cluster(config, progress=None) as cluster, Client(cluster.address, timeout=120) as client:
        (prefill_rank1,) = ray.get(cluster.prefill[0].rank_actors.remote())
        killed_mid_prefill = threading.Event()

        def kill_mid_prefill() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if replica(client, "prefill").waiting_prefill_tokens > 0:
                    ray.kill(prefill_rank1)
                    killed_mid_prefill.set()
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_mid_prefill)
        killer.start()
        got = generate_all(cluster.address, prompts)  # 48 tokens each: the first 8 are `want`'s
        killer.join()
        assert killed_mid_prefill.is_set()
        assert [g.token_ids[:8] for g in got] == want
        back(client, "prefill")

        (decode_rank1,) = ray.get(cluster.decode[0].rank_actors.remote())
        stream = client.stream(prompts[0], max_tokens=500, ignore_eos=True, temperature=0)
        chunks = [next(stream)]
        ray.kill(decode_rank1)
        chunks += list(stream)
        assert [t for c in chunks for t in c.token_ids] == want_long
        back(client, "decode")

        again = client.generate(prompts[1], max_tokens=8, ignore_eos=True, temperature=0)
        assert again.token_ids == want[1] and again.timings["path"] == "disaggregated"
        assert not any(wait_idle(client).values())
        assert cluster.supervisor.failures == []


def test_cancel_at_any_moment_ends_the_stream_and_frees_its_id(tiny_cluster) -> None:
    """Cancel lands at a random moment of a stream (a Cancel that landed while the router wrote a chunk used
    to end the call with no status, the client waiting for its deadline): the stream ends CANCELLED, and the
    same id runs again at once (the router used to forget it before the replica had let it go)."""
    import random
    import threading

    prompt = prompts_of([4], seed=9)[0]  # under local_prefill_threshold: decoded where it is prefilled
    rng = random.Random(0)
    with Client(tiny_cluster.address, timeout=30) as client:
        for i in range(20):
            rid = f"cancel-{i}"
            ended: dict = {}

            def read(rid=rid, ended=ended) -> None:
                try:
                    for _ in client.stream(prompt, max_tokens=900, ignore_eos=True, temperature=0, request_id=rid):
                        pass
                    ended["code"] = "OK"
                except RequestError as e:
                    ended["code"], ended["at"] = e.code, time.monotonic()
            reader = threading.Thread(target=read)
            reader.start()
            time.sleep(rng.uniform(0.02, 0.2))
            assert client.cancel(rid)
            cancelled_at = time.monotonic()
            reader.join(timeout=20)
            assert ended.get("code") == grpc.StatusCode.CANCELLED and ended["at"] - cancelled_at < 5, ended
            again = client.generate(prompt, max_tokens=3, temperature=0, request_id=rid)
            assert len(again.token_ids) == 3
        assert not any(wait_idle(client).values())
