"""Paced redrive (``Engine.schedule_redrive``): dead letters revived a few a tick.

* ``scheduled``: the scheduled dead letters, in order (oldest first). Always
  a subset of the engine's dead letters: a session that leaves the dead
  letters any way (paced, by hand, in bulk) is dropped from it
  (:meth:`PacedRedrive.drop`), so a later dead letter of it is new and was
  never scheduled.
* ``per_tick``: how many one tick may revive.
* ``last``: when a tick last revived some, for the pace of one batch of them
  per ``policy.tick_interval_s``.

Kept in memory only: after a restart the rest stay dead until scheduled
again, so a crash never revives more sessions than asked for at a time
nobody chose.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Self

__all__ = ["PacedRedrive"]


class PacedRedrive:
    """The schedule of a paced redrive.

    Public so that a test can plant a flaw in it: subclass it, override a
    method (:meth:`drop`, say), and pass it as
    ``Engine(rooms=Rooms(redrive=...))``.
    """

    __slots__ = ("last", "per_tick", "scheduled")

    def __init__(self) -> None:
        self.scheduled: dict[str, None] = {}
        self.per_tick = 0
        self.last: float | None = None

    def copy(self) -> Self:
        """An independent copy."""
        twin = object.__new__(type(self))
        twin.scheduled = self.scheduled.copy()
        twin.per_tick = self.per_tick
        twin.last = self.last
        return twin

    def schedule(self, session_ids: Iterable[str], per_tick: int) -> int:
        """Add dead letters to the schedule, at a new pace; return how many were new."""
        self.per_tick = per_tick
        scheduled = self.scheduled
        added = 0
        for sid in session_ids:
            if sid not in scheduled:
                scheduled[sid] = None
                added += 1
        return added

    def cancel(self) -> int:
        """Drop the whole schedule; return how many were still on it."""
        left = len(self.scheduled)
        self.scheduled.clear()
        return left

    def drop(self, session_id: str) -> None:
        """``session_id`` left the dead letters: it is off the schedule."""
        self.scheduled.pop(session_id, None)

    def take(self, now: float, interval: float) -> list[str]:
        """The sessions a tick at ``now`` revives (none if one did less than
        ``interval`` ago), taken off the schedule, oldest first."""
        last = self.last
        if last is not None and now - last < interval:
            return []
        self.last = now
        scheduled = self.scheduled
        taken: list[str] = []
        while scheduled and len(taken) < self.per_tick:
            sid = next(iter(scheduled))
            del scheduled[sid]
            taken.append(sid)
        return taken

    def next_time(self, now: float, interval: float) -> float:
        """The earliest time a tick may revive more (only asked while some are scheduled)."""
        last = self.last
        return now if last is None else max(now, last + interval)
