"""The I/O around the sans-IO engine: a clock, a transport, and a loop.

The engine never reads a clock, sends anything or sleeps; this module does,
and nothing else in the library does.

* :class:`Transport` is what you implement: ``async send(batch)`` returns the
  relay's answer, one ack for the batch or a ``{session_id: ack}`` mapping.
  If it can also tell when the relay comes and goes, it implements
  :class:`LinkReporter` as well: ``link_events()`` yields
  :class:`LinkEvent` values.
* :class:`Runner` drives an engine with a transport under asyncio: it ticks
  at ``policy.tick_interval_s`` (sooner when ``engine.next_wakeup()`` says
  so, and at once after an ack, an enqueue or a link event), sends batches
  concurrently, passes the answers back, cancels sends that outlive their
  batch's deadline, and stops cleanly on cancellation or SIGINT/SIGTERM.
* :class:`SyncRunner` and :func:`run_until_idle` do the same synchronously
  against a relay that answers at once (a :class:`SyncRelay`, such as
  :class:`sessionfsm.testing.ScriptedRelay` or the simulator's relay), in
  simulated time by default. Scripts, tests and the simulator use them.

Both loops decide when to tick with the same rule (:func:`next_delay`), so a
simulation is scheduled exactly as a live service would be.

Persistence needs nothing from the runner: the engine hands its store one
delta after every call. The runner only closes the engine (and so its store) on the way out.
Delivery is at least once: sessions whose send was cut short by a shutdown
are still ``in_flight`` in the store, and the next engine recovers them as
``queued``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol, TypeAlias, runtime_checkable

from . import acks
from ._errors import InvalidAck, SessionFSMError, StoreError, UsageError
from ._log import get_logger
from .engine import Batch, Engine
from .machine import Lane, SessionState
from .records import Change
from .store import Store

__all__ = [
    "AckResult",
    "FakeClock",
    "LinkEvent",
    "LinkReporter",
    "Reply",
    "Runner",
    "SyncRelay",
    "SyncRunner",
    "Transport",
    "means_unavailable",
    "next_delay",
    "run_until_idle",
]

#: What a relay answers for a batch: one ack for all, or one per session.
AckResult: TypeAlias = acks.Ack | Mapping[str, acks.Ack]


class LinkEvent(StrEnum):
    """What a transport reports about the relay, outside of any batch."""

    READY = "ready"
    UNAVAILABLE = "unavailable"


@runtime_checkable
class Transport(Protocol):
    """Sends one batch to the relay and returns its answer.

    Raise ``ConnectionError`` (or return ``acks.RelayUnavailable()``) when the
    relay is not connected: that is never charged to a session. The errors
    :func:`means_unavailable` recognises (those of httpx, aiohttp and
    websockets that mean "not connected") count the same. Any other
    exception is logged and the batch is left to time out. A send that never
    returns is cancelled at the batch's deadline.
    """

    async def send(self, batch: Batch) -> AckResult: ...


@runtime_checkable
class LinkReporter(Protocol):
    """A transport that also reports the relay coming and going."""

    def link_events(self) -> AsyncIterator[LinkEvent]: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A :class:`SyncRelay`'s answer that arrives ``delay_s`` after the send."""

    ack: AckResult
    delay_s: float = 0.0


@runtime_checkable
class SyncRelay(Protocol):
    """A relay that decides its answer when the batch is sent.

    Return the ack (it arrives after the runner's default latency), a
    :class:`Reply` with its own delay, or None if the answer is lost (the
    engine times the batch out).
    """

    def answer(self, batch: Batch, now: float) -> AckResult | Reply | None: ...


#: Errors of HTTP and WebSocket client libraries that mean the relay was not
#: reached (or the connection dropped), by top-level module and class name, so
#: that recognising them never imports the library. Any class in an error's
#: MRO counts. Read or protocol errors after the request left are not here:
#: the relay may have received the batch, and an unanswered batch times out.
UNAVAILABLE_ERRORS: Final = frozenset(
    {
        # httpx: ConnectError, ConnectTimeout (nothing was sent), and a pool
        # that never gave a connection.
        ("httpx", "ConnectError"),
        ("httpx", "ConnectTimeout"),
        ("httpx", "PoolTimeout"),
        # aiohttp: every connection error (ClientConnectorError,
        # ServerDisconnectedError, ClientOSError, ...).
        ("aiohttp", "ClientConnectionError"),
        # websockets: the socket is closed, or never opened.
        ("websockets", "ConnectionClosed"),
        ("websockets", "InvalidHandshake"),
    }
)


def means_unavailable(exc: BaseException) -> bool:
    """Whether an exception from ``Transport.send`` means "the relay is not connected".

    True for ``ConnectionError`` (refused, reset, aborted, broken pipe) and
    the library errors in :data:`UNAVAILABLE_ERRORS`; such a batch is
    answered ``RelayUnavailable`` and charged to nobody. Pass your own
    function as ``Runner(unavailable=...)`` to recognise more.
    """
    if isinstance(exc, ConnectionError):
        return True
    for cls in type(exc).__mro__:
        if (cls.__module__.partition(".")[0], cls.__name__) in UNAVAILABLE_ERRORS:
            return True
    return False


def next_delay(engine: Engine, now: float) -> float:
    """Seconds from ``now`` until the next tick, if nothing wakes the loop first.

    At most ``policy.tick_interval_s``; sooner if ``engine.next_wakeup()``
    comes first. That is the one answer to "when must I tick next": it already
    covers the end of a link pause, retries, deadlines, lane throttles and
    paced redrive, so the loop never works any of them out itself. A wakeup at
    or before ``now`` right after a tick means the tick could not act on it
    yet, so the loop waits a full interval or for an ack instead of spinning.
    """
    delay = engine.policy.tick_interval_s
    wake = engine.next_wakeup()
    if wake is not None and wake > now:
        delay = min(delay, wake - now)
    return delay


def _counts(engine: Engine) -> str:
    return ", ".join(f"{state.value}={n}" for state, n in engine.sessions_by_state().items() if n)


def _result_of(answer: AckResult | Reply | None, latency: float) -> tuple[AckResult, float] | None:
    if answer is None:
        return None
    if isinstance(answer, Reply):
        return answer.ack, answer.delay_s
    return answer, latency


class Runner:
    """Runs an engine against a :class:`Transport` under asyncio.

    You pass the engine, the transport and, optionally:

    * ``store``: leave it out: the runner uses the engine's own store
      (``Engine(policy, store=store)``) and closes it, with the engine, when
      it stops. Passing a store the engine was not given raises
      ``UsageError``, since the engine would persist nothing to it;
    * ``clock``: seconds as a float, ``time.time`` by default. The engine
      only ever sees times read from it;
    * ``sleep``: an ``async`` function that waits the given seconds
      (``asyncio.sleep`` by default). With a fake clock, pass one that
      advances it, and the loop runs without real waiting;
    * ``grace_s``: on a requested stop (``stop()``, SIGINT, SIGTERM), how
      long to wait for sends already under way so their answers are not
      wasted. A cancelled ``run()`` does not wait;
    * ``unavailable``: decides which exceptions from ``send`` mean the relay
      is not connected (:func:`means_unavailable` by default);
    * ``log``: False to log nothing; by default the runner logs when the
      engine does (``Engine(log=False)`` silences both);
    * ``close``: False to leave the engine and its store open when ``run()``
      returns (to inspect or reuse them); by default they are closed.

    A save that fails (``StoreError``) while running stops the runner:
    ``run()`` cancels the sends, closes the store and raises that error,
    whichever task met it. See docs/faults.md.

    Drive it from one event loop; the engine is not thread-safe.
    """

    def __init__(
        self,
        engine: Engine,
        transport: Transport,
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] | None = None,
        grace_s: float = 5.0,
        log: bool | None = None,
        unavailable: Callable[[BaseException], bool] = means_unavailable,
        close: bool = True,
    ) -> None:
        if not isinstance(engine, Engine):
            raise UsageError(f"engine must be a sessionfsm.Engine, got {engine!r}")
        if not isinstance(transport, Transport):
            raise UsageError(f"transport must have an async send(batch), got {transport!r}")
        if not (isinstance(grace_s, (int, float)) and math.isfinite(grace_s) and grace_s >= 0):
            raise UsageError(f"grace_s must be a finite number >= 0, got {grace_s!r}")
        if store is not None and store is not engine.store:
            if engine.store is None:
                raise UsageError(
                    f"the store {store!r} was given to the Runner but not to the Engine, "
                    "which would persist nothing to it: pass it once, as "
                    "Engine(policy, store=store), and leave it out of Runner(...)"
                )
            raise UsageError(
                f"the Runner's store {store!r} is not the engine's store {engine.store!r}: "
                "leave store out of Runner(...); it uses the engine's"
            )
        self.engine = engine
        self.transport = transport
        #: The engine's store (``engine.store``), closed with it when the runner stops.
        self.store: Store | None = engine.store
        self._clock = clock
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self._grace_s = float(grace_s)
        self._unavailable = unavailable
        # The first failed save met by any task; run() raises it.
        self._failure: SessionFSMError | None = None
        # Set once run() has closed the store: nothing can be saved any more.
        self._closed = False
        self._log = get_logger(engine.logs if log is None else log)
        self._close = close
        self._sends: dict[int, tuple[Batch, asyncio.Task[None]]] = {}
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._running = False
        #: Sends started, sends cancelled at their deadline, sends that failed.
        self.stats: dict[str, int] = {"sent": 0, "cancelled": 0, "failed": 0, "invalid_ack": 0}

    # ---------------------------------------------------------------- control

    def now(self) -> float:
        """The runner's clock."""
        return float(self._clock())

    def stop(self) -> None:
        """Ask the loop to stop: no new batches, answers under way get ``grace_s``."""
        self._stopping = True
        self._poke()

    def enqueue(self, session_id: str, lane: Lane | str = Lane.INCREMENTAL) -> None:
        """A session is new or changed: enqueue it now and wake the loop.

        Safe while the runner stops (it is saved and sent by the next run).
        Once ``run()`` has closed the store it raises ``UsageError``, in your
        task: enqueue on the engine of the next run instead.
        """
        self._check_open("enqueue")
        self.engine.enqueue(session_id, lane, now=self.now())
        self._poke()

    def relay_ready(self) -> None:
        """The relay is ready again: resume sending at once."""
        self._check_open("relay_ready")
        self.engine.relay_ready(self.now())
        self._poke()

    def relay_unavailable(self) -> None:
        """The relay went away: pause sending; nobody is charged."""
        self._check_open("relay_unavailable")
        self.engine.relay_unavailable(self.now())
        self._poke()

    async def run(
        self,
        *,
        until_idle: bool = False,
        handle_signals: bool = False,
        max_seconds: float | None = None,
    ) -> None:
        """Tick, send and apply answers until stopped (or, with ``until_idle``,
        until every session is synced or dead-lettered).

        ``max_seconds`` (by the runner's clock) raises ``TimeoutError`` if the
        loop is still going after that long.

        ``handle_signals`` turns SIGINT and SIGTERM into :meth:`stop` while
        running (Unix main thread only). On the way out, sends still under
        way are cancelled, their sessions stay ``in_flight`` in the store for
        the next run to recover, and the store is closed.
        """
        if self._running:
            raise UsageError("this runner is already running")
        self._check_open("run")
        self._running = True
        self._failure = None
        self._stopping = False
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = self._install_signals(loop) if handle_signals else []
        watcher: asyncio.Task[None] | None = None
        if isinstance(self.transport, LinkReporter):
            watcher = asyncio.create_task(self._watch(self.transport))
        self._log.info("sessionfsm.runner_started", sessions=len(self.engine))
        try:
            await self._loop(until_idle, max_seconds)
            if self._failure is None:
                await self._drain()
        finally:
            await self._shutdown(watcher)
            for sig in signals:
                loop.remove_signal_handler(sig)
            self._running = False
        if self._failure is not None:
            raise self._failure

    def _check_open(self, doing: str) -> None:
        if self._closed:
            raise UsageError(
                f"cannot {doing}: this runner has stopped and closed its store; "
                "use the engine and store of the next run"
            )

    def _fail(self, exc: SessionFSMError) -> None:
        """A save failed in a task other than the loop's: stop, and let run() raise it."""
        if self._failure is None:
            self._failure = exc
            self._log.error("sessionfsm.runner_save_failed", error=str(exc))
        self.stop()

    # -------------------------------------------------------------- internals

    async def _loop(self, until_idle: bool, max_seconds: float | None) -> None:
        engine = self.engine
        limit = math.inf if max_seconds is None else self.now() + max_seconds
        while not self._stopping:
            now = self.now()
            batches = engine.tick(now)
            self._cancel_overdue(now)
            for batch in batches:
                self._start(batch)
            if until_idle and engine.idle():
                return
            if now >= limit:
                raise TimeoutError(f"not idle after {max_seconds:g} s: {_counts(engine)}")
            # Never sleep past the limit: max_seconds=3 gives up at 3 s, not
            # at the next tick after it.
            await self._pause(min(next_delay(engine, now), limit - now))

    def _start(self, batch: Batch) -> None:
        self.stats["sent"] += 1
        task = asyncio.create_task(self._send(batch), name=f"sessionfsm-send-{batch.id}")
        self._sends[batch.id] = (batch, task)

    async def _send(self, batch: Batch) -> None:
        try:
            try:
                result: AckResult = await self.transport.send(batch)
            except Exception as exc:
                if not self._is_unavailable(exc):
                    self.stats["failed"] += 1
                    self._log.error(
                        "sessionfsm.send_failed", batch_id=batch.id, error=repr(exc), exc_info=True
                    )
                    return  # no answer: the engine times the batch out
                # The relay is not there: a transport reason, never a session's.
                self._log.info("sessionfsm.send_unavailable", batch_id=batch.id, error=repr(exc))
                result = acks.RelayUnavailable()
            if self._failure is not None or self._closed:
                return  # stopping for a failed save: the next run resends it
            try:
                self.engine.on_ack(batch.id, result, self.now())
            except InvalidAck as exc:
                self.stats["invalid_ack"] += 1
                self._log.warning("sessionfsm.invalid_ack", batch_id=batch.id, error=str(exc))
            except StoreError as exc:
                self._fail(exc)
        finally:
            self._sends.pop(batch.id, None)
            self._poke()

    def _is_unavailable(self, exc: Exception) -> bool:
        try:
            return bool(self._unavailable(exc))
        except Exception:  # a broken hook must not turn a send into a crash
            self._log.error("sessionfsm.unavailable_hook_failed", exc_info=True)
            return isinstance(exc, ConnectionError)

    def _cancel_overdue(self, now: float) -> None:
        # The tick has just timed these batches out; an answer that still
        # slips through is counted by the engine as a late ack.
        for batch, task in list(self._sends.values()):
            if batch.deadline <= now and not task.done():
                self.stats["cancelled"] += 1
                self._log.info("sessionfsm.send_cancelled", batch_id=batch.id, why="deadline")
                task.cancel()

    async def _pause(self, delay: float) -> None:
        wake = self._wake
        assert wake is not None
        if not wake.is_set():
            sleeper = asyncio.ensure_future(self._sleep(delay))
            waker = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()
        wake.clear()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _watch(self, reporter: LinkReporter) -> None:
        try:
            async for raw in reporter.link_events():
                try:
                    event = LinkEvent(raw)
                except ValueError:
                    self._log.warning("sessionfsm.link_event_ignored", link_event=repr(raw))
                    continue
                if event is LinkEvent.READY:
                    self.relay_ready()
                else:
                    self.relay_unavailable()
        except StoreError as exc:
            self._fail(exc)
        except Exception as exc:
            # Sending goes on without reports: RelayUnavailable acks still pause the link.
            self._log.error("sessionfsm.link_events_failed", error=repr(exc), exc_info=True)

    async def _drain(self) -> None:
        """Give sends under way up to ``grace_s`` to bring their answers back."""
        tasks = [task for _, task in self._sends.values()]
        if tasks and self._grace_s > 0:
            self._log.info("sessionfsm.runner_draining", batches=len(tasks), grace_s=self._grace_s)
            await asyncio.wait(tasks, timeout=self._grace_s)

    async def _shutdown(self, watcher: asyncio.Task[None] | None) -> None:
        pending = [task for _, task in self._sends.values()]
        cut = sum(len(batch.session_ids) for batch, _ in self._sends.values())
        for task in pending:
            task.cancel()
        if watcher is not None:
            watcher.cancel()
            pending.append(watcher)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self._sends.clear()
        counts = self.engine.sessions_by_state()
        self._log.info(
            "sessionfsm.runner_stopped",
            # Sends cancelled just now, and every session the engine still
            # has in flight (those plus any whose send failed or whose answer
            # never came): the next start resends all of the latter.
            sessions_cut_off=cut,
            sessions_in_flight=counts[SessionState.IN_FLIGHT],
            counts={state.value: n for state, n in counts.items() if n},
        )
        if self._close:
            self.engine.close()
            self._closed = True

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        installed: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or not a Unix loop: no handler
            installed.append(sig)
        return installed

    def _on_signal(self, sig: signal.Signals) -> None:
        self._log.info("sessionfsm.runner_stopping", signal=sig.name)
        self.stop()


class FakeClock:
    """A clock that only moves when you say so. It may go backwards.

    The default clock of :class:`SyncRunner` and :func:`run_until_idle`;
    ``sessionfsm.testing.FakeClock`` is the same class.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move forward (or back, if negative); return the new time."""
        self.now += seconds
        return self.now


class SyncRunner:
    """Runs an engine against a :class:`SyncRelay` in one thread, in steps.

    It keeps a timeline of pending inputs (answers on their way back, and
    anything you schedule with :meth:`at`) and jumps from one to the next,
    ticking on the same rule as :class:`Runner`. With the default clock
    (a :class:`FakeClock`) nothing really sleeps. It is the one loop in
    simulated time: :func:`run_until_idle`, the simulator and
    :class:`sessionfsm.testing.EngineHarness` all run on it.

    ``latency`` is the delay of answers returned as a bare ack rather than
    a :class:`Reply`.
    """

    def __init__(
        self,
        engine: Engine,
        relay: SyncRelay,
        clock: Callable[[], float] | None = None,
        *,
        latency: float = 0.5,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        if not isinstance(relay, SyncRelay):
            raise UsageError(f"relay must have answer(batch, now), got {relay!r}")
        if clock is None:
            clock = FakeClock(engine.now)
        self.engine = engine
        self.relay = relay
        self.clock: Callable[[], float] = clock
        if sleep is None:
            advance = getattr(clock, "advance", None)
            sleep = advance if callable(advance) else time.sleep
        self._sleep = sleep
        self.latency = latency
        self._timeline: list[tuple[float, int, Callable[[float], Any], bool]] = []
        self._seq = itertools.count()
        self._essential = 0
        self._next_tick: float | None = None
        #: Called after every tick with the time and the batches it formed.
        self.on_tick: Callable[[float, list[Batch]], Any] | None = None
        #: Called with the ``Change`` rows of every answer delivered.
        self.on_changes: Callable[[list[Change]], Any] | None = None

    def at(self, when: float, action: Callable[[float], Any], *, essential: bool = True) -> None:
        """Call ``action(now)`` at ``when``. Until every ``essential`` action
        has run, :meth:`run_until_idle` keeps going even if the engine is idle."""
        heapq.heappush(self._timeline, (float(when), next(self._seq), action, essential))
        if essential:
            self._essential += 1

    def next_event_at(self) -> float | None:
        """When the next scheduled input or answer is due, if any."""
        return self._timeline[0][0] if self._timeline else None

    def run_until_idle(self, max_seconds: float = 86_400.0) -> float:
        """Run until the engine is idle and no essential input is pending.

        Returns the time it got there. Raises ``TimeoutError`` after
        ``max_seconds`` of (simulated) time.
        """
        engine = self.engine
        start = self.clock()
        limit = start + max_seconds
        while True:
            now = self.clock()
            if self.deliver(now):
                self._next_tick = now
            if self._next_tick is None or now >= self._next_tick:
                batches = engine.tick(now)
                for batch in batches:
                    self.send(batch, now)
                self._next_tick = now + next_delay(engine, now)
                if self.on_tick is not None:
                    self.on_tick(now, batches)
            if not self._essential and engine.idle():
                return now
            target = self._next_tick
            upcoming = self.next_event_at()
            if upcoming is not None and upcoming < target:
                target = upcoming
            if target > limit:
                raise TimeoutError(f"not idle after {max_seconds:g} s: {_counts(engine)}")
            if target > now:
                self._sleep(target - now)

    def send(self, batch: Batch, now: float) -> None:
        """Hand ``batch`` to the relay at ``now`` and schedule its answer, if any."""
        result = _result_of(self.relay.answer(batch, now), self.latency)
        if result is None:
            return
        ack, delay = result
        if isinstance(ack, Mapping) and not ack:
            return  # every session's answer was lost

        def deliver(at: float, batch_id: int = batch.id, ack: AckResult = ack) -> None:
            changes = self.engine.on_ack(batch_id, ack, at)
            if self.on_changes is not None:
                self.on_changes(changes)

        self.at(now + max(0.0, delay), deliver, essential=False)

    def deliver(self, now: float) -> bool:
        """Run every scheduled input due at or before ``now``; True if any ran."""
        timeline = self._timeline
        delivered = False
        while timeline and timeline[0][0] <= now:
            _, _, action, essential = heapq.heappop(timeline)
            if essential:
                self._essential -= 1
            action(now)
            delivered = True
        return delivered


def run_until_idle(
    engine: Engine,
    relay: SyncRelay | Transport,
    clock: Callable[[], float] | None = None,
    *,
    latency: float = 0.5,
    max_seconds: float = 86_400.0,
) -> float:
    """Drive ``engine`` until every session is synced or dead-lettered.

    You pass a :class:`SyncRelay` (``answer(batch, now)``, e.g.
    ``ScriptedRelay``) or an async :class:`Transport`, and optionally a clock:
    a ``FakeClock`` (the default, starting at ``engine.now``) makes the run
    take no real time. Returns the clock's time when idle; raises
    ``TimeoutError`` after ``max_seconds``. Not for use inside a running
    event loop with a transport: ``await Runner(...).run(until_idle=True)``
    there instead.
    """
    if isinstance(relay, SyncRelay):
        return SyncRunner(engine, relay, clock, latency=latency).run_until_idle(max_seconds)
    if not isinstance(relay, Transport):
        raise UsageError(f"expected a SyncRelay or a Transport, got {relay!r}")
    if clock is None:
        clock = FakeClock(engine.now)
    sleep: Callable[[float], Awaitable[Any]] | None = None
    advance = getattr(clock, "advance", None)
    if callable(advance):

        async def fake_sleep(seconds: float) -> None:
            # Let answers already on their way land first: if one wakes the
            # loop, this sleep is cancelled before the clock moves.
            await asyncio.sleep(0)
            advance(seconds)

        sleep = fake_sleep
    runner = Runner(engine, relay, clock=clock, sleep=sleep, grace_s=0.0, close=False)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(runner.run(until_idle=True, max_seconds=max_seconds))
        return runner.now()
    raise UsageError("run_until_idle cannot run inside an event loop; await Runner.run instead")
