"""A frozen, typed picture of an engine's inner state, for white-box tools.

``Engine.inspect()`` returns an :class:`EngineState`. Tools (the model
checker, debuggers, tests) read it instead of the engine's private fields, so
the engine may rearrange its insides without breaking them. Every value is a
copy: changing the engine later never changes a view already taken.
"""

from __future__ import annotations

import msgspec

from .machine import Lane, LinkRecord, SessionRecord

__all__ = ["BlameState", "EngineState", "OpenBatchState", "RedriveState"]


class OpenBatchState(msgspec.Struct, frozen=True):
    """One batch sent and not yet wholly answered."""

    id: int
    lane: Lane
    #: Every session the batch carried, in batch order.
    session_ids: tuple[str, ...]
    #: The sessions still awaiting their answer, in batch order.
    pending: tuple[str, ...]
    #: When the engine times the batch out itself, or None once it cannot.
    deadline: float | None
    #: Whether this is the one probe a probing link may send.
    probe: bool
    #: How many times the link had been lost when the batch was sent.
    losses: int
    #: How many sessions the relay had accepted when the batch was sent.
    accepted: int


class RedriveState(msgspec.Struct, frozen=True):
    """A paced redrive: who waits for it, how many a tick, when it last ran."""

    scheduled: tuple[str, ...]
    per_tick: int
    last: float | None


class BlameState(msgspec.Struct, frozen=True):
    """The evidence the engine weighs before charging a failure (``docs/blame.md``)."""

    #: How many sessions the relay has accepted so far.
    accepted: int
    #: Per session: the accepted count when its previous attempt ended.
    marks: dict[str, int]
    #: Since when the relay has accepted nothing, or None.
    refusing_since: float | None
    #: Per lane: the sizes of the split batches that go first.
    cuts: dict[Lane, tuple[int, ...]]
    #: The id of the probe batch out, or None.
    probe: int | None


class EngineState(msgspec.Struct, frozen=True):
    """Everything a white-box tool needs to know about an engine between calls."""

    now: float
    sessions: dict[str, SessionRecord]
    #: Per lane, the queued sessions in sending order.
    ready: dict[Lane, tuple[str, ...]]
    #: The backed-off sessions in the order their retry times come due.
    retry: tuple[tuple[float, str], ...]
    #: The open batches in the order they were sent.
    batches: tuple[OpenBatchState, ...]
    #: Answers that arrive for these closed batches are late: id -> why closed.
    closed: dict[int, str]
    next_batch_id: int
    #: Per lane, when its last batch was formed (its throttle stamp).
    stamps: dict[Lane, float | None]
    link: LinkRecord
    link_losses: int
    redrive: RedriveState
    blame: BlameState
    anomalies: dict[str, int]
    #: The dead letters, oldest first: the order ``redrive_all`` and
    #: ``schedule_redrive`` take them in.
    dead: tuple[str, ...] = ()
