"""The HTTP benchmark runs end to end against a real relay process."""

from __future__ import annotations

from benchmarks.bench_http import TARGET_OVERHEAD, run
from tests.conftest import need


def test_bench_http_reports_both_rates_from_one_run() -> None:
    """bench_http measures the transport and raw httpx in the same run and reports
    the overhead of one over the other."""
    need("httpx")
    need("aiohttp")
    figures = run(batches=20, rounds=1)
    assert figures["raw_httpx_batches_per_s"] > 0
    assert figures["http_transport_batches_per_s"] > 0
    expected = figures["raw_httpx_batches_per_s"] / figures["http_transport_batches_per_s"] - 1
    assert abs(figures["overhead"] - expected) < 0.01
    assert figures["target_overhead"] == TARGET_OVERHEAD
