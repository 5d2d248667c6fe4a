"""A fleet worker: owns some partitions through leases and runs one engine for each.

The loop, every ``tick_s`` (sooner when a producer's NOTIFY arrives):

1. every ``heartbeat_s``: renew this worker and its leases in one transaction;
   a partition whose lease did not renew is dropped at once;
2. rebalance: compute the assignment over the live workers
   (:func:`~sessionfsm.fleet.coordinator.assign`), give back partitions that
   are no longer this worker's, and try to take the free or expired ones that
   are; a partition taken is recovered from the store (in-flight sessions go
   back to the head of their queue, counters intact). Besides each heartbeat,
   the worker rebalances the moment another worker's row or a lease it wants
   expires (:meth:`~sessionfsm.fleet.coordinator.Coordinator.next_change_s`),
   so a dead worker's partitions are taken within its lease, not a heartbeat
   later;
3. apply the inbox of each owned partition that has rows, in one fenced
   transaction per partition;
4. tick each engine and send its batches, passing the answers back.

Writes are grouped (a group commit, as queues that batch their completions
do): a partition's ticks, sends and answers are kept and written as one
fenced transaction. While a worker is busy (the last turn sent something
and an engine is due again at once) it goes straight into the next turn,
and writes each partition's group when it is ``commit_interval_s`` old or
holds ``commit_max_changes`` transitions; before it sleeps, and before it
applies an inbox, it writes everything. :meth:`Worker.step` is one turn,
written at its end. A crash loses at most the unwritten group: those
sessions are still queued (or in flight) in the store, so the next owner
sends them again; the relay deduplicates on the idempotency key.

Before every send the worker checks its lease is still valid by its own
monotonic clock (renewed at ``t`` on the server means valid until at least
``t + lease_s`` there; the worker counts from when it *asked*); a worker that
was stopped (SIGSTOP) past its lease therefore notices on waking, drops the
partition and sends nothing more for it. A save it attempts anyway is refused
by the server (``StoreFenced``). Any ``StoreError`` on a partition drops it
too; the rebalance takes it again, with a new epoch, if it is still ours.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec
import psycopg

from .. import acks
from .._errors import InvalidAck, StoreError, StoreFenced, UsageError
from .._log import get_logger
from ..engine import Batch, Engine
from ..machine import Lane, SessionState
from ..metrics import Histogram
from ..policy import Policy
from ..postgres_store import Lease, PostgresStore, new_owner_id, partition_of
from ..runner import AckResult, means_unavailable
from ..store import DEFAULT_RETENTION, HistoryRetention
from ..transports.status import answer_of_status, outcome_of
from ..validation import session_id_problem
from .coordinator import Coordinator, InboxRow, assign

__all__ = ["PICKUP_BUCKETS", "HttpSender", "Send", "Worker", "WorkerFigures"]

#: Upper bounds (seconds) of the enqueue-to-pickup histogram's buckets; the
#: last, +Inf, is implied. From a NOTIFY on a quiet server (about a
#: millisecond) to a pickup that waited for the inbox poll or a takeover.
PICKUP_BUCKETS: Final[tuple[float, ...]] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
#: How many of the latest pickup latencies ``Worker.pickup_latencies`` keeps.
_RECENT_PICKUPS: Final = 10_000
#: At most this often a running worker refreshes :meth:`Worker.figures`.
_FIGURES_EVERY_S: Final = 1.0

#: How long after a watched expiry a worker looks again: the lease rows of a
#: dead worker expire a moment after its own row (same transaction, later clock).
_EXPIRY_SLACK_S = 0.01

_LANE_NAMES: frozenset[str] = frozenset(lane.value for lane in Lane)

#: ``send(partition, epoch, batch)`` -> the relay's answer. Raise
#: ``ConnectionError`` (or an error :func:`~sessionfsm.runner.means_unavailable`
#: knows, such as httpx's ``ConnectError``) when the relay cannot be reached:
#: the batch is answered ``RelayUnavailable``, charged to nobody. Any other
#: error is logged (``sessionfsm.send_failed``) and the batch left unanswered,
#: to time out; a malformed answer is logged (``sessionfsm.invalid_ack``) and
#: left unanswered too. Neither stops the worker.
Send = Callable[[int, int, Batch], AckResult]


class WorkerFigures(msgspec.Struct, frozen=True):
    """A consistent copy of a worker's figures (:meth:`Worker.figures`), for metrics."""

    worker: str
    #: Partition -> the epoch this worker holds it in, for those it owns now.
    partitions: dict[int, int]
    #: Sessions of those partitions in each state (every state present).
    sessions: dict[str, int]
    #: What happened, by kind, since the worker started (``Worker.stats``).
    events: dict[str, int]
    #: Seconds from a producer's enqueue to this worker applying it.
    pickup: Histogram


class _Owned:
    __slots__ = ("engine", "epoch", "held_since", "store", "valid_until")

    def __init__(self, engine: Engine, store: PostgresStore, epoch: int, valid_until: float):
        self.engine = engine
        self.store = store
        self.epoch = epoch
        self.valid_until = valid_until
        #: ``time.monotonic()`` when the open group began.
        self.held_since = 0.0


class Worker:
    """One member of the fleet. Drive it with :meth:`run` (or :meth:`step` in tests).

    ``send`` delivers a batch to the relay (see :data:`Send`); the epoch it
    gets lets a relay refuse batches of a superseded owner. ``lease_s`` is
    how long a silent worker keeps its partitions; ``heartbeat_s`` (a third of
    it by default) how often it renews them. ``commit_interval_s`` and
    ``commit_max_changes`` bound a busy worker's group commit: how long, and
    how many transitions, its unwritten work may grow before it is written
    (0 writes every turn).
    """

    def __init__(
        self,
        dsn: str,
        send: Send,
        *,
        schema: str = "sessionfsm",
        partitions: int | None = None,
        policy: Policy | None = None,
        lease_s: float = 10.0,
        heartbeat_s: float | None = None,
        tick_s: float | None = None,
        worker_id: str | None = None,
        inbox_limit: int = 5000,
        history_retention: HistoryRetention | None = DEFAULT_RETENTION,
        synchronous_commit: bool = True,
        commit_interval_s: float = 0.05,
        commit_max_changes: int = 5000,
        log: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.send = send
        self.policy = policy if policy is not None else Policy()
        self.lease_s = float(lease_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else self.lease_s / 3
        self.tick_s = tick_s if tick_s is not None else self.policy.tick_interval_s
        self.id = worker_id or new_owner_id()
        self.inbox_limit = inbox_limit
        if not commit_interval_s >= 0:
            raise UsageError(f"commit_interval_s must be >= 0, got {commit_interval_s!r}")
        if not commit_max_changes >= 1:
            raise UsageError(f"commit_max_changes must be >= 1, got {commit_max_changes!r}")
        self.commit_interval_s = float(commit_interval_s)
        self.commit_max_changes = int(commit_max_changes)
        self._retention = history_retention
        self._sync_commit = synchronous_commit
        self._log = get_logger(log)
        self._logging = log
        self._clock = clock
        self.coordinator = Coordinator(dsn, schema=schema, partitions=partitions)
        self.partitions = self.coordinator.partitions
        self.owned: dict[int, _Owned] = {}
        self._next_heartbeat = 0.0
        self._next_rebalance = 0.0
        self._listen: psycopg.Connection[Any] | None = None
        self._woken: set[int] = set(range(self.partitions))
        self._next_poll = 0.0
        self._next_listen = 0.0
        #: What happened, by kind: acquired, dropped_*, fenced, commits, sent, ...
        self.stats: dict[str, int] = {}
        #: Seconds from a producer's enqueue to this worker applying it: the
        #: latest 10,000 (all of them are counted in :meth:`figures`).
        self.pickup_latencies: deque[float] = deque(maxlen=_RECENT_PICKUPS)
        self._pickup_counts = [0] * (len(PICKUP_BUCKETS) + 1)
        self._pickup_total = 0.0
        self._next_figures = 0.0
        self._figures = self._snapshot()

    # ------------------------------------------------------------- running

    def run(
        self, *, until: Callable[[], bool] | None = None, max_seconds: float | None = None
    ) -> None:
        """Run until ``until()`` is true (or ``max_seconds`` pass); then leave cleanly."""
        limit = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not (until is not None and until()):
                if limit is not None and time.monotonic() > limit:
                    break
                sent = self._turn()
                pause = self._pause() if sent else self.tick_s
                if pause > 0:
                    self.flush(wait=False)  # written while this worker sleeps
                    self.wait(pause)
                    continue
                # Busy: keep the groups open, send those that are due to the
                # server in the background, and look for a producer's NOTIFY
                # now and then without sleeping.
                self.flush(due_only=True, wait=False)
                mono = time.monotonic()
                if mono >= self._next_listen:
                    self._next_listen = mono + self.tick_s
                    self.wait(0)
        finally:
            self.stop()

    def step(self) -> None:
        """One turn: heartbeat, rebalance, inbox, ticks and sends; written at its end."""
        self._turn()
        self.flush()
        self._figures = self._snapshot()

    def figures(self) -> WorkerFigures:
        """The worker's figures, safe to read from any thread (a metrics scrape).

        A copy the worker itself makes: at most a second old while it runs,
        current after :meth:`step` and :meth:`stop`.
        """
        return self._figures

    def flush(self, *, due_only: bool = False, wait: bool = True) -> None:
        """Write each owned partition's open group (only those due, with ``due_only``).

        A group is due when it is ``commit_interval_s`` old or holds
        ``commit_max_changes`` transitions. With ``wait`` (the default) every
        write has reached the server when this returns; without it, each goes
        from its store's background thread (at most one per partition) while
        the worker goes on, and a failure is found at the start of the next
        turn. A write that fails drops its partition (see :meth:`step`).
        """
        mono = time.monotonic()
        for p, owned in list(self.owned.items()):
            store = owned.store
            try:
                if store.holding and not (
                    due_only
                    and mono - owned.held_since < self.commit_interval_s
                    and store.held_changes < self.commit_max_changes
                ):
                    store.write_held(wait=wait)
                    self._count("commits")
                if wait:
                    store.settle()
            except StoreError as exc:
                self._lost(p, exc)

    def stop(self) -> None:
        """Write what is held, give every lease back and leave the fleet (best effort)."""
        self.flush()
        for p in list(self.owned):
            self._drop(p, "stopping", release=True)
        with contextlib.suppress(StoreError):
            self.coordinator.leave(self.id)
        self.coordinator.close()
        if self._listen is not None:
            with contextlib.suppress(psycopg.Error):
                self._listen.close()
            self._listen = None
        self._figures = self._snapshot()

    # ------------------------------------------------------------ internals

    def _count(self, kind: str, n: int = 1) -> None:
        self.stats[kind] = self.stats.get(kind, 0) + n

    def _turn(self) -> bool:
        """Heartbeat and rebalance when due, the inbox, then every tick; True if it sent."""
        for p, owned in list(self.owned.items()):
            if not owned.store.writing:  # a background write that ended: did it fail?
                try:
                    owned.store.settle()
                except StoreError as exc:
                    self._lost(p, exc)
        mono = time.monotonic()
        if mono >= self._next_heartbeat:
            self._heartbeat(mono)
            self._rebalance()
        elif mono >= self._next_rebalance:
            self._rebalance()
        self._drain_inbox()
        sent = False
        for p in list(self.owned):
            sent = self._tick(p) or sent
        if mono >= self._next_figures:
            self._next_figures = mono + _FIGURES_EVERY_S
            self._figures = self._snapshot()
        return sent

    def _snapshot(self) -> WorkerFigures:
        sessions = dict.fromkeys((state.value for state in SessionState), 0)
        for owned in self.owned.values():
            for state, n in owned.engine.sessions_by_state().items():
                sessions[state.value] += n
        return WorkerFigures(
            worker=self.id,
            partitions={p: owned.epoch for p, owned in sorted(self.owned.items())},
            sessions=sessions,
            events=dict(self.stats),
            pickup=Histogram(
                bounds=PICKUP_BUCKETS,
                counts=tuple(self._pickup_counts),
                total=self._pickup_total,
            ),
        )

    def _pause(self) -> float:
        """Seconds until the first owned engine can do something new (at most ``tick_s``)."""
        now = self._clock()
        pause = min(self.tick_s, self._next_rebalance - time.monotonic())
        for owned in self.owned.values():
            wake = owned.engine.next_wakeup()
            if wake is not None:
                pause = min(pause, wake - now)
        return max(pause, 0.0)

    def _group(self, owned: _Owned) -> None:
        """Open the partition's group if it is not open yet."""
        if not owned.store.holding:
            owned.store.begin_hold()
            owned.held_since = time.monotonic()

    def _heartbeat(self, mono: float) -> None:
        try:
            held = self.coordinator.heartbeat(
                self.id, self.lease_s, {p: o.epoch for p, o in self.owned.items()}
            )
        except StoreError as exc:
            # The server cannot be reached: leases run out locally and the
            # partitions are dropped before anyone else may take them.
            self._log.warning("sessionfsm.heartbeat_failed", worker=self.id, error=str(exc))
            self._count("heartbeat_failed")
            self._next_heartbeat = mono + min(self.heartbeat_s, 0.5)
            return
        self._next_heartbeat = mono + self.heartbeat_s
        for p in list(self.owned):
            if p in held:
                self.owned[p].valid_until = mono + self.lease_s
            else:
                self._drop(p, "lease_lost")

    def _rebalance(self) -> None:
        self._next_rebalance = float("inf")  # the next heartbeat rebalances anyway
        try:
            live = self.coordinator.live_workers()
        except StoreError:
            return
        if self.id not in live:
            live.append(self.id)
        mine = assign(live, self.partitions)[self.id]
        for p in sorted(set(self.owned) - mine):
            self._drop(p, "rebalanced", release=True)
        for p in sorted(mine - set(self.owned)):
            self._acquire(p)
        # Look again as soon as another worker or a wanted lease could expire.
        try:
            due = self.coordinator.next_change_s(self.id, mine - set(self.owned))
        except StoreError:
            return
        if due is not None:
            self._next_rebalance = time.monotonic() + due + _EXPIRY_SLACK_S

    def _acquire(self, p: int) -> None:
        asked = time.monotonic()
        try:
            epoch = self.coordinator.acquire(p, self.id, self.lease_s)
        except StoreError:
            return
        if epoch is None:
            return  # still held by its last owner, until it expires or is given back
        store: PostgresStore | None = None
        try:
            store = PostgresStore(
                self.dsn,
                schema=self.schema,
                partition=p,
                lease=Lease(owner=self.id, epoch=epoch),
                history_retention=self._retention,
                synchronous_commit=self._sync_commit,
            )
            engine = Engine(self.policy, store=store, log=self._logging)
        except StoreError as exc:
            self._log.warning("sessionfsm.acquire_failed", partition=p, error=str(exc))
            if store is not None:
                store.close()
            with contextlib.suppress(StoreError):
                self.coordinator.release(p, self.id, epoch)
            return
        self.owned[p] = _Owned(engine, store, epoch, asked + self.lease_s)
        self._woken.add(p)
        self._count("acquired")
        self._log.info(
            "sessionfsm.partition_acquired",
            worker=self.id,
            partition=p,
            epoch=epoch,
            sessions=len(engine),
            recovered=engine.sessions_by_state(),
        )

    def _drop(self, p: int, why: str, *, release: bool = False) -> None:
        owned = self.owned.pop(p, None)
        if owned is None:
            return
        store = owned.store
        if store.holding:
            # Unwritten work of a partition given up: the store keeps the
            # sessions as it had them, and the next owner sends them again.
            self._count("unwritten_discarded", store.held_changes)
            store.drop_held()
        try:
            store.settle()  # a background write still on its way
        except StoreFenced as exc:
            self._refused(p, exc)
        except StoreError:
            pass  # the partition is given up either way
        store.close()
        if release:
            with contextlib.suppress(StoreError):
                self.coordinator.release(p, self.id, owned.epoch)
        self._count(f"dropped_{why}")
        self._log.info(
            "sessionfsm.partition_dropped", worker=self.id, partition=p, epoch=owned.epoch, why=why
        )

    def _valid(self, p: int) -> bool:
        owned = self.owned.get(p)
        if owned is None:
            return False
        if time.monotonic() >= owned.valid_until:
            self._drop(p, "lease_expired")
            return False
        return True

    def _drain_inbox(self) -> None:
        mono = time.monotonic()
        woken, self._woken = self._woken, set()
        if mono >= self._next_poll:
            # NOTIFY is an optimisation: poll now and then, for a lost notification.
            self._next_poll = mono + max(self.tick_s * 10, 1.0)
            with contextlib.suppress(StoreError):
                woken |= self.coordinator.waiting()
        for p in sorted(woken & set(self.owned)):
            if not self._valid(p):
                continue
            try:
                # The rows a write deletes must be gone before the inbox is read again.
                self.owned[p].store.settle()
            except StoreError as exc:
                self._lost(p, exc)
                continue
            try:
                rows = self.coordinator.inbox(p, self.inbox_limit)
            except StoreError:
                continue
            if not rows:
                continue
            owned = self.owned[p]
            now = self._clock()
            try:
                # The rows are deleted by the write that records their effect,
                # so that write comes before the next read of the inbox.
                self._group(owned)
                owned.store.consume_inbox([r[0] for r in rows])
                self._apply_inbox(p, owned.engine, rows, now)
                owned.store.write_held()
            except StoreError as exc:
                self._lost(p, exc)
                continue
            self._count("commits")
            for row in rows:
                self._picked_up(row[3])
            self._count("enqueued", len(rows))
            if len(rows) == self.inbox_limit:
                self._woken.add(p)  # more waiting

    def _picked_up(self, seconds: float) -> None:
        self.pickup_latencies.append(seconds)
        self._pickup_counts[bisect.bisect_left(PICKUP_BUCKETS, seconds)] += 1
        self._pickup_total += seconds

    def _apply_inbox(self, p: int, engine: Engine, rows: list[InboxRow], now: float) -> None:
        """Apply partition ``p``'s inbox rows in order, a run of enqueues in one lane at once.

        A row the engine refuses (a session id, lane or partition that some
        other writer put in the table) is logged as
        ``sessionfsm.inbox_row_refused`` and consumed with the rest, so it
        cannot stop the partition.
        """
        good: list[InboxRow] = []
        for row in rows:
            seq, sid, lane, _age = row
            problem = session_id_problem(sid)
            if problem is None and partition_of(sid, self.partitions) != p:
                problem = f"session belongs to partition {partition_of(sid, self.partitions)}"
            if problem is None and lane != "redrive" and lane not in _LANE_NAMES:
                problem = f"unknown lane {lane!r}"
            if problem is None:
                good.append(row)
                continue
            self._count("inbox_refused")
            self._log.warning(
                "sessionfsm.inbox_row_refused", partition=p, seq=seq, lane=lane, error=problem
            )
        i = 0
        while i < len(good):
            lane = good[i][2]
            j = i + 1
            while j < len(good) and good[j][2] == lane:
                j += 1
            ids = [r[1] for r in good[i:j]]
            i = j
            if lane != "redrive":
                engine.enqueue_many(ids, lane, now=now)
                continue
            for sid in ids:
                try:
                    engine.redrive(sid, now)
                except UsageError as exc:  # unknown, or not dead-lettered
                    self._count("redrive_ignored")
                    self._log.info("sessionfsm.redrive_ignored", session_id=sid, why=str(exc))

    def _tick(self, p: int) -> bool:
        """Tick partition ``p`` and send its batches into its open group; True if it sent."""
        if not self._valid(p):
            return False
        owned = self.owned[p]
        engine = owned.engine
        sent = False
        try:
            # Kept in the partition's group (see flush()). A crash before the
            # group is written leaves these sessions as the store last had
            # them, so the next owner sends them again (at least once; the
            # relay deduplicates on the idempotency key); a fenced write drops
            # the whole partition.
            self._group(owned)
            for batch in engine.tick(self._clock()):
                if not self._valid(p):
                    return sent  # lost while sending: send nothing more for it
                self._count("sent")
                sent = True
                answer = self._send(p, owned.epoch, batch)
                if answer is None:
                    continue  # no answer: the engine times the batch out at its deadline
                try:
                    engine.on_ack(batch.id, answer, self._clock())
                except (InvalidAck, UsageError) as exc:
                    self._invalid(p, batch, exc)
        except StoreError as exc:
            self._lost(p, exc)
        return sent

    def _send(self, p: int, epoch: int, batch: Batch) -> AckResult | None:
        """``send``'s answer; ``RelayUnavailable`` if it could not reach the relay,
        None (logged) if it failed otherwise, as the asyncio runner does."""
        try:
            return self.send(p, epoch, batch)
        except InvalidAck as exc:  # the relay's answer could not be read
            self._invalid(p, batch, exc)
            return None
        except Exception as exc:
            if means_unavailable(exc):
                return acks.RelayUnavailable()
            self._count("send_failed")
            self._log.error(
                "sessionfsm.send_failed",
                worker=self.id,
                partition=p,
                batch_id=batch.id,
                error=repr(exc),
                exc_info=True,
            )
            return None

    def _invalid(self, p: int, batch: Batch, exc: Exception) -> None:
        """A malformed answer: logged, and the batch left to time out."""
        self._count("invalid_ack")
        self._log.warning(
            "sessionfsm.invalid_ack", worker=self.id, partition=p, batch_id=batch.id, error=str(exc)
        )

    def _refused(self, p: int, exc: StoreFenced) -> None:
        """The server refused a write of ``p``: this worker lost it (stat ``fenced``)."""
        self._count("fenced")
        self._log.warning("sessionfsm.write_fenced", worker=self.id, partition=p, error=str(exc))

    def _lost(self, p: int, exc: StoreError) -> None:
        why = "fenced" if isinstance(exc, StoreFenced) else "store_error"
        if isinstance(exc, StoreFenced):
            self._refused(p, exc)
        self._log.warning("sessionfsm.partition_lost", worker=self.id, partition=p, error=str(exc))
        self._drop(p, why, release=not isinstance(exc, StoreFenced))
        self._next_heartbeat = 0.0  # rebalance at once: take it back if it is still ours

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early on a producer's NOTIFY."""
        conn = self._listen
        if conn is None or conn.closed:
            try:
                conn = psycopg.connect(
                    self.dsn, autocommit=True, application_name="sessionfsm-listen"
                )
                conn.execute(f'LISTEN "{self.coordinator.channel}"')
            except psycopg.Error:
                time.sleep(seconds)
                return
            self._listen = conn
        try:
            for note in conn.notifies(timeout=seconds, stop_after=1):
                for part in note.payload.split(","):
                    if part.isdigit():
                        self._woken.add(int(part))
        except psycopg.Error:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            self._listen = None


class HttpSender:
    """Posts each batch as JSON to a relay URL: a worker's blocking ``send``.

    The body is ``{"partition", "epoch", "batch_id", "sessions": [ids]}``;
    the epoch is the fencing token, for a relay that refuses a superseded
    owner. The reply status means what it means for
    :class:`~sessionfsm.transports.http.HttpTransport`
    (:data:`~sessionfsm.transports.status.STATUS_TABLE`): a 2xx body holds the
    acks (empty: ``Ok`` for every session), 408 is ``AckTimeout``, 413
    ``PayloadTooLarge``, 429 ``RateLimited`` with its ``Retry-After`` (capped
    at ``retry_after_cap_s``), 502/503/504 ``RelayUnavailable``, 401/403
    ``RelayUnavailable`` with an error log (the relay refuses *us*). 409 is a
    relay refusing a superseded epoch: ``RelayUnavailable``, charged to
    nobody. Any other status leaves the batch unanswered, to time out; a
    refused connection or a timeout is ``ConnectionError``; a 2xx body that
    is not an answer is ``InvalidAck`` (the worker logs both).

    Built on the standard library (one connection per batch), so a worker
    needs no HTTP client library; a service that wants keep-alive, TLS
    settings or auth passes its own ``send``.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, retry_after_cap_s: float = 3600.0):
        self.url = url
        self.timeout = timeout
        self.retry_after_cap_s = retry_after_cap_s
        self._log = get_logger(True)

    def __call__(self, partition: int, epoch: int, batch: Batch) -> AckResult:
        body = json.dumps(
            {
                "partition": partition,
                "epoch": epoch,
                "batch_id": batch.id,
                "sessions": list(batch.session_ids),
            }
        ).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return self.answer(batch, reply.status, _lower(reply.headers), reply.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return self.answer(batch, exc.code, _lower(exc.headers), exc.read())
        except (urllib.error.URLError, OSError) as exc:
            raise ConnectionError(str(exc)) from exc

    def answer(
        self, batch: Batch, status: int, headers: Mapping[str, str], content: bytes
    ) -> AckResult:
        """The batch's answer from one reply (``headers`` with lower-case names);
        ``InvalidAck`` for an unreadable 2xx body."""
        if status == 409:
            return acks.RelayUnavailable()  # a superseded epoch: this owner is gone
        outcome = outcome_of(status)
        if outcome == "body":
            if not content.strip():
                return acks.Ok()
            message = acks.decode_message(content)
            payload = message.ack if message.ack is not None else message.sessions
            if payload is None:
                raise InvalidAck(
                    f"batch {batch.id}: the relay's answer has neither ack nor sessions"
                )
            return payload
        return answer_of_status(
            outcome,
            status,
            headers,
            content,
            batch_id=batch.id,
            now=time.time(),
            cap_s=self.retry_after_cap_s,
            log=self._log,
        )


def _lower(headers: Any) -> dict[str, str]:
    """A reply's headers by lower-case name."""
    return {str(k).lower(): str(v) for k, v in headers.items()} if headers is not None else {}
