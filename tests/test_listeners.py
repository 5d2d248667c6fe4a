"""The engine's listener API: every call's journal, as the store gets it, and
nothing a listener does changes what the engine does."""

from __future__ import annotations

import random
import time
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

import sessionfsm.engine
import sessionfsm.rooms.journal
from sessionfsm import (
    Engine,
    Lane,
    LinkState,
    MemoryStore,
    Policy,
    Report,
    SessionState,
    UsageError,
    acks,
)
from sessionfsm.metrics import Tally
from tests.conftest import apply_operation
from tests.strategies import operations, policies
from tests.test_stateful import EngineMachine


class _Recorder:
    """Keeps every report it gets."""

    def __init__(self) -> None:
        self.reports: list[Report] = []

    def __call__(self, report: Report) -> None:
        self.reports.append(report)


def _boom(report: Report) -> None:
    raise RuntimeError("a broken dashboard")


def _slow(report: Report) -> None:
    time.sleep(0.0005)


def _public_state(engine: Engine) -> Any:
    """Everything the engine shows through its public API, as plain data."""
    return msgspec.to_builtins(
        {
            "sessions": list(engine.sessions()),
            "in_flight": engine.in_flight(),
            "link": engine.link,
            "counts": {state.value: n for state, n in engine.sessions_by_state().items()},
            "anomalies": engine.anomalies,
            "now": engine.now,
            "next_wakeup": engine.next_wakeup(),
        }
    )


# ------------------------------------------------------------------ the journal


def test_listeners_get_exactly_the_rows_the_store_gets(small_policy: Policy) -> None:
    """Concatenated, the reports' changes are the store's history, row for row."""
    store = MemoryStore(history_retention=None)
    recorder = _Recorder()
    engine = Engine(small_policy, store=store, log=False, listeners=[recorder])
    for sid in ("a", "b", "c", "d"):
        engine.enqueue(sid)
    engine.enqueue("e", Lane.BACKFILL)
    batch = engine.tick(0.0)[0]
    engine.on_ack(batch.id, {"a": acks.Ok(), "b": acks.RateLimited()}, now=1.0)
    engine.tick(30.0)
    rows = [change for report in recorder.reports for change in report.changes]
    history = [change for sid in "abcde" for change in store.history(sid)]
    assert sorted(rows, key=lambda c: (c.session_id, c.at)) == sorted(
        history, key=lambda c: (c.session_id, c.at)
    )
    assert len(rows) == len(history)
    for report in recorder.reports:
        assert len(report.lanes) == len(report.changes)
        for change, lane in zip(report.changes, report.lanes, strict=True):
            assert lane is engine.session(change.session_id).lane


def test_on_ack_reports_the_very_rows_it_returns(small_policy: Policy) -> None:
    """The rows a listener gets from on_ack are the ones on_ack returns."""
    recorder = _Recorder()
    engine = Engine(small_policy, log=False, listeners=[recorder])
    engine.enqueue("a")
    batch = engine.tick(0.0)[0]
    returned = engine.on_ack(batch.id, acks.Ok(), now=2.0)
    assert recorder.reports[-1].changes is returned


def test_rows_are_the_changes_and_lanes_as_plain_tuples(small_policy: Policy) -> None:
    """Each row is its Change's fields plus the lane, in the Row order, at the report's time."""
    recorder = _Recorder()
    engine = Engine(small_policy, log=False, listeners=[recorder])
    engine.enqueue("a")
    engine.enqueue("b", Lane.BACKFILL)
    engine.enqueue("b")  # promoted to incremental, then changed
    batch = engine.tick(0.0)[0]
    engine.on_ack(batch.id, {"a": acks.Ok(), "b": acks.RateLimited()}, now=1.0)
    assert [len(r.rows) for r in recorder.reports] == [1, 1, 2, 2, 2]
    for report in recorder.reports:
        assert report.lanes == [row[1] for row in report.rows]
        assert [
            (c.session_id, lane, c.event, c.source, c.target, c.reason, c.attempt)
            for c, lane in zip(report.changes, report.lanes, strict=True)
        ] == list(report.rows)
        assert all(c.at == report.now for c in report.changes)
    sid, lane, event, source, target, _reason, _attempt = recorder.reports[2].rows[0]
    assert (sid, lane, event) == ("b", Lane.INCREMENTAL, "promoted")
    assert source is target is SessionState.QUEUED


def test_a_storeless_engine_builds_change_rows_only_when_a_listener_reads_them(
    small_policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a store, enqueue and tick build no Change for a listener that reads only rows."""

    def forbidden(*args: Any, **kw: Any) -> Any:
        raise AssertionError("built a Change row nobody asked for")

    monkeypatch.setattr(sessionfsm.engine, "Change", forbidden)
    heard: list[int] = []
    engine = Engine(small_policy, log=False, listeners=[lambda r: heard.append(len(r.rows))])
    engine.enqueue("a")
    engine.enqueue_many(["b", "c"])
    engine.tick(0.0)
    assert heard == [1, 2, 3]
    assert engine.state("a") is SessionState.IN_FLIGHT


def test_a_report_hands_the_stores_own_rows_and_builds_them_once(small_policy: Policy) -> None:
    """With a store, changes are the saved list itself; without, equal rows built once."""
    saved: list[Any] = []

    class Keeping(MemoryStore):
        def save(self, delta: Any) -> None:
            saved.append(delta.changes)
            super().save(delta)

    with_store, without = _Recorder(), _Recorder()
    stored = Engine(small_policy, store=Keeping(), log=False, listeners=[with_store])
    bare = Engine(small_policy, log=False, listeners=[without])
    for engine in (stored, bare):
        engine.enqueue("a")
        engine.enqueue("b")
        engine.tick(0.0)
    assert [r.changes for r in with_store.reports] == saved
    assert all(r.changes is rows for r, rows in zip(with_store.reports, saved, strict=True))
    assert [r.changes for r in without.reports] == saved
    assert all(r.changes is r.changes for r in without.reports)


def test_batch_events_carry_lane_size_and_latency(small_policy: Policy) -> None:
    """sent gives lane and size; answered, bounced and timed_out give the seconds since sent."""
    recorder = _Recorder()
    two = msgspec.structs.replace(small_policy, max_in_flight=2)
    engine = Engine(two, log=False, listeners=[recorder])
    for sid in ("a", "b", "c"):
        engine.enqueue(sid)
    engine.enqueue("z", Lane.BACKFILL)
    first, second = engine.tick(0.0)
    sent = [e for r in recorder.reports for e in r.batches]
    assert [(e.event, e.lane, e.sessions, e.latency_s) for e in sent] == [
        ("sent", Lane.INCREMENTAL, 3, None),
        ("sent", Lane.BACKFILL, 1, None),
    ]
    engine.on_ack(first.id, {"a": acks.Ok(), "b": acks.Ok()}, now=1.5)
    answered = recorder.reports[-1].batches
    assert [(e.event, e.batch_id, e.sessions, e.latency_s) for e in answered] == [
        ("answered", first.id, 2, 1.5)
    ]
    engine.on_ack(second.id, acks.RelayUnavailable(), now=2.0)
    assert [(e.event, e.latency_s) for e in recorder.reports[-1].batches] == [("bounced", 2.0)]
    engine.tick(small_policy.ack_timeout_s + 1.0)
    timed_out = [e for e in recorder.reports[-1].batches if e.event == "timed_out"]
    assert [(e.batch_id, e.sessions) for e in timed_out] == [(first.id, 1)]
    assert timed_out[0].latency_s == small_policy.ack_timeout_s + 1.0


def test_link_change_reports_before_and_after(small_policy: Policy) -> None:
    """A call that moves the link reports it as it was and as it is; others report None."""
    recorder = _Recorder()
    engine = Engine(small_policy, log=False, listeners=[recorder])
    engine.enqueue("a")
    assert recorder.reports[-1].link_before is None
    engine.relay_unavailable(now=1.0)
    report = recorder.reports[-1]
    assert report.changes == []
    assert report.link_before is not None
    assert report.link_after is not None
    assert (report.link_before.state, report.link_after.state) == (LinkState.UP, LinkState.PAUSED)
    engine.relay_ready(now=2.0)
    assert recorder.reports[-1].link_after is not None
    assert recorder.reports[-1].link_after.state is LinkState.UP


def test_a_call_that_changes_nothing_reports_nothing(small_policy: Policy) -> None:
    """An idle tick is not a report: listeners hear only of change."""
    recorder = _Recorder()
    engine = Engine(small_policy, log=False, listeners=[recorder])
    engine.tick(0.0)
    engine.tick(5.0)
    assert recorder.reports == []


def test_no_listener_builds_no_report(
    small_policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nobody listening the engine never builds a Report or a BatchEvent."""

    def forbidden(*args: Any, **kw: Any) -> Any:
        raise AssertionError("built a report nobody listens to")

    # The journal builds reports, the engine batch events.
    monkeypatch.setattr(sessionfsm.rooms.journal, "Report", forbidden)
    monkeypatch.setattr(sessionfsm.engine, "BatchEvent", forbidden)
    engine = Engine(small_policy, log=False)
    engine.enqueue("a")
    batch = engine.tick(0.0)[0]
    engine.on_ack(batch.id, acks.Ok(), now=1.0)
    engine.relay_unavailable(now=2.0)
    engine.enqueue("b")
    engine.tick(100.0)
    assert engine.state("a") is SessionState.SYNCED


# -------------------------------------------------------- subscribe, unsubscribe


def test_subscribe_twice_or_unsubscribe_a_stranger_is_a_usage_error(engine: Engine) -> None:
    """Subscriptions are explicit: no double delivery, no silent no-op removal."""
    recorder = _Recorder()
    engine.subscribe(recorder)
    with pytest.raises(UsageError, match="already subscribed"):
        engine.subscribe(recorder)
    engine.unsubscribe(recorder)
    with pytest.raises(UsageError, match="not subscribed"):
        engine.unsubscribe(recorder)
    with pytest.raises(UsageError, match="callable"):
        engine.subscribe("not a listener")  # type: ignore[arg-type]
    assert engine.listeners == ()


def test_listeners_run_in_order_and_an_unsubscribed_one_hears_no_more(engine: Engine) -> None:
    """Listeners are called in subscription order; after unsubscribe, never again."""
    calls: list[str] = []
    first, second = (lambda r: calls.append("first")), (lambda r: calls.append("second"))
    engine.subscribe(first)
    engine.subscribe(second)
    engine.enqueue("a")
    engine.unsubscribe(first)
    engine.enqueue("b")
    assert calls == ["first", "second", "second"]


def test_a_raising_listener_is_logged_and_the_others_still_hear(
    policy: Policy, logs: list[dict[str, Any]]
) -> None:
    """A listener that raises is logged as sessionfsm.listener_failed; the call succeeds."""
    recorder = _Recorder()
    engine = Engine(policy, log=True, listeners=[_boom, recorder])
    engine.enqueue("a")
    assert engine.state("a") is SessionState.QUEUED
    assert len(recorder.reports) == 1
    failed = [e for e in logs if e["event"] == "sessionfsm.listener_failed"]
    assert len(failed) == 1
    assert "a broken dashboard" in failed[0]["error"]
    assert failed[0]["log_level"] == "error"


def test_recovered_engine_subscribes_listeners_after_recovery(small_policy: Policy) -> None:
    """Listeners passed to a recovering engine hear the calls after it, not the recovery."""
    store = MemoryStore(history_retention=None)
    first = Engine(small_policy, store=store, log=False)
    first.enqueue("a")
    first.tick(0.0)
    recorder = _Recorder()
    second = Engine(small_policy, store=store, log=False, listeners=[recorder])
    assert recorder.reports == []
    assert second.state("a") is SessionState.QUEUED
    second.tick(small_policy.incremental_interval_s)
    assert [c.event for c in recorder.reports[0].changes] == ["sent"]


@given(
    policy=policies,
    seed=st.integers(0, 2**16),
    ops=st.lists(operations, min_size=1, max_size=60),
    churn=st.lists(st.integers(0, 3), min_size=1, max_size=60),
)
def test_listeners_never_change_what_the_engine_does(
    policy: Policy, seed: int, ops: list[tuple[Any, ...]], churn: list[int]
) -> None:
    """Raising, slow, counting listeners, added and removed mid-run: same results, same state."""
    bare = Engine(policy, rng=random.Random(seed), log=False)
    heard = Engine(policy, rng=random.Random(seed), log=False, listeners=[_boom])
    tally = Tally(heard)
    recorder = _Recorder()
    now = 0.0
    for step, op in enumerate(ops):
        move = churn[step % len(churn)]
        if move == 1 and recorder not in heard.listeners:
            heard.subscribe(recorder)
        elif move == 2 and recorder in heard.listeners:
            heard.unsubscribe(recorder)
        elif move == 3 and _slow not in heard.listeners:
            heard.subscribe(_slow)
        if op[0] == "tick":
            now += op[1]
        got, want = apply_operation(heard, op, now), apply_operation(bare, op, now)
        assert msgspec.to_builtins(got) == msgspec.to_builtins(want), (step, op)
        assert _public_state(heard) == _public_state(bare), (step, op)
    heard.check()
    figures = tally.figures()
    for state, n in heard.sessions_by_state().items():
        assert sum(v for (s, _), v in figures.sessions.items() if s == state.value) == n


# ------------------------------------------------ the whole engine, with listeners


class ListenedEngineMachine(EngineMachine):
    """``EngineMachine`` with listeners attached, raising and slow among them,
    subscribed and unsubscribed between steps; every invariant still holds and
    a tally kept from the reports agrees with the engine."""

    def __init__(self) -> None:
        super().__init__()
        self.extra: list[Any] = []
        self.attached_to: Engine | None = None
        self._attach()

    def _attach(self) -> None:
        """Listen to the current engine (``start`` replaces it before the first rule)."""
        if self.attached_to is self.engine:
            return
        self.engine.subscribe(_boom)
        self.tally = Tally(self.engine)
        self.extra = []
        self.attached_to = self.engine

    @rule(which=st.sampled_from(["slow", "recorder", "boom"]))
    def subscribe_another(self, which: str) -> None:
        self._attach()
        listener: Any = {"slow": _slow, "recorder": _Recorder(), "boom": lambda r: 1 / 0}[which]
        if listener in self.engine.listeners:
            return
        self.engine.subscribe(listener)
        self.extra.append(listener)

    @precondition(lambda self: bool(self.extra))
    @rule(data=st.data())
    def unsubscribe_one(self, data: st.DataObject) -> None:
        listener = data.draw(st.sampled_from(self.extra))
        self.engine.unsubscribe(listener)
        self.extra.remove(listener)

    @invariant()
    def the_tally_agrees_with_the_engine(self) -> None:
        self._attach()
        figures = self.tally.figures()
        for state, n in self.engine.sessions_by_state().items():
            by_lane = [v for (s, _), v in figures.sessions.items() if s == state.value]
            assert sum(by_lane) == n, (state, figures.sessions)
            assert all(v >= 0 for v in by_lane)
        queued_now = {v.id for v in self.engine.sessions() if v.state is SessionState.QUEUED}
        waiting = sum(figures.sessions[SessionState.QUEUED.value, lane.value] for lane in Lane)
        assert waiting == len(queued_now)
        if not queued_now:
            assert all(age == 0.0 for age in figures.oldest_queued_s.values())
        assert figures.link_state == self.engine.link.state.value


TestListenedEngine = ListenedEngineMachine.TestCase
