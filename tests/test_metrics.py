"""Metrics: the figures a dashboard shows, scraped over real HTTP, written by
the simulator, and collected by OpenTelemetry, all agreeing with the engine."""

from __future__ import annotations

import asyncio
import json
import random
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click.testing
import pytest

from sessionfsm import Batch, Engine, Lane, LinkState, Policy, SessionState, UsageError, acks
from sessionfsm.metrics import Tally
from sessionfsm.metrics.otel import INSTRUMENT_NAMES, OtelMetrics
from sessionfsm.metrics.prometheus import FLEET_METRIC_NAMES, METRIC_NAMES, PrometheusMetrics
from sessionfsm.runner import AckResult, Runner
from sessionfsm.testing import FakeClock, ScriptedRelay

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ROOT = Path(__file__).resolve().parent.parent


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def _total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every sample whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and want <= got)


class _RelayTransport:
    """An async transport over a ScriptedRelay: an answer takes ``latency_s`` on
    the fake clock, a lost answer never comes (the runner cancels it)."""

    def __init__(self, relay: ScriptedRelay, clock: FakeClock, latency_s: float) -> None:
        self.relay, self.clock, self.latency_s = relay, clock, latency_s
        self.down_for = 0

    async def send(self, batch: Batch) -> AckResult:
        if self.down_for:
            self.down_for -= 1
            self.relay.sent.append(_sent(batch, self.clock(), acks.RelayUnavailable()))
            return acks.RelayUnavailable()
        answer = self.relay.answer(batch, self.clock())
        if answer is None:
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        self.clock.advance(self.latency_s)
        assert answer is not None
        return answer


def _sent(batch: Batch, at: float, answer: acks.Ack) -> Any:
    from sessionfsm.testing import Sent

    return Sent(batch=batch, at=at, answer=answer)


async def _scripted_run(engine: Engine, metrics: PrometheusMetrics) -> tuple[str, ScriptedRelay]:
    """The incident in miniature, on a running runner: a session the relay always
    rate-limits, one lost answer, one outage; scrape /metrics once all is at rest."""
    clock = FakeClock(0.0)
    relay = ScriptedRelay()
    relay.always("big", acks.RateLimited())
    relay.lose_next(1)
    transport = _RelayTransport(relay, clock, latency_s=0.5)
    transport.down_for = 1

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(0)
        clock.advance(seconds)

    runner = Runner(engine, transport, clock=clock, sleep=sleep, grace_s=0.0, log=False)
    runner.enqueue("big")
    for i in range(12):
        runner.enqueue(f"s{i:02d}")
    for i in range(4):
        runner.enqueue(f"old{i}", Lane.BACKFILL)
    task = asyncio.create_task(runner.run())
    while not engine.idle():
        await asyncio.sleep(0)
    with metrics.serve(port=0) as server:
        assert server.url.startswith("http://127.0.0.1:")

        def get() -> str:
            with urllib.request.urlopen(server.url, timeout=10) as response:
                assert response.status == 200
                return str(response.read().decode())

        text = await asyncio.to_thread(get)
    assert not task.done(), "the runner must still be running while scraped"
    runner.stop()
    await task
    return text, relay


def test_a_running_runners_metrics_endpoint_matches_the_engine(
    metrics_registry: Any, parse_exposition: Callable[[str], Samples]
) -> None:
    """/metrics over loopback HTTP, parsed by prometheus_client, equals the engine's own counts."""
    engine = Engine(Policy(), rng=random.Random(3), log=False)
    metrics = PrometheusMetrics(engine, registry=metrics_registry)
    text, relay = asyncio.run(_scripted_run(engine, metrics))
    samples = parse_exposition(text)

    # Exactly one dead letter, the always-refused session, for RateLimited.
    assert [(v.id, v.dead_letter_reason) for v in engine.dead_letters()] == [("big", "RateLimited")]
    assert _total(samples, "sessionfsm_dead_letters_total") == 1
    assert (
        _value(samples, "sessionfsm_dead_letters_total", reason="RateLimited", lane="incremental")
        == 1
    )
    for state, n in engine.sessions_by_state().items():
        assert _total(samples, "sessionfsm_sessions", state=state.value) == n
    for view in engine.sessions():
        assert _value(samples, "sessionfsm_sessions", state=view.state.value, lane=view.lane.value)
    assert _total(samples, "sessionfsm_sessions", lane="backfill") == 4

    # Sends and batches, against what the relay saw.
    sessions_sent = sum(len(s.batch.session_ids) for s in relay.sent)
    assert _total(samples, "sessionfsm_transitions_total", event="sent") == sessions_sent
    assert _total(samples, "sessionfsm_batches_total", event="sent") == len(relay.sent)
    bounced = [s for s in relay.sent if isinstance(s.answer, acks.RelayUnavailable)]
    answered = [s for s in relay.sent if isinstance(s.answer, dict)]
    assert _total(samples, "sessionfsm_batches_total", event="bounced") == len(bounced) == 1
    assert _total(samples, "sessionfsm_batches_total", event="timed_out") == 1
    assert _total(samples, "sessionfsm_batches_total", event="answered") == len(answered)
    # Every answer took 0.5 s on the runner's clock.
    count = _total(samples, "sessionfsm_ack_latency_seconds_count")
    assert count == len(answered)
    assert _total(samples, "sessionfsm_ack_latency_seconds_sum") == pytest.approx(0.5 * count)
    assert _total(samples, "sessionfsm_ack_latency_seconds_bucket", le="0.25") == 0
    assert _total(samples, "sessionfsm_ack_latency_seconds_bucket", le="0.5") == count

    # The outage paused the link once, and it is up again.
    assert _value(samples, "sessionfsm_link_state", state="up") == 1
    assert _value(samples, "sessionfsm_link_state", state="paused") == 0
    assert _value(samples, "sessionfsm_link_changes_total", source="up", target="paused") == 1
    assert _value(samples, "sessionfsm_link_state_seconds_total", state="paused") > 0
    # Up to the scrape; the runner has ticked on since.
    assert 0 < _total(samples, "sessionfsm_link_state_seconds_total") <= engine.now
    # Nothing waits, so nothing is old.
    assert _total(samples, "sessionfsm_oldest_queued_seconds") == 0

    # No session id anywhere in a label.
    ids = {view.id for view in engine.sessions()}
    assert not {value for _, labels in samples for _, value in labels} & ids
    metrics.close()


def test_simulate_metrics_out_writes_the_incidents_exposition(
    sessionfsm_cli: Callable[..., click.testing.Result],
    tmp_path: Path,
    parse_exposition: Callable[[str], Samples],
) -> None:
    """simulate incident --metrics-out: one RateLimited dead letter, the rest synced, as stored."""
    out = tmp_path / "incident.prom"
    result = sessionfsm_cli("simulate", "incident", "--json", "--metrics-out", str(out))
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    samples = parse_exposition(out.read_text(encoding="utf-8"))
    assert figures["dead_lettered"] == {"RateLimited": 1}
    assert _total(samples, "sessionfsm_dead_letters_total") == 1
    assert _total(samples, "sessionfsm_dead_letters_total", reason="RateLimited") == 1
    assert _total(samples, "sessionfsm_sessions", state="synced") == figures["synced"]
    assert _total(samples, "sessionfsm_sessions", state="dead_lettered") == 1
    assert _total(samples, "sessionfsm_sessions") == figures["sessions"]
    assert _total(samples, "sessionfsm_batches_total", event="sent") == figures["batches"]
    assert _total(samples, "sessionfsm_link_changes_total", source="up", target="paused") >= 1


def test_metrics_out_cannot_be_combined_with_sweep(
    sessionfsm_cli: Callable[..., click.testing.Result], tmp_path: Path
) -> None:
    """--metrics-out shows one run, so a sweep refuses it with a usage error."""
    result = sessionfsm_cli("simulate", "--sweep", "--metrics-out", str(tmp_path / "m.prom"))
    assert result.exit_code == 2
    assert "--metrics-out" in result.output


# ----------------------------------------------------------------- the tally


def test_a_tally_attached_late_starts_from_what_the_engine_holds(small_policy: Policy) -> None:
    """Attached mid-run, the tally's gauges still match the engine from the first scrape."""
    engine = Engine(small_policy, rng=random.Random(0), log=False)
    for sid in ("a", "b", "c", "d"):
        engine.enqueue(sid)
    engine.enqueue("z", Lane.BACKFILL)
    batch = engine.tick(0.0)[0]
    engine.on_ack(batch.id, acks.Ok(), now=1.0)
    tally = Tally(engine)
    figures = tally.figures()
    for state, n in engine.sessions_by_state().items():
        assert sum(v for (s, _), v in figures.sessions.items() if s == state.value) == n
    engine.tick(12.0)
    # z has waited since before the attach at 1.0; the tally counts from there.
    assert tally.figures().oldest_queued_s == {"incremental": 0.0, "backfill": 11.0}
    with pytest.raises(UsageError, match="already attached"):
        tally.attach(engine)


def test_oldest_queued_age_follows_the_queue_and_a_promotion(small_policy: Policy) -> None:
    """The oldest queued session's wait, per lane; a promoted session joins incremental."""
    engine = Engine(small_policy, log=False)
    clock = FakeClock(0.0)
    tally = Tally(engine, clock=clock)
    engine.enqueue("b1", Lane.BACKFILL, now=0.0)
    engine.relay_unavailable(now=0.0)  # nothing is sent while the link is paused
    engine.enqueue("b2", Lane.BACKFILL, now=5.0)
    clock.advance(10.0)
    assert tally.figures().oldest_queued_s == {"incremental": 0.0, "backfill": 10.0}
    engine.enqueue("b1", Lane.INCREMENTAL, now=10.0)  # promoted
    clock.advance(3.0)
    figures = tally.figures()
    assert figures.oldest_queued_s == {"incremental": 3.0, "backfill": 8.0}
    assert figures.sessions["queued", "incremental"] == 1
    assert figures.sessions["queued", "backfill"] == 1
    assert figures.transitions["promoted", "queued"] == 1


def test_link_seconds_add_up_to_the_engine_clock(small_policy: Policy) -> None:
    """Time up plus time paused is the time the engine has seen, the current stretch included."""
    engine = Engine(small_policy, log=False)
    tally = Tally(engine)
    engine.enqueue("a", now=0.0)
    engine.relay_unavailable(now=4.0)
    engine.relay_ready(now=10.0)
    engine.tick(25.0)
    figures = tally.figures()
    assert figures.link_state == LinkState.UP.value
    assert figures.link_seconds == {"up": 19.0, "paused": 6.0, "throttled": 0.0, "probing": 0.0}
    assert figures.link_changes == {("up", "paused"): 1, ("paused", "up"): 1}


def test_latency_buckets_must_increase() -> None:
    """A histogram with unordered buckets is the caller's mistake, said as such."""
    with pytest.raises(UsageError, match="increasing"):
        Tally(latency_buckets=(1.0, 0.5))


def test_two_exporters_in_their_own_registries_do_not_collide(
    metrics_registry: Any, parse_exposition: Callable[[str], Samples]
) -> None:
    """Each engine's metrics live in the registry it was given; close() leaves it."""
    from prometheus_client import CollectorRegistry

    first, second = Engine(Policy(), log=False), Engine(Policy(), log=False)
    a = PrometheusMetrics(first, registry=metrics_registry)
    b = PrometheusMetrics(second, registry=CollectorRegistry())
    first.enqueue("x")
    assert _total(parse_exposition(a.exposition().decode()), "sessionfsm_sessions") == 1
    assert _total(parse_exposition(b.exposition().decode()), "sessionfsm_sessions") == 0
    a.close()
    assert first.listeners == ()
    assert list(metrics_registry.collect()) == []


# ------------------------------------------------------------- OpenTelemetry


def _otel_points(reader: Any) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    return points


def test_otel_collects_the_same_figures_as_prometheus(
    otel_reader: Any, metrics_registry: Any, parse_exposition: Callable[[str], Samples]
) -> None:
    """Through the SDK's in-memory reader, OpenTelemetry sees what Prometheus sees."""
    reader, provider = otel_reader
    engine = Engine(Policy(), rng=random.Random(0), log=False)
    tally = Tally(engine)
    prom = PrometheusMetrics(registry=metrics_registry, tally=tally)
    otel = OtelMetrics(engine, meter_provider=provider, tally=tally)
    relay = ScriptedRelay()
    relay.always("s03", acks.RateLimited())
    for i in range(25):
        engine.enqueue(f"s{i:02d}", now=0.0)
    from sessionfsm import run_until_idle

    run_until_idle(engine, relay, FakeClock(0.0), latency=0.5)
    samples = parse_exposition(prom.exposition().decode())
    points = _otel_points(reader)
    assert set(points) <= set(INSTRUMENT_NAMES)
    dead = {
        (p.attributes["sessionfsm.reason"], p.attributes["sessionfsm.lane"]): p.value
        for p in points["sessionfsm.dead_letters"]
    }
    assert dead["RateLimited", "incremental"] == 1
    assert sum(dead.values()) == _total(samples, "sessionfsm_dead_letters_total") == 1
    sessions = {
        (p.attributes["sessionfsm.session.state"], p.attributes["sessionfsm.lane"]): p.value
        for p in points["sessionfsm.sessions"]
    }
    for state in SessionState:
        for lane in Lane:
            assert sessions[state.value, lane.value] == _value(
                samples, "sessionfsm_sessions", state=state.value, lane=lane.value
            )
    transitions = {
        (p.attributes["sessionfsm.event"], p.attributes["sessionfsm.outcome"]): p.value
        for p in points["sessionfsm.transitions"]
    }
    for (event, outcome), n in transitions.items():
        assert _value(samples, "sessionfsm_transitions_total", event=event, outcome=outcome) == n
    (duration,) = points["sessionfsm.ack.duration"]
    assert duration.count == _total(samples, "sessionfsm_ack_latency_seconds_count") > 0
    assert duration.sum == pytest.approx(_total(samples, "sessionfsm_ack_latency_seconds_sum"))
    assert list(duration.explicit_bounds)[:3] == [0.05, 0.1, 0.25]
    link = {p.attributes["sessionfsm.link.state"]: p.value for p in points["sessionfsm.link.state"]}
    assert link == {"up": 1, "paused": 0, "throttled": 0, "probing": 0}
    otel.close()
    assert engine.listeners == ()


# ------------------------------------------------------ the dashboard and alerts


def _exposition_names(parse_exposition: Callable[[str], Samples]) -> set[str]:
    """Every sample name an engine that has done everything once exports."""
    from prometheus_client import CollectorRegistry

    engine = Engine(Policy(), rng=random.Random(0), log=False)
    metrics = PrometheusMetrics(engine, registry=CollectorRegistry())
    engine.enqueue("a")
    engine.tick(0.0)
    engine.relay_unavailable(1.0)
    engine.relay_ready(2.0)
    engine.on_ack(999, acks.Ok(), now=2.0)  # an anomaly
    names = {name for name, _ in parse_exposition(metrics.exposition().decode())}
    metrics.close()
    return names


def _promql_names(text: str) -> set[str]:
    return set(re.findall(r"\bsessionfsm_[a-z_]+\b", text))


def test_every_metric_the_dashboard_and_alerts_use_is_exported(
    parse_exposition: Callable[[str], Samples],
) -> None:
    """The shipped Grafana dashboard and alert rules only query metrics that exist."""
    exported = _exposition_names(parse_exposition)
    dashboard = json.loads((ROOT / "dashboards" / "sessionfsm.json").read_text(encoding="utf-8"))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 8
    used = set().union(*(_promql_names(e) for e in exprs))
    assert used, "the dashboard queries no sessionfsm metric"
    assert used <= exported, used - exported
    alerts = (ROOT / "dashboards" / "alerts.yml").read_text(encoding="utf-8")
    alert_exprs = re.findall(r"^\s+expr:\s*(.+)$", alerts, flags=re.MULTILINE)
    assert len(re.findall(r"^\s+- alert:", alerts, flags=re.MULTILINE)) == 3
    assert len(alert_exprs) == 3
    alert_used = set().union(*(_promql_names(e) for e in alert_exprs))
    assert alert_used <= exported, alert_used - exported
    # And every family the module promises is exported.
    for family in METRIC_NAMES:
        assert any(name == family or name.startswith(family + "_") for name in exported), family


def test_documentation_lists_every_metric() -> None:
    """docs/observability.md names every Prometheus family and OpenTelemetry instrument."""
    doc = (ROOT / "docs" / "observability.md").read_text(encoding="utf-8")
    for name in (*METRIC_NAMES, *INSTRUMENT_NAMES, *FLEET_METRIC_NAMES):
        assert f"`{name}`" in doc, name


def test_anomalies_are_exported_as_the_engine_counts_them(
    metrics_registry: Any, parse_exposition: Callable[[str], Samples]
) -> None:
    """Ignored inputs (an ack for no batch, a clock going back) show up by kind."""
    engine = Engine(Policy(), log=False)
    metrics = PrometheusMetrics(engine, registry=metrics_registry)
    engine.tick(10.0)
    engine.on_ack(12345, acks.Ok(), now=10.0)
    engine.tick(5.0)
    samples = parse_exposition(metrics.exposition().decode())
    assert engine.anomalies == {"unknown_batch": 1, "clock_regressed": 1}
    for kind, n in engine.anomalies.items():
        assert _value(samples, "sessionfsm_anomalies_total", kind=kind) == n
