"""Counting the engine's log lines per session, as a structlog processor.

The library never configures structlog, so :class:`LogCounter` is only a
processor: whoever configures logging (the ``sessionfsm`` command does) puts
it first in the chain, ahead of any level filter that hides lines from the
terminal, and passes the same counter to the simulation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import MutableMapping
from typing import Any

__all__ = ["LogCounter"]


class LogCounter:
    """Counts ``sessionfsm.*`` events: per session, and after a dead letter.

    ``per_session[sid]`` counts events carrying ``session_id=sid``;
    ``after_dead_letter[sid]`` counts those that came after the session's
    ``sessionfsm.dead_lettered`` event (until a redrive): lines that a quiet
    dead letter should never produce. ``other`` counts events about no one
    session (link pauses, batch timeouts). It passes every event on unchanged.
    """

    def __init__(self) -> None:
        self.per_session: Counter[str] = Counter()
        self.after_dead_letter: Counter[str] = Counter()
        self.by_event: Counter[str] = Counter()
        self.other = 0
        self._dead: set[str] = set()

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.__init__()  # type: ignore[misc]

    @property
    def total(self) -> int:
        """Every counted event."""
        return sum(self.by_event.values())

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event = event_dict.get("event")
        if not isinstance(event, str) or not event.startswith("sessionfsm."):
            return event_dict
        self.by_event[event] += 1
        sid = event_dict.get("session_id")
        if not isinstance(sid, str):
            self.other += 1
            return event_dict
        self.per_session[sid] += 1
        if event == "sessionfsm.redriven":
            self._dead.discard(sid)
        elif sid in self._dead:
            self.after_dead_letter[sid] += 1
        elif event == "sessionfsm.dead_lettered":
            self._dead.add(sid)
        return event_dict
