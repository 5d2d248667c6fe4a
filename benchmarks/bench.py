"""``sessionfsm bench``: every performance comparison, side by side, in one run.

This module is not part of the installed package: it lives in ``benchmarks/``
of a source checkout, and ``sessionfsm bench`` finds it there.

Absolute times drift on a shared machine, so every headline figure is a ratio
against a baseline measured in the same process, in the same run, with the
rounds interleaved (baseline, engine, baseline, engine, ...) so that a noisy
neighbour slows both sides of a ratio alike. Each figure is the median of
``repeat`` rounds; the spread printed next to it is the lowest and highest
round. Logging is off (``Engine(log=False)``) and the garbage collector is
left on, as in a service. Session ids are UUID-like 36-character strings.

What is measured
================

1. **Per-ack cost.** N sessions are enqueued, then ticked and acked until
   every one is at rest (synced or dead-lettered). The relay's answers come
   from a fixed script, :data:`ACK_MIX` (65 % ``Ok``, the rest
   ``RateLimited``, ``AckTimeout``, ``PayloadTooLarge`` and
   ``RelayUnavailable``), one per session answered, in the order sessions are
   answered. *An ack is one session answered*: one entry of a per-session
   answer map. The figure is the wall time of the whole run (enqueues, ticks,
   ``on_ack`` calls and the shared driver loop that builds the answer maps)
   divided by the number of acks, so a tick's work is charged to the acks it
   leads to. The policy is the default (batches of 10, one in flight) with no
   pause between batches, and the clock advances 1 s per tick.

   Three implementations run the identical script:

   * ``compiled``: ``Engine(runtime="compiled")``, the default;
   * ``reference``: ``Engine(runtime="reference")``, one python-statemachine
     instance per session (at a smaller N: an instance costs kilobytes);
   * ``floor``: :class:`Floor`, the least code that runs the same cycle:
     slotted records, a ``dict`` transition table keyed by
     ``(state, event)``, a ``deque`` of ready ids, a heap of retry times, a
     heap of batch deadlines, the link pause, per-reason counters and
     thresholds. It does nothing else: no input validation beyond a dict
     lookup, no history of changes, no logging hooks, no second lane. Its
     records are msgspec Structs without GC tracking, like the engine's: a
     plain ``__slots__`` class is a little faster to write to, but the
     collector walks it, and at a million sessions that made the floor's
     enqueue slower than the engine's, which is no floor.

   Why the floor is fair: it is checked, once per run, to end with exactly the
   engine's outcome for every session (state, attempts, per-reason counts,
   dead-letter reason) after answering exactly as many acks, so it does the
   same work in the same order; it only leaves out what this workload never
   exercises and what the engine offers on top (validation, the list of
   ``Change`` records ``on_ack`` returns, lanes, throttles, anomalies).
   The shared driver loop costs about 0.13 µs per ack on the README's
   machine; it is in both figures, which makes compiled / floor roughly 5 to
   10 % lower than it would be for the bare implementations.

2. **Tick cost versus queue size.** An engine holds n sessions, the first
   half backed off (rate limited, retry far in the future), the second half
   queued. Each timed ``tick`` forms one batch of 10; between ticks, untimed,
   the batch is acked ``Ok`` and its sessions enqueued again, so the queue
   keeps its size. The baseline, :class:`ScanQueue`, picks candidates as the
   motivating service did: walk the whole queue in order, skip sessions in
   flight or whose retry time has not come, take the first 10. The backed-off
   half is at the front of the queue because it was sent first, which is how
   a FIFO queue gets that way. Reported: median µs per tick, and the growth
   tick(largest n) / tick(smallest n).

3. **Memory per session**, with :mod:`tracemalloc`: bytes the engine allocates
   while n sessions are added and driven, divided by n (the engine's fixed
   cost is excluded). Ids are made before tracing starts; the engine keeps a
   reference to each id, never a copy, so they are reported separately
   (``sys.getsizeof`` of one id). Two populations: *enqueued* (everything
   queued, the start of a backfill) and *one attempt* (every session sent
   once; half rate-limited into backoff, half synced), the second against the
   reference runtime, whose instances only exist once a session has fired an
   event.

4. **Store cost**, through ``SqliteStore`` (see :func:`store_cost`), each
   against a raw ``sqlite3`` baseline in the same round: persisted
   transitions/s against :func:`raw_write` (the same rows in the same
   transactions, target: within 2x), and recovering the store's sessions
   against :func:`raw_read` (the same file read into plain tuples, target:
   within 3x). The absolute figures are printed for information only.

5. **Start-up**: enqueue N sessions into a new engine, against the floor's
   enqueue (a record, a dict insert and a deque append); and on a new SQLite
   file, N sessions with one ``enqueue_many`` (one transaction) against
   ``enqueue`` one call (one transaction) each, for at most 10k of them.

6. **Listener cost**: the per-ack workload of :mod:`benchmarks.bench_listeners`
   (its own module, runnable alone) through an engine with no listener, one
   with a listener that does nothing, one with the Prometheus metrics and one
   with the OpenTelemetry metrics attached, interleaved round by round. The
   target is the median of the per-round ratios Prometheus / none; it has
   its own number of rounds (``listener_rounds``), because single rounds of
   it spread widely on a shared machine.

7. **PostgreSQL and the fleet** (full runs only; needs ``sessionfsm[postgres]``
   and a server: ``$SESSIONFSM_TEST_DSN`` or a throwaway pgserver), from
   :mod:`benchmarks.bench_postgres`: persisted transitions/s of one fleet
   worker at the default batch, beside the same worker writing every turn and
   one engine on SQLite, interleaved round by round; 1, 2 and 4 worker
   processes over HTTP; takeover after a SIGKILL against lease + 2 ticks; and
   enqueue-to-pickup latency. The one-worker target (25k/s) is absolute: it is
   the fleet issue's, and it depends on the server and its disk, so the
   latency of one bare commit is printed beside it.
"""

from __future__ import annotations

import cProfile
import gc
import heapq
import io
import os
import platform
import pstats
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol

import click
import msgspec

from benchmarks.bench_listeners import ListenerCost, listener_cost
from sessionfsm import acks
from sessionfsm.engine import Engine
from sessionfsm.machine import CHARGED_REASONS, Lane, LinkRecord, SessionRecord, SessionState
from sessionfsm.policy import Fixed, Policy, ReasonPolicy
from sessionfsm.store import Change, Delta, Snapshot, Store

__all__ = [
    "ACK_MIX",
    "Floor",
    "Report",
    "ScanQueue",
    "Sizes",
    "Target",
    "ack_cost",
    "command",
    "evaluate",
    "memory",
    "missed",
    "run",
    "session_ids",
    "startup",
    "store_cost",
    "tick_cost",
]

# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class Stat(msgspec.Struct, frozen=True):
    """The median of repeated rounds, with the lowest and highest round."""

    median: float
    low: float
    high: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        values = list(samples)
        if not values:
            raise ValueError("a statistic needs at least one sample")
        return cls(statistics.median(values), min(values), max(values), values)


class Machine(msgspec.Struct, frozen=True):
    """Where the numbers were measured."""

    nproc: int
    cpu: str
    python: str
    platform: str
    #: 1-minute load average at the start and at the end of the run.
    load_before: float
    load_after: float


class AckRow(msgspec.Struct, frozen=True):
    impl: str
    sessions: int
    acks: int
    us_per_ack: Stat


class AckCost(msgspec.Struct, frozen=True):
    rows: list[AckRow]
    #: reference / compiled, at the reference's size.
    reference_over_compiled: Stat
    #: compiled / floor, at the large size.
    compiled_over_floor: Stat
    #: compiled / floor, at the reference's size.
    compiled_over_floor_small: Stat


class TickRow(msgspec.Struct, frozen=True):
    sessions: int
    engine_us: Stat
    scan_us: Stat


class TickCost(msgspec.Struct, frozen=True):
    rows: list[TickRow]
    #: tick(largest) / tick(smallest) for the engine and for the scan.
    engine_growth: Stat
    scan_growth: Stat


class MemoryRow(msgspec.Struct, frozen=True):
    runtime: str
    population: str
    sessions: int
    #: What the engine allocates per session, ids excluded.
    bytes_per_session: float
    #: What one id string costs (``sys.getsizeof``), held by reference.
    id_bytes: int


class StoreCost(msgspec.Struct, frozen=True):
    available: bool
    note: str
    #: Deltas replayed, and the transitions (history rows) they carry.
    deltas: int = 0
    transitions: int = 0
    transitions_per_s: Stat | None = None
    #: The engine driving the per-ack workload with the store attached.
    engine_transitions_per_s: Stat | None = None
    recovery_sessions: int = 0
    recovery_s: Stat | None = None
    #: The baseline: raw ``sqlite3`` writing the same rows in the same
    #: transactions, and SqliteStore's time over it, per round.
    raw_transitions_per_s: Stat | None = None
    save_over_raw: Stat | None = None
    #: The baseline: a raw read of the same file into plain tuples, and the
    #: engine's recovery time over it, per round.
    raw_read_s: Stat | None = None
    recovery_over_raw: Stat | None = None


class Startup(msgspec.Struct, frozen=True):
    sessions: int
    engine_s: Stat
    floor_s: Stat
    engine_over_floor: Stat
    #: ``enqueue_many`` of all ``sessions`` into an engine on a new SQLite file.
    sqlite_many_s: Stat | None = None
    #: ``enqueue`` one call (one transaction) each, for ``sqlite_each_sessions``.
    sqlite_each_sessions: int = 0
    sqlite_each_s: Stat | None = None


class Target(msgspec.Struct, frozen=True):
    """One performance target, as measured in this run: always a ratio
    against a baseline of the same run, except memory (bytes, which do not
    depend on the machine's speed)."""

    key: str
    description: str
    limit: float
    #: "<=" or ">=": how ``value`` must compare with ``limit``.
    op: str
    value: float | None
    #: None when this run did not measure it.
    ok: bool | None


class Sizes(msgspec.Struct, frozen=True):
    """How big each measurement is; see :data:`FULL` and :data:`QUICK`."""

    repeat: int
    ack_sessions: int
    ack_reference_sessions: int
    tick_sessions: tuple[int, ...]
    ticks_per_round: int
    memory_sessions: tuple[int, ...]
    memory_reference_sessions: int
    store_deltas_sessions: int
    store_recovery_sessions: int
    startup_sessions: int
    listener_sessions: int
    listener_rounds: int
    #: Section 7, PostgreSQL (0: not run, as with --quick).
    postgres_sessions: int = 0
    postgres_fleet_sessions: int = 0


FULL: Final = Sizes(
    repeat=5,
    ack_sessions=100_000,
    ack_reference_sessions=3_000,
    tick_sessions=(1_000, 10_000, 100_000, 1_000_000),
    ticks_per_round=20,
    memory_sessions=(100_000, 1_000_000),
    memory_reference_sessions=3_000,
    store_deltas_sessions=20_000,
    store_recovery_sessions=1_000_000,
    startup_sessions=1_000_000,
    listener_sessions=20_000,
    listener_rounds=21,
    postgres_sessions=20_000,
    postgres_fleet_sessions=20_000,
)
QUICK: Final = Sizes(
    repeat=3,
    ack_sessions=5_000,
    ack_reference_sessions=300,
    tick_sessions=(1_000, 10_000, 50_000),
    ticks_per_round=10,
    memory_sessions=(10_000,),
    memory_reference_sessions=300,
    store_deltas_sessions=2_000,
    store_recovery_sessions=10_000,
    startup_sessions=50_000,
    listener_sessions=2_000,
    listener_rounds=3,
)


#: What ``--quick`` prints first: its sizes are too small for the targets.
QUICK_NOTE: Final = (
    "--quick is a smoke test: it checks that every measurement runs, at sizes too "
    "small for the targets; run `sessionfsm bench` without --quick for real figures"
)


class PostgresCost(msgspec.Struct, frozen=True):
    """Section 7 of ``sessionfsm bench``: PostgreSQL and the fleet (full runs only)."""

    available: bool
    note: str = ""
    cores: int = 0
    server_version: str = ""
    commit_latency_ms: float | None = None
    #: One worker, persisted transitions/s (median) and every round's figure.
    worker: dict[str, Any] = {}
    #: Aggregate transitions/s of 1, 2 and 4 worker processes over HTTP.
    fleet: list[dict[str, Any]] = []
    takeover: dict[str, Any] = {}
    pickup: dict[str, Any] = {}

    @property
    def takeover_over_bound(self) -> float | None:
        """Takeover time / (lease + 2 ticks): the issue's bound is 1."""
        t = self.takeover
        if not t:
            return None
        return float(t["seconds"]) / (float(t["lease_s"]) + 2 * float(t["tick_s"]))


class Report(msgspec.Struct, frozen=True):
    mode: str
    sizes: Sizes
    machine: Machine
    ack: AckCost
    tick: TickCost
    memory: list[MemoryRow]
    store: StoreCost
    startup: Startup
    listeners: ListenerCost
    targets: list[Target]
    elapsed_s: float
    #: Section 7, full runs only (None with --quick).
    postgres: PostgresCost | None = None


class BenchError(RuntimeError):
    """The benchmark's implementations disagreed; its figures would mean nothing."""


# ---------------------------------------------------------------------------
# Inputs shared by every implementation
# ---------------------------------------------------------------------------

_OK: Final = acks.Ok()
_RATE: Final = acks.RateLimited()
_RATE_5S: Final = acks.RateLimited(retry_after_s=5.0)
_TIMEOUT: Final = acks.AckTimeout()
_TOO_LARGE: Final = acks.PayloadTooLarge()
_DOWN: Final = acks.RelayUnavailable()

#: The relay's answers, one per session answered, cycled. 13 Ok, 3
#: RateLimited (one with retry_after_s), 2 AckTimeout, 1 PayloadTooLarge and
#: 1 RelayUnavailable in 20: enough failures to exercise every charged path
#: and the link pause, while most sessions still sync.
ACK_MIX: Final[tuple[acks.Ack, ...]] = (
    *(_OK, _OK, _RATE, _OK, _OK),
    *(_TIMEOUT, _OK, _OK, _OK, _RATE_5S),
    *(_OK, _OK, _DOWN, _OK, _OK),
    *(_RATE, _OK, _TOO_LARGE, _OK, _TIMEOUT),
)

#: The per-ack workload's policy: the defaults, with no pause between batches
#: so that every tick can send.
# ``max_relay_refusal_s=0``: every refusal answered per session is charged,
# as the floor (which knows nothing of blame) charges it; the engine still
# sorts every answer for blame, so that cost is in the figure.
ACK_POLICY: Final = Policy(incremental_interval_s=0.0, max_relay_refusal_s=0.0)
#: Sessions rate-limited while setting up a population stay backed off for
#: the whole measurement: a day.
FAR: Final = 86_400.0
_FAR_BACKOFF: Final = ReasonPolicy(threshold=5, backoff=Fixed(FAR), honour_retry_after=True)
#: The tick benchmark's policy: default batches of 10, one in flight.
TICK_POLICY: Final = Policy(
    incremental_interval_s=0.0,
    rate_limited=_FAR_BACKOFF,
    max_backoff_s=FAR,
    max_relay_refusal_s=0.0,
)
#: Large batches only make building a memory population faster; what stays
#: allocated per session does not depend on the batch size.
MEMORY_POLICY: Final = Policy(
    incremental_interval_s=0.0,
    batch_size=1000,
    rate_limited=_FAR_BACKOFF,
    max_backoff_s=FAR,
    max_relay_refusal_s=0.0,
)


def session_ids(n: int, seed: int = 7) -> list[str]:
    """``n`` distinct UUID-like ids (36 characters), the same for the same seed."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        h = f"{rng.getrandbits(128):032x}"
        out.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}")
    return out


# ---------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------

_QUEUED: Final = "queued"
_IN_FLIGHT: Final = "in_flight"
_BACKOFF: Final = "backoff"
_SYNCED: Final = "synced"
_DEAD: Final = "dead_lettered"

#: (state, event) -> target. Guards are evaluated by the caller, which picks
#: the event name (``acked`` or ``acked_stale``, ``deferred`` or ``exhausted``).
FLOOR_TABLE: Final[dict[tuple[str, str], str]] = {
    (_QUEUED, "sent"): _IN_FLIGHT,
    (_IN_FLIGHT, "acked"): _SYNCED,
    (_IN_FLIGHT, "acked_stale"): _QUEUED,
    (_IN_FLIGHT, "deferred"): _BACKOFF,
    (_IN_FLIGHT, "exhausted"): _DEAD,
    (_IN_FLIGHT, "bounced"): _QUEUED,
    (_BACKOFF, "elapsed"): _QUEUED,
}
#: Ack type -> index into the counters; -1 is Ok, -2 RelayUnavailable.
_FLOOR_KIND: Final[dict[type[acks.Ack], int]] = {
    acks.Ok: -1,
    acks.RelayUnavailable: -2,
    **{getattr(acks, name): i for i, name in enumerate(CHARGED_REASONS)},
}
_ZERO: Final = (0, 0, 0)


class _FloorSession(msgspec.Struct, gc=False):
    # A Struct without GC tracking, like the engine's record: a plain slotted
    # class is tracked by the collector, whose passes over a million of them
    # make enqueueing slower than the engine's.
    id: str
    state: str = _QUEUED
    counts: tuple[int, ...] = _ZERO
    retry_at: float | None = None
    dirty: bool = False
    attempts: int = 0
    dead_letter_reason: str | None = None


class _FloorBatch:
    __slots__ = ("id", "session_ids")

    def __init__(self, batch_id: int, session_ids: tuple[str, ...]) -> None:
        self.id = batch_id
        self.session_ids = session_ids


class Floor:
    """The least code that runs the benchmark's cycle; see the module docstring.

    One lane, one batch in flight, no pause between batches, fixed backoffs:
    exactly what :data:`ACK_POLICY` asks for, and nothing more.
    """

    def __init__(self, policy: Policy = ACK_POLICY) -> None:
        if policy.max_in_flight != 1 or policy.incremental_interval_s != 0:
            raise ValueError("the floor runs one batch at a time with no pause between")
        reasons = [policy.reason(name) for name in CHARGED_REASONS]
        delays: list[float] = []
        for rp in reasons:
            if not isinstance(rp.backoff, Fixed):
                raise ValueError("the floor only runs fixed backoffs")
            delays.append(rp.backoff.delay_s)
        self._size = policy.batch_size
        self._timeout = policy.ack_timeout_s
        self._thresholds = tuple(rp.threshold if rp.retryable else 1 for rp in reasons)
        self._delays = tuple(delays)
        self._honour = tuple(rp.honour_retry_after for rp in reasons)
        self._caps = tuple(rp.retry_after_cap_s for rp in reasons)
        self._max_backoff = policy.max_backoff_s
        self._pause = policy.relay_pause
        self._rng = random.Random(0)
        self.sessions: dict[str, _FloorSession] = {}
        self._ready: deque[str] = deque()
        self._retry: list[tuple[float, str]] = []
        self._open: dict[int, dict[str, None]] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._next_batch = 1
        self._resting = 0
        self._failures = 0
        self._resume_at: float | None = None

    def enqueue(self, session_id: str) -> None:
        self.sessions[session_id] = _FloorSession(session_id)
        self._ready.append(session_id)

    def idle(self) -> bool:
        return self._resting == len(self.sessions)

    def tick(self, now: float) -> list[_FloorBatch]:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, batch_id = heapq.heappop(deadlines)
            if batch_id in self._open:
                raise BenchError("the floor's workload answers every batch before its deadline")
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
        table = FLOOR_TABLE
        sessions = self.sessions
        ready = self._ready
        retry = self._retry
        while retry and retry[0][0] <= now:
            _, sid = heapq.heappop(retry)
            rec = sessions[sid]
            rec.state = table[rec.state, "elapsed"]
            rec.retry_at = None
            ready.append(sid)
        if self._resume_at is not None or self._open or not ready:
            return []
        ids: list[str] = []
        size = self._size
        while ready and len(ids) < size:
            rec = sessions[ready[0]]
            if rec.counts != _ZERO:
                # As the engine does: a session charged before goes alone.
                if ids:
                    break
                size = 1
            sid = ready.popleft()
            rec.state = table[rec.state, "sent"]
            rec.dirty = False
            rec.attempts += 1
            ids.append(sid)
        batch_id = self._next_batch
        self._next_batch += 1
        self._open[batch_id] = dict.fromkeys(ids)
        heapq.heappush(deadlines, (now + self._timeout, batch_id))
        return [_FloorBatch(batch_id, tuple(ids))]

    def on_ack(self, batch_id: int, answer: Mapping[str, acks.Ack], now: float) -> None:
        pending = self._open[batch_id]
        table = FLOOR_TABLE
        kinds = _FLOOR_KIND
        sessions = self.sessions
        front: list[str] = []
        answered = unavailable = False
        for sid, ack in answer.items():
            del pending[sid]
            rec = sessions[sid]
            kind = kinds[type(ack)]
            if kind == -1:
                answered = True
                rec.state = state = table[rec.state, "acked_stale" if rec.dirty else "acked"]
                rec.counts = _ZERO
                rec.retry_at = None
                rec.attempts = 0
                if state == _QUEUED:
                    front.append(sid)
                else:
                    self._resting += 1
            elif kind == -2:
                unavailable = True
                rec.state = table[rec.state, "bounced"]
                front.append(sid)
            else:
                answered = True
                counts = rec.counts
                n = counts[kind] + 1
                if n >= self._thresholds[kind]:
                    rec.state = table[rec.state, "exhausted"]
                    rec.counts = _ZERO
                    rec.retry_at = None
                    rec.dirty = False
                    rec.dead_letter_reason = CHARGED_REASONS[kind]
                    self._resting += 1
                else:
                    rec.state = table[rec.state, "deferred"]
                    rec.counts = (*counts[:kind], n, *counts[kind + 1 :])
                    after = getattr(ack, "retry_after_s", None)
                    if after is not None and self._honour[kind]:
                        delay = min(after, self._caps[kind])
                    else:
                        delay = self._delays[kind]
                    rec.retry_at = at = now + min(delay, self._max_backoff)
                    heapq.heappush(self._retry, (at, sid))
        ready = self._ready
        for sid in reversed(front):
            ready.appendleft(sid)
        if answered:
            self._failures = 0
            self._resume_at = None
        if unavailable:
            self._failures += 1
            self._resume_at = now + self._pause.delay(self._failures, self._rng)
        if not pending:
            del self._open[batch_id]


# ---------------------------------------------------------------------------
# 1. Per-ack cost
# ---------------------------------------------------------------------------


class _BatchLike(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def session_ids(self) -> tuple[str, ...]: ...


class _Driven(Protocol):
    def enqueue(self, session_id: str) -> None: ...

    def tick(self, now: float) -> Sequence[_BatchLike]: ...

    def on_ack(self, batch_id: int, ack: Mapping[str, acks.Ack], now: float) -> object: ...

    def idle(self) -> bool: ...


def drive(impl: _Driven, ids: Sequence[str]) -> int:
    """Enqueue ``ids``, then tick and answer from :data:`ACK_MIX` until all rest.

    Returns how many acks (sessions answered) it took. The same loop drives
    every implementation, so its own cost is in every figure alike.
    """
    mix = ACK_MIX
    size = len(mix)
    k = 0
    now = 0.0
    enqueue, tick, on_ack, idle = impl.enqueue, impl.tick, impl.on_ack, impl.idle
    for sid in ids:
        enqueue(sid)
    limit = 1000.0 * (len(ids) + 10)
    while not idle():
        for batch in tick(now):
            answer: dict[str, acks.Ack] = {}
            for sid in batch.session_ids:
                answer[sid] = mix[k % size]
                k += 1
            on_ack(batch.id, answer, now)
        now += 1.0
        if now > limit:
            raise BenchError(f"{type(impl).__name__} never came to rest")
    return k


def _engine(runtime: str, policy: Policy = ACK_POLICY) -> Engine:
    return Engine(policy, rng=random.Random(0), log=False, runtime=runtime)


Outcome = dict[str, tuple[str, int, tuple[int, ...], str | None]]


def outcome(impl: Engine | Floor) -> Outcome:
    """Every session's (state, attempts, counts, dead-letter reason), to compare runs."""
    if isinstance(impl, Floor):
        return {
            sid: (str(r.state), r.attempts, r.counts, r.dead_letter_reason)
            for sid, r in impl.sessions.items()
        }
    return {
        v.id: (
            v.state.value,
            v.attempts,
            tuple(v.charges.get(name, 0) for name in CHARGED_REASONS),
            v.dead_letter_reason,
        )
        for v in impl.sessions()
    }


def _timed_drive(make: Callable[[], Engine | Floor], ids: Sequence[str]) -> tuple[float, int, Any]:
    impl = make()
    gc.collect()
    start = time.perf_counter()
    answered = drive(impl, ids)
    return time.perf_counter() - start, answered, impl


def ack_cost(n: int, n_reference: int, repeat: int, ids: Sequence[str] | None = None) -> AckCost:
    """Per-ack cost of the floor, compiled and reference runtimes; see the module docstring."""
    ids = ids if ids is not None else session_ids(max(n, n_reference))
    big, small = ids[:n], ids[:n_reference]
    runs: list[tuple[str, Sequence[str], Callable[[], Engine | Floor]]] = [
        ("floor", big, Floor),
        ("compiled", big, lambda: _engine("compiled")),
        ("floor", small, Floor),
        ("compiled", small, lambda: _engine("compiled")),
        ("reference", small, lambda: _engine("reference")),
    ]
    us: dict[tuple[str, int], list[float]] = {(name, len(s)): [] for name, s, _ in runs}
    answered: dict[tuple[str, int], int] = {}
    expected: dict[int, tuple[int, Outcome]] = {}
    for round_ in range(repeat):
        for name, sessions, make in runs:
            elapsed, count, impl = _timed_drive(make, sessions)
            key = (name, len(sessions))
            us[key].append(elapsed / count * 1e6)
            answered[key] = count
            if round_ == 0:
                # The fairness check: every implementation ends every session
                # the same way after the same number of acks.
                got = (count, outcome(impl))
                want = expected.setdefault(len(sessions), got)
                if got != want:
                    raise BenchError(f"{name} disagrees with the floor at n={len(sessions)}")
            del impl
    rows = [
        AckRow(impl=name, sessions=size, acks=answered[name, size], us_per_ack=Stat.of(values))
        for (name, size), values in us.items()
    ]

    def ratio(top: tuple[str, int], bottom: tuple[str, int]) -> Stat:
        return Stat.of([a / b for a, b in zip(us[top], us[bottom], strict=True)])

    return AckCost(
        rows=rows,
        reference_over_compiled=ratio(("reference", n_reference), ("compiled", n_reference)),
        compiled_over_floor=ratio(("compiled", n), ("floor", n)),
        compiled_over_floor_small=ratio(("compiled", n_reference), ("floor", n_reference)),
    )


def profile_ack(n: int, top: int = 20) -> str:
    """cProfile of the compiled runtime on the per-ack workload, by own time."""
    ids = session_ids(n)
    engine = _engine("compiled")
    profiler = cProfile.Profile()
    profiler.enable()
    drive(engine, ids)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# ---------------------------------------------------------------------------
# 2. Tick cost versus queue size
# ---------------------------------------------------------------------------


class ScanQueue:
    """The motivating service's candidate pick: scan the whole queue every tick.

    Sessions wait in one insertion-ordered queue, with per-session maps of
    retry times and of what is in flight. A tick walks the queue from the
    front, skips every session in flight or not yet due, and takes the first
    ``size``. Removal is O(1) (a dict, not a list), which is kinder than the
    original.
    """

    def __init__(self, size: int = 10) -> None:
        self.size = size
        self.queue: dict[str, None] = {}
        self.retry_at: dict[str, float] = {}
        self.in_flight: set[str] = set()

    def pick(self, now: float) -> list[str]:
        batch: list[str] = []
        retry_at, in_flight, size = self.retry_at, self.in_flight, self.size
        for sid in self.queue:
            if sid in in_flight or retry_at.get(sid, 0.0) > now:
                continue
            batch.append(sid)
            if len(batch) == size:
                break
        in_flight.update(batch)
        return batch

    def synced_and_changed(self, batch: Sequence[str]) -> None:
        """The batch was acked Ok, and every session in it changed again."""
        for sid in batch:
            self.in_flight.discard(sid)
            del self.queue[sid]
            self.queue[sid] = None


def tick_population(ids: Sequence[str], policy: Policy = TICK_POLICY) -> Engine:
    """An engine holding ``ids``: the first half backed off, the rest queued.

    Built at t=0 through the public API; the backoffs run out at :data:`FAR`,
    and the first tick after t=30 clears the deadlines of the set-up batches.
    """
    engine = _engine("compiled", policy)
    for sid in ids:
        engine.enqueue(sid)
    half = len(ids) // 2
    sent = 0
    while sent < half:
        for batch in engine.tick(0.0):
            engine.on_ack(batch.id, dict.fromkeys(batch.session_ids, _RATE), 0.0)
            sent += len(batch.session_ids)
    return engine


def _scan_population(ids: Sequence[str]) -> ScanQueue:
    scan = ScanQueue(TICK_POLICY.batch_size)
    half = len(ids) // 2
    for i, sid in enumerate(ids):
        scan.queue[sid] = None
        if i < half:
            scan.retry_at[sid] = FAR
    return scan


def _time_engine_ticks(engine: Engine, now: float, ticks: int) -> tuple[float, float]:
    times: list[float] = []
    clock = time.perf_counter
    for _ in range(ticks):
        now += 5.0
        start = clock()
        batches = engine.tick(now)
        times.append(clock() - start)
        if len(batches) != 1:
            raise BenchError(f"expected one batch per tick, got {len(batches)}")
        batch = batches[0]
        engine.on_ack(batch.id, _OK, now)
        for sid in batch.session_ids:
            engine.enqueue(sid)
    return statistics.median(times) * 1e6, now


def _time_scan_ticks(scan: ScanQueue, now: float, ticks: int) -> tuple[float, float]:
    times: list[float] = []
    clock = time.perf_counter
    for _ in range(ticks):
        now += 5.0
        start = clock()
        batch = scan.pick(now)
        times.append(clock() - start)
        if len(batch) != scan.size:
            raise BenchError(f"expected a full batch, got {len(batch)}")
        scan.synced_and_changed(batch)
    return statistics.median(times) * 1e6, now


def tick_cost(
    sizes: Sequence[int], ticks: int, repeat: int, ids: Sequence[str] | None = None
) -> TickCost:
    """Median µs per tick at each size, for the engine and the scanning pick."""
    ids = ids if ids is not None else session_ids(max(sizes))
    engines = {n: tick_population(ids[:n]) for n in sizes}
    scans = {n: _scan_population(ids[:n]) for n in sizes}
    clocks = dict.fromkeys(sizes, 100.0)
    for n, engine in engines.items():
        # Untimed: clears the set-up deadlines and warms the structures.
        _, clocks[n] = _time_engine_ticks(engine, clocks[n], 1)
    engine_us: dict[int, list[float]] = {n: [] for n in sizes}
    scan_us: dict[int, list[float]] = {n: [] for n in sizes}
    scan_clock = 100.0
    for _ in range(repeat):
        for n in sizes:
            gc.collect()
            median, clocks[n] = _time_engine_ticks(engines[n], clocks[n], ticks)
            engine_us[n].append(median)
            median, scan_clock = _time_scan_ticks(scans[n], scan_clock, ticks)
            scan_us[n].append(median)
    if max(*clocks.values(), scan_clock) >= FAR:
        raise BenchError("the backoffs ran out during the measurement; use fewer rounds")
    lo, hi = min(sizes), max(sizes)
    return TickCost(
        rows=[TickRow(n, Stat.of(engine_us[n]), Stat.of(scan_us[n])) for n in sizes],
        engine_growth=Stat.of([a / b for a, b in zip(engine_us[hi], engine_us[lo], strict=True)]),
        scan_growth=Stat.of([a / b for a, b in zip(scan_us[hi], scan_us[lo], strict=True)]),
    )


# ---------------------------------------------------------------------------
# 3. Memory
# ---------------------------------------------------------------------------


@contextmanager
def _traced() -> Iterator[Callable[[], int]]:
    gc.collect()
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()


def _one_attempt(engine: Engine, ids: Sequence[str]) -> None:
    """Send every session once: the first half is rate-limited, the rest synced."""
    half = len(ids) // 2
    answered = 0
    while answered < len(ids):
        for batch in engine.tick(0.0):
            answer = {
                sid: _RATE if i + answered < half else _OK
                for i, sid in enumerate(batch.session_ids)
            }
            engine.on_ack(batch.id, answer, 0.0)
            answered += len(batch.session_ids)
    engine.tick(100.0)  # past every set-up deadline: the heap keeps none of them


def memory_row(runtime: str, population: str, ids: Sequence[str]) -> MemoryRow:
    """Bytes per session the engine allocates for ``ids`` in ``population``."""
    with _traced() as used:
        engine = _engine(runtime, MEMORY_POLICY)
        before = used()
        for sid in ids:
            engine.enqueue(sid)
        if population == "one attempt":
            _one_attempt(engine, ids)
        elif population != "enqueued":
            raise ValueError(f"unknown population {population!r}")
        gc.collect()
        after = used()
    del engine
    return MemoryRow(
        runtime=runtime,
        population=population,
        sessions=len(ids),
        bytes_per_session=(after - before) / len(ids),
        id_bytes=sys.getsizeof(ids[0]),
    )


def memory(
    sizes: Sequence[int], n_reference: int, ids: Sequence[str] | None = None
) -> list[MemoryRow]:
    """Memory per session, compiled at ``sizes`` and reference at ``n_reference``."""
    ids = ids if ids is not None else session_ids(max(*sizes, n_reference))
    rows = [memory_row("reference", "one attempt", ids[:n_reference])]
    rows.append(memory_row("compiled", "one attempt", ids[:n_reference]))
    for n in sizes:
        rows.append(memory_row("compiled", "enqueued", ids[:n]))
        rows.append(memory_row("compiled", "one attempt", ids[:n]))
    return rows


# ---------------------------------------------------------------------------
# 4. Store cost
# ---------------------------------------------------------------------------


class _Recorder:
    """A store that keeps a copy of every delta, to replay into a real one."""

    def __init__(self) -> None:
        self.deltas: list[Delta] = []

    def load(self) -> Snapshot | None:
        return None

    def save(self, delta: Delta) -> None:
        copy = msgspec.structs.replace
        self.deltas.append(
            copy(
                delta,
                sessions=[copy(rec) for rec in delta.sessions],
                changes=list(delta.changes),
                link=copy(delta.link),
                stamps=dict(delta.stamps),
            )
        )

    def close(self) -> None:
        return None


class _Counting:
    """Counts the transitions handed to the store it wraps."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.transitions = 0

    def load(self) -> Snapshot | None:
        return self.inner.load()

    def save(self, delta: Delta) -> None:
        self.transitions += len(delta.changes)
        self.inner.save(delta)

    def close(self) -> None:
        self.inner.close()


def workload_deltas(ids: Sequence[str]) -> tuple[Delta, list[Delta]]:
    """The per-ack workload's deltas: its enqueues merged into one, then the rest.

    The rest are what a service writes in steady state: one delta per tick
    that formed a batch of 10 (``sent``, plus any backoff ``elapsed``) and one
    per ack (10 transitions).
    """
    recorder = _Recorder()
    engine = Engine(ACK_POLICY, store=recorder, rng=random.Random(0), log=False)
    for sid in ids:
        engine.enqueue(sid)
    mark = len(recorder.deltas)
    drive(engine, ())
    enqueued, rest = recorder.deltas[:mark], recorder.deltas[mark:]
    last = enqueued[-1]
    merged = msgspec.structs.replace(
        last,
        sessions=[rec for d in enqueued for rec in d.sessions],
        changes=[c for d in enqueued for c in d.changes],
    )
    return merged, rest


def recovery_store(path: Path, n: int, ids: Sequence[str]) -> None:
    """Write a store of ``n`` sessions: 1/4 backed off, 1/4 synced, 1/2 queued
    in the backfill lane, with every 100th dead-lettered instead; one history
    row each."""
    from sessionfsm.sqlite_store import SqliteStore

    records: list[SessionRecord] = []
    changes: list[Change] = []
    for i, sid in enumerate(ids[:n]):
        if i % 100 == 99:
            rec = SessionRecord(
                sid,
                SessionState.DEAD_LETTERED,
                Lane.BACKFILL,
                attempts=1,
                dead_letter_reason="PayloadTooLarge",
                dead_lettered_at=0.0,
            )
        elif i % 4 == 0:
            rec = SessionRecord(
                sid, SessionState.BACKOFF, Lane.BACKFILL, (0, 1, 0), 1000.0 + i / n, attempts=1
            )
        elif i % 4 == 1:
            rec = SessionRecord(sid, SessionState.SYNCED, Lane.BACKFILL)
        else:
            rec = SessionRecord(sid, SessionState.QUEUED, Lane.BACKFILL)
        records.append(rec)
        changes.append(Change(sid, None, rec.state, "enqueued", None, 0.0, rec.attempts))
    chunk = 50_000
    with SqliteStore(path, history_retention=None) as store:
        for lo in range(0, n, chunk):
            store.save(
                Delta(
                    sessions=records[lo : lo + chunk],
                    changes=changes[lo : lo + chunk],
                    link=LinkRecord(),
                    stamps={},
                    next_batch_id=1,
                    now=0.0,
                )
            )


# The baseline's statements: the same tables and rows as SqliteStore, written
# by hand with nothing around them (no positions worked out, no lane stamps,
# no pruning, no error mapping).
_RAW_UPSERT: Final = """
INSERT INTO session (id, state, lane, ack_timeouts, rate_limits, too_large, retry_at, dirty,
    attempts, dead_letter_reason, dead_lettered_at, position)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, lane = excluded.lane, ack_timeouts = excluded.ack_timeouts,
    rate_limits = excluded.rate_limits, too_large = excluded.too_large,
    retry_at = excluded.retry_at, dirty = excluded.dirty, attempts = excluded.attempts,
    dead_letter_reason = excluded.dead_letter_reason,
    dead_lettered_at = excluded.dead_lettered_at,
    position = coalesce(excluded.position, session.position)
"""
_RAW_HISTORY: Final = """
INSERT INTO history (session_id, source, target, event, reason, at, attempt)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
_RAW_ENGINE: Final = """
UPDATE engine SET now = ?, next_batch_id = ?, link_state = ?, link_failures = ? WHERE id = 1
"""
_RAW_READ: Final = """
SELECT id, state, lane, ack_timeouts, rate_limits, too_large, retry_at, dirty, attempts,
    dead_letter_reason, dead_lettered_at, position
FROM session ORDER BY position
"""

RawTransaction = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], tuple[float, int, str, int]]


def raw_transactions(deltas: Sequence[Delta]) -> list[RawTransaction]:
    """Each delta as the plain rows a raw writer puts in one transaction."""
    out: list[RawTransaction] = []
    for delta in deltas:
        sessions = [
            (
                rec.id,
                rec.state.value,
                rec.lane.value,
                *rec.counts,
                rec.retry_at,
                rec.dirty,
                rec.attempts,
                rec.dead_letter_reason,
                rec.dead_lettered_at,
                None,
            )
            for rec in delta.sessions
        ]
        history = [msgspec.structs.astuple(c) for c in delta.changes]
        link = delta.link
        engine = (delta.now, delta.next_batch_id, link.state.value, link.failures)
        out.append((sessions, history, engine))
    return out


def _raw_connection(path: Path) -> sqlite3.Connection:
    """A bare connection with SqliteStore's write settings (WAL, synchronous=NORMAL)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA cache_size = -65536")
    return conn


def raw_write(path: Path, first: RawTransaction, rest: Sequence[RawTransaction]) -> float:
    """Write ``first`` untimed, then ``rest``, one transaction each; seconds for ``rest``."""
    conn = _raw_connection(path)
    try:

        def write(tx: RawTransaction) -> None:
            sessions, history, engine = tx
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_RAW_UPSERT, sessions)
            conn.executemany(_RAW_HISTORY, history)
            conn.execute(_RAW_ENGINE, engine)
            conn.execute("COMMIT")

        write(first)
        gc.collect()
        start = time.perf_counter()
        for tx in rest:
            write(tx)
        return time.perf_counter() - start
    finally:
        conn.close()


def raw_read(path: Path) -> tuple[float, int]:
    """Read every session of the file into plain tuples; (seconds, sessions)."""
    gc.collect()
    start = time.perf_counter()
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(_RAW_READ).fetchall()
        conn.execute("SELECT * FROM engine").fetchall()
    finally:
        conn.close()
    return time.perf_counter() - start, len(rows)


def store_cost(
    delta_sessions: int, recovery_sessions: int, repeat: int, ids: Sequence[str] | None = None
) -> StoreCost:
    """Persisted transitions per second through ``SqliteStore``, and recovery time,
    each against a raw ``sqlite3`` baseline run in the same round.

    Each figure is on a fresh database in a temporary directory, with the
    store's defaults (WAL, ``synchronous=normal``, 30-day/1M-row history):

    * ``save()`` only: the per-ack workload's deltas, recorded once, replayed
      into the store; only the ``save`` calls are timed; transitions are
      history rows written. Baseline: :func:`raw_write`, the same rows in the
      same transactions through a bare connection with the same settings,
      into a file with the same schema; the rows are built before timing;
    * engine + store: the same workload driven live with the store attached
      (enqueues untimed), so the engine's own cost is included;
    * recovery: open a store of ``recovery_sessions`` and build an engine from
      it (``SqliteStore(path)`` plus ``Engine(store=...)``), timed ``repeat``
      times; closing is not timed. Baseline: :func:`raw_read`, the same
      file's sessions read into plain tuples in queue order.
    """
    try:
        from sessionfsm.sqlite_store import SqliteStore
    except ImportError:
        return StoreCost(available=False, note="sessionfsm.sqlite_store does not exist")
    n = delta_sessions
    ids = ids if ids is not None else session_ids(max(n, recovery_sessions))
    first, deltas = workload_deltas(ids[:n])
    transitions = sum(len(d.changes) for d in deltas)
    raw_first, *raw_rest = raw_transactions([first, *deltas])
    save_rate: list[float] = []
    raw_rate: list[float] = []
    engine_rate: list[float] = []
    recovery: list[float] = []
    raw_recovery: list[float] = []
    with tempfile.TemporaryDirectory(prefix="sessionfsm-bench-") as tmp:
        base = Path(tmp)
        recovery_path = base / "recovery.db"
        recovery_store(recovery_path, recovery_sessions, ids)
        for round_ in range(repeat):
            path = base / f"raw-{round_}.db"
            SqliteStore(path).close()  # the same schema, written by the store
            raw_rate.append(transitions / raw_write(path, raw_first, raw_rest))
            path = base / f"replay-{round_}.db"
            with SqliteStore(path) as store:
                store.save(first)
                save = store.save
                gc.collect()
                start = time.perf_counter()
                for delta in deltas:
                    save(delta)
                save_rate.append(transitions / (time.perf_counter() - start))
            path = base / f"live-{round_}.db"
            counting = _Counting(SqliteStore(path))
            engine = Engine(ACK_POLICY, store=counting, rng=random.Random(0), log=False)
            for sid in ids[:n]:
                engine.enqueue(sid)
            before = counting.transitions
            gc.collect()
            start = time.perf_counter()
            drive(engine, ())
            elapsed = time.perf_counter() - start
            engine_rate.append((counting.transitions - before) / elapsed)
            counting.close()
            del engine
            seconds, read = raw_read(recovery_path)
            if read != recovery_sessions:
                raise BenchError(f"read {read} sessions, wrote {recovery_sessions}")
            raw_recovery.append(seconds)
            gc.collect()
            start = time.perf_counter()
            reopened = SqliteStore(recovery_path)
            engine = Engine(TICK_POLICY, store=reopened, log=False)
            recovery.append(time.perf_counter() - start)
            if len(engine) != recovery_sessions:
                raise BenchError(f"recovered {len(engine)} sessions, wrote {recovery_sessions}")
            reopened.close()
            del engine, reopened
    return StoreCost(
        available=True,
        note="SqliteStore defaults: WAL, synchronous=normal",
        deltas=len(deltas),
        transitions=transitions,
        transitions_per_s=Stat.of(save_rate),
        engine_transitions_per_s=Stat.of(engine_rate),
        recovery_sessions=recovery_sessions,
        recovery_s=Stat.of(recovery),
        raw_transitions_per_s=Stat.of(raw_rate),
        save_over_raw=Stat.of([raw / ours for raw, ours in zip(raw_rate, save_rate, strict=True)]),
        raw_read_s=Stat.of(raw_recovery),
        recovery_over_raw=Stat.of(
            [ours / raw for ours, raw in zip(recovery, raw_recovery, strict=True)]
        ),
    )


# ---------------------------------------------------------------------------
# 5. Start-up
# ---------------------------------------------------------------------------


def startup(n: int, repeat: int, ids: Sequence[str] | None = None) -> Startup:
    """Seconds to enqueue ``n`` sessions into a new engine, and into the floor."""
    ids = ids if ids is not None else session_ids(n)
    ids = ids[:n]
    engine_s: list[float] = []
    floor_s: list[float] = []
    for _ in range(repeat):
        for samples, make in ((floor_s, Floor), (engine_s, lambda: _engine("compiled"))):
            impl: Engine | Floor = make()
            gc.collect()
            enqueue = impl.enqueue
            start = time.perf_counter()
            for sid in ids:
                enqueue(sid)
            samples.append(time.perf_counter() - start)
            del impl, enqueue
    from sessionfsm.sqlite_store import SqliteStore

    each_n = min(n, 10_000)
    many_s: list[float] = []
    each_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(repeat):
            for samples, count in ((many_s, n), (each_s, each_n)):
                path = Path(tmp) / f"startup-{round_}-{count}-{len(samples)}.db"
                engine = Engine(Policy(), store=SqliteStore(path), log=False)
                gc.collect()
                start = time.perf_counter()
                if samples is many_s:
                    engine.enqueue_many(ids, now=0.0)
                else:
                    for sid in ids[:count]:
                        engine.enqueue(sid, now=0.0)
                samples.append(time.perf_counter() - start)
                engine.close()
                del engine
                path.unlink()
    return Startup(
        sessions=n,
        engine_s=Stat.of(engine_s),
        floor_s=Stat.of(floor_s),
        engine_over_floor=Stat.of([a / b for a, b in zip(engine_s, floor_s, strict=True)]),
        sqlite_many_s=Stat.of(many_s),
        sqlite_each_sessions=each_n,
        sqlite_each_s=Stat.of(each_s),
    )


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------


def _target(key: str, description: str, op: str, limit: float, value: float | None) -> Target:
    ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return Target(key=key, description=description, limit=limit, op=op, value=value, ok=ok)


def evaluate(
    ack: AckCost,
    tick: TickCost,
    mem: Sequence[MemoryRow],
    store: StoreCost,
    listeners: ListenerCost | None,
    postgres: PostgresCost | None = None,
) -> list[Target]:
    """The performance targets, against what this run measured (PostgreSQL's if it ran)."""
    lo, hi = tick.rows[0].sessions, tick.rows[-1].sessions
    compiled = [r for r in mem if r.runtime == "compiled"]
    biggest = max(r.sessions for r in compiled)
    worst = max(r.bytes_per_session for r in compiled if r.sessions == biggest)
    return [
        _target(
            "ack_vs_reference",
            "per-ack cost: reference / compiled",
            ">=",
            40.0,
            ack.reference_over_compiled.median,
        ),
        _target(
            "ack_vs_floor",
            "per-ack cost: compiled / floor",
            "<=",
            15.0,
            ack.compiled_over_floor.median,
        ),
        _target(
            "tick_growth",
            f"tick({_n(hi)}) / tick({_n(lo)})",
            "<=",
            2.0,
            tick.engine_growth.median,
        ),
        _target(
            "memory",
            f"bytes per session at {_n(biggest)}, ids excluded, worse population",
            "<=",
            250.0,
            worst,
        ),
        _target(
            "store_throughput",
            "persisted transitions/s: raw sqlite3 / SqliteStore",
            "<=",
            2.0,
            store.save_over_raw.median if store.save_over_raw else None,
        ),
        _target(
            "recovery",
            f"recover {_n(store.recovery_sessions)} sessions: engine / raw read into tuples",
            "<=",
            3.0,
            store.recovery_over_raw.median if store.recovery_over_raw else None,
        ),
        _target(
            "listener_cost",
            "per-ack cost: Prometheus metrics attached / no listener",
            "<=",
            listeners.target if listeners is not None else 1.5,
            listeners.prometheus_over_none if listeners is not None else None,
        ),
        *_postgres_targets(postgres),
    ]


def _postgres_targets(pg: PostgresCost | None) -> list[Target]:
    if pg is None:  # not asked for (--quick)
        return []
    worker = pg.worker.get("grouped") if pg.available else None
    return [
        _target(
            "postgres_worker",
            "persisted transitions/s, one worker on PostgreSQL, default batch",
            ">=",
            25_000.0,
            None if worker is None else float(worker),
        ),
        _target(
            "postgres_takeover",
            "takeover after SIGKILL / (lease + 2 ticks)",
            "<=",
            1.0,
            pg.takeover_over_bound if pg.available else None,
        ),
    ]


def missed(targets: Sequence[Target]) -> list[str]:
    """One line per target that was missed or not measured; empty if all pass."""
    lines: list[str] = []
    for t in targets:
        if t.ok is None:
            lines.append(f"{t.key}: {t.description}: not measured in this run")
        elif not t.ok:
            lines.append(f"{t.key}: {t.description} = {t.value:.4g}, target {t.op} {t.limit:g}")
    return lines


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def machine() -> Machine:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    return Machine(
        nproc=os.cpu_count() or 0,
        cpu=cpu,
        python=platform.python_version(),
        platform=platform.platform(),
        load_before=_load(),
        load_after=0.0,
    )


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def run(
    sizes: Sizes, *, mode: str = "custom", progress: Callable[[str], None] | None = None
) -> Report:
    """Every measurement, in this process, in one run."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    where = machine()
    biggest = max(
        sizes.ack_sessions,
        sizes.ack_reference_sessions,
        *sizes.tick_sessions,
        *sizes.memory_sessions,
        sizes.store_deltas_sessions,
        sizes.store_recovery_sessions,
        sizes.startup_sessions,
    )
    say(f"making {biggest:,} session ids")
    ids = session_ids(biggest)
    parts = 7 if sizes.postgres_sessions else 6
    say(f"1/{parts} per-ack cost")
    ack = ack_cost(sizes.ack_sessions, sizes.ack_reference_sessions, sizes.repeat, ids)
    say(f"2/{parts} tick cost")
    tick = tick_cost(sizes.tick_sessions, sizes.ticks_per_round, sizes.repeat, ids)
    gc.collect()
    say(f"3/{parts} memory")
    mem = memory(sizes.memory_sessions, sizes.memory_reference_sessions, ids)
    say(f"4/{parts} store")
    store = store_cost(
        sizes.store_deltas_sessions, sizes.store_recovery_sessions, sizes.repeat, ids
    )
    say(f"5/{parts} start-up")
    start = startup(sizes.startup_sessions, sizes.repeat, ids)
    say(f"6/{parts} listener cost")
    gc.collect()
    listeners = listener_cost(sizes.listener_sessions, sizes.listener_rounds)
    postgres: PostgresCost | None = None
    if sizes.postgres_sessions:
        say(f"7/{parts} PostgreSQL and the fleet")
        gc.collect()
        postgres = _postgres(sizes)
    where = msgspec.structs.replace(where, load_after=_load())
    return Report(
        mode=mode,
        sizes=sizes,
        machine=where,
        ack=ack,
        tick=tick,
        memory=mem,
        store=store,
        startup=start,
        listeners=listeners,
        targets=evaluate(ack, tick, mem, store, listeners, postgres),
        elapsed_s=time.perf_counter() - started,
        postgres=postgres,
    )


def _postgres(sizes: Sizes) -> PostgresCost:
    """Section 7, or why it could not run (psycopg missing, no server)."""
    try:
        from benchmarks.bench_postgres import postgres_cost
    except ImportError as exc:
        return PostgresCost(
            available=False, note=f"needs pip install 'sessionfsm[postgres]' pgserver: {exc}"
        )
    return postgres_cost(
        sessions=sizes.postgres_sessions,
        fleet_sessions=sizes.postgres_fleet_sessions,
        repeat=min(sizes.repeat, 3),
    )


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _n(n: int) -> str:
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread(stat: Stat) -> str:
    return f"{_fmt(stat.low)} - {_fmt(stat.high)}"


def rows(report: Report) -> list[tuple[str, str, str, str, str]]:
    """The table's rows: (measurement, n, median, spread, unit)."""
    out: list[tuple[str, str, str, str, str]] = []

    def add(name: str, n: int | str, stat: Stat, unit: str) -> None:
        out.append(
            (name, n if isinstance(n, str) else _n(n), _fmt(stat.median), _spread(stat), unit)
        )

    ack = report.ack
    for r in ack.rows:
        add(f"per ack: {r.impl}", r.sessions, r.us_per_ack, "µs/ack")
    add("  reference / compiled", ack.rows[-1].sessions, ack.reference_over_compiled, "x")
    add("  compiled / floor", ack.rows[0].sessions, ack.compiled_over_floor, "x")
    add("  compiled / floor", ack.rows[-1].sessions, ack.compiled_over_floor_small, "x")
    for t in report.tick.rows:
        add("tick: engine", t.sessions, t.engine_us, "µs/tick")
        add("tick: scan baseline", t.sessions, t.scan_us, "µs/tick")
    sizes = report.tick.rows
    span = f"{_n(sizes[-1].sessions)}/{_n(sizes[0].sessions)}"
    add("  engine growth", span, report.tick.engine_growth, "x")
    add("  scan growth", span, report.tick.scan_growth, "x")
    for m in report.memory:
        value = _fmt(m.bytes_per_session)
        out.append(
            (f"memory: {m.runtime}, {m.population}", _n(m.sessions), value, "-", "B/session")
        )
    if report.memory:
        out.append(
            ("  one id (36 chars), by reference", "-", str(report.memory[0].id_bytes), "-", "B")
        )
    st = report.store
    if not st.available:
        out.append(("store: SqliteStore", "-", "n/a", "-", st.note))
    else:
        if st.raw_transitions_per_s is not None:
            add(
                "store: raw sqlite3 baseline",
                f"{st.deltas} deltas",
                st.raw_transitions_per_s,
                "transitions/s",
            )
        if st.transitions_per_s is not None:
            add("store: save() only", f"{st.deltas} deltas", st.transitions_per_s, "transitions/s")
        if st.save_over_raw is not None:
            add("  raw / save() (time ratio)", "-", st.save_over_raw, "x")
        if st.engine_transitions_per_s is not None:
            add("store: engine + store", "-", st.engine_transitions_per_s, "transitions/s")
        if st.raw_read_s is not None:
            add("store: raw read baseline", st.recovery_sessions, st.raw_read_s, "s")
        if st.recovery_s is not None:
            add("store: reopen + recover", st.recovery_sessions, st.recovery_s, "s")
        if st.recovery_over_raw is not None:
            add("  recover / raw read", st.recovery_sessions, st.recovery_over_raw, "x")
    s = report.startup
    add("start-up: engine enqueue", s.sessions, s.engine_s, "s")
    add("start-up: floor enqueue", s.sessions, s.floor_s, "s")
    add("  engine / floor", s.sessions, s.engine_over_floor, "x")
    if s.sqlite_many_s is not None:
        add("start-up: SQLite, enqueue_many", s.sessions, s.sqlite_many_s, "s")
    if s.sqlite_each_s is not None:
        add("start-up: SQLite, enqueue each", s.sqlite_each_sessions, s.sqlite_each_s, "s")
    lc = report.listeners
    names = {"none": "none", "noop": "no-op", "prometheus": "Prometheus", "otel": "OpenTelemetry"}
    for impl, us in lc.us_per_ack.items():
        out.append(
            (f"listeners: {names.get(impl, impl)}", _n(lc.sessions), _fmt(us), "-", "µs/ack")
        )
    for label, ratio, (low, high) in (
        ("Prometheus / none", lc.prometheus_over_none, lc.prometheus_over_none_range),
        ("OpenTelemetry / none", lc.otel_over_none, lc.otel_over_none_range),
    ):
        spread = f"{_fmt(low)} - {_fmt(high)}"
        out.append((f"  {label}", _n(lc.sessions), _fmt(ratio), spread, "x"))
    out.extend(_postgres_rows(report.postgres))
    return out


def _postgres_rows(pg: PostgresCost | None) -> list[tuple[str, str, str, str, str]]:
    if pg is None:
        return []
    if not pg.available:
        return [("postgres", "-", "n/a", "-", pg.note)]

    def runs(values: Sequence[float]) -> str:
        return f"{_fmt(min(values))} - {_fmt(max(values))}"

    w = pg.worker
    n = _n(int(w["sessions"]))
    out = [("postgres: one commit alone", "-", _fmt(pg.commit_latency_ms or 0.0), "-", "ms")]
    for key, label in (
        ("sqlite", "one engine on SQLite"),
        ("grouped", "one worker, grouped writes"),
        ("every_turn", "one worker, a write every turn"),
    ):
        out.append((f"postgres: {label}", n, _fmt(w[key]), runs(w[f"{key}_runs"]), "transitions/s"))
    out.append(("  worker / SQLite", n, _fmt(w["grouped_over_sqlite"]), "-", "x"))
    for f in pg.fleet:
        out.append(
            (
                f"postgres: {f['workers']} worker processes, HTTP relay",
                "-",
                _fmt(f["transitions_s"]),
                runs(f["runs_transitions_s"]),
                "transitions/s",
            )
        )
    t = pg.takeover
    out.append((f"postgres: takeover, lease {t['lease_s']:g} s", "-", _fmt(t["seconds"]), "-", "s"))
    p = pg.pickup
    out.append(("postgres: enqueue to pickup", str(p["enqueues"]), _fmt(p["median_ms"]), "-", "ms"))
    return out


def render(report: Report, file: Any = None) -> None:
    """Print the report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=110)
    m = report.machine
    title = (
        f"sessionfsm bench ({report.mode}, median of {report.sizes.repeat}): "
        f"{m.nproc} x {m.cpu}, Python {m.python}"
    )
    if report.mode == "quick":
        console.print(QUICK_NOTE)
    table = Table(title=title)
    for name, justify in (
        ("measurement", "left"),
        ("n", "right"),
        ("median", "right"),
        ("min - max", "right"),
        ("unit", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows(report):
        table.add_row(*row)
    console.print(table)
    targets = Table(title="targets")
    for name in ("target", "measured", "limit", "result"):
        targets.add_column(name)
    for t in report.targets:
        value = "-" if t.value is None else _fmt(t.value)
        result = "not measured" if t.ok is None else ("pass" if t.ok else "MISS")
        targets.add_row(t.description, value, f"{t.op} {t.limit:g}", result)
    console.print(targets)
    console.print(
        f"load average {m.load_before:.2f} before, {m.load_after:.2f} after; "
        f"{report.elapsed_s:.0f} s in all"
    )
    if report.mode == "quick":
        console.print(
            "quick run: a smoke test at small sizes. A MISS here means nothing: the targets "
            "are set for the full sizes; judge them with `sessionfsm bench --check`."
        )


@click.command("bench")
@click.option(
    "--quick",
    is_flag=True,
    help="A smoke test: small sizes, well under a minute. Its figures are not the targets'.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead.")
@click.option("--check", is_flag=True, help="Exit 1 naming each target missed or not measured.")
@click.option("--repeat", type=click.IntRange(min=1), help="Rounds per measurement.")
@click.option(
    "--profile",
    is_flag=True,
    help="Print a cProfile of the compiled runtime on the per-ack workload and stop.",
)
def command(quick: bool, as_json: bool, check: bool, repeat: int | None, profile: bool) -> None:
    """Measure the engine against its baselines, side by side, in one run.

    Every headline figure is a ratio against a baseline measured in the same
    run: the reference runtime, a bare dict-table floor, and a queue scan.
    """
    sizes = QUICK if quick else FULL
    if profile:
        click.echo(profile_ack(sizes.ack_sessions))
        return
    if repeat is not None:
        sizes = msgspec.structs.replace(sizes, repeat=repeat)

    def progress(message: str) -> None:
        click.echo(f"bench: {message}", err=True)

    if quick:
        progress(QUICK_NOTE)
    report = run(sizes, mode="quick" if quick else "full", progress=progress)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(report)).decode())
    else:
        render(report)
    if check:
        problems = missed(report.targets)
        for line in problems:
            click.echo(f"bench: missed target {line}", err=True)
        if problems:
            raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    command()
