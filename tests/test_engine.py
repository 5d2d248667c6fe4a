"""The engine's behaviour through its public API, one behaviour per test."""

from __future__ import annotations

import gc
import math
import pickle
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sessionfsm import (
    Engine,
    Exponential,
    Fixed,
    InvalidAck,
    Lane,
    LinkState,
    MemoryStore,
    Policy,
    ReasonPolicy,
    SessionState,
    TransitionNotAllowed,
    UnknownSession,
    UsageError,
    acks,
)
from sessionfsm.sqlite_store import SqliteStore
from sessionfsm.testing import EngineHarness, ScriptedRelay
from tests.conftest import Cycle

QUEUED, IN_FLIGHT, BACKOFF = SessionState.QUEUED, SessionState.IN_FLIGHT, SessionState.BACKOFF
SYNCED, DEAD = SessionState.SYNCED, SessionState.DEAD_LETTERED


def _snapshot(engine: Engine) -> dict[str, Any]:
    return engine.debug_state()


# --------------------------------------------------------------------------
# The three flaws of the motivating review
# --------------------------------------------------------------------------


def test_flaw1_inv4_relay_flap_never_dead_letters_a_good_session(
    harness: EngineHarness, relay: ScriptedRelay, engine: Engine
) -> None:
    """A relay that is merely unavailable, for far longer than any threshold, charges nobody."""
    harness.enqueue(["s1", "s2"])
    relay.down()
    for _ in range(40):  # 200 s of flapping: 40 ticks, many bounces
        harness.step()
        for sid in ("s1", "s2"):
            view = engine.session(sid)
            assert view.charges == {}
            assert view.state is not DEAD
    bounces = sum(isinstance(s.answer, acks.RelayUnavailable) for s in relay.sent)
    assert bounces > engine.policy.rate_limited.threshold
    relay.up()
    harness.run_until_idle()
    assert engine.state("s1") is SYNCED
    assert engine.state("s2") is SYNCED
    assert engine.dead_letters() == []


def test_flaw2_inv6_backfill_not_starved_while_incremental_all_backed_off(
    engine: Engine, cycle: Cycle
) -> None:
    """With every incremental session backed off, the very next tick sends backfill."""
    slow = Policy(
        max_relay_refusal_s=0.0, rate_limited=ReasonPolicy(threshold=5, backoff=Fixed(120.0))
    )
    engine = Engine(slow, log=False)
    for i in range(3):
        engine.enqueue(f"inc{i}")
    for i in range(50):
        engine.enqueue(f"old{i}", lane=Lane.BACKFILL)
    (first,) = cycle(engine, 0.0, acks.RateLimited(), each=True)
    assert first.lane is Lane.INCREMENTAL
    # The backoff (120 s) is far longer than the incremental interval (30 s):
    # the reviewer's case. Backfill must flow on every tick all the same.
    sent = []
    for t in (5.0, 10.0, 35.0, 40.0, 65.0):
        (batch,) = cycle(engine, t, acks.Ok())
        assert batch.lane is Lane.BACKFILL
        sent.extend(batch.session_ids)
    assert len(sent) == len(set(sent)) == 50
    assert all(engine.state(f"inc{i}") is BACKOFF for i in range(3))


def test_flaw2_inv9_throttle_not_stamped_when_no_batch_formed(cycle: Cycle) -> None:
    """A tick that finds every session backed off does not delay one enqueued after it."""
    slow = Policy(
        max_relay_refusal_s=0.0, rate_limited=ReasonPolicy(threshold=5, backoff=Fixed(120.0))
    )
    engine = Engine(slow, log=False)
    engine.enqueue("s1")
    cycle(engine, 0.0, acks.RateLimited(), each=True)  # a real batch: stamped at 0; s1 waits
    assert engine.tick(40.0) == []  # the interval allows, but nothing is ready
    engine.enqueue("s2")
    (batch,) = engine.tick(41.0)  # stamped at 40 it would wait until 70
    assert batch.session_ids == ("s2",)


def test_inv9_incremental_interval_holds_between_real_batches(engine: Engine, cycle: Cycle) -> None:
    """Two incremental batches are at least incremental_interval_s apart."""
    engine.enqueue("a")
    cycle(engine, 0.0, acks.Ok())
    engine.enqueue("b")
    assert cycle(engine, 29.0) == []
    (batch,) = cycle(engine, 30.0)
    assert batch.session_ids == ("b",)


# --------------------------------------------------------------------------
# Invariants, one behaviour each
# --------------------------------------------------------------------------


def test_inv2_success_resets_every_counter_so_the_count_restarts(
    engine: Engine, cycle: Cycle
) -> None:
    """After an Ok, it takes a full threshold of new failures to dead-letter."""
    engine.enqueue("s1")
    t = 0.0
    for _ in range(4):
        cycle(engine, t, acks.RateLimited())
        t += 31.0
    cycle(engine, t, acks.AckTimeout())
    assert engine.session("s1").charges == {"RateLimited": 4, "AckTimeout": 1}
    t += 31.0
    cycle(engine, t, acks.Ok())
    view = engine.session("s1")
    assert (view.state, view.charges, view.retry_at, view.attempts) == (SYNCED, {}, None, 0)
    engine.enqueue("s1")
    for _ in range(4):
        t += 31.0
        cycle(engine, t, acks.RateLimited())
    assert engine.state("s1") is BACKOFF
    assert engine.session("s1").charges == {"RateLimited": 4}


def test_inv3_dead_letter_clears_every_reason_counter(engine: Engine, cycle: Cycle) -> None:
    """Dead-lettering on one reason leaves no counter of another reason behind."""
    engine.enqueue("s1")
    t = 0.0
    for ack in [acks.AckTimeout(), acks.AckTimeout()] + [acks.RateLimited()] * 5:
        cycle(engine, t, ack)
        t += 31.0
    view = engine.session("s1")
    assert view.state is DEAD
    assert view.charges == {}
    assert view.retry_at is None
    assert view.dead_letter_reason == "RateLimited"
    assert view.attempts == 7
    engine.check()


def test_inv5_no_send_before_retry_time(engine: Engine, cycle: Cycle) -> None:
    """A backed-off session is not sent one instant before its retry time."""
    engine.enqueue("s1")
    cycle(engine, 0.0, acks.RateLimited())
    retry_at = engine.session("s1").retry_at
    assert retry_at == 30.0
    assert engine.tick(math.nextafter(retry_at, 0.0)) == []
    (batch,) = engine.tick(retry_at)
    assert batch.session_ids == ("s1",)


def test_inv6_backed_off_session_never_blocks_the_ones_behind_it(
    engine: Engine, cycle: Cycle
) -> None:
    """Sessions queued behind a backed-off one are sent while it waits."""
    engine = Engine(
        Policy(max_relay_refusal_s=0.0, batch_size=1, incremental_interval_s=0.0), log=False
    )
    for sid in ("head", "a", "b"):
        engine.enqueue(sid)
    cycle(engine, 0.0, acks.RateLimited())  # head backs off for 30 s
    assert cycle(engine, 1.0, acks.Ok())[0].session_ids == ("a",)
    assert cycle(engine, 2.0, acks.Ok())[0].session_ids == ("b",)
    assert cycle(engine, 3.0) == []
    assert cycle(engine, 30.0)[0].session_ids == ("head",)


@pytest.mark.parametrize(
    ("ack", "reason_field"),
    [(acks.RateLimited(), "rate_limited"), (acks.AckTimeout(), "ack_timeout")],
)
def test_inv7_dead_letter_exactly_at_the_threshold(
    engine: Engine, cycle: Cycle, ack: acks.Ack, reason_field: str
) -> None:
    """The threshold-th consecutive failure dead-letters; the one before does not."""
    threshold = getattr(engine.policy, reason_field).threshold
    engine.enqueue("s1")
    t = 0.0
    for n in range(1, threshold + 1):
        cycle(engine, t, ack)
        t += 31.0
        expected = DEAD if n == threshold else BACKOFF
        assert engine.state("s1") is expected, f"after {n} of {threshold}"


def test_inv7_non_retryable_reason_dead_letters_at_once(engine: Engine, cycle: Cycle) -> None:
    """PayloadTooLarge dead-letters on the first ack."""
    engine.enqueue("big")
    cycle(engine, 0.0, acks.PayloadTooLarge(), each=True)
    view = engine.session("big")
    assert (view.state, view.dead_letter_reason, view.dead_lettered_at) == (
        DEAD,
        "PayloadTooLarge",
        0.0,
    )


def test_inv7_reasons_count_separately(engine: Engine, cycle: Cycle) -> None:
    """Four RateLimited and two AckTimeout, interleaved, reach neither threshold."""
    engine.enqueue("s1")
    t = 0.0
    for ack in [acks.RateLimited(), acks.AckTimeout()] * 2 + [acks.RateLimited()] * 2:
        cycle(engine, t, ack)
        t += 31.0
    assert engine.state("s1") is BACKOFF
    assert engine.session("s1").charges == {"RateLimited": 4, "AckTimeout": 2}


def test_inv8_update_made_in_flight_is_never_marked_synced(engine: Engine) -> None:
    """An Ok for a stale payload re-queues the session; the next Ok syncs it."""
    engine = Engine(Policy(max_relay_refusal_s=0.0, incremental_interval_s=0.0), log=False)
    engine.enqueue("s1")
    (batch,) = engine.tick(0.0)
    engine.enqueue("s1")  # changed while in flight
    assert engine.session("s1").dirty
    engine.on_ack(batch.id, acks.Ok(), now=1.0)
    assert engine.state("s1") is QUEUED
    (again,) = engine.tick(2.0)
    assert again.session_ids == ("s1",)
    assert not engine.session("s1").dirty
    engine.on_ack(again.id, acks.Ok(), now=3.0)
    assert engine.state("s1") is SYNCED


def test_inv1_check_passes_after_a_busy_run(
    harness: EngineHarness, relay: ScriptedRelay, engine: Engine
) -> None:
    """After a mixed run every session is in exactly one matching place."""
    harness.enqueue([f"s{i}" for i in range(30)])
    harness.enqueue([f"b{i}" for i in range(30)], lane="backfill")
    relay.always("s3", acks.RateLimited())
    relay.script("s4", acks.AckTimeout(), acks.Ok())
    relay.script("b5", acks.PayloadTooLarge())
    relay.lose_next(2)
    for _ in range(10):
        harness.step()
        engine.check()
    relay.down()
    harness.step()
    engine.check()
    relay.up()
    harness.run_until_idle()
    engine.check()
    assert engine.sessions_by_state()[SYNCED] == 58
    assert {v.id for v in engine.dead_letters()} == {"s3", "b5"}


# --------------------------------------------------------------------------
# Enqueue, lanes, redrive
# --------------------------------------------------------------------------


def test_enqueue_on_synced_requeues_and_on_backoff_keeps_backoff(
    engine: Engine, cycle: Cycle
) -> None:
    """A change re-queues a synced session but does not cut a backoff short."""
    engine.enqueue("done")
    engine.enqueue("waiting")
    cycle(engine, 0.0, {"done": acks.Ok(), "waiting": acks.RateLimited()})
    engine.enqueue("done")
    engine.enqueue("waiting")
    assert engine.state("done") is QUEUED
    view = engine.session("waiting")
    assert (view.state, view.retry_at) == (BACKOFF, 30.0)


def test_enqueue_on_dead_letter_keeps_it_dead_and_says_so(
    logged_engine: Engine, cycle: Cycle, logs: list[dict[str, Any]]
) -> None:
    """A dead letter stays dead on enqueue until an operator redrives it."""
    logged_engine.enqueue("big")
    cycle(logged_engine, 0.0, acks.PayloadTooLarge())
    logged_engine.enqueue("big")
    assert logged_engine.state("big") is DEAD
    assert logged_engine.anomalies["enqueue_dead_lettered"] == 1
    assert any(
        e["event"] == "sessionfsm.enqueue_ignored" and e["session_id"] == "big" for e in logs
    )


def test_backfill_session_promoted_to_incremental_is_sent_once(
    engine: Engine, cycle: Cycle
) -> None:
    """A backfill session that changes locally moves to the incremental lane."""
    engine.enqueue("old", lane="backfill")
    engine.enqueue("other", lane="backfill")
    engine.enqueue("old")  # a live change
    assert engine.session("old").lane is Lane.INCREMENTAL
    (batch,) = cycle(engine, 0.0, acks.Ok())
    assert (batch.lane, batch.session_ids) == (Lane.INCREMENTAL, ("old",))
    (batch,) = cycle(engine, 1.0, acks.Ok())
    assert (batch.lane, batch.session_ids) == (Lane.BACKFILL, ("other",))
    assert cycle(engine, 2.0) == []
    engine.check()


def test_lanes_never_demote(engine: Engine) -> None:
    """Enqueueing an incremental session as backfill keeps it incremental."""
    engine.enqueue("s1")
    engine.enqueue("s1", lane="backfill")
    assert engine.session("s1").lane is Lane.INCREMENTAL


def test_redrive_gives_a_dead_letter_a_clean_slate(engine: Engine, cycle: Cycle) -> None:
    """Redrive re-queues with every counter and the dead-letter record cleared."""
    engine.enqueue("s1")
    t = 0.0
    for _ in range(5):
        cycle(engine, t, acks.RateLimited())
        t += 31.0
    assert engine.state("s1") is DEAD
    engine.redrive("s1", now=t)
    view = engine.session("s1")
    assert (view.state, view.charges, view.attempts, view.dead_letter_reason) == (
        QUEUED,
        {},
        0,
        None,
    )
    (batch,) = engine.tick(t)
    assert batch.session_ids == ("s1",)


def test_redrive_of_a_live_session_is_refused_with_its_state(engine: Engine) -> None:
    """Redriving a session that is not dead-lettered names the session and state."""
    engine.enqueue("s1")
    with pytest.raises(TransitionNotAllowed, match=r"cannot apply redriven to session 's1' in"):
        engine.redrive("s1", now=0.0)
    assert engine.state("s1") is QUEUED


def test_redrive_all_by_reason_and_limit(engine: Engine, cycle: Cycle) -> None:
    """Bulk redrive picks dead letters oldest first, filtered and paced."""
    engine = Engine(Policy(max_relay_refusal_s=0.0, incremental_interval_s=0.0), log=False)
    for sid in ("a", "b", "c"):
        engine.enqueue(sid)
    cycle(engine, 0.0, {"a": acks.PayloadTooLarge(), "b": acks.PayloadTooLarge(), "c": acks.Ok()})
    engine.enqueue("d")
    t = 1.0
    for _ in range(3):
        cycle(engine, t, acks.AckTimeout())
        t += 31.0
    assert [v.id for v in engine.dead_letters()] == ["a", "b", "d"]
    assert engine.redrive_all(t, reason="AckTimeout") == ["d"]
    assert engine.redrive_all(t, limit=1) == ["a"]
    assert [v.id for v in engine.dead_letters()] == ["b"]
    with pytest.raises(UsageError, match="reason must be one of"):
        engine.redrive_all(t, reason="Ok")


# --------------------------------------------------------------------------
# Acks: timeouts, partial, late, duplicate, malformed
# --------------------------------------------------------------------------


def test_engine_times_out_an_unanswered_batch_and_ignores_the_late_ack(
    engine: Engine,
) -> None:
    """No ack by the deadline charges AckTimeout; the ack arriving later is ignored."""
    engine.enqueue("s1")
    (batch,) = engine.tick(0.0)
    assert engine.tick(29.9) == []
    assert engine.state("s1") is IN_FLIGHT
    engine.tick(30.0)
    assert engine.session("s1").charges == {"AckTimeout": 1}
    assert engine.on_ack(batch.id, acks.Ok(), now=31.0) == []
    assert engine.state("s1") is BACKOFF
    assert engine.anomalies == {"late_ack": 1}


def test_inv4_timeout_after_the_link_was_lost_charges_nobody(engine: Engine) -> None:
    """A batch whose ack an outage ate is bounced at its deadline, not charged."""
    engine.enqueue("a")
    engine.enqueue("b")
    (batch,) = engine.tick(0.0)
    engine.relay_unavailable(now=1.0)  # the socket dropped with the batch out
    engine.relay_ready(now=2.0)
    (again,) = engine.tick(30.0)  # bounced at the deadline, then sent again at once
    assert again.session_ids == ("a", "b")
    for sid in ("a", "b"):
        assert engine.session(sid).charges == {}
    assert engine.on_ack(batch.id, acks.Ok(), now=31.0) == []
    assert engine.anomalies == {"late_ack": 1}


def test_partial_ack_leaves_the_rest_in_flight_until_timeout(engine: Engine) -> None:
    """Sessions missing from a per-session ack wait for their own answer."""
    engine.enqueue("a")
    engine.enqueue("b")
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, {"a": acks.Ok()}, now=1.0)
    assert (engine.state("a"), engine.state("b")) == (SYNCED, IN_FLIGHT)
    engine.on_ack(batch.id, {"b": acks.Ok()}, now=2.0)
    assert engine.state("b") is SYNCED
    assert engine.in_flight() == []


def test_duplicate_and_foreign_entries_are_ignored_and_counted(
    logged_engine: Engine, logs: list[dict[str, Any]]
) -> None:
    """Entries for other sessions, repeats, and repeated acks change nothing."""
    engine = logged_engine
    engine.enqueue("a")
    engine.enqueue("b")
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, {"a": acks.Ok(), "stranger": acks.PayloadTooLarge()}, now=1.0)
    engine.on_ack(batch.id, {"a": acks.PayloadTooLarge()}, now=1.0)
    engine.on_ack(batch.id, {"b": acks.Ok()}, now=1.0)
    engine.on_ack(batch.id, acks.PayloadTooLarge(), now=1.0)
    engine.on_ack(999, acks.Ok(), now=1.0)
    assert (engine.state("a"), engine.state("b")) == (SYNCED, SYNCED)
    assert "stranger" not in engine
    assert engine.anomalies == {
        "not_in_batch": 1,
        "duplicate_entry": 1,
        "duplicate_ack": 1,
        "unknown_batch": 1,
    }
    whys = [e.get("why") for e in logs if e["event"].startswith("sessionfsm.ack_")]
    assert whys == ["not_in_batch", "duplicate_entry", "duplicate_ack", "unknown_batch"]


@pytest.mark.parametrize(
    "bad",
    [
        "Ok",
        {"type": "Ok"},
        acks.RateLimited(retry_after_s=-1.0),
        acks.RateLimited(retry_after_s=math.nan),
        {"s1": "Ok"},
        {1: acks.Ok()},
    ],
    ids=["string", "dict", "negative-retry", "nan-retry", "bad-entry", "bad-key"],
)
def test_malformed_ack_raises_invalid_ack_and_changes_nothing(engine: Engine, bad: Any) -> None:
    """A malformed ack is refused whole: no session moves, no counter changes."""
    engine.enqueue("s1")
    (batch,) = engine.tick(0.0)
    before = _snapshot(engine)
    with pytest.raises(InvalidAck):
        engine.on_ack(batch.id, bad, now=1.0)
    assert _snapshot(engine) == before


def test_decoded_wire_message_drives_the_engine(engine: Engine) -> None:
    """JSON from the relay decodes to a BatchAck that on_message applies."""
    engine.enqueue("s1")
    engine.enqueue("s2")
    (batch,) = engine.tick(0.0)
    raw = (
        b'{"batch_id": %d, "sessions": {"s1": {"type": "Ok"},'
        b' "s2": {"type": "RateLimited", "retry_after_s": 3}}}' % batch.id
    )
    engine.on_message(acks.decode_message(raw), now=1.0)
    assert engine.state("s1") is SYNCED
    assert engine.session("s2").retry_at == 4.0


def test_retry_after_is_honoured_and_capped(engine: Engine, cycle: Cycle) -> None:
    """The server's retry_after_s replaces the backoff, capped by the policy."""
    engine.enqueue("a")
    engine.enqueue("b")
    cycle(
        engine,
        0.0,
        {"a": acks.RateLimited(retry_after_s=7.0), "b": acks.RateLimited(retry_after_s=1e9)},
    )
    assert engine.session("a").retry_at == 7.0
    assert engine.session("b").retry_at == engine.policy.rate_limited.retry_after_cap_s


# --------------------------------------------------------------------------
# Time and the link
# --------------------------------------------------------------------------


def test_clock_going_backwards_is_clamped_and_counted(
    logged_engine: Engine, logs: list[dict[str, Any]]
) -> None:
    """A now earlier than the last seen is clamped; no retry fires early."""
    engine = logged_engine
    engine.enqueue("s1")
    (batch,) = engine.tick(100.0)
    engine.on_ack(batch.id, acks.RateLimited(), now=100.0)
    assert engine.tick(50.0) == []
    assert engine.now == 100.0
    assert engine.session("s1").retry_at == 130.0
    assert engine.anomalies == {"clock_regressed": 1}
    assert [e for e in logs if e["event"] == "sessionfsm.clock_regressed"] == [
        {"event": "sessionfsm.clock_regressed", "now": 50.0, "last": 100.0, "log_level": "warning"}
    ]


@pytest.mark.parametrize("now", [math.nan, math.inf, "0", None])
def test_non_finite_now_is_a_usage_error(engine: Engine, now: Any) -> None:
    """Time must be a finite number; anything else is the caller's bug."""
    with pytest.raises(UsageError, match="now must be a finite number"):
        engine.tick(now)


def test_relay_unavailable_pauses_the_link_with_a_growing_capped_pause(
    engine: Engine, cycle: Cycle
) -> None:
    """Each consecutive bounce pauses longer, up to the cap; an answer resets it."""
    engine = Engine(Policy(max_relay_refusal_s=0.0, incremental_interval_s=0.0), log=False)
    engine.enqueue("s1")
    pauses = []
    t = 0.0
    for _ in range(9):
        (batch,) = engine.tick(t)
        engine.on_ack(batch.id, acks.RelayUnavailable(), now=t)
        link = engine.link
        assert link.state is LinkState.PAUSED
        assert link.resume_at is not None
        pauses.append(link.resume_at - t)
        assert engine.tick(link.resume_at - 0.001) == []
        t = link.resume_at
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    cycle(engine, t, acks.Ok())
    assert (engine.link.state, engine.link.failures) == (LinkState.UP, 0)


def test_next_wakeup_while_paused_is_the_end_of_the_pause(engine: Engine) -> None:
    """Ready sessions behind a paused link wake the runner when the pause ends."""
    engine.enqueue("s1")
    engine.relay_unavailable(now=0.0)
    assert engine.next_wakeup() == engine.link.resume_at == 1.0


def test_relay_ready_resumes_at_once(engine: Engine) -> None:
    """The caller's report that the relay is back ends the pause immediately."""
    engine.enqueue("s1")
    engine.relay_unavailable(now=0.0)
    assert engine.tick(0.5) == []
    engine.relay_ready(now=0.6)
    (batch,) = engine.tick(0.6)
    assert batch.session_ids == ("s1",)


def test_bounced_batch_goes_back_to_the_head_of_the_queue(engine: Engine) -> None:
    """Sessions bounced by the transport keep their place ahead of later ones."""
    engine = Engine(Policy(batch_size=2, incremental_interval_s=0.0), log=False)
    for sid in ("a", "b", "c", "d"):
        engine.enqueue(sid)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.RelayUnavailable(), now=0.0)
    engine.relay_ready(now=0.0)
    assert engine.tick(0.0)[0].session_ids == ("a", "b")


def test_max_in_flight_limits_open_batches(engine: Engine) -> None:
    """No new batch is formed while max_in_flight batches await their ack."""
    engine = Engine(Policy(batch_size=1, incremental_interval_s=0.0, max_in_flight=2), log=False)
    for sid in ("a", "b", "c"):
        engine.enqueue(sid)
    assert [b.session_ids for b in engine.tick(0.0)] == [("a",), ("b",)]
    assert engine.tick(1.0) == []
    engine.on_ack(1, acks.Ok(), now=2.0)
    assert [b.session_ids for b in engine.tick(2.0)] == [("c",)]


def test_next_wakeup_names_the_next_useful_tick(engine: Engine, cycle: Cycle) -> None:
    """next_wakeup is the earliest retry, deadline or lane opening; None when idle."""
    assert engine.next_wakeup() is None
    engine.enqueue("s1")
    assert engine.next_wakeup() == 0.0
    (batch,) = engine.tick(0.0)
    assert engine.next_wakeup() == batch.deadline
    engine.on_ack(batch.id, acks.RateLimited(), now=1.0)
    assert engine.next_wakeup() == 31.0
    engine.tick(31.0)
    assert engine.next_wakeup() == 61.0  # the in-flight retry's deadline
    engine.on_ack(2, acks.Ok(), now=32.0)
    assert engine.next_wakeup() is None
    assert engine.idle()


# --------------------------------------------------------------------------
# Lookups, logging, the README
# --------------------------------------------------------------------------


def test_unknown_session_is_a_key_error_naming_it(engine: Engine) -> None:
    """Looking up a session that was never enqueued names it."""
    with pytest.raises(UnknownSession, match="unknown session 'ghost'") as info:
        engine.state("ghost")
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(("sid", "lane"), [("", "incremental"), (7, "incremental"), ("s", "x")])
def test_bad_enqueue_is_a_usage_error(engine: Engine, sid: Any, lane: Any) -> None:
    """Empty or non-string ids and unknown lanes are refused, nothing enqueued."""
    with pytest.raises(UsageError):
        engine.enqueue(sid, lane=lane)
    assert len(engine) == 0


def test_one_info_line_per_deferral_then_quiet_after_dead_letter(
    logged_engine: Engine, cycle: Cycle, logs: list[dict[str, Any]]
) -> None:
    """An oversized session logs once per deferral, once when buried, then nothing."""
    engine = logged_engine
    engine.enqueue("big")
    t = 0.0
    for _ in range(5):
        cycle(engine, t, acks.RateLimited())
        t += 31.0
    for _ in range(20):  # the sync loop keeps ticking
        engine.tick(t)
        t += 5.0
    about_big = [(e["event"], e["log_level"]) for e in logs if e.get("session_id") == "big"]
    assert about_big == [("sessionfsm.deferred", "info")] * 4 + [
        ("sessionfsm.dead_lettered", "warning")
    ]
    assert [e["count"] for e in logs if e["event"] == "sessionfsm.deferred"] == [1, 2, 3, 4]


def test_logging_off_emits_nothing(engine: Engine, cycle: Cycle, logs: list[Any]) -> None:
    """Engine(log=False) never calls structlog."""
    engine.enqueue("s1")
    cycle(engine, 0.0, acks.PayloadTooLarge(), each=True)
    engine.tick(-5.0)
    assert logs == []


def test_views_are_read_only_copies(engine: Engine) -> None:
    """Changing a view cannot change the engine."""
    engine.enqueue("s1")
    view = engine.session("s1")
    with pytest.raises(AttributeError):
        view.state = SYNCED  # type: ignore[misc]
    view.charges["RateLimited"] = 3
    assert engine.session("s1").charges == {}
    assert msgspec.json.decode(msgspec.json.encode(view))["state"] == "queued"


def test_readme_loop_runs_as_written() -> None:
    """The README's example of the loop runs and its assertions hold."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    match = re.search(r"## The loop\n\n```python\n(.*?)```", readme, re.S)
    assert match, "the README lost its loop example"
    exec(compile(match.group(1), "README.md", "exec"), {})


def test_paced_redrive_forgets_a_session_redriven_another_way(engine: Engine, cycle: Cycle) -> None:
    """A session redriven by hand leaves the paced schedule; dying again, it stays dead."""
    engine = Engine(Policy(max_relay_refusal_s=0.0, incremental_interval_s=0.0), log=False)
    engine.enqueue("a")
    engine.enqueue("b")
    cycle(engine, 0.0, acks.PayloadTooLarge(), each=True)
    assert engine.schedule_redrive(per_tick=1) == 2
    engine.redrive("a", now=1.0)
    assert engine.redrive_backlog == 1  # "b" only
    # The tick revives "b" (its turn) and sends both; "a" dies again: a new
    # dead letter that no schedule covers.
    cycle(engine, 1.0, {"a": acks.PayloadTooLarge(), "b": acks.Ok()})
    assert engine.redrive_backlog == 0
    engine.tick(10.0)
    engine.tick(20.0)
    assert engine.state("a") is DEAD
    assert engine.state("b") is SYNCED
    assert engine.idle()
    engine.check()


def test_old_names_still_work_but_warn() -> None:
    """Engine.counts() and SessionView.counts, once in the README, are deprecated aliases."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("s1", now=0.0)
    with pytest.warns(DeprecationWarning, match="sessions_by_state"):
        assert engine.counts() == engine.sessions_by_state()
    view = engine.session("s1")
    with pytest.warns(DeprecationWarning, match="charges"):
        assert view.counts == view.charges == {}
    store = MemoryStore()
    Engine(Policy(), store=store, log=False).enqueue("s2", now=0.0)
    with pytest.warns(DeprecationWarning, match="sessions_by_state"):
        assert store.counts() == store.sessions_by_state()


# ------------------------------------------------ lifecycle and bulk enqueue


def test_engine_close_closes_its_store(tmp_path: Path) -> None:
    """Engine.close() and `with Engine(...)` close the store and release its write lock."""
    path = tmp_path / "s.db"
    with Engine(Policy(), store=SqliteStore(path), log=False) as engine:
        engine.enqueue("a", now=0.0)
        store = engine.store
    assert store is not None
    assert store.closed  # type: ignore[attr-defined]
    second = Engine(Policy(), store=SqliteStore(path), log=False)  # the lock is free
    assert second.state("a") is SessionState.QUEUED
    second.close()
    second.close()  # idempotent


def test_engine_dropped_with_its_store_open_warns_and_frees_the_file(tmp_path: Path) -> None:
    """Dropping the last reference to an engine on an open store warns ResourceWarning."""
    path = tmp_path / "s.db"
    engine = Engine(Policy(), store=SqliteStore(path), log=False)
    engine.enqueue("a", now=0.0)
    with pytest.warns(ResourceWarning, match=r"engine\.close\(\)"):
        del engine  # no reference cycle: it goes at once, like a dropped file
    with SqliteStore(path) as again:  # not StoreLocked
        assert again.session("a").state is SessionState.QUEUED


def test_an_engine_on_a_store_someone_else_holds_does_not_warn(tmp_path: Path) -> None:
    """A store its caller still holds is the caller's to close: dropping the engine is quiet."""
    with SqliteStore(tmp_path / "s.db") as store:
        engine = Engine(Policy(), store=store, log=False)
        engine.enqueue("a", now=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            del engine
            gc.collect()
        assert store.session("a").state is SessionState.QUEUED


def test_enqueue_many_is_one_store_transaction(open_store: Callable[..., Any]) -> None:
    """enqueue_many hands the store one delta holding every session, queued in order."""
    store = open_store()
    saves: list[int] = []
    save = store.save

    def counting(delta: Any) -> None:
        saves.append(len(delta.sessions))
        save(delta)

    store.save = counting  # type: ignore[method-assign]
    engine = Engine(Policy(backfill_batch_size=3), store=store, log=False)
    assert engine.enqueue_many([f"s{i}" for i in range(5)], lane="backfill", now=1.0) == 5
    assert saves == [5]
    assert [b.session_ids for b in engine.tick(1.0)] == [("s0", "s1", "s2")]
    assert engine.session("s4").lane is Lane.BACKFILL
    engine.close()


def test_enqueue_many_changes_nothing_when_one_id_is_bad(engine: Engine) -> None:
    """A bad id anywhere in the list raises UsageError before any session is enqueued."""
    with pytest.raises(UsageError, match="must not be empty"):
        engine.enqueue_many(["a", "b", ""])
    with pytest.raises(UsageError, match="lane must be one of"):
        engine.enqueue_many(["a"], lane="fast")
    with pytest.raises(UsageError, match="iterable of session ids"):
        engine.enqueue_many("abc")
    assert len(engine) == 0


def test_enqueue_many_treats_known_sessions_as_enqueue_does(engine: Engine, cycle: Cycle) -> None:
    """A known session in the list follows `changed`, exactly as with enqueue()."""
    engine.enqueue("a", now=0.0)
    cycle(engine, 0.0, acks.Ok())
    engine.enqueue_many(["a", "b"], now=1.0)
    assert engine.state("a") is SessionState.QUEUED
    assert engine.state("b") is SessionState.QUEUED


# ------------------------------------------------------------- inspect, clone


def _busy_engine(store: MemoryStore | None = None) -> Engine:
    """An engine with a partly answered batch, a backed-off session and a lost link."""
    engine = Engine(Policy(batch_size=2), log=False, store=store)
    for sid, lane in (("a", "incremental"), ("b", "incremental"), ("c", "backfill")):
        engine.enqueue(sid, lane, now=0.0)
    (batch, *_) = engine.tick(0.0)
    engine.on_ack(batch.id, {batch.session_ids[0]: acks.RateLimited()}, now=0.0)
    engine.relay_unavailable(0.5)
    return engine


def test_inspect_is_a_frozen_copy_of_the_inner_state() -> None:
    """``inspect()`` shows the open batches, ready order and blame, and later calls
    never change a view already taken."""
    engine = _busy_engine()
    view = engine.inspect()
    (first, *_) = view.batches
    assert first.session_ids == ("a", "b")
    assert first.pending == ("b",)
    assert first.deadline == 0.0 + engine.policy.ack_timeout_s
    assert first.probe is False
    assert view.blame.marks == {"a": 0}
    assert view.ready[Lane.BACKFILL] == ("c",)
    assert view.sessions["a"].state is SessionState.QUEUED
    with pytest.raises(AttributeError):
        view.now = 5.0  # type: ignore[misc]
    engine.enqueue("d", now=1.0)
    engine.tick(100.0)
    assert "d" not in view.sessions
    assert engine.inspect() != view


def test_clone_is_independent_and_has_no_store_or_listeners() -> None:
    """A clone starts equal, diverges only by its own calls, persists nothing and
    reports to nobody; the original is untouched."""
    heard: list[Any] = []
    store = MemoryStore()
    engine = _busy_engine(store)
    engine.subscribe(heard.append)
    before = engine.inspect()
    twin = engine.clone()
    assert twin.store is None
    assert twin.listeners == ()
    assert twin.inspect() == before
    heard.clear()
    twin.enqueue("a", "incremental", now=1.0)
    twin.tick(3.0)
    for open_batch in twin.in_flight():
        twin.on_ack(open_batch.id, acks.Ok(), now=3.0)
    twin.check()
    assert heard == []
    assert engine.inspect() == before
    assert twin.inspect() != before


def test_clone_copies_the_generator_unless_given_one() -> None:
    """A clone draws the same jitter the original would (its generator is a copy
    of the original's), or draws from the generator you pass."""
    jittered = ReasonPolicy(threshold=5, backoff=Exponential(base_s=4.0, jitter=True))
    policy = Policy(batch_size=2, rate_limited=jittered)
    engine = Engine(policy, rng=random.Random(7), log=False)
    for sid in ("a", "b"):
        engine.enqueue(sid, now=0.0)
    (batch,) = engine.tick(0.0)
    own = random.Random(99)
    drawn_before = own.getstate()
    twins = [engine.clone(), engine.clone(rng=own)]
    for each in (engine, *twins):
        # The relay accepted "a": "b"'s refusal is its own, and it backs off.
        each.on_ack(batch.id, {"a": acks.Ok(), "b": acks.RateLimited()}, now=0.0)
    retry_at = [e.session("b").retry_at for e in (engine, *twins)]
    assert retry_at[0] == retry_at[1]
    assert retry_at[0] is not None
    assert 0.0 <= retry_at[0] <= 4.0
    assert own.getstate() != drawn_before


def test_clone_of_a_reference_runtime_engine_runs_on_its_own() -> None:
    """A clone of an engine on the reference runtime (one python-statemachine per
    record) fires its own machines: both go on alike, the original untouched."""
    engine = Engine(Policy(batch_size=2), log=False, runtime="reference")
    for sid in ("a", "b"):
        engine.enqueue(sid, now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, {"a": acks.Ok()}, now=0.0)
    before = engine.inspect()
    twins = [engine.clone(), engine.clone()]
    for twin in twins:
        twin.on_ack(batch.id, {"b": acks.RateLimited()}, now=1.0)
        twin.enqueue("a", now=1.0)
        twin.tick(1.0)
        twin.check()
    assert twins[0].inspect() == twins[1].inspect() != before
    assert twins[0].session("b").state is SessionState.BACKOFF
    assert engine.inspect() == before


def test_engine_pickles_between_calls_without_a_store() -> None:
    """A pickled engine loads equal to the original and goes on alike, with its
    logging setting; an engine with a store refuses to pickle."""
    engine = _busy_engine()
    loaded = pickle.loads(pickle.dumps(engine))
    assert type(loaded) is Engine
    assert loaded.inspect() == engine.inspect()
    assert loaded.logs is engine.logs
    for e in (engine, loaded):
        e.enqueue("a", "incremental", now=1.0)
        e.tick(3.0)
        e.check()
    assert loaded.inspect() == engine.inspect()
    stored = _busy_engine(MemoryStore())
    with stored, pytest.raises(UsageError, match="store"):
        pickle.dumps(stored)
