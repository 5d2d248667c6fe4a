"""Prove the invariants: exhaustive bounded exploration of the real engine.

Hypothesis samples event sequences; this module enumerates all of them, the
way TLA+'s TLC does, for a small configuration: ``k`` sessions in both lanes,
a small policy and a discrete clock that moves one ``tick_interval_s`` at a
time. Starting from an empty engine it applies every enabled action
breadth-first:

* ``enqueue`` of each session in each lane (new, changed or promoted);
* ``tick`` at the current time (it also times out overdue batches, bouncing
  those whose ack an outage ate, and releases due backoffs);
* ``ack`` of each open batch with each ack kind, and ``ack_session`` of each
  pending session of a batch of several with each ack kind;
* ``relay_unavailable`` and ``relay_ready``;
* ``redrive`` of each dead letter (and, opt-in, ``schedule_redrive``);
* ``advance``: the clock moves one tick, and the engine ticks, as a runner
  does every ``tick_interval_s``; with ``free_clock`` it may also move
  without a tick, as a runner sleeping until ``next_wakeup()`` does.

Each successor is the real :class:`~sessionfsm.Engine` (or your subclass),
cloned from its parent and driven through its public API. States are
deduplicated by a canonical key in which every time is relative to the clock
and clamped where the engine can no longer tell two values apart (a retry
time in the past is simply due), so the reachable space is finite and the
search reaches a fixpoint. The key keeps everything that can change what the
engine does next and drops what it only reports (``attempts``,
``dead_lettered_at``, ``anomalies``, batch ids).

Session ids are *not* treated as symmetric: the retry heap breaks ties in
``retry_at`` by session id, so relabelling the sessions of a history does not
relabel its outcome. Reducing by symmetry would therefore skip real states;
the search keeps the ids and pays for it in states.

Every transition and every new state is checked against invariants 1-10 of
:mod:`sessionfsm.machine` (``Engine.check()`` plus the checks below, which
compare each session before and after the action), and the finished graph
against two liveness properties. A violation carries the shortest action
trace from the empty engine; :func:`replay` runs it again and reports the
same violation, so a trace pastes straight into a regression test.

The search sees the engine only through its public seams: it drives it
through its API, copies it with ``Engine.clone()``, builds its keys and
checks from ``Engine.inspect()`` (a frozen :class:`~sessionfsm.inspection.EngineState`)
and keeps the states still to explore pickled, through the engine's pickle
protocol. A test fails when that view gains a field the key does not know
about.

Every state of a small configuration is explored, but only those: the
numbers in the README say which bounds were proven and how long it took.
"""

from __future__ import annotations

import json
import pickle
import random
import time
from array import array
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeAlias

import click
import msgspec

from sessionfsm import InvariantViolation, acks
from sessionfsm.engine import Batch, Engine
from sessionfsm.inspection import BlameState, EngineState, OpenBatchState, RedriveState
from sessionfsm.machine import (
    CHARGED_REASONS,
    REASON_INDEX,
    Lane,
    LinkRecord,
    LinkState,
    SessionRecord,
    SessionState,
)
from sessionfsm.machine import INVARIANTS as MACHINE_INVARIANTS
from sessionfsm.policy import Exponential, Fixed, Policy, ReasonPolicy, load_policy

__all__ = [
    "ACK_KINDS",
    "CHECK_POLICY",
    "INVARIANTS",
    "Action",
    "CheckResult",
    "Replay",
    "Violation",
    "command",
    "describe_trace",
    "explore",
    "format_result",
    "replay",
]

#: One step of a trace, as plain data: ``("enqueue", "s0", "backfill")``,
#: ``("tick",)``, ``("advance",)``, ``("ack", 1, "Ok")``,
#: ``("ack_session", 1, "s0", "RateLimited")``, ``("relay_unavailable",)``,
#: ``("relay_ready",)``, ``("redrive", "s0")``, ``("schedule_redrive",)``.
#: Batch ids are the engine's own, which a replay from the start reproduces.
Action: TypeAlias = tuple[Any, ...]
EngineFactory: TypeAlias = Callable[[Policy], Engine]

#: The acks the relay may send, by name. ``RateLimited`` carries no
#: ``retry_after_s``: the search covers the reason's own backoff only.
ACK_KINDS: Final[dict[str, acks.Ack]] = {
    "Ok": acks.Ok(),
    "AckTimeout": acks.AckTimeout(),
    "RateLimited": acks.RateLimited(),
    "PayloadTooLarge": acks.PayloadTooLarge(),
    "RelayUnavailable": acks.RelayUnavailable(),
}

#: The small policy checked by default. One tick is one second. Thresholds
#: of 2 (and a non-retryable reason) reach every dead-letter path; the two
#: charged reasons back off for different times (one tick and two) so that a
#: mix-up between them shows; the incremental lane is throttled to one batch
#: per two ticks and one batch may be out at a time, so that both the
#: interval and the incremental-first rule decide who goes next.
CHECK_POLICY: Final = Policy(
    batch_size=2,
    incremental_interval_s=2.0,
    backfill_batch_size=1,
    backfill_interval_s=0.0,
    max_in_flight=1,
    ack_timeout_s=2.0,
    tick_interval_s=1.0,
    max_backoff_s=10.0,
    ack_timeout=ReasonPolicy(threshold=2, backoff=Fixed(1.0)),
    rate_limited=ReasonPolicy(threshold=2, backoff=Fixed(2.0)),
    payload_too_large=ReasonPolicy(threshold=1, retryable=False),
    relay_pause=Exponential(base_s=1.0, factor=1.0, cap_s=1.0, jitter=False),
    relay_throttle=Exponential(base_s=1.0, factor=1.0, cap_s=1.0, jitter=False),
    max_relay_refusal_s=3.0,
)

#: The relay model's extra answer: a whole-request 429 with Retry-After.
_HINTED: Final = "RateLimited+retry_after"
_RELAY_ACKS: Final[dict[str, acks.Ack]] = {
    **ACK_KINDS,
    _HINTED: acks.RateLimited(retry_after_s=2.0),
}
#: How the relay model may answer a batch.
RELAY_STYLES: Final = ("per-session", "per-request", "per-request-hint")

#: Every property checked, by the name used in reports.
INVARIANTS: Final[dict[str, str]] = {
    # The numbered ones, as sessionfsm.machine declares them.
    **{inv.key: inv.sentence for inv in MACHINE_INVARIANTS.values()},
    "blame_good_never_dead": "(relay model) a good session is dead-lettered only if the "
    "relay accepted nothing for max_relay_refusal_s since its last Ok",
    "live_bad_dies": "(relay model) every bad session can still be dead-lettered by time "
    "and the relay's answers alone, even when only bad sessions are left",
    "live_good_syncs": "(relay model) once the throttle is off, every good session not "
    "dead-lettered can still be synced by time and the relay's answers alone",
    "paced_redrive_as_scheduled": "a paced redrive revives only dead letters scheduled "
    "while dead and dead ever since, at most per_tick a tick",
    "no_crash": "no action on a valid engine raises",
    "live_session_can_rest": "from every state each session can still reach synced or dead",
    "live_lane_served": "a lane with a queued session gets a batch by time passing alone",
}

_NOT_FAILURES: Final = frozenset({"Ok", "RelayUnavailable"})
# The relay model's actions that neither add a session nor start a throttle.
_RELAY_ONLY: Final = frozenset({"blame_good_never_dead", "live_bad_dies", "live_good_syncs"})
_UNFORCED: Final = frozenset({"tick", "advance", "answer", "throttle_off"})

_QUEUED: Final = SessionState.QUEUED
_IN_FLIGHT: Final = SessionState.IN_FLIGHT
_BACKOFF: Final = SessionState.BACKOFF
_SYNCED: Final = SessionState.SYNCED
_DEAD: Final = SessionState.DEAD_LETTERED
_LANES: Final = (Lane.INCREMENTAL, Lane.BACKFILL)
# Keys round relative times so float noise cannot split one state in two.
_DIGITS: Final = 6

#: Every field of the engine's view (``Engine.inspect()``) and of the structs
#: in it, and what the state key does with it: None where the key holds it
#: (times relative to the clock), otherwise why it is left out. A test fails
#: when the view gains a field until it is entered here, and so until someone
#: decides whether the key needs it.
KEY_FIELDS: Final[dict[type[msgspec.Struct], dict[str, str | None]]] = {
    EngineState: {
        "now": "times are relative to the search's clock, which the engine's never passes",
        "sessions": None,
        "ready": None,
        "retry": None,
        "batches": None,
        "closed": "no action answers a closed batch",
        "next_batch_id": "batch ids are left out; a trace replays to the same ones",
        "stamps": None,
        "link": None,
        # As whether each open batch was sent before the link was last lost.
        "link_losses": None,
        "redrive": None,
        "blame": None,
        "anomalies": "reported, never read back",
        # Their order, only with paced redrive: schedule_redrive takes it.
        "dead": None,
    },
    SessionRecord: {
        "id": "the key lists the sessions in a fixed order",
        "state": None,
        "lane": None,
        "counts": None,
        "retry_at": None,
        "dirty": None,
        "attempts": "reported, never read back",
        "dead_letter_reason": "reported, never read back",
        "dead_lettered_at": "reported, never read back",
    },
    OpenBatchState: {
        "id": "batch ids are left out; a trace replays to the same ones",
        "lane": None,
        "session_ids": "the answered ones are done with it; the pending ones are keyed",
        "pending": None,
        "deadline": None,
        "probe": "the engine never reads it back; blame.probe, keyed, names the probe out",
        # As whether the link was lost since the batch left.
        "losses": None,
        # As whether the relay accepted a session since the batch left.
        "accepted": None,
    },
    LinkRecord: {
        "state": None,
        # Capped at the count after which every pause is the same.
        "failures": None,
        "resume_at": None,
    },
    RedriveState: {"scheduled": None, "per_tick": None, "last": None},
    BlameState: {
        # As whether each mark and each open batch is older than the count.
        "accepted": None,
        "marks": None,
        "refusing_since": None,
        "cuts": None,
        "probe": None,
    },
}


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """A broken property and the shortest trace from the empty engine to it."""

    invariant: str
    message: str
    trace: tuple[Action, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "invariant": self.invariant,
            "message": self.message,
            "trace": [list(a) for a in self.trace],
        }


@dataclass
class CheckResult:
    """What a search found. ``complete`` is False when ``depth`` cut it short."""

    sessions: int
    depth: int | None
    policy: Policy
    free_clock: bool = False
    paced_redrive: bool = False
    relay: bool = False
    states: int = 0
    transitions: int = 0
    #: Property evaluations: one per transition, per new state, and per
    #: state and session or lane for liveness.
    checks: int = 0
    failed_checks: int = 0
    max_depth: int = 0
    complete: bool = True
    seconds: float = 0.0
    invariants: tuple[str, ...] = tuple(INVARIANTS)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {
            "states": self.states,
            "transitions": self.transitions,
            "invariants": list(self.invariants),
            "violations": [v.to_json() for v in self.violations],
            "checks": self.checks,
            "free_clock": self.free_clock,
            "paced_redrive": self.paced_redrive,
            "relay": self.relay,
            "complete": self.complete,
            "max_depth": self.max_depth,
            "seconds": round(self.seconds, 3),
            "sessions": self.sessions,
            "depth": self.depth,
            "policy": msgspec.to_builtins(self.policy),
        }


# --------------------------------------------------------------------------
# The frontier
# --------------------------------------------------------------------------

# Values that are the same object in every state without being shared on
# purpose (small ints, interned strings, None): never part of what is shared.
_ATOMS: Final = (int, float, str, bool, type(None))


def _shared_state(engine: Engine, rng: random.Random) -> dict[str, Any]:
    """What every copy of ``engine`` made by the search shares with every other:
    the entries of its pickled state that two successive clones share (the
    policy, the runtimes, the generator, ...)."""
    first = engine.clone(rng=rng)
    one, two = first.__getstate__(), first.clone(rng=rng).__getstate__()
    return {
        name: value
        for name, value in two.items()
        if one.get(name) is value and not isinstance(value, _ATOMS)
    }


class _Frozen:
    """An engine waiting in the search frontier, pickled (through the engine's
    own pickle protocol) without the parts every state shares: about 1.1 KB
    instead of 7.7 KB in memory (three sessions, one batch open)."""

    __slots__ = ("cls", "data", "shared")

    def __init__(self, cls: type[Engine], shared: dict[str, Any], data: bytes) -> None:
        self.cls = cls
        self.shared = shared
        self.data = data


def _freeze(engine: Engine, shared: dict[str, Any]) -> _Frozen | Engine:
    """``engine`` pickled, but for what it shares with ``shared``; or, if it
    does not pickle (a subclass's attribute, say), ``engine`` as it is."""
    try:
        state = engine.__getstate__()
        data = pickle.dumps(
            {
                name: value
                for name, value in state.items()
                if name not in shared or shared[name] is not value
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )
    except Exception:
        return engine
    return _Frozen(type(engine), shared, data)


def _thaw(frozen: _Frozen | Engine) -> Engine:
    if isinstance(frozen, Engine):
        return frozen
    engine = frozen.cls.__new__(frozen.cls)
    engine.__setstate__({**frozen.shared, **pickle.loads(frozen.data)})
    return engine


def _default_factory(policy: Policy) -> Engine:
    return Engine(policy, rng=random.Random(0), log=False)


def _without_jitter(policy: Policy) -> Policy:
    """Jitter draws from a continuum; the search uses each draw's upper bound."""

    def fixed(backoff: Fixed | Exponential) -> Fixed | Exponential:
        if isinstance(backoff, Exponential) and backoff.jitter:
            return msgspec.structs.replace(backoff, jitter=False)
        return backoff

    def reason(rp: ReasonPolicy) -> ReasonPolicy:
        return msgspec.structs.replace(rp, backoff=fixed(rp.backoff))

    pause = policy.relay_pause
    throttle = policy.relay_throttle
    return msgspec.structs.replace(
        policy,
        ack_timeout=reason(policy.ack_timeout),
        rate_limited=reason(policy.rate_limited),
        payload_too_large=reason(policy.payload_too_large),
        relay_pause=msgspec.structs.replace(pause, jitter=False) if pause.jitter else pause,
        relay_throttle=(
            msgspec.structs.replace(throttle, jitter=False) if throttle.jitter else throttle
        ),
    )


def _failures_that_matter(pause: Exponential) -> int:
    """A link that failed this many times or more pauses for the same
    (capped) time on its next failure, so more failures are all alike."""
    rng = random.Random(0)
    last = pause.delay(66, rng)
    first_capped = next(n for n in range(1, 67) if pause.delay(n, rng) == last)
    return first_capped - 1


@dataclass(frozen=True)
class _Shadow:
    """What the checker itself remembers about the history, beside the engine.

    ``stamps``: when each lane last formed a batch, as the checker saw it.
    ``changed``: sessions enqueued again while in flight (their ack is stale).
    ``lost``: open batches sent before the link was last lost (the outage ate
    their ack, so timing them out charges nobody).
    ``scheduled``: dead letters a ``schedule_redrive`` covered, dead ever since.
    """

    stamps: tuple[float | None, float | None] = (None, None)
    changed: frozenset[str] = frozenset()
    lost: frozenset[int] = frozenset()
    scheduled: frozenset[str] = frozenset()
    #: Blame, as the checker sees it. ``marked``: sessions whose previous
    #: attempt failed (since their last Ok); ``witnessed``: sessions for which
    #: the relay accepted another session since their mark (or, unmarked,
    #: since they were sent); ``refusing_since``: since when the relay has
    #: accepted nothing.
    marked: frozenset[str] = frozenset()
    witnessed: frozenset[str] = frozenset()
    refusing_since: float | None = None
    #: The relay model: bad sessions, and whether a relay-wide throttle is on.
    bad: frozenset[str] = frozenset()
    throttling: bool = False
    #: Sessions that were waiting while the relay accepted nothing for
    #: ``max_relay_refusal_s``, since their last Ok: past the bound, refusals
    #: are charged again, by design.
    exposed: frozenset[str] = frozenset()


class _Model:
    """One configuration: the policy, the session ids and how the clock moves."""

    def __init__(
        self,
        policy: Policy,
        sessions: int,
        factory: EngineFactory,
        *,
        free_clock: bool,
        paced_redrive: bool = False,
        relay: bool = False,
    ) -> None:
        self.relay = relay
        self.policy = policy
        self.ids = tuple(f"s{i}" for i in range(sessions))
        self.factory = factory
        self.free_clock = free_clock
        self.paced_redrive = paced_redrive
        self.tick_s = policy.tick_interval_s
        self.intervals = (policy.incremental_interval_s, policy.backfill_interval_s)
        self.failures_cap = max(
            _failures_that_matter(policy.relay_pause),
            _failures_that_matter(policy.relay_throttle),
        )
        self.rng = random.Random(0)
        # One generator for every copy of the engine: with jitter off nothing
        # draws from it, and copying one costs more than copying the engine.
        self.clone_rng = random.Random(0)
        self._intern: dict[Hashable, int] = {}
        self._actions: dict[Action, Action] = {}
        self._always: tuple[Action, ...] = (
            ("tick",),
            ("advance",),
            *(("enqueue", sid, lane.value) for sid in self.ids for lane in _LANES),
            ("relay_unavailable",),
            ("relay_ready",),
        )

    def now(self, n: int) -> float:
        return n * self.tick_s

    # ------------------------------------------------------------- actions

    def actions(self, view: EngineState, shadow: _Shadow | None = None) -> list[Action]:
        """Every action enabled in this state, each tuple shared across states."""
        if self.relay:
            return self._relay_actions(view, shadow or _Shadow())
        out = list(self._always)
        action = self._action
        for ob in view.batches:
            bid = ob.id
            for kind in ACK_KINDS:
                out.append(action("ack", bid, kind))
            if len(ob.pending) > 1:
                for sid in ob.pending:
                    for kind in ACK_KINDS:
                        out.append(action("ack_session", bid, sid, kind))
        for sid in view.dead:
            out.append(action("redrive", sid))
        if self.paced_redrive:
            scheduled = view.redrive.scheduled
            if any(sid not in scheduled for sid in view.dead):
                out.append(("schedule_redrive",))
        return out

    def _relay_actions(self, view: EngineState, shadow: _Shadow) -> list[Action]:
        """The relay model: sessions arrive good or bad, the environment turns
        a relay-wide throttle on and off, and the relay answers each batch as
        it would, per session or per request, with or without Retry-After."""
        action = self._action
        out: list[Action] = [("tick",)]
        # A relay answers a batch of good sessions while it is not throttling:
        # only a batch with a bad session in it (a slow upload, say) or a
        # throttle may go unanswered until the engine's deadline.
        soon = self.now(1) + view.now
        if not any(
            ob.deadline is not None
            and ob.deadline <= soon
            and not shadow.throttling
            and not any(sid in shadow.bad for sid in ob.pending)
            for ob in view.batches
        ):
            out.append(("advance",))
        for sid in self.ids:
            if sid not in view.sessions:
                for lane in _LANES:
                    for nature in ("good", "bad"):
                        out.append(action("enqueue", sid, lane.value, nature))
        out.append(("throttle_off",) if shadow.throttling else ("throttle_on",))
        for ob in view.batches:
            ids = ob.pending
            for style in RELAY_STYLES:
                out.append(action("answer", ob.id, style, self._answer(ids, style, shadow)))
        return out

    def _answer(self, ids: tuple[str, ...], style: str, shadow: _Shadow) -> Any:
        """What the relay model answers: one kind name, or (session, kind) pairs."""
        if style == "per-session":
            refuse = shadow.throttling
            return tuple(
                (sid, "RateLimited" if refuse or sid in shadow.bad else "Ok") for sid in ids
            )
        if shadow.throttling:
            return _HINTED if style == "per-request-hint" else "RateLimited"
        return "RateLimited" if any(sid in shadow.bad for sid in ids) else "Ok"

    def _action(self, *action: Any) -> Action:
        # A million states each remember the action that found them: share it.
        return self._actions.setdefault(action, action)

    def apply(self, engine: Engine, n: int, action: Action) -> tuple[int, list[Batch] | None]:
        """Run one action on ``engine`` in place.

        Returns the new clock and the batches formed, or None if the engine
        was not ticked.
        """
        kind = action[0]
        if kind == "advance":
            n += 1
            return n, None if self.free_clock else engine.tick(self.now(n))
        now = self.now(n)
        if kind == "tick":
            return n, engine.tick(now)
        if kind == "enqueue":
            engine.enqueue(action[1], action[2], now=now)
        elif kind == "answer":
            answer = action[3]
            if isinstance(answer, str):
                engine.on_ack(action[1], _RELAY_ACKS[answer], now)
            else:
                engine.on_ack(action[1], {sid: _RELAY_ACKS[k] for sid, k in answer}, now)
        elif kind == "throttle_on" or kind == "throttle_off":
            pass  # the relay's own state: the shadow keeps it
        elif kind == "ack":
            engine.on_ack(action[1], ACK_KINDS[action[2]], now)
        elif kind == "ack_session":
            engine.on_ack(action[1], {action[2]: ACK_KINDS[action[3]]}, now)
        elif kind == "relay_unavailable":
            engine.relay_unavailable(now)
        elif kind == "relay_ready":
            engine.relay_ready(now)
        elif kind == "redrive":
            engine.redrive(action[1], now)
        elif kind == "schedule_redrive":
            engine.schedule_redrive(per_tick=1)
        else:
            raise ValueError(f"unknown action {action!r}")
        return n, None

    # ------------------------------------------------------------- the key

    @staticmethod
    def _since(since: float | None, now: float, bound: float) -> float | None:
        # A refusal streak at or past the bound is past it for good.
        if since is None:
            return None
        return round(min(now - since, bound), _DIGITS)

    def _stamp(self, stamp: float | None, lane: int, now: float) -> float | None:
        # A stamp older than the lane's interval no longer throttles anything.
        if stamp is None or now - stamp >= self.intervals[lane]:
            return None
        return round(stamp - now, _DIGITS)

    def key(self, view: EngineState, n: int, shadow: _Shadow) -> Hashable:
        """What decides the engine's future, with times relative to the clock.

        A time already passed is clamped to "now" (due, expired, resumable
        alike), and a throttle stamp older than its interval to None. Left
        out: ``attempts``, ``dead_letter_reason`` and ``dead_lettered_at``
        (reported, never read back), anomalies, batch ids, and link failures
        past the count after which every pause is the capped one. Each part
        is interned to a small int, so a key costs a few words.
        """
        now = self.now(n)
        parts: list[Hashable] = []
        sessions = view.sessions
        blame = view.blame
        marks = blame.marks
        accepted = blame.accepted
        changed = shadow.changed
        for sid in self.ids:
            rec = sessions.get(sid)
            if rec is None:
                parts.append(None)
                continue
            retry = rec.retry_at
            if retry is not None:
                retry = round(retry - now, _DIGITS) if retry > now else 0.0
            mark = marks.get(sid)
            parts.append(
                (
                    rec.state,
                    rec.lane,
                    rec.counts,
                    retry,
                    rec.dirty,
                    sid in changed,
                    None if mark is None else mark < accepted,
                    sid in shadow.marked,
                    sid in shadow.witnessed,
                    sid in shadow.bad,
                    sid in shadow.exposed,
                )
            )
        ready = view.ready
        for lane in _LANES:
            parts.append(ready[lane])
        # The release order, in which ties in retry_at are broken by session id.
        retry_order = view.retry
        if retry_order:
            parts.append(
                tuple(
                    sid
                    for at, sid in retry_order
                    if sessions[sid].state is _BACKOFF and sessions[sid].retry_at == at
                )
            )
        else:
            parts.append(())
        losses = view.link_losses
        lost = shadow.lost
        probe = blame.probe
        parts.append(
            tuple(
                (
                    ob.lane,
                    _until(ob.deadline, now),
                    ob.pending,
                    ob.losses != losses,
                    ob.id in lost,
                    ob.accepted < accepted,
                    ob.id == probe,
                )
                for ob in view.batches
            )
        )
        bound = self.policy.max_relay_refusal_s
        cuts = blame.cuts
        parts.append(
            (
                tuple(cuts[lane] for lane in _LANES),
                self._since(blame.refusing_since, now, bound),
                self._since(shadow.refusing_since, now, bound),
                shadow.throttling,
            )
        )
        stamp = self._stamp
        stamps = view.stamps
        link = view.link
        resume = link.resume_at
        if resume is not None:
            resume = round(resume - now, _DIGITS) if resume > now else 0.0
        parts.append(
            (
                stamp(stamps[_LANES[0]], 0, now),
                stamp(stamps[_LANES[1]], 1, now),
                stamp(shadow.stamps[0], 0, now),
                stamp(shadow.stamps[1], 1, now),
                link.state,
                min(link.failures, self.failures_cap),
                resume,
            )
        )
        # The paced redrive: who is scheduled, and whether it drained this tick.
        redrive = view.redrive
        queue = redrive.scheduled
        last = redrive.last
        if last is not None and now - last >= self.tick_s:
            last = None
        elif last is not None:
            last = round(last - now, _DIGITS)
        # Dead letters are scheduled oldest first, so their order matters then.
        dead = view.dead if self.paced_redrive else ()
        parts.append((queue, redrive.per_tick if queue else 0, last, dead, shadow.scheduled))
        intern = self._intern
        codes = [intern.get(part) for part in parts]
        if None in codes:
            for i, part in enumerate(parts):
                if codes[i] is None:
                    # Look again: an equal part earlier in this key may be new too.
                    code = intern.get(part)
                    if code is None:
                        code = intern[part] = len(intern)
                    codes[i] = code
        return tuple(codes)

    # ----------------------------------------------------------- the checks

    def next_shadow(
        self,
        shadow: _Shadow,
        action: Action,
        before: EngineState,
        after: EngineState,
        batches: list[Batch] | None,
        now: float,
    ) -> _Shadow:
        stamps = list(shadow.stamps)
        changed = set(shadow.changed)
        if action[0] == "enqueue":
            rec = before.sessions.get(action[1])
            if rec is not None and rec.state is _IN_FLIGHT:
                changed.add(action[1])
        for batch in batches or ():
            stamps[_LANES.index(batch.lane)] = now
            changed.difference_update(batch.session_ids)
        # Only a session still in flight carries a stale ack.
        sessions = after.sessions
        changed = {sid for sid in changed if sessions[sid].state is _IN_FLIGHT}
        open_now = {ob.id for ob in after.batches}
        if action[0] == "relay_unavailable" or action[-1] == "RelayUnavailable":
            lost = frozenset(open_now)
        else:
            lost = frozenset(bid for bid in shadow.lost if bid in open_now)
        # "The dead letters there are now": a schedule covers those, for as
        # long as they stay dead.
        scheduled = set(shadow.scheduled)
        if action[0] == "schedule_redrive":
            scheduled.update(before.dead)
        scheduled = {sid for sid in scheduled if sessions[sid].state is _DEAD}
        # Blame: who got Ok, who failed, in this action.
        marked, witnessed = set(shadow.marked), set(shadow.witnessed)
        since = shadow.refusing_since
        received = self.received(action, before, batches, shadow, now)
        oks = [sid for sid, got in received.items() if got == "Ok"]
        failed = [sid for sid, got in received.items() if got not in ("Ok", "RelayUnavailable")]
        if oks:
            witnessed = set(self.ids)
            marked.difference_update(oks)
            since = None
        elif failed and since is None:
            since = now
        for sid in failed:
            if sessions[sid].state is _DEAD:
                marked.discard(sid)
            else:
                marked.add(sid)
            witnessed.discard(sid)
        for batch in batches or ():
            for sid in batch.session_ids:
                if sid not in marked:
                    witnessed.discard(sid)
        exposed = set(shadow.exposed).difference(oks)
        if self.relay and since is not None and now - since >= self.policy.max_relay_refusal_s:
            exposed.update(
                sid
                for sid, rec in before.sessions.items()
                if rec.state is not _SYNCED and rec.state is not _DEAD
            )
        # Only sessions with a mark, or in flight, can be judged: drop the rest.
        relevant = marked | {sid for sid, rec in sessions.items() if rec.state is _IN_FLIGHT}
        bad = shadow.bad
        if action[0] == "enqueue" and len(action) > 3 and action[3] == "bad":
            bad = bad | {action[1]}
        throttling = shadow.throttling
        if action[0] == "throttle_on":
            throttling = True
        elif action[0] == "throttle_off":
            throttling = False
        return _Shadow(
            (stamps[0], stamps[1]),
            frozenset(changed),
            lost,
            frozenset(scheduled),
            frozenset(marked),
            frozenset(witnessed & relevant),
            since,
            bad,
            throttling,
            frozenset(exposed),
        )

    def received(
        self,
        action: Action,
        before: EngineState,
        batches: list[Batch] | None,
        shadow: _Shadow,
        now: float,
    ) -> dict[str, str]:
        """What each session was answered in this action, by ack kind name."""
        kind = action[0]
        if kind == "ack":
            answered: str = action[2]
            return dict.fromkeys(_open_batch(before, action[1]).pending, answered)
        if kind == "ack_session":
            return {action[2]: action[3]}
        if kind == "answer":
            answer = action[3]
            if isinstance(answer, str):
                return dict.fromkeys(_open_batch(before, action[1]).pending, answer)
            return dict(answer)
        received: dict[str, str] = {}
        if batches is not None:
            # The engine times out overdue batches: charged, unless the link
            # was lost after the batch left (the outage ate its ack).
            for ob in before.batches:
                if ob.deadline is not None and ob.deadline <= now:
                    why = "RelayUnavailable" if ob.id in shadow.lost else "AckTimeout"
                    received.update(dict.fromkeys(ob.pending, why))
        return received

    def spared(
        self,
        action: Action,
        before: EngineState,
        received: dict[str, str],
        shadow: _Shadow,
        now: float,
    ) -> dict[str, str]:
        """Failed sessions that must not be charged, and the invariant that says so.

        The checker's own reading of the blame rule, from what it saw: a
        failure answered for several sessions at once is shared (invariant
        11); otherwise a session is charged only if the relay accepted
        another since its previous attempt, in this answer included, or
        accepted nothing for ``max_relay_refusal_s`` (invariant 12).
        """
        failed = {sid: got for sid, got in received.items() if got not in _NOT_FAILURES}
        if not failed:
            return {}
        oks = any(got == "Ok" for got in received.values())
        since = None if oks or shadow.refusing_since is None else shadow.refusing_since
        past = now - (now if since is None else since) >= self.policy.max_relay_refusal_s
        out: dict[str, str] = {}
        groups: list[dict[str, str]] = []
        kind = action[0]
        whole = kind == "ack" or (kind == "answer" and isinstance(action[3], str))
        if kind == "tick" or kind == "advance":
            # Each overdue batch is judged on its own, as one whole answer.
            for ob in before.batches:
                group = {sid: failed[sid] for sid in ob.pending if sid in failed}
                if group:
                    groups.append(group)
            whole = True
        else:
            groups.append(failed)
        for group in groups:
            several = len(group) >= 2
            kinds = set(group.values())
            alike = len(kinds) == 1 and len(group) == len(received)
            shared = several and (whole or (alike and not past and not oks))
            for sid in group:
                if shared:
                    out[sid] = "inv11_shared_failure_not_charged"
                elif not past and not oks and sid not in shadow.witnessed:
                    out[sid] = "inv12_charged_only_on_evidence"
        return out

    def check_state(
        self, engine: Engine, view: EngineState, shadow: _Shadow
    ) -> list[tuple[str, str]]:
        """Invariants that hold in every state, whatever led to it (``view``
        is ``engine.inspect()``)."""
        found: list[tuple[str, str]] = []
        try:
            engine.check()
        except InvariantViolation as exc:
            found.append((exc.key, f"Engine.check(): {exc}"))
        policy = self.policy
        for sid, rec in view.sessions.items():
            state = rec.state
            if state is _DEAD and (any(rec.counts) or rec.retry_at is not None):
                found.append(
                    (
                        "inv3_dead_letter_clean",
                        f"{sid!r} dead-lettered with counts {_counts(rec.counts)} "
                        f"and retry_at {rec.retry_at}",
                    )
                )
            if state is _SYNCED and (any(rec.counts) or rec.retry_at is not None):
                found.append(
                    (
                        "inv2_reset_on_success",
                        f"{sid!r} synced with counts {_counts(rec.counts)} "
                        f"and retry_at {rec.retry_at}",
                    )
                )
            if (rec.retry_at is not None) != (state is _BACKOFF):
                found.append(
                    ("inv10_retry_at_and_counts", f"{sid!r} {state} with retry_at {rec.retry_at}")
                )
            for i, reason in enumerate(CHARGED_REASONS):
                rp = policy.reason(reason)
                limit = rp.threshold if rp.retryable else 1
                if rec.counts[i] >= limit:
                    found.append(
                        (
                            "inv7_dead_letter_at_threshold",
                            f"{sid!r} {state} with {reason} count {rec.counts[i]}, "
                            f"at or past its threshold {limit}",
                        )
                    )
            if state is _IN_FLIGHT and rec.dirty != (sid in shadow.changed):
                found.append(
                    (
                        "inv8_no_lost_update",
                        f"{sid!r} in flight with dirty={rec.dirty}, but it "
                        f"{'was' if sid in shadow.changed else 'was not'} changed since sent",
                    )
                )
        link = view.link
        if link.state is LinkState.PAUSED and link.resume_at is None:
            found.append(("inv6_no_starvation", "link paused with no resume time"))
        if link.state is LinkState.THROTTLED and link.resume_at is None:
            found.append(("inv13_one_probe_per_wait", "link throttled with no end to its wait"))
        return found

    def check_step(
        self,
        action: Action,
        before: EngineState,
        after: EngineState,
        batches: list[Batch] | None,
        shadow: _Shadow,
        shadow_after: _Shadow,
        now: float,
    ) -> list[tuple[str, str]]:
        """Invariants about what one action did, session by session.

        ``now`` is the time of the engine call; ``batches`` is None unless
        the engine was ticked.
        """
        found: list[tuple[str, str]] = []
        kind = action[0]
        old = before.sessions
        new = after.sessions
        ticked = batches is not None

        # What each session was answered in this action, if anything, and
        # which of the failures must not be charged.
        received = self.received(action, before, batches, shadow, now)
        spared = self.spared(action, before, received, shadow, now)
        sent = {sid for batch in batches or () for sid in batch.session_ids}
        # Dead letters the paced redrive revived in this tick: those whose
        # schedule entry the tick used up, dead before it or dead-lettered by it.
        revived: set[str] = set()
        if ticked:
            for sid in set(before.redrive.scheduled).difference(after.redrive.scheduled):
                got = received.get(sid)
                died = got is not None and self._exhausts(old[sid], got)
                if new[sid].state is not _DEAD and (old[sid].state is _DEAD or died):
                    revived.add(sid)
            for sid in sorted(revived - shadow.scheduled):
                found.append(
                    (
                        "paced_redrive_as_scheduled",
                        f"{sid!r} revived by the paced redrive at {now:g}, but no "
                        "schedule_redrive covered it since it was last dead-lettered",
                    )
                )
            if len(revived) > before.redrive.per_tick:
                found.append(
                    (
                        "paced_redrive_as_scheduled",
                        f"a tick revived {sorted(revived)}, more than "
                        f"{before.redrive.per_tick} per tick",
                    )
                )

        for sid, pre in old.items():
            post = new.get(sid)
            if post is None:
                found.append(("inv1_one_place", f"{sid!r} vanished"))
                continue
            found.extend(
                self._check_session(
                    sid,
                    pre,
                    post,
                    received.get(sid),
                    sid in sent,
                    kind,
                    ticked,
                    shadow,
                    now,
                    sid in revived,
                    spared.get(sid),
                )
            )
        if self.relay:
            for sid, pre in old.items():
                post = new[sid]
                if (
                    sid not in shadow_after.bad and post.state is _DEAD and pre.state is not _DEAD
                ) and sid not in shadow_after.exposed:
                    found.append(
                        (
                            "blame_good_never_dead",
                            f"good session {sid!r} dead-lettered at {now:g} by {kind}, "
                            "though the relay never refused everything for "
                            f"{self.policy.max_relay_refusal_s:g} s since its last Ok",
                        )
                    )
        for sid in new.keys() - old.keys():
            if not (kind == "enqueue" and action[1] == sid):
                found.append(("inv1_one_place", f"{sid!r} appeared without an enqueue"))
        if ticked:
            assert batches is not None
            found.extend(self._check_tick(after, batches, shadow_after, now))
            found.extend(self._check_probe(before, after, batches, now))
        for i, lane in enumerate(_LANES):
            if after.stamps[lane] != shadow_after.stamps[i]:
                found.append(
                    (
                        "inv9_stamp_only_with_batch",
                        f"{lane} throttle stamped {after.stamps[lane]} by {kind}, but its "
                        f"last batch was formed at {shadow_after.stamps[i]}",
                    )
                )
        return found

    def _check_probe(
        self, before: EngineState, after: EngineState, batches: list[Batch], now: float
    ) -> list[tuple[str, str]]:
        """Invariant 13: a throttled link waits, then sends one probe at a time."""
        state = after.link.state
        if state is LinkState.UP or state is LinkState.PAUSED:
            return []  # a charge or an Ok re-opened the link in this tick
        allowed = 1 if state is LinkState.PROBING else 0
        probes = sum(ob.probe for ob in after.batches)
        if len(batches) > allowed or any(not b.probe for b in batches) or probes > 1:
            return [
                (
                    "inv13_one_probe_per_wait",
                    f"a tick at {now:g} left the link {state} (it was "
                    f"{before.link.state}, resume_at {before.link.resume_at}) and sent "
                    f"{len(batches)} batch(es), {sum(b.probe for b in batches)} marked probe, "
                    f"with {probes} probe(s) out; at most {allowed} allowed",
                )
            ]
        return []

    def _exhausts(self, pre: SessionRecord, got: str) -> bool:
        """Whether an ack of kind ``got`` dead-letters a session like ``pre``."""
        if got not in CHARGED_REASONS:
            if got != _HINTED:
                return False
            got = "RateLimited"
        rp = self.policy.reason(got)
        count = pre.counts[CHARGED_REASONS.index(got)] + 1
        return not rp.retryable or count >= rp.threshold

    def _delay(self, reason: str, count: int, hint: float | None = None) -> float:
        """The backoff the policy prescribes for the count-th ``reason``."""
        rp = self.policy.reason(reason)
        return min(rp.delay(count, hint, self.rng), self.policy.max_backoff_s)

    def _check_session(
        self,
        sid: str,
        pre: SessionRecord,
        post: SessionRecord,
        got: str | None,
        sent: bool,
        kind: str,
        ticked: bool,
        shadow: _Shadow,
        now: float,
        revived: bool,
        spared: str | None = None,
    ) -> list[tuple[str, str]]:
        """One session across one action. ``got``: the ack it was answered
        with (None: none); ``sent``: it went out in a batch of this tick;
        ``revived``: the tick's paced redrive brought it back from dead
        (checked on its own, in ``check_step``); ``spared``: its failure must
        not be charged, by the invariant named."""
        found: list[tuple[str, str]] = []
        due = pre.state is _BACKOFF and pre.retry_at is not None and pre.retry_at <= now
        if got is not None and pre.state is not _IN_FLIGHT:
            found.append(("inv1_one_place", f"{sid!r} answered while {pre.state}"))
            return found
        if got == "Ok":
            if any(post.counts) or post.retry_at is not None:
                found.append(
                    (
                        "inv2_reset_on_success",
                        f"{sid!r} Ok left counts {_counts(post.counts)} "
                        f"and retry_at {post.retry_at}",
                    )
                )
            if sid in shadow.changed and post.state is _SYNCED:
                found.append(
                    (
                        "inv8_no_lost_update",
                        f"{sid!r} changed while in flight, but the Ok for the stale "
                        "payload marked it synced",
                    )
                )
            if post.state is not _SYNCED and post.state is not _QUEUED:
                found.append(("inv2_reset_on_success", f"{sid!r} Ok left it {post.state}"))
            return found
        if got == "RelayUnavailable":
            if post.counts != pre.counts:
                found.append(
                    (
                        "inv4_transport_not_charged",
                        f"{sid!r} RelayUnavailable changed counts "
                        f"{_counts(pre.counts)} -> {_counts(post.counts)}",
                    )
                )
            if not (post.state is _QUEUED or (sent and post.state is _IN_FLIGHT)):
                found.append(
                    ("inv4_transport_not_charged", f"{sid!r} RelayUnavailable left it {post.state}")
                )
            return found
        if got is not None and spared is not None:
            if post.counts != pre.counts or not (
                post.state is _QUEUED or (sent and post.state is _IN_FLIGHT)
            ):
                found.append(
                    (
                        spared,
                        f"{sid!r} {got} (not its own failure) took counts "
                        f"{_counts(pre.counts)} -> {_counts(post.counts)} and left it "
                        f"{post.state}",
                    )
                )
            return found
        if got is not None:
            ack = _RELAY_ACKS[got]
            got = type(ack).__name__
            i = REASON_INDEX[type(ack)]
            rp = self.policy.reason(got)
            count = pre.counts[i] + 1
            limit = rp.threshold if rp.retryable else 1
            if count >= limit:
                if revived:
                    return found
                if post.state is not _DEAD or post.dead_letter_reason != got:
                    found.append(
                        (
                            "inv7_dead_letter_at_threshold",
                            f"{sid!r} {got} #{count} reached its threshold {limit}, but it "
                            f"is {post.state} (dead_letter_reason {post.dead_letter_reason})",
                        )
                    )
                return found
            if post.state is _DEAD:
                found.append(
                    (
                        "inv7_dead_letter_at_threshold",
                        f"{sid!r} dead-lettered by {got} #{count}, below its threshold {limit}",
                    )
                )
                return found
            want = (*pre.counts[:i], count, *pre.counts[i + 1 :])
            if post.counts != want:
                found.append(
                    (
                        "inv10_retry_at_and_counts",
                        f"{sid!r} {got} took counts {_counts(pre.counts)} -> "
                        f"{_counts(post.counts)}, expected {_counts(want)}",
                    )
                )
            hint = ack.retry_after_s if isinstance(ack, acks.RateLimited) else None
            retry_at = now + self._delay(got, count, hint)
            if sent or post.state is _QUEUED:
                # Released (and maybe sent) in this same tick: only a zero
                # backoff allows that.
                if not ticked or retry_at > now:
                    found.append(
                        (
                            "inv5_no_send_before_retry",
                            f"{sid!r} {got} at {now:g} must wait until {retry_at:g}, "
                            f"but it is {post.state} at once",
                        )
                    )
            elif post.state is not _BACKOFF or post.retry_at != retry_at:
                found.append(
                    (
                        "inv5_no_send_before_retry",
                        f"{sid!r} {got} #{count} at {now:g} left it {post.state} with "
                        f"retry_at {post.retry_at}; the policy says backoff until {retry_at:g}",
                    )
                )
            return found

        # Nothing answered this session.
        if post.state is _DEAD and pre.state is not _DEAD:
            found.append(
                ("inv7_dead_letter_at_threshold", f"{sid!r} dead-lettered by {kind} without an ack")
            )
        if post.counts != pre.counts and not (kind == "redrive" and not any(post.counts)):
            found.append(
                (
                    "inv4_transport_not_charged"
                    if kind.startswith("relay_")
                    else "inv10_retry_at_and_counts",
                    f"{sid!r} {kind} changed counts {_counts(pre.counts)} -> "
                    f"{_counts(post.counts)} without an ack",
                )
            )
        # A tick may revive a dead letter by a paced redrive and send it at once.
        if sent and not (pre.state is _QUEUED or due or revived):
            found.append(
                (
                    "inv5_no_send_before_retry",
                    f"{sid!r} sent at {now:g} while {pre.state} (retry_at {pre.retry_at})",
                )
            )
        if pre.state is _BACKOFF and not due and post.state is not _BACKOFF:
            found.append(
                (
                    "inv5_no_send_before_retry",
                    f"{sid!r} left backoff at {now:g} by {kind}, before its retry_at "
                    f"{pre.retry_at}",
                )
            )
        if ticked and due and post.state is _BACKOFF:
            found.append(
                (
                    "inv6_no_starvation",
                    f"{sid!r} still backed off after a tick at {now:g}, past its retry_at "
                    f"{pre.retry_at}",
                )
            )
        return found

    def _check_tick(
        self, after: EngineState, batches: list[Batch], shadow: _Shadow, now: float
    ) -> list[tuple[str, str]]:
        """After a tick: batches well formed, and nothing left that could go."""
        found: list[tuple[str, str]] = []
        new = after.sessions
        policy = self.policy
        sizes = (policy.batch_size, policy.backfill_batch_size)
        for batch in batches:
            if not batch.session_ids:
                found.append(("inv9_stamp_only_with_batch", f"empty {batch.lane} batch formed"))
            if len(batch.session_ids) > sizes[_LANES.index(batch.lane)]:
                found.append(("inv1_one_place", f"{batch.lane} batch of {len(batch.session_ids)}"))
            for sid in batch.session_ids:
                if new[sid].lane is not batch.lane:
                    found.append(("inv1_one_place", f"{sid!r} of {new[sid].lane} in {batch.lane}"))
        link = after.link
        if link.state is not LinkState.UP:
            if (link.state is LinkState.PAUSED or link.state is LinkState.THROTTLED) and (
                link.resume_at is not None and link.resume_at <= now
            ):
                found.append(
                    (
                        "inv6_no_starvation",
                        f"link still {link.state} after a tick at {now:g}, past its "
                        f"resume_at {link.resume_at:g}",
                    )
                )
            return found
        if len(after.batches) >= policy.max_in_flight:
            return found
        for i, lane in enumerate(_LANES):
            stamp = shadow.stamps[i]
            if stamp is not None and now - stamp < self.intervals[i]:
                continue
            waiting = [sid for sid, rec in new.items() if rec.state is _QUEUED and rec.lane is lane]
            if waiting:
                found.append(
                    (
                        "inv6_no_starvation",
                        f"a tick at {now:g} left {lane} sessions {waiting} unsent while that "
                        f"lane may send ({len(after.batches)} of {policy.max_in_flight} "
                        "batches open, link up)",
                    )
                )
        return found


def _until(at: float | None, now: float) -> float | None:
    """``at`` relative to ``now``; a time already passed is simply due (0)."""
    if at is None:
        return None
    return round(at - now, _DIGITS) if at > now else 0.0


def _open_batch(view: EngineState, batch_id: int) -> OpenBatchState:
    for ob in view.batches:
        if ob.id == batch_id:
            return ob
    raise KeyError(batch_id)


def _counts(counts: tuple[int, ...]) -> dict[str, int]:
    return {CHARGED_REASONS[i]: n for i, n in enumerate(counts) if n}


# --------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------


class _Graph:
    """The explored state graph, compactly: what traces and liveness need.

    States are numbered in the order found, which is breadth-first, so a
    lower number is never deeper.
    """

    def __init__(self) -> None:
        self.parent = array("l")
        self.via: list[Action | None] = []
        self.depth = array("l")
        #: 1 once every action from the state was tried.
        self.expanded = bytearray()
        #: Bit i: session i exists and is not at rest.
        self.restless = array("L")
        #: Bit l: lane l has a queued session.
        self.waiting = bytearray()
        #: Bit l: a tick from here formed a batch in lane l.
        self.served = bytearray()
        self.succ: list[tuple[int, ...]] = []
        #: Successors by the clock alone (``tick``, ``advance``).
        self.timed: list[tuple[int, ...]] = []
        #: The relay model: successors by the clock, the relay's answers and
        #: the throttle stopping (no new session, no new throttle).
        self.unforced: list[tuple[int, ...]] = []
        #: Bit i: session i is bad and not dead-lettered yet.
        self.bad_alive = array("L")
        #: Bit i: session i is good and neither synced nor dead-lettered.
        self.good_pending = array("L")
        #: Bit i: session i is good and synced.
        self.good_synced = array("L")
        #: The relay model's throttle is on.
        self.throttling = bytearray()

    def __len__(self) -> int:
        return len(self.parent)

    def add(
        self,
        parent: int,
        via: Action | None,
        depth: int,
        view: EngineState,
        ids: Sequence[str],
        shadow: _Shadow | None = None,
    ) -> int:
        restless = 0
        waiting = 0
        bad_alive = good_pending = good_synced = 0
        bad = shadow.bad if shadow is not None else frozenset()
        sessions = view.sessions
        for i, sid in enumerate(ids):
            rec = sessions.get(sid)
            if rec is None:
                continue
            if rec.state is not _SYNCED and rec.state is not _DEAD:
                restless |= 1 << i
            if rec.state is _QUEUED:
                waiting |= 1 << _LANES.index(rec.lane)
            if sid in bad:
                if rec.state is not _DEAD:
                    bad_alive |= 1 << i
            elif rec.state is _SYNCED:
                good_synced |= 1 << i
            elif rec.state is not _DEAD:
                good_pending |= 1 << i
        self.bad_alive.append(bad_alive)
        self.good_pending.append(good_pending)
        self.good_synced.append(good_synced)
        self.throttling.append(1 if shadow is not None and shadow.throttling else 0)
        self.unforced.append(())
        self.parent.append(parent)
        self.via.append(via)
        self.depth.append(depth)
        self.expanded.append(0)
        self.restless.append(restless)
        self.waiting.append(waiting)
        self.served.append(0)
        self.succ.append(())
        self.timed.append(())
        return len(self.parent) - 1

    def trace(self, node: int) -> tuple[Action, ...]:
        steps: list[Action] = []
        while node > 0:
            via = self.via[node]
            assert via is not None
            steps.append(via)
            node = self.parent[node]
        return tuple(reversed(steps))


def explore(
    sessions: int = 3,
    depth: int | None = None,
    policy: Policy | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    free_clock: bool = False,
    paced_redrive: bool = False,
    relay: bool = False,
    stop_at_first: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> CheckResult:
    """You pass a configuration; you get every reachable state checked.

    ``depth`` bounds the trace length (None: run to the fixpoint).
    ``engine_factory(policy)`` builds the empty engine (default: the real
    one, seeded, logging off); pass a subclass's to check it instead.
    ``free_clock`` lets the clock advance without a tick (a runner that
    sleeps through ticks); by default every advance ticks, as a runner that
    ticks each ``tick_interval_s`` does, and extra ticks may come between.
    ``paced_redrive`` adds ``schedule_redrive(per_tick=1)`` to the actions,
    offered while the engine's redrive queue holds fewer than two entries per
    session (it multiplies the states, so it is opt-in).
    ``relay`` replaces the free choice of acks by the relay model: each
    session arrives good or bad, the environment starts and stops a
    relay-wide throttle, and the relay answers each batch per session or per
    request (with or without Retry-After); it adds the ``blame_*`` and
    ``live_*`` properties of that model.
    ``stop_at_first`` returns at the first violation, with its shortest trace.
    ``progress(depth, states, transitions)`` is called after each level.
    Jitter in the policy is replaced by its upper bound.
    """
    start = time.perf_counter()
    policy = _without_jitter(policy if policy is not None else CHECK_POLICY)
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    if depth is not None and depth < 0:
        raise ValueError(f"depth must be at least 0, got {depth}")
    model = _Model(
        policy,
        sessions,
        engine_factory or _default_factory,
        free_clock=free_clock,
        paced_redrive=paced_redrive,
        relay=relay,
    )
    result = CheckResult(
        sessions=sessions,
        depth=depth,
        policy=policy,
        free_clock=free_clock,
        paced_redrive=paced_redrive,
        relay=relay,
        invariants=tuple(n for n in INVARIANTS if relay or n not in _RELAY_ONLY),
    )
    graph = _Graph()
    found: dict[str, Violation] = {}

    def report(node: int, action: Action | None, problems: Iterable[tuple[str, str]]) -> bool:
        hit = False
        for name, message in problems:
            hit = True
            result.failed_checks += 1
            if name not in found:
                trace = graph.trace(node) + ((action,) if action is not None else ())
                found[name] = Violation(name, message, trace)
        return hit

    root = model.factory(policy)
    root_view = root.inspect()
    shadow0 = _Shadow()
    visited: dict[Hashable, int] = {model.key(root_view, 0, shadow0): 0}
    graph.add(0, None, 0, root_view, model.ids, shadow0)
    result.checks += 1
    frontier: list[tuple[int, _Frozen | Engine, int, _Shadow] | None] = []
    shared = _shared_state(root, model.clone_rng)
    if not report(0, None, model.check_state(root, root_view, shadow0)):
        frontier.append((0, root, 0, shadow0))

    level = 0
    stopped = False
    while frontier and not stopped:
        if depth is not None and level >= depth:
            result.complete = False
            break
        next_frontier: list[tuple[int, _Frozen | Engine, int, _Shadow] | None] = []
        for index, entry in enumerate(frontier):
            # Let go of each engine once expanded: a level can hold a million.
            frontier[index] = None
            assert entry is not None
            node, frozen, n, shadow = entry
            engine = _thaw(frozen)
            view = engine.inspect()
            succ: set[int] = set()
            timed: set[int] = set()
            unforced: set[int] = set()
            for action in model.actions(view, shadow):
                result.transitions += 1
                touches = action[0] != "advance" or not model.free_clock
                child = engine.clone(rng=model.clone_rng) if touches else engine
                try:
                    n2, batches = model.apply(child, n, action)
                except Exception as exc:  # any exception from a valid call is a bug
                    report(node, action, [("no_crash", f"{type(exc).__name__}: {exc}")])
                    continue
                after = child.inspect() if touches else view
                at = model.now(n2)
                shadow2 = model.next_shadow(shadow, action, view, after, batches, at)
                result.checks += 1
                broken = report(
                    node,
                    action,
                    model.check_step(action, view, after, batches, shadow, shadow2, at),
                )
                for batch in batches or ():
                    graph.served[node] |= 1 << _LANES.index(batch.lane)
                key = model.key(after, n2, shadow2)
                target = visited.get(key)
                if target is None:
                    target = graph.add(node, action, level + 1, after, model.ids, shadow2)
                    visited[key] = target
                    result.checks += 1
                    problems = model.check_state(child, after, shadow2)
                    broken = report(target, None, problems) or broken
                    # A state reached by a broken step is not explored further:
                    # whatever follows is a consequence of the first violation.
                    if not broken:
                        next_frontier.append((target, _freeze(child, shared), n2, shadow2))
                if target != node:
                    succ.add(target)
                    if action[0] == "tick" or action[0] == "advance":
                        timed.add(target)
                    if action[0] in _UNFORCED:
                        unforced.add(target)
                if stop_at_first and found:
                    stopped = True
                    break
            graph.expanded[node] = not stopped
            graph.succ[node] = tuple(succ)
            graph.timed[node] = tuple(timed)
            graph.unforced[node] = tuple(unforced)
            if stopped:
                break
        frontier = next_frontier
        level += 1
        if progress is not None:
            progress(level, len(graph), result.transitions)
    if stopped:
        result.complete = False
    result.states = len(graph)
    result.max_depth = graph.depth[-1]
    if not stopped:
        for name, message, node in _liveness(graph, model):
            result.checks += 1
            result.failed_checks += 1
            if name not in found:
                found[name] = Violation(name, message, graph.trace(node))
        result.checks += len(graph) * (len(model.ids) + len(_LANES))
    result.violations = sorted(found.values(), key=lambda v: (len(v.trace), v.invariant))
    result.seconds = time.perf_counter() - start
    return result


def _reach(preds: list[list[int]], goal: Iterable[int]) -> bytearray:
    """Every node from which a goal node is reachable (backward search)."""
    seen = bytearray(len(preds))
    stack = list(goal)
    for node in stack:
        seen[node] = 1
    while stack:
        node = stack.pop()
        for p in preds[node]:
            if not seen[p]:
                seen[p] = 1
                stack.append(p)
    return seen


def _predecessors(succ: list[tuple[int, ...]]) -> list[list[int]]:
    preds: list[list[int]] = [[] for _ in succ]
    for node, targets in enumerate(succ):
        for target in targets:
            preds[target].append(node)
    return preds


def _liveness(graph: _Graph, model: _Model) -> list[tuple[str, str, int]]:
    """Liveness on the explored graph, shallowest counterexample first.

    A state that was not expanded (cut off by the depth bound, or reached by
    a broken step) counts as able to reach anything: the search cannot tell.
    """
    size = len(graph)
    out: list[tuple[str, str, int]] = []
    unknown = [n for n in range(size) if not graph.expanded[n]]
    preds = _predecessors(graph.succ)
    for i, sid in enumerate(model.ids):
        bit = 1 << i
        goal = [n for n in range(size) if not graph.restless[n] & bit]
        can = _reach(preds, goal + unknown)
        bad = next((n for n in range(size) if not can[n]), None)
        if bad is not None:
            out.append(
                (
                    "live_session_can_rest",
                    f"from here {sid!r} can never reach synced or dead_lettered, "
                    "whatever the relay answers",
                    bad,
                )
            )
    del preds
    # In the relay model the relay must answer a batch of good sessions
    # before its deadline, so time alone may not be enough: its answers count.
    timed_preds = _predecessors(graph.unforced if model.relay else graph.timed)
    for i, lane in enumerate(_LANES):
        bit = 1 << i
        goal = [n for n in range(size) if graph.served[n] & bit]
        can = _reach(timed_preds, goal + unknown)
        bad = next((n for n in range(size) if graph.waiting[n] & bit and not can[n]), None)
        if bad is not None:
            out.append(
                (
                    "live_lane_served",
                    f"from here {lane} has a queued session, but no run of ticks and "
                    "clock advances ever forms a batch in it",
                    bad,
                )
            )
    if model.relay:
        out.extend(_relay_liveness(graph, model, unknown))
    return out


def _relay_liveness(graph: _Graph, model: _Model, unknown: list[int]) -> list[tuple[str, str, int]]:
    """The relay model's liveness, over the clock, the relay's answers and the
    throttle stopping alone: bad sessions can still die, good ones still sync."""
    size = len(graph)
    out: list[tuple[str, str, int]] = []
    preds = _predecessors(graph.unforced)
    for i, sid in enumerate(model.ids):
        bit = 1 << i
        goal = [n for n in range(size) if graph.bad_alive[n] & bit == 0]
        can = _reach(preds, goal + unknown)
        bad = next((n for n in range(size) if graph.bad_alive[n] & bit and not can[n]), None)
        if bad is not None:
            out.append(
                (
                    "live_bad_dies",
                    f"from here bad session {sid!r} can never be dead-lettered by time "
                    "and the relay's answers alone",
                    bad,
                )
            )
        goal = [n for n in range(size) if graph.good_synced[n] & bit]
        can = _reach(preds, goal + unknown)
        bad = next(
            (
                n
                for n in range(size)
                if graph.good_pending[n] & bit and not graph.throttling[n] and not can[n]
            ),
            None,
        )
        if bad is not None:
            out.append(
                (
                    "live_good_syncs",
                    f"from here, the throttle off, good session {sid!r} can never be "
                    "synced by time and the relay's answers alone",
                    bad,
                )
            )
    return out


# --------------------------------------------------------------------------
# Replay
# --------------------------------------------------------------------------


@dataclass
class Replay:
    """A trace run again: the engine at its end and what broke on the way."""

    engine: Engine
    now: float
    #: (index of the action in the trace, or -1 for the empty engine, violation)
    violations: list[tuple[int, Violation]]

    @property
    def broken(self) -> list[str]:
        """The names of the broken properties, in order, without repeats."""
        return list(dict.fromkeys(v.invariant for _, v in self.violations))


def replay(
    trace: Iterable[Sequence[Any]],
    policy: Policy | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    free_clock: bool = False,
    relay: bool = False,
) -> Replay:
    """You pass a trace (from a report, or JSON lists); every step is re-checked.

    Runs the trace from the empty engine with the same checks as
    :func:`explore` and returns every violation met on the way. Pass the
    ``policy``, ``engine_factory`` and ``free_clock`` that found the trace.
    Liveness is a property of the whole graph: a liveness trace replays to
    its state with no violation of its own.
    """
    policy = _without_jitter(policy if policy is not None else CHECK_POLICY)
    steps = tuple(tuple(a) for a in trace)
    # The model must know as many sessions as the trace names, as explore's
    # did: the blame shadow ("the relay accepted others") ranges over them.
    named = [int(a[1][1:]) for a in steps if a and a[0] == "enqueue"]
    model = _Model(
        policy,
        max(named, default=-1) + 1,
        engine_factory or _default_factory,
        free_clock=free_clock,
        relay=relay,
    )
    engine = model.factory(policy)
    view = engine.inspect()
    shadow = _Shadow()
    n = 0
    out: list[tuple[int, Violation]] = []
    for name, message in model.check_state(engine, view, shadow):
        out.append((-1, Violation(name, message, ())))
    for index, action in enumerate(steps):
        try:
            n, batches = model.apply(engine, n, action)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            out.append((index, Violation("no_crash", message, steps[: index + 1])))
            break
        after = engine.inspect()
        at = model.now(n)
        shadow_after = model.next_shadow(shadow, action, view, after, batches, at)
        problems = model.check_step(action, view, after, batches, shadow, shadow_after, at)
        problems += model.check_state(engine, after, shadow_after)
        for name, message in problems:
            out.append((index, Violation(name, message, steps[: index + 1])))
        view, shadow = after, shadow_after
    return Replay(engine=engine, now=model.now(n), violations=out)


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def describe_trace(
    trace: Sequence[Action], tick_s: float, *, free_clock: bool = False
) -> list[str]:
    """One line per action, with the clock at which it ran."""
    lines = []
    n = 0
    for i, action in enumerate(trace):
        text = " ".join(str(a) for a in action)
        if action[0] == "advance":
            n += 1
            text += f" (to t={n * tick_s:g}{'' if free_clock else ', then tick'})"
            lines.append(f"{i:3d}  {text}")
        else:
            lines.append(f"{i:3d}  t={n * tick_s:<4g} {text}")
    return lines


def format_result(result: CheckResult, *, policy_source: str | None = None) -> str:
    """The human report of ``sessionfsm check``.

    ``policy_source`` is the Python expression for the policy, if not the
    built-in one, so that each printed trace replays as written.
    """
    policy = result.policy
    bound = "none (the whole reachable space)" if result.depth is None else str(result.depth)
    clock = "free (may advance without a tick)" if result.free_clock else "ticks every advance"
    redrive = "redrive and paced redrive" if result.paced_redrive else "redrive"
    if result.relay:
        redrive = "the relay model (good/bad sessions, per-session or per-request, throttles)"
    lines = [
        f"sessionfsm check: {result.sessions} session(s), both lanes, {redrive}, "
        f"depth bound {bound}",
        f"  policy: batch {policy.batch_size}/{policy.backfill_batch_size}, "
        f"intervals {policy.incremental_interval_s:g}/{policy.backfill_interval_s:g} s, "
        f"max in flight {policy.max_in_flight}, ack timeout {policy.ack_timeout_s:g} s, "
        f"tick {policy.tick_interval_s:g} s; clock {clock}",
        f"  thresholds: AckTimeout {policy.ack_timeout.threshold} "
        f"({policy.ack_timeout.backoff.describe()}), "
        f"RateLimited {policy.rate_limited.threshold} "
        f"({policy.rate_limited.backoff.describe()}), "
        f"PayloadTooLarge {policy.payload_too_large.threshold}"
        f"{'' if policy.payload_too_large.retryable else ' (non-retryable)'}",
        f"  reachable states:     {result.states}"
        + ("" if result.complete else " (not all: cut short)"),
        f"  transitions explored: {result.transitions}",
        f"  deepest state:        {result.max_depth} actions from the start",
        f"  invariants checked:   {len(result.invariants)} properties "
        f"({', '.join(result.invariants)}), {result.checks} checks",
        f"  time:                 {result.seconds:.2f} s",
    ]
    if result.ok:
        lines.append(
            "  all properties hold"
            + (" in the whole reachable space" if result.complete else " up to the depth bound")
        )
        return "\n".join(lines)
    lines.append(f"  VIOLATIONS: {len(result.violations)}")
    extra = "" if policy_source is None else f", policy={policy_source}"
    if result.free_clock:
        extra += ", free_clock=True"
    if result.relay:
        extra += ", relay=True"
    for v in result.violations:
        lines.append("")
        lines.append(f"{v.invariant}: {v.message}")
        lines.append(f"  shortest trace ({len(v.trace)} actions):")
        lines.extend(
            "  " + line
            for line in describe_trace(
                v.trace, policy.tick_interval_s, free_clock=result.free_clock
            )
        )
        call = f"replay({json.dumps([list(a) for a in v.trace])}{extra})"
        if v.invariant.startswith("live_"):
            # Liveness belongs to the whole graph: the trace only reaches the state.
            lines.append(f"  reach it: from sessionfsm.tools.check import replay; {call}")
        else:
            lines.append("  as a test (fails until fixed):")
            lines.append(
                f"    from sessionfsm.tools.check import replay; assert not {call}.violations"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


@click.command("check")
@click.option(
    "--sessions",
    type=click.IntRange(1, 8),
    default=3,
    show_default=True,
    help="How many sessions (s0, s1, ...), each enqueued in either lane.",
)
@click.option(
    "--depth",
    type=click.IntRange(min=0),
    default=None,
    help="Bound the trace length (default: explore the whole reachable space).",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy TOML to check (default: the small built-in policy). Jitter is turned off.",
)
@click.option(
    "--free-clock",
    is_flag=True,
    help="Let the clock advance without a tick too (a runner that sleeps through ticks).",
)
@click.option(
    "--paced-redrive",
    is_flag=True,
    help="Also schedule paced redrives (schedule_redrive); about three times the states.",
)
@click.option(
    "--relay",
    is_flag=True,
    help="Answer with the relay model (good and bad sessions, per-session or per-request "
    "answers, a relay-wide throttle) instead of any ack, and prove the blame properties.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Report each explored depth on stderr (the default run takes minutes).",
)
def command(
    sessions: int,
    depth: int | None,
    policy_path: Path | None,
    free_clock: bool,
    paced_redrive: bool,
    relay: bool,
    as_json: bool,
    progress: bool,
) -> None:
    """Explore every reachable state of a small configuration and check every invariant.

    Breadth-first over the real engine: enqueue, tick, every ack per batch
    and per session, engine timeouts, relay up/down, redrive and the clock.
    Prints the states, transitions, properties checked and time; each
    violation comes with its shortest trace. Exits 1 if any property fails.
    """
    policy = load_policy(policy_path) if policy_path is not None else CHECK_POLICY

    def report(level: int, states: int, transitions: int) -> None:
        click.echo(f"depth {level}: {states} states, {transitions} transitions", err=True)

    if progress:
        # The default (3 sessions) explores about 1.4 million states: minutes.
        click.echo(
            f"check: exploring every reachable state with {sessions} session"
            f"{'' if sessions == 1 else 's'}; progress by depth below "
            "(--sessions 2 takes seconds, 3 about ten minutes)",
            err=True,
        )

    result = explore(
        sessions,
        depth,
        policy,
        free_clock=free_clock,
        paced_redrive=paced_redrive,
        relay=relay,
        progress=report if progress else None,
    )
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        source = f"load_policy({str(policy_path)!r})" if policy_path is not None else None
        click.echo(format_result(result, policy_source=source))
    if result.violations:
        raise SystemExit(1)
