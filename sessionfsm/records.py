"""The engine's data: what it emits after each call, and what it recovers from.

* :class:`Change`: one applied transition, a row of the history;
* :class:`Delta`: everything one engine call changed, including the queue
  order the engine decided (``queue_front`` / ``queue_back``), so a store
  writes that order down and never works it out;
* :class:`Snapshot`: a store's whole persisted state, for recovery;
* :class:`SessionView` / :class:`LinkView`: read-only copies handed out by
  the engine and every store (defined in :mod:`sessionfsm.views`).

The records the engine mutates (``SessionRecord``, ``LinkRecord``) are
declared with the machine in :mod:`sessionfsm.machine`. ``sessionfsm.store``
re-exports the names below, so ``from sessionfsm.store import Delta`` keeps
working.
"""

from __future__ import annotations

import msgspec

from .machine import LinkRecord, SessionRecord
from .views import LinkView, SessionView

__all__ = ["Change", "Delta", "LinkView", "SessionView", "Snapshot", "number_places"]


class Change(msgspec.Struct, frozen=True, gc=False):
    """One applied transition: a row of the history."""

    session_id: str
    #: None when the session was first enqueued.
    source: str | None
    target: str
    event: str
    #: The ack reason that caused it, if any (``RateLimited``, ...).
    reason: str | None
    at: float
    #: The session's ``attempts`` after the transition.
    attempt: int


class Delta(msgspec.Struct, gc=False):
    """Everything one engine call changed."""

    #: The changed records, each once, as they are now. Serialise them before
    #: returning: the engine keeps mutating the same objects.
    sessions: list[SessionRecord]
    changes: list[Change]
    link: LinkRecord
    #: Lane name -> when its last batch was formed.
    stamps: dict[str, float | None]
    next_batch_id: int
    #: The engine's clock after the call.
    now: float
    #: Sessions the engine put back at the head of their lane's queue in this
    #: call, first in line first (their batch came back unsent, stale or
    #: eaten by an outage, or they were in flight when the process died).
    queue_front: list[str] = msgspec.field(default_factory=list)
    #: Sessions the engine put at the tail of a queue in this call (enqueued,
    #: retried, redriven, promoted) or added to the dead letters, in order.
    #: A session is in at most one of the two lists: where it was put last.
    queue_back: list[str] = msgspec.field(default_factory=list)


class Snapshot(msgspec.Struct):
    """A store's whole persisted state, for the engine to recover from."""

    #: Every session, in queue order: each lane's ready queue and the dead
    #: letters are rebuilt in this order.
    sessions: list[SessionRecord]
    link: LinkRecord
    stamps: dict[str, float | None]
    next_batch_id: int
    #: The engine clock when last saved, or None for an empty store.
    now: float | None


def number_places(delta: Delta, head: int, tail: int) -> tuple[dict[str, int], int, int]:
    """Number the places the engine gave sessions in ``delta``, for a store.

    A store keeps the engine's queue order as one integer per session, its
    *position*, and loads sessions sorted by it. This only numbers what the
    engine decided: ``queue_front`` counts down from ``head``, ``queue_back``
    up from ``tail``; positions of other sessions are left alone. Returns the
    new positions and the new ``head`` and ``tail`` counters.
    """
    front, back = delta.queue_front, delta.queue_back
    if not front and not back:
        return {}, head, tail
    positions: dict[str, int] = {}
    head -= len(front)
    for offset, sid in enumerate(front):
        positions[sid] = head + offset
    for sid in back:
        tail += 1
        positions[sid] = tail
    return positions, head, tail
