"""Many workers, one PostgreSQL database: partition leases with fencing.

Needs the ``postgres`` extra. A session belongs to one of a fixed number of
partitions; each partition is run by one engine in whichever worker holds its
lease; every write is fenced by the lease's epoch in the same transaction.
See ``docs/scaling-out.md``.
"""

from __future__ import annotations

from .coordinator import Coordinator, Producer, assign
from .worker import PICKUP_BUCKETS, HttpSender, Send, Worker, WorkerFigures

__all__ = [
    "PICKUP_BUCKETS",
    "Coordinator",
    "HttpSender",
    "Producer",
    "Send",
    "Worker",
    "WorkerFigures",
    "assign",
]
