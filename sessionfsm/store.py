"""The store protocols, and the in-memory store.

The engine is sans-IO: after each public call (``tick``, ``on_ack``,
``enqueue``, ...) it hands the store one :class:`Delta`, everything that
changed in that call, and the store writes it in one transaction. On start-up
the engine asks the store for a :class:`Snapshot` and recovers from it. Those
records live in :mod:`sessionfsm.records` and are re-exported here.

* :class:`Store`: what the engine needs (``load``, ``save``, ``close``);
* :class:`StoreReader`: what the operating tools read (``sessions_by_state``,
  ``dead_letters``, ``session``, ``history``, ``link``, ``now``). The
  ``sessionfsm status`` / ``dead-letters`` / ``history`` commands are
  written against it alone.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Final, Protocol, runtime_checkable

import msgspec

from ._errors import StoreError, UnknownSession, UsageError
from .machine import LinkRecord, SessionRecord, SessionState
from .records import Change, Delta, Snapshot, number_places
from .views import LinkView, SessionView, link_view, session_view

__all__ = [
    "Change",
    "Delta",
    "HistoryRetention",
    "MemoryStore",
    "Snapshot",
    "Store",
    "StoreReader",
]


@runtime_checkable
class Store(Protocol):
    """Where an engine keeps its state between runs."""

    def load(self) -> Snapshot | None:
        """The persisted state, or None for a new, empty store."""
        ...

    def save(self, delta: Delta) -> None:
        """Write one call's changes atomically, or raise ``StoreError``."""
        ...

    def close(self) -> None:
        """Release the store's resources. Saving after this is an error."""
        ...


@runtime_checkable
class StoreReader(Protocol):
    """What a store tells an operator, read as last saved.

    :class:`MemoryStore` and :class:`~sessionfsm.SqliteStore` implement it
    (they also keep ``counts()``, the deprecated name of
    ``sessions_by_state()``);
    a new store implements it to work with the operating commands.
    """

    def sessions_by_state(self) -> dict[SessionState, int]:
        """How many sessions are in each state (every state present)."""
        ...

    def dead_letters(self, reason: str | None = None) -> list[SessionView]:
        """Dead letters (only ``reason``'s, if given), oldest first."""
        ...

    def session(self, session_id: str) -> SessionView:
        """One session, or ``UnknownSession``."""
        ...

    def history(self, session_id: str, *, limit: int | None = None) -> list[Change]:
        """The session's kept transitions, oldest first (the last ``limit``)."""
        ...

    def link(self) -> LinkView:
        """The relay link."""
        ...

    def now(self) -> float | None:
        """The engine clock when last saved, or None if nothing was."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


# ---------------------------------------------------------------------------
# What every store shares: the history's retention.
# ---------------------------------------------------------------------------


class HistoryRetention(msgspec.Struct, frozen=True, kw_only=True):
    """How much transition history a store keeps; ``None`` turns a limit off.

    The default keeps the last 30 days (engine clock) and at most a million
    rows, whichever is less: an audit trail of recent activity, not an archive.
    A session's own record (state, counts, attempts, dead-letter reason and
    time) is never pruned. Rows go oldest first and in chunks, so a store may
    briefly hold up to ``max_rows / 10`` (at most 10 000) rows more than the cap.
    """

    max_age_s: float | None = 30 * 86_400.0
    max_rows: int | None = 1_000_000

    def __post_init__(self) -> None:
        age = self.max_age_s
        if age is not None and (
            not isinstance(age, (int, float)) or not math.isfinite(age) or age < 0
        ):
            raise UsageError(f"max_age_s must be a finite number >= 0 or None, got {age!r}")
        rows = self.max_rows
        if rows is not None and (not isinstance(rows, int) or rows < 0):
            raise UsageError(f"max_rows must be an integer >= 0 or None, got {rows!r}")

    @property
    def prune_every(self) -> int:
        """How many rows a store appends between two prunes."""
        if self.max_rows is None:
            return 10_000
        return max(1, min(10_000, self.max_rows // 10))


#: 30 days and a million rows.
DEFAULT_RETENTION: Final = HistoryRetention()
#: Keep everything (``history_retention=None``): the history grows without limit.
KEEP_ALL: Final = HistoryRetention(max_age_s=None, max_rows=None)


class MemoryStore:
    """A :class:`Store` that keeps everything in this process, history included.

    You use it in tests (an engine built on a store that another engine left
    behind recovers exactly as from a database), or to keep the transition
    history in memory. It holds copies, never the engine's own records. The
    bare ``Engine()`` uses no store at all, which is faster still.
    """

    def __init__(self, *, history_retention: HistoryRetention | None = DEFAULT_RETENTION) -> None:
        self.history_retention = history_retention if history_retention is not None else KEEP_ALL
        # id -> (a copy of the record, its queue position)
        self._records: dict[str, tuple[SessionRecord, int]] = {}
        self._link = LinkRecord()
        self._stamps: dict[str, float | None] = {}
        self._next_batch_id = 1
        self._now: float | None = None
        self._head = 0
        self._tail = 0
        self._history: deque[Change] = deque()
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self) -> Snapshot | None:
        """A copy of what was saved, sessions in queue order; None if nothing was."""
        self._check_open()
        if self._now is None:
            return None
        ordered = sorted(self._records.values(), key=lambda item: item[1])
        return Snapshot(
            sessions=[msgspec.structs.replace(rec) for rec, _ in ordered],
            link=msgspec.structs.replace(self._link),
            stamps=dict(self._stamps),
            next_batch_id=self._next_batch_id,
            now=self._now,
        )

    def save(self, delta: Delta) -> None:
        """Keep a copy of one call's changes."""
        self._check_open()
        positions, self._head, self._tail = number_places(delta, self._head, self._tail)
        records = self._records
        for rec in delta.sessions:
            old = records.get(rec.id)
            position = positions.get(rec.id, old[1] if old is not None else self._tail)
            records[rec.id] = (msgspec.structs.replace(rec), position)
        self._link = msgspec.structs.replace(delta.link)
        self._stamps.update(delta.stamps)
        self._next_batch_id = delta.next_batch_id
        self._now = delta.now
        self._history.extend(delta.changes)
        self.prune()

    def close(self) -> None:
        """Forget nothing, but refuse any further call."""
        self._closed = True

    def prune(self) -> int:
        """Drop history rows the retention policy no longer keeps; return how many."""
        history = self._history
        before = len(history)
        keep = self.history_retention
        if keep.max_rows is not None:
            while len(history) > keep.max_rows:
                history.popleft()
        if keep.max_age_s is not None and self._now is not None:
            cutoff = self._now - keep.max_age_s
            while history and history[0].at < cutoff:
                history.popleft()
        return before - len(history)

    # ----------------------------------------------------------- read helpers

    def history(self, session_id: str, *, limit: int | None = None) -> list[Change]:
        """The session's kept transitions, oldest first (the last ``limit`` if given)."""
        self._check_open()
        rows = [c for c in self._history if c.session_id == session_id]
        return rows[-limit:] if limit is not None and limit < len(rows) else rows

    def session(self, session_id: str) -> SessionView:
        """The session as last saved, or ``UnknownSession``."""
        self._check_open()
        item = self._records.get(session_id)
        if item is None:
            raise UnknownSession(session_id)
        return session_view(item[0])

    def dead_letters(self, reason: str | None = None) -> list[SessionView]:
        """Dead letters as last saved (only ``reason``'s, if given), oldest first."""
        self._check_open()
        dead = sorted(
            (pos, rec)
            for rec, pos in self._records.values()
            if rec.state is SessionState.DEAD_LETTERED
            and (reason is None or rec.dead_letter_reason == reason)
        )
        return [session_view(rec) for _, rec in dead]

    def counts(self) -> dict[SessionState, int]:
        """Deprecated name of :meth:`sessions_by_state`."""
        warnings.warn(
            "store.counts() is deprecated; use sessions_by_state()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.sessions_by_state()

    def sessions_by_state(self) -> dict[SessionState, int]:
        """How many sessions are in each state as last saved (every state present)."""
        self._check_open()
        counts = dict.fromkeys(SessionState, 0)
        for rec, _ in self._records.values():
            counts[rec.state] += 1
        return counts

    def link(self) -> LinkView:
        """The relay link as last saved."""
        self._check_open()
        return link_view(self._link)

    def now(self) -> float | None:
        """The engine clock when last saved, or None if nothing was."""
        self._check_open()
        return self._now

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the memory store is closed")
