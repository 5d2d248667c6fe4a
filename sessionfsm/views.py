"""Read-only copies of a session and of the relay link.

The engine and every store hand these out, so a caller can never change a
live record by accident.
"""

from __future__ import annotations

import warnings

import msgspec

from .machine import CHARGED_REASONS, Lane, LinkRecord, LinkState, SessionRecord, SessionState

__all__ = ["LinkView", "SessionView", "link_view", "session_view"]


class SessionView(msgspec.Struct, frozen=True):
    """A read-only copy of one session. Times are seconds on the engine's clock.

    * ``id``, ``state``, ``lane``: which session, where it is, which lane.
    * ``charges``: charged reason -> consecutive count since the last success;
      only reasons above zero appear, e.g. ``{"RateLimited": 2}``.
    * ``retry_at``: when a ``backoff`` session is queued again; else None.
    * ``dirty``: it changed while in flight, so its pending ``Ok`` re-queues it.
    * ``attempts``: sends since it was enqueued or last redriven.
    * ``dead_letter_reason``, ``dead_lettered_at``: why and when it was given
      up on, for a ``dead_lettered`` session; else None.
    """

    id: str
    state: SessionState
    lane: Lane
    #: Charged reason -> consecutive charges since the last success; only
    #: reasons charged at least once appear, e.g. ``{"RateLimited": 2}``.
    charges: dict[str, int]
    retry_at: float | None
    dirty: bool
    attempts: int
    dead_letter_reason: str | None
    dead_lettered_at: float | None

    @property
    def counts(self) -> dict[str, int]:
        """Deprecated name of :attr:`charges` (``counts`` read like the
        per-state counts of the engine)."""
        warnings.warn(
            "SessionView.counts is deprecated; use SessionView.charges",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.charges


class LinkView(msgspec.Struct, frozen=True):
    """A read-only copy of the relay link.

    * ``state``: ``up``, or ``paused`` after ``RelayUnavailable``.
    * ``failures``: consecutive ``RelayUnavailable`` answers or reports.
    * ``resume_at``: when a paused link is tried again (engine clock, seconds).
    """

    state: LinkState
    failures: int
    resume_at: float | None


def session_view(rec: SessionRecord) -> SessionView:
    """A read-only copy of a record, as ``Engine.session`` returns it."""
    return SessionView(
        id=rec.id,
        state=rec.state,
        lane=rec.lane,
        charges={CHARGED_REASONS[i]: n for i, n in enumerate(rec.counts) if n},
        retry_at=rec.retry_at,
        dirty=rec.dirty,
        attempts=rec.attempts,
        dead_letter_reason=rec.dead_letter_reason,
        dead_lettered_at=rec.dead_lettered_at,
    )


def link_view(link: LinkRecord) -> LinkView:
    """A read-only copy of the link record."""
    return LinkView(state=link.state, failures=link.failures, resume_at=link.resume_at)
