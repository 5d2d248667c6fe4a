"""The benchmark at tiny sizes: its structure, its fairness checks and ``--check``.

Nothing here asserts a time: timings belong to ``sessionfsm bench --check``
on a quiet machine, never to a unit test.
"""

from __future__ import annotations

import functools
import os
import sys

import msgspec
import pytest
from click.testing import CliRunner

from benchmarks import bench
from benchmarks.bench import Floor, Report, ScanQueue, Sizes, Stat
from sessionfsm import SessionState
from sessionfsm.tools.cli import main

TINY = Sizes(
    repeat=2,
    ack_sessions=200,
    ack_reference_sessions=30,
    tick_sessions=(100, 400),
    ticks_per_round=3,
    memory_sessions=(200,),
    memory_reference_sessions=20,
    store_deltas_sessions=100,
    store_recovery_sessions=300,
    startup_sessions=200,
    listener_sessions=200,
    listener_rounds=1,
)


@functools.cache
def tiny_report() -> Report:
    return bench.run(TINY, mode="tiny")


def test_session_ids_are_uuid_like_distinct_and_reproducible() -> None:
    """Ids are distinct 36-character UUID-like strings, the same for the same seed."""
    ids = bench.session_ids(500)
    assert len(set(ids)) == 500
    assert all(len(sid) == 36 and sid.count("-") == 4 for sid in ids)
    assert bench.session_ids(500) == ids
    assert bench.session_ids(500, seed=8) != ids


def test_ack_mix_exercises_every_ack_and_mostly_succeeds() -> None:
    """The scripted answers contain every ack type, Ok most often."""
    kinds = {type(ack).__name__ for ack in bench.ACK_MIX}
    assert kinds == {"Ok", "RateLimited", "AckTimeout", "PayloadTooLarge", "RelayUnavailable"}
    ok = sum(type(ack).__name__ == "Ok" for ack in bench.ACK_MIX)
    assert ok / len(bench.ACK_MIX) > 0.5


@pytest.mark.parametrize("n", [1, 37, 600])
def test_floor_ends_every_session_exactly_as_the_engine(n: int) -> None:
    """The floor does the engine's work: same acks answered, same end state per session."""
    ids = bench.session_ids(n)
    floor, engine = Floor(), bench._engine("compiled")
    assert bench.drive(floor, ids) == bench.drive(engine, ids)
    assert bench.outcome(floor) == bench.outcome(engine)
    states = {state for state, *_ in bench.outcome(engine).values()}
    assert states <= {"synced", "dead_lettered"}


def test_reference_runtime_ends_every_session_as_the_compiled_one() -> None:
    """Under the benchmark's script the reference runtime agrees with the compiled one."""
    ids = bench.session_ids(40)
    compiled, reference = bench._engine("compiled"), bench._engine("reference")
    assert bench.drive(compiled, ids) == bench.drive(reference, ids)
    assert bench.outcome(compiled) == bench.outcome(reference)


def test_every_session_is_answered_at_least_once() -> None:
    """An ack is one session answered: a run takes at least one per session."""
    ids = bench.session_ids(300)
    engine = bench._engine("compiled")
    answered = bench.drive(engine, ids)
    assert answered >= len(ids)
    assert engine.idle()


def test_ack_cost_rows_and_ratios() -> None:
    """Per-ack rows cover floor, compiled and reference; ratios are positive and paired."""
    ack = tiny_report().ack
    keys = [(row.impl, row.sessions) for row in ack.rows]
    assert keys == [
        ("floor", 200),
        ("compiled", 200),
        ("floor", 30),
        ("compiled", 30),
        ("reference", 30),
    ]
    for row in ack.rows:
        assert row.acks >= row.sessions
        assert len(row.us_per_ack.samples) == TINY.repeat
        assert 0 < row.us_per_ack.low <= row.us_per_ack.median <= row.us_per_ack.high
    acks_at = {(row.impl, row.sessions): row.acks for row in ack.rows}
    assert acks_at["floor", 30] == acks_at["compiled", 30] == acks_at["reference", 30]
    for ratio in (
        ack.reference_over_compiled,
        ack.compiled_over_floor,
        ack.compiled_over_floor_small,
    ):
        assert ratio.median > 0
        assert len(ratio.samples) == TINY.repeat


def test_tick_population_is_half_backed_off_half_queued() -> None:
    """The tick benchmark's engine holds half its sessions in backoff, half queued."""
    engine = bench.tick_population(bench.session_ids(200))
    counts = engine.sessions_by_state()
    assert counts[SessionState.BACKOFF] == 100
    assert counts[SessionState.QUEUED] == 100
    engine.check()


def test_scan_baseline_skips_backed_off_and_in_flight_sessions() -> None:
    """The scanning pick takes the first due sessions not in flight, in queue order."""
    scan = ScanQueue(size=2)
    for sid in ("a", "b", "c", "d", "e"):
        scan.queue[sid] = None
    scan.retry_at["a"] = 100.0
    assert scan.pick(now=0.0) == ["b", "c"]
    assert scan.pick(now=0.0) == ["d", "e"]
    scan.synced_and_changed(["b", "c"])
    assert scan.pick(now=200.0) == ["a", "b"]


def test_tick_cost_rows_and_growth() -> None:
    """Tick rows are per size, engine and scan; growth is largest over smallest."""
    tick = tiny_report().tick
    assert [row.sessions for row in tick.rows] == [100, 400]
    for row in tick.rows:
        assert row.engine_us.median > 0
        assert row.scan_us.median > 0
    first, last = tick.rows[0], tick.rows[-1]
    want = [a / b for a, b in zip(last.engine_us.samples, first.engine_us.samples, strict=True)]
    assert tick.engine_growth.samples == pytest.approx(want)
    assert tick.scan_growth.median > 0


def test_memory_rows_cover_both_runtimes_and_price_the_id() -> None:
    """Memory rows cover both runtimes; the reference costs more; the id is priced."""
    rows = tiny_report().memory
    by_key = {(r.runtime, r.population, r.sessions): r for r in rows}
    assert set(by_key) == {
        ("reference", "one attempt", 20),
        ("compiled", "one attempt", 20),
        ("compiled", "enqueued", 200),
        ("compiled", "one attempt", 200),
    }
    assert all(r.bytes_per_session > 0 for r in rows)
    assert all(r.id_bytes == sys.getsizeof("x" * 36) for r in rows)
    reference = by_key["reference", "one attempt", 20].bytes_per_session
    assert reference > by_key["compiled", "one attempt", 20].bytes_per_session


def test_store_cost_measures_saves_and_recovery() -> None:
    """The store section replays deltas, drives the engine live and recovers every session."""
    store = tiny_report().store
    if not store.available:
        # Locally a missing SQLite feature skips; under CI=true it fails.
        if os.environ.get("CI") == "true":
            pytest.fail(store.note)
        pytest.skip(store.note)
    assert store.deltas > 0
    assert store.transitions >= store.deltas
    assert store.transitions_per_s is not None
    assert store.transitions_per_s.median > 0
    assert store.engine_transitions_per_s is not None
    assert store.recovery_sessions == TINY.store_recovery_sessions
    assert store.recovery_s is not None
    assert len(store.recovery_s.samples) == TINY.repeat
    # Each figure has its raw-sqlite3 baseline from the same rounds.
    assert store.raw_transitions_per_s is not None
    assert store.save_over_raw is not None
    assert len(store.save_over_raw.samples) == TINY.repeat
    assert store.raw_read_s is not None
    assert store.recovery_over_raw is not None
    assert store.recovery_over_raw.median > 0


def test_store_targets_are_ratios_against_the_raw_baselines() -> None:
    """The store targets judge the ratio to raw sqlite3, whatever the absolute speed."""
    report = tiny_report()
    slow_machine = bench.StoreCost(
        available=True,
        note="fake",
        transitions_per_s=Stat.of([5_000.0]),  # slow in absolute terms ...
        recovery_sessions=1_000_000,
        recovery_s=Stat.of([60.0]),
        save_over_raw=Stat.of([1.2]),  # ... but close to the raw baseline
        recovery_over_raw=Stat.of([2.0]),
    )
    targets = bench.evaluate(report.ack, report.tick, report.memory, slow_machine, report.listeners)
    by_key = {t.key: t for t in targets}
    assert by_key["store_throughput"].ok
    assert by_key["recovery"].ok
    far_behind = msgspec.structs.replace(
        slow_machine, save_over_raw=Stat.of([2.5]), recovery_over_raw=Stat.of([3.5])
    )
    lines = bench.missed(bench.evaluate(report.ack, report.tick, report.memory, far_behind, None))
    assert any(line.startswith("store_throughput:") and "2.5" in line for line in lines)
    assert any(line.startswith("recovery:") and "3.5" in line for line in lines)


def test_startup_times_engine_and_floor() -> None:
    """Start-up times both enqueues at the asked size, paired round by round."""
    startup = tiny_report().startup
    assert startup.sessions == TINY.startup_sessions
    assert len(startup.engine_over_floor.samples) == TINY.repeat
    assert startup.engine_over_floor.median > 0
    assert startup.sqlite_many_s is not None
    assert len(startup.sqlite_many_s.samples) == TINY.repeat
    assert startup.sqlite_each_sessions == min(TINY.startup_sessions, 10_000)


def test_quick_report_says_it_is_a_smoke_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench --quick`` says its figures are a smoke test, so a MISS there alarms no one."""
    report = msgspec.structs.replace(tiny_report(), mode="quick")
    monkeypatch.setattr(bench, "run", lambda *a, **kw: report)
    result = CliRunner().invoke(main, ["bench", "--quick"])
    assert result.exit_code == 0, result.output
    assert "quick run: a smoke test" in result.output
    assert "start-up: SQLite, enqueue_many" in result.output


def test_report_round_trips_through_json_and_renders() -> None:
    """The report encodes to JSON and back, and the table names every section."""
    report = tiny_report()
    again = msgspec.json.decode(msgspec.json.encode(report), type=Report)
    assert again == report
    names = [row[0] for row in bench.rows(report)]
    for prefix in ("per ack", "tick", "memory", "store", "start-up", "listeners"):
        assert any(name.startswith(prefix) for name in names), prefix
    assert [t.key for t in report.targets] == [
        "ack_vs_reference",
        "ack_vs_floor",
        "tick_growth",
        "memory",
        "store_throughput",
        "recovery",
        "listener_cost",
    ]


def test_check_flags_each_missed_target_by_name() -> None:
    """Fake numbers that miss two targets produce one line naming each."""
    report = tiny_report()
    ack = msgspec.structs.replace(
        report.ack,
        reference_over_compiled=Stat.of([10.0]),
        compiled_over_floor=Stat.of([2.0]),
    )
    tick = msgspec.structs.replace(report.tick, engine_growth=Stat.of([3.5]))
    listeners = msgspec.structs.replace(report.listeners, prometheus_over_none=1.7)
    targets = bench.evaluate(ack, tick, report.memory, report.store, listeners)
    lines = bench.missed(targets)
    assert any(line.startswith("ack_vs_reference:") and "10" in line for line in lines)
    assert any(line.startswith("tick_growth:") and "3.5" in line for line in lines)
    assert any(line.startswith("listener_cost:") and "1.7" in line for line in lines)
    assert not any(line.startswith("ack_vs_floor:") for line in lines)


def test_check_passes_good_numbers_and_refuses_unmeasured_ones() -> None:
    """Numbers inside every limit pass; a target this run did not measure is listed."""
    report = tiny_report()
    ack = msgspec.structs.replace(
        report.ack,
        reference_over_compiled=Stat.of([80.0]),
        compiled_over_floor=Stat.of([4.0]),
    )
    tick = msgspec.structs.replace(report.tick, engine_growth=Stat.of([1.2]))
    memory = [msgspec.structs.replace(r, bytes_per_session=100.0) for r in report.memory]
    good_store = bench.StoreCost(
        available=True,
        note="fake",
        transitions_per_s=Stat.of([200_000.0]),
        recovery_sessions=1_000_000,
        recovery_s=Stat.of([3.0]),
        save_over_raw=Stat.of([1.5]),
        recovery_over_raw=Stat.of([2.5]),
    )
    listeners = msgspec.structs.replace(report.listeners, prometheus_over_none=1.2)
    assert bench.missed(bench.evaluate(ack, tick, memory, good_store, listeners)) == []
    no_store = bench.StoreCost(available=False, note="no store")
    lines = bench.missed(bench.evaluate(ack, tick, memory, no_store, None))
    assert [line.split(":")[0] for line in lines] == [
        "store_throughput",
        "recovery",
        "listener_cost",
    ]
    assert all("not measured" in line for line in lines)


def test_cli_check_exits_1_naming_the_missed_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sessionfsm bench --check`` exits 1 and names each missed target on stderr."""
    report = tiny_report()
    worse = msgspec.structs.replace(
        report,
        targets=bench.evaluate(
            msgspec.structs.replace(report.ack, compiled_over_floor=Stat.of([20.0])),
            report.tick,
            report.memory,
            report.store,
            report.listeners,
        ),
    )
    monkeypatch.setattr(bench, "run", lambda *a, **kw: worse)
    result = CliRunner().invoke(main, ["bench", "--quick", "--check"])
    assert result.exit_code == 1
    assert "missed target ack_vs_floor" in result.output


def test_cli_json_is_the_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sessionfsm bench --json`` prints the whole report as JSON."""
    report = tiny_report()
    monkeypatch.setattr(bench, "run", lambda *a, **kw: report)
    result = CliRunner().invoke(main, ["bench", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    start = result.output.index("{")
    assert msgspec.json.decode(result.output[start:], type=Report) == report


def test_cli_quick_says_it_is_a_smoke_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sessionfsm bench --quick`` says plainly that its figures are not the targets'."""
    report = tiny_report()
    monkeypatch.setattr(bench, "run", lambda *a, **kw: report)
    result = CliRunner().invoke(main, ["bench", "--quick"])
    assert result.exit_code == 0, result.output
    assert "--quick is a smoke test" in result.output


def test_postgres_section_runs_against_a_real_server_and_feeds_two_targets(
    pg_dsn: str,
) -> None:
    """Section 7 at a tiny size, on the test server: one worker beside SQLite, the
    fleet of 1, 2 and 4 processes, takeover and pickup; its two targets and its
    rows come from those figures, and the report still round-trips through JSON."""
    from benchmarks.bench_postgres import postgres_cost

    pg = postgres_cost(sessions=300, fleet_sessions=300, repeat=1, dsn=pg_dsn)
    assert pg.available, pg.note
    w = pg.worker
    for key in ("sqlite", "grouped", "every_turn"):
        assert w[key] > 0
        assert len(w[f"{key}_runs"]) == 1
    # Grouped writes need fewer commits than one per turn for the same sessions.
    assert w["grouped_commits"] < w["every_turn_commits"]
    assert [f["workers"] for f in pg.fleet] == [1, 2, 4]
    assert all(f["transitions_s"] > 0 for f in pg.fleet)
    assert pg.takeover["partitions_moved"] >= 1
    assert pg.takeover_over_bound is not None
    assert pg.pickup["enqueues"] == 50
    targets = bench._postgres_targets(pg)
    assert [t.key for t in targets] == ["postgres_worker", "postgres_takeover"]
    assert targets[0].value == w["grouped"]
    report = msgspec.structs.replace(tiny_report(), postgres=pg)
    assert msgspec.json.decode(msgspec.json.encode(report), type=Report) == report
    names = [row[0] for row in bench.rows(report)]
    assert "postgres: one worker, grouped writes" in names
    assert "postgres: 4 worker processes, HTTP relay" in names


def test_postgres_targets_are_unmeasured_without_a_server_and_absent_with_quick() -> None:
    """No server: both PostgreSQL targets are listed as not measured; --quick
    (no section 7) adds none."""
    missing = bench.PostgresCost(available=False, note="no PostgreSQL server")
    lines = bench.missed(bench._postgres_targets(missing))
    assert [line.split(":")[0] for line in lines] == ["postgres_worker", "postgres_takeover"]
    assert all("not measured" in line for line in lines)
    assert bench._postgres_targets(None) == []
    slow = bench.PostgresCost(
        available=True,
        worker={"grouped": 12_000},
        takeover={"seconds": 1.5, "lease_s": 1.0, "tick_s": 0.02},
    )
    assert [line.split(":")[0] for line in bench.missed(bench._postgres_targets(slow))] == [
        "postgres_worker",
        "postgres_takeover",
    ]
