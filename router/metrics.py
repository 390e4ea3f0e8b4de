"""Prometheus metrics, all served by the router: its own (requests, latencies, admission,
SLO attainment, KV transfer as the router sees it) and every replica's (load, utilization,
step times), which the router already polls from the pools several times a second. One scrape
target per cluster, the same on a laptop and on a Ray cluster; no port per actor."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class RouterMetrics:
    def __init__(self, model: str, replicas_of, ttft_slo_s: float, tpot_slo_s: float) -> None:
        """replicas_of(): the router's Replica views (their latest polled stats)."""
        self.registry = CollectorRegistry()
        r, m = self.registry, {"model": model}
        self.requests = Counter("pdserve_requests", "Requests by final gRPC status", ["model", "status"], registry=r)
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r).labels(**m)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds", "Mean time per output token after the first",
                              ["model"], buckets=TOKEN_LATENCY_BUCKETS, registry=r).labels(**m)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Gap between streamed tokens", ["model"],
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r).labels(**m)
        self.e2e = Histogram("pdserve_e2e_latency_seconds", "Request latency, receipt to last token", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r).labels(**m)
        self.queue = Histogram("pdserve_queue_time_seconds", "Admission and decode reservation wait", ["model"],
                               buckets=LATENCY_BUCKETS, registry=r).labels(**m)
        self.in_flight = Gauge("pdserve_requests_in_flight", "Requests admitted and not finished", ["model"],
                               registry=r).labels(**m)
        self.queued = Gauge("pdserve_requests_queued", "Requests waiting for admission", ["model"],
                            registry=r).labels(**m)
        self.refused = Counter("pdserve_admission_refusals", "Requests refused with RESOURCE_EXHAUSTED", ["model"],
                               registry=r).labels(**m)
        self.path = Counter("pdserve_prefill_path", "Where prompts were prefilled", ["model", "path"], registry=r)
        self.dispatch = Counter("pdserve_dispatch", "Where prompts were sent to prefill, and why (Timings."
                                "dispatch_reason)", ["model", "path", "reason"], registry=r)
        self.slo = Counter("pdserve_slo_met", "Finished requests within the TTFT target, the TPOT target, or both",
                           ["model", "slo"], registry=r)
        for slo in ("ttft", "tpot", "both"):  # every series from the start, at 0, as the base's is
            self.slo.labels(slo=slo, **m)
        self.finished = Counter("pdserve_requests_finished", "Requests that finished with tokens (the SLO base)",
                                ["model"], registry=r).labels(**m)
        g = Gauge("pdserve_slo_target_seconds", "The configured SLO targets", ["model", "slo"], registry=r)
        g.labels(slo="ttft", **m).set(ttft_slo_s)
        g.labels(slo="tpot", **m).set(tpot_slo_s)
        self.kv_transfer = Histogram("pdserve_kv_transfer_seconds", "Prefill's end to the decode replica admitting",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r).labels(**m)
        self.migrations = Counter("pdserve_request_migrations", "Requests continued on another replica after "
                                  "theirs died (or their KV was lost)", ["model"], registry=r).labels(**m)
        self.kv_failures = Counter("pdserve_kv_transfer_failures", "Prefills or transfers that failed", ["model"],
                                   registry=r).labels(**m)
        self.autoscale_rate = Gauge("pdserve_autoscale_arrival_rate", "Requests/s arriving, as the autoscaler "
                                    "observed them", ["model"], registry=r).labels(**m)
        self.autoscale_wanted = Gauge("pdserve_autoscale_wanted_replicas", "Replicas the autoscaler wants per pool "
                                      "(before its delays; 0: not autoscaling)", ["model", "pool"], registry=r)
        for pool in ("prefill", "decode"):
            self.autoscale_wanted.labels(pool=pool, **m)
        self.rule_threshold = Gauge("pdserve_dispatch_rule_threshold_tokens", "slo_aware's tuned rule: prompts "
                                    "under this many tokens prefill on the decode replica (-1: the least delay "
                                    "decides)", ["model"], registry=r).labels(**m)
        self.rule_override = Gauge("pdserve_dispatch_rule_override", "slo_aware's tuned rule: 1 where its SLO "
                                   "predictions may move a request off that path", ["model"], registry=r).labels(**m)
        self.model, self.ttft_slo_s, self.tpot_slo_s = model, ttft_slo_s, tpot_slo_s
        r.register(_ReplicaCollector(model, replicas_of))
        self._server = None

    def autoscaled(self, rate: float, wanted: dict[str, int]) -> None:
        self.autoscale_rate.set(rate)
        for pool, n in wanted.items():
            self.autoscale_wanted.labels(model=self.model, pool=pool).set(n)

    def dispatch_rule(self, rule) -> None:
        """rule: router.dispatch.Rule."""
        self.rule_threshold.set(-1 if rule.threshold is None else rule.threshold)
        self.rule_override.set(int(rule.overrides))

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on host:port (0: a free port); returns the port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def request_done(self, status: str, ttft: float | None, e2e: float, num_tokens: int) -> None:
        self.requests.labels(model=self.model, status=status).inc()
        self.e2e.observe(e2e)
        if ttft is None or num_tokens == 0:
            return
        self.ttft.observe(ttft)
        tpot = (e2e - ttft) / (num_tokens - 1) if num_tokens > 1 else 0.0
        if num_tokens > 1:
            self.tpot.observe(tpot)
        self.finished.inc()
        ttft_ok, tpot_ok = ttft <= self.ttft_slo_s, tpot <= self.tpot_slo_s
        for slo, ok in (("ttft", ttft_ok), ("tpot", tpot_ok), ("both", ttft_ok and tpot_ok)):
            if ok:
                self.slo.labels(model=self.model, slo=slo).inc()


# (metric, stats key, help, kind) per replica; labels pool, replica, model
_GAUGES = [
    ("pdserve_busy_fraction", "busy_fraction", "Share of the last seconds spent stepping"),
    ("pdserve_running_sequences", "running", "Sequences in the running batch (decode) or being prefilled"),
    ("pdserve_waiting_sequences", "waiting", "Sequences waiting in the scheduler"),
    ("pdserve_waiting_prefill_tokens", "waiting_prefill_tokens", "Prompt tokens not yet prefilled"),
    ("pdserve_kv_blocks_used", "kv_blocks_used", "KV blocks in use"),
    ("pdserve_kv_blocks_total", "kv_blocks_total", "KV blocks in the pool"),
    ("pdserve_achieved_flops", "flops_per_s", "FLOP/s while stepping"),
    ("pdserve_mfu", "mfu", "Achieved FLOP/s over the replica's peak"),
    ("pdserve_achieved_memory_bandwidth_bytes", "bytes_per_s", "Bytes/s read while stepping (weights + KV)"),
    ("pdserve_mbu", "mbu", "Achieved memory bandwidth over the replica's peak"),
    ("pdserve_peak_flops", "peak_flops", "The replica's peak FLOP/s (measured at start-up or configured)"),
    ("pdserve_peak_memory_bandwidth_bytes", "peak_bandwidth", "The replica's peak bytes/s"),
    ("pdserve_replica_up", "up", "1 if the replica answered the last poll"),
]
_COUNTERS = [
    ("pdserve_tokens_processed", "tokens_processed", "Prompt tokens prefilled (prefill) or tokens generated (decode)"),
    ("pdserve_steps", "steps", "Engine steps"),
    ("pdserve_step_off_cpu_seconds", "step_off_cpu_seconds", "Seconds within steps the engine's thread was off its "
                                                             "core: preempted by other threads, or waiting"),
    ("pdserve_preemptions", "num_preemptions", "Sequences preempted for KV blocks"),
    ("pdserve_kv_transfer_bytes", "kv_bytes_sent", "KV bytes written into decode pools"),
    ("pdserve_kv_leases_expired", "leases_expired", "KV reservations given up at their lease's end"),
    ("pdserve_replica_restarts", "restarts", "Times the replica was replaced (its actor or engine died)"),
    ("pdserve_prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the replica's prefix cache"),
    ("pdserve_prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)"),
    ("pdserve_kv_transfer_saved_bytes", "kv_bytes_saved", "KV bytes not sent to the decode replica: its prefix cache "
                                                          "held them"),
]
_HISTOGRAMS = [
    ("pdserve_step_seconds", "step_seconds", "Engine step time"),
    ("pdserve_batch_tokens", "batch_tokens", "Tokens per engine step"),
]


class _ReplicaCollector:
    def __init__(self, model: str, replicas_of) -> None:
        self.model, self.replicas_of = model, replicas_of

    def collect(self):
        labels = ["pool", "replica", "model"]
        families = {}
        for name, _, doc in _GAUGES:
            families[name] = GaugeMetricFamily(name, doc, labels=labels)
        for name, _, doc in _COUNTERS:
            families[name] = CounterMetricFamily(name, doc, labels=labels)
        for name, _, doc in _HISTOGRAMS:
            families[name] = HistogramMetricFamily(name, doc, labels=labels)
        for r in self.replicas_of():
            values = [r.role, str(r.index), self.model]
            stats = {**r.stats, "up": 1.0 if r.healthy else 0.0, "restarts": r.restarts}
            for name, key, _ in _GAUGES:
                if key in stats:
                    families[name].add_metric(values, float(stats[key]))
            for name, key, _ in _COUNTERS:
                if key in stats:
                    families[name].add_metric(values, float(stats[key]))
            for name, key, _ in _HISTOGRAMS:
                if f"{key}_buckets" in stats:
                    buckets = stats[f"{key}_buckets"]
                    families[name].add_metric(values, [(str(le), c) for le, c in buckets[:-1]]
                                              + [("+Inf", buckets[-1][1] if buckets else 0)],
                                              sum_value=stats[f"{key}_sum"])
        yield from families.values()
