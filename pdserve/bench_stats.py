"""The numbers of a benchmark run: throughput, latency distributions, SLO attainment and failures over its
RequestResults (summarize), and goodput over a sweep of runs. A run is the plain dict that --json writes."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pdserve.request_result import RequestResult

PERCENTILES = (50, 90, 99)
SERVER_TIMINGS = ("queue_ms", "prefill_ms", "transfer_ms")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, interpolated linearly between the closest ranks (numpy's default); None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float], scale: float = 1e3) -> dict[str, float | None]:
    """mean and PERCENTILES of values * scale (seconds to ms by default)."""
    xs = [v * scale for v in values]
    return {"mean": sum(xs) / len(xs) if xs else None, **{f"p{q}": percentile(xs, q) for q in PERCENTILES}}


def summarize(results: Sequence[RequestResult], duration: float, ttft_slo: float, tpot_slo: float) -> dict[str, Any]:
    """Throughput, latency distributions (ms), SLO attainment, failures by status and prefill paths of one run."""
    ok = [r for r in results if r.ok]
    duration = max(duration, 1e-9)
    num_in, num_out = sum(r.prompt_len for r in ok), sum(r.num_output_tokens for r in ok)
    met = [r.meets(ttft_slo, tpot_slo) for r in results]

    def share(count: int) -> float | None:
        return count / len(results) if results else None

    return {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration, "output_throughput": num_out / duration,
        "total_token_throughput": (num_in + num_out) / duration,
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "server_ms": {k: distribution([r.server[k] for r in ok if k in r.server], scale=1) for k in SERVER_TIMINGS},
        "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo, "ttft": share(sum(t for t, _ in met)),
                "tpot": share(sum(p for _, p in met)), "both": share(sum(t and p for t, p in met))},
        "failures": dict(Counter(r.status for r in results if not r.ok)),
        "errors": {r.status: r.error for r in reversed(results) if not r.ok},  # the first message of each status
        "paths": dict(Counter(r.server.get("path") or "unknown" for r in ok)),
        # prompt tokens the server took from its prefix cache, of those it was sent (None: it did not say)
        "prefix_cache_hit_ratio": (sum(r.cached_tokens for r in said) / max(1, sum(r.prompt_len for r in said))
                                   if (said := [r for r in ok if r.cached_tokens is not None]) else None),
    }


def goodput(runs: Sequence[dict[str, Any]], target: float = 0.9) -> float | None:
    """The highest rate among runs where at least `target` of the requests met both SLOs; None when none did."""
    passing = [run["rate"] for run in runs if run["rate"] is not None and (run["slo"]["both"] or 0) >= target]
    return max(passing, default=None)

