"""The listener benchmark runs, compares like with like, and says what it measured."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks import bench_listeners
from sessionfsm import Engine


def test_every_engine_in_the_benchmark_ends_the_same_way() -> None:
    """With or without listeners, the benchmark's script leaves every session in the same state."""
    ids = bench_listeners.session_ids(300)
    ends = []
    for make in (
        bench_listeners._engine_none,
        bench_listeners._engine_noop,
        bench_listeners._engine_prometheus,
        bench_listeners._engine_otel,
    ):
        engine, scrape = make()
        acks = bench_listeners.drive(engine, ids)
        scrape()
        ends.append((acks, [(v.id, v.state, v.attempts) for v in engine.sessions()]))
    assert ends[0] == ends[1] == ends[2] == ends[3]
    assert ends[0][0] > len(ids)  # some failures were retried


def test_the_benchmark_reports_medians_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny run prints one JSON object with a per-ack figure per engine and the ratios."""
    assert bench_listeners.main(["--sessions", "200", "--rounds", "1", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures["us_per_ack"]) == {"none", "noop", "prometheus", "otel"}
    assert all(value > 0 for value in figures["us_per_ack"].values())
    assert figures["prometheus_over_none"] > 0
    assert figures["otel_over_none"] > 0
    assert figures["target"] == bench_listeners.TARGET == 1.5


def test_drive_answers_every_session_it_sends() -> None:
    """drive() returns the acks it gave: one per session per send."""
    engine = Engine(bench_listeners._POLICY, rng=random.Random(0), log=False)
    sent: list[int] = []
    engine.subscribe(lambda r: sent.extend(b.sessions for b in r.batches if b.event == "sent"))
    assert bench_listeners.drive(engine, bench_listeners.session_ids(50)) == sum(sent)
