"""`pdserve serve --address` joins a Ray cluster that is already running and places each pool on
the nodes that carry its custom resource (here one node carrying both: a cluster started by
another process, with {"prefill": 1, "decode": 1}), then serves through the CLI's router."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import yaml

from engine.distributed import free_port
from pdserve import Client

HOLD_CLUSTER = textwrap.dedent("""
    import sys, time
    from replica.ranks import loopback_ray
    loopback_ray()
    import ray
    ray.init(num_cpus=3, resources={"prefill": 1, "decode": 1}, include_dashboard=False, _node_ip_address="127.0.0.1")
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()  # until the test closes it
""")


def test_serve_joins_a_running_ray_cluster_and_pins_pools_by_resource(tiny_checkpoints, tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    server = None
    try:
        address = holder.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        port = free_port()
        config = tmp_path / "cluster.yaml"
        config.write_text(yaml.safe_dump({
            "model": str(tiny_checkpoints["llama"]), "name": "joined",
            "prefill": {"resources": {"prefill": 1}, "num_kv_blocks": 64},
            "decode": {"resources": {"decode": 1}, "num_kv_blocks": 64},
            "router": {"port": port, "metrics_port": 0, "local_prefill_threshold": 1}}))
        server = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--address", address, "--config",
                                   str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lines = []
        deadline = time.monotonic() + 120
        while not any("pdserve is ready" in line for line in lines):
            assert time.monotonic() < deadline and server.poll() is None, "".join(lines)
            lines.append(server.stdout.readline())
        assert any("Ray connected" in line for line in lines), "".join(lines)
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            out = client.generate([1, 2, 3, 4, 5, 6], max_tokens=5, temperature=0)
            assert len(out.token_ids) == 5 and out.timings["path"] == "disaggregated"
            pools = {p.role: p.replicas for p in client.status().pools}
        assert len(pools["prefill"]) == 1 and len(pools["decode"]) == 1
        # a third pool needing the same resource again cannot be placed: the resources really pin the pools
        check = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import ray
            ray.init(address={address!r})
            print(ray.available_resources().get("prefill", 0), ray.available_resources().get("decode", 0))
        """)], capture_output=True, text=True, env={**env, "RAY_AUTH_MODE": "token"}, timeout=60)
        assert [float(x) for x in check.stdout.split()[-2:]] == [0.0, 0.0], check.stdout + check.stderr
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            server.wait(30)
        holder.stdin.close()
        holder.wait(60)
