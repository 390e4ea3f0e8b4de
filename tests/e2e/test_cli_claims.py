"""What the README says the CLI does, run as the README runs it: `pdserve demo` (start the default
model's cluster, answer a chat question through the SDK, print the path and the pools' table,
stop, leaving nothing behind), `pdserve serve --host` (where the router's ports listen; the
warning on an address beyond loopback) and `pdserve chat --system` (the system prompt is the
first message of every turn). Real processes, a real Ray and the real default model; all traffic
to loopback."""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from engine import LLM, SamplingParams
from pdserve import Client

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"
# a documentation address (RFC 5737, TEST-NET-3): on no interface here, so binding it fails
NOT_OURS = "203.0.113.7"


@pytest.fixture(scope="module")
def offline():
    return LLM("default", num_kv_blocks=256)


WARNING = "warning: the router listens on"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever $http_proxy says


def pdserve(*argv: str, sd_dir: Path, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PDSERVE_PROMETHEUS_SD_DIR": str(sd_dir)}
    return subprocess.Popen([sys.executable, "-m", "pdserve", *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=stderr)


class Descendants:
    """Every process below `pid` seen while it runs (polled: Ray's daemons and workers live long enough)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[int, psutil.Process] = {}
        self.names: dict[int, str] = {}  # as seen alive
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                for p in self.root.children(recursive=True):
                    p = self.seen.setdefault(p.pid, p)
                    try:
                        self.names[p.pid] = p.name()  # the latest: a child is "python" until it execs
                    except psutil.Error:
                        pass
            except psutil.NoSuchProcess:
                return
            self._done.wait(0.1)

    def stop(self) -> dict[int, psutil.Process]:
        self._done.set()
        self._thread.join()
        return self.seen


def names(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}:{p.name()}")
        except psutil.Error:
            out.append(f"{p.pid}:?")
    return out


def assert_nothing_left(seen: dict[int, psutil.Process], cluster_name: str, sd_dir: Path) -> None:
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
    assert not alive, names(alive)
    mentioning = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(cluster_name in part for part in p.info["cmdline"] or ()):
            mentioning.append(p)
    assert not mentioning, names(mentioning)
    assert not list(Path("/dev/shm").glob(f"pdserve-kv-{cluster_name}-*"))  # the decode replicas' KV pools
    assert not list(sd_dir.glob("*.json"))  # the Prometheus discovery file


def run_to_end(proc: subprocess.Popen, timeout: float = 150) -> tuple[str, str, Descendants]:
    """(stdout, stderr, the processes seen below it, watched to its end) of a pdserve command that ends
    by itself (killed if it has not after `timeout` s)."""
    procs = Descendants(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    procs.stop()
    return out, err, procs


def tiny_config(tmp_path: Path, model: Path, name: str) -> Path:
    """A cluster file: the tiny model, small KV pools, HTTP and metrics on ports of the OS's choosing."""
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "name": name, "prefill": {"num_kv_blocks": 64}, "decode": {"num_kv_blocks": 64},
        "router": {"http_port": 0, "metrics_port": 0}}))
    return config


def unmapped(ip: str) -> str:
    return ip.removeprefix("::ffff:")


def test_demo_answers_prints_the_path_and_the_pools_and_leaves_nothing_running(tmp_path, offline) -> None:
    # README: `pdserve demo "What is the capital of France?"`; the config only names the cluster (to find
    # what it leaves) and sizes its KV pools
    name = f"clidemo{os.getpid()}"
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"name": name}))
    sd_dir = tmp_path / "sd"
    t0 = time.monotonic()
    demo = pdserve("demo", QUESTION, "--config", str(config), sd_dir=sd_dir)
    out, err, procs = run_to_end(demo)
    assert demo.returncode == 0, err[-3000:]
    assert time.monotonic() - t0 < 150
    # it ran a local Ray of its own (daemons and replica workers below it), and stopped all of it
    assert {"raylet", "gcs_server"} <= set(procs.names.values()), procs.names
    assert_nothing_left(procs.seen, name, sd_dir)

    # the question, the streamed answer: the default model's greedy chat reply, as the offline engine's
    (want,) = offline.chat([{"role": "user", "content": QUESTION}], SamplingParams(temperature=0, max_tokens=128))
    assert "Paris" in want.text
    m = re.search(r"^user> (.*?)\nassistant> (.*?)\n\[(\w+) prefill on (\S+), decode on (\S+); ttft (\d+) ms, "
                  r"total (\d+) ms, (\d+) tokens\]\n", out, re.MULTILINE | re.DOTALL)
    assert m, out
    question, answer, path, prefill_on, decode_on, ttft, total, tokens = m.groups()
    assert question == QUESTION and answer == want.text, out
    assert path in ("disaggregated", "local") and decode_on == "decode/0", out
    assert prefill_on == ("prefill/0" if path == "disaggregated" else "decode/0"), out
    assert 0 < int(ttft) <= int(total) and int(tokens) == len(want.token_ids), out

    # the pools' utilization as a table: a summary line, the header, a healthy row per replica
    table = out[m.end():].splitlines()
    assert table[0].startswith("model default  kv_backend ipc  in flight 0  queued 0"), out
    assert table[1].split() == ["pool", "replica", "tp", "healthy", "restarts", "busy", "mfu", "mbu", "running",
                                "waiting", "waiting_tok", "kv_used", "tokens", "cache_hit"], out
    rows = {tuple(line.split()[:4]) for line in table[2:]}
    assert rows == {("prefill", "0", "1", "yes"), ("decode", "0", "1", "yes")}, out


def test_serve_binds_the_router_ports_to_host_and_nothing_beyond_loopback(tiny_checkpoints, tmp_path) -> None:
    # README: `--host` is the router's bind address (default 127.0.0.1, which test_serve_process dials).
    # 127.0.0.2 is loopback too (no warning, nothing reachable from outside) but not the default
    host = "127.0.0.2"
    name = f"clihost{os.getpid()}"
    config = tiny_config(tmp_path, tiny_checkpoints["llama"], name)
    sd_dir = tmp_path / "sd"
    err_file = tmp_path / "stderr"  # a file, not a pipe: Ray's log lines must never block the server
    with err_file.open("w") as err:
        server = pdserve("serve", "--config", str(config), "--port", "0", "--host", host, sd_dir=sd_dir,
                         stderr=err)
    procs = Descendants(server.pid)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("pdserve is ready" in line for line in lines):
            assert time.monotonic() < deadline and server.poll() is None, "".join(lines) + err_file.read_text()
            lines.append(server.stdout.readline())
        out = "".join(lines)
        address = re.search(r"call it at (\S+)", out).group(1)
        http = re.search(r"OpenAI-compatible API on http://(\S+)/v1", out).group(1)
        metrics = re.search(r"metrics on http://(\S+)/metrics", out).group(1)
        ports = {}
        for what, where in (("grpc", address), ("http", http), ("metrics", metrics)):
            ip, port = where.rsplit(":", 1)
            assert ip == host, out
            ports[int(port)] = what

        tree = {server.pid} | {p.pid for p in psutil.Process(server.pid).children(recursive=True)}
        listening = [(unmapped(c.laddr.ip), c.laddr.port) for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.pid in tree]
        # each of the router's three ports on the host asked for, and on no other address
        assert {port: {ip for ip, p in listening if p == port} for port in ports} == {p: {host} for p in ports}
        # and nothing of the cluster (Ray's daemons and workers included) beyond loopback
        assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening

        with Client(address, timeout=60) as client:  # served there
            assert len(client.generate([1, 2, 3, 4], max_tokens=3, ignore_eos=True).token_ids) == 3
        with DIRECT.open(f"http://{http}/health", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(OSError):  # not on the default address
            DIRECT.open(f"http://127.0.0.1:{http.rsplit(':', 1)[1]}/health", timeout=10)

        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
        assert WARNING not in err_file.read_text()  # loopback: no warning
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    assert_nothing_left(procs.stop(), name, sd_dir)


def test_serve_on_an_address_beyond_loopback_warns(tiny_checkpoints, tmp_path) -> None:
    # README: "`pdserve serve --host` on any other address warns" (without an API key). The address is
    # not this machine's, so the router cannot bind it: the warning comes first, then a clean failure
    if NOT_OURS in {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}:
        pytest.skip(f"{NOT_OURS} is an address of this machine")
    name = f"clinotours{os.getpid()}"
    config = tiny_config(tmp_path, tiny_checkpoints["llama"], name)
    sd_dir = tmp_path / "sd"
    server = pdserve("serve", "--config", str(config), "--port", "0", "--host", NOT_OURS, sd_dir=sd_dir)
    out, err, procs = run_to_end(server)
    assert (f"{WARNING} {NOT_OURS} and no API key is set: anyone who can reach it can use "
            "the cluster (set --api-key or PDSERVE_API_KEY)") in err, err
    # main() reports the bind failure (gRPC's RuntimeError) as an error, exit status 2
    bind_error = re.search(rf"^error: .*bind.* {re.escape(NOT_OURS)}:0\b", err, re.MULTILINE)
    assert server.returncode == 2 and bind_error, err[-3000:]
    assert "pdserve is ready" not in out
    assert_nothing_left(procs.seen, name, sd_dir)


def chat_turns(stdout: str) -> list[str]:
    """The assistant's replies in `pdserve chat`'s output ("you> " prompts, "assistant> " + reply + newline)."""
    return [turn.removeprefix("assistant> ").removesuffix("\n") for turn in stdout.split("you> ")
            if turn.startswith("assistant> ")]


def test_chat_system_prompt_is_the_first_message_of_every_turn(default_cluster, offline) -> None:
    system, questions = "Answer in French.", ["What is the capital of France?", "What is the capital of Italy?"]
    greedy = SamplingParams(temperature=0, max_tokens=16)

    history, want = [{"role": "system", "content": system}], []  # the offline engine, turn by turn
    for q in questions:
        history.append({"role": "user", "content": q})
        (out,) = offline.chat(history, greedy)
        want.append(out.text)
        history.append({"role": "assistant", "content": out.text})
    # the system prompt changes each turn's greedy reply, so one dropped (or repeated) would show
    (first_without,) = offline.chat([{"role": "user", "content": questions[0]}], greedy)
    assert want[0] != first_without.text
    (second_without,) = offline.chat([{"role": "user", "content": questions[0]},
                                      {"role": "assistant", "content": want[0]},
                                      {"role": "user", "content": questions[1]}], greedy)
    assert want[1] != second_without.text

    chat = subprocess.run([sys.executable, "-m", "pdserve", "chat", "--address", default_cluster.address,
                           "--system", system, "--max-tokens", "16"], input="\n".join(questions) + "\n",
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert chat.returncode == 0, chat.stderr
    assert chat_turns(chat.stdout) == want, chat.stdout
