"""The `pdserve` command: serve a cluster, talk to one, or watch it.

    pdserve serve [--config cluster.yaml] [--model M] [--port 50051] [--prefill-tp 1] [--decode-num-kv-blocks N] ...
    pdserve generate "The capital of France is" --max-tokens 16
    pdserve chat                      # interactive, streaming
    pdserve status                    # per-pool utilization
    pdserve scale decode 3            # grow or shrink a pool while serving (leaving replicas drain)
    pdserve demo "What is the capital of France?"   # start, answer through the SDK, stop
    pdserve bench --workload longtail --rate 2 --num-requests 100   # load, latency, SLO attainment
    pdserve profile --out profile.json [--config cluster.yaml]     # fit each pool's step time on this hardware
    pdserve simulate --profile profile.json [--config cluster.yaml] --workload longtail --sweep 1,2,4
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import signal
import sys
import threading

DEFAULT_ADDRESS = "127.0.0.1:50051"

# flag -> dotted ClusterConfig key; the pools' flags (--prefill-*, --decode-*) come from _pool_fields
SERVE_FLAGS = {
    "model": "model", "address": "ray_address", "kv_backend": "kv_backend", "host": "router.host",
    "port": "router.port", "http_port": "router.http_port", "local_prefill_threshold": "router.local_prefill_threshold",
    "prefill_policy": "router.prefill_policy", "decode_policy": "router.decode_policy",
    "dispatch": "router.dispatch", "dispatch_profile": "router.profile",
    "dispatch_retune_s": "router.dispatch_retune_s",
    "api_keys_file": "router.api_keys_file", "tls_cert": "router.tls_cert", "tls_key": "router.tls_key",
    "service_cpus": "service_cpus",
}
POOLS = ("prefill", "decode")
POOL_FLAG_ALIASES = {"tensor_parallel_size": "tp"}  # also --prefill-tp, --decode-tp


def _cluster_config(args):
    from pdserve.config import ClusterConfig

    config = ClusterConfig.from_yaml(args.config) if args.config else ClusterConfig()
    keys = {**SERVE_FLAGS, **{f"{pool}_{name}": f"{pool}.{name}" for pool in POOLS for name, _ in _pool_fields()}}
    config = config.replace(**{key: getattr(args, flag) for flag, key in keys.items()
                               if getattr(args, flag, None) is not None})
    # API keys: the config's, each --api-key, and $PDSERVE_API_KEY
    env = os.environ.get("PDSERVE_API_KEY")
    api_keys = [*config.router.api_keys, *(getattr(args, "api_key", None) or ()), *([env] if env else [])]
    config = config.replace(**{"router.api_keys": tuple(dict.fromkeys(api_keys))})
    autoscale = {k: getattr(args, f"autoscale_{k}") for k in ("prefill", "decode", "target_ongoing_requests")
                 if getattr(args, f"autoscale_{k}", None) is not None}
    if autoscale:  # any autoscale flag turns it on, over the config's other autoscale settings
        return config.replace(**{"router.autoscale": dataclasses.replace(config.router.autoscale, enabled=True,
                                                                          **autoscale)})
    return config


def _bounds(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4), the --autoscale-* pool bounds."""
    try:
        low, high = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN:MAX replicas, e.g. 1:4") from None
    return low, high


def _open_to_others(config) -> bool:
    """The router binds a non-loopback address and no API key guards it."""
    r = config.router
    try:
        loopback = ipaddress.ip_address(r.host).is_loopback
    except ValueError:
        loopback = r.host == "localhost"
    return not loopback and not r.api_keys and r.api_keys_file is None


def _warn_if_open(config) -> None:
    if _open_to_others(config):
        print(f"warning: the router listens on {config.router.host} and no API key is set: anyone who can reach "
              "it can use the cluster (set --api-key or PDSERVE_API_KEY)", file=sys.stderr, flush=True)


def _pool_fields() -> list[tuple[str, type]]:
    """PoolConfig's fields (the engine options and the pool's placement) that one flag can set, with their
    types: the scalar ones (`int | None` gives int); dicts such as resources stay YAML-only."""
    import dataclasses
    import typing

    from pdserve.config import PoolConfig

    hints = typing.get_type_hints(PoolConfig)
    out = []
    for f in dataclasses.fields(PoolConfig):
        kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        if len(kinds) == 1 and kinds[0] in (bool, int, float, str):
            out.append((f.name, kinds[0]))
    return out


def _add_pool_flags(p: argparse.ArgumentParser) -> None:
    from pdserve.config import ClusterConfig

    for pool in POOLS:
        group = p.add_argument_group(f"{pool} pool", f"override the config's {pool} pool (a PoolConfig field each)")
        defaults = getattr(ClusterConfig(), pool)
        for name, kind in _pool_fields():
            flags = [f"--{pool}-{name.replace('_', '-')}"]
            if name in POOL_FLAG_ALIASES:
                flags.append(f"--{pool}-{POOL_FLAG_ALIASES[name]}")
            extra = ({"action": argparse.BooleanOptionalAction} if kind is bool
                     else {"type": kind, "metavar": kind.__name__.upper()})
            group.add_argument(*flags, dest=f"{pool}_{name}", help=f"default: {getattr(defaults, name)}", **extra)


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    from pdserve.config import KV_BACKENDS

    p.add_argument("--config", help="cluster config YAML (see README: configuration)")
    p.add_argument("--model", help="'default' (SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file")
    p.add_argument("--address", help="Ray cluster to join ('auto' for the running one); default: a local Ray")
    p.add_argument("--host", help="router bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="router port (default 50051; 0 picks a free one)")
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port (default 8000; 0 picks a free one)")
    p.add_argument("--kv-backend", choices=KV_BACKENDS, help="how prefill KV reaches the decode pool")
    p.add_argument("--service-cpus", metavar="CPUS", help="cores for the router, a local Ray and each replica's "
                   "threads but its engine's, e.g. 1 (with --prefill-cpus 0: the prefill engine keeps core 0 to "
                   "itself); default: the OS's choice")
    p.add_argument("--local-prefill-threshold", type=int,
                   help="prompts with fewer tokens than this that the decode replica's prefix cache lacks are "
                        "prefilled there")
    p.add_argument("--dispatch", choices=("auto", "threshold", "slo_aware"),
                   help="where prompts prefill: threshold (under --local-prefill-threshold tokens on the decode "
                        "replica), slo_aware (per request, the path predicted to keep more requests within the SLOs; "
                        "needs --dispatch-profile), or auto (default: slo_aware with a profile, else threshold)")
    p.add_argument("--dispatch-profile", help="slo_aware: a JSON written by `pdserve profile`, or 'measure': a quick "
                                              "one of the pools, measured at start-up (router.profile)")
    p.add_argument("--dispatch-retune-s", type=float, metavar="S",
                   help="slo_aware: pick the rule under its predictions from the traffic every S seconds (default "
                        "5; 0: never, the least delay decides)")
    p.add_argument("--autoscale-prefill", type=_bounds, metavar="MIN:MAX", help="autoscale the prefill pool "
                   "between MIN and MAX replicas (router.autoscale; see README: autoscaling)")
    p.add_argument("--autoscale-decode", type=_bounds, metavar="MIN:MAX", help="autoscale the decode pool")
    p.add_argument("--autoscale-target-ongoing-requests", type=float, metavar="N",
                   help="autoscaling: a replica per N requests running on a pool (the signal without a profile; "
                        "with one, --dispatch-profile, a pool wants the most of this and the planner's size)")
    p.add_argument("--prefill-policy", help="how the router picks a prefill replica: prefix_aware (default: the "
                   "fewest tokens left to compute, its cached prefix counted), least_tokens, round_robin")
    p.add_argument("--decode-policy", help="how the router picks a decode replica: prefix_aware (default: the "
                   "longest cached prefix unless it is busier), most_free_blocks, round_robin")
    p.add_argument("--api-key", action="append", help="require this API key on both front doors (repeatable; "
                   "$PDSERVE_API_KEY adds one)")
    p.add_argument("--api-keys-file", help="file of API keys, one per line")
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve gRPC and HTTPS with TLS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    _add_pool_flags(p)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"router address (default {DEFAULT_ADDRESS})")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before giving up on a call")
    p.add_argument("--api-key", help="API key (default: $PDSERVE_API_KEY)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (the system's root certificates)")
    p.add_argument("--tls-ca", help="PEM root certificate(s) to check the router's certificate against (implies --tls)")


def _client(args):
    from pdserve import Client

    return Client(args.address, timeout=args.timeout, api_key=args.api_key, tls=args.tls,
                  root_certificates=args.tls_ca)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _sampling(args) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def cmd_serve(args) -> int:
    from pdserve.launch import start_cluster

    config = _cluster_config(args)
    _warn_if_open(config)
    cluster = start_cluster(config)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before saying ready: a SIGTERM right after it drains too
        signal.signal(sig, lambda *_: done.set())
    print(f"pdserve is ready: call it at {cluster.address}  (pdserve generate --address {cluster.address} ...)",
          flush=True)
    done.wait()
    timeout = config.router.drain_timeout_s
    print(f"draining: no new requests; up to {timeout:g} s for those running", flush=True)
    left = cluster.drain(timeout)
    print(f"stopping{f' ({left} requests cut short)' if left else ''}", flush=True)
    cluster.stop()
    return 0


def cmd_scale(args) -> int:
    with _client(args) as client:
        r = client.scale(args.pool, args.replicas, drain_timeout_s=args.drain_timeout or 0.0)
    print(f"{args.pool} pool: {r.replicas} replicas ({r.added} started, {r.removed} drained)")
    return 0


def cmd_generate(args) -> int:
    with _client(args) as client:
        for chunk in client.stream(args.prompt, **_sampling(args)):
            print(chunk.text, end="", flush=True)
        print()
    return 0


def cmd_chat(args) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with _client(args) as client:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return 0
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            reply = []
            for chunk in client.stream(messages=messages, **_sampling(args)):
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_status(args) -> int:
    with _client(args) as client:
        print(format_status(client.status()))
    return 0


def format_status(s) -> str:
    head = ("pool", "replica", "tp", "healthy", "restarts", "busy", "mfu", "mbu", "running", "waiting", "waiting_tok",
            "kv_used", "tokens", "cache_hit")
    rows = [head]
    for pool in s.pools:
        for r in pool.replicas:
            kv = f"{r.kv_blocks_used}/{r.kv_blocks_total}" + (
                f" ({r.kv_blocks_used / r.kv_blocks_total:.0%})" if r.kv_blocks_total else "")
            rows.append((pool.role, str(r.index), str(r.tensor_parallel_size), "yes" if r.healthy else "NO",
                         str(r.restarts), f"{r.busy_fraction:.0%}", f"{r.mfu:.0%}", f"{r.mbu:.0%}", str(r.running),
                         str(r.waiting), str(r.waiting_prefill_tokens), kv, str(r.tokens_processed),
                         f"{r.prefix_cache_hits / r.prefix_cache_queries:.0%}" if r.prefix_cache_queries else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"model {s.model}  kv_backend {s.kv_backend}  in flight {s.requests_in_flight}  "
             f"queued {s.requests_queued}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def cmd_demo(args) -> int:
    """Start a cluster on a free port, ask one chat question through the SDK, stop."""
    from pdserve import Client
    from pdserve.launch import start_cluster

    args.port = 0 if args.port is None else args.port
    config = _cluster_config(args).replace(**{"router.metrics_port": 0, "router.http_port": 0})
    _warn_if_open(config)
    keys, r = config.router.keys(), config.router
    with start_cluster(config) as cluster, Client(cluster.address, timeout=120, api_key=keys[0] if keys else None,
                                                  root_certificates=r.tls_cert if r.tls else None) as client:
        print(f"user> {args.question}\nassistant> ", end="", flush=True)
        last = None
        for chunk in client.stream(messages=[{"role": "user", "content": args.question}], **_sampling(args)):
            print(chunk.text, end="", flush=True)
            last = chunk
        t = last.timings
        print(f"\n[{t['path']} prefill on {t['prefill_replica']}, decode on {t['decode_replica']}; "
              f"ttft {t['ttft_ms']:.0f} ms, total {t['total_ms']:.0f} ms, {last.usage.completion_tokens} tokens]")
        print(format_status(client.status()))
    return 0


def cmd_profile(args) -> int:
    from planner.cost import Profile
    from planner.profile import profile_config

    if args.paper:
        from planner.roofline import GPUS, MODELS, calibrate, paper_profile

        profile = paper_profile(MODELS[args.paper], GPUS[args.gpu], eff=calibrate())
        with open(args.out, "w") as f:
            f.write(profile.to_json())
        print(f"wrote {args.out}: {profile.model} on {args.gpu}, from the roofline ({', '.join(profile.pools)})")
        return 0
    into = Profile.load(args.out) if args.merge and os.path.exists(args.out) else None
    config = _cluster_config(args)
    profile = profile_config(config, args.reps, args.quick, into)
    if args.service and "request_s" not in profile.service:  # once a file, as the KV transfer
        import dataclasses

        from engine.loader import open_model
        from pdserve.service_costs import service_costs
        from planner.cost import pool_key

        step = profile.pools[pool_key(config.decode.engine_kwargs())].step
        vocab = open_model(config.model, False).hf_config["vocab_size"]
        profile = dataclasses.replace(profile, service={**profile.service, **service_costs(config, step, vocab)})
    with open(args.out, "w") as f:
        f.write(profile.to_json())
    print(f"wrote {args.out}: {', '.join(profile.pools)}")
    return 0


def _model_inputs(args, command: str):
    """(cluster config, profile, workload, requests) from simulate's and plan's flags."""
    from pdserve.bench import workload_of
    from pdserve.workload import make_requests
    from planner.cost import Profile

    given = args.dispatch_profile
    args.dispatch_profile = given or args.profile  # slo_aware predicts with the profile simulated on
    config, profile = _cluster_config(args), Profile.load(args.profile)
    if config.router.dispatch == "auto" and not given:
        # what a cluster of this config runs: slo_aware on a profile of its own (the config file's), else threshold
        from pdserve.config import ClusterConfig

        own = ClusterConfig.from_yaml(args.config).router.profile if args.config else None
        config = config.replace(**{"router.dispatch": "slo_aware" if own else "threshold"})
    if profile.host.get("source") == "roofline":  # a profile on paper: GPU pools
        from planner.plan import kv_sized
        from planner.roofline import gpu_config

        config = kv_sized(gpu_config(config, profile), profile)
    config = config.replace(**{"router.ttft_slo_s": args.ttft_slo, "router.tpot_slo_s": args.tpot_slo})
    workload = workload_of(args)
    if workload.kind == "multiturn":
        raise ValueError(f"pdserve {command} does not replay the multiturn workload (its turns wait on the answers)")
    return config, profile, workload, make_requests(workload, args.num_requests, args.seed, args.vocab_size,
                                                    args.max_model_len)


def cmd_simulate(args) -> int:
    import json

    from pdserve.bench import format_run, format_sweep, goodput
    from planner.simulate import simulate, simulate_sweep

    config, profile, workload, requests = _model_inputs(args, "simulate")
    if args.calibrate:
        return _calibrate(args, config, profile, requests)
    meta = {"label": args.label, "model": config.model, "backend": "simulated", "profile": args.profile,
            "workload": dataclasses.asdict(workload)}
    if args.sweep:  # the rates one after the other on one cluster, as pdserve bench --sweep runs them
        runs = [run | meta for run in simulate_sweep(config, profile, requests, args.sweep, args.seed,
                                                     args.ttft_slo, args.tpot_slo)]
        result = meta | {"runs": runs, "goodput_rps": goodput(runs, args.attainment),
                         "attainment_target": args.attainment}
        print(format_sweep(result))
    else:
        result = simulate(config, profile, requests, args.rate, args.seed, args.ttft_slo, args.tpot_slo) | meta
        print(format_run(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_plan(args) -> int:
    import json

    from planner.plan import DISPATCHES, as_json, format_plan, plan

    config, profile, workload, requests = _model_inputs(args, "plan")
    if args.seconds:  # at each rate tried, at least that many seconds of arrivals: a steady state at any rate
        from pdserve.workload import make_requests

        fixed = requests
        n = args.num_requests

        def requests(rate: float) -> list:
            more = int(rate * args.seconds)
            return fixed if more <= n else make_requests(workload, more, args.seed, args.vocab_size,
                                                         args.max_model_len)
    dispatches = tuple(d.strip() for d in args.dispatches.split(",") if d.strip())
    if bad := [d for d in dispatches if d not in DISPATCHES]:
        raise ValueError(f"--dispatches: {', '.join(bad)} is not a dispatch policy; choose from {DISPATCHES}")
    found = plan(config, profile, requests, args.devices, args.ttft_slo, args.tpot_slo, args.attainment,
                 seed=args.seed, dispatches=dispatches)
    if not found:
        raise ValueError(f"no layout of at most {args.devices} devices uses only the profile's pools "
                         f"({', '.join(profile.pools)})")
    print(format_plan(found, args.top))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(as_json(found), indent=1) + "\n")
    return 0


def _calibrate(args, config, profile, requests) -> int:
    """Fit the profile's service costs to measured runs of this workload (--calibrate RUN.json[=CONFIG.yaml])."""
    import json

    from pdserve.config import ClusterConfig
    from planner.calibrate import Case, calibrate, format_errors

    cases = []
    for spec in args.calibrate:
        run_path, _, config_path = spec.partition("=")
        with open(run_path) as f:
            measured = json.load(f)
        cases.append(Case(ClusterConfig.from_yaml(config_path) if config_path else config, requests, measured,
                          args.seed))
    service, rows = calibrate(profile, cases)
    start = 0
    for spec, case in zip(args.calibrate, cases):
        print(f"{spec}:\n{format_errors(rows[start:start + len(case.runs)])}")
        start += len(case.runs)
    fitted = dataclasses.asdict(service)
    with open(args.profile, "w") as f:
        f.write(dataclasses.replace(profile, service=fitted).to_json())
    print(f"wrote the service costs into {args.profile}: {json.dumps(fitted)}")
    return 0


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """What simulate and plan share: the cluster (serve's flags), the profile, the workload and the SLOs."""
    from pdserve.bench import add_workload_flags

    _add_serve_flags(p)
    p.add_argument("--profile", required=True, help="a JSON written by pdserve profile")
    add_workload_flags(p)
    p.add_argument("--max-model-len", type=int, default=8192, help="prompts are cut to fit (default %(default)s)")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="seconds (default %(default)s)")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="seconds (default %(default)s)")
    p.add_argument("--attainment", type=float, default=0.9, help="goodput's share (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="disaggregated prefill/decode LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="serving benchmark against a running cluster (pdserve bench --help)")

    p = sub.add_parser("serve", help="start a cluster and serve until interrupted")
    _add_serve_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("profile", help="measure each pool's engine steps on this hardware and fit their cost")
    _add_serve_flags(p)
    p.add_argument("--out", required=True, help="the profile JSON to write")
    p.add_argument("--merge", action="store_true", help="add the pools --out lacks to it (one file, many layouts)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per step shape, after one warm-up (median)")
    p.add_argument("--quick", action="store_true", help="fewer context lengths (about half the time)")
    p.add_argument("--paper", choices=("llama-2-7b", "llama-2-70b", "llama-3.1-8b", "llama-3.1-70b"),
                   help="measure nothing: this model's step models on --gpu from its spec sheet's roofline, "
                        "efficiencies fitted to TensorRT-LLM's published figures (see README: Planning past this "
                        "machine)")
    p.add_argument("--gpu", choices=("a100", "h100", "h200"), default="h100", help="with --paper")
    p.add_argument("--service", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the router's per-request and per-token costs on a live colocated cluster of the "
                        "decode pool (about 30 s; once a file; default on)")
    p.set_defaults(func=cmd_profile)
    from pdserve.bench import _rate, _rates

    p = sub.add_parser("simulate", help="replay a workload through a model of the cluster on a profile")
    _add_model_flags(p)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=_rate, help="Poisson arrivals, requests/s (default: all at once)")
    load.add_argument("--sweep", type=_rates, help="comma-separated rates; reports goodput")
    p.add_argument("--label", help="stored in the JSON")
    p.add_argument("--json", help="write the run (or sweep) here: the JSON pdserve bench writes")
    p.add_argument("--calibrate", action="append", metavar="RUN.json[=CONFIG.yaml]",
                   help="instead of simulating: fit the profile's service costs (hops, per-step and per-token "
                        "costs, each pool's slowdown in the cluster) to this measured `pdserve bench --json` run or "
                        "sweep of the workload the flags give, on CONFIG.yaml (default: --config and the flags); "
                        "repeatable, one fit over all; written into --profile")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("plan", help="search the layouts of N devices for the most goodput per device (simulated)")
    _add_model_flags(p)
    p.add_argument("--devices", type=int, required=True, help="cores on a CPU host (TP x threads a replica), GPUs")
    p.add_argument("--dispatches", default="threshold,slo_aware",
                   help="split layouts' dispatch policies to search, comma-separated (default %(default)s; "
                        "slo_aware tunes its rule to the workload first: a few seconds a layout)")
    p.add_argument("--top", type=int, default=5, help="layouts to print (default %(default)s; the JSON has all)")
    p.add_argument("--seconds", type=float, default=0.0,
                   help="simulate at least this many seconds of arrivals at each rate tried (more requests than "
                        "--num-requests where the rate is high: a GPU profile's hundreds a second), so a run "
                        "shows the steady state rather than one burst (default: --num-requests alone)")
    p.add_argument("--json", help="every layout tried, with its goodput, the rates tried and its latencies there")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="start a cluster, answer one chat question through the SDK, stop")
    p.add_argument("question", nargs="?", default="What is the capital of France?")
    _add_serve_flags(p)
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_demo)

    for name, func, helptext in (("generate", cmd_generate, "complete a prompt (streams the text)"),
                                 ("chat", cmd_chat, "chat interactively (streams the replies)"),
                                 ("status", cmd_status, "per-pool utilization of a running cluster"),
                                 ("scale", cmd_scale, "grow or shrink a pool of a running cluster")):
        p = sub.add_parser(name, help=helptext)
        _add_connection_flags(p)
        if name == "generate":
            p.add_argument("prompt")
        if name == "chat":
            p.add_argument("--system", help="system prompt")
        if name == "scale":
            p.add_argument("pool", choices=("prefill", "decode"))
            p.add_argument("replicas", type=int)
            p.add_argument("--drain-timeout", type=float, help="seconds a leaving replica gets for its requests "
                           "(default: the router's drain_timeout_s); the rest move to another replica")
        if name not in ("status", "scale"):
            _add_sampling_flags(p)
        p.set_defaults(func=func)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: pdserve bench --help
        from pdserve.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    from pdserve.client import RequestError

    try:
        return args.func(args)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, OSError) as e:  # a bad value, a file that is not there, a port taken
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C (pdserve chat, generate): the shell's usual status, no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
