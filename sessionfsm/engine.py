"""The sans-IO engine: you pass time and acks in, it hands batches out.

The engine reads no clock, opens no socket, writes no file and never sleeps.
``tick(now)`` returns the batches to send; ``on_ack(batch_id, ack, now)``
takes what came back. Every public call follows the same order (h11's
snapshot -> change -> react):

1. read the record's old state;
2. fire the declared transition through the runtime (:mod:`sessionfsm.machine`
   says what it does);
3. queue the difference in the journal; at the end of the call ``_commit``
   hands all of it to the logger, the store and the listeners
   (:mod:`sessionfsm.listeners`) in one place.

Rooms
-----
The engine keeps only the hot path inline: firing a transition (``_fire``)
and placing the session where its new state says. Each other concern lives
in a room of :mod:`sessionfsm.rooms`, which holds no reference back:

* ``_lanes`` (:class:`~sessionfsm.rooms.Lanes`): the ready queue of each lane,
  the retry heap, the throttle stamps and the parts of split batches; which
  lane sends next. A tick pops only what is due, so it costs
  O(batch + due · log n), however many sessions wait.
* ``_batches`` (:class:`~sessionfsm.rooms.OpenBatches`): the open batches,
  their deadlines, the probe, and which batch ids closed.
* ``_blame`` (:class:`~sessionfsm.rooms.Blame`): the evidence weighed before
  a failure is charged, and the rule for a shared failure.
* ``_paced`` (:class:`~sessionfsm.rooms.PacedRedrive`): the paced redrive.
* ``_journal`` (:class:`~sessionfsm.rooms.Journal`): the call's changes, the
  store and the listeners.

Blame
-----
Before firing a failure, ``on_ack`` and the deadline decide whether it was
*shared* by several sessions (``Blame.verdict``), and what the blame guards of
:mod:`sessionfsm.machine` need to know: how many sessions the relay has
accepted, ever, each failed session's mark (that count when its previous
attempt ended) and since when the relay has accepted nothing. A shared
failure that is not a throttle is split: its sessions go back to the head of
their lane in halves, and the lane's cuts hold the sizes of those parts, so
that the next batches of the lane are exactly the parts (``docs/blame.md``).
"""

from __future__ import annotations

import contextlib
import copy
import random
import reprlib
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from heapq import heapify, heappush
from typing import Any, Final

import msgspec

from . import acks
from ._errors import (
    InvalidAck,
    InvariantViolation,
    TransitionNotAllowed,
    UnknownSession,
    UsageError,
)
from ._log import get_logger
from .inspection import BlameState, EngineState, OpenBatchState, RedriveState
from .listeners import BatchEvent, Listener
from .machine import (
    ACK_EVENTS,
    CHARGED_REASONS,
    INVARIANTS,
    RESTING_STATES,
    ZERO_COUNTS,
    Lane,
    LinkRecord,
    LinkState,
    SessionRecord,
    SessionState,
    Step,
)
from .policy import Exponential, Fixed, Policy
from .records import Change, Snapshot
from .rooms import OpenBatch, Rooms
from .runtime import LINK_TABLE, SESSION_TABLE, CompiledRuntime, ReferenceRuntime, Runtime
from .store import Store
from .validation import check_session_id
from .views import LinkView, SessionView, link_view, session_view

__all__ = ["Batch", "Engine", "LinkView", "SessionView"]

_QUEUED: Final = SessionState.QUEUED
_IN_FLIGHT: Final = SessionState.IN_FLIGHT
_BACKOFF: Final = SessionState.BACKOFF
_DEAD: Final = SessionState.DEAD_LETTERED
_OK: Final = acks.Ok
_UNAVAILABLE: Final = acks.RelayUnavailable
_INCREMENTAL: Final = Lane.INCREMENTAL
_BACKFILL: Final = Lane.BACKFILL
# Lane by name or by member: a StrEnum hashes as its value, so one dict
# lookup replaces the much slower ``Lane(lane)`` on every enqueue.
_LANES: Final[dict[str, Lane]] = {lane.value: lane for lane in Lane}
# Larger than any time a caller means (about 3e300 years), and small enough
# that adding a policy's delays to it stays finite.
_MAX_TIME: Final = 1e300
_ROOMS: Final = Rooms()


class Batch(msgspec.Struct, frozen=True):
    """Sessions to send together. You send them and pass ``id`` back with the ack.

    * ``id``: the batch's number, unique in this engine (and across restarts
      on a store); pass it to ``on_ack``.
    * ``lane``: ``incremental`` or ``backfill``.
    * ``session_ids``: the sessions to send, in queue order.
    * ``sent_at``: the engine time of the ``tick`` that formed it, in seconds
      on the clock you pass as ``now``.
    * ``deadline``: ``sent_at + policy.ack_timeout_s``, same clock: with no
      ack by then, the engine times the batch out itself.
    * ``part``: True for a part of a split batch, sent to find which session
      failed the whole (see docs/blame.md).
    * ``probe``: True for the one batch a throttled link sends once its wait
      is over; its answer reopens the link or extends the throttle.
    """

    id: int
    lane: Lane
    session_ids: tuple[str, ...]
    sent_at: float
    deadline: float
    #: A part of a split batch, sent to find which session failed it.
    part: bool = False
    #: The one batch a throttled link sends once its wait is over.
    probe: bool = False


#: Every field ``Engine.__init__`` sets; ``clone`` copies each by hand and
#: deep-copies any other (a subclass's own).
_FIELDS: Final = frozenset(
    {
        "policy",
        "_rng",
        "_log",
        "_runtime",
        "_link_runtime",
        "_step",
        "_draws",
        "_sessions",
        "_lanes",
        "_batches",
        "_blame",
        "_paced",
        "_journal",
        "_now",
        "_link",
        "_link_losses",
        "_by_state",
        "_dead",
        "_anomalies",
        "_store_closed",
    }
)


def _draws_from_rng(policy: Policy) -> bool:
    """True if a backoff of ``policy`` draws from the engine's rng (full jitter)."""
    backoffs = [policy.reason(name).backoff for name in CHARGED_REASONS]
    backoffs += [policy.relay_pause, policy.relay_throttle]
    return not all(
        isinstance(b, Fixed) or (isinstance(b, Exponential) and not b.jitter) for b in backoffs
    )


def _copy_step(step: Step, rng: random.Random) -> Step:
    # Step holds nothing between calls but its policy lookups; slot by slot
    # is a few times faster than copy.copy.
    twin = object.__new__(Step)
    for name in Step.__slots__:
        setattr(twin, name, getattr(step, name))
    twin.rng = rng
    return twin


def _copy_counter(counter: Counter[Any]) -> Counter[Any]:
    # Counter(counter) runs Counter.update in Python; a dict copy is enough.
    twin: Counter[Any] = dict.__new__(Counter)
    dict.update(twin, counter)
    return twin


class Engine:
    """The session engine. Not thread-safe: drive it from one task or thread.

    You pass a :class:`Policy`, optionally a ``store`` to persist to (the
    engine recovers from it at once, and owns it from then on: ``close()``,
    or leaving ``with Engine(...) as engine:``, closes it), a ``rng`` for
    backoff jitter (seed it for reproducible runs), and ``log=False`` to skip
    logging entirely (a runner driving the engine follows it).
    ``runtime="reference"`` drives real python-statemachine instances instead
    of the compiled table; it is for tests and benchmarks only. Tests may
    also pass a :class:`~sessionfsm.runtime.Runtime` object as ``runtime``
    (and ``link_runtime``), e.g. one running a deliberately broken table.
    ``listeners`` are subscribed once the engine has recovered (see
    :meth:`subscribe`). ``rooms`` (a :class:`~sessionfsm.rooms.Rooms`) names
    the class of each of the engine's rooms; like a ``Runtime`` object, it is
    for tests that plant a flaw by subclassing a room.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        store: Store | None = None,
        rng: random.Random | None = None,
        log: bool = True,
        runtime: str | Runtime = "compiled",
        link_runtime: Runtime | None = None,
        listeners: Iterable[Listener] = (),
        rooms: Rooms | None = None,
    ) -> None:
        # Fields are few on purpose: CPython 3.11 reads an instance's
        # attributes fastest while it has at most 30 (tests/test_layout.py
        # counts them). A new concern goes into a room of its own.
        self.policy = policy if policy is not None else Policy()
        if not isinstance(self.policy, Policy):
            raise UsageError(f"policy must be a sessionfsm.Policy, got {self.policy!r}")
        if rooms is None:
            rooms = _ROOMS
        elif not isinstance(rooms, Rooms):
            raise UsageError(f"rooms must be a sessionfsm.rooms.Rooms, got {rooms!r}")
        self._rng = rng if rng is not None else random.Random()
        self._log = get_logger(log)
        self._runtime: Runtime
        self._link_runtime: Runtime
        if runtime == "compiled":
            self._runtime = CompiledRuntime(SESSION_TABLE)
            self._link_runtime = CompiledRuntime(LINK_TABLE)
        elif runtime == "reference":
            self._runtime = ReferenceRuntime(SESSION_TABLE)
            self._link_runtime = ReferenceRuntime(LINK_TABLE)
        elif not isinstance(runtime, str) and callable(getattr(runtime, "fire", None)):
            self._runtime = runtime
            self._link_runtime = CompiledRuntime(LINK_TABLE)
        else:
            raise UsageError(
                f"runtime must be 'compiled', 'reference' or a Runtime, got {runtime!r}"
            )
        if link_runtime is not None:
            if not callable(getattr(link_runtime, "fire", None)):
                raise UsageError(f"link_runtime must be a Runtime, got {link_runtime!r}")
            self._link_runtime = link_runtime
        self._step = Step(self.policy, self._rng)
        # Whether the policy ever draws from the rng (jitter): a clone shares
        # an rng nobody draws from instead of copying it.
        self._draws = _draws_from_rng(self.policy)
        self._sessions: dict[str, SessionRecord] = {}
        self._lanes = rooms.lanes(self._sessions, self.policy)
        self._batches = rooms.batches()
        self._blame = rooms.blame()
        self._paced = rooms.redrive()
        self._journal = rooms.journal(store, self._log, log)
        self._now = 0.0
        self._link = LinkRecord()
        # Times the link was lost, ever; tells a batch whose ack the outage ate.
        self._link_losses = 0
        self._by_state: Counter[SessionState] = Counter()
        self._dead: dict[str, None] = {}
        #: Inputs that were ignored or clamped, by kind; see ``anomalies``.
        self._anomalies: Counter[str] = Counter()
        self._store_closed = False
        if store is not None:
            snapshot = store.load()
            if snapshot is not None:
                self._recover(snapshot)
        for listener in listeners:
            self.subscribe(listener)

    # -------------------------------------------------------------- lifecycle

    @property
    def store(self) -> Store | None:
        """The store this engine persists to (the one you passed), or None."""
        return self._journal.store

    @property
    def logs(self) -> bool:
        """False if you built the engine with ``log=False``; a runner follows it."""
        return self._journal.logging

    def close(self) -> None:
        """Close the engine's store (if any) and release its file. Idempotent.

        ``with Engine(policy, store=store) as engine:`` does this on the way
        out. Calls that change state after this fail in the store.
        """
        store = self._journal.store
        if store is not None and not self._store_closed:
            self._store_closed = True
            store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # As files and sqlite3 connections do: an engine dropped with its store
        # still open would hold the store's file (and its write lock) until
        # the process exits. A store that someone else still holds is theirs
        # to close (a simulation's caller reads it afterwards), so only the
        # last holder warns; the count is CPython's: the journal's attribute,
        # the local and getrefcount's own argument.
        journal = getattr(self, "_journal", None)
        store = None if journal is None else journal.store
        if store is None or getattr(self, "_store_closed", True):
            return
        if getattr(store, "closed", False) or sys.getrefcount(store) > 3:
            return
        warnings.warn(
            f"sessionfsm.Engine dropped with its store {store!r} still open; "
            "call engine.close() or use `with Engine(...) as engine:`",
            ResourceWarning,
            stacklevel=2,
            source=self,
        )
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ input

    def enqueue(
        self, session_id: str, lane: Lane | str = _INCREMENTAL, *, now: float | None = None
    ) -> None:
        """A session is new or changed locally; make sure its latest payload syncs.

        New sessions are ``queued`` in ``lane``. A known session follows the
        declared ``changed`` event: ``synced`` is re-queued, ``in_flight`` is
        marked dirty (its pending ``Ok`` will re-queue it), ``backoff`` keeps
        its backoff, ``dead_lettered`` stays dead until redriven. A backfill
        session enqueued as incremental is promoted; lanes never demote.
        ``now`` defaults to the latest time the engine has seen.
        """
        lane_ = self._check_enqueue(session_id, lane)
        if now is not None:
            self._clock(now)
        self._enqueue_one(session_id, lane_)
        self._commit()

    def enqueue_many(
        self,
        session_ids: Iterable[str],
        lane: Lane | str = _INCREMENTAL,
        *,
        now: float | None = None,
    ) -> int:
        """Enqueue many sessions at once: one call, one store transaction.

        Each id is treated as by :meth:`enqueue`, in order. Every id is checked
        before any is applied, so a bad one raises ``UsageError`` and changes
        nothing; the store gets all of them in one ``save``, so a crash leaves
        either none or all. You get the number of ids applied.
        """
        if isinstance(session_ids, str):
            raise UsageError(
                f"enqueue_many takes an iterable of session ids, got the string {session_ids!r}"
            )
        ids = list(session_ids)
        lane_: Lane = _INCREMENTAL
        for session_id in ids:
            lane_ = self._check_enqueue(session_id, lane)
        if not ids:
            self._check_enqueue("-", lane)
            return 0
        if now is not None:
            self._clock(now)
        for session_id in ids:
            self._enqueue_one(session_id, lane_)
        self._commit()
        return len(ids)

    def _check_enqueue(self, session_id: object, lane: Lane | str) -> Lane:
        check_session_id(session_id)
        lane_ = _LANES.get(lane) if isinstance(lane, str) else None
        if lane_ is None:
            raise UsageError(
                f"lane must be one of {', '.join(Lane)}, got {lane!r} for session {session_id!r}"
            )
        return lane_

    def _enqueue_one(self, session_id: str, lane: Lane) -> None:
        rec = self._sessions.get(session_id)
        journal = self._journal
        if rec is None:
            rec = SessionRecord(id=session_id, lane=lane)
            self._sessions[session_id] = rec
            self._by_state[_QUEUED] += 1
            self._lanes.ready[lane].append(session_id)
            journal.placed.append((session_id, False))
            journal.pending.append((rec, None, _QUEUED, "enqueued", None, 0))
            return
        if lane is _INCREMENTAL and rec.lane is _BACKFILL:
            rec.lane = _INCREMENTAL
            if rec.state is _QUEUED:
                # The backfill entry goes stale and is skipped when reached.
                self._lanes.ready[_INCREMENTAL].append(session_id)
                journal.placed.append((session_id, False))
            journal.pending.append((rec, rec.state, rec.state, "promoted", None, rec.attempts))
        if rec.state is _DEAD:
            self._anomalies["enqueue_dead_lettered"] += 1
            self._log.info(
                "sessionfsm.enqueue_ignored",
                session_id=session_id,
                why="dead_lettered",
                dead_letter_reason=rec.dead_letter_reason,
            )
        self._fire(rec, "changed", self._step.load(self._now))

    def tick(self, now: float) -> list[Batch]:
        """Advance to ``now``; return the batches to send now (often none).

        In order: time out overdue batches, resume the link if its pause ran
        out, move due backoffs to their queue, then form batches while fewer
        than ``policy.max_in_flight`` are open: incremental first when it has
        ready sessions and its interval allows, otherwise backfill.
        """
        now = self._clock(now)
        lanes = self._lanes
        stamps = lanes.stamps.copy()
        self._expire(now)
        link = self._link
        if link.state is LinkState.PAUSED or link.state is LinkState.THROTTLED:
            self._fire_link("resumed", self._step.load(now))
        self._release_due(now)
        if self._paced.scheduled and link.state is LinkState.UP:
            self._drain_redrive(now)
        formed: list[Batch] = []
        batches = self._batches
        open_ = batches.open
        if link.state is LinkState.UP:
            while len(open_) < self.policy.max_in_flight:
                lane = lanes.pick(now)
                if lane is None:
                    break
                formed.append(self._form(lane, now))
        elif (
            link.state is LinkState.PROBING
            and batches.probe is None
            and len(open_) < self.policy.max_in_flight
        ):
            # One probe per wait (invariant 13); its answer decides the rest.
            lane = lanes.pick(now)
            if lane is not None:
                probe = self._form(lane, now, probe=True)
                batches.probe = probe.id
                formed.append(probe)
        try:
            self._commit()
        except BaseException:
            # The store refused: these batches must never be charged as if
            # sent, since nobody will ever send them (docs/faults.md).
            if formed:
                self._withdraw(formed, stamps)
            raise
        return formed

    def on_ack(
        self,
        batch_id: int,
        ack: acks.Ack | Mapping[str, acks.Ack],
        now: float,
    ) -> list[Change]:
        """Apply the relay's answer to a batch; return the transitions it caused.

        You pass one ack for the whole batch, or a mapping of session id to
        ack. Sessions of the batch missing from a mapping stay in flight
        until the rest arrives or the batch times out. Acks for unknown or
        closed batches, and entries for sessions not (or no longer) pending in
        the batch, are ignored, counted in ``anomalies`` and logged. A
        malformed ack raises ``InvalidAck`` before anything changes, a batch
        id that is not an integer ``UsageError``.
        """
        if type(batch_id) is not int:
            raise UsageError(f"batch_id must be an int, got {type(batch_id).__name__}")
        if isinstance(ack, Mapping):
            try:
                entries = [(sid, acks.validate(a)) for sid, a in ack.items()]
            except InvalidAck:
                raise
            except Exception as exc:  # a mapping that cannot even be read
                raise UsageError(f"cannot read the acks of batch {batch_id}: {exc!r}") from None
            for sid, _ in entries:
                if not isinstance(sid, str):
                    raise InvalidAck(f"session ids in a batch ack must be strings, got {sid!r}")
        else:
            entries = None
            acks.validate(ack)
        now = self._clock(now)
        open_batch = self._batches.open.get(batch_id)
        if open_batch is None:
            kind = self._batches.late(batch_id)
            self._anomalies[kind] += 1
            self._log.warning("sessionfsm.ack_ignored", batch_id=batch_id, why=kind)
            self._commit()
            return []
        pending = open_batch.pending
        whole = entries is None
        if entries is None:
            entries = [(sid, ack) for sid in pending]  # type: ignore[misc]
        journal = self._journal
        start = len(journal.pending)
        sessions = self._sessions
        # First pass: drop entries that do not belong, and sort the answer.
        answer: list[tuple[SessionRecord, acks.Ack]] = []
        oks = failed = 0
        unavailable = False
        failure: acks.Ack | None = None
        alike = True
        for sid, entry in entries:
            if sid not in pending:
                kind = "duplicate_entry" if sid in open_batch.batch.session_ids else "not_in_batch"
                self._anomalies[kind] += 1
                self._log.warning(
                    "sessionfsm.ack_entry_ignored", batch_id=batch_id, session_id=sid, why=kind
                )
                continue
            del pending[sid]
            answer.append((sessions[sid], entry))
            kind_ = type(entry)
            if kind_ is _OK:
                oks += 1
            elif kind_ is _UNAVAILABLE:
                unavailable = True
            else:
                failed += 1
                if failure is None:
                    failure = entry
                elif alike and type(failure) is not kind_:
                    alike = False
                elif isinstance(entry, acks.RateLimited) and isinstance(failure, acks.RateLimited):
                    # The longest hint is the relay's word for all of them.
                    hint, other = failure.retry_after_s, entry.retry_after_s
                    if other is not None and (hint is None or other > hint):
                        failure = entry
        if failed:
            self._judge(open_batch, answer, now, whole, oks, failed, failure, alike)
        else:
            requeued: list[str] = []
            step = self._step
            for rec, entry in answer:
                self._fire(rec, ACK_EVENTS[type(entry)], step.load(now, entry), front=requeued)
            if requeued:
                self._to_front(requeued)
            if oks:
                # Blame evidence, kept inline: this runs once per answered batch.
                blame = self._blame
                blame.accepted += oks
                blame.refusing_since = None
                marks = blame.marks
                if marks:
                    for rec, _entry in answer:
                        marks.pop(rec.id, None)
                self._fire_link("answered", step.load(now))
        if journal.listeners and answer:
            batch = open_batch.batch
            journal.batch_events.append(
                BatchEvent(
                    event="answered" if (oks or failed) else "bounced",
                    batch_id=batch_id,
                    lane=batch.lane,
                    sessions=len(answer),
                    latency_s=now - batch.sent_at,
                )
            )
        if unavailable:
            self._fire_link("lost", self._step.load(now))
        if not pending:
            self._batches.close(batch_id, "duplicate_ack")
        changes = journal.changes(start, now)
        # The store gets the same rows when they are all of this call's.
        self._commit(changes if start == 0 else None)
        return changes

    def on_message(self, message: acks.BatchAck, now: float) -> list[Change]:
        """Apply a decoded :class:`acks.BatchAck` (see ``acks.decode_message``)."""
        if not isinstance(message, acks.BatchAck):
            raise UsageError(
                f"on_message takes an acks.BatchAck (see acks.decode_message), "
                f"got {type(message).__name__}"
            )
        payload = message.ack if message.ack is not None else message.sessions
        assert payload is not None  # BatchAck guarantees exactly one is set
        return self.on_ack(message.batch_id, payload, now)

    def redrive(self, session_id: str, now: float) -> None:
        """Give a dead letter a fresh start: ``queued`` with every counter cleared."""
        rec = self._get(session_id)
        before = self._now
        now = self._clock(now)
        if not self._fire(rec, "redriven", self._step.load(now)):
            self._now = before  # refused: nothing changed, not even the clock
            raise TransitionNotAllowed(
                "redriven",
                session_id,
                rec.state,
                f"only a dead-lettered session can be redriven, and {session_id!r} is "
                f"{rec.state.value.replace('_', ' ')}",
            )
        self._log.info("sessionfsm.redriven", session_id=session_id)
        self._commit()

    def redrive_all(
        self, now: float, *, reason: str | None = None, limit: int | None = None
    ) -> list[str]:
        """Redrive dead letters, oldest first; return the ids redriven.

        ``reason`` keeps only those dead-lettered for that ack reason;
        ``limit`` redrives at most that many, so an operator can pace a
        recovered relay by calling this once per tick.
        """
        if reason is not None and reason not in CHARGED_REASONS:
            raise UsageError(f"reason must be one of {', '.join(CHARGED_REASONS)}, got {reason!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise UsageError(f"limit must be an integer >= 0, got {limit!r}")
        now = self._clock(now)
        chosen: list[str] = []
        for sid in self._dead:
            if limit is not None and len(chosen) >= limit:
                break
            if reason is None or self._sessions[sid].dead_letter_reason == reason:
                chosen.append(sid)
        step = self._step.load(now)
        for sid in chosen:
            self._fire(self._sessions[sid], "redriven", step)
        if chosen:
            self._log.info("sessionfsm.redriven", sessions=len(chosen), reason=reason)
        self._commit()
        return chosen

    def schedule_redrive(self, *, reason: str | None = None, per_tick: int) -> int:
        """Redrive today's dead letters a few at a time; return how many were added.

        The dead letters there are now (only ``reason``'s, if given) are
        redriven oldest first by later ticks: at most ``per_tick`` at a time,
        at most once per ``policy.tick_interval_s``, and only while the link
        is up, so a relay that just recovered is not flooded. Calling it again
        adds to the schedule and sets the new pace.

        The schedule is kept in memory only: after a restart the rest stay
        dead until you schedule them again. A crash therefore never revives
        more sessions than you asked for at a time you did not choose.
        """
        if reason is not None and reason not in CHARGED_REASONS:
            raise UsageError(f"reason must be one of {', '.join(CHARGED_REASONS)}, got {reason!r}")
        if isinstance(per_tick, bool) or not isinstance(per_tick, int) or per_tick < 1:
            raise UsageError(f"per_tick must be an integer >= 1, got {per_tick!r}")
        sessions = self._sessions
        chosen = (
            self._dead
            if reason is None
            else [sid for sid in self._dead if sessions[sid].dead_letter_reason == reason]
        )
        return self._paced.schedule(chosen, per_tick)

    def cancel_redrive(self) -> int:
        """Drop the rest of a paced redrive; return how many were still scheduled."""
        return self._paced.cancel()

    @property
    def redrive_backlog(self) -> int:
        """Dead letters a paced redrive has yet to reach."""
        return len(self._paced.scheduled)

    def relay_ready(self, now: float) -> None:
        """The transport reports the relay ready: resume sending at once."""
        self._fire_link("reported_ready", self._step.load(self._clock(now)))
        self._commit()

    def relay_unavailable(self, now: float) -> None:
        """The transport reports the relay gone: pause sending, charge nobody."""
        self._fire_link("lost", self._step.load(self._clock(now)))
        self._commit()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(report)`` after every later call that changed something.

        See :mod:`sessionfsm.listeners`. Subscribing the same listener twice
        is a ``UsageError``.
        """
        if not callable(listener):
            raise UsageError(f"a listener must be callable with a Report, got {listener!r}")
        # Equality, not identity: ``obj.method`` is a new object at each access.
        journal = self._journal
        if any(known == listener for known in journal.listeners):
            raise UsageError(f"listener {listener!r} is already subscribed")
        journal.listeners = (*journal.listeners, listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Stop calling ``listener``; a ``UsageError`` if it was not subscribed."""
        journal = self._journal
        kept = tuple(known for known in journal.listeners if known != listener)
        if len(kept) == len(journal.listeners):
            raise UsageError(f"listener {listener!r} is not subscribed")
        journal.listeners = kept
        if not kept:
            # Nobody left to hear of this call's batches or link.
            journal.batch_events.clear()
            journal.link_before = None

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The subscribed listeners, in the order they are called."""
        return self._journal.listeners

    # ----------------------------------------------------------------- output

    def state(self, session_id: str) -> SessionState:
        """The session's state, or ``UnknownSession``."""
        return self._get(session_id).state

    def session(self, session_id: str) -> SessionView:
        """A read-only copy of the session, or ``UnknownSession``."""
        return session_view(self._get(session_id))

    def sessions(self) -> Iterator[SessionView]:
        """Every session, in the order first enqueued."""
        return (session_view(rec) for rec in self._sessions.values())

    def dead_letters(self) -> list[SessionView]:
        """Every dead-lettered session, oldest first."""
        return [session_view(self._sessions[sid]) for sid in self._dead]

    def sessions_by_state(self) -> dict[SessionState, int]:
        """How many sessions are in each state (every state present)."""
        return {state: self._by_state[state] for state in SessionState}

    def counts(self) -> dict[SessionState, int]:
        """Deprecated name of :meth:`sessions_by_state` (``counts`` now only
        means a session's per-reason charges)."""
        warnings.warn(
            "Engine.counts() is deprecated; use Engine.sessions_by_state()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.sessions_by_state()

    def in_flight(self) -> list[Batch]:
        """The open batches, oldest first."""
        return [ob.batch for ob in self._batches.open.values()]

    @property
    def link(self) -> LinkView:
        """The relay link's state."""
        return link_view(self._link)

    @property
    def now(self) -> float:
        """The latest time the engine has seen (0.0 before any)."""
        return self._now

    @property
    def anomalies(self) -> dict[str, int]:
        """Ignored or clamped inputs by kind: ``unknown_batch``, ``late_ack``,
        ``duplicate_ack``, ``not_in_batch``, ``duplicate_entry``,
        ``clock_regressed``, ``enqueue_dead_lettered``."""
        return dict(self._anomalies)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def next_wakeup(self) -> float | None:
        """The earliest time a tick could do something new, or None if idle.

        A runner may sleep until then (or until an ack or enqueue arrives).
        """
        times: list[float] = []
        batches, lanes = self._batches, self._lanes
        deadline = batches.next_deadline()
        if deadline is not None:
            times.append(deadline)
        if lanes.retry:
            times.append(lanes.retry[0][0])
        if self._paced.scheduled and self._link.state is LinkState.UP:
            times.append(self._paced.next_time(self._now, self.policy.tick_interval_s))
        link = self._link.state
        if (
            link is LinkState.PAUSED or link is LinkState.THROTTLED
        ) and self._link.resume_at is not None:
            times.append(self._link.resume_at)
        # While paused or throttled, ready sessions wait for the link:
        # resume_at above. A probing link may send one batch.
        if (
            (link is LinkState.UP or (link is LinkState.PROBING and batches.probe is None))
            and len(batches.open) < self.policy.max_in_flight
            and any(lanes.has_ready(lane) for lane in Lane)
        ):
            times.append(max(self._now, lanes.earliest_time()))
        return min(times) if times else None

    def idle(self) -> bool:
        """True when every session is at rest (synced or dead-lettered) and no
        paced redrive is pending."""
        resting = sum(self._by_state[s] for s in RESTING_STATES) == len(self._sessions)
        return resting and not self._paced.scheduled

    def check(self) -> None:
        """Check the structural invariants (1, 3, 7, 10, 13) over every session.

        O(n); for tests and debugging, never on a hot path. Raises
        :class:`~sessionfsm.InvariantViolation` naming the first broken
        invariant (its number and name, from ``sessionfsm.machine.INVARIANTS``).
        """

        def expect(ok: bool, number: int, detail: str) -> None:
            if not ok:
                raise InvariantViolation(number, INVARIANTS[number].name, detail)

        lanes, batches = self._lanes, self._batches
        ready: dict[str, Lane] = {}
        for lane, queue in lanes.ready.items():
            for sid in queue:
                rec = self._sessions[sid]
                if rec.state is _QUEUED and rec.lane is lane:
                    expect(sid not in ready, 1, f"{sid!r} queued twice")
                    ready[sid] = lane
        heap_ids = [sid for _, sid in lanes.retry]
        expect(len(heap_ids) == len(set(heap_ids)), 1, "a session is in the retry heap twice")
        heap = set(heap_ids)
        flying: dict[str, int] = {}
        for bid, ob in batches.open.items():
            for sid in ob.pending:
                if sid in flying:
                    expect(False, 1, f"{sid!r} in batches {flying[sid]} and {bid}")
                flying[sid] = bid
        counted: Counter[SessionState] = Counter()
        for sid, rec in self._sessions.items():
            counted[rec.state] += 1
            state = rec.state
            expect((sid in ready) == (state is _QUEUED), 1, f"{sid!r} {state} vs ready queue")
            expect((sid in heap) == (state is _BACKOFF), 1, f"{sid!r} {state} vs retry heap")
            expect((sid in flying) == (state is _IN_FLIGHT), 1, f"{sid!r} {state} vs batches")
            expect((rec.retry_at is not None) == (state is _BACKOFF), 10, f"{sid!r} retry_at")
            expect((sid in self._dead) == (state is _DEAD), 1, f"{sid!r} dead-letter index")
            if state is _DEAD:
                expect(not any(rec.counts), 3, f"{sid!r} dead with counts {rec.counts}")
                expect(rec.dead_letter_reason in CHARGED_REASONS, 7, f"{sid!r} reason")
        expect(+counted == +self._by_state, 1, "state counters drifted")
        link = self._link
        if link.state is LinkState.THROTTLED:
            expect(link.resume_at is not None, 13, "a throttled link with no end to its wait")
        probes = [ob for ob in batches.open.values() if ob.batch.probe]
        expect(len(probes) <= 1, 13, f"{len(probes)} probes out at once")
        expect(batches.probe is None or batches.probe in batches.open, 13, "stale probe")

    # --------------------------------------------------------------- internals

    def _get(self, session_id: str) -> SessionRecord:
        rec = self._sessions.get(session_id)
        if rec is None:
            raise UnknownSession(session_id)
        return rec

    def _clock(self, now: float) -> float:
        if (
            not isinstance(now, (int, float))
            or not -_MAX_TIME < now < _MAX_TIME  # also NaN, inf, and ints beyond any float
        ):
            raise UsageError(f"now must be a finite number of seconds, got {reprlib.repr(now)}")
        if now < self._now:
            self._anomalies["clock_regressed"] += 1
            self._log.warning("sessionfsm.clock_regressed", now=now, last=self._now)
            return self._now
        self._now = float(now)
        return self._now

    def _fire(
        self, rec: SessionRecord, event: str, step: Step, front: list[str] | None = None
    ) -> bool:
        """Fire one session event and keep the readiness structures in step.

        Placement follows from the target state alone, so a transition added
        to the declaration is queued, backed off or buried correctly without
        touching the engine. ``front`` collects sessions that must go back to
        the head of their queue (their batch came back unsent or stale).
        """
        source = rec.state
        target = self._runtime.fire(rec, event, step)
        if target is None:
            return False
        if target is not source:
            by_state = self._by_state
            by_state[source] -= 1
            by_state[target] += 1
            if target is _QUEUED:
                if front is not None:
                    front.append(rec.id)
                else:
                    self._lanes.ready[rec.lane].append(rec.id)
                    self._journal.placed.append((rec.id, False))
            elif target is _BACKOFF:
                assert rec.retry_at is not None  # charge always schedules (invariant 10)
                heappush(self._lanes.retry, (rec.retry_at, rec.id))
            elif target is _DEAD:
                self._dead[rec.id] = None
                self._journal.placed.append((rec.id, False))
            if source is _DEAD:
                del self._dead[rec.id]
                # However it left (paced, by hand, in bulk), a session no
                # longer dead is off the paced schedule: a later dead letter
                # of it is new and was never scheduled.
                self._paced.drop(rec.id)
        self._journal.pending.append((rec, source, target, event, step.reason_name, rec.attempts))
        return True

    def _fire_link(self, event: str, step: Step) -> None:
        link = self._link
        before = (link.state, link.failures, link.resume_at)
        if self._link_runtime.fire(link, event, step) is None:
            return
        after = (link.state, link.failures, link.resume_at)
        if after == before:
            return
        journal = self._journal
        journal.link_changed = True
        if journal.listeners and journal.link_before is None:
            journal.link_before = LinkView(state=before[0], failures=before[1], resume_at=before[2])
        if event == "lost":
            self._link_losses += 1
            self._log.info(
                "sessionfsm.link_paused", failures=link.failures, resume_at=link.resume_at
            )
        elif before[0] is LinkState.PAUSED and link.state is LinkState.UP:
            self._log.info("sessionfsm.link_resumed", via=event)

    def _expire(self, now: float) -> None:
        batches = self._batches
        while (overdue := batches.pop_overdue(now)) is not None:
            batch_id, open_batch = overdue
            # If the link was lost after this batch left, the outage ate the
            # ack: that is the transport's fault and is charged to nobody
            # (invariant 4). Otherwise the relay really did not answer.
            lost = open_batch.losses != self._link_losses
            self._log.info(
                "sessionfsm.batch_timed_out",
                batch_id=batch_id,
                sessions=len(open_batch.pending),
                # Lost: the outage ate the ack, nobody is charged. Otherwise
                # one session alone may be charged; several are split.
                lost=lost,
            )
            journal = self._journal
            if journal.listeners:
                batch = open_batch.batch
                journal.batch_events.append(
                    BatchEvent(
                        event="timed_out",
                        batch_id=batch_id,
                        lane=batch.lane,
                        sessions=len(open_batch.pending),
                        latency_s=now - batch.sent_at,
                    )
                )
            sessions = self._sessions
            if lost:
                step = self._step
                requeued: list[str] = []
                ack = acks.RelayUnavailable()
                for sid in open_batch.pending:
                    self._fire(sessions[sid], "bounced", step.load(now, ack), front=requeued)
                if requeued:
                    self._to_front(requeued)
            else:
                # The relay said nothing for the whole batch: judged like one
                # AckTimeout for all of it (split, unless it is one session).
                timeout: acks.Ack = acks.AckTimeout()
                answer = [(sessions[sid], timeout) for sid in open_batch.pending]
                open_batch.pending.clear()
                self._judge(open_batch, answer, now, True, 0, len(answer), timeout, True)
            open_batch.pending.clear()
            batches.close(batch_id, "late_ack")

    def _judge(
        self,
        open_batch: OpenBatch,
        answer: list[tuple[SessionRecord, acks.Ack]],
        now: float,
        whole: bool,
        oks: int,
        failed: int,
        failure: acks.Ack | None,
        alike: bool,
    ) -> None:
        """Apply an answer with at least one failure, charging only on evidence.

        ``whole``: one ack was given for the whole batch; ``failure``: the
        first failure (the one with the longest ``retry_after_s`` if they are
        all ``RateLimited``); ``alike``: every failure is of one kind.
        """
        assert failure is not None
        blame = self._blame
        since = blame.refusing_since
        # The relay has accepted nothing since ``refusing``: since its first
        # refusal after its last acceptance, this one if it is the first.
        refusing = now if since is None or oks else since
        past_bound = now - refusing >= self.policy.max_relay_refusal_s
        shared, throttle = blame.verdict(len(answer), failed, whole, alike, failure, past_bound)
        if oks:
            blame.accepted += oks
        accepted = blame.accepted
        step = self._step.blame(shared, accepted, 0, refusing)
        marks = blame.marks
        first = open_batch.accepted
        lane = open_batch.batch.lane
        split = shared and not throttle
        requeued: list[str] = []
        parted: list[str] = []
        held = charged = False
        for rec, entry in answer:
            sid = rec.id
            kind = type(entry)
            if kind is _OK or kind is _UNAVAILABLE:
                self._fire(rec, ACK_EVENTS[kind], step.load(now, entry), front=requeued)
                if kind is _OK and marks:
                    marks.pop(sid, None)
                continue
            step.mark = marks.get(sid, first)
            # Spared sessions go back to the head: split into parts, or as
            # they were (a throttle, or no evidence against them).
            front = parted if split and rec.lane is lane else requeued
            if not self._fire(rec, ACK_EVENTS[kind], step.load(now, entry), front=front):
                continue
            state = rec.state
            if state is _DEAD:
                marks.pop(sid, None)
                charged = True
                continue
            marks[sid] = accepted
            if state is _QUEUED:
                held = held or not shared
            else:
                charged = True
        if requeued:
            self._to_front(requeued)
        if parted:
            self._split(lane, parted, open_batch.batch.id)
        if oks:
            blame.refusing_since = None
        elif since is None:
            blame.refusing_since = now
        link = self._link.state
        if oks or (charged and not held):
            self._fire_link("answered", self._step.load(now))
        elif (
            throttle
            or held
            or (
                shared
                and (link is LinkState.THROTTLED or link is LinkState.PROBING)
                # A whole-request PayloadTooLarge is the relay answering (the
                # request is too big), not refusing everyone: it reopens the
                # link below, and the batch is split as anywhere else.
                and not isinstance(failure, acks.PayloadTooLarge)
            )
        ):
            # A relay-wide refusal, or a refusal nobody can be blamed for; a
            # failed probe extends the throttle.
            self._fire_link("refused", self._step.load(now, failure))
        elif shared:
            self._fire_link("answered", self._step.load(now))

    def _split(self, lane: Lane, ids: list[str], batch_id: int) -> None:
        """Put a failed batch back at the head of ``lane`` as two parts (``Lanes.split``)."""
        self._lanes.split(lane, ids)
        self._log.info("sessionfsm.batch_split", batch_id=batch_id, sessions=len(ids))

    def _release_due(self, now: float) -> None:
        lanes = self._lanes
        step = self._step
        while (rec := lanes.pop_due(now)) is not None:
            self._fire(rec, "elapsed", step.load(now))

    def _drain_redrive(self, now: float) -> None:
        paced = self._paced
        taken = paced.take(now, self.policy.tick_interval_s)
        if not taken:
            return
        sessions = self._sessions
        step = self._step.load(now)
        for sid in taken:
            self._fire(sessions[sid], "redriven", step)
        self._log.info(
            "sessionfsm.redriven", sessions=len(taken), paced=True, left=len(paced.scheduled)
        )

    def _to_front(self, session_ids: list[str]) -> None:
        """Put sessions back at the head of their queues, in the order given.

        They were first in line (their batch came back unsent, stale or eaten
        by an outage, or the process died with them in flight), and a relay
        flap must not send them to the back.
        """
        self._lanes.to_front(session_ids)
        self._journal.placed.extend((sid, True) for sid in session_ids)

    def _form(self, lane: Lane, now: float, probe: bool = False) -> Batch:
        lanes = self._lanes
        queue = lanes.ready[lane]
        sessions = self._sessions
        size, part = lanes.batch_size(lane)
        step = self._step.load(now)
        ids: list[str] = []
        while queue and len(ids) < size:
            sid = queue[0]
            rec = sessions[sid]
            if rec.state is not _QUEUED or rec.lane is not lane:
                queue.popleft()
                continue  # stale entry
            if rec.counts != ZERO_COUNTS:
                # Charged before: it goes alone, so that its next failure
                # points at it and not at a whole batch to split again.
                if ids:
                    break
                size = 1
            queue.popleft()
            self._fire(rec, "sent", step)
            ids.append(sid)
        # Only called when the lane had a ready session, so ids is never
        # empty, and the throttle is stamped only for a real batch (invariant 9).
        lanes.stamp(lane, now)
        batches = self._batches
        batch_id = batches.take_id()
        deadline = now + self.policy.ack_timeout_s
        batch = Batch(
            id=batch_id,
            lane=lane,
            session_ids=tuple(ids),
            sent_at=now,
            deadline=deadline,
            part=part,
            probe=probe,
        )
        batches.add(batch, self._link_losses, self._blame.accepted)
        journal = self._journal
        if journal.listeners:
            journal.batch_events.append(
                BatchEvent(event="sent", batch_id=batch_id, lane=lane, sessions=len(ids))
            )
        return batch

    def _commit(self, changes: list[Change] | None = None) -> None:
        """React, in one place: the journal hands this call's changes to the
        log, the store and the listeners (``Journal.commit``)."""
        self._journal.commit(
            self._now, self._link, self._lanes.stamps, self._batches.next_id, changes
        )

    def _withdraw(self, formed: list[Batch], stamps: dict[Lane, float | None]) -> None:
        """Take back the batches of a tick whose save failed: they never left.

        Each session goes back to the head of its queue as it was before the
        send (``attempts`` as before; ``dirty``, which a send clears and a
        queued session never reads, stays cleared), the lanes' throttle stamps
        are restored (invariant 9), and the ``sent`` transitions leave this
        call's pending changes, so the history never shows them. The batch ids
        stay used: a late answer to one is an ``unknown_batch`` anomaly.
        Everything else the tick did (timeouts, due backoffs, the link) stays
        in memory and the next successful save writes it.
        """
        sessions = self._sessions
        records: list[SessionRecord] = []
        for batch in formed:
            for sid in batch.session_ids:
                rec = sessions[sid]
                rec.state = _QUEUED
                rec.attempts -= 1
                records.append(rec)
        self._batches.withdraw({batch.id for batch in formed})
        self._by_state[_IN_FLIGHT] -= len(records)
        self._by_state[_QUEUED] += len(records)
        self._to_front([rec.id for rec in records])
        self._lanes.stamps.update(stamps)
        self._journal.withdraw(formed, records)

    def _recover(self, snapshot: Snapshot) -> None:
        """Rebuild from a store: in-flight sessions go back to the queue.

        Delivery is at least once: a batch that was in flight when the process
        died is sent again. Dead letters stay dead. A retry time further out
        than ``policy.max_backoff_s`` from the saved clock (a clock jump) is
        capped to it.
        """
        if snapshot.now is not None:
            self._now = snapshot.now
        horizon = (snapshot.now if snapshot.now is not None else 0.0) + self.policy.max_backoff_s
        lanes = self._lanes
        self._batches.next_id = max(1, snapshot.next_batch_id)
        for lane in Lane:
            lanes.stamps[lane] = snapshot.stamps.get(lane.value)
        self._link = snapshot.link
        requeued: list[SessionRecord] = []
        for rec in snapshot.sessions:
            if rec.id in self._sessions:
                raise UsageError(f"store returned session {rec.id!r} twice")
            self._sessions[rec.id] = rec
            state = rec.state
            if state is _IN_FLIGHT:
                # Recovery is not a declared event: nothing happened to the
                # session, the process holding its ack died.
                rec.state = _QUEUED
                requeued.append(rec)
                self._by_state[_QUEUED] += 1
                continue
            self._by_state[state] += 1
            if state is _QUEUED:
                lanes.ready[rec.lane].append(rec.id)
            elif state is _BACKOFF:
                if rec.retry_at is None or rec.retry_at > horizon:
                    rec.retry_at = horizon
                lanes.retry.append((rec.retry_at, rec.id))
            elif state is _DEAD:
                self._dead[rec.id] = None
        heapify(lanes.retry)
        self._to_front([rec.id for rec in requeued])
        # In queue order, so that a store keeps them first in line in this order.
        self._journal.pending.extend(
            (rec, _IN_FLIGHT, _QUEUED, "recovered", None, rec.attempts) for rec in requeued
        )
        if requeued:
            self._log.info("sessionfsm.recovered_in_flight", sessions=len(requeued))
        self._commit()

    def _iter_records(self) -> Iterable[SessionRecord]:
        return self._sessions.values()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (and ``copy``): an engine between calls, without a store.

        The pickle holds the policy, the random generator, the runtimes and
        every record, room and open batch; the logger, the per-event scratch
        and the journal are rebuilt when it is loaded. Like a :meth:`clone`,
        the loaded engine has no store and no listeners. An engine with a
        store does not pickle: its state lives in the store, so build a new
        engine on it instead.
        """
        journal = self._journal
        if journal.store is not None:
            raise UsageError("an Engine with a store does not pickle; its state is in the store")
        if journal.pending or journal.placed or journal.link_changed:
            raise UsageError("an Engine pickles only between calls")
        # Field by field, never through __dict__ (see clone).
        state = {
            name: getattr(self, name)
            for name in _FIELDS
            if name not in ("_log", "_step", "_journal")
        }
        if type(self) is not Engine:
            state.update((n, v) for n, v in vars(self).items() if n not in _FIELDS)
        state["_journal"] = (type(journal), journal.logging, tuple(journal.unsaved))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            if name != "_journal":
                setattr(self, name, value)
        journal_type, logging, unsaved = state["_journal"]
        self._log = get_logger(logging)
        self._step = Step(self.policy, self._rng)
        journal = journal_type(None, self._log, logging)
        journal.unsaved = {sid: self._sessions[sid] for sid in unsaved}
        self._journal = journal

    def inspect(self) -> EngineState:
        """A frozen, typed copy of the engine's inner state, for white-box tools
        (the model checker, tests, debugging). O(n); never on a hot path, but
        cheap enough for a model checker to take after every step."""
        sessions = self._sessions
        ready = {}
        for lane, queue in self._lanes.ready.items():
            # Skip the stale entries a promotion leaves behind.
            ready[lane] = tuple(
                [
                    sid
                    for sid in queue
                    if (rec := sessions[sid]).state is _QUEUED and rec.lane is lane
                ]
            )
        retry = self._lanes.retry
        return EngineState(
            now=self._now,
            sessions={sid: msgspec.structs.replace(rec) for sid, rec in sessions.items()},
            ready=ready,
            retry=tuple(sorted(retry)) if retry else (),
            batches=tuple(
                [
                    OpenBatchState(
                        id=bid,
                        lane=ob.batch.lane,
                        session_ids=ob.batch.session_ids,
                        pending=tuple(ob.pending),
                        deadline=ob.batch.deadline,
                        probe=ob.batch.probe,
                        losses=ob.losses,
                        accepted=ob.accepted,
                    )
                    for bid, ob in self._batches.open.items()
                ]
            ),
            closed=self._batches.closed.copy(),
            next_batch_id=self._batches.next_id,
            stamps=self._lanes.stamps.copy(),
            link=msgspec.structs.replace(self._link),
            link_losses=self._link_losses,
            redrive=RedriveState(
                scheduled=tuple(self._paced.scheduled),
                per_tick=self._paced.per_tick,
                last=self._paced.last,
            ),
            blame=BlameState(
                accepted=self._blame.accepted,
                marks=dict(self._blame.marks),
                refusing_since=self._blame.refusing_since,
                cuts={lane: tuple(cuts) for lane, cuts in self._lanes.cuts.items()},
                probe=self._batches.probe,
            ),
            anomalies=dict(self._anomalies),
            dead=tuple(self._dead),
        )

    def clone(self, *, rng: random.Random | None = None) -> Engine:
        """A deep, independent copy of this engine, between calls.

        It shares only what never changes (the policy, and a compiled runtime
        with its table) and, when the policy never draws from it (no jitter),
        the random generator and the per-event scratch that holds it;
        everything else is copied, room by room, so the copy and the original
        diverge only by the calls each gets. Pass ``rng`` to give the copy a
        generator of its own choosing instead. The copy has no
        store and no listeners: it persists nothing and reports to nobody.
        For tools that explore alternatives (the model checker); never on a
        hot path.
        """
        journal = self._journal
        if journal.pending or journal.placed or journal.link_changed:
            raise UsageError("Engine.clone() is for an engine between calls")
        runtime, link_runtime = self._runtime, self._link_runtime
        if not (isinstance(runtime, CompiledRuntime) and isinstance(link_runtime, CompiledRuntime)):
            # A runtime with state of its own (the reference one holds a
            # python-statemachine per record) is copied with the records.
            memo: dict[int, Any] = {id(self.policy): self.policy, id(self._log): self._log}
            memo[id(journal)] = None
            copied = object.__new__(type(self))
            for name in _FIELDS - {"_journal"}:
                setattr(copied, name, copy.deepcopy(getattr(self, name), memo))
            if type(self) is not Engine:
                for name, value in vars(self).items():
                    if name not in _FIELDS:
                        setattr(copied, name, copy.deepcopy(value, memo))
            copied._journal = journal.copy(copied._sessions)
            copied._store_closed = False
            if rng is not None:
                copied._rng = rng
                copied._step = Step(self.policy, rng)
            return copied
        # Field by field, in __init__'s order, never through __dict__: an
        # instance whose __dict__ was ever built reads its attributes slower.
        given = rng
        rng, step = self._rng, self._step
        if given is not None:
            rng, step = given, _copy_step(step, given)
        elif self._draws:
            rng = random.Random.__new__(type(rng))
            rng.setstate(self._rng.getstate())
            step = _copy_step(step, rng)
        # else nothing draws from the rng, and the Step is refilled before
        # every event (and a call never runs inside another engine's call).
        twin = object.__new__(type(self))
        twin.policy = self.policy
        twin._rng = rng
        twin._log = self._log
        twin._runtime = runtime
        twin._link_runtime = link_runtime
        twin._step = step
        twin._draws = self._draws
        # A Struct's __copy__ (shallow: a record holds only immutable values)
        # is missing from msgspec's stubs.
        sessions = {sid: rec.__copy__() for sid, rec in self._sessions.items()}  # type: ignore[attr-defined]
        twin._sessions = sessions
        twin._lanes = self._lanes.copy(sessions)
        twin._batches = self._batches.copy()
        twin._blame = self._blame.copy()
        twin._paced = self._paced.copy()
        twin._journal = journal.copy(sessions)
        twin._now = self._now
        twin._link = self._link.__copy__()  # type: ignore[attr-defined]
        twin._link_losses = self._link_losses
        twin._by_state = _copy_counter(self._by_state)
        twin._dead = self._dead.copy()
        twin._anomalies = _copy_counter(self._anomalies)
        twin._store_closed = False
        if type(self) is not Engine:
            # A subclass's own attributes: copied deeply, never shared.
            for name, value in vars(self).items():
                if name not in _FIELDS:
                    setattr(twin, name, copy.deepcopy(value))
        return twin

    def debug_state(self) -> dict[str, Any]:
        """Everything two engines are compared on in tests, as plain data (a copy).

        Keys: ``sessions`` (id -> record as builtins), ``link``, ``stamps``
        (lane -> when its last batch was formed), ``batches`` (open batch id
        -> its session ids), ``pending`` (open batch id -> the ids still
        awaiting an answer, in batch order), ``ready`` (lane -> the queued
        sessions in sending order) and ``anomalies``. Slow: for tests only.
        """
        sessions = self._sessions
        return {
            "sessions": {sid: msgspec.to_builtins(rec) for sid, rec in sessions.items()},
            "link": msgspec.to_builtins(self._link),
            "stamps": dict(self._lanes.stamps),
            "batches": {bid: ob.batch.session_ids for bid, ob in self._batches.open.items()},
            "pending": {bid: tuple(ob.pending) for bid, ob in self._batches.open.items()},
            "ready": {
                lane: tuple(
                    sid
                    for sid in queue
                    if sessions[sid].state is _QUEUED and sessions[sid].lane is lane
                )
                for lane, queue in self._lanes.ready.items()
            },
            "anomalies": dict(self._anomalies),
            "blame": (
                self._blame.accepted,
                dict(self._blame.marks),
                self._blame.refusing_since,
                {lane.value: list(cuts) for lane, cuts in self._lanes.cuts.items()},
                self._batches.probe,
            ),
        }

    # The old name, kept for code written against it.
    _debug_state = debug_state
