"""Helpers for testing code that embeds sessionfsm (and for our own tests).

* :class:`FakeClock`: time you move by hand.
* :class:`ScriptedRelay`: a relay whose answers you script per session.
* :class:`EngineHarness`: ties an engine, a relay and a clock together and
  runs the tick loop synchronously, with no real sleeping.

Nothing here does I/O; it is safe to use from any test framework.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from . import acks
from .engine import Batch, Engine
from .store import Change

__all__ = ["EngineHarness", "FakeClock", "ScriptedRelay", "Sent"]


class FakeClock:
    """A clock that only moves when you say so. It may go backwards."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward (or back, if negative); return the new time."""
        self.now += seconds
        return self.now


@dataclass
class Sent:
    """One batch the relay received, and what it answered (None: lost ack)."""

    batch: Batch
    at: float
    answer: acks.Ack | dict[str, acks.Ack] | None


AnswerFn = Callable[[str], acks.Ack | None]


@dataclass
class ScriptedRelay:
    """A relay you script: by default every session gets ``Ok``.

    * ``script(sid, ack, ack, ...)`` queues answers for one session, used in
      order, then ``Ok`` again;
    * ``always(sid, ack)`` answers every send of that session with ``ack``;
    * ``down()`` / ``up()`` make the whole relay answer ``RelayUnavailable``;
    * ``lose_next(n)`` drops the next ``n`` batch answers (the engine times
      them out).

    Every batch is recorded in ``sent``.
    """

    sent: list[Sent] = field(default_factory=list)
    _scripts: dict[str, deque[acks.Ack | None]] = field(default_factory=dict)
    _always: dict[str, acks.Ack] = field(default_factory=dict)
    _down: bool = False
    _lose: int = 0

    def script(self, session_id: str, *answers: acks.Ack | None) -> None:
        """Answer the next sends of ``session_id`` with these, in order.

        ``None`` means no answer for that session: it stays in flight until
        the batch times out.
        """
        self._scripts.setdefault(session_id, deque()).extend(answers)

    def always(self, session_id: str, ack: acks.Ack) -> None:
        self._always[session_id] = ack

    def down(self) -> None:
        self._down = True

    def up(self) -> None:
        self._down = False

    @property
    def is_down(self) -> bool:
        return self._down

    def lose_next(self, batches: int = 1) -> None:
        self._lose += batches

    def answer(self, batch: Batch, now: float) -> acks.Ack | dict[str, acks.Ack] | None:
        """What the relay answers for ``batch``; None if the answer is lost."""
        result: acks.Ack | dict[str, acks.Ack] | None
        if self._lose:
            self._lose -= 1
            result = None
        elif self._down:
            result = acks.RelayUnavailable()
        else:
            per: dict[str, acks.Ack] = {}
            for sid in batch.session_ids:
                queued = self._scripts.get(sid)
                if queued:
                    ack = queued.popleft()
                    if ack is not None:
                        per[sid] = ack
                else:
                    per[sid] = self._always.get(sid, acks.Ok())
            result = per
        self.sent.append(Sent(batch=batch, at=now, answer=result))
        return result

    def sends_of(self, session_id: str) -> int:
        """How many batches carried ``session_id``."""
        return sum(session_id in s.batch.session_ids for s in self.sent)


class EngineHarness:
    """Runs the tick loop by hand: tick, send to the relay, ack, advance.

    Acks arrive ``latency`` seconds after the send (and before the next
    tick). You own the engine, relay and clock and may poke any of them
    between steps.
    """

    def __init__(
        self,
        engine: Engine,
        relay: ScriptedRelay | None = None,
        clock: FakeClock | None = None,
        *,
        latency: float = 0.5,
    ) -> None:
        self.engine = engine
        self.relay = relay if relay is not None else ScriptedRelay()
        self.clock = clock if clock is not None else FakeClock()
        self.latency = latency
        self.changes: list[Change] = []

    def enqueue(self, session_ids: Iterable[str], lane: str = "incremental") -> None:
        for sid in session_ids:
            self.engine.enqueue(sid, lane=lane, now=self.clock.now)

    def step(self, dt: float | None = None) -> list[Batch]:
        """One tick at the current time, answer its batches, then advance ``dt``
        (default: the policy's tick interval). Returns the batches sent."""
        engine, clock = self.engine, self.clock
        batches = engine.tick(clock.now)
        for batch in batches:
            answer = self.relay.answer(batch, clock.now)
            if answer is None:
                continue
            at = clock.now + self.latency
            if isinstance(answer, Mapping) and not answer:
                continue  # every session's answer was scripted as lost
            self.changes.extend(engine.on_ack(batch.id, answer, now=at))
        clock.advance(engine.policy.tick_interval_s if dt is None else dt)
        return batches

    def run_until_idle(self, max_seconds: float = 86_400.0, dt: float | None = None) -> float:
        """Step until every session is synced or dead-lettered; return the time.

        Raises ``TimeoutError`` if that takes longer than ``max_seconds`` of
        simulated time (a bug, or a relay scripted never to recover).
        """
        deadline = self.clock.now + max_seconds
        while not self.engine.idle():
            if self.clock.now > deadline:
                raise TimeoutError(
                    f"not idle after {max_seconds} simulated seconds: {self.engine.counts()}"
                )
            self.step(dt)
        return self.clock.now
