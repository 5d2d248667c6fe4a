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
transport-level failures, and refusals of the whole relay (a throttle), so
that they never touch a session.

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

Blame: who is charged
---------------------

A charged reason is charged only on evidence against that one session.
Real relays answer per request, not per session, so the engine tells three
kinds of failure apart before it fires anything (``docs/blame.md``):

*shared*
    One charged ack for a batch of two or more pending sessions (a whole
    HTTP 413 or 429, an ``AckTimeout``, the engine's own deadline), or a
    per-session answer in which every session of a batch of two or more
    fails alike and none succeeds. It says something about the batch or the
    relay, not about each session: guard ``shared`` sends every session back
    to ``queued`` untouched. Then either the relay is *throttling* (a whole
    ``RateLimited`` with ``retry_after_s``, or every session ``RateLimited``
    or ``AckTimeout`` alike) and the link moves to ``throttled``; or the
    batch is *split* in halves that go first in their lane as batches of
    their own, until a failing session is alone.
*unattributed*
    A session answered on its own (alone in its batch, or in a per-session
    answer) while nothing shows the relay accepts others: guard
    ``attributable`` is false, so it goes back to ``queued`` untouched and
    the link moves to ``throttled``.
*attributable*
    The relay accepted another session in the same answer, or since this
    session's previous attempt ended; or it has accepted nothing at all for
    ``policy.max_relay_refusal_s`` (a relay refusing everything cannot be
    told apart from a queue of culprits, so past this bound refusals are
    charged again). Only then does a charged reason count.

The link's ``throttled`` state waits ``retry_after_s`` (capped) or its own
growing ``relay_throttle`` backoff, then becomes ``probing``: one batch may
go out. An ``Ok`` re-opens the link; another refusal throttles it again.

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
11. A failure answered for several sessions at once (``shared``) never
    changes any of their counters and dead-letters none of them: they go
    back to ``queued`` untouched, to be split or to wait out a throttle.
12. A session's charged count grows, or it is dead-lettered, only on a
    failure ``attributable`` to it: answered for it alone while the relay
    had accepted another session since its previous attempt (or in the same
    answer), or after the relay accepted nothing for
    ``max_relay_refusal_s``.
13. A ``throttled`` link sends nothing; once its wait is over it sends at
    most one probe batch, and nothing more until that probe is answered.
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
    "INVARIANTS",
    "TRANSPORT_REASONS",
    "Invariant",
    "Lane",
    "LinkMachine",
    "LinkRecord",
    "LinkState",
    "SessionMachine",
    "SessionRecord",
    "SessionState",
    "Step",
]


class Invariant(msgspec.Struct, frozen=True):
    """One numbered invariant of the docstring above: what tests and tools name."""

    #: The number the docstring gives it (tests are named ``test_invN_...``).
    number: int
    #: A short snake_case name, e.g. ``one_place``.
    name: str
    #: The invariant in one sentence.
    sentence: str

    @property
    def key(self) -> str:
        """``inv<number>_<name>``, the name reports use (e.g. ``inv1_one_place``)."""
        return f"inv{self.number}_{self.name}"


#: The invariants of the docstring above, by number. Keep the two in step.
INVARIANTS: Final[dict[int, Invariant]] = {
    inv.number: inv
    for inv in (
        Invariant(1, "one_place", "every session is in exactly one state and one matching place"),
        Invariant(2, "reset_on_success", "Ok clears every counter and the retry time"),
        Invariant(3, "dead_letter_clean", "a dead letter holds no counter or retry time"),
        Invariant(
            4, "transport_not_charged", "RelayUnavailable never changes counters or dead-letters"
        ),
        Invariant(
            5, "no_send_before_retry", "no session is sent before its retry time, or unless ready"
        ),
        Invariant(
            6,
            "no_starvation",
            "a tick leaves no lane with a ready session unsent while it may send",
        ),
        Invariant(
            7, "dead_letter_at_threshold", "dead-letter exactly at the threshold or non-retryable"
        ),
        Invariant(
            8, "no_lost_update", "a session changed in flight is never marked synced by that ack"
        ),
        Invariant(
            9,
            "stamp_only_with_batch",
            "a lane's throttle stamp moves only when it forms a batch",
        ),
        Invariant(
            10, "retry_at_and_counts", "retry_at iff backoff; a count grows by one per ack of it"
        ),
        Invariant(
            11,
            "shared_failure_not_charged",
            "a failure answered for several sessions at once changes none of their counters",
        ),
        Invariant(
            12,
            "charged_only_on_evidence",
            "a count grows only on a failure attributable to the session (the relay "
            "accepted another since its previous attempt, or the bound)",
        ),
        Invariant(
            13,
            "one_probe_per_wait",
            "a throttled link sends nothing before its wait is over, then one probe "
            "until it is answered",
        ),
    )
}


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
    #: The relay refused a batch as a whole: wait, charging nobody.
    THROTTLED = "throttled"
    #: The wait is over: one probe batch may go out.
    PROBING = "probing"


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
    """The relay link's state: paused or throttled after ``failures``
    consecutive bounces or relay-wide refusals."""

    state: LinkState = LinkState.UP
    failures: int = 0
    resume_at: float | None = None


class Step:
    """What an event knows besides the record: the policy, the time, the ack.

    The engine keeps one and refills it per event, so firing allocates nothing.
    """

    __slots__ = (
        "_by_reason",
        "accepted",
        "ack",
        "mark",
        "now",
        "policy",
        "reason",
        "reason_name",
        "reason_policy",
        "refusing_since",
        "rng",
        "shared",
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
        # What blame needs, set by the engine before it fires a failure
        # (``blame``); ``load`` leaves them alone, since only failures read them.
        #: The failure was answered for several sessions at once.
        self.shared = False
        #: How many sessions the relay has accepted, ever, this answer included.
        self.accepted = 0
        #: ``accepted`` when this session's previous attempt ended (or, for a
        #: first attempt, when its batch was sent).
        self.mark = 0
        #: Since when the relay has accepted nothing (None: it just did).
        self.refusing_since: float | None = None

    def blame(self, shared: bool, accepted: int, mark: int, refusing_since: float | None) -> Step:
        """Set what the blame guards read; see ``shared`` and ``attributable``."""
        self.shared = shared
        self.accepted = accepted
        self.mark = mark
        self.refusing_since = refusing_since
        return self

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


def shared(model: SessionRecord, step: Step) -> bool:
    """The failure was answered for several sessions at once (invariant 11)."""
    return step.shared


def attributable(model: SessionRecord, step: Step) -> bool:
    """Evidence against this session: the relay accepted another since its
    previous attempt, or has refused everything for too long (invariant 12)."""
    since = step.refusing_since
    if since is not None and step.now - since >= step.policy.max_relay_refusal_s:
        return True  # refused everything for too long: charge again
    return step.accepted > step.mark


def changed_in_flight(model: SessionRecord, step: Step) -> bool:
    """The session changed after this payload was sent."""
    return model.dirty


def retry_due(model: SessionRecord, step: Step) -> bool:
    """The session's retry time has come."""
    return model.retry_at is None or step.now >= model.retry_at


def pause_elapsed(model: LinkRecord, step: Step) -> bool:
    """The link's pause (or throttle wait) has run out."""
    return model.resume_at is None or step.now >= model.resume_at


GUARD_DOCS: Final[dict[str, str]] = {
    "exhausted": "the reason's consecutive count reaches its threshold, "
    "or the reason is non-retryable",
    "changed_in_flight": "the session changed after this payload was sent",
    "retry_due": "the retry time has come",
    "pause_elapsed": "the link's pause or throttle wait has run out",
    "shared": "the failure was answered for several sessions at once",
    "attributable": "the relay accepted another session since this one's previous "
    "attempt, or has accepted nothing for max_relay_refusal_s",
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


def throttle(model: LinkRecord, step: Step) -> None:
    """The relay refused as a whole: wait its ``retry_after_s`` (capped) or
    our own growing backoff, charging nobody."""
    model.failures += 1
    policy = step.policy
    ack = step.ack
    hint = ack.retry_after_s if isinstance(ack, acks.RateLimited) else None
    if hint is not None:
        wait = min(hint, policy.rate_limited.retry_after_cap_s)
    else:
        wait = policy.relay_throttle.delay(model.failures, step.rng)
    model.resume_at = step.now + min(wait, policy.max_backoff_s)


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

    # The charged reasons. A failure shared by several sessions, or not
    # attributable to this one, sends it back untouched (invariants 11, 12);
    # otherwise defer, or dead-letter at the threshold (invariant 7).
    timed_out = (
        in_flight.to(queued, cond=shared)
        | in_flight.to(queued, unless=attributable)
        | in_flight.to(dead_lettered, cond=exhausted, on=bury)
        | in_flight.to(backoff, on=charge)
    )
    rate_limited = (
        in_flight.to(queued, cond=shared)
        | in_flight.to(queued, unless=attributable)
        | in_flight.to(dead_lettered, cond=exhausted, on=bury)
        | in_flight.to(backoff, on=charge)
    )
    rejected = (
        in_flight.to(queued, cond=shared)
        | in_flight.to(queued, unless=attributable)
        | in_flight.to(dead_lettered, cond=exhausted, on=bury)
        | in_flight.to(backoff, on=charge)
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
    throttled = State("throttled", value=LinkState.THROTTLED)
    probing = State("probing", value=LinkState.PROBING)

    # A RelayUnavailable ack, or the caller reported the relay unavailable.
    lost = (
        up.to(paused, on=pause)
        | paused.to.itself(internal=True, on=pause)
        | throttled.to(paused, on=pause)
        | probing.to(paused, on=pause)
    )
    # The pause ran out; a throttle's wait ran out: one probe may go.
    resumed = paused.to(up, cond=pause_elapsed, on=resume) | throttled.to(
        probing, cond=pause_elapsed, on=resume
    )
    # The caller reported the relay ready. That says nothing about a throttle.
    reported_ready = (
        paused.to(up, on=resume)
        | up.to.itself(internal=True)
        | throttled.to.itself(internal=True)
        | probing.to.itself(internal=True)
    )
    # The relay really answered a batch: it accepted a session, or refused
    # one on evidence against that session.
    answered = (
        up.to.itself(internal=True, on=steady)
        | paused.to(up, on=steady)
        | throttled.to(up, on=steady)
        | probing.to(up, on=steady)
    )
    # The relay refused as a whole, or refused a session without evidence
    # against it: throttle, or extend the throttle (invariant 13).
    refused = (
        up.to(throttled, on=throttle)
        | paused.to(throttled, on=throttle)
        | throttled.to.itself(internal=True, on=throttle)
        | probing.to(throttled, on=throttle)
    )


#: States drawn as final: the session is at rest there.
RESTING_STATES: Final = frozenset({SessionState.SYNCED, SessionState.DEAD_LETTERED})
