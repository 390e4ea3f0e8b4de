"""Observability against the real thing: a real Prometheus (Debian's package, started here on
127.0.0.1) scrapes a running cluster under load through the shipped scrape configuration, and
every query of every Grafana panel returns data that moves with the load and stays in its range."""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

import pdserve.launch
from engine.distributed import free_port
from pdserve import AsyncClient
from pdserve.launch import start_cluster
from tests.e2e.conftest import small_cluster
from tests.kv_transfer.test_shm_transfer import prompts_of

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="no prometheus binary (scripts/setup.sh installs Debian's package)")


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) with Grafana's placeholders filled in as Grafana would."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "10s").replace("$replica", ".*")
                out.append((path.stem, panel["title"], expr))
    return out


def test_dashboards_are_built_from_build_py() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", ROOT / "deploy" / "grafana" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert {p.name: p.read_text() for p in DASHBOARDS} == build.build()
    assert len(DASHBOARDS) == 4 and len(panel_queries()) >= 30


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (scripts/setup.sh installs Debian's package)")
def test_promtool_accepts_the_shipped_configuration() -> None:
    run = subprocess.run(["promtool", "check", "config", str(SHIPPED)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _get(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def prometheus(tmp_path, monkeypatch):
    """Prometheus on 127.0.0.1 with the shipped config, scraping every second, its service
    discovery reading this test's directory (where the cluster publishes its /metrics)."""
    sd_dir = tmp_path / "sd"
    monkeypatch.setattr(pdserve.launch, "PROMETHEUS_SD_DIR", sd_dir)
    config = yaml.safe_load(SHIPPED.read_text())
    config["global"]["scrape_interval"] = "1s"
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdserve"]
    job["file_sd_configs"] = [{"files": [str(sd_dir / "*.json")], "refresh_interval": "1s"}]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(port, "/api/v1/status/buildinfo")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@needs_prometheus
def test_every_panel_query_returns_data_from_a_loaded_cluster(ray_local, tiny_checkpoints, prometheus) -> None:
    config = small_cluster(str(tiny_checkpoints["llama"]), local_prefill_threshold=8)
    prompts = prompts_of([3, 20, 60, 150] * 4, seed=5)  # both prefill paths

    async def load(address, seconds: float = 8.0):
        """8 clients, each sending its prompts back to back for `seconds`: the gauges stay up across
        several of Prometheus's 1 s scrapes (a burst can fall between two)."""
        end = time.monotonic() + seconds
        async with AsyncClient(address, timeout=120) as client:
            async def user(mine: list) -> None:
                while time.monotonic() < end:
                    for p in mine:
                        await client.generate(p, temperature=0, max_tokens=64, ignore_eos=True)
            await asyncio.gather(*(user(prompts[i::8]) for i in range(8)))

    with start_cluster(config, progress=None) as cluster:
        target = f"127.0.0.1:{cluster.server.metrics_port}"
        deadline = time.monotonic() + 30
        while not any(t["labels"]["instance"] == target and t["health"] == "up"
                      for t in _get(prometheus, "/api/v1/targets")["data"]["activeTargets"]):
            assert time.monotonic() < deadline, "Prometheus never scraped the cluster"
            time.sleep(0.5)
        start = time.time()
        asyncio.run(load(cluster.address))
        time.sleep(3)  # a few more scrapes after the load
        end = time.time()
        empty, wrong = [], []
        for board, panel, expr in panel_queries():
            answer = _get(prometheus, "/api/v1/query", query=expr)
            assert answer["status"] == "success", (board, panel, expr, answer)
            if not answer["data"]["result"]:
                empty.append(f"{board} / {panel}: {expr}")
            # every value the panel would have drawn over the load, each series, one a second
            series = _get(prometheus, "/api/v1/query_range", query=expr, start=start, end=end, step=1)
            values = [float(v) for r in series["data"]["result"] for _, v in r["values"]]
            if why := wrong_values(panel, expr, values):
                wrong.append(f"{board} / {panel}: {expr}: {why}")
        assert not empty, "panels with no data:\n" + "\n".join(empty)
        assert not wrong, "panels whose values do not follow the load:\n" + "\n".join(wrong)
        # and the figures mean something: both pools did work that Prometheus saw
        tokens = _get(prometheus, "/api/v1/query", query="pdserve_tokens_processed_total")["data"]["result"]
        assert {r["metric"]["pool"] for r in tokens if float(r["value"][1]) > 0} == {"prefill", "decode"}


# What a fault-free load below the admission limit leaves at zero: the panels of faults and overload.
MAY_STAY_ZERO = ("preemptions", "failures", "leases_expired", "requests_queued", "admission_refusals",
                 "waiting_prefill_tokens", "saved_bytes", "prefix_cache_hits",
                 "dispatch_rule", "autoscale")  # and what a cluster without slo_aware or autoscaling leaves there
FRACTIONS = ("pdserve_mfu", "pdserve_mbu", "busy_fraction", "kv_blocks_used", "prefix_cache_hits", "slo_met",
             "step_off_cpu")


def wrong_values(panel: str, expr: str, values: list[float]) -> str | None:
    """Why a panel's values over a load are wrong (None: they are right). A ratio of rates or a
    quantile is NaN while nothing happens (0/0): that is a gap in the graph; some value must be finite."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return f"no finite value in {len(values)}"
    if any(v < 0 for v in finite):
        return f"negative: {min(finite)}"
    if any(f in expr for f in FRACTIONS) and max(finite) > 1:
        return f"a fraction above 1: {max(finite)}"
    if "histogram_quantile" in expr and not all(v > 0 for v in finite):
        return "a quantile of 0"
    if not any(z in expr for z in MAY_STAY_ZERO) and max(finite) == 0:
        return "never above 0 under load"
    return None
