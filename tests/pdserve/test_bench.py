"""pdserve bench: workloads, arrivals, the per-request measurements, the statistics and goodput, the plots (no
server), and one short run against a real cluster on the tiny random model."""
from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from pdserve import Chunk, RequestError, bench
from pdserve.bench_stats import summarize
from pdserve.request_result import RequestResult, error_message, read_sse
from pdserve.workload import Chats, LongtailMix, SharedDocs, Workload, make_conversations, make_requests

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lengths(requests) -> list[tuple[int, int]]:
    return [(len(prompt), out) for prompt, out in requests]


def test_workloads_are_seeded_and_in_range() -> None:
    uniform = Workload("uniform", prompt_range=(5, 40), output_range=(3, 9))
    for workload in (Workload("fixed", prompt_len=20, output_len=7), uniform, "longtail"):
        a = make_requests(workload, 50, seed=3, vocab=100, max_len=8192)
        assert a == make_requests(workload, 50, seed=3, vocab=100, max_len=8192)
        assert a != make_requests(workload, 50, seed=4, vocab=100, max_len=8192)
        assert all(0 <= t < 100 for prompt, _ in a for t in prompt)
    assert set(lengths(make_requests(Workload("fixed", prompt_len=20, output_len=7), 10, 0, 100, 8192))) == {(20, 7)}
    got = lengths(make_requests(uniform, 400, seed=1, vocab=100, max_len=8192))
    assert {p for p, _ in got} == set(range(5, 41)) and {o for _, o in got} == set(range(3, 10))


def test_longtail_is_mostly_short_chats_with_some_long_documents() -> None:
    mix = LongtailMix()
    got = lengths(make_requests("longtail", 2000, seed=0, vocab=512, max_len=8192))
    documents = [(p, o) for p, o in got if p >= mix.document_prompt[0]]
    chats = [(p, o) for p, o in got if p < mix.document_prompt[0]]
    assert abs(len(documents) / len(got) - mix.document_fraction) < 0.03
    assert all(mix.document_prompt[0] <= p <= mix.document_prompt[1] and mix.document_output[0] <= o <=
               mix.document_output[1] for p, o in documents)
    assert all(mix.chat_prompt[0] <= p <= mix.chat_prompt[1] and mix.chat_output[0] <= o <= mix.chat_output[1]
               for p, o in chats)


def test_the_context_shortens_the_prompt_and_keeps_the_output() -> None:
    assert lengths(make_requests(Workload(prompt_len=1000, output_len=100), 1, 0, 10, max_len=512)) == [(412, 100)]
    assert lengths(make_requests(Workload(prompt_len=1000, output_len=900), 1, 0, 10, max_len=512)) == [(1, 511)]
    # the lengths of the other requests do not move when one is clipped
    short = lengths(make_requests("longtail", 100, seed=5, vocab=10, max_len=1024))
    full = lengths(make_requests("longtail", 100, seed=5, vocab=10, max_len=8192))
    assert [o for _, o in short] == [o for _, o in full]
    assert [p for p, _ in short] == [min(p, 1024 - o) for p, o in full]


def test_shared_doc_asks_several_questions_of_each_of_a_few_documents() -> None:
    spec = SharedDocs(num_documents=3, document_len=200, question=(5, 9), output=(2, 4))
    workload = Workload("shared-doc", shared_doc=spec)
    got = make_requests(workload, 60, seed=2, vocab=100, max_len=8192)
    assert got == make_requests(workload, 60, seed=2, vocab=100, max_len=8192)
    docs = {tuple(prompt[:200]) for prompt, _ in got}
    assert len(docs) == 3 and all(205 <= len(p) <= 209 and 2 <= o <= 4 for p, o in got)
    assert lengths(make_requests(workload, 5, seed=2, vocab=100, max_len=100)) == [(100 - o, o) for _, o in got[:5]]


def test_multiturn_conversations_share_a_system_prompt_and_fit_the_context() -> None:
    workload = Workload("multiturn", multiturn=Chats(system_len=50, turns=(2, 4), user=(5, 9), output=(3, 6)))
    convs = make_conversations(workload, 20, seed=1, vocab=100, max_len=8192)
    assert convs == make_conversations(workload, 20, seed=1, vocab=100, max_len=8192)
    assert all(c.system == convs[0].system for c in convs) and len(convs[0].system) == 50
    assert {len(c.turns) for c in convs} == {2, 3, 4}
    assert all(5 <= len(u) <= 9 and 3 <= o <= 6 for c in convs for u, o in c.turns)
    short = make_conversations(workload, 20, seed=1, vocab=100, max_len=80)  # turns past the context are dropped
    assert all(len(c.system) + sum(len(u) + o for u, o in c.turns) <= 80 and c.turns for c in short)
    assert len(short[0].system) == 40  # at most half the context
    with pytest.raises(ValueError, match="make_conversations"):
        make_requests(workload, 1, 0, 100, 8192)


def test_poisson_arrivals() -> None:
    times = bench.arrival_times(4000, rate=20.0, seed=1)
    assert times == bench.arrival_times(4000, 20.0, seed=1) and times != bench.arrival_times(4000, 20.0, seed=2)
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 20) < 0.05 / 20 and abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: cv 1
    assert bench.arrival_times(3, None, 0) == bench.arrival_times(3, math.inf, 0) == [0.0, 0.0, 0.0]


def test_percentile_is_numpys_linear_percentile() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert bench.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert bench.percentile([], 50) is None


class FakeClient:
    """Streams chunks of the given sizes, each after its delay (s), then a last chunk with the timings."""

    def __init__(self, plan: list[tuple[float, int]], error: RequestError | None = None):
        self.plan, self.error = plan, error

    def stream(self, prompt, **kw) -> AsyncIterator[Chunk]:
        async def chunks():
            for delay, n in self.plan:
                await asyncio.sleep(delay)
                yield Chunk("r", "", list(range(n)), None, None, None, None)
            if self.error:
                raise self.error
            yield Chunk("r", "", [], None, "length", None, {"ttft_ms": 1.0, "queue_ms": 0.5, "path": "local"})
        return chunks()


def test_send_times_the_stream() -> None:
    r = asyncio.run(bench.send(FakeClient([(0.05, 2), (0.04, 2), (0.02, 1)]), [1, 2, 3], 5))
    assert r.ok and r.num_output_tokens == 5 and r.server["path"] == "local"
    assert 0.05 <= r.ttft < r.e2e
    # the first chunk's second token came with the first; a later 2-token chunk splits its gap in two
    assert len(r.itl) == 4 and r.itl[0] == 0 and r.itl[1] == r.itl[2] >= 0.02 and r.itl[3] >= 0.02
    assert r.tpot == pytest.approx((r.e2e - r.ttft) / 4) and sum(r.itl) <= r.e2e - r.ttft
    refused = FakeClient([(0, 1)], RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"))
    failed = asyncio.run(bench.send(refused, [1], 4))
    assert (failed.status, failed.error, failed.ok, failed.tpot) == ("RESOURCE_EXHAUSTED", "full", False, None)


def timed(raw: bytes, times: list[float]) -> list[tuple[float, str]]:
    """The non-blank lines of an SSE body, each with its arrival time, as OpenAISender records them."""
    lines = [line for line in raw.decode().splitlines() if line]
    assert len(lines) == len(times)
    return list(zip(times, lines))


# pdserve's HTTP front door: a chunk per router message (the second holds 2 tokens, the third's token has no text
# yet), a token-less end chunk, the usage chunk, [DONE]
PDSERVE_SSE = (b'data: {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": "The", '
               b'"logprobs": null, "finish_reason": null}]}\n\n'
               b'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": " cat sat", "finish_reason": null}]}\n\n'
               b'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": "", "finish_reason": null}]}\n\n'
               b'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'
               b'data: {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, '
               b'"total_tokens": 7}}\n\n'
               b'data: [DONE]\n\n')
# vLLM: a chunk per token, the last token's chunk carries the finish_reason; a keep-alive comment
VLLM_SSE = (b'data: {"choices": [{"index": 0, "text": "A", "finish_reason": null, "stop_reason": null}]}\n\n'
            b': ping\n\n'
            b'data: {"choices": [{"index": 0, "text": "B", "finish_reason": null}], "usage": null}\n\n'
            b'data: {"choices": [{"index": 0, "text": "C", "finish_reason": "length"}], "usage": null}\n\n'
            b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}\n\n'
            b'data: [DONE]\n\n')


def test_read_sse_counts_tokens_from_usage_and_one_arrival_per_chunk() -> None:
    r = read_sse(RequestResult(3, 4), timed(PDSERVE_SSE, [0.5, 0.7, 0.8, 0.81, 0.81, 0.82]), end=0.83)
    assert r.ok and (r.ttft, r.e2e, r.num_output_tokens) == (0.5, 0.83, 4)
    assert r.itl == pytest.approx([0.2, 0.1])  # a gap per chunk with tokens; the bare end marker is none
    assert r.tpot == pytest.approx((0.83 - 0.5) / 3) and r.server == {}
    r = read_sse(RequestResult(3, 3), timed(VLLM_SSE, [0.2, 0.25, 0.3, 0.4, 0.4, 0.4]), end=0.41)
    assert r.ok and (r.ttft, r.num_output_tokens) == (0.2, 3) and r.itl == pytest.approx([0.1, 0.1])
    no_usage = [(t, line) for t, line in timed(VLLM_SSE, [0.2, 0.25, 0.3, 0.4, 0.4, 0.4]) if "usage\": {" not in line]
    assert read_sse(RequestResult(3, 3), no_usage, end=0.41).num_output_tokens == 3  # then: the arrivals


def test_read_sse_failures() -> None:
    first = PDSERVE_SSE.split(b"\n\n")[0].decode()
    error = '{"error": {"message": "pool down", "type": "service_unavailable", "param": null, "code": 503}}'
    r = read_sse(RequestResult(3, 4), [(0.1, first), (0.2, f"data: {error}")], end=0.3)
    assert (r.status, r.error, r.ok, r.tpot) == ("HTTP_503", "pool down", False, None)
    flat = 'data: {"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}'
    assert read_sse(RequestResult(3, 4), [(0.1, flat)], end=0.2).status == "HTTP_400"
    assert read_sse(RequestResult(3, 4), [(0.1, "data: {oops")], end=0.2).status == "BAD_STREAM"
    cut = read_sse(RequestResult(3, 4), [(0.1, first)], end=0.2)  # no finish_reason: the stream broke off
    assert cut.status == "INCOMPLETE" and cut.ttft == 0.1
    assert read_sse(RequestResult(3, 4), [(0.1, "data: [DONE]")], end=0.2).status == "INCOMPLETE"
    assert error_message(error) == "pool down" and error_message("<h1>Bad Gateway</h1>\n") == "<h1>Bad Gateway</h1>"


def test_backend_arguments(monkeypatch) -> None:
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    args = bench.parse_args([])
    assert (args.backend, args.address, args.base_url, args.api_key) == ("grpc", bench.DEFAULT_ADDRESS, None, None)
    args = bench.parse_args(["--backend", "openai", "--base-url", "http://h:8000/v1"])
    assert (args.backend, args.base_url, args.api_key, args.vocab_size) == ("openai", "http://h:8000/v1", "sk-openai",
                                                                            bench.DEFAULT_VOCAB_SIZE)
    monkeypatch.setenv("PDSERVE_API_KEY", "pd-key")
    assert bench.parse_args(["--backend", "openai", "--base-url", "http://h/v1"]).api_key == "pd-key"
    assert bench.parse_args(["--api-key", "mine"]).api_key == "mine"
    for wrong in (["--backend", "openai"], ["--base-url", "http://h/v1"], ["--backend", "openai", "--base-url", "h:80"],
                  ["--backend", "http"]):
        with pytest.raises(SystemExit):
            bench.parse_args(wrong)
    with pytest.raises(ValueError, match="choose one of grpc, openai"):
        bench.run_benchmark("127.0.0.1:1", [([1], 1)], backend="http")


def result(ttft: float, tpot: float, n: int = 11, status: str = "OK") -> RequestResult:
    e2e = ttft + tpot * (n - 1)
    return RequestResult(100, n, status, "", 0.0, ttft, e2e, [tpot] * (n - 1), n, {"path": "disaggregated"})


def run_at(rate: float, met: int, slow_ttft: int, slow_tpot: int, failed: int = 0) -> dict:
    """A run of met + slow_ttft + slow_tpot + failed requests; SLOs 1 s and 0.1 s."""
    results = ([result(0.5, 0.05)] * met + [result(2.0, 0.05)] * slow_ttft + [result(0.5, 0.5)] * slow_tpot
               + [RequestResult(100, 11, "RESOURCE_EXHAUSTED", "queue full")] * failed)
    return {"rate": rate, "concurrency": None, **summarize(results, 10.0, ttft_slo=1.0, tpot_slo=0.1)}


def test_summary_and_goodput() -> None:
    run = run_at(2.0, met=6, slow_ttft=1, slow_tpot=2, failed=1)
    assert (run["num_requests"], run["completed"], run["failed"]) == (10, 9, 1)
    assert run["request_throughput"] == pytest.approx(0.9) and run["output_throughput"] == pytest.approx(9.9)
    assert run["total_token_throughput"] == pytest.approx(9 * 111 / 10)
    assert run["slo"] == {"ttft_s": 1.0, "tpot_s": 0.1, "ttft": 0.8, "tpot": 0.7, "both": 0.6}
    assert run["ttft_ms"]["p50"] == pytest.approx(500) and run["ttft_ms"]["p99"] == pytest.approx(500 + 0.92 * 1500)
    assert run["ttft_ms"]["mean"] == pytest.approx((8 * 500 + 2000) / 9)
    assert run["tpot_ms"]["p50"] == pytest.approx(50) and run["itl_ms"]["p99"] == pytest.approx(500)
    assert run["failures"] == {"RESOURCE_EXHAUSTED": 1} and run["paths"] == {"disaggregated": 9}

    # both targets met by 100%, 95%, 90%, 50%: the goodput is 4; a failure counts as a miss
    runs = [run_at(1, 20, 0, 0), run_at(2, 19, 1, 0), run_at(4, 18, 1, 0, failed=1), run_at(8, 10, 5, 5)]
    assert bench.goodput(runs) == 4 and bench.goodput(runs, target=0.95) == 2 and bench.goodput(runs[3:]) is None
    sweep = {"label": "x", "runs": runs, "goodput_rps": 4, "attainment_target": 0.9}
    assert "goodput: 4 req/s" in bench.format_sweep(sweep)
    assert "RESOURCE_EXHAUSTED 1 (queue full)" in bench.format_run(runs[2])
    nothing = {"rate": None, "concurrency": 2, **summarize([RequestResult(1, 1, "UNAVAILABLE", "gone")], 1.0, 1, 1)}
    assert nothing["ttft_ms"]["p99"] is None and "UNAVAILABLE" in bench.format_run(nothing)


def test_plot_overlays_sweeps(tmp_path) -> None:
    paths = []
    for label, slow in (("tp1", 1), ("tp2", 3)):
        runs = [run_at(r, 20 - slow * i, slow * i, 0) for i, r in enumerate((1, 2, 4, 8))]
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"label": label, "runs": runs, "goodput_rps": bench.goodput(runs)}))
        paths.append(str(path))
    unlabelled = tmp_path / "all-failed.json"  # no label, no latencies at all: still drawn
    unlabelled.write_text(json.dumps({"runs": [run_at(1, 0, 0, 0, failed=3)], "goodput_rps": None}))
    png = tmp_path / "compare.png"
    assert bench.main(["--plot-from", *paths, str(unlabelled), "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    with pytest.raises(SystemExit):
        bench.main(["--plot", str(png)])  # a single run has nothing to plot against rate
    not_a_sweep = tmp_path / "run.json"
    not_a_sweep.write_text(json.dumps(run_at(1, 1, 0, 0)))
    with pytest.raises(ValueError, match="not a sweep"):
        bench.main(["--plot-from", str(not_a_sweep), "--plot", str(png)])


def test_a_short_run_against_a_real_cluster(ray_local, tiny_checkpoints, tmp_path) -> None:
    from pdserve.launch import start_cluster
    from tests.e2e.conftest import small_cluster

    out = tmp_path / "run.json"
    with start_cluster(small_cluster(str(tiny_checkpoints["llama"])), progress=None) as cluster:
        rc = bench.main(["--address", cluster.address, "--workload", "uniform", "--min-prompt-len", "4",
                   "--max-prompt-len", "100", "--min-output-len", "8", "--max-output-len", "24", "--num-requests",
                   "8", "--rate", "20", "--warmup", "2", "--label", "tiny", "--json", str(out), "--detailed",
                   "--quiet"])
    assert rc == 0
    run = json.loads(out.read_text())
    assert (run["num_requests"], run["completed"], run["failures"], run["label"]) == (8, 8, {}, "tiny")
    assert run["rate"] == 20 and run["model"] == "llama" and sum(run["paths"].values()) == 8
    want = lengths(make_requests(Workload("uniform", prompt_range=(4, 100), output_range=(8, 24)), 8, 0, 512, 1024))
    assert [(r["prompt_len"], r["num_output_tokens"]) for r in run["requests"]] == want
    assert run["total_output_tokens"] == sum(o for _, o in want)
    for r in run["requests"]:
        assert 0 < r["ttft"] <= r["e2e"] and len(r["itl"]) == r["num_output_tokens"] - 1
        assert r["server"]["path"] == ("local" if r["prompt_len"] < 16 else "disaggregated")
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        d = run[name]
        assert 0 < d["p50"] <= d["p90"] <= d["p99"]
    assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"] and run["output_throughput"] > 0


def test_no_cluster_is_one_line_and_exit_status_1(capsys) -> None:
    from tests.pdserve.test_client_requests import unused_port

    assert bench.main(["--address", f"127.0.0.1:{unused_port()}", "--num-requests", "1", "--quiet"]) == 1
    assert "no cluster answers" in capsys.readouterr().err


def test_multiturn_against_a_real_cluster_resends_the_answers(ray_local, tiny_checkpoints) -> None:
    from pdserve.launch import start_cluster
    from tests.e2e.conftest import small_cluster

    workload = Workload("multiturn", multiturn=Chats(system_len=64, turns=(3, 3), user=(8, 16), output=(4, 8)))
    convs = make_conversations(workload, 3, seed=0, vocab=512, max_len=1024)
    with start_cluster(small_cluster(str(tiny_checkpoints["llama"])), progress=None) as cluster:
        run = bench.run_benchmark(cluster.address, convs, rate=None, detailed=True)
        with pytest.raises(ValueError, match="grpc"):
            bench.run_benchmark(cluster.address, convs, backend="openai")
    assert (run["num_requests"], run["completed"]) == (9, 9)
    # each turn's prompt: the one before, its answer and the new message (the order of requests is per conversation)
    for i, conv in enumerate(convs):
        turns = run["requests"][3 * i:3 * i + 3]
        assert turns[0]["prompt_len"] == 64 + len(conv.turns[0][0])
        for before, after, (user, _) in zip(turns, turns[1:], conv.turns[1:]):
            assert after["prompt_len"] == before["prompt_len"] + before["num_output_tokens"] + len(user)
    # a later turn takes the system prompt (4 blocks of 16) and the earlier turns from a prefix cache (the
    # conversations start at once: their first turns may all miss)
    later = [r for i in range(3) for r in run["requests"][3 * i + 1:3 * i + 3]]
    assert all(r["cached_tokens"] >= 64 for r in later)
    assert run["prefix_cache_hit_ratio"] > 0.4
