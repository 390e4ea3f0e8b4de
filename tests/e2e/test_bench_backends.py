"""`pdserve bench` through both front doors of one cluster (the default model): the same requests over gRPC and over
the OpenAI-compatible HTTP API, every one complete with exactly the tokens it asked for."""
from __future__ import annotations

import json

from pdserve import bench


def test_one_workload_through_both_front_doors(default_cluster, tmp_path) -> None:
    targets = {"grpc": ["--address", default_cluster.address],
               "openai": ["--base-url", f"http://{default_cluster.http_address}/v1"]}
    runs = {}
    for backend, target in targets.items():
        out = tmp_path / f"{backend}.json"
        rc = bench.main(["--backend", backend, *target, "--workload", "uniform", "--min-prompt-len", "8",
                         "--max-prompt-len", "48", "--min-output-len", "8", "--max-output-len", "8", "--num-requests",
                         "4", "--rate", "20", "--json", str(out), "--detailed", "--quiet"])
        assert rc == 0
        runs[backend] = json.loads(out.read_text())
    for backend, run in runs.items():
        assert (run["backend"], run["model"], run["completed"], run["failures"]) == (backend, "default", 4, {})
        for r in run["requests"]:
            assert r["status"] == "OK" and r["num_output_tokens"] == r["output_len"] == 8
            assert 0 < r["ttft"] <= r["e2e"] and r["tpot"] > 0
        assert run["total_output_tokens"] == 32 and run["output_throughput"] > 0
    grpc, http = runs["grpc"], runs["openai"]
    # the same prompts: the same vocabulary, lengths and arrival times
    assert grpc["vocab_size"] == http["vocab_size"] == bench.DEFAULT_VOCAB_SIZE
    assert [r["prompt_len"] for r in grpc["requests"]] == [r["prompt_len"] for r in http["requests"]]
    assert grpc["total_input_tokens"] == http["total_input_tokens"]
    assert http["paths"] == {"unknown": 4} and sum(grpc["paths"].values()) == 4


def test_the_python_api_finds_the_model_itself(default_cluster) -> None:
    requests = bench.make_requests(bench.Workload(prompt_len=16, output_len=4), 2, seed=0, vocab=1000, max_len=512)
    run = bench.run_benchmark(f"http://{default_cluster.http_address}/v1/", requests, backend="openai")
    assert (run["completed"], run["total_output_tokens"], run["backend"]) == (2, 8, "openai")
