"""What the engine hands a store, and what a store hands back.

The engine is sans-IO: after each public call (``tick``, ``on_ack``,
``enqueue``, ...) it hands the store one :class:`Delta`, everything that
changed in that call, and the store writes it in one transaction. On start-up
the engine asks the store for a :class:`Snapshot` and recovers from it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec

from .machine import LinkRecord, SessionRecord

__all__ = ["Change", "Delta", "Snapshot", "Store"]


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


class Snapshot(msgspec.Struct):
    """A store's whole persisted state, for the engine to recover from."""

    sessions: list[SessionRecord]
    link: LinkRecord
    stamps: dict[str, float | None]
    next_batch_id: int
    #: The engine clock when last saved, or None for an empty store.
    now: float | None


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
