"""sessionfsm: an explicit, compiled state-machine engine for syncing sessions.

You declare nothing yourself: the session machine is declared once in
:mod:`sessionfsm.machine`, compiled to a flat table, and driven by the
sans-IO :class:`Engine`. Everything listed in ``__all__`` is public; anything
else may change.
"""

from __future__ import annotations

from . import acks
from ._errors import (
    InvalidAck,
    InvalidPolicy,
    InvariantViolation,
    NotAStore,
    RemoteError,
    SessionFSMError,
    StoreError,
    StoreLocked,
    StoreReadOnly,
    StoreTooNew,
    TransitionNotAllowed,
    UnknownSession,
    UsageError,
)
from .engine import Batch, Engine, LinkView, SessionView
from .listeners import BatchEvent, Listener, Report
from .machine import Lane, LinkState, SessionState
from .policy import Exponential, Fixed, Policy, ReasonPolicy, load_policy
from .records import Change, Delta, Snapshot
from .runner import (
    AckResult,
    LinkEvent,
    LinkReporter,
    Runner,
    SyncRunner,
    Transport,
    run_until_idle,
)
from .sqlite_store import SqliteStore
from .store import HistoryRetention, MemoryStore, Store, StoreReader

__all__ = [
    "AckResult",
    "Batch",
    "BatchEvent",
    "Change",
    "Delta",
    "Engine",
    "Exponential",
    "Fixed",
    "HistoryRetention",
    "InvalidAck",
    "InvalidPolicy",
    "InvariantViolation",
    "Lane",
    "LinkEvent",
    "LinkReporter",
    "LinkState",
    "LinkView",
    "Listener",
    "MemoryStore",
    "NotAStore",
    "Policy",
    "ReasonPolicy",
    "RemoteError",
    "Report",
    "Runner",
    "SessionFSMError",
    "SessionState",
    "SessionView",
    "Snapshot",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreLocked",
    "StoreReadOnly",
    "StoreReader",
    "StoreTooNew",
    "SyncRunner",
    "TransitionNotAllowed",
    "Transport",
    "UnknownSession",
    "UsageError",
    "acks",
    "load_policy",
    "run_until_idle",
]
