"""The router's request metrics: which finished requests count as within each SLO, read back from
the registry Prometheus scrapes."""
from __future__ import annotations

import pytest

from router.metrics import RouterMetrics


def value(m: RouterMetrics, name: str, **labels: str) -> float:
    got = m.registry.get_sample_value(name, {"model": "m", **labels})
    return 0.0 if got is None else got


@pytest.mark.parametrize("ttft,e2e,tokens,met", [
    (0.5, 0.5 + 5 * 0.1, 6, {"ttft", "tpot", "both"}),  # both on the line: a target is met at equality
    (1.5, 1.5 + 5 * 0.1, 6, {"tpot"}),
    (0.5, 0.5 + 5 * 0.3, 6, {"ttft"}),
    (2.0, 2.0 + 5 * 0.3, 6, set()),
    (0.9, 0.9, 1, {"ttft", "tpot", "both"}),  # one token: no TPOT to miss
])
def test_each_finished_request_counts_against_each_target(ttft, e2e, tokens, met) -> None:
    m = RouterMetrics("m", list, ttft_slo_s=1.0, tpot_slo_s=0.1)
    m.request_done("OK", ttft=ttft, e2e=e2e, num_tokens=tokens)
    assert value(m, "pdserve_requests_finished_total") == 1
    assert {slo for slo in ("ttft", "tpot", "both") if value(m, "pdserve_slo_met_total", slo=slo)} == met
    assert value(m, "pdserve_time_per_output_token_seconds_count") == (1 if tokens > 1 else 0)
    assert value(m, "pdserve_requests_total", status="OK") == 1


def test_a_request_with_no_token_is_not_in_the_slo_base() -> None:
    # refused or failed before its first token: counted by status and latency, not as met or missed
    m = RouterMetrics("m", list, ttft_slo_s=1.0, tpot_slo_s=0.1)
    m.request_done("UNAVAILABLE", ttft=None, e2e=0.2, num_tokens=0)
    m.request_done("OK", ttft=0.1, e2e=0.5, num_tokens=5)
    assert value(m, "pdserve_requests_total", status="UNAVAILABLE") == 1
    assert value(m, "pdserve_requests_finished_total") == 1
    assert value(m, "pdserve_slo_met_total", slo="both") == 1
    assert value(m, "pdserve_e2e_latency_seconds_count") == 2
    assert value(m, "pdserve_slo_target_seconds", slo="ttft") == 1.0
    assert value(m, "pdserve_slo_target_seconds", slo="tpot") == 0.1
