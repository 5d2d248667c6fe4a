"""Every transition of sessionfsm lives in this file.

Theory of operation
===================

A sync service pushes local sessions to a relay. Each session is a small
finite-state machine, declared once below with python-statemachine as
:class:`SessionMachine`. That class is the single source of truth:

* :mod:`sessionfsm.runtime` compiles it into a flat transition table that
  drives one small record per session (a million sessions fit in memory);
* the *reference* runtime drives real python-statemachine instances of the
  same class, and a differential test shows the two agree;
* ``diagrams/`` is generated from this file (``sessionfsm diagrams``); never
  edit the diagrams by hand.

The relay link is a second, tiny machine, :class:`LinkMachine`. It absorbs
transport-level failures so that they never touch a session.

The engine (:mod:`sessionfsm.engine`) only decides *when* an event happens
(a tick picks a batch, an ack arrives, a retry time passes). *What* an event
does, which guard picks the target and which effect changes the record, is
written here and nowhere else.

States
------

``queued``
    Ready to send: waiting for a batch in its lane. Nothing blocks it.
``in_flight``
    Sent in a batch whose ack has not arrived (or timed out) yet.
``backoff``
    Refused for now; waits until ``retry_at``, then becomes ``queued``.
``synced``
    The relay stored the latest payload. At rest; a new change re-queues it.
``dead_lettered``
    Given up on, with ``dead_letter_reason``. At rest; only a redrive
    re-queues it. ``synced`` and ``dead_lettered`` are drawn as final states.

Ack reasons
-----------

====================  ===============  =========================================
ack                   event            charged to the session?
====================  ===============  =========================================
``Ok``                ``acked``        no: success clears every counter
``AckTimeout``        ``timed_out``    yes (threshold 3 by default)
``RateLimited``       ``rate_limited`` yes (threshold 5 by default)
``PayloadTooLarge``   ``rejected``     yes, non-retryable: dead-letters at once
``RelayUnavailable``  ``bounced``      never: a transport reason; the session
                                       goes back to ``queued`` untouched and
                                       the *link* pauses instead
====================  ===============  =========================================

The engine also times out a batch itself after ``policy.ack_timeout_s``. It
fires ``timed_out`` then, unless the link was lost while the batch was out:
the outage ate the ack, so it fires ``bounced`` and nobody is charged.

A charged reason ``R`` keeps its own consecutive count in ``counts[R]``. The
``threshold``-th consecutive ``R`` (or the first, if ``R`` is not retryable)
dead-letters the session; every earlier one defers it to ``backoff`` for the
reason's backoff.

Invariants
----------

The tests name these by number (``test_inv3_...``), and ``Engine.check()``
asserts the structural ones on a live engine.

1. Every session is in exactly one state, and in exactly one place that
   matches it: a ready queue if ``queued``, the retry heap if ``backoff``, one
   open batch if ``in_flight``. No session is lost or doubled.
2. Success clears every per-reason counter and the retry time
   (reset on success).
3. A dead-lettered session holds no leftover counter or retry time
   (cross-reason cleanup).
4. Transport-level reasons (``RelayUnavailable``) never change a session's
   counters and never dead-letter it.
5. No session is sent before its retry time.
6. A ready session is never left unsent behind a backed-off one while its lane
   may send, and a lane is never starved because the other lane is all backed
   off.
7. Dead-lettering happens exactly when a reason's consecutive count reaches
   its threshold, or on a non-retryable reason, and never otherwise.
8. An update made while in flight is never marked synced (no lost update).
9. A lane's throttle timestamp is stamped only when a batch was really formed.
10. ``retry_at`` is set if and only if the session is in ``backoff``; a
    charged count only ever grows by one per ack of that reason.
"""

from __future__ import annotations

import random
from enum import StrEnum
from typing import Final

import msgspec
from statemachine import State, StateMachine

from . import acks
from .policy import Policy, ReasonPolicy

__all__ = [
    "ACK_EVENTS",
    "CHARGED_REASONS",
    "TRANSPORT_REASONS",
    "Lane",
    "LinkMachine",
    "LinkRecord",
    "LinkState",
    "SessionMachine",
    "SessionRecord",
    "SessionState",
    "Step",
]


class SessionState(StrEnum):
    """Where a session is. The values are the names used on the wire and on disk."""

    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    BACKOFF = "backoff"
    SYNCED = "synced"
    DEAD_LETTERED = "dead_lettered"


class Lane(StrEnum):
    """Which queue a session waits in. Incremental goes first when it may."""

    INCREMENTAL = "incremental"
    BACKFILL = "backfill"


class LinkState(StrEnum):
    """Whether the engine may send to the relay."""

    UP = "up"
    PAUSED = "paused"


#: Reasons charged to a session, in the order of ``SessionRecord.counts``.
CHARGED_REASONS: Final = ("AckTimeout", "RateLimited", "PayloadTooLarge")
#: Reasons that are the transport's fault; they pause the link instead.
TRANSPORT_REASONS: Final = ("RelayUnavailable",)

#: The session event each ack fires.
ACK_EVENTS: Final[dict[type[acks.Ack], str]] = {
    acks.Ok: "acked",
    acks.AckTimeout: "timed_out",
    acks.RateLimited: "rate_limited",
    acks.PayloadTooLarge: "rejected",
    acks.RelayUnavailable: "bounced",
}

#: Index into ``counts`` for each charged ack type, -1 for the others.
REASON_INDEX: Final[dict[type[acks.Ack], int]] = {
    t: CHARGED_REASONS.index(t.__name__) if t.__name__ in CHARGED_REASONS else -1
    for t in acks.ACK_TYPES
}

ZERO_COUNTS: Final[tuple[int, ...]] = (0,) * len(CHARGED_REASONS)


class SessionRecord(msgspec.Struct, gc=False):
    """One session's whole state. The compiled runtime's unit of work.

    A Struct without GC tracking: 16 bytes of header and 8 per field, so a
    record costs about 90 bytes. ``counts`` shares one zero tuple until a
    session is first charged, and states and lanes are enum singletons, so a
    healthy session allocates nothing else. Never hold a reference cycle here.
    """

    id: str
    state: SessionState = SessionState.QUEUED
    lane: Lane = Lane.INCREMENTAL
    counts: tuple[int, ...] = ZERO_COUNTS
    retry_at: float | None = None
    dirty: bool = False
    #: Sends since the last success or redrive; kept on dead-letter for the record.
    attempts: int = 0
    dead_letter_reason: str | None = None
    dead_lettered_at: float | None = None


class LinkRecord(msgspec.Struct):
    """The relay link's state: paused after ``failures`` consecutive bounces."""

    state: LinkState = LinkState.UP
    failures: int = 0
    resume_at: float | None = None


class Step:
    """What an event knows besides the record: the policy, the time, the ack.

    The engine keeps one and refills it per event, so firing allocates nothing.
    """

    __slots__ = (
        "_by_reason",
        "ack",
        "now",
        "policy",
        "reason",
        "reason_name",
        "reason_policy",
        "rng",
    )

    def __init__(self, policy: Policy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.now = 0.0
        self.ack: acks.Ack | None = None
        self.reason = -1
        #: The ack's type name (``"Ok"``, ``"RateLimited"``, ...), for history.
        self.reason_name: str | None = None
        self.reason_policy: ReasonPolicy | None = None
        # Looked up once: ``load`` runs for every session of every ack.
        self._by_reason = tuple(policy.reason(name) for name in CHARGED_REASONS)

    def load(self, now: float, ack: acks.Ack | None = None) -> Step:
        self.now = now
        self.ack = ack
        if ack is None:
            self.reason = -1
            self.reason_name = None
            self.reason_policy = None
        else:
            kind = type(ack)
            reason = self.reason = REASON_INDEX[kind]
            self.reason_name = kind.__name__
            self.reason_policy = self._by_reason[reason] if reason >= 0 else None
        return self


# ---------------------------------------------------------------------------
# Guards. Each takes (model, step) and reads, never writes. Their names are
# the labels in the diagrams, explained in plain words in GUARD_DOCS.
# ---------------------------------------------------------------------------


def exhausted(model: SessionRecord, step: Step) -> bool:
    """This ack reaches its reason's threshold, or the reason is non-retryable."""
    rp = step.reason_policy
    assert rp is not None, "exhausted is only declared on charged events"
    return not rp.retryable or model.counts[step.reason] + 1 >= rp.threshold


def changed_in_flight(model: SessionRecord, step: Step) -> bool:
    """The session changed after this payload was sent."""
    return model.dirty


def retry_due(model: SessionRecord, step: Step) -> bool:
    """The session's retry time has come."""
    return model.retry_at is None or step.now >= model.retry_at


def pause_elapsed(model: LinkRecord, step: Step) -> bool:
    """The link's pause has run out."""
    return model.resume_at is None or step.now >= model.resume_at


GUARD_DOCS: Final[dict[str, str]] = {
    "exhausted": "the reason's consecutive count reaches its threshold, "
    "or the reason is non-retryable",
    "changed_in_flight": "the session changed after this payload was sent",
    "retry_due": "the retry time has come",
    "pause_elapsed": "the link's pause has run out",
}


# ---------------------------------------------------------------------------
# Effects. Each takes (model, step) and changes the record, nothing else.
# ---------------------------------------------------------------------------


def dispatch(model: SessionRecord, step: Step) -> None:
    """Sent: the payload now in flight is the latest one."""
    model.dirty = False
    model.attempts += 1


def settle(model: SessionRecord, step: Step) -> None:
    """Success: clear every reason's counter and the retry time (invariant 2)."""
    model.counts = ZERO_COUNTS
    model.retry_at = None
    model.attempts = 0


def charge(model: SessionRecord, step: Step) -> None:
    """Deferral: count one more of this reason and schedule the retry."""
    rp = step.reason_policy
    assert rp is not None, "charge is only declared on charged events"
    i = step.reason
    counts = model.counts
    n = counts[i] + 1
    model.counts = (*counts[:i], n, *counts[i + 1 :])
    retry_after = step.ack.retry_after_s if isinstance(step.ack, acks.RateLimited) else None
    delay = min(rp.delay(n, retry_after, step.rng), step.policy.max_backoff_s)
    model.retry_at = step.now + delay


def bury(model: SessionRecord, step: Step) -> None:
    """Dead-letter: record why and when, and clear every counter (invariant 3)."""
    model.counts = ZERO_COUNTS
    model.retry_at = None
    model.dirty = False
    model.dead_letter_reason = CHARGED_REASONS[step.reason]
    model.dead_lettered_at = step.now


def release(model: SessionRecord, step: Step) -> None:
    """The retry time has come; the session is ready again."""
    model.retry_at = None


def mark_dirty(model: SessionRecord, step: Step) -> None:
    """Changed while in flight: the ack in transit is for a stale payload."""
    model.dirty = True


def revive(model: SessionRecord, step: Step) -> None:
    """Redrive: a clean slate, as if newly enqueued."""
    model.counts = ZERO_COUNTS
    model.retry_at = None
    model.attempts = 0
    model.dead_letter_reason = None
    model.dead_lettered_at = None


def pause(model: LinkRecord, step: Step) -> None:
    """One more consecutive relay failure; pause for longer."""
    model.failures += 1
    model.resume_at = step.now + step.policy.relay_pause.delay(model.failures, step.rng)


def resume(model: LinkRecord, step: Step) -> None:
    """Sending may start again; the failure streak is kept until an answer."""
    model.resume_at = None


def steady(model: LinkRecord, step: Step) -> None:
    """The relay answered for real: forget the failure streak."""
    model.failures = 0
    model.resume_at = None


class SessionMachine(StateMachine):
    """The session machine. Transitions are tried in the order written."""

    queued = State("queued", initial=True, value=SessionState.QUEUED)
    in_flight = State("in flight", value=SessionState.IN_FLIGHT)
    backoff = State("backoff", value=SessionState.BACKOFF)
    synced = State("synced", value=SessionState.SYNCED)
    dead_lettered = State("dead-lettered", value=SessionState.DEAD_LETTERED)

    # The tick picked the session for a batch.
    sent = queued.to(in_flight, on=dispatch)

    # Ok. A payload that changed in flight is stale: send it again (invariant 8).
    acked = in_flight.to(queued, cond=changed_in_flight, on=settle) | in_flight.to(
        synced, on=settle
    )

    # The charged reasons: defer, or dead-letter at the threshold (invariant 7).
    timed_out = in_flight.to(dead_lettered, cond=exhausted, on=bury) | in_flight.to(
        backoff, on=charge
    )
    rate_limited = in_flight.to(dead_lettered, cond=exhausted, on=bury) | in_flight.to(
        backoff, on=charge
    )
    rejected = in_flight.to(dead_lettered, cond=exhausted, on=bury) | in_flight.to(
        backoff, on=charge
    )

    # RelayUnavailable: back to the queue, nothing charged (invariant 4).
    bounced = in_flight.to(queued)

    # The retry time passed (invariant 5).
    elapsed = backoff.to(queued, cond=retry_due, on=release)

    # The local session changed (``Engine.enqueue`` on a known session).
    changed = (
        queued.to.itself(internal=True)
        | in_flight.to.itself(internal=True, on=mark_dirty)
        | backoff.to.itself(internal=True)
        | synced.to(queued)
        | dead_lettered.to.itself(internal=True)
    )

    # An operator redrove a dead letter.
    redriven = dead_lettered.to(queued, on=revive)


class LinkMachine(StateMachine):
    """The relay link. Only the engine's own tick and the caller move it."""

    up = State("up", initial=True, value=LinkState.UP)
    paused = State("paused", value=LinkState.PAUSED)

    # A RelayUnavailable ack, or the caller reported the relay unavailable.
    lost = up.to(paused, on=pause) | paused.to.itself(internal=True, on=pause)
    # The pause ran out.
    resumed = paused.to(up, cond=pause_elapsed, on=resume)
    # The caller reported the relay ready.
    reported_ready = paused.to(up, on=resume) | up.to.itself(internal=True)
    # The relay really answered a batch (any ack but RelayUnavailable).
    answered = up.to.itself(internal=True, on=steady) | paused.to(up, on=steady)


#: States drawn as final: the session is at rest there.
RESTING_STATES: Final = frozenset({SessionState.SYNCED, SessionState.DEAD_LETTERED})
