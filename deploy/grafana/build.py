"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from the panel lists below (the
JSON is committed; tests/deploy/test_dashboards.py checks it is current and runs every query
against a real Prometheus). Run: python deploy/grafana/build.py"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards"
DS = {"type": "prometheus", "uid": "prometheus"}
RI = "$__rate_interval"


def q(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend}


def hist(metric: str, p: float, by: str = "", where: str = "") -> str:
    by = f"le, {by}" if by else "le"
    return f"histogram_quantile({p}, sum by ({by}) (rate({metric}_bucket{where}[{RI}])))"


PER_REPLICA = '{pool="%s", replica=~"$replica"}'


def off_cpu(pool: str) -> str:
    """A pool's share of step time its engine threads spent off their cores (preempted by other threads, or
    waiting), per replica: what the host's other work costs the engine."""
    rate = f"sum by (replica) (rate(pdserve_%s{PER_REPLICA % pool}[{RI}]))"
    return f"{rate % 'step_off_cpu_seconds_total'} / {rate % 'step_seconds_sum'}"


def cache_hits(pool: str) -> str:
    """A pool's prefix-cache hit ratio per replica: prompt tokens found over those looked up."""
    rate = f"sum by (replica) (rate(pdserve_prefix_cache_%s_total{PER_REPLICA % pool}[{RI}]))"
    return f"{rate % 'hits'} / {rate % 'queries'}"

DASHBOARDS = {
    "pdserve-prefill": ("pdserve: prefill utilization", [
        ("Busy fraction", "percentunit", [q(f"pdserve_busy_fraction{PER_REPLICA % 'prefill'}", "prefill/{{replica}}")]),
        ("MFU (achieved FLOP/s over peak, while busy)", "percentunit",
         [q(f"pdserve_mfu{PER_REPLICA % 'prefill'}", "prefill/{{replica}}")]),
        ("Prompt tokens/s", "short",
         [q(f"sum by (replica) (rate(pdserve_tokens_processed_total{PER_REPLICA % 'prefill'}[{RI}]))",
            "prefill/{{replica}}")]),
        ("Waiting prefill tokens", "short",
         [q(f"pdserve_waiting_prefill_tokens{PER_REPLICA % 'prefill'}", "prefill/{{replica}}")]),
        ("Achieved FLOP/s", "flops",
         [q(f"pdserve_achieved_flops{PER_REPLICA % 'prefill'}", "prefill/{{replica}}")]),
        ("Batch size in tokens (p50, p99)", "short", [
            q(hist("pdserve_batch_tokens", 0.5, "replica", PER_REPLICA % "prefill"), "p50 prefill/{{replica}}"),
            q(hist("pdserve_batch_tokens", 0.99, "replica", PER_REPLICA % "prefill"), "p99 prefill/{{replica}}")]),
        ("Prefix cache hit ratio (prompt tokens not computed)", "percentunit",
         [q(cache_hits("prefill"), "prefill/{{replica}}")]),
        ("Step time off the engine's core (preempted or waiting)", "percentunit",
         [q(off_cpu("prefill"), "prefill/{{replica}}")]),
    ]),
    "pdserve-decode": ("pdserve: decode utilization", [
        ("MBU (bytes/s read over peak, while busy)", "percentunit",
         [q(f"pdserve_mbu{PER_REPLICA % 'decode'}", "decode/{{replica}}")]),
        ("Running sequences", "short", [q(f"pdserve_running_sequences{PER_REPLICA % 'decode'}", "decode/{{replica}}")]),
        ("KV cache use", "percentunit",
         [q(f"pdserve_kv_blocks_used{PER_REPLICA % 'decode'} / pdserve_kv_blocks_total{PER_REPLICA % 'decode'}",
            "decode/{{replica}}")]),
        ("Step time (p50, p99)", "s", [
            q(hist("pdserve_step_seconds", 0.5, "replica", PER_REPLICA % "decode"), "p50 decode/{{replica}}"),
            q(hist("pdserve_step_seconds", 0.99, "replica", PER_REPLICA % "decode"), "p99 decode/{{replica}}")]),
        ("Generated tokens/s", "short",
         [q(f"sum by (replica) (rate(pdserve_tokens_processed_total{PER_REPLICA % 'decode'}[{RI}]))",
            "decode/{{replica}}")]),
        ("Busy fraction", "percentunit", [q(f"pdserve_busy_fraction{PER_REPLICA % 'decode'}", "decode/{{replica}}")]),
        ("Achieved memory bandwidth", "Bps",
         [q(f"pdserve_achieved_memory_bandwidth_bytes{PER_REPLICA % 'decode'}", "decode/{{replica}}")]),
        ("Preemptions/s", "short",
         [q(f"sum by (replica) (rate(pdserve_preemptions_total{PER_REPLICA % 'decode'}[{RI}]))",
            "decode/{{replica}}")]),
        ("Prefix cache hit ratio (prompt tokens held, not sent or computed)", "percentunit",
         [q(cache_hits("decode"), "decode/{{replica}}")]),
        ("Step time off the engine's core (preempted or waiting)", "percentunit",
         [q(off_cpu("decode"), "decode/{{replica}}")]),
    ]),
    "pdserve-latency": ("pdserve: latency and SLOs", [
        ("Time to first token (p50, p99)", "s", [q(hist("pdserve_time_to_first_token_seconds", 0.5), "p50"),
                                                 q(hist("pdserve_time_to_first_token_seconds", 0.99), "p99")]),
        ("Time per output token (p50, p99)", "s", [q(hist("pdserve_time_per_output_token_seconds", 0.5), "p50"),
                                                   q(hist("pdserve_time_per_output_token_seconds", 0.99), "p99")]),
        ("Inter-token latency (p50, p99)", "s", [q(hist("pdserve_inter_token_latency_seconds", 0.5), "p50"),
                                                 q(hist("pdserve_inter_token_latency_seconds", 0.99), "p99")]),
        ("End-to-end latency (p50, p99)", "s", [q(hist("pdserve_e2e_latency_seconds", 0.5), "p50"),
                                                q(hist("pdserve_e2e_latency_seconds", 0.99), "p99")]),
        # clamped: rate() extrapolates each series to the window's edges on its own, so with nearly every
        # request within target the ratio can read a hair above 1 (the counts themselves never exceed it)
        ("SLO attainment (TTFT and TPOT both met)", "percentunit", [
            q(f'clamp_max(sum(rate(pdserve_slo_met_total{{slo="both"}}[{RI}])) / '
              f'sum(rate(pdserve_requests_finished_total[{RI}])), 1)', "both"),
            q(f'clamp_max(sum(rate(pdserve_slo_met_total{{slo="ttft"}}[{RI}])) / '
              f'sum(rate(pdserve_requests_finished_total[{RI}])), 1)', "ttft")]),
        ("Requests/s by status", "reqps", [q(f"sum by (status) (rate(pdserve_requests_total[{RI}]))", "{{status}}")]),
        ("In flight and queued", "short", [q("sum(pdserve_requests_in_flight)", "in flight"),
                                           q("sum(pdserve_requests_queued)", "queued")]),
        ("Queue time (p99) and admission refusals/s", "short", [
            q(hist("pdserve_queue_time_seconds", 0.99), "queue p99 (s)"),
            q(f"sum(rate(pdserve_admission_refusals_total[{RI}]))", "refused/s")]),
        ("Prefill path", "reqps", [q(f"sum by (path) (rate(pdserve_prefill_path_total[{RI}]))", "{{path}}")]),
        ("Dispatch: where prompts prefilled and why", "reqps",
         [q(f"sum by (path, reason) (rate(pdserve_dispatch_total[{RI}]))", "{{path}}: {{reason}}")]),
        ("slo_aware's rule: local under this many prompt tokens (-1: least delay), override on", "short", [
            q("max(pdserve_dispatch_rule_threshold_tokens)", "threshold tokens"),
            q("max(pdserve_dispatch_rule_override)", "override")]),
        ("Autoscaler: arrivals/s and replicas wanted (0: not autoscaling)", "short", [
            q("max(pdserve_autoscale_arrival_rate)", "arrivals/s"),
            q("max by (pool) (pdserve_autoscale_wanted_replicas)", "{{pool}} replicas wanted")]),
    ]),
    "pdserve-kv-transfer": ("pdserve: KV transfer", [
        ("KV bandwidth into the decode pool", "Bps",
         [q(f"sum by (replica) (rate(pdserve_kv_transfer_bytes_total{{pool=\"prefill\"}}[{RI}]))",
            "from prefill/{{replica}}")]),
        ("Hand-over latency (p50, p99)", "s", [q(hist("pdserve_kv_transfer_seconds", 0.5), "p50"),
                                               q(hist("pdserve_kv_transfer_seconds", 0.99), "p99")]),
        ("Transfer failures/s", "short", [q(f"sum(rate(pdserve_kv_transfer_failures_total[{RI}]))", "failures")]),
        ("Leases expired/s", "short",
         [q(f"sum by (pool) (rate(pdserve_kv_leases_expired_total[{RI}]))", "{{pool}}")]),
        ("KV not sent: the decode replica's prefix cache held it", "Bps",
         [q(f"sum by (replica) (rate(pdserve_kv_transfer_saved_bytes_total{{pool=\"decode\"}}[{RI}]))",
            "into decode/{{replica}}")]),
    ]),
}


def dashboard(uid: str, title: str, panels: list) -> dict:
    out = []
    for i, (name, unit, targets) in enumerate(panels):
        out.append({"id": i + 1, "type": "timeseries", "title": name, "datasource": DS,
                    "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                    "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                    "targets": [{"refId": chr(65 + j), "datasource": DS, **t} for j, t in enumerate(targets)]})
    replica = {"name": "replica", "type": "query", "datasource": DS, "query": "label_values(pdserve_replica_up, replica)",
               "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2}
    return {"uid": uid, "title": title, "tags": ["pdserve"], "schemaVersion": 39, "version": 1, "editable": True,
            "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "panels": out,
            "templating": {"list": [replica]}}


def build() -> dict[str, str]:
    return {f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
            for uid, (title, panels) in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in build().items():
        (OUT / name).write_text(text)
        print(OUT / name)
