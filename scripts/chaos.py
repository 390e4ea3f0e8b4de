"""Chaos run: Poisson load on 2 prefill + 2 decode replicas while a seeded killer ends a random replica every ~20 s.

    .venv/bin/python scripts/chaos.py --json chaos.json         # 180 s, the default model, ipc KV, ~3 min + start-up
    # a quick check of the whole flow (~1-2 min) on a tiny random checkpoint (no tokenizer: token-id prompts):
    PYTHONPATH=. .venv/bin/python -c 'import tests.engine.tiny_models as t; t.make_tiny_checkpoint("llama", "/tmp/t")'
    .venv/bin/python scripts/chaos.py --duration 40 --kill-every 10 --rate 4 --max-tokens 400-900 --model /tmp/t

Bounded and self-contained: it starts its own cluster on a loopback Ray (router on a free port, no HTTP), stops
sending after --duration, waits (at most --drain-timeout) for what is in flight, reports and stops everything.
Before the cluster starts, the offline engine (engine.LLM) computes the fault-free output of every request variant:
12 fixed prompts (chat and raw text for a model with a tokenizer, seeded token ids for one without), each sent
greedy and seeded (temperature 0.8), ignore_eos, max_tokens 32-96 (--max-tokens). Requests pick a variant at random
and arrive as a Poisson process of --rate per second, each streamed through pdserve.AsyncClient. Every ~--kill-every
s (a seeded jitter of +-25%) the killer ray.kill()s the rank-0 actor of a random replica (pool and index drawn from
the seed), then waits for the supervisor to bring that pool back to full strength before the next kill.

The figures:
  sent / OK / failed   requests sent; those that ended with a finish reason; those that ended in an error or were
                       still unfinished at the drain timeout (target: 0 failed)
  differ               OK requests whose token ids are not the offline engine's for their variant (target: 0; the
                       router continues a request whose replica died from the tokens already streamed, and sampling is
                       a pure function of (seed, position, logits), so none should)
  migrations           the router's pdserve_request_migrations_total: requests continued on another replica
  stall                per request, the longest wait the client saw: send to the first chunk, or between two chunks;
                       p50, p99 and max over the requests, with the request and when its longest gap ended
  kills                when (s from the load's start), which replica, requests in flight then; "unhealthy after":
                       until the router had marked it unhealthy; "full strength after": until it was replaced (its
                       restart count went up) and every replica of its pool was healthy again
  KV blocks            blocks in use per replica (ClusterStatus) before the load and once the cluster is idle after it
                       (target: 0 at the end)
  RSS                  resident memory (MiB) of this process (the router runs in it), of each replica's actor, and of
                       the rest of Ray's processes (daemons, idle workers): once the cluster is up, before the load,
                       and at the end (the replicas then are the replacements)

Exit status 0 only when nothing failed, no output differs, no KV block is held at the end and every killed replica's
pool came back to full strength. --json writes the same numbers (and each request's record, without its tokens).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from pdserve.bench_stats import percentile
from pdserve.workload import arrival_times

CHATS = ["What is the capital of France?", "Explain photosynthesis in two sentences.",
         "Write a haiku about the sea.", "Give me three tips for learning to code.",
         "Why is the sky blue?", "Summarize the plot of Romeo and Juliet."]
TEXTS = ["The capital of France is", "Once upon a time, in a small village by the river,",
         "def fibonacci(n):", "The three laws of thermodynamics are",
         "Hello", "In 1969, the first humans to walk on the Moon"]
POOLS = ("prefill", "decode")
MiB = 1 << 20


def variants(seed: int, vocab: int | None, chat: bool = True, max_tokens: tuple[int, int] = (32, 96)
             ) -> list[dict[str, Any]]:
    """24 request variants: 12 prompts, each greedy and seeded-sampled, max_tokens drawn in `max_tokens` (inclusive).
    With a tokenizer (vocab None) a prompt is {"messages": [...]} (or, without chat, the question as {"prompt": text})
    or {"prompt": text}; without one, {"prompt": [token ids below vocab]}."""
    rng = random.Random(f"variants-{seed}")
    if vocab is None:
        prompts = [{"messages": [{"role": "user", "content": c}]} if chat else {"prompt": c} for c in CHATS]
        prompts += [{"prompt": t} for t in TEXTS]
    else:  # lengths 4..120: some under the router's local_prefill_threshold (16), most over it
        prompts = [{"prompt": rng.choices(range(vocab), k=rng.randint(4, 120))} for _ in range(12)]
    out = []
    for k in range(2 * len(prompts)):
        sampling = {"temperature": 0.0} if k < len(prompts) else {"temperature": 0.8, "seed": 1000 + k}
        out.append({**prompts[k % len(prompts)], "sampling": {**sampling, "max_tokens": rng.randint(*max_tokens),
                                                               "ignore_eos": True}})
    return out


def schedule(duration: float, rate: float, seed: int, n_variants: int) -> list[tuple[float, int]]:
    """(send time in s, variant) of every request: Poisson arrivals at `rate` before `duration`."""
    times = [t for t in arrival_times(int(duration * rate * 2) + 20, rate, seed) if t < duration]
    rng = random.Random(f"requests-{seed}")
    return [(t, rng.randrange(n_variants)) for t in times]


def kill_plan(duration: float, every: float, seed: int, replicas: dict[str, int]) -> list[tuple[float, str, int]]:
    """(time in s, pool, index) of each kill: gaps of every * U(0.75, 1.25), the last one at least every / 2 before the
    end (so its recovery is seen under load), each a random replica of either pool."""
    rng = random.Random(f"kills-{seed}")
    targets = [(pool, i) for pool in POOLS for i in range(replicas[pool])]
    plan, t = [], every * rng.uniform(0.75, 1.25)
    while t <= duration - every / 2:
        plan.append((t, *rng.choice(targets)))
        t += every * rng.uniform(0.75, 1.25)
    return plan


def longest_gap(times: list[float]) -> tuple[float, float]:
    """(longest gap between consecutive times, when it ended); times[0] is the send time."""
    gaps = [(b - a, b) for a, b in zip(times, times[1:])]
    return max(gaps) if gaps else (0.0, times[0] if times else 0.0)


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token that differs (or where one list ends early); None when they are equal."""
    if got == want:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def references(model: str, seed: int, max_tokens: tuple[int, int]) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The variants for this model and the fault-free token ids of each, from the offline engine in this process
    (freed afterwards)."""
    from engine import LLM, SamplingParams

    llm = LLM(model, num_kv_blocks=max(512, 24 * (max_tokens[1] + 160) // 16))  # every variant at once
    tok = llm.tokenizer
    vs = variants(seed, llm.engine.config.model_config.vocab_size if tok is None else None,
                  chat=bool(getattr(tok, "chat_template", None)), max_tokens=max_tokens)
    prompts = [llm.apply_chat_template(v["messages"]) if "messages" in v else v["prompt"] for v in vs]
    outs = llm.generate(prompts, [SamplingParams(**v["sampling"]) for v in vs])
    llm.shutdown()
    del llm
    gc.collect()
    return vs, [list(o.token_ids) for o in outs]


async def send(client, rid: str, v: dict[str, Any], rec: dict[str, Any], t0: float) -> None:
    """Stream one request, filling rec: status, message, token_ids, end_s, stall_s, stall_at_s."""
    from pdserve import RequestError

    times = [time.monotonic()]
    try:
        prompt = {k: v[k] for k in ("prompt", "messages") if k in v}
        async for chunk in client.stream(**prompt, request_id=rid, **v["sampling"]):
            times.append(time.monotonic())
            rec["token_ids"] += chunk.token_ids
            rec["finish_reason"] = chunk.finish_reason or rec["finish_reason"]
        rec["status"] = "OK" if rec["finish_reason"] else "NO_FINISH"
    except RequestError as e:
        rec["status"], rec["message"] = e.code.name, e.details
    finally:
        rec["end_s"] = time.monotonic() - t0
        gap, at = longest_gap(times)
        rec["stall_s"], rec["stall_at_s"] = gap, at - t0


async def load(address: str, plan: list[tuple[float, int]], vs: list[dict[str, Any]], t0: float,
               drain_timeout: float) -> list[dict[str, Any]]:
    """Send every planned request at its time; wait at most drain_timeout after the last for them to end."""
    from pdserve import AsyncClient

    records, tasks = [], []

    async def progress() -> None:
        while True:
            await asyncio.sleep(10)
            done = [r for r in records if r["status"] is not None]
            print(f"[{time.monotonic() - t0:6.1f}s] sent {len(records)}, ok {sum(r['status'] == 'OK' for r in done)}, "
                  f"failed {sum(r['status'] != 'OK' for r in done)}, in flight {len(records) - len(done)}", flush=True)

    ticker = asyncio.create_task(progress())
    async with AsyncClient(address) as client:
        for i, (at, k) in enumerate(plan):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            rec = {"id": f"chaos-{i}", "variant": k, "sent_s": time.monotonic() - t0, "status": None, "message": "",
                   "token_ids": [], "finish_reason": None}
            records.append(rec)
            tasks.append(asyncio.create_task(send(client, rec["id"], vs[k], rec, t0)))
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    ticker.cancel()
    for rec in records:
        if rec["status"] is None:
            rec["status"], rec["message"] = "UNFINISHED", f"still running {drain_timeout} s after the last send"
    return records


class Killer(threading.Thread):
    """Runs the kill plan: ray.kill a replica's rank-0 actor, then wait until its pool is back to full strength."""

    def __init__(self, cluster, plan: list[tuple[float, str, int]], t0: float, recover_timeout: float) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.cluster, self.plan, self.t0, self.recover_timeout = cluster, plan, t0, recover_timeout
        self.kills: list[dict[str, Any]] = []
        self.no_more = threading.Event()  # set when the load ends: no new kill (a recovery underway is still timed)

    def run(self) -> None:
        import ray

        router = self.cluster.router
        for at, pool, index in self.plan:
            if self.no_more.wait(max(0.0, self.t0 + at - time.monotonic())):
                return
            replicas = getattr(router.placement, pool)
            before, killed = replicas[index].restarts, time.monotonic()
            kill = {"at_s": killed - self.t0, "planned_s": at, "replica": f"{pool}/{index}",
                    "in_flight": router.admission.ongoing, "unhealthy_after_s": None, "full_strength_after_s": None}
            ray.kill(self.cluster.pools.actors[pool][index])
            self.kills.append(kill)
            while (now := time.monotonic()) < killed + self.recover_timeout:
                if kill["unhealthy_after_s"] is None and not replicas[index].healthy:
                    kill["unhealthy_after_s"] = now - killed
                if replicas[index].restarts > before and all(r.healthy for r in replicas):
                    kill["full_strength_after_s"] = now - killed
                    break
                time.sleep(0.05)
            print(f"[{kill['at_s']:6.1f}s] killed {kill['replica']} ({kill['in_flight']} in flight): "
                  f"{fmt(kill['full_strength_after_s'])} to full strength", flush=True)


def without_ids(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "token_ids"} | {"num_tokens": len(rec["token_ids"])}


def fmt(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f} s"


def blocks(status) -> dict[str, int]:
    return {f"{p.role}/{r.index}": r.kv_blocks_used for p in status.pools for r in p.replicas}


def wait_idle(client, timeout: float) -> dict[str, int]:
    """Poll until no request is in flight or queued and no KV block is held (or timeout); the last block counts."""
    deadline = time.monotonic() + timeout
    while True:
        s = client.status()
        if not s.requests_in_flight and not s.requests_queued and not any(blocks(s).values()) \
                or time.monotonic() > deadline:
            return blocks(s)
        time.sleep(0.2)


def rss(cluster) -> dict[str, float]:
    """Resident MiB: this process ("driver": the router and the load), each replica's actor, and Ray's other
    processes ("ray": its daemons and idle workers)."""
    import psutil
    import ray

    roles = {}
    for pool in POOLS:
        for i, actor in enumerate(cluster.pools.actors[pool]):
            try:
                roles[ray.get(actor.info.remote(), timeout=60)["pid"]] = f"{pool}/{i}"
            except Exception as e:  # noqa: BLE001 - a replica down: its memory is left out, and said so
                print(f"RSS: {pool}/{i} did not answer ({e!r:.80})", flush=True)
    me = psutil.Process()
    procs = {me.pid: me} | {p.pid: p for p in me.children(recursive=True)}
    procs |= {pid: psutil.Process(pid) for pid in roles if pid not in procs}
    out: dict[str, float] = {}
    for pid, p in procs.items():
        role = "driver" if pid == me.pid else roles.get(pid, "ray")
        try:
            out[role] = out.get(role, 0.0) + p.memory_info().rss / MiB
        except psutil.NoSuchProcess:
            continue
    return out


def migrations(cluster) -> float:
    url = f"http://127.0.0.1:{cluster.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("pdserve_request_migrations_"
                                                                                           "total"))


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def by_role(mib: dict[str, float]) -> str:
    groups: dict[str, float] = {}
    for role, v in mib.items():
        groups[role.split("/")[0]] = groups.get(role.split("/")[0], 0.0) + v
    return f"{sum(mib.values()):.0f} (" + ", ".join(f"{k} {v:.0f}" for k, v in sorted(groups.items())) + ")"


def report(r: dict[str, Any]) -> str:
    a, s = r["args"], r["stall_s"]
    lines = [f"chaos: 2 prefill + 2 decode replicas of {a['model']!r} ({a['kv_backend']}), {a['duration']:g} s of "
             f"Poisson load at {a['rate']:g} req/s (max_tokens {a['max_tokens']}), a kill every ~{a['kill_every']:g} "
             f"s, seed {a['seed']}",
             f"cpu: {r['cpu']} ({os.cpu_count()} cores); command: {r['command']}",
             f"requests: {r['sent']} sent, {r['ok']} OK, {r['failed']} failed; {r['differ']} outputs differ from the "
             f"fault-free run ({r['variants']} variants); {r['migrations']:g} migrated",
             "stall: no requests" if s["max"] is None else
             f"stall (longest wait per request): p50 {s['p50']:.2f} s, p99 {s['p99']:.2f} s, max {s['max']:.2f} s "
             f"({s['max_request']}, ending at {s['max_at_s']:.1f} s; kills meanwhile: {s['max_kills']})",
             "kills:"]
    lines += [f"  {k['at_s']:6.1f} s  {k['replica']:9}  {k['in_flight']:3} in flight  unhealthy after "
              f"{fmt(k['unhealthy_after_s'])}, full strength after {fmt(k['full_strength_after_s'])}"
              for k in r["kills"]]
    for pool in POOLS:
        times = [k["full_strength_after_s"] for k in r["kills"] if k["replica"].startswith(pool)]
        if times:
            lines.append(f"  {pool}: {len(times)} kills, back to full strength in " + ", ".join(map(fmt, times)))
    lines += [f"KV blocks used: start {r['blocks_start']} -> end {r['blocks_end']}",
              f"RSS MiB: start {by_role(r['rss_start'])} -> end {by_role(r['rss_end'])}"]
    for rec in r["failures"] + r["differences"]:
        lines.append(f"  {rec['id']} (variant {rec['variant']}, {rec['sent_s']:.1f}-{rec['end_s']:.1f} s): "
                     f"{rec['status']} {rec['message']} {rec.get('detail', '')}; kills meanwhile: {rec['kills']}")
    if r["supervisor_failures"]:
        lines.append(f"supervisor: replacements that failed: {r['supervisor_failures']}")
    lines.append("PASS" if r["passed"] else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    p.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills, +-25%% (default 20)")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="default", help="'default' or a Hugging Face folder")
    p.add_argument("--kv-backend", default="ipc", help="ipc (default) or collective")
    p.add_argument("--drain-timeout", type=float, default=180.0, help="most seconds to wait for the last requests")
    p.add_argument("--recover-timeout", type=float, default=120.0, help="most seconds to wait for a pool's recovery")
    p.add_argument("--max-tokens", default="32-96", help="LO-HI: each variant's max_tokens (default 32-96); longer "
                   "outputs keep a tiny model's requests in flight when a replica dies")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: Ray binds 127.0.0.1 only
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from pdserve import Client
    from pdserve.config import ClusterConfig, RouterConfig
    from pdserve.launch import init_ray, start_cluster

    config = ClusterConfig(model=args.model, name=f"chaos{os.getpid()}", kv_backend=args.kv_backend,
                           router=RouterConfig(port=0, http_port=None, metrics_port=0)).replace(
        **{"prefill.replicas": 2, "decode.replicas": 2})
    lo, hi = (int(n) for n in args.max_tokens.split("-"))
    print("computing the fault-free output of each request variant with the offline engine", flush=True)
    vs, want = references(args.model, args.seed, (lo, hi))
    requests = schedule(args.duration, args.rate, args.seed, len(vs))
    kills = kill_plan(args.duration, args.kill_every, args.seed, {"prefill": 2, "decode": 2})

    init_ray(config, num_cpus=8)
    cluster = start_cluster(config)
    try:
        with Client(cluster.address, timeout=30) as client:
            blocks_start, rss_start = blocks(client.status()), rss(cluster)
            print(f"sending {len(requests)} requests over {args.duration:g} s; {len(kills)} kills planned", flush=True)
            t0 = time.monotonic()
            killer = Killer(cluster, kills, t0, args.recover_timeout)
            killer.start()
            records = asyncio.run(load(cluster.address, requests, vs, t0, args.drain_timeout))
            killer.no_more.set()
            killer.join(args.recover_timeout + 10)
            blocks_end, rss_end, migrated = wait_idle(client, 60), rss(cluster), migrations(cluster)
            supervisor_failures = list(cluster.supervisor.failures) if cluster.supervisor else []
    finally:
        cluster.stop()
        ray.shutdown()

    for rec in records:
        rec["kills"] = [k["replica"] + f"@{k['at_s']:.1f}s" for k in killer.kills
                        if rec["sent_s"] <= k["at_s"] <= rec["end_s"]]
        if rec["status"] == "OK" and (i := first_difference(rec["token_ids"], want[rec["variant"]])) is not None:
            rec["detail"] = (f"first difference at token {i} of {len(want[rec['variant']])} "
                             f"(got {len(rec['token_ids'])} tokens)")
    failures = [without_ids(rec) for rec in records if rec["status"] != "OK"]
    differences = [rec | {"want": want[rec["variant"]]} for rec in records if "detail" in rec]
    unrecovered = [k for k in killer.kills if k["full_strength_after_s"] is None]
    stalls = [rec["stall_s"] for rec in records]
    worst = max(records, key=lambda rec: rec["stall_s"], default=None)
    result = {
        "args": vars(args), "cpu": cpu_model(), "command": shlex.join([sys.executable, *sys.argv]),
        "sent": len(records), "ok": len(records) - len(failures), "failed": len(failures),
        "differ": len(differences), "variants": len(vs), "migrations": migrated,
        "stall_s": {"p50": percentile(stalls, 50), "p99": percentile(stalls, 99), "max": max(stalls, default=None),
                    "max_request": worst and worst["id"], "max_at_s": worst and worst["stall_at_s"],
                    "max_kills": worst and worst["kills"]},
        "kills": killer.kills, "blocks_start": blocks_start, "blocks_end": blocks_end,
        "rss_start": rss_start, "rss_end": rss_end, "supervisor_failures": supervisor_failures,
        "failures": failures, "differences": differences,
    }
    result["passed"] = not failures and not differences and not any(blocks_end.values()) and not unrecovered
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result | {"requests": [without_ids(rec) for rec in records]}, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
