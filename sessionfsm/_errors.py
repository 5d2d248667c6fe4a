"""The exception hierarchy: one base class, and whose fault it is.

``RemoteError`` means bad input from the wire (the relay's fault).
``UsageError`` means the API was misused (the caller's fault).
``StoreError`` means the persisted state cannot be opened or written safely.
Messages name the value and the state, e.g.
``cannot apply redriven to session 's1' in state synced``.
"""

from __future__ import annotations


class SessionFSMError(Exception):
    """Base class of every error sessionfsm raises on purpose."""


class RemoteError(SessionFSMError):
    """Input that came from the relay was malformed. Nothing was changed."""


class InvalidAck(RemoteError, ValueError):
    """An ack could not be decoded or does not describe a known ack reason."""


class UsageError(SessionFSMError):
    """The caller used the API in a way it does not allow. Nothing was changed."""


class UnknownSession(UsageError, KeyError):
    """The session id was never enqueued."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r}"


class TransitionNotAllowed(UsageError):
    """The declared machine has no transition for this event in this state."""

    def __init__(self, event: str, session_id: str, state: str, why: str | None = None) -> None:
        message = f"cannot apply {event} to session {session_id!r} in state {state}"
        super().__init__(f"{message}: {why}" if why else message)
        self.event = event
        self.session_id = session_id
        self.state = state


class InvalidPolicy(UsageError, ValueError):
    """A policy value is out of range or the policy file cannot be read."""


class InvariantViolation(SessionFSMError, AssertionError):
    """A live engine broke one of the numbered invariants of
    :mod:`sessionfsm.machine` (a bug in sessionfsm, or in a table or runtime
    passed in for testing). Raised by ``Engine.check()``.

    It is an ``AssertionError`` too, so code that caught the engine's
    assertions before keeps working.
    """

    def __init__(self, number: int, name: str, detail: str) -> None:
        super().__init__(f"inv{number} ({name}): {detail}")
        #: The invariant's number in the docstring of :mod:`sessionfsm.machine`.
        self.number = number
        #: Its short name, e.g. ``one_place``.
        self.name = name
        #: What was found, naming the session or the state.
        self.detail = detail

    @property
    def key(self) -> str:
        """``inv<number>_<name>``, the name reports use."""
        return f"inv{self.number}_{self.name}"


class StoreError(SessionFSMError):
    """The store cannot be opened or written without risking data loss."""


class StoreLocked(StoreError):
    """Another process (or another store in this one) holds the database."""


class StoreReadOnly(StoreError):
    """The database file or its directory cannot be written."""


class NotAStore(StoreError):
    """The file is not a sessionfsm database: not SQLite, or another application's."""


class StoreTooNew(StoreError):
    """The database was written by a newer sessionfsm; this one will not touch it."""


class StoreFenced(StoreError):
    """This process no longer owns the partition it wrote to: another worker
    took it over (or its lease ran out). Nothing of the write was kept."""

    def __init__(self, message: str, *, partition: int, epoch: int) -> None:
        super().__init__(message)
        self.partition = partition
        self.epoch = epoch


class StoreConnectionLost(StoreError):
    """The connection to the database server broke; nothing of the call was kept."""
