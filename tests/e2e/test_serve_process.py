"""`pdserve serve` as a process, the way an operator runs it: SIGTERM (a Kubernetes preStop, a
Ctrl-C) drains it, the request in flight finishes, new ones are refused, and it exits 0 leaving no
process (Ray's daemons and agents included) and no Prometheus discovery file behind. After a
SIGKILL, which no process can clean up after, the next `pdserve serve` removes what it left."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve import Client, RequestError
from tests.e2e.test_existing_ray_cluster import free_port
from tests.kv_transfer.test_shm_transfer import prompts_of


def test_sigterm_drains_and_leaves_nothing_behind(tiny_checkpoints, tmp_path) -> None:
    sd_dir = tmp_path / "sd"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "PDSERVE_PROMETHEUS_SD_DIR": str(sd_dir)}
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_checkpoints["llama"]), "name": "sigterm",
        "prefill": {"num_kv_blocks": 128}, "decode": {"num_kv_blocks": 128},
        "router": {"port": port, "http_port": 0, "metrics_port": 0, "local_prefill_threshold": 8}}))
    server = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("pdserve is ready" in line for line in lines):
            assert time.monotonic() < deadline and server.poll() is None, "".join(lines)
            lines.append(server.stdout.readline())
        started = psutil.Process(server.pid).children(recursive=True)
        assert len(list(sd_dir.iterdir())) == 1
        metrics = json.loads(next(sd_dir.iterdir()).read_text())[0]["targets"][0]
        address = f"127.0.0.1:{port}"
        with Client(address, timeout=60) as client, grpc.insecure_channel(address) as channel:
            stream = client.stream(prompts_of([60], seed=3)[0], max_tokens=900, ignore_eos=True, temperature=0)
            chunks = [next(stream)]
            server.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                time.sleep(0.02)
            with pytest.raises(RequestError) as err:
                client.generate([1, 2, 3], max_tokens=2)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details
            scrape = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
            assert re.search(r'pdserve_requests_total\{[^}]*status="UNAVAILABLE"\} 1\.0', scrape), scrape  # counted
            chunks += list(stream)  # the request in flight finishes
        assert sum(len(c.token_ids) for c in chunks) == 900 and chunks[-1].finish_reason == "length"
        assert server.wait(60) == 0
        out = "".join(lines) + server.stdout.read()
        assert "draining" in out and "cut short" not in out, out
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert not list(sd_dir.iterdir())
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)


def start_serve(tiny_model, tmp_path, name: str, sd_dir) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """`pdserve serve` on the tiny model, once ready: the process and every process below it."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model), "name": name, "prefill": {"num_kv_blocks": 64}, "decode": {"num_kv_blocks": 64},
        "router": {"port": 0, "http_port": None, "metrics_port": 0}}))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "PDSERVE_PROMETHEUS_SD_DIR": str(sd_dir)}
    server = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not any("pdserve is ready" in line for line in lines):
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise AssertionError("".join(lines))
        lines.append(server.stdout.readline())
    return server, psutil.Process(server.pid).children(recursive=True)


def test_the_next_serve_cleans_up_after_a_sigkilled_one(tiny_checkpoints, tmp_path) -> None:
    sd_dir = tmp_path / "sd"
    killed, its_processes = start_serve(tiny_checkpoints["llama"], tmp_path, "killed", sd_dir)
    (stale,) = sd_dir.iterdir()
    killed.kill()
    killed.wait(30)
    time.sleep(2)  # what dies with it has died: Ray's daemons and workers; its agents stay
    left = [p for p in its_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    print("left by the SIGKILL:", [p.name() for p in left])
    assert stale.exists()  # nothing ran to remove it
    server, _ = start_serve(tiny_checkpoints["llama"], tmp_path, "after", sd_dir)
    try:
        _, alive = psutil.wait_procs(left, timeout=15)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert not stale.exists() and len(list(sd_dir.iterdir())) == 1  # its own target only
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
