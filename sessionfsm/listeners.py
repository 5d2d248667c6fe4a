"""What an engine tells its listeners after each public call.

The engine keeps one journal per call (see :mod:`sessionfsm.engine`): the
transitions it applied, the relay link's change, and what happened to whole
batches. At the end of the call it hands that journal to the logger, the
store and every listener, in that order. A listener gets it as one frozen
:class:`Report`:

* ``rows``: one plain tuple per transition (a :data:`Row`): the session, its
  lane, the event, the states it left and entered, the ack reason and the
  attempt. The lane is the session's lane at the end of the call. Lanes only
  ever move from ``backfill`` to ``incremental``, by a ``promoted`` row, which
  is always the first row of an ``enqueue`` call; so the lane is also the one
  the session had when each row fired, except that a ``promoted`` row moved
  its session there from ``backfill``;
* ``changes``: the same transitions as the :class:`~sessionfsm.store.Change`
  rows the store gets (the very list, when the engine has a store or the call
  was ``on_ack``; otherwise built from ``rows`` when first read);
* ``lanes``: ``lanes[i]`` is the lane of ``changes[i]``'s session;
* ``batches``: :class:`BatchEvent` facts: a batch ``sent`` (its lane and
  size), ``answered`` or ``bounced`` by the relay, ``timed_out`` by the engine
  (each with the seconds since it was sent), and any event the engine adds
  later (a consumer counts them by name, so it needs no change for a new one);
* ``link_before`` / ``link_after``: the link as it was before and after the
  call, when the call changed it, else both ``None``.

``rows`` exist because they are cheap: a tuple per transition costs the
engine a fraction of a ``Change`` row, and a listener that counts (as the
metrics do) reads them faster too. An engine with no store never builds the
``Change`` rows of a tick or an enqueue unless a listener reads ``changes``.

You register a listener with ``Engine(listeners=[...])`` or
``engine.subscribe(listener)`` and remove it with ``engine.unsubscribe``. A
listener is any callable taking a :class:`Report`. It runs in the engine's
thread, after the store has saved the call, so it sees only what was
persisted; a slow listener slows the engine, nothing more. A listener that
raises is logged (``sessionfsm.listener_failed``) and the engine carries on.
A listener sees the calls made after it subscribed: to know what was there
before, read the engine (the metrics adapters do when they attach).

With no listener registered the engine builds no report at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias, runtime_checkable

import msgspec

from .machine import Lane, SessionState
from .store import Change
from .views import LinkView

__all__ = ["BatchEvent", "Listener", "Report", "Row"]

#: One applied transition, as the engine journals it for listeners:
#: ``(session_id, lane, event, source, target, reason, attempt)``, the fields
#: of a :class:`~sessionfsm.store.Change` (``source`` is None for a session
#: first enqueued; ``reason`` the ack reason, if any; ``attempt`` the
#: session's ``attempts`` after the transition) plus the session's lane, and
#: without ``at``, which is the report's ``now``.
Row: TypeAlias = tuple[str, Lane, str, SessionState | None, SessionState, str | None, int]


class BatchEvent(msgspec.Struct, frozen=True, gc=False):
    """Something that happened to a whole batch during the call."""

    #: ``sent``, ``answered``, ``bounced`` (the transport said the relay was
    #: unavailable), ``timed_out`` (by the engine, at the batch's deadline), or
    #: an event a later engine adds.
    event: str
    batch_id: int
    lane: Lane
    #: Sessions concerned: the batch's size when sent, the entries applied
    #: when answered or bounced, the sessions still pending when timed out.
    sessions: int
    #: Seconds from the send to this event (engine clock); None for ``sent``.
    latency_s: float | None = None


class Report(msgspec.Struct, frozen=True, gc=False, repr_omit_defaults=True):
    """One engine call's journal, as every listener receives it."""

    #: The engine clock after the call (the ``at`` of every row).
    now: float
    #: One :data:`Row` per transition, in the order applied (read it, never change it).
    rows: Sequence[Row]
    batches: tuple[BatchEvent, ...] = ()
    link_before: LinkView | None = None
    link_after: LinkView | None = None
    # The store's Change rows of the call, when the engine built them (it
    # does for a store and for ``on_ack``'s return value); else built from
    # ``rows`` on first read of ``changes``.
    _changes: Sequence[Change] | None = None

    @property
    def changes(self) -> Sequence[Change]:
        """The rows as :class:`~sessionfsm.store.Change` rows, the store's very list if it has one.

        Read it, never change it. ``source`` and ``target`` are
        :class:`~sessionfsm.SessionState` members.
        """
        changes = self._changes
        if changes is None:
            now = self.now
            changes = [
                Change(sid, source, target, event, reason, now, attempt)
                for sid, _lane, event, source, target, reason, attempt in self.rows
            ]
            msgspec.structs.force_setattr(self, "_changes", changes)
        return changes

    @property
    def lanes(self) -> list[Lane]:
        """``lanes[i]`` is the lane of ``changes[i]``'s session (see the module notes)."""
        return [row[1] for row in self.rows]


@runtime_checkable
class Listener(Protocol):
    """Anything you can call with a :class:`Report`; its return value is ignored."""

    def __call__(self, report: Report, /) -> object: ...
