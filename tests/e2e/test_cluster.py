"""End to end on the default model: the cluster's greedy tokens equal the offline engine's, and
every way a request can end early gives its KV blocks back on both pools."""
from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest

from engine import LLM, SamplingParams
from pdserve import AsyncClient, Client, RequestError
from tests.e2e.conftest import wait_idle

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello in Spanish.",
             "Write a haiku about the sea.", "Why is the sky blue?", "What do bees make?", "Count to five."]


@pytest.fixture(scope="module")
def offline():
    return LLM("default", num_kv_blocks=256)


def mixed_requests(tokenizer) -> list[tuple[dict, list[int], int]]:
    """16 requests: chat and raw text, prompts from 3 to ~400 tokens (both prefill paths), 4..40 new tokens."""
    rng = random.Random(0)
    out = []
    for i in range(16):
        max_tokens = rng.choice([4, 12, 24, 40])
        if i % 4 == 0:  # short raw text: prefilled on the decode replica
            text = ["Hi", "The sky is", "Once upon a time", "1, 2, 3,"][i // 4]
            out.append(({"prompt": text}, tokenizer.encode(text), max_tokens))
        elif i % 4 == 3:  # a long document: several prefill chunks
            text = " ".join(rng.choice(QUESTIONS) for _ in range(40)) + " Summarize:"
            out.append(({"prompt": text}, tokenizer.encode(text), max_tokens))
        else:
            messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            out.append(({"messages": messages}, tokenizer.encode(text, add_special_tokens=False), max_tokens))
    return out


def test_sixteen_concurrent_requests_equal_the_offline_engine(default_cluster, offline) -> None:
    requests = mixed_requests(offline.tokenizer)
    want = offline.generate([ids for _, ids, _ in requests],
                            [SamplingParams(temperature=0, max_tokens=n) for _, _, n in requests])

    async def run():
        async with AsyncClient(default_cluster.address, timeout=300) as client:
            return await asyncio.gather(*(client.generate(**form, temperature=0, max_tokens=n)
                                          for form, _, n in requests))

    got = asyncio.run(run())
    for (form, ids, _), g, w in zip(requests, got, want):
        assert g.token_ids == w.token_ids, form
        assert g.text == w.text
        assert g.prompt_tokens == len(ids) and g.completion_tokens == len(w.token_ids)
        assert g.finish_reason == w.finish_reason
    paths = {g.timings["path"] for g in got}
    assert paths == {"local", "disaggregated"}, paths  # both prefill paths were taken
    assert all(g.timings["ttft_ms"] <= g.timings["total_ms"] for g in got)
    with Client(default_cluster.address) as client:
        assert not any(wait_idle(client).values())


def test_stop_strings_and_seeded_sampling_match_offline(default_cluster, offline) -> None:
    messages = [{"role": "user", "content": "List the days of the week, separated by commas."}]
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=24)
    stopped = SamplingParams(temperature=0, max_tokens=40, stop=(",",))
    want_sampled, want_stopped = offline.chat([messages, messages], [sampled, stopped])
    with Client(default_cluster.address, timeout=120) as client:
        got = client.chat(messages, temperature=0.8, top_p=0.95, seed=1234, max_tokens=24)
        assert got.token_ids == want_sampled.token_ids and got.text == want_sampled.text
        chunks = list(client.stream(messages=messages, temperature=0, max_tokens=40, stop=[","]))
    assert "".join(c.text for c in chunks) == want_stopped.text
    assert "," not in want_stopped.text and chunks[-1].finish_reason == "stop"


def test_cancel_mid_stream_by_its_own_connection_frees_both_pools(default_cluster) -> None:
    long_prompt = "Tell me a very long story about a dragon. " * 20  # disaggregated path
    with Client(default_cluster.address, timeout=120) as client:
        stream = client.stream(long_prompt, request_id="to-cancel", max_tokens=400, ignore_eos=True, temperature=0)
        next(stream), next(stream)
        with Client(default_cluster.address) as stranger:  # another connection: not its request (no keys here)
            assert not stranger.cancel("to-cancel")
        with pytest.raises(RequestError) as err:
            client.generate("Hi", request_id="to-cancel", max_tokens=2)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert client.cancel("to-cancel")
        with pytest.raises(RequestError) as err:
            for _ in stream:
                pass
        assert err.value.code == grpc.StatusCode.CANCELLED and "to-cancel" in err.value.details
        assert not client.cancel("to-cancel")  # gone
        assert not any(wait_idle(client).values())


def test_passed_deadline_frees_both_pools(default_cluster) -> None:
    with Client(default_cluster.address) as client:
        with pytest.raises(RequestError) as err:
            client.generate("Tell me a story. " * 30, max_tokens=400, ignore_eos=True, timeout=1.0)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert not any(wait_idle(client).values())


def test_killed_client_frees_both_pools(default_cluster) -> None:
    script = textwrap.dedent(f"""
        import pdserve
        client = pdserve.Client({default_cluster.address!r})
        for chunk in client.stream("Write an essay about rivers. " * 20, max_tokens=400, ignore_eos=True):
            print("chunk", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "chunk"  # it is streaming
        with Client(default_cluster.address) as client:
            assert client.status().requests_in_flight == 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert not any(wait_idle(client).values())
    finally:
        proc.kill()


BAD = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[1] * 9000), "context length"),
    (dict(prompt="Hi", max_tokens=0), "max_tokens"),
    (dict(prompt="Hi", max_tokens=100_000), "max_tokens"),
    (dict(prompt="Hi", temperature=-0.5), "temperature"),
    (dict(prompt=[5, 49152, 7]), "outside the vocabulary"),
    (dict(prompt="x " * 600_000), "bytes"),  # over max_request_bytes
    (dict(prompt="Hi", logprobs=1000), "logprobs"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "role"),
    (dict(prompt="Hi", model="gpt-9"), "gpt-9"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_invalid_argument_and_others_keep_being_served(default_cluster, kwargs, message) -> None:
    with Client(default_cluster.address, timeout=60) as client:
        good = client.stream("The capital of France is", max_tokens=8, temperature=0)
        first = next(good)  # a request in flight while the bad one arrives
        with pytest.raises(RequestError) as err:
            client.generate(**kwargs)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details, err.value.details
        rest = list(good)
        assert rest[-1].finish_reason == "length" and len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 8


def test_both_text_and_token_ids_is_invalid_argument(default_cluster) -> None:
    from protos.pdserve.v1 import pdserve_pb2 as pb
    from protos.pdserve.v1 import pdserve_pb2_grpc as pb_grpc

    with grpc.insecure_channel(default_cluster.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(text="Hi", token_ids=pb.TokenIds(ids=[1, 2]))))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exactly one of text, chat or token_ids" in err.value.details()


def test_health_reflection_models_and_status(default_cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(default_cluster.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pdserve.v1.Generation"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "pdserve.v1.Generation" in {s.name for s in answer.list_services_response.service}
    with Client(default_cluster.address) as client:
        (model,) = client.list_models()
        assert model.name == "default" and model.max_model_len == 4096 and model.vocab_size == 49152
        status = client.status()
    assert [p.role for p in status.pools] == ["prefill", "decode"]
    assert status.pools[1].replicas[0].kv_blocks_total == 256


def test_cli_generate_and_status(default_cluster) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "pdserve", *a, "--address", default_cluster.address],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    gen = run("generate", "The capital of France is", "--max-tokens", "4")
    assert gen.returncode == 0, gen.stderr
    assert "Paris" in gen.stdout
    status = run("status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[1].split()[:3] == ["pool", "replica", "tp"]
    assert lines[2].startswith("prefill") and lines[3].startswith("decode") and "/256" in lines[3]
    bad = run("generate", "Hi", "--max-tokens", "0")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "max_tokens" in bad.stderr


def test_every_listening_socket_of_the_cluster_is_on_loopback(default_cluster) -> None:
    import psutil

    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)}  # Ray's daemons and workers, the router
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 3  # at least the router, Ray's GCS and the raylet
    exposed = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening
               if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_cli_chat_streams_a_conversation(default_cluster) -> None:
    chat = subprocess.run([sys.executable, "-m", "pdserve", "chat", "--address", default_cluster.address,
                           "--max-tokens", "24"], input="What is the capital of France?\nAnd of Italy?\n",
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    replies = [line for line in chat.stdout.split("you> ") if "assistant> " in line]
    assert len(replies) == 2 and "Paris" in replies[0]  # two turns; the second sees the first as history


def test_stop_token_ids_and_top_k_through_both_prefill_paths_match_offline(default_cluster, offline) -> None:
    # each case its own prompt (a new first word), so no cached prefix moves a long one to the local path
    doc = " ".join(QUESTIONS * 6)
    prompts = {(path, case): offline.tokenizer.encode(f"{case}: " + ("Once upon a time" if path == "local" else doc))
               for path in ("local", "disaggregated") for case in ("Stop", "First", "Greedy", "Sample")}
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = dict(zip(prompts, offline.generate(list(prompts.values()), greedy)))
    with Client(default_cluster.address, timeout=120) as client:
        for (path, case), ids in prompts.items():
            if case in ("Stop", "First"):
                # the 4th token, or the first: the one the prefill side samples on the disaggregated path
                stop_at = 3 if case == "Stop" else 0
                params = dict(temperature=0, max_tokens=12, stop_token_ids=[want[path, case].token_ids[stop_at]])
            elif case == "Greedy":  # top_k=1 is greedy whatever the temperature
                params = dict(temperature=1.5, top_k=1, seed=3, max_tokens=12, ignore_eos=True)
            else:  # top_k=5, seeded: the offline engine's draw
                params = dict(temperature=1.0, top_k=5, seed=7, max_tokens=12, ignore_eos=True)
            (ref,) = offline.generate([ids], SamplingParams(**params)) if case != "Greedy" else (want[path, case],)
            got = client.generate(ids, **params)
            assert got.token_ids == ref.token_ids, (path, case)
            assert got.timings["path"] == path, case
            if case in ("Stop", "First"):
                assert got.finish_reason == ref.finish_reason == "stop" and len(got.token_ids) <= stop_at + 1


def test_utilization_figures_stay_in_their_ranges_under_load(default_cluster) -> None:
    # MFU against the peak of the unit the weights run on, MBU against the bandwidth of the level the
    # weights are read from (engine.metrics.measure_peaks): in [0, 1], and moving while busy
    import threading

    samples: list[tuple[str, float, float, float]] = []
    done = threading.Event()

    def poll() -> None:
        with Client(default_cluster.address) as client:
            while not done.is_set():
                for pool in client.status().pools:
                    samples.extend((pool.role, r.mfu, r.mbu, r.busy_fraction) for r in pool.replicas)
                done.wait(0.2)

    async def load():
        async with AsyncClient(default_cluster.address, timeout=300) as client:
            doc = " ".join(QUESTIONS * 8)
            return await asyncio.gather(*(client.generate(f"{i}. {doc}", temperature=0, max_tokens=48,
                                                          ignore_eos=True) for i in range(8)))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        asyncio.run(load())
    finally:
        done.set()
        poller.join()
    for role in ("prefill", "decode"):
        mine = [s[1:] for s in samples if s[0] == role]
        assert all(0 <= mfu <= 1 and 0 <= mbu <= 1 and 0 <= busy <= 1 for mfu, mbu, busy in mine), (role, mine)
        assert max(m[0] for m in mine) > 0 and max(m[1] for m in mine) > 0 and max(m[2] for m in mine) > 0.1, role
