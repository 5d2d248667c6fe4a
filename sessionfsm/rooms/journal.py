"""The journal: one call's changes, handed to the log, the store and the listeners.

Every public call of the engine follows the same order (h11's snapshot ->
change -> react): the engine fires transitions and queues what each did here
(``pending``, ``placed``, ``link_changed``, and the listeners' batch events
and link before the call); at the end of the call :meth:`Journal.commit`
hands all of it to the logger, the store and the listeners
(:mod:`sessionfsm.listeners`) in one place, and clears it. Between calls the
journal is empty, except for records a failed save left ``unsaved``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Self

from ..listeners import BatchEvent, Listener, Report
from ..machine import CHARGED_REASONS, Lane, LinkRecord, SessionRecord, SessionState
from ..records import Change, Delta
from ..store import Store
from ..views import LinkView, link_view

if TYPE_CHECKING:
    from ..engine import Batch

__all__ = ["Journal"]

_IN_FLIGHT: Final = SessionState.IN_FLIGHT
_BACKOFF: Final = SessionState.BACKOFF
_DEAD: Final = SessionState.DEAD_LETTERED

#: One applied transition, taken when it fired (a record may move again
#: before the call ends: redriven, then sent in the same tick):
#: (record, source, target, event, reason, attempts).
Entry = tuple[SessionRecord, SessionState | None, SessionState, str, str | None, int]


def _queue_order(placed: list[tuple[str, bool]]) -> dict[str, list[str]]:
    """A call's placements as ``Delta`` fields: where each session was put last."""
    last: dict[str, bool] = {}
    for sid, head in placed:
        last.pop(sid, None)
        last[sid] = head
    return {
        "queue_front": [sid for sid, head in last.items() if head],
        "queue_back": [sid for sid, head in last.items() if not head],
    }


class Journal:
    """What the current call changed, the store it goes to, and who listens."""

    __slots__ = (
        "batch_events",
        "link_before",
        "link_changed",
        "listeners",
        "log",
        "logging",
        "pending",
        "placed",
        "store",
        "unsaved",
    )

    def __init__(self, store: Store | None, log: Any, logging: bool) -> None:
        #: The store every call's ``Delta`` goes to, or None.
        self.store = store
        self.log = log
        self.logging = logging
        #: This call's applied transitions, in order (see ``Entry``).
        self.pending: list[Entry] = []
        # Where this call put sessions in line, in order: (id, True) for the
        # head of its queue, (id, False) for the tail or the dead letters.
        # Handed to the store in the Delta, so it writes the order down as
        # decided. A list, appended on the hot path; resolved only for a store.
        self.placed: list[tuple[str, bool]] = []
        self.link_changed = False
        # Records changed outside any transition (batches withdrawn after a
        # failed save) that the next save must still write.
        self.unsaved: dict[str, SessionRecord] = {}
        #: The subscribed listeners, in the order they are called.
        self.listeners: tuple[Listener, ...] = ()
        # What only the listeners need, gathered only while there are some:
        # this call's batch events, and the link before its first change.
        self.batch_events: list[BatchEvent] = []
        self.link_before: LinkView | None = None

    def copy(self, sessions: dict[str, SessionRecord]) -> Self:
        """A journal for a copy of the engine, between calls: no store, no listeners.

        ``sessions`` are the copy's records, for what a failed save left unsaved.
        """
        twin = type(self)(None, self.log, self.logging)
        twin.unsaved = {sid: sessions[sid] for sid in self.unsaved}
        return twin

    def changes(self, start: int, now: float) -> list[Change]:
        """The pending transitions from ``start`` on, as ``Change`` rows at ``now``."""
        return [
            Change(
                session_id=rec.id,
                source=source,
                target=target,
                event=event,
                reason=reason,
                at=now,
                attempt=attempts,
            )
            for rec, source, target, event, reason, attempts in self.pending[start:]
        ]

    def commit(
        self,
        now: float,
        link: LinkRecord,
        stamps: dict[Lane, float | None],
        next_batch_id: int,
        changes: list[Change] | None = None,
    ) -> None:
        """React, in one place: log what changed and hand it to the store.

        ``changes``, if given, are this call's whole pending list already
        turned into ``Change`` rows, so they are not built twice.
        """
        pending = self.pending
        listeners = self.listeners
        if not pending and not self.link_changed and not self.unsaved and not self.batch_events:
            return
        log = self.log
        for rec, source, state, _event, reason, _attempts in pending if self.logging else ():
            if state is _BACKOFF and source is _IN_FLIGHT:
                # At most one info line per deferral.
                index = CHARGED_REASONS.index(reason) if reason else -1
                log.info(
                    "sessionfsm.deferred",
                    session_id=rec.id,
                    reason=reason,
                    count=rec.counts[index] if index >= 0 else None,
                    retry_at=rec.retry_at,
                )
            elif state is _DEAD and source is _IN_FLIGHT:
                log.warning(
                    "sessionfsm.dead_lettered",
                    session_id=rec.id,
                    reason=rec.dead_letter_reason,
                    attempts=rec.attempts,
                )
        placed = self.placed
        store = self.store
        if store is not None:
            if changes is None:
                changes = self.changes(0, now)
            changed = list({id(rec): rec for rec, *_ in pending}.values())
            if self.unsaved:
                listed = {rec.id for rec in changed}
                changed.extend(r for sid, r in self.unsaved.items() if sid not in listed)
            store.save(
                Delta(
                    sessions=changed,
                    changes=changes,
                    link=link,
                    stamps={lane.value: at for lane, at in stamps.items()},
                    next_batch_id=next_batch_id,
                    now=now,
                    **_queue_order(placed),
                )
            )
        report = None
        if listeners:
            report = self.report(now, link, changes)
        pending.clear()
        placed.clear()
        self.link_changed = False
        self.unsaved.clear()
        if report is not None:
            self.notify(listeners, report)

    def report(self, now: float, link: LinkRecord, changes: list[Change] | None) -> Report:
        """This call's journal for the listeners; clears what only they need.

        ``changes`` are the call's ``Change`` rows if the store or ``on_ack``
        needed them; the report builds them from its rows only if a listener
        reads them, so a store-less engine builds none for its listeners.
        """
        before = self.link_before
        events = self.batch_events
        # Positional, and the lists as they are (a listener must not change
        # them): this runs once per call on every engine that has listeners.
        # A row is a plain tuple (see ``listeners.Row``), cheaper than a
        # Change to build and to read; the lane is taken now, at the end of
        # the call.
        report = Report(
            now,
            [
                (rec.id, rec.lane, event, source, target, reason, attempts)
                for rec, source, target, event, reason, attempts in self.pending
            ],
            tuple(events) if events else (),
            before,
            link_view(link) if before is not None else None,
            changes,
        )
        events.clear()
        self.link_before = None
        return report

    def notify(self, listeners: tuple[Listener, ...], report: Report) -> None:
        """Call each listener with ``report``; one that raises is logged, never fatal."""
        for listener in listeners:
            try:
                listener(report)
            except Exception as exc:
                # Metrics or a dashboard must never break the service.
                self.log.error(
                    "sessionfsm.listener_failed",
                    listener=repr(listener),
                    error=repr(exc),
                    exc_info=True,
                )

    def withdraw(self, formed: list[Batch], records: list[SessionRecord]) -> None:
        """Take back the journal of a tick's batches whose save failed: they never left.

        ``records`` (the sessions withdrawn, back in the queue) are written by
        the next save; their ``sent`` transitions leave this call's pending
        changes, so the history never shows them, and the listeners never hear
        of the sends.
        """
        taken: set[int] = set()
        for rec in records:
            taken.add(id(rec))
            self.unsaved[rec.id] = rec
        self.pending[:] = [
            entry for entry in self.pending if not (entry[3] == "sent" and id(entry[0]) in taken)
        ]
        if self.listeners:
            gone = {batch.id for batch in formed}
            self.batch_events[:] = [
                e for e in self.batch_events if not (e.event == "sent" and e.batch_id in gone)
            ]
