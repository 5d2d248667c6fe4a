"""The runner: the asyncio loop, the synchronous stepper and run_until_idle."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import sessionfsm.runner
from sessionfsm import Batch, Engine, LinkState, Policy, SessionState, StoreError, UsageError, acks
from sessionfsm.runner import (
    AckResult,
    LinkEvent,
    Reply,
    Runner,
    SyncRunner,
    means_unavailable,
    next_delay,
    run_until_idle,
)
from sessionfsm.sqlite_store import SqliteStore
from sessionfsm.store import MemoryStore
from sessionfsm.testing import EngineHarness, FakeClock, ScriptedRelay
from tests.conftest import FailingStore


class _Transport:
    """Answers from ``answer(batch)``; records every send and its outcome."""

    def __init__(self, answer: Callable[[Batch], Any] | None = None) -> None:
        self.reply = answer or (lambda batch: acks.Ok())
        self.sent: list[Batch] = []
        self.cancelled: list[int] = []
        self.open = 0
        self.most_open = 0

    async def send(self, batch: Batch) -> AckResult:
        self.sent.append(batch)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            result = self.reply(batch)
            if asyncio.iscoroutine(result):
                result = await result
            return result  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            self.cancelled.append(batch.id)
            raise
        finally:
            self.open -= 1


async def _forever() -> AckResult:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _fake_sleep(clock: FakeClock) -> Callable[[float], Any]:
    async def sleep(seconds: float) -> None:
        await asyncio.sleep(0)
        clock.advance(seconds)

    return sleep


def _runner(engine: Engine, transport: Any, clock: FakeClock, **kw: Any) -> Runner:
    return Runner(engine, transport, clock=clock, sleep=_fake_sleep(clock), **kw)


class _KeptStore(MemoryStore):
    """A MemoryStore that counts close() but stays readable, to reopen in the test."""

    closed = 0

    def close(self) -> None:
        self.closed += 1


def _enqueue(engine: Engine, n: int, prefix: str = "s") -> list[str]:
    ids = [f"{prefix}{i:02d}" for i in range(n)]
    for sid in ids:
        engine.enqueue(sid, now=engine.now)
    return ids


# ------------------------------------------------------------ run_until_idle


def test_run_until_idle_syncs_everything_and_dead_letters_the_refused(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_until_idle drives a ScriptedRelay to rest in simulated time, with no real sleep."""
    _enqueue(engine, 25)
    relay = ScriptedRelay()
    relay.always("s03", acks.RateLimited())
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    done_at = run_until_idle(engine, relay)
    assert slept == []  # every wait was the fake clock's
    assert engine.idle()
    assert engine.state("s03") is SessionState.DEAD_LETTERED
    assert relay.sends_of("s03") == 5
    assert engine.sessions_by_state()[SessionState.SYNCED] == 24
    # Three incremental batches at least 30 s apart, plus four retries of s03.
    assert 120.0 <= done_at <= 200.0


def test_run_until_idle_accepts_an_async_transport(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async Transport runs under run_until_idle on a fake clock: no real waiting."""
    _enqueue(engine, 12)
    transport = _Transport()
    real_sleep = asyncio.sleep
    waits: list[float] = []

    async def recording_sleep(delay: float, *args: Any) -> Any:
        waits.append(delay)
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    done_at = run_until_idle(engine, transport)
    assert waits  # the loop yielded ...
    assert max(waits) == 0  # ... but never waited: the fake clock moved instead
    assert engine.sessions_by_state()[SessionState.SYNCED] == 12
    assert [len(b.session_ids) for b in transport.sent] == [10, 2]
    assert done_at >= engine.policy.incremental_interval_s


def test_run_until_idle_times_out_when_the_relay_never_comes_back(engine: Engine) -> None:
    """A relay that is always down never charges anyone, so the run times out instead."""
    _enqueue(engine, 3)
    relay = ScriptedRelay()
    relay.down()
    with pytest.raises(TimeoutError, match="not idle after 600 s"):
        run_until_idle(engine, relay, max_seconds=600.0)
    assert engine.sessions_by_state()[SessionState.DEAD_LETTERED] == 0
    assert all(not view.charges for view in engine.sessions())


def test_run_until_idle_refuses_what_is_neither_relay_nor_transport(engine: Engine) -> None:
    """Passing something with neither answer() nor send() is a usage error."""
    with pytest.raises(UsageError, match="SyncRelay or a Transport"):
        run_until_idle(engine, object())  # type: ignore[arg-type]


def test_run_until_idle_with_a_transport_refuses_a_running_loop(engine: Engine) -> None:
    """Inside an event loop, run_until_idle says to await Runner.run instead."""

    async def inside() -> None:
        run_until_idle(engine, _Transport())

    with pytest.raises(UsageError, match=r"await Runner\.run"):
        asyncio.run(inside())


# ---------------------------------------------------------------- SyncRunner


def test_sync_runner_delivers_a_reply_after_its_delay(engine: Engine) -> None:
    """A Reply's ack reaches the engine exactly delay_s after the send."""

    class Slow:
        def answer(self, batch: Batch, now: float) -> Reply:
            return Reply(acks.Ok(), delay_s=7.0)

    store = MemoryStore()
    engine = Engine(engine.policy, store=store, log=False)
    engine.enqueue("a", now=0.0)
    SyncRunner(engine, Slow()).run_until_idle()
    acked = [c for c in store.history("a") if c.event == "acked"]
    assert [c.at for c in acked] == [7.0]


def test_sync_runner_waits_for_scheduled_inputs_even_when_idle(engine: Engine) -> None:
    """An essential input scheduled for later keeps the run going past idleness."""
    runner = SyncRunner(engine, ScriptedRelay())
    runner.at(500.0, lambda now: engine.enqueue("late", now=now))
    done_at = runner.run_until_idle()
    assert engine.state("late") is SessionState.SYNCED
    assert done_at >= 500.0


def test_sync_runner_does_not_wait_for_inessential_inputs(engine: Engine) -> None:
    """An inessential input (a relay event) after the work is done is not waited for."""
    calls: list[float] = []
    runner = SyncRunner(engine, ScriptedRelay())
    engine.enqueue("a", now=0.0)
    runner.at(5_000.0, calls.append, essential=False)
    done_at = runner.run_until_idle()
    assert done_at < 5_000.0
    assert calls == []


def test_sync_runner_ticks_again_as_soon_as_an_answer_frees_the_slot() -> None:
    """With no lane interval, the next batch goes when the ack lands, not a tick later."""
    engine = Engine(Policy(backfill_batch_size=2), log=False)
    for i in range(6):
        engine.enqueue(f"b{i}", lane="backfill", now=0.0)
    relay = ScriptedRelay()
    runner = SyncRunner(engine, relay, latency=0.5)
    runner.run_until_idle()
    assert [s.at for s in relay.sent] == [0.0, 0.5, 1.0]


def test_sync_runner_refuses_a_relay_without_answer(engine: Engine) -> None:
    """A SyncRunner needs answer(batch, now)."""
    with pytest.raises(UsageError, match="answer"):
        SyncRunner(engine, _Transport())  # type: ignore[arg-type]


# ---------------------------------------------------------------- next_delay


def test_next_delay_is_at_most_the_tick_interval(engine: Engine) -> None:
    """With nothing due, the loop waits one tick interval."""
    assert next_delay(engine, 0.0) == engine.policy.tick_interval_s


def test_next_delay_wakes_for_a_retry_due_before_the_next_tick(engine: Engine) -> None:
    """A retry time inside the tick interval shortens the wait to it."""
    engine.enqueue("a", now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, acks.RateLimited(retry_after_s=2.0), now=1.0)
    assert next_delay(engine, 1.0) == pytest.approx(2.0)


def test_next_delay_waits_for_a_paused_link_instead_of_spinning(engine: Engine) -> None:
    """While the link is paused with sessions ready, the wait ends when the pause does."""
    engine.enqueue("a", now=0.0)
    engine.relay_unavailable(now=0.0)
    engine.tick(0.0)
    assert engine.link.state is LinkState.PAUSED
    assert next_delay(engine, 0.0) == pytest.approx(1.0)  # relay_pause starts at 1 s
    engine.relay_unavailable(now=0.5)
    assert 0.0 < next_delay(engine, 0.5) <= engine.policy.tick_interval_s


# -------------------------------------------------------------------- Runner


def test_runner_syncs_everything_and_closes_the_store() -> None:
    """Runner.run(until_idle=True) syncs every session, then closes the store."""
    store = MemoryStore()
    engine = Engine(Policy(), store=store, rng=random.Random(0), log=False)
    _enqueue(engine, 15)
    clock = FakeClock()
    asyncio.run(_runner(engine, _Transport(), clock, store=store).run(until_idle=True))
    assert engine.sessions_by_state()[SessionState.SYNCED] == 15
    with pytest.raises(StoreError, match="closed"):
        store.sessions_by_state()


def test_runner_sends_batches_concurrently() -> None:
    """With max_in_flight=3, three sends are under way at once."""
    engine = Engine(Policy(max_in_flight=3, backfill_batch_size=1), log=False)
    for i in range(6):
        engine.enqueue(f"b{i}", lane="backfill", now=0.0)

    async def slow(batch: Batch) -> AckResult:
        for _ in range(5):
            await asyncio.sleep(0)
        return acks.Ok()

    transport = _Transport(slow)
    clock = FakeClock()
    asyncio.run(_runner(engine, transport, clock).run(until_idle=True))
    assert transport.most_open == 3
    assert engine.sessions_by_state()[SessionState.SYNCED] == 6


def test_runner_cancels_a_send_that_outlives_its_deadline() -> None:
    """A send with no answer is cancelled at the deadline and the batch times out."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("a", now=0.0)
    transport = _Transport(lambda batch: _forever() if batch.id == 1 else acks.Ok())
    clock = FakeClock()
    runner = _runner(engine, transport, clock)
    asyncio.run(runner.run(until_idle=True))
    assert transport.cancelled == [1]
    assert runner.stats["cancelled"] == 1
    assert engine.state("a") is SessionState.SYNCED
    assert transport.sent[1].sent_at >= engine.policy.ack_timeout_s  # retried after backoff


def test_runner_passes_an_answer_that_slips_past_the_deadline_as_late() -> None:
    """A transport that ignores the cancellation still reports; the engine counts a late ack."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("a", now=0.0)

    async def stubborn(batch: Batch) -> AckResult:
        if batch.id == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return acks.Ok()  # swallowed: the answer arrives after all
        return acks.Ok()

    clock = FakeClock()
    asyncio.run(_runner(engine, _Transport(stubborn), clock).run(until_idle=True))
    assert engine.anomalies.get("late_ack") == 1
    assert engine.state("a") is SessionState.SYNCED


def test_runner_turns_a_connection_error_into_relay_unavailable() -> None:
    """ConnectionError from send is the transport's fault: nobody is charged, the link pauses."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("a", now=0.0)
    failures = [ConnectionError("socket closed")] * 7

    def answer(batch: Batch) -> AckResult:
        if failures:
            raise failures.pop()
        return acks.Ok()

    transport = _Transport(answer)
    clock = FakeClock()
    asyncio.run(_runner(engine, transport, clock).run(until_idle=True))
    assert engine.state("a") is SessionState.SYNCED
    assert engine.session("a").attempts == 0
    assert len(transport.sent) == 8


def test_runner_leaves_a_failed_send_to_time_out() -> None:
    """Any other exception from send is logged and the batch times out (AckTimeout)."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("a", now=0.0)
    failures = [RuntimeError("bug")]

    def answer(batch: Batch) -> AckResult:
        if failures:
            raise failures.pop()
        return acks.Ok()

    clock = FakeClock()
    runner = _runner(engine, _Transport(answer), clock)
    asyncio.run(runner.run(until_idle=True))
    assert runner.stats["failed"] == 1
    assert engine.state("a") is SessionState.SYNCED
    assert clock.now >= engine.policy.ack_timeout_s


def test_runner_survives_an_invalid_ack_from_the_transport() -> None:
    """A transport returning something that is not an ack is logged; the batch times out."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("a", now=0.0)
    answers: list[Any] = ["garbage"]

    def answer(batch: Batch) -> Any:
        return answers.pop() if answers else acks.Ok()

    clock = FakeClock()
    runner = _runner(engine, _Transport(answer), clock)
    asyncio.run(runner.run(until_idle=True))
    assert runner.stats["invalid_ack"] == 1
    assert engine.state("a") is SessionState.SYNCED


def test_runner_applies_link_events_from_the_transport() -> None:
    """A LinkReporter's unavailable pauses the link at once; ready resumes it."""
    engine = Engine(Policy(), log=False)
    seen: list[LinkState] = []

    class Reporting(_Transport):
        async def link_events(self) -> AsyncIterator[LinkEvent | str]:
            yield LinkEvent.UNAVAILABLE
            await asyncio.sleep(0)
            seen.append(engine.link.state)
            yield "bogus"
            yield "ready"
            await asyncio.sleep(0)
            seen.append(engine.link.state)

    clock = FakeClock()
    runner = _runner(engine, Reporting(), clock)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        for _ in range(20):
            await asyncio.sleep(0)
        runner.stop()
        await task

    asyncio.run(main())
    assert seen == [LinkState.PAUSED, LinkState.UP]


def test_runner_keeps_sending_when_link_events_fail() -> None:
    """A link_events iterator that raises is logged; batches still go and sync."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("a", now=0.0)

    class Broken(_Transport):
        async def link_events(self) -> AsyncIterator[LinkEvent]:
            raise OSError("watcher died")
            yield LinkEvent.READY  # pragma: no cover - makes this an async generator

    clock = FakeClock()
    asyncio.run(_runner(engine, Broken(), clock).run(until_idle=True))
    assert engine.state("a") is SessionState.SYNCED


def test_runner_stop_keeps_unanswered_sessions_for_the_next_run() -> None:
    """A send cut off at stop stays in flight in the store; the next engine requeues it."""
    store = _KeptStore()
    engine = Engine(Policy(), store=store, log=False)
    engine.enqueue("a", now=0.0)
    transport = _Transport(lambda batch: _forever())
    runner = Runner(engine, transport, store=store, grace_s=0.01)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        while not transport.sent:
            await asyncio.sleep(0)
        runner.stop()
        await task

    asyncio.run(main())
    assert transport.cancelled == [1]
    assert store.closed == 1
    snapshot = store.load()
    assert snapshot is not None
    assert {rec.id: rec.state for rec in snapshot.sessions} == {"a": SessionState.IN_FLIGHT}
    revived = Engine(Policy(), store=store, log=False)
    assert revived.state("a") is SessionState.QUEUED


def test_runner_stop_waits_for_answers_within_the_grace_period() -> None:
    """An answer that arrives during the grace period is applied before the store closes."""
    store = MemoryStore()
    engine = Engine(Policy(), store=store, log=False)
    engine.enqueue("a", now=0.0)
    release = asyncio.Event()
    started = asyncio.Event()

    async def answer(batch: Batch) -> AckResult:
        started.set()
        await release.wait()
        return acks.Ok()

    runner = Runner(engine, _Transport(answer), store=store, grace_s=5.0)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        await started.wait()
        runner.stop()
        await asyncio.sleep(0.01)
        release.set()
        await task

    asyncio.run(main())
    assert engine.state("a") is SessionState.SYNCED


def test_runner_cancellation_closes_the_store_and_propagates() -> None:
    """Cancelling run() cancels the sends, closes the store and re-raises CancelledError."""
    store = MemoryStore()
    engine = Engine(Policy(), store=store, log=False)
    engine.enqueue("a", now=0.0)
    transport = _Transport(lambda batch: _forever())
    runner = Runner(engine, transport, store=store, grace_s=5.0)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        while not transport.sent:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert transport.cancelled == [1]
    with pytest.raises(StoreError, match="closed"):
        store.sessions_by_state()


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="Unix signals")
def test_runner_stops_cleanly_on_sigterm() -> None:
    """SIGTERM while running stops the loop and closes the store; nothing is lost."""
    store = MemoryStore()
    engine = Engine(Policy(), store=store, log=False)
    _enqueue(engine, 3)
    transport = _Transport()
    runner = Runner(engine, transport, store=store, grace_s=1.0)

    async def main() -> None:
        task = asyncio.create_task(runner.run(handle_signals=True))
        while not transport.sent:  # the first send comes after the handlers are in
            await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, timeout=5.0)

    asyncio.run(main())
    assert engine.sessions_by_state()[SessionState.SYNCED] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_runner_refuses_a_second_concurrent_run(engine: Engine) -> None:
    """One runner runs one loop at a time."""
    runner = Runner(engine, _Transport())

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        await asyncio.sleep(0)
        with pytest.raises(UsageError, match="already running"):
            await runner.run()
        runner.stop()
        await task

    asyncio.run(main())


def test_runner_enqueue_reads_its_own_clock(engine: Engine) -> None:
    """Runner.enqueue stamps the runner's clock time on the engine; the engine reads none."""
    clock = FakeClock(1_000.0)
    runner = Runner(engine, _Transport(), clock=clock)
    runner.enqueue("a")
    assert engine.now == 1_000.0


def test_runner_refuses_a_transport_without_send(engine: Engine) -> None:
    """A Transport needs an async send(batch)."""
    with pytest.raises(UsageError, match="send"):
        Runner(engine, ScriptedRelay())  # type: ignore[arg-type]


def test_runner_times_out_with_max_seconds(engine: Engine) -> None:
    """run(until_idle=True, max_seconds=...) gives up with TimeoutError on a dead relay."""
    engine.enqueue("a", now=0.0)
    clock = FakeClock()
    runner = _runner(engine, _Transport(lambda b: acks.RelayUnavailable()), clock)
    with pytest.raises(TimeoutError):
        asyncio.run(runner.run(until_idle=True, max_seconds=300.0))
    assert engine.session("a").charges == {}


def test_runner_with_sqlite_loses_nothing_across_a_stop(tmp_path: Path) -> None:
    """After a stop mid-send, a new process on the same SQLite file resends and syncs all."""
    store = SqliteStore(tmp_path / "s.db")
    engine = Engine(Policy(), store=store, log=False)
    ids = _enqueue(engine, 12)
    transport = _Transport(lambda batch: _forever() if batch.id == 1 else acks.Ok())
    runner = Runner(engine, transport, store=store, grace_s=0.0)

    async def main() -> None:
        task = asyncio.create_task(runner.run())
        while not transport.sent:
            await asyncio.sleep(0)
        runner.stop()
        await task

    asyncio.run(main())
    reopened = SqliteStore(tmp_path / "s.db")
    revived = Engine(Policy(), store=reopened, log=False)
    assert sorted(v.id for v in revived.sessions()) == ids
    run_until_idle(revived, ScriptedRelay())
    reopened.close()
    with SqliteStore(tmp_path / "s.db", readonly=True) as check:
        assert check.sessions_by_state()[SessionState.SYNCED] == 12


# ------------------------------------------------------------ one loop in simulated time


class _SlowRelay:
    """Answers every batch Ok, ``delay`` seconds later, as a Reply."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def answer(self, batch: Batch, now: float) -> Reply:
        return Reply(acks.Ok(), delay_s=self.delay)


def test_engine_harness_takes_replies_with_their_own_delay(policy: Policy) -> None:
    """EngineHarness delivers a Reply after its own delay, not the default latency."""
    engine = Engine(policy, rng=random.Random(0), log=False)
    harness = EngineHarness(engine, _SlowRelay(3.0))
    harness.enqueue(["s1"])
    harness.step(dt=2.0)  # sent at 0; the answer is due at 3
    assert engine.state("s1") is SessionState.IN_FLIGHT
    harness.step(dt=2.0)  # it lands at 3, within this step
    assert engine.state("s1") is SessionState.SYNCED
    assert [c.event for c in harness.changes] == ["acked"]
    assert harness.changes[0].at == 3.0


def test_harness_and_run_until_idle_share_one_loop(policy: Policy) -> None:
    """The harness and run_until_idle tick on the same rule: same end time, same sends."""

    def scripted() -> ScriptedRelay:
        relay = ScriptedRelay()
        relay.always("s03", acks.RateLimited())
        relay.script("s05", acks.AckTimeout())
        return relay

    ends = []
    sends = []
    for via_harness in (True, False):
        engine = Engine(policy, rng=random.Random(3), log=False)
        relay = scripted()
        for i in range(12):
            engine.enqueue(f"s{i:02d}", now=0.0)
        if via_harness:
            ends.append(EngineHarness(engine, relay).run_until_idle())
        else:
            ends.append(run_until_idle(engine, relay))
        sends.append([(s.at, s.batch.session_ids) for s in relay.sent])
    assert ends[0] == ends[1]
    assert sends[0] == sends[1]


def test_runner_module_never_imports_testing() -> None:
    """The core loop does not depend on the testing helpers (they depend on it)."""
    source = Path(sessionfsm.runner.__file__).read_text()
    assert "testing" not in [
        line.split()[1].lstrip(".").split(".")[-1]
        for line in source.splitlines()
        if line.startswith(("from ", "import "))
    ]


# ------------------------------------------------------- the runner under faults


def _error_class(module: str, name: str, *bases: type) -> type[Exception]:
    """An exception class that looks like a client library's, without importing it."""
    cls = type(name, bases or (Exception,), {})
    cls.__module__ = module
    return cls


@pytest.mark.parametrize(
    ("module", "name", "bases", "expected"),
    [
        ("httpx._exceptions", "ConnectError", (), True),
        ("httpx._exceptions", "ConnectTimeout", (), True),
        ("httpx._exceptions", "ReadTimeout", (), False),
        ("aiohttp.client_exceptions", "ClientConnectionError", (), True),
        ("websockets.exceptions", "ConnectionClosed", (), True),
        ("mylib", "ConnectError", (), False),
        ("mylib", "Refused", (ConnectionRefusedError,), True),
        ("mylib", "Broken", (OSError,), False),
    ],
)
def test_means_unavailable_recognises_not_connected_by_name_and_ancestry(
    module: str, name: str, bases: tuple[type, ...], expected: bool
) -> None:
    """Library errors meaning "not connected" are recognised without importing the library."""
    assert means_unavailable(_error_class(module, name, *bases)("x")) is expected


def test_a_subclass_of_a_recognised_library_error_also_counts() -> None:
    """aiohttp's ClientConnectorError derives from ClientConnectionError: it counts too."""
    base = _error_class("aiohttp.client_exceptions", "ClientConnectionError")
    derived = _error_class("aiohttp.client_exceptions", "ClientConnectorError", base, OSError)
    assert means_unavailable(derived("refused"))


def test_a_library_connection_error_is_never_charged(small_policy: Policy) -> None:
    """A transport leaking an httpx-style ConnectError gets RelayUnavailable: nobody is charged."""

    async def main() -> None:
        connect_error = _error_class("httpx._exceptions", "ConnectError")
        engine = Engine(small_policy, rng=random.Random(0), log=False)
        engine.enqueue("s1", now=0.0)
        clock = FakeClock()
        calls = 0

        def answer(batch: Batch) -> AckResult:
            nonlocal calls
            calls += 1
            if calls <= 3:
                raise connect_error("connection refused")
            return acks.Ok()

        runner = _runner(engine, _Transport(answer), clock)
        await runner.run(until_idle=True, max_seconds=3_600)
        assert engine.state("s1") is SessionState.SYNCED
        assert calls == 4
        assert runner.stats["failed"] == 0

    asyncio.run(main())


def test_a_custom_unavailable_hook_decides(small_policy: Policy) -> None:
    """Runner(unavailable=...) maps a transport's own error to RelayUnavailable."""

    async def main() -> None:

        class Offline(Exception):
            pass

        engine = Engine(small_policy, rng=random.Random(0), log=False)
        engine.enqueue("s1", now=0.0)
        clock = FakeClock()
        seen: list[str] = []

        def answer(batch: Batch) -> AckResult:
            if not seen:
                seen.append("offline")
                raise Offline
            return acks.Ok()

        runner = _runner(
            engine, _Transport(answer), clock, unavailable=lambda exc: isinstance(exc, Offline)
        )
        await runner.run(until_idle=True, max_seconds=3_600)
        assert engine.state("s1") is SessionState.SYNCED
        assert engine.session("s1").charges == {}

    asyncio.run(main())


def test_a_failed_save_while_applying_an_answer_stops_run_with_that_error(
    small_policy: Policy, db_path: Path
) -> None:
    """StoreError in a send task ends run() with it, leaves no unretrieved task error,
    closes the store, and the file charges nobody."""

    async def main() -> None:
        store = FailingStore(SqliteStore(db_path, timeout=0))
        engine = Engine(small_policy, store=store, rng=random.Random(0), log=False)
        _enqueue(engine, 3)
        clock = FakeClock()
        unhandled: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unhandled.append(ctx))

        async def answer(batch: Batch) -> AckResult:
            store.fail_next("locked")  # the save of this answer fails
            return acks.Ok()

        runner = _runner(engine, _Transport(answer), clock, store=store)
        with pytest.raises(StoreError, match="locked"):
            await runner.run(until_idle=True, max_seconds=3_600)
        import gc

        gc.collect()
        await asyncio.sleep(0)
        assert unhandled == []
        with pytest.raises(StoreError, match="closed"):
            store.inner.load()
        with SqliteStore(db_path) as reopened:
            recovered = Engine(small_policy, store=reopened, log=False)
            assert all(not view.charges for view in recovered.sessions())
            assert recovered.sessions_by_state()[SessionState.QUEUED] == 3

    asyncio.run(main())


def test_enqueue_while_the_runner_shuts_down_is_saved_or_refused_in_the_callers_task(
    small_policy: Policy, db_path: Path
) -> None:
    """A change feed enqueuing across a stop gets its sessions saved, then a UsageError
    in its own task once the store is closed; run() itself ends cleanly."""

    async def main() -> None:
        store = SqliteStore(db_path)
        engine = Engine(small_policy, store=store, rng=random.Random(0), log=False)
        clock = FakeClock()
        runner = _runner(engine, _Transport(), clock, store=store)
        accepted: list[str] = []

        async def feed() -> None:
            for i in range(10_000):
                runner.enqueue(f"feed{i}")
                accepted.append(f"feed{i}")
                await asyncio.sleep(0)

        async def stop_soon() -> None:
            for _ in range(20):
                await asyncio.sleep(0)
            runner.stop()

        feeder = asyncio.create_task(feed())
        stopper = asyncio.create_task(stop_soon())
        await runner.run()
        await stopper
        with pytest.raises(UsageError, match="stopped and closed its store"):
            await feeder
        assert accepted
        with SqliteStore(db_path) as reopened:
            assert len(Engine(small_policy, store=reopened, log=False)) == len(accepted)

    asyncio.run(main())


def test_runner_takes_the_store_from_the_engine(tmp_path: Path) -> None:
    """The store is given once, to the engine; the runner uses it and closes it on stop."""
    store = SqliteStore(tmp_path / "s.db")
    engine = Engine(Policy(), store=store, log=False)
    engine.enqueue("a", now=0.0)
    runner = Runner(engine, _Transport(), grace_s=0.0)
    assert runner.store is store
    asyncio.run(runner.run(until_idle=True))
    assert store.closed
    with SqliteStore(tmp_path / "s.db", readonly=True) as reader:
        assert reader.session("a").state is SessionState.SYNCED


def test_runner_refuses_a_store_the_engine_was_not_given() -> None:
    """Runner(Engine(policy), t, store=s) would persist nothing: refused, saying what to do."""
    with pytest.raises(UsageError, match=r"not to the Engine.*Engine\(policy, store=store\)"):
        Runner(Engine(Policy(), log=False), _Transport(), store=MemoryStore())


def test_runner_refuses_a_store_other_than_the_engines() -> None:
    """Two different stores for one engine and its runner are refused."""
    engine = Engine(Policy(), store=MemoryStore(), log=False)
    with pytest.raises(UsageError, match="is not the engine's store"):
        Runner(engine, _Transport(), store=MemoryStore())
    engine.close()


def test_runner_follows_an_engine_built_with_log_false(logs: list[dict[str, Any]]) -> None:
    """Engine(log=False) silences the runner as well, even with structlog configured."""
    engine = Engine(Policy(), log=False)
    engine.enqueue("a", now=0.0)
    asyncio.run(_runner(engine, _Transport(), FakeClock()).run(until_idle=True))
    assert engine.state("a") is SessionState.SYNCED
    assert logs == []


def test_runner_logs_when_the_engine_does(logs: list[dict[str, Any]]) -> None:
    """A logging engine's runner logs its start and stop."""
    engine = Engine(Policy())
    engine.enqueue("a", now=0.0)
    asyncio.run(_runner(engine, _Transport(), FakeClock()).run(until_idle=True))
    events = [e["event"] for e in logs]
    assert "sessionfsm.runner_started" in events
    assert "sessionfsm.runner_stopped" in events


def test_run_until_idle_leaves_the_engine_open(tmp_path: Path) -> None:
    """run_until_idle with a Transport returns with the engine and its store still usable."""
    with Engine(Policy(), store=SqliteStore(tmp_path / "s.db"), log=False) as engine:
        engine.enqueue("a", now=0.0)
        run_until_idle(engine, _Transport())
        engine.enqueue("b")  # saved: the store is still open
        assert engine.state("b") is SessionState.QUEUED


def test_runner_max_seconds_gives_up_on_time_and_says_what_is_in_flight(
    logs: list[dict[str, Any]],
) -> None:
    """run(max_seconds=3) stops at 3 s, not at the next 5 s tick, and its stop log adds up."""

    class Failing:
        async def send(self, batch: Batch) -> AckResult:
            raise RuntimeError("the relay client crashed")

    engine = Engine(Policy())
    engine.enqueue("a", now=0.0)
    clock = FakeClock()
    with pytest.raises(TimeoutError, match="not idle after 3 s"):
        asyncio.run(_runner(engine, Failing(), clock).run(until_idle=True, max_seconds=3))
    assert clock.now == 3.0
    (stopped,) = [e for e in logs if e["event"] == "sessionfsm.runner_stopped"]
    assert stopped["counts"] == {"in_flight": 1}
    assert stopped["sessions_in_flight"] == 1  # the one the next start resends
    assert stopped["sessions_cut_off"] == 0  # its send had already failed
