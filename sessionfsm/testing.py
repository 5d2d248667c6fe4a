"""Helpers for testing code that embeds sessionfsm (and for our own tests).

* :class:`FakeClock`: time you move by hand (the same class as
  ``sessionfsm.runner.FakeClock``).
* :class:`ScriptedRelay`: a relay whose answers you script per session.
* :class:`EngineHarness`: ties an engine, a relay and a clock together and
  runs the tick loop synchronously, with no real sleeping. It is a thin
  wrapper over :class:`~sessionfsm.SyncRunner`, the one loop in simulated
  time, so it ticks on the same rule as every other loop.
* :func:`postgres_server`: a PostgreSQL server for the duration of a block,
  for testing a :class:`~sessionfsm.postgres_store.PostgresStore` or a fleet.

Nothing here does I/O except :func:`postgres_server`, which starts a server
only when called; it is safe to use from any test framework. The core never
imports this module, and importing it loads neither psycopg nor pgserver.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from . import acks
from .engine import Batch, Engine
from .records import Change
from .runner import FakeClock, Reply, SyncRelay, SyncRunner

__all__ = ["DSN_VARIABLE", "EngineHarness", "FakeClock", "ScriptedRelay", "Sent", "postgres_server"]

#: The environment variable naming an existing PostgreSQL server (a libpq DSN)
#: that :func:`postgres_server` uses instead of starting one.
DSN_VARIABLE = "SESSIONFSM_TEST_DSN"


@dataclass
class Sent:
    """One batch the relay received, and what it answered (None: lost ack)."""

    batch: Batch
    at: float
    answer: acks.Ack | dict[str, acks.Ack] | Reply | None


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

    A thin wrapper over :class:`~sessionfsm.SyncRunner` (``self.runner``):
    the relay may be any :class:`~sessionfsm.runner.SyncRelay`, and its
    answers may be bare acks (they arrive ``latency`` seconds after the send)
    or :class:`~sessionfsm.runner.Reply` objects with their own delay. You own
    the engine, relay and clock and may poke any of them between steps.
    """

    def __init__(
        self,
        engine: Engine,
        relay: SyncRelay | None = None,
        clock: FakeClock | None = None,
        *,
        latency: float = 0.5,
    ) -> None:
        self.engine = engine
        self.relay: SyncRelay = relay if relay is not None else ScriptedRelay()
        self.clock = clock if clock is not None else FakeClock()
        self.runner = SyncRunner(engine, self.relay, self.clock, latency=latency)
        #: Every ``Change`` the relay's answers caused, in order.
        self.changes: list[Change] = []
        self.runner.on_changes = self.changes.extend

    @property
    def latency(self) -> float:
        """Delay of answers returned as a bare ack."""
        return self.runner.latency

    def enqueue(self, session_ids: Iterable[str], lane: str = "incremental") -> None:
        for sid in session_ids:
            self.engine.enqueue(sid, lane=lane, now=self.clock.now)

    def step(self, dt: float | None = None) -> list[Batch]:
        """One tick at the current time, send its batches, let every answer due
        within ``dt`` arrive, then advance ``dt`` (default: the policy's tick
        interval). Returns the batches sent."""
        engine, clock, runner = self.engine, self.clock, self.runner
        now = clock.now
        end = now + (engine.policy.tick_interval_s if dt is None else dt)
        batches = engine.tick(now)
        for batch in batches:
            runner.send(batch, now)
        while (due := runner.next_event_at()) is not None and due <= end:
            clock.now = max(clock.now, due)
            runner.deliver(clock.now)
        clock.now = end
        return batches

    def run_until_idle(self, max_seconds: float = 86_400.0, dt: float | None = None) -> float:
        """Run until every session is synced or dead-lettered; return the time.

        Ticks on the :class:`~sessionfsm.SyncRunner` rule (sooner when
        ``engine.next_wakeup()`` says so, at most every tick interval).
        Raises ``TimeoutError`` if that takes longer than ``max_seconds`` of
        simulated time (a bug, or a relay scripted never to recover).
        ``dt`` is deprecated and ignored: there is one loop, with one rule.
        """
        if dt is not None:
            warnings.warn(
                "EngineHarness.run_until_idle(dt=...) is ignored: the loop ticks on the "
                "SyncRunner rule",
                DeprecationWarning,
                stacklevel=2,
            )
        return self.runner.run_until_idle(max_seconds)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the block; yields its libpq DSN.

    If ``SESSIONFSM_TEST_DSN`` (:data:`DSN_VARIABLE`) is set, you get that
    server, left as it is. Otherwise a throwaway server is started with
    pgserver (``pip install pgserver``: PostgreSQL from PyPI, no system
    install) in a new data directory, then stopped and deleted when the block
    ends. Without either it raises ``ImportError``. Give each test its own
    ``schema=`` on the one server rather than a server per test: starting
    one takes a few seconds.
    """
    dsn = os.environ.get(DSN_VARIABLE)
    if dsn:
        yield dsn
        return
    if not os.environ.get("XDG_RUNTIME_DIR"):
        # pgserver asks platformdirs for a runtime directory (on import too),
        # which warns without one. One per user, kept: pgserver's exit hooks
        # write a lock file there after the block ends.
        runtime = os.path.join(tempfile.gettempdir(), f"sessionfsm-run-{os.getuid()}")
        os.makedirs(runtime, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = runtime
    try:
        import pgserver  # imported here: a test run without PostgreSQL never needs it
    except ImportError as exc:
        raise ImportError(
            f"postgres_server() needs pgserver (pip install pgserver) or {DSN_VARIABLE} "
            "naming a server"
        ) from exc
    # Directly under the system's temporary directory, never inside another
    # private (0700) one: run as root, pgserver starts the server as another
    # user, who must be able to reach the data directory.
    data = tempfile.mkdtemp(prefix="sessionfsm-pg-")
    try:
        # pgserver re-exports get_server without listing it in __all__.
        server = pgserver.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]
        try:
            yield server.get_uri()
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(data, ignore_errors=True)
