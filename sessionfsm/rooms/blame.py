"""Blame evidence: what the relay has accepted, and when each session last failed.

Before firing a failure the engine decides whether it was *shared* by several
sessions (then nobody is charged: the batch is split, or the link throttled),
and what the blame guards of :mod:`sessionfsm.machine` need to know
(``docs/blame.md``):

* ``accepted``: how many sessions the relay has accepted, ever;
* ``marks``: each failed session's mark, that count when its previous
  attempt ended (a session accepted since has none);
* ``refusing_since``: since when the relay has accepted nothing, or None.

Kept in memory only: after a restart, evidence starts afresh, which can only
spare a session. The engine updates the evidence inline on its hot path (an
``Ok`` answer); :meth:`Blame.verdict` is the rule it applies to a failure.
"""

from __future__ import annotations

from typing import Self

from .. import acks

__all__ = ["Blame"]


class Blame:
    """The evidence the engine weighs before charging a failure, and the rule.

    Public so that a test can plant a flaw in the rule: subclass it, override
    :meth:`verdict`, and pass it as ``Engine(rooms=Rooms(blame=...))``.
    """

    __slots__ = ("accepted", "marks", "refusing_since")

    def __init__(self) -> None:
        self.accepted = 0
        self.marks: dict[str, int] = {}
        self.refusing_since: float | None = None

    def copy(self) -> Self:
        """An independent copy."""
        twin = object.__new__(type(self))
        twin.accepted = self.accepted
        twin.marks = self.marks.copy()
        twin.refusing_since = self.refusing_since
        return twin

    def verdict(
        self,
        answered: int,
        failed: int,
        whole: bool,
        alike: bool,
        failure: acks.Ack,
        past_bound: bool,
    ) -> tuple[bool, bool]:
        """Whether an answer's failures were shared, and whether they throttle the relay.

        ``answered`` sessions were answered, ``failed`` of them with a failure;
        ``whole``: one ack was given for the whole batch; ``alike``: every
        failure is of one kind; ``failure``: the first (or the longest
        ``RateLimited`` hint); ``past_bound``: the relay has refused for
        ``policy.max_relay_refusal_s`` or longer.
        """
        several = answered >= 2
        if whole and several:
            # One ack for several sessions: evidence against the batch or the
            # relay, never against each of them (invariant 11).
            hint = isinstance(failure, acks.RateLimited) and failure.retry_after_s is not None
            return True, hint and not past_bound
        if several and failed == answered and alike and not past_bound:
            # A per-session answer failing every session alike: the relay
            # speaks for all of them. Throttled, unless the answer is that each
            # payload is too large: then split, and let each stand alone.
            return True, not isinstance(failure, acks.PayloadTooLarge)
        return False, False
