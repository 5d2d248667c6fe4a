"""Who is ready, cheaply: the ready queues, the retry heap, the throttle stamps.

A tick must not scan the queue: a service may hold a million sessions, most
of them backed off. So readiness is kept in structures keyed on it:

* ``ready[lane]``: a deque of the ``queued`` sessions of each lane, in order.
  Sending pops from the left; a bounced batch goes back on the left.
* ``retry``: a heap of ``(retry_at, session_id)`` for sessions in
  ``backoff``. A tick pops only the due ones (:meth:`Lanes.pop_due`), which
  the engine moves to their lane's deque.
* ``stamps[lane]``: when the lane last formed a batch, for its interval
  (invariant 9: stamped only for a real batch).
* ``cuts[lane]``: the sizes of the parts of a split batch waiting at the head
  of the lane, so that its next batches are exactly those parts
  (``docs/blame.md``).

A tick therefore costs O(batch + due · log n), independent of how many
sessions wait. A session promoted from backfill to incremental leaves a stale
entry in the backfill deque, skipped when reached (at most one per session,
since lanes are only ever promoted).

The engine decides *what* fires; this room only keeps the order. It never
fires a transition, so it holds no reference to the engine, only to the
engine's session records (to skip stale entries).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Final, Self

from ..machine import Lane, SessionRecord, SessionState
from ..policy import Policy

__all__ = ["Lanes"]

_QUEUED: Final = SessionState.QUEUED
_BACKOFF: Final = SessionState.BACKOFF
_INCREMENTAL: Final = Lane.INCREMENTAL
_BACKFILL: Final = Lane.BACKFILL


class Lanes:
    """The ready queue of each lane, the retry heap, throttle stamps and cuts.

    Public so that a test can plant a flaw in the choice of lane: subclass it,
    override :meth:`pick` (reading :meth:`is_open`, :meth:`has_ready`,
    ``stamps`` and ``sessions``), and pass it as ``Engine(rooms=Rooms(lanes=...))``.
    """

    __slots__ = ("cuts", "interval", "ready", "retry", "sessions", "size", "stamps")

    def __init__(self, sessions: dict[str, SessionRecord], policy: Policy) -> None:
        #: The engine's session records (the same dict), read to skip stale entries.
        self.sessions = sessions
        self.ready: dict[Lane, deque[str]] = {_INCREMENTAL: deque(), _BACKFILL: deque()}
        self.retry: list[tuple[float, str]] = []
        self.stamps: dict[Lane, float | None] = {_INCREMENTAL: None, _BACKFILL: None}
        self.cuts: dict[Lane, deque[int]] = {_INCREMENTAL: deque(), _BACKFILL: deque()}
        self.size = {_INCREMENTAL: policy.batch_size, _BACKFILL: policy.backfill_batch_size}
        self.interval = {
            _INCREMENTAL: policy.incremental_interval_s,
            _BACKFILL: policy.backfill_interval_s,
        }

    def copy(self, sessions: dict[str, SessionRecord]) -> Self:
        """An independent copy over ``sessions`` (the copied engine's records)."""
        twin = object.__new__(type(self))
        twin.sessions = sessions
        twin.ready = {lane: deque(queue) for lane, queue in self.ready.items()}
        twin.retry = self.retry[:]
        twin.stamps = self.stamps.copy()
        twin.cuts = {lane: deque(cuts) for lane, cuts in self.cuts.items()}
        twin.size = self.size
        twin.interval = self.interval
        return twin

    # ------------------------------------------------------------- choosing

    def pick(self, now: float) -> Lane | None:
        """The lane the next batch comes from, or None if no lane may send now."""
        # Incremental first, but only if it really has a ready session: a lane
        # whose sessions are all backed off has none in its deque, so it can
        # never shadow the other lane (invariant 6).
        for lane in (_INCREMENTAL, _BACKFILL):
            if self.is_open(lane, now) and self.has_ready(lane):
                return lane
        return None

    def is_open(self, lane: Lane, now: float) -> bool:
        """True if ``lane``'s interval since its last batch has run out."""
        stamp = self.stamps[lane]
        return stamp is None or now - stamp >= self.interval[lane]

    def has_ready(self, lane: Lane) -> bool:
        """True if ``lane`` holds a queued session (dropping stale entries on the way)."""
        queue = self.ready[lane]
        sessions = self.sessions
        while queue:
            rec = sessions[queue[0]]
            if rec.state is _QUEUED and rec.lane is lane:
                return True
            queue.popleft()  # stale: promoted to incremental, or already sent
        return False

    def earliest_time(self) -> float:
        """When the first lane holding a ready session may send (-inf: now).

        Only called when some lane has a ready session.
        """
        times = []
        for lane in Lane:
            if self.has_ready(lane):
                stamp = self.stamps[lane]
                times.append(-math.inf if stamp is None else stamp + self.interval[lane])
        return min(times)

    # -------------------------------------------------------------- forming

    def batch_size(self, lane: Lane) -> tuple[int, bool]:
        """The size of ``lane``'s next batch, and whether it is a part of a split one."""
        size = self.size[lane]
        cuts = self.cuts[lane]
        if cuts:
            # The next part of a split batch goes out as a batch of its own.
            return min(size, cuts.popleft()), True
        return size, False

    def stamp(self, lane: Lane, now: float) -> None:
        """``lane`` formed a batch at ``now`` (never called for an empty one: invariant 9)."""
        self.stamps[lane] = now
        cuts = self.cuts[lane]
        if cuts and not self.has_ready(lane):
            cuts.clear()  # the parts left refer to sessions no longer queued

    # -------------------------------------------------------------- placing

    def pop_due(self, now: float) -> SessionRecord | None:
        """The backed-off session whose retry time came first, if it is ``now``
        or earlier (taken off the heap), else None."""
        retry = self.retry
        sessions = self.sessions
        while retry and retry[0][0] <= now:
            at, sid = heapq.heappop(retry)
            rec = sessions[sid]
            if rec.state is not _BACKOFF or rec.retry_at != at:
                continue  # defensive: an entry from before a recovery
            return rec
        return None

    def to_front(self, session_ids: list[str]) -> None:
        """Put sessions back at the head of their queues, in the order given."""
        sessions, ready = self.sessions, self.ready
        for sid in reversed(session_ids):
            ready[sessions[sid].lane].appendleft(sid)

    def split(self, lane: Lane, ids: list[str]) -> None:
        """Put a failed batch back at the head of ``lane`` as two parts.

        The parts go after the parts already waiting there, so that a failing
        part's siblings are tried first: by the time a failing session is
        alone, the relay has had the chance to accept others, which is the
        evidence that charges it.
        """
        queue, cuts, sessions = self.ready[lane], self.cuts[lane], self.sessions
        skip = sum(cuts)
        at = 0
        while skip and at < len(queue):
            rec = sessions[queue[at]]
            if rec.state is _QUEUED and rec.lane is lane:
                skip -= 1
            at += 1
        for offset, sid in enumerate(ids):
            queue.insert(at + offset, sid)
        if len(ids) == 1:
            cuts.append(1)
        else:
            half = (len(ids) + 1) // 2
            cuts.append(half)
            cuts.append(len(ids) - half)
