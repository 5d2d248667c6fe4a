"""Durable state: stores, recovery, history and its retention, redrive, bad files.

Most tests run against every store (the ``open_store`` fixture); the bad-file
tests are SQLite's own. A restart here is a new ``Engine`` on the store the
old one left behind; ``tests/test_crash.py`` kills real processes instead.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sessionfsm import (
    Engine,
    HistoryRetention,
    Lane,
    LinkState,
    MemoryStore,
    NotAStore,
    Policy,
    SessionFSMError,
    SessionState,
    SqliteStore,
    Store,
    StoreError,
    StoreLocked,
    StoreReader,
    StoreReadOnly,
    StoreTooNew,
    UnknownSession,
    UsageError,
    acks,
    run_until_idle,
)
from sessionfsm import sqlite_store as sqlite_store_module
from sessionfsm.machine import LinkRecord, SessionRecord
from sessionfsm.store import Change, Delta
from sessionfsm.testing import EngineHarness, FakeClock, ScriptedRelay
from tests.conftest import FAST as SHARED_FAST
from tests.conftest import SMALL_POLICY
from tests.strategies import operations_with_restarts, policies, store_kinds

QUEUED = SessionState.QUEUED
IN_FLIGHT = SessionState.IN_FLIGHT
BACKOFF = SessionState.BACKOFF
SYNCED = SessionState.SYNCED
DEAD = SessionState.DEAD_LETTERED


#: The shared FAST policy, charging every refusal: these tests pin down what a
#: store keeps of a charge, evidence or not (the blame rules: test_blame.py).
FAST = msgspec.structs.replace(SHARED_FAST, max_relay_refusal_s=0.0)

OpenStore = Callable[..., Store]


def _engine(store: Store, policy: Policy = SMALL_POLICY) -> Engine:
    return Engine(policy, store=store, rng=random.Random(0), log=False)


def _queues(engine: Engine) -> dict[Lane, list[str]]:
    """Each lane's ready queue in sending order (stale entries skipped)."""
    return {lane: list(queue) for lane, queue in engine.debug_state()["ready"].items()}


def _history_events(store: Any, session_id: str) -> list[tuple[str, str | None, str]]:
    return [(c.event, c.source, c.target) for c in store.history(session_id)]


def _all_history(store: Any, session_ids: Iterator[str] | list[str]) -> int:
    return sum(len(store.history(sid)) for sid in session_ids)


# ---------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------


def test_a_new_store_has_nothing_to_recover(open_store: OpenStore) -> None:
    """A new store loads as None and an engine on it starts empty at clock 0."""
    store = open_store()
    assert store.load() is None
    engine = _engine(store)
    assert len(engine) == 0
    assert engine.now == 0.0
    assert isinstance(store, Store)


def _poke(engine: Engine, relay: ScriptedRelay, now: float, step: int) -> None:
    """What happens outside the engine at each step of the restart scenario."""
    if step == 0:
        for i in range(8):
            engine.enqueue(f"a{i}", now=now)
        for i in range(6):
            engine.enqueue(f"b{i}", lane="backfill", now=now)
    elif step == 3:
        relay.down()  # whole batches bounce and go back to the head of the queue
    elif step == 6:
        relay.up()
    elif step == 8:
        engine.enqueue("b5", lane="incremental", now=now)  # promoted
    elif step == 12:
        engine.enqueue("a0", now=now)  # synced, changed again
    elif step == 16 and engine.state("a2") is DEAD:
        engine.redrive("a2", now=now)


def _scripted_relay() -> ScriptedRelay:
    relay = ScriptedRelay()
    relay.script("a1", acks.RateLimited(), acks.RateLimited())
    relay.script("a2", acks.PayloadTooLarge())
    relay.script("a3", acks.AckTimeout(), acks.AckTimeout(), acks.AckTimeout())
    relay.script("b2", acks.RateLimited(retry_after_s=12.0))
    relay.script("a6", acks.RateLimited(), acks.RateLimited(), acks.RateLimited())
    return relay


def _run(store: Store, restart: Callable[[], Store] | None, steps: int = 45) -> tuple[Any, ...]:
    relay, clock = _scripted_relay(), FakeClock()
    harness = EngineHarness(_engine(store), relay, clock)
    restarts = 0
    for step in range(steps):
        _poke(harness.engine, relay, clock.now, step)
        harness.step()
        if restart is not None and not harness.engine.in_flight():
            store = restart()
            harness = EngineHarness(_engine(store), relay, clock)
            restarts += 1
    engine = harness.engine
    state = engine.debug_state()
    sent = [(s.batch.id, s.batch.lane, s.batch.session_ids, s.at) for s in relay.sent]
    # A call that changes nothing saves nothing, so compare the saved clocks.
    return sent, state["sessions"], state["link"], state["stamps"], store.now(), restarts  # type: ignore[attr-defined]


def test_an_engine_restarted_after_every_step_continues_as_if_nothing_happened(
    open_store: OpenStore,
) -> None:
    """Restarted between any two steps, the engine sends the same batches in the same
    order and ends in the same state, history included, as one that never stopped."""
    reference = MemoryStore(history_retention=None)
    want = _run(reference, restart=None)
    got = _run(open_store(), restart=open_store)
    assert got[5] > 30  # it really was restarted, over and over
    assert got[:5] == want[:5]
    store = open_store()
    for sid in want[1]:
        assert store.history(sid) == reference.history(sid)  # type: ignore[attr-defined]
    # The scenario reached every interesting place.
    assert {rec["state"] for rec in want[1].values()} == {"synced", "dead_lettered"}
    assert any(len(s[2]) == 3 for s in want[0])


def test_in_flight_batches_are_sent_again_first_with_counters_intact(
    open_store: OpenStore,
) -> None:
    """Sessions in flight when the process died go back to the head of the queue,
    keep their counts and attempts, and are sent again (at-least-once)."""
    engine = _engine(open_store(), FAST)
    for sid in ("s1", "s2", "s3", "s4"):
        engine.enqueue(sid, now=0.0)
    b1, b2 = engine.tick(0.0)
    assert (b1.session_ids, b2.session_ids) == (("s1", "s2", "s3"), ("s4",))
    engine.on_ack(b1.id, {"s1": acks.AckTimeout(), "s2": acks.Ok(), "s3": acks.Ok()}, now=1.0)
    engine.enqueue("s5", now=2.0)
    (b3,) = engine.tick(31.0)  # s5; s1, charged once, waits to be sent alone (blame)
    assert b3.session_ids == ("s5",)
    assert engine.session("s1").attempts == 1

    store = open_store()
    restarted = _engine(store, FAST)
    assert restarted.sessions_by_state()[QUEUED] == 3
    s1 = restarted.session("s1")
    assert (s1.state, s1.attempts, s1.charges) == (QUEUED, 1, {"AckTimeout": 1})
    assert _history_events(store, "s1")[-1] == ("elapsed", BACKOFF, QUEUED)
    assert _history_events(store, "s5")[-1] == ("recovered", IN_FLIGHT, QUEUED)
    assert _queues(restarted)[Lane.INCREMENTAL] == ["s4", "s5", "s1"]
    again, alone = restarted.tick(32.0)  # s1, charged, still goes alone
    assert (again.session_ids, alone.session_ids) == (("s4", "s5"), ("s1",))
    assert again.id == b3.id + 1  # batch ids are never reused
    # The old batch's ack is for a batch this engine never sent: ignored.
    assert restarted.on_ack(b2.id, acks.Ok(), now=33.0) == []
    assert restarted.anomalies == {"unknown_batch": 1}
    assert restarted.state("s4") is IN_FLIGHT


def test_dead_letters_stay_dead_across_a_restart(open_store: OpenStore) -> None:
    """A dead letter is still dead after a restart, with its reason, time and attempts,
    is not sent, and a new enqueue does not revive it."""
    engine = _engine(open_store(), FAST)
    engine.enqueue("s1", now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.PayloadTooLarge(), now=1.0)
    restarted = _engine(open_store(), FAST)
    view = restarted.session("s1")
    assert (view.state, view.dead_letter_reason, view.dead_lettered_at, view.attempts) == (
        DEAD,
        "PayloadTooLarge",
        1.0,
        1,
    )
    restarted.enqueue("s1", now=2.0)
    assert restarted.tick(3.0) == []
    assert restarted.state("s1") is DEAD


def test_dead_letters_keep_their_order_across_a_restart(open_store: OpenStore) -> None:
    """Dead letters come back oldest first, so a limited redrive takes the oldest."""
    engine = _engine(open_store(), FAST)
    for i, sid in enumerate(("late", "early", "middle")):
        engine.enqueue(sid, now=float(i))
    order = ("early", "middle", "late")
    for i, sid in enumerate(order):
        (batch,) = engine.tick(10.0 + i)
        engine.on_ack(batch.id, {s: acks.Ok() for s in batch.session_ids if s != sid}, 10.0 + i)
        engine.on_ack(batch.id, {sid: acks.PayloadTooLarge()}, 10.5 + i)
        for other in ("late", "early", "middle"):
            if engine.state(other) is SYNCED:
                engine.enqueue(other, now=10.5 + i)
    assert [v.id for v in engine.dead_letters()] == list(order)
    restarted = _engine(open_store(), FAST)
    assert [v.id for v in restarted.dead_letters()] == list(order)
    assert restarted.redrive_all(20.0, limit=1) == ["early"]


def test_a_backoff_survives_a_restart_and_is_not_sent_early(open_store: OpenStore) -> None:
    """A retry time survives a restart and still holds the session back until then."""
    engine = _engine(open_store(), FAST)
    engine.enqueue("s1", now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.RateLimited(retry_after_s=20.0), now=1.0)
    restarted = _engine(open_store(), FAST)
    assert restarted.session("s1").retry_at == 21.0
    assert restarted.tick(20.9) == []
    assert restarted.tick(21.0)[0].session_ids == ("s1",)


def _save_snapshot(store: Store, records: list[SessionRecord], now: float) -> None:
    """Write records into a store as an engine would, one enqueue change each."""
    store.save(
        Delta(
            sessions=records,
            changes=[
                Change(r.id, None, r.state, "enqueued", None, now, r.attempts) for r in records
            ],
            link=LinkRecord(),
            stamps={},
            next_batch_id=1,
            now=now,
        )
    )


def test_recovery_caps_a_retry_time_from_a_clock_jump(open_store: OpenStore) -> None:
    """A saved retry time further out than max_backoff_s past the saved clock is
    capped to it; one within reach is kept."""
    store = open_store()
    far = SessionRecord("far", BACKOFF, counts=(1, 0, 0), retry_at=1e12, attempts=1)
    near = SessionRecord("near", BACKOFF, counts=(0, 1, 0), retry_at=1_050.0, attempts=1)
    _save_snapshot(store, [far, near], now=1_000.0)
    engine = _engine(open_store(), FAST)
    assert engine.session("far").retry_at == 1_000.0 + FAST.max_backoff_s
    assert engine.session("near").retry_at == 1_050.0
    assert engine.next_wakeup() == 1_050.0


def test_the_clock_resumes_from_the_saved_one(open_store: OpenStore) -> None:
    """A restarted engine's clock is the saved one; an earlier time is clamped and counted."""
    engine = _engine(open_store(), FAST)
    engine.enqueue("s1", now=1_700_000_000.0)
    restarted = _engine(open_store(), FAST)
    assert restarted.now == 1_700_000_000.0
    restarted.tick(5.0)  # a runner that passed time.monotonic() by mistake
    assert restarted.now == 1_700_000_000.0
    assert restarted.anomalies == {"clock_regressed": 1}


def test_the_link_and_lane_throttles_survive_a_restart(open_store: OpenStore) -> None:
    """A paused link stays paused until its resume time, and a lane that just sent
    waits out its interval, across a restart."""
    engine = _engine(open_store())  # incremental batches at least 10 s apart
    engine.enqueue("s1", now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.Ok(), now=1.0)
    engine.relay_unavailable(now=2.0)
    engine.relay_unavailable(now=2.0)
    engine.enqueue("s2", now=3.0)
    link = engine.link
    assert (link.state, link.failures, link.resume_at) == (LinkState.PAUSED, 2, 4.0)
    restarted = _engine(open_store())
    assert restarted.link == link
    assert restarted.tick(3.5) == []  # paused
    assert restarted.tick(9.9) == []  # resumed at 4, but the lane sent at 0
    assert restarted.tick(10.0)[0].session_ids == ("s2",)


def test_bounced_sessions_keep_their_place_at_the_head_across_a_restart(
    open_store: OpenStore,
) -> None:
    """Sessions a relay flap sent back wait at the head of their lane, in batch
    order, ahead of later arrivals, after a restart too."""
    engine = _engine(open_store(), FAST)
    for sid in ("s1", "s2", "s3", "s4", "s5"):
        engine.enqueue(sid, now=0.0)
    (batch, _) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.RelayUnavailable(), now=1.0)
    engine.enqueue("s6", now=1.0)
    before = _queues(engine)
    assert before[Lane.INCREMENTAL][:3] == ["s1", "s2", "s3"]
    restarted = _engine(open_store(), FAST)
    in_flight_before = ["s4", "s5"]  # the second batch was still open
    assert _queues(restarted)[Lane.INCREMENTAL] == in_flight_before + before[Lane.INCREMENTAL]


def test_a_promoted_session_moves_to_the_tail_of_the_incremental_lane(
    open_store: OpenStore,
) -> None:
    """A backfill session enqueued as incremental waits at the incremental tail,
    after a restart too."""
    engine = _engine(open_store(), FAST)
    engine.enqueue("i1", now=0.0)
    engine.enqueue("b1", lane="backfill", now=0.0)
    engine.enqueue("b2", lane="backfill", now=0.0)
    engine.enqueue("i2", now=0.0)
    engine.enqueue("b1", lane="incremental", now=1.0)
    want = {Lane.INCREMENTAL: ["i1", "i2", "b1"], Lane.BACKFILL: ["b2"]}
    assert _queues(engine) == want
    assert _queues(_engine(open_store(), FAST)) == want


# ---------------------------------------------------------------------------
# History
# ---------------------------------------------------------------------------


def test_history_rows_name_the_state_each_transition_reached(open_store: OpenStore) -> None:
    """Redriven and sent again in one tick, a session's history shows each step
    with its own target and attempt count, not where the tick left it."""
    store = open_store()
    engine = _engine(store, FAST)
    engine.enqueue("s1", now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.PayloadTooLarge(), now=1.0)
    engine.schedule_redrive(per_tick=5)
    (again,) = engine.tick(2.0)
    assert again.session_ids == ("s1",)
    rows = store.history("s1")  # type: ignore[attr-defined]
    assert [(c.event, c.source, c.target, c.attempt, c.reason, c.at) for c in rows] == [
        ("enqueued", None, QUEUED, 0, None, 0.0),
        ("sent", QUEUED, IN_FLIGHT, 1, None, 0.0),
        ("rejected", IN_FLIGHT, DEAD, 1, "PayloadTooLarge", 1.0),
        ("redriven", DEAD, QUEUED, 0, None, 2.0),
        ("sent", QUEUED, IN_FLIGHT, 1, None, 2.0),
    ]
    assert store.history("s1", limit=2) == rows[-2:]  # type: ignore[attr-defined]
    assert store.history("nobody") == []  # type: ignore[attr-defined]


def _retention_store(kind: str, path: Path, retention: HistoryRetention | None) -> Any:
    if kind == "memory":
        return MemoryStore(history_retention=retention)
    return SqliteStore(path, history_retention=retention)


def _churn(engine: Engine, sessions: int, rounds: int, start: float = 0.0) -> float:
    """Sync ``sessions`` sessions ``rounds`` times; return the time reached."""
    now = start
    for _ in range(rounds):
        for i in range(sessions):
            engine.enqueue(f"s{i}", now=now)
        while not engine.idle():
            now += 1.0
            for batch in engine.tick(now):
                engine.on_ack(batch.id, acks.Ok(), now=now)
    return now


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_history_keeps_at_most_max_rows_newest_first(kind: str, db_path: Path) -> None:
    """With max_rows, the oldest rows go: pruned in chunks, never more than a
    chunk over the cap, and the newest rows always kept."""
    retention = HistoryRetention(max_age_s=None, max_rows=100)
    assert retention.prune_every == 10
    store = _retention_store(kind, db_path, retention)
    engine = _engine(store, FAST)
    ids = [f"s{i}" for i in range(4)]
    peak = 0
    for round_ in range(30):
        _churn(engine, 4, 1, start=engine.now)
        peak = max(peak, _all_history(store, ids))
        assert round_ < 8 or _all_history(store, ids) >= 100 - 12
    assert peak <= 100 + 10 + 12  # a chunk, plus the largest single call
    for sid in ids:
        assert _history_events(store, sid)[-1] == ("acked", IN_FLIGHT, SYNCED)
    store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_history_drops_rows_older_than_max_age(kind: str, db_path: Path) -> None:
    """With max_age_s, pruning keeps exactly the rows at most that old (engine
    clock), and a session's own record is never pruned."""
    store = _retention_store(kind, db_path, HistoryRetention(max_age_s=10.0, max_rows=None))
    engine = _engine(store, FAST)
    engine.enqueue("dead", now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.PayloadTooLarge(), now=0.0)
    now = _churn(engine, 3, 40, start=1.0)
    assert now > 30
    store.prune()
    for sid in ("s0", "s1", "s2"):
        rows = store.history(sid)
        assert rows, sid
        assert all(c.at >= now - 10.0 for c in rows)
    assert store.history("dead") == []
    view = store.session("dead")
    assert (view.state, view.dead_letter_reason, view.attempts) == (DEAD, "PayloadTooLarge", 1)
    store.close()


def test_history_retention_none_keeps_every_row(db_path: Path) -> None:
    """history_retention=None keeps the whole history."""
    with SqliteStore(db_path, history_retention=None) as store:
        engine = _engine(store, FAST)
        _churn(engine, 2, 50)
        assert store.prune() == 0
        assert len(store.history("s0")) == 50 * 3  # enqueued or changed, sent, acked


def test_sqlite_prunes_when_it_is_opened(db_path: Path) -> None:
    """Reopening with a tighter retention prunes at once, not on the next save."""
    with SqliteStore(db_path, history_retention=None) as store:
        _churn(_engine(store, FAST), 2, 20)
    with SqliteStore(db_path, history_retention=HistoryRetention(max_rows=5)) as store:
        assert _all_history(store, ["s0", "s1"]) == 5


@pytest.mark.parametrize(
    "kw",
    [{"max_rows": -1}, {"max_rows": 1.5}, {"max_age_s": -1.0}, {"max_age_s": math.nan}],
)
def test_a_bad_retention_is_refused(kw: dict[str, Any]) -> None:
    """A negative or non-numeric retention limit raises UsageError naming it."""
    with pytest.raises(UsageError, match=next(iter(kw))):
        HistoryRetention(**kw)


def test_the_default_retention_is_thirty_days_and_a_million_rows() -> None:
    """The documented default retention."""
    assert HistoryRetention() == HistoryRetention(max_age_s=30 * 86_400.0, max_rows=1_000_000)


# ---------------------------------------------------------------------------
# Redrive
# ---------------------------------------------------------------------------


def _dead_letters(engine: Engine, reasons: dict[str, acks.Ack], now: float = 0.0) -> None:
    for sid in reasons:
        engine.enqueue(sid, now=now)
    while engine.sessions_by_state()[QUEUED] or engine.in_flight():
        for batch in engine.tick(now):
            engine.on_ack(batch.id, {s: reasons[s] for s in batch.session_ids}, now=now)
    assert engine.sessions_by_state()[DEAD] == len(reasons)


def test_redriving_one_session_clears_its_counters_and_is_saved(open_store: OpenStore) -> None:
    """A redriven dead letter is queued with attempts, reason and time cleared,
    and the store says so after a restart."""
    store = open_store()
    engine = _engine(store, FAST)
    _dead_letters(engine, {"s1": acks.PayloadTooLarge()}, now=5.0)
    engine.redrive("s1", now=6.0)
    store = open_store()
    restarted = _engine(store, FAST)
    view = restarted.session("s1")
    assert (view.state, view.attempts, view.charges) == (QUEUED, 0, {})
    assert (view.dead_letter_reason, view.dead_lettered_at) == (None, None)
    assert _history_events(store, "s1")[-1] == ("redriven", DEAD, QUEUED)


def test_redriving_by_reason_leaves_the_other_dead_letters(open_store: OpenStore) -> None:
    """redrive_all(reason=...) redrives only that reason's dead letters, durably."""
    engine = _engine(open_store(), FAST)
    _dead_letters(
        engine,
        {
            "big1": acks.PayloadTooLarge(),
            "slow": acks.PayloadTooLarge(),
            "big2": acks.PayloadTooLarge(),
        },
    )
    # Make "slow" a timeout dead letter instead.
    engine.redrive("slow", now=1.0)
    for _ in range(3):
        (batch,) = engine.tick(engine.now + 31.0)
        engine.on_ack(batch.id, acks.AckTimeout(), now=engine.now)
    assert engine.session("slow").dead_letter_reason == "AckTimeout"
    assert engine.redrive_all(200.0, reason="PayloadTooLarge") == ["big1", "big2"]
    restarted = _engine(open_store(), FAST)
    assert [v.id for v in restarted.dead_letters()] == ["slow"]
    assert restarted.sessions_by_state()[QUEUED] == 2


def test_a_paced_redrive_redrives_at_most_per_tick_each_tick_interval(
    open_store: OpenStore,
) -> None:
    """schedule_redrive(per_tick=2) redrives oldest first, two per tick interval,
    never more however often the runner ticks."""
    engine = _engine(open_store(), FAST)
    ids = [f"s{i}" for i in range(5)]
    _dead_letters(engine, dict.fromkeys(ids, acks.PayloadTooLarge()))
    assert engine.schedule_redrive(per_tick=2) == 5
    assert engine.redrive_backlog == 5
    assert not engine.idle()
    assert engine.next_wakeup() == engine.now
    revived: list[list[str]] = []
    for now in (10.0, 11.0, 14.9, 15.0, 20.0, 25.0):
        before = {v.id for v in engine.dead_letters()}
        engine.tick(now)
        revived.append(sorted(before - {v.id for v in engine.dead_letters()}))
    assert revived == [["s0", "s1"], [], [], ["s2", "s3"], ["s4"], []]
    assert engine.redrive_backlog == 0


def test_a_paced_redrive_waits_while_the_link_is_paused(open_store: OpenStore) -> None:
    """No session is redriven while the relay is reported unavailable."""
    engine = _engine(open_store(), FAST)
    _dead_letters(engine, {"s1": acks.PayloadTooLarge(), "s2": acks.PayloadTooLarge()})
    engine.schedule_redrive(per_tick=1)
    engine.relay_unavailable(now=1.0)
    engine.tick(1.5)
    assert engine.sessions_by_state()[DEAD] == 2
    engine.relay_ready(now=2.0)
    engine.tick(2.0)
    assert engine.sessions_by_state()[DEAD] == 1


def test_a_paced_redrive_is_not_persisted(open_store: OpenStore) -> None:
    """After a restart the rest of a paced redrive stay dead until scheduled again;
    what was redriven before the restart stays redriven."""
    engine = _engine(open_store(), FAST)
    _dead_letters(engine, dict.fromkeys(("s1", "s2", "s3"), acks.PayloadTooLarge()))
    engine.schedule_redrive(per_tick=1)
    engine.tick(10.0)
    restarted = _engine(open_store(), FAST)
    assert restarted.redrive_backlog == 0
    assert [v.id for v in restarted.dead_letters()] == ["s2", "s3"]
    restarted.tick(100.0)
    assert restarted.sessions_by_state()[DEAD] == 2


def test_a_paced_redrive_skips_what_was_redriven_by_hand_and_can_be_cancelled(
    engine: Engine,
) -> None:
    """A dead letter redriven by hand is not redriven twice; cancel_redrive drops the rest."""
    _dead_letters(engine, dict.fromkeys(("s1", "s2", "s3"), acks.PayloadTooLarge()))
    assert engine.schedule_redrive(per_tick=1, reason="PayloadTooLarge") == 3
    assert engine.schedule_redrive(per_tick=1) == 0  # already scheduled
    engine.redrive("s1", now=1.0)
    engine.tick(2.0)  # pops s1 (no longer dead) and redrives s2
    assert [v.id for v in engine.dead_letters()] == ["s3"]
    assert engine.cancel_redrive() == 1
    engine.tick(100.0)
    assert [v.id for v in engine.dead_letters()] == ["s3"]
    assert engine.idle() is False  # s1 and s2 are queued or in flight, not at rest


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"per_tick": 0}, "per_tick"),
        ({"per_tick": True}, "per_tick"),
        ({"per_tick": 1, "reason": "Ok"}, "reason"),
    ],
)
def test_a_bad_paced_redrive_is_refused(engine: Engine, kw: dict[str, Any], match: str) -> None:
    """A per_tick below 1 or an uncharged reason raises UsageError."""
    with pytest.raises(UsageError, match=match):
        engine.schedule_redrive(**kw)


# ---------------------------------------------------------------------------
# Read helpers
# ---------------------------------------------------------------------------


def test_the_read_helpers_need_no_engine(db_path: Path) -> None:
    """A read-only store opened beside a running engine reports what it saved:
    counts, dead letters by reason, one session, history, link and clock."""
    with SqliteStore(db_path) as store:
        engine = _engine(store, FAST)
        _dead_letters(engine, {"big": acks.PayloadTooLarge()})
        engine.enqueue("fresh", now=2.0)
        engine.relay_unavailable(now=3.0)
        with SqliteStore(db_path, readonly=True) as reader:
            assert reader.sessions_by_state() == engine.sessions_by_state()
            assert reader.dead_letters() == engine.dead_letters()
            assert reader.dead_letters(reason="PayloadTooLarge") == engine.dead_letters()
            assert reader.dead_letters(reason="AckTimeout") == []
            assert reader.session("big") == engine.session("big")
            assert reader.link() == engine.link
            assert reader.now() == engine.now == 3.0
            assert [c.event for c in reader.history("fresh")] == ["enqueued"]
            with pytest.raises(UnknownSession, match="nobody"):
                reader.session("nobody")
            with pytest.raises(StoreError, match="read-only"):
                reader.save(
                    Delta(
                        sessions=[],
                        changes=[],
                        link=LinkRecord(),
                        stamps={},
                        next_batch_id=1,
                        now=4.0,
                    )
                )


def test_the_memory_store_has_the_same_read_helpers() -> None:
    """MemoryStore answers the read helpers from its copies."""
    store = MemoryStore()
    engine = _engine(store, FAST)
    _dead_letters(engine, {"big": acks.PayloadTooLarge()})
    assert store.sessions_by_state() == engine.sessions_by_state()
    assert store.dead_letters("PayloadTooLarge") == engine.dead_letters()
    assert store.session("big") == engine.session("big")
    assert store.link() == engine.link
    assert store.now() == engine.now
    with pytest.raises(UnknownSession):
        store.session("nobody")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load()


def test_a_memory_store_holds_copies_not_the_engines_records() -> None:
    """What a MemoryStore saved does not change when the engine moves on."""
    store = MemoryStore()
    engine = _engine(store, FAST)
    engine.enqueue("s1", now=0.0)
    engine.tick(0.0)
    assert store.session("s1").state is IN_FLIGHT
    snapshot = store.load()
    assert snapshot is not None
    snapshot.sessions[0].state = SYNCED
    assert store.session("s1").state is IN_FLIGHT


# ---------------------------------------------------------------------------
# The SQLite file, and bad and hostile input
# ---------------------------------------------------------------------------


def test_the_file_is_marked_as_sessionfsm_and_kept_in_wal_mode(db_path: Path) -> None:
    """A new database carries sessionfsm's application id and schema version and uses WAL."""
    with SqliteStore(db_path) as store:
        _engine(store).enqueue("s1", now=0.0)
    header = db_path.read_bytes()[:100]
    assert header[:16] == b"SQLite format 3\x00"
    assert (header[18], header[19]) == (2, 2)  # WAL
    assert int.from_bytes(header[60:64], "big") == sqlite_store_module.SCHEMA_VERSION
    assert int.from_bytes(header[68:72], "big") == sqlite_store_module.APPLICATION_ID


def test_a_missing_directory_is_refused_and_not_created(tmp_path: Path) -> None:
    """A path in a directory that does not exist raises StoreError naming both."""
    path = tmp_path / "nowhere" / "sessions.db"
    with pytest.raises(
        StoreError, match=r"nowhere/sessions\.db.*directory .*nowhere.* does not exist"
    ):
        SqliteStore(path)
    assert not path.parent.exists()


def test_a_directory_is_not_a_store(tmp_path: Path) -> None:
    """A path that is a directory raises NotAStore."""
    with pytest.raises(NotAStore, match="not a regular file"):
        SqliteStore(tmp_path)


def _unchanged(path: Path) -> Callable[[], None]:
    """Snapshot a file's bytes; the returned check asserts they are the same."""
    before = path.read_bytes()

    def check() -> None:
        assert path.read_bytes() == before

    return check


def test_a_read_only_file_is_refused_for_writing_but_can_be_inspected(db_path: Path) -> None:
    """A database file without write permission raises StoreReadOnly (even for
    root) and is left as it is; readonly=True still reads it."""
    with SqliteStore(db_path) as store:
        _engine(store).enqueue("s1", now=0.0)
    db_path.chmod(0o444)
    check = _unchanged(db_path)
    with pytest.raises(StoreReadOnly, match=r"sessions\.db.*read-only"):
        SqliteStore(db_path)
    check()
    with SqliteStore(db_path, readonly=True) as reader:
        assert reader.sessions_by_state()[QUEUED] == 1
    check()


def test_a_text_file_is_not_a_store_and_is_left_alone(tmp_path: Path) -> None:
    """A file that is not SQLite raises NotAStore; not a byte changes, no file is added."""
    path = tmp_path / "notes.txt"
    path.write_text("remember the milk\n" * 100)
    check = _unchanged(path)
    with pytest.raises(NotAStore, match=r"notes\.txt.*not a SQLite database"):
        SqliteStore(path)
    check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_another_applications_sqlite_database_is_left_alone(tmp_path: Path) -> None:
    """Another application's SQLite file raises NotAStore naming its tables; unchanged."""
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ada')")
        conn.commit()
    check = _unchanged(path)
    with pytest.raises(NotAStore, match=r"another application's SQLite database.*users"):
        SqliteStore(path)
    with pytest.raises(NotAStore):
        SqliteStore(path, readonly=True)
    check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_a_newer_schema_version_is_refused(db_path: Path) -> None:
    """A database written by a newer sessionfsm raises StoreTooNew and is not touched."""
    with SqliteStore(db_path) as store:
        _engine(store).enqueue("s1", now=0.0)
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
    check = _unchanged(db_path)
    with pytest.raises(StoreTooNew, match=r"sessions\.db.*schema version is 99"):
        SqliteStore(db_path)
    with pytest.raises(StoreTooNew):
        SqliteStore(db_path, readonly=True)
    check()


def test_an_empty_file_becomes_a_new_store(db_path: Path) -> None:
    """A zero-byte file holds nothing to lose: it is set up as a new database."""
    db_path.touch()
    with SqliteStore(db_path) as store:
        assert store.load() is None
        _engine(store).enqueue("s1", now=0.0)
    with SqliteStore(db_path) as store:
        assert store.sessions_by_state()[QUEUED] == 1


def test_read_only_mode_never_creates_a_file(db_path: Path) -> None:
    """readonly=True on a path that does not exist raises StoreError and creates nothing."""
    with pytest.raises(StoreError, match="does not exist"):
        SqliteStore(db_path, readonly=True)
    assert not db_path.exists()


def test_a_second_writable_store_on_one_file_is_refused(db_path: Path) -> None:
    """Two engines writing one file would diverge, so the second store raises
    StoreLocked naming the holder's pid; the first keeps working."""
    with SqliteStore(db_path) as first:
        engine = _engine(first)
        with pytest.raises(
            StoreLocked, match=rf"another store holds it .*pid {__import__('os').getpid()}"
        ):
            SqliteStore(db_path)
        engine.enqueue("s1", now=0.0)
    with SqliteStore(db_path) as again:  # closing released it
        assert again.sessions_by_state()[QUEUED] == 1


_HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def _locked_by_another_process(path: Path) -> Iterator[None]:
    """Another process holds the database's write lock until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "locked\n"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=10)


def test_a_database_locked_by_another_process_is_refused(db_path: Path) -> None:
    """While another process holds the write lock, opening raises StoreLocked
    after the timeout, naming the path; nothing is written."""
    with SqliteStore(db_path) as store:
        _engine(store).enqueue("s1", now=0.0)
    check = _unchanged(db_path)
    with (
        _locked_by_another_process(db_path),
        pytest.raises(StoreLocked, match=r"sessions\.db.*locked by another process"),
    ):
        SqliteStore(db_path, timeout=0.05)
    check()
    with SqliteStore(db_path) as store:
        assert store.sessions_by_state()[QUEUED] == 1


def test_a_save_that_fails_on_a_lock_is_caught_up_by_the_next(db_path: Path) -> None:
    """A save refused because another process holds the lock raises StoreLocked
    and writes nothing; the engine's next call saves both changes."""
    with SqliteStore(db_path, timeout=0.05) as store:
        engine = _engine(store)
        engine.enqueue("s1", now=0.0)
        with _locked_by_another_process(db_path):
            with pytest.raises(StoreLocked, match="locked by another process"):
                engine.enqueue("s2", now=1.0)
            assert store.sessions_by_state()[QUEUED] == 1
        engine.enqueue("s3", now=2.0)
        assert store.sessions_by_state()[QUEUED] == 3
        assert [c.event for c in store.history("s2")] == ["enqueued"]
    with SqliteStore(db_path) as store:
        assert _engine(store).sessions_by_state()[QUEUED] == 3


def test_a_save_that_fails_halfway_is_rolled_back(db_path: Path) -> None:
    """A save that fails after writing some rows raises StoreError and leaves
    the database exactly as before; the store keeps working."""
    with SqliteStore(db_path) as store:
        engine = _engine(store, FAST)
        engine.enqueue("s1", now=0.0)
        before = store.load()
        rec = SessionRecord("s2")
        bad = Change("s2", None, QUEUED, "enqueued", None, object(), 0)  # type: ignore[arg-type]
        with pytest.raises(StoreError, match=r"cannot save to store .*sessions\.db"):
            store.save(Delta([rec], [bad], LinkRecord(), {}, 5, 9.0))
        assert store.load() == before
        engine.enqueue("s3", now=1.0)
        assert store.sessions_by_state()[QUEUED] == 2


def test_a_closed_store_refuses_every_call(db_path: Path) -> None:
    """After close, load, save and the read helpers raise StoreError."""
    store = SqliteStore(db_path)
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError, match="closed"):
        store.load()
    with pytest.raises(StoreError, match="closed"):
        store.sessions_by_state()
    with pytest.raises(StoreError, match="closed"):
        _engine(store)


@pytest.mark.parametrize(
    ("kw", "match"), [({"synchronous": "off"}, "synchronous"), ({"timeout": -1}, "timeout")]
)
def test_bad_store_options_are_refused(db_path: Path, kw: dict[str, Any], match: str) -> None:
    """An unknown synchronous mode or a negative timeout raises UsageError."""
    with pytest.raises(UsageError, match=match):
        SqliteStore(db_path, **kw)
    assert not db_path.exists()


def test_full_synchronous_mode_round_trips(db_path: Path) -> None:
    """synchronous="full" stores and reloads like the default."""
    with SqliteStore(db_path, synchronous="full") as store:
        _engine(store).enqueue("s1", now=0.0)
    with SqliteStore(db_path) as store:
        assert store.session("s1").state is QUEUED


def test_an_older_schema_is_migrated_in_place(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a database of an older schema applies the missing migrations in
    order and keeps the data; the file then has the new version."""
    with SqliteStore(db_path) as store:
        _engine(store).enqueue("s1", now=0.0)
    v2 = (*sqlite_store_module._MIGRATIONS.values(), ("CREATE TABLE note (text TEXT)",))
    monkeypatch.setattr(sqlite_store_module, "_MIGRATIONS", dict(enumerate(v2, start=1)))
    monkeypatch.setattr(sqlite_store_module, "SCHEMA_VERSION", 2)
    with pytest.raises(StoreError, match="needs a migration"):
        SqliteStore(db_path, readonly=True)
    with SqliteStore(db_path) as store:
        assert store.session("s1").state is QUEUED
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM note").fetchone() == (0,)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


def _apply(engine: Engine, op: tuple[Any, ...], now: float) -> list[int]:
    """Run one operation; return the ids of any batches it formed."""
    kind = op[0]
    with contextlib.suppress(SessionFSMError):
        if kind == "enqueue":
            engine.enqueue(op[1], lane=op[2], now=now)
        elif kind in ("tick", "clock_back"):
            return [b.id for b in engine.tick(now - op[1] if kind == "clock_back" else now)]
        elif kind in ("ack", "ack_each"):
            batches = engine.in_flight()
            batch_id = batches[op[1] % len(batches)].id if batches else 999
            engine.on_ack(batch_id, op[2], now=now)
        elif kind == "redrive":
            engine.redrive(op[1], now=now)
        elif kind == "relay_ready":
            engine.relay_ready(now=now)
        elif kind == "relay_unavailable":
            engine.relay_unavailable(now=now)
    return []


def _expected_after_restart(engine: Engine, saved_now: float | None) -> dict[str, Any]:
    """What a restarted engine must hold: the same, with in-flight sessions queued,
    and the clock of the last call that changed something (the last one saved)."""
    state = engine.debug_state()
    for rec in state["sessions"].values():
        if rec["state"] == "in_flight":
            rec["state"] = "queued"
    return {k: state[k] for k in ("sessions", "link", "stamps")} | {
        "now": 0.0 if saved_now is None else saved_now,
        "dead": [v.id for v in engine.dead_letters()],
    }


def _observed(engine: Engine) -> dict[str, Any]:
    state = engine.debug_state()
    return {k: state[k] for k in ("sessions", "link", "stamps")} | {
        "now": engine.now,
        "dead": [v.id for v in engine.dead_letters()],
    }


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    kind=store_kinds,
    policy=policies,
    ops=st.lists(operations_with_restarts, min_size=1, max_size=60),
)
def test_reopening_a_store_gives_back_the_live_engines_sessions(
    kind: str, policy: Policy, ops: list[tuple[Any, ...]]
) -> None:
    """After any operations, an engine reopened from the store holds the same
    sessions, link, throttles, clock and queue order as the live one, except
    that in-flight sessions wait at the head of their queue; it never reuses a
    batch id, and every invariant holds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sessions.db"
        memory = MemoryStore(history_retention=None)
        stores: list[SqliteStore] = []

        def open_() -> Store:
            if kind == "memory":
                return memory
            for store in stores:
                store.close()
            stores.append(SqliteStore(path, history_retention=None))
            return stores[-1]

        def saved_now(engine: Engine) -> float | None:
            store = memory if kind == "memory" else stores[-1]
            return store.now()

        engine = Engine(policy, store=open_(), rng=random.Random(0), log=False)
        now, highest = 0.0, 0
        try:
            for op in [*ops, ("restart",)]:
                if op[0] == "tick":
                    now += op[1]
                if op[0] != "restart":
                    highest = max([highest, *_apply(engine, op, now)])
                    continue
                want = _expected_after_restart(engine, saved_now(engine))
                flying = {sid for b in engine.in_flight() for sid in b.session_ids}
                queues = _queues(engine)
                event(
                    f"{kind}: restarted with sessions in flight" if flying else f"{kind}: restarted"
                )
                engine = Engine(policy, store=open_(), rng=random.Random(0), log=False)
                assert _observed(engine) == want
                for lane, queue in _queues(engine).items():
                    recovered = [sid for sid in queue if sid in flying]
                    assert queue[: len(recovered)] == recovered
                    assert queue[len(recovered) :] == queues[lane]
                engine.check()
            engine.enqueue("last-one", now=now)
            engine.relay_ready(now=now)
            formed = engine.tick(now + policy.incremental_interval_s + policy.backfill_interval_s)
            assert all(b.id > highest for b in formed)
            engine.check()
        finally:
            for store in stores:
                store.close()


def test_every_transition_reaches_the_store_in_order(open_store: OpenStore) -> None:
    """The history a store keeps is exactly the changes on_ack returned, in order,
    plus the enqueues and sends."""
    store = open_store()
    engine = _engine(store, FAST)
    seen: dict[str, list[Change]] = {}
    rng = random.Random(7)
    choices = [acks.Ok(), acks.RateLimited(), acks.AckTimeout(), acks.RelayUnavailable()]
    for sid in ("s1", "s2", "s3", "s4"):
        engine.enqueue(sid, now=0.0)
    now = 0.0
    for _ in range(40):
        now += 7.0
        for batch in engine.tick(now):
            for change in engine.on_ack(batch.id, rng.choice(choices), now=now):
                seen.setdefault(change.session_id, []).append(change)
        engine.relay_ready(now=now)
    for sid, changes in seen.items():
        acked = [c for c in store.history(sid) if c.event not in ("enqueued", "sent", "elapsed")]  # type: ignore[attr-defined]
        assert [msgspec.to_builtins(c) for c in acked] == [msgspec.to_builtins(c) for c in changes]


def test_docs_durable_state_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding guide's durable-state example leaves its session in the file, closed."""
    guide = (Path(__file__).parent.parent / "docs" / "embedding.md").read_text()
    match = re.search(r"## Durable state\n.*?```python\n(.*?)```", guide, re.S)
    assert match, "the embedding guide lost its durable-state example"
    monkeypatch.chdir(tmp_path)
    exec(compile(match.group(1), "docs/embedding.md", "exec"), {})
    with SqliteStore(tmp_path / "sessions.db", readonly=True) as store:
        assert store.session("s1").state is IN_FLIGHT


# ---------------------------------------------------------------------------
# The reading protocol, and the queue order a Delta carries
# ---------------------------------------------------------------------------


def test_every_store_is_a_store_reader_that_agrees_with_its_engine(
    open_store: OpenStore,
) -> None:
    """Both stores implement StoreReader, and read back what the engine holds."""
    store = open_store()
    assert isinstance(store, StoreReader)
    engine = _engine(store)
    relay = ScriptedRelay()
    relay.always("s2", acks.PayloadTooLarge())
    for sid in ("s1", "s2", "s3"):
        engine.enqueue(sid, now=0.0)
    run_until_idle(engine, relay)
    assert store.sessions_by_state() == engine.sessions_by_state()
    assert store.dead_letters() == engine.dead_letters()
    assert store.dead_letters("RateLimited") == []
    assert store.session("s1") == engine.session("s1")
    assert [c.event for c in store.history("s2")][-1] == "rejected"
    assert store.link() == engine.link
    assert store.now() == engine.now


def test_a_store_writes_down_the_queue_order_it_is_given(open_store: OpenStore) -> None:
    """A store keeps the order a Delta states, without working it out from the changes."""
    store = open_store()
    records = [SessionRecord(sid, SessionState.QUEUED, Lane.INCREMENTAL) for sid in "abc"]
    store.save(
        Delta(
            sessions=records,
            changes=[],  # nothing to derive an order from
            link=LinkRecord(),
            stamps={},
            next_batch_id=1,
            now=1.0,
            queue_front=["c"],
            queue_back=["b", "a"],
        )
    )
    snapshot = store.load()
    assert snapshot is not None
    assert [rec.id for rec in snapshot.sessions] == ["c", "b", "a"]
