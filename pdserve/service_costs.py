"""What the service adds around the engine's steps, measured on a live cluster (`pdserve profile`): the
router's per-request and per-token costs the simulator charges (planner.simulate.Service's request_s, hop_s,
step_s, token_s), without a calibration run.

One colocated replica of the decode pool's configuration runs alone on the host, the router and the client
in this process, as `pdserve serve` runs them. Three measurements, each beside what the pool's step model
(fitted just before, on the engine alone) says the engine's own steps take:
    ttft    a 16-token prompt, one token out, alone (median of 8): request_s + prefill step + step_s + token_s
            + hop_s
    alone   one request decoding 64 tokens: the time from its first token to its last over the tokens in
            between is one decode step + step_s + token_s (each token's hop delays every token alike)
    batch   16 requests decoding together (fewer where the pool's max_num_seqs is lower; none at 1, and then
            token_s is 0): one 16-row step + step_s + 16 token_s, taken over the stretch where all 16 decode
            (the stream may hand a client several tokens in one chunk when it falls behind, so a per-token
            gap can read zero: the stretch's length over the tokens each request got in it)
hop_s is half the round trip of the replica's cheapest call from the router's process (its stats poll);
the rest follows, each clamped at zero. Each prompt's tokens differ from every other's, so no prefix is
cached."""
from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PROMPT = 16  # tokens of each measured prompt
DECODE = 64  # tokens each decoding request generates
BATCH = 16  # requests decoding together


def _prompt(i: int, vocab: int) -> list[int]:
    """Request i's prompt: its first token is its own, so no two share a cached block."""
    return [3 + (i * PROMPT + j) % (vocab - 3) for j in range(PROMPT)]


def _step_together(batch: list[list[float]]) -> float:
    """The decode step's seconds while every request of `batch` (token arrival times) decodes: the stretch from
    the last first token to the first last token, over the tokens each request got in it (median)."""
    if not all(batch):
        raise RuntimeError("a request of the measurement streamed no token")
    start, end = max(times[0] for times in batch), min(times[-1] for times in batch)
    counts = [sum(start < t <= end for t in times) for times in batch]
    if end <= start or min(counts) < 2:
        raise RuntimeError(f"the {len(batch)} requests never decoded together (first tokens by {start:.3f} s, "
                           f"a last token at {end:.3f} s)")
    return statistics.median((end - start) / n for n in counts)


def _together(arrivals, n: int) -> list[list[float]]:
    """arrivals(i, DECODE) of requests 10 .. 10 + n - 1, all sent at once (a thread each); a request that failed
    fails the measurement with its own error."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda k: arrivals(10 + k, DECODE), range(n)))


def service_costs(config, step, vocab: int, log=print) -> dict[str, Any]:
    """Service seconds (request_s, hop_s, step_s, token_s) and what they came from (service_measured), on a live
    colocated cluster of `config`'s decode pool; `step`: that pool's fitted planner.cost.StepModel."""
    import dataclasses

    import ray

    from pdserve.client import Client
    from pdserve.launch import start_cluster

    cfg = config.replace(**{"prefill.replicas": 0, "decode.replicas": 1, "router.port": 0, "router.http_port": None,
                            "router.metrics_port": None, "router.dispatch": "threshold", "router.profile": None,
                            "router.autoscale": dataclasses.replace(config.router.autoscale, enabled=False)})
    with start_cluster(cfg, progress=None) as cluster, Client(cluster.address, timeout=300) as client:
        def arrivals(i: int, max_tokens: int) -> list[float]:
            """When each of request i's tokens arrived (perf_counter)."""
            times: list[float] = []
            for chunk in client.stream(_prompt(i, vocab), max_tokens=max_tokens, temperature=0, ignore_eos=True):
                times += [time.perf_counter()] * len(chunk.token_ids)
            return times

        def first_token(i: int) -> float:
            t0 = time.perf_counter()
            return arrivals(i, 1)[0] - t0

        arrivals(0, 8)  # warm: the first request's path, the tokenizer-free stream
        ttft = statistics.median(first_token(i) for i in range(1, 9))
        alone = _step_together([arrivals(9, DECODE)])
        n = min(BATCH, cfg.decode.max_num_seqs)  # all decoding in one step
        together = _step_together(_together(arrivals, n)) if n > 1 else None
        actor = cluster.decode[0]
        ray.get(actor.stats.remote())
        round_trips = []
        for _ in range(20):
            t0 = time.perf_counter()
            ray.get(actor.stats.remote())
            round_trips.append(time.perf_counter() - t0)
    context = PROMPT + DECODE // 2  # a decode step's mean context
    predicted = {"ttft": step.step_seconds([(PROMPT, 0, True)]), "alone": step.step_seconds([(1, context, True)])}
    if together is not None:
        predicted["batch"] = step.step_seconds([(1, context, True)] * n)
    hop_s = statistics.median(round_trips) / 2
    per_step = alone - predicted["alone"]  # step_s + token_s
    token_s = max(0.0, (together - predicted["batch"] - per_step) / (n - 1)) if together is not None else 0.0
    step_s = max(0.0, per_step - token_s)
    request_s = max(0.0, ttft - predicted["ttft"] - step_s - token_s - hop_s)
    measured = {"ttft": ttft, "alone": alone, **({"batch": together} if together is not None else {})}
    log("service: " + ", ".join(f"{k} {1e3 * measured[k]:.2f} ms (engine {1e3 * predicted[k]:.2f})" for k in measured)
        + f"; hop {1e3 * hop_s:.2f} ms -> request_s {1e3 * request_s:.2f} ms, step_s {1e3 * step_s:.2f} ms, "
          f"token_s {1e3 * token_s:.3f} ms")
    return {"request_s": round(request_s, 6), "hop_s": round(hop_s, 6), "step_s": round(step_s, 6),
            "token_s": round(token_s, 7),
            "service_measured": {"seconds": {k: round(v, 6) for k, v in measured.items()},
                                 "engine_seconds": {k: round(v, 6) for k, v in predicted.items()},
                                 "stats_round_trip_s": round(statistics.median(round_trips), 6),
                                 "pool": cfg.decode.engine_kwargs().get("num_threads")}}
