"""The batches out: open batches, their deadlines, the probe, and closed-batch memory.

* ``open``: the batches sent and not yet wholly answered, oldest first, each
  with the sessions still awaiting their answer.
* ``deadlines``: a heap of ``(deadline, batch_id)``; a tick pops the overdue
  ones (:meth:`OpenBatches.pop_overdue`). An entry whose batch was answered in
  time stays until it comes up, and is skipped then.
* ``closed``: the last few thousand closed batch ids and why each closed, to
  tell a late ack (``late_ack``, ``duplicate_ack``) from a bogus one
  (``unknown_batch``).
* ``probe``: the one batch a probing link has out, if any (invariant 13).
* ``next_id``: the id of the next batch formed (saved, so ids stay unique
  across restarts on a store).

The engine fills the batches and judges the answers; this room only keeps
the books.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:
    from ..engine import Batch

__all__ = ["OpenBatch", "OpenBatches"]

# How many closed batch ids to remember, to tell a late ack from a bogus one.
CLOSED_MEMORY: Final = 4096


class OpenBatch:
    """One batch out: the batch as sent, and the sessions still awaiting their answer."""

    __slots__ = ("accepted", "batch", "losses", "pending")

    def __init__(self, batch: Batch, losses: int, accepted: int = 0) -> None:
        self.batch = batch
        # Sessions still awaiting their ack; a dict keeps the batch's order.
        self.pending: dict[str, None] = dict.fromkeys(batch.session_ids)
        # How many times the link had been lost when this batch was sent.
        self.losses = losses
        # How many sessions the relay had accepted when this batch was sent:
        # the mark of a session on its first attempt.
        self.accepted = accepted

    def copy(self) -> OpenBatch:
        twin = object.__new__(OpenBatch)
        twin.batch = self.batch  # frozen
        twin.pending = self.pending.copy()
        twin.losses = self.losses
        twin.accepted = self.accepted
        return twin


class OpenBatches:
    """The engine's open batches, their deadlines, the probe and the closed ids."""

    __slots__ = ("closed", "deadlines", "next_id", "open", "probe")

    def __init__(self) -> None:
        self.open: dict[int, OpenBatch] = {}
        self.deadlines: list[tuple[float, int]] = []
        self.closed: dict[int, str] = {}
        self.next_id = 1
        self.probe: int | None = None

    def copy(self) -> Self:
        """An independent copy."""
        twin = object.__new__(type(self))
        twin.open = {bid: ob.copy() for bid, ob in self.open.items()}
        twin.deadlines = self.deadlines[:]
        twin.closed = self.closed.copy()
        twin.next_id = self.next_id
        twin.probe = self.probe
        return twin

    def take_id(self) -> int:
        """The id of a batch being formed; never handed out twice."""
        batch_id = self.next_id
        self.next_id = batch_id + 1
        return batch_id

    def add(self, batch: Batch, losses: int, accepted: int) -> None:
        """``batch`` was formed: it is open until answered, closed or overdue."""
        self.open[batch.id] = OpenBatch(batch, losses, accepted)
        heapq.heappush(self.deadlines, (batch.deadline, batch.id))

    def close(self, batch_id: int, later: str) -> None:
        """Forget an open batch; a later ack for it counts as ``later``."""
        del self.open[batch_id]
        if batch_id == self.probe:
            self.probe = None
        closed = self.closed
        closed[batch_id] = later
        if len(closed) > CLOSED_MEMORY:
            del closed[next(iter(closed))]

    def late(self, batch_id: int) -> str:
        """Why an ack for a batch that is not open is ignored (an anomaly kind)."""
        return self.closed.get(batch_id, "unknown_batch")

    def pop_overdue(self, now: float) -> tuple[int, OpenBatch] | None:
        """The open batch whose deadline came first, if it is ``now`` or earlier
        (its deadline entry popped), else None."""
        deadlines = self.deadlines
        while deadlines and deadlines[0][0] <= now:
            _, batch_id = heapq.heappop(deadlines)
            open_batch = self.open.get(batch_id)
            if open_batch is not None:  # else answered already
                return batch_id, open_batch
        return None

    def next_deadline(self) -> float | None:
        """The earliest deadline of a batch still open, or None."""
        deadlines = self.deadlines
        while deadlines and deadlines[0][1] not in self.open:
            heapq.heappop(deadlines)  # answered before its deadline
        return deadlines[0][0] if deadlines else None

    def withdraw(self, batch_ids: set[int]) -> None:
        """Forget batches that were never sent (their save failed).

        Their ids stay used: a late answer to one is an ``unknown_batch``.
        """
        for batch_id in batch_ids:
            del self.open[batch_id]
        if self.probe in batch_ids:
            self.probe = None  # never sent: the probing link may form it again
