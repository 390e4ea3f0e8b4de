"""Soak run: steady Poisson load on 1 prefill + 1 decode replica for --duration (default 600 s), no faults;
every process's resident memory, open file descriptors and threads, and the KV blocks held, sampled every
--sample-every s. Not in CI (ten minutes); run it after a change to the serving path:

    .venv/bin/python scripts/soak.py --json soak.json                  # the default model, ~11 min with start-up
    .venv/bin/python scripts/soak.py --duration 60 --model /tmp/t        # a quick look on a tiny checkpoint

The load is chaos.py's (the same request variants, each checked against the offline engine's tokens, streamed
through pdserve.AsyncClient), without the killer. The first sample is taken after --warmup s of load, once the
pools, caches and Ray's workers have settled; "growth" is the last sample against that one:

  RSS MiB    per process: this process ("driver": the router and the load generator), each replica's actor, and
             Ray's other processes ("ray": its daemons and idle workers, summed)
  fds        open file descriptors of the same processes (sockets, shared-memory maps, pipes)
  threads    threads of the same processes
  KV blocks  per replica, while loaded (they move with the load) and once idle at the end (target: 0)

It passes when every request finished with the fault-free tokens, no block is held once idle, and from the first
sample to the last no group grew by more than --rss-slack-mib MiB (default 64) of RSS, --fd-slack descriptors
(default 8) or --thread-slack threads (default 4). It prints the series so a slow climb shows even inside the slack.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import threading
import time
from typing import Any

from chaos import POOLS, blocks, cpu_model, first_difference, load, references, schedule, wait_idle, without_ids

MiB = 1 << 20


def processes(cluster) -> dict[int, str]:
    """pid -> group ("driver", "prefill/0", "decode/0", "ray") of this process, its children and the replicas."""
    import psutil
    import ray

    roles = {}
    for pool in POOLS:
        for i, actor in enumerate(cluster.pools.actors[pool]):
            roles[ray.get(actor.info.remote(), timeout=60)["pid"]] = f"{pool}/{i}"
    me = psutil.Process()
    pids = {me.pid} | {p.pid for p in me.children(recursive=True)} | set(roles)
    return {pid: "driver" if pid == me.pid else roles.get(pid, "ray") for pid in pids}


def sample(cluster, client, t0: float) -> dict[str, Any]:
    """One sample: per group, RSS MiB, fds and threads; the KV blocks per replica."""
    import psutil

    groups: dict[str, dict[str, float]] = {}
    for pid, group in processes(cluster).items():
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                figures = {"rss_mib": p.memory_info().rss / MiB, "fds": p.num_fds(), "threads": p.num_threads()}
        except psutil.NoSuchProcess:
            continue
        g = groups.setdefault(group, {"rss_mib": 0.0, "fds": 0, "threads": 0, "processes": 0})
        for k, v in figures.items():
            g[k] += v
        g["processes"] += 1
    return {"t_s": round(time.monotonic() - t0, 1), "groups": groups, "blocks": blocks(client.status())}


def growth(first: dict[str, Any], last: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {g: {k: last["groups"][g][k] - first["groups"][g][k] for k in ("rss_mib", "fds", "threads", "processes")}
            for g in first["groups"] if g in last["groups"]}


def report(r: dict[str, Any]) -> str:
    a = r["args"]
    lines = [f"soak: 1 prefill + 1 decode replica of {a['model']!r} ({a['kv_backend']}), {a['duration']:g} s of "
             f"Poisson load at {a['rate']:g} req/s (max_tokens {a['max_tokens']}), seed {a['seed']}",
             f"cpu: {r['cpu']} ({os.cpu_count()} cores); command: {r['command']}",
             f"requests: {r['sent']} sent, {r['ok']} OK, {r['failed']} failed; {r['differ']} outputs differ from the "
             f"offline engine's", "samples (t: group RSS MiB / fds / threads ...; KV blocks):"]
    for s in r["samples"]:
        figures = "  ".join(f"{g} {v['rss_mib']:.0f}/{v['fds']:.0f}/{v['threads']:.0f}"
                            for g, v in sorted(s["groups"].items()))
        lines.append(f"  {s['t_s']:6.1f} s  {figures}  blocks {s['blocks']}")
    lines.append("growth, first sample to last:")
    for g, d in sorted(r["growth"].items()):
        lines.append(f"  {g:10} RSS {d['rss_mib']:+7.1f} MiB  fds {d['fds']:+4.0f}  threads {d['threads']:+4.0f}  "
                     f"processes {d['processes']:+2.0f}")
    lines.append(f"KV blocks once idle: {r['blocks_end']}")
    lines += [f"  over: {w}" for w in r["over"]]
    lines.append("PASS" if r["passed"] else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second (default 1)")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the first sample (default 30)")
    p.add_argument("--sample-every", type=float, default=60.0, help="seconds between samples (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default", help="'default' or a Hugging Face folder")
    p.add_argument("--kv-backend", default="ipc")
    p.add_argument("--max-tokens", default="32-96", help="LO-HI: each variant's max_tokens (default 32-96)")
    p.add_argument("--rss-slack-mib", type=float, default=64.0)
    p.add_argument("--fd-slack", type=int, default=8)
    p.add_argument("--thread-slack", type=int, default=4)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: Ray binds 127.0.0.1 only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pdserve import Client
    from pdserve.config import ClusterConfig, RouterConfig
    from pdserve.launch import init_ray, start_cluster

    config = ClusterConfig(model=args.model, name=f"soak{os.getpid()}", kv_backend=args.kv_backend,
                           router=RouterConfig(port=0, http_port=None, metrics_port=0))
    lo, hi = (int(n) for n in args.max_tokens.split("-"))
    print("computing the fault-free output of each request variant with the offline engine", flush=True)
    vs, want = references(args.model, args.seed, (lo, hi))
    requests = schedule(args.duration, args.rate, args.seed, len(vs))

    init_ray(config, num_cpus=8)
    cluster = start_cluster(config)
    samples: list[dict[str, Any]] = []
    try:
        with Client(cluster.address, timeout=30) as client:
            t0 = time.monotonic()
            done = threading.Event()

            def sampler() -> None:
                at = args.warmup
                while not done.wait(max(0.0, t0 + at - time.monotonic())):
                    samples.append(sample(cluster, client, t0))
                    print(f"[{samples[-1]['t_s']:6.1f}s] sampled", flush=True)
                    at += args.sample_every

            thread = threading.Thread(target=sampler, daemon=True)
            thread.start()
            records = asyncio.run(load(cluster.address, requests, vs, t0, 180.0))
            done.set()
            thread.join()
            blocks_end = wait_idle(client, 60)
            samples.append(sample(cluster, client, t0))  # the last, idle: what the load left behind
    finally:
        cluster.stop()
        ray.shutdown()

    for rec in records:
        if rec["status"] == "OK" and (i := first_difference(rec["token_ids"], want[rec["variant"]])) is not None:
            rec["detail"] = f"first difference at token {i}"
    failures = [without_ids(rec) for rec in records if rec["status"] != "OK"]
    differ = [without_ids(rec) for rec in records if "detail" in rec]
    grew = growth(samples[0], samples[-1]) if len(samples) >= 2 else {}
    slack = {"rss_mib": args.rss_slack_mib, "fds": args.fd_slack, "threads": args.thread_slack}
    over = [f"{g} {k} {d[k]:+.1f} (slack {slack[k]:g})" for g, d in grew.items() for k in slack if d[k] > slack[k]]
    result = {"args": vars(args), "cpu": cpu_model(), "command": shlex.join([sys.executable, *sys.argv]),
              "sent": len(records), "ok": len(records) - len(failures), "failed": len(failures), "differ": len(differ),
              "samples": samples, "growth": grew, "over": over, "blocks_end": blocks_end,
              "failures": failures, "differences": differ}
    result["passed"] = bool(grew) and not failures and not differ and not over and not any(blocks_end.values())
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
