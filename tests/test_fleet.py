"""Many workers on one PostgreSQL database: leases, fencing, takeover, the inbox.

The first tests drive ``Worker`` objects in this process (a worker that is not
stepped is exactly a stalled one). The process test runs real worker
processes against a real relay on 127.0.0.1 and kills, stops, adds and
disconnects them; what it asserts is read from the server's rows (the
fence's own log of refused saves among them), the relay's record and the
workers' final figures, and it prints the run's figures.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from sessionfsm import Policy, SessionState, acks
from sessionfsm._errors import InvalidAck, StoreFenced
from sessionfsm.engine import Batch
from sessionfsm.fleet import Coordinator, Producer, Worker, assign
from sessionfsm.postgres_store import PostgresStore, partition_of
from sessionfsm.testing import FakeClock
from tests.conftest import CannedHttp, RecordingRelay, batch_in_flight

POLICY = Policy(
    batch_size=50,
    incremental_interval_s=0.0,
    backfill_interval_s=0.0,
    tick_interval_s=0.05,
    ack_timeout_s=10.0,
)


def _sql(dsn: str, query: str, *params: Any) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def _until(condition: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    """Wait for ``condition``; a generous limit only guards against a hang."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


class Recorder:
    """An in-process relay: answers Ok and records (worker, partition, epoch, sessions)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, int, tuple[str, ...]]] = []

    def sender(self, name: str) -> Callable[[int, int, Batch], acks.Ack]:
        def send(partition: int, epoch: int, batch: Batch) -> acks.Ack:
            self.sent.append((name, partition, epoch, batch.session_ids))
            return acks.Ok()

        return send


def _worker(dsn: str, schema: str, send: Any, name: str, **kw: Any) -> Worker:
    kw.setdefault("lease_s", 5.0)
    kw.setdefault("log", False)
    return Worker(dsn, send, schema=schema, policy=POLICY, worker_id=name, tick_s=0.05, **kw)


def _assert_epochs_only_grow(dsn: str, schema: str) -> int:
    """From the server's rows: along each partition's history, the writing epoch
    never goes back, and every epoch that wrote was granted in the lease log."""
    rows = _sql(dsn, f'SELECT partition, epoch FROM "{schema}".history ORDER BY seq')
    granted = set(_sql(dsn, f'SELECT partition, epoch FROM "{schema}".lease_log'))
    last: dict[int, int] = {}
    for partition, epoch in rows:
        assert epoch >= last.get(partition, 0), f"partition {partition}: epoch {epoch} wrote late"
        assert (partition, epoch) in granted, (partition, epoch)
        last[partition] = epoch
    return len(rows)


# ---------------------------------------------------------------------------
# In this process
# ---------------------------------------------------------------------------


def test_assign_spreads_partitions_evenly_and_the_same_for_everyone() -> None:
    """Every partition goes to exactly one live worker, at most one apart in count,
    whatever order the ids come in."""
    for workers in (["a"], ["c", "a", "b"], ["d", "b", "a", "c"]):
        got = assign(workers, 8)
        assert got == assign(list(reversed(workers)), 8)
        owned = [p for ps in got.values() for p in ps]
        assert sorted(owned) == list(range(8))
        sizes = [len(ps) for ps in got.values()]
        assert max(sizes) - min(sizes) <= 1
    assert assign([], 4) == {}


def test_producers_enqueue_from_anywhere_and_the_owner_syncs_them(
    pg_dsn: str, pg_schema: str
) -> None:
    """Sessions a producer enqueues reach their partition's owner through the inbox,
    are synced, and leave the inbox in the same transaction."""
    relay = Recorder()
    worker = _worker(pg_dsn, pg_schema, relay.sender("w1"), "w1", partitions=4)
    with Producer(pg_dsn, schema=pg_schema) as producer:
        ids = [f"s{i}" for i in range(120)]
        producer.enqueue(ids)
        for _ in range(20):
            worker.step()
        reader = PostgresStore(pg_dsn, schema=pg_schema, readonly=True, partition=None)
        assert reader.sessions_by_state()[SessionState.SYNCED] == 120
        assert reader.inbox_depth() == 0
        assert sorted(sid for *_, sids in relay.sent for sid in sids) == sorted(ids)
        assert {p for _, p, _, _ in relay.sent} == {0, 1, 2, 3}
        assert len(worker.pickup_latencies) == 120
        producer.enqueue(["s1"])  # changed again: synced -> queued -> synced
        for _ in range(3):
            worker.wait(0.5)  # the producer's NOTIFY wakes it
            worker.step()
        assert [c.event for c in reader.history("s1")][-3:] == ["changed", "sent", "acked"]
        leases = reader.leases()
        assert {lease.owner for lease in leases} == {"w1"}
        assert all(lease.expires_in_s is not None and lease.expires_in_s > 0 for lease in leases)
        assert [w.id for w in reader.workers() if w.alive] == ["w1"]
        reader.close()
    worker.stop()


def test_a_workers_figures_are_scraped_as_prometheus_metrics(
    pg_dsn: str,
    pg_schema: str,
    parse_exposition: Callable[[str], dict[tuple[str, frozenset[tuple[str, str]]], float]],
) -> None:
    """FleetMetrics serves the worker's own figures over real HTTP: partitions
    owned, sessions by state, what it did (commits, enqueues, drops) and the
    enqueue-to-pickup histogram, agreeing with the worker and the server."""
    import urllib.request

    from prometheus_client import CollectorRegistry

    from sessionfsm.metrics.prometheus import FLEET_METRIC_NAMES, FleetMetrics

    relay = Recorder()
    worker = _worker(pg_dsn, pg_schema, relay.sender("w1"), "w1", partitions=4)
    metrics = FleetMetrics(worker, registry=CollectorRegistry())

    def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with (
            metrics.serve(port=0) as server,
            urllib.request.urlopen(server.url, timeout=10) as response,
        ):
            return parse_exposition(response.read().decode())

    def value(samples: dict[Any, float], name: str, **labels: str) -> float:
        return samples[name, frozenset(labels.items())]

    before = scrape()
    assert value(before, "sessionfsm_fleet_partitions_owned") == 0
    assert value(before, "sessionfsm_fleet_pickup_seconds_count") == 0
    with Producer(pg_dsn, schema=pg_schema) as producer:
        producer.enqueue(f"s{i}" for i in range(30))
        for _ in range(20):
            worker.step()
    samples = scrape()
    names = {name for name, _ in samples}
    for family in FLEET_METRIC_NAMES:
        assert any(n == family or n.startswith(family + "_") for n in names), family
    assert value(samples, "sessionfsm_fleet_partitions_owned") == 4
    assert value(samples, "sessionfsm_fleet_sessions", state="synced") == 30
    assert value(samples, "sessionfsm_fleet_sessions", state="queued") == 0
    assert value(samples, "sessionfsm_fleet_events_total", kind="enqueued") == 30
    assert value(samples, "sessionfsm_fleet_events_total", kind="acquired") == 4
    assert (
        value(samples, "sessionfsm_fleet_events_total", kind="commits") == worker.stats["commits"]
    )
    assert value(samples, "sessionfsm_fleet_pickup_seconds_count") == 30
    assert value(samples, "sessionfsm_fleet_pickup_seconds_sum") == pytest.approx(
        sum(worker.pickup_latencies)
    )
    assert value(samples, "sessionfsm_fleet_pickup_seconds_bucket", le="+Inf") == 30
    reader = PostgresStore(pg_dsn, schema=pg_schema, readonly=True, partition=None)
    assert reader.sessions_by_state()[SessionState.SYNCED] == 30
    reader.close()
    worker.stop()
    after = scrape()
    assert value(after, "sessionfsm_fleet_partitions_owned") == 0
    assert value(after, "sessionfsm_fleet_events_total", kind="dropped_stopping") == 4
    assert value(after, "sessionfsm_fleet_sessions", state="synced") == 0
    metrics.close()


def test_a_send_that_fails_or_answers_garbage_does_not_stop_the_worker(
    pg_dsn: str, pg_schema: str, logs: list[dict[str, Any]]
) -> None:
    """A send that raises an error other than "unreachable", or answers something
    that is not an ack, is logged and counted and its batch times out at its
    deadline; an unreachable relay is RelayUnavailable. The worker goes on, and
    every session is synced in the end, none dead-lettered."""
    clock = FakeClock(1000.0)
    calls: list[tuple[str, ...]] = []

    def send(_partition: int, _epoch: int, batch: Batch) -> Any:
        calls.append(batch.session_ids)
        if len(calls) == 1:
            raise ValueError("a bug in the service's send")
        if len(calls) == 2:
            return "ok"  # not an ack
        if len(calls) == 3:
            raise ConnectionRefusedError("the relay is down")
        return acks.Ok()

    worker = _worker(pg_dsn, pg_schema, send, "w1", partitions=1, clock=clock, log=True)
    with Producer(pg_dsn, schema=pg_schema) as producer:
        producer.enqueue([f"s{i}" for i in range(5)])
    worker.step()
    assert worker.figures().sessions["in_flight"] == 5  # the failed send: no answer
    for _ in range(30):
        if worker.figures().sessions["synced"] == 5:
            break
        clock.advance(POLICY.ack_timeout_s + 1)  # past every deadline and pause
        worker.step()
    assert worker.figures().sessions == {
        "queued": 0,
        "in_flight": 0,
        "backoff": 0,
        "synced": 5,
        "dead_lettered": 0,
    }
    assert worker.stats["send_failed"] == 1
    assert worker.stats["invalid_ack"] == 1
    events = [e["event"] for e in logs]
    assert events.count("sessionfsm.send_failed") == 1
    assert events.count("sessionfsm.invalid_ack") == 1
    assert "sessionfsm.link_paused" in events  # the refused connection
    worker.stop()


def test_http_sender_maps_replies_as_the_http_transport_does(
    canned_http: CannedHttp, logs: list[dict[str, Any]]
) -> None:
    """HttpSender posts the batch with its partition and epoch and maps each reply
    status by the HTTP transport's table: a culprit's 413 and a 429 reach the
    blame rules as such, and nothing the relay sends is taken as a crash."""
    from sessionfsm.fleet import HttpSender

    _, batch = batch_in_flight(("a", "b"))
    ok = acks.encode(acks.BatchAck(batch_id=batch.id, ack=acks.Ok()))
    per_session = acks.encode(
        acks.BatchAck(batch_id=batch.id, sessions={"a": acks.Ok(), "b": acks.AckTimeout()})
    )
    canned_http.replies = [
        (200, {}, ok),
        (200, {}, per_session),
        (204, {}, b""),
        (408, {}, b""),
        (413, {}, b"too large"),
        (429, {"Retry-After": "7"}, b""),
        (503, {}, b""),
        (409, {}, b"superseded epoch"),
        (401, {}, b""),
        (418, {}, b""),
    ]
    send = HttpSender(canned_http.url, timeout=10)
    got = [send(3, 5, batch) for _ in range(len(canned_http.replies))]
    assert got == [
        acks.Ok(),
        {"a": acks.Ok(), "b": acks.AckTimeout()},
        acks.Ok(),
        acks.AckTimeout(),
        acks.PayloadTooLarge(),
        acks.RateLimited(retry_after_s=7.0),
        acks.RelayUnavailable(),
        acks.RelayUnavailable(),
        acks.RelayUnavailable(),
        {},
    ]
    assert json.loads(canned_http.bodies[0]) == {
        "partition": 3,
        "epoch": 5,
        "batch_id": batch.id,
        "sessions": ["a", "b"],
    }
    events = [e["event"] for e in logs]
    assert events == ["sessionfsm.http_refused", "sessionfsm.http_unexpected_status"]
    canned_http.replies = [(200, {}, b"{not json"), (200, {}, b'{"batch_id": 1}')]
    for _ in range(2):
        with pytest.raises(InvalidAck):
            send(3, 5, batch)
    canned_http.close()
    with pytest.raises(ConnectionError):
        send(3, 5, batch)


def test_a_stalled_worker_is_fenced_drops_its_partitions_and_sends_nothing(
    pg_dsn: str, pg_schema: str
) -> None:
    """A worker silent past its lease loses its partitions to another; when it runs
    again it notices, drops them without sending, and any save it tries is refused."""
    relay = Recorder()
    w1 = _worker(pg_dsn, pg_schema, relay.sender("w1"), "w1", partitions=2, lease_s=0.4)
    w1.step()
    assert set(w1.owned) == {0, 1}
    old = w1.owned[0]
    with Producer(pg_dsn, schema=pg_schema) as producer:
        producer.enqueue([f"s{i}" for i in range(40)])
    time.sleep(0.6)  # w1 is "stopped": no heartbeat, its leases run out
    w2 = _worker(pg_dsn, pg_schema, relay.sender("w2"), "w2", lease_s=0.4)
    w2.step()
    assert set(w2.owned) == {0, 1}
    assert w2.owned[0].epoch == old.epoch + 1
    sent_before = len(relay.sent)
    mine = next(f"x{i}" for i in range(100) if partition_of(f"x{i}", 2) == 0)
    with pytest.raises(StoreFenced):
        old.engine.enqueue(mine, now=time.time())
    w1.step()  # wakes up
    assert w1.owned == {}
    assert any(k.startswith("dropped_lease") or k == "dropped_fenced" for k in w1.stats)
    assert all(name == "w2" for name, *_ in relay.sent[sent_before:])
    for _ in range(10):
        w2.step()
        w1.step()
    assert _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".session WHERE state = %s', "synced")
    assert _sql(pg_dsn, f'SELECT DISTINCT owner FROM "{pg_schema}".part') == [("w2",)]
    _assert_epochs_only_grow(pg_dsn, pg_schema)
    w1.stop()
    w2.stop()


def test_a_dead_workers_partitions_are_taken_when_its_lease_expires_not_at_a_heartbeat(
    pg_dsn: str, pg_schema: str
) -> None:
    """A survivor looks again the moment the dead worker's row and leases expire,
    so takeover does not wait for its own next heartbeat (here never due)."""
    relay = Recorder()
    w1 = _worker(pg_dsn, pg_schema, relay.sender("w1"), "w1", partitions=4, lease_s=0.5)
    w2 = _worker(pg_dsn, pg_schema, relay.sender("w2"), "w2", lease_s=0.5, heartbeat_s=60.0)
    w1.step()
    w2.step()  # joins: its share is still w1's
    assert set(w1.owned) == {0, 1, 2, 3}
    assert w2.owned == {}
    # w1 dies (is never stepped again); w2 runs with no heartbeat due for a minute.
    w2.run(until=lambda: set(w2.owned) == {0, 1, 2, 3}, max_seconds=10.0)
    owners = _sql(pg_dsn, f'SELECT DISTINCT owner FROM "{pg_schema}".part')
    assert owners == [("w2",)]
    assert w2.stats["acquired"] == 4


def _history_per_transaction(dsn: str, schema: str) -> list[int]:
    """From the server: how many ``sent``/``acked`` history rows each transaction wrote."""
    rows = _sql(
        dsn,
        f"SELECT count(*) FROM \"{schema}\".history WHERE event IN ('sent', 'acked') "
        "GROUP BY xmin::text",
    )
    return sorted(n for (n,) in rows)


@pytest.mark.parametrize(
    ("interval_s", "max_changes"), [(0.0, 5000), (60.0, 100), (60.0, 1_000_000)]
)
def test_a_busy_worker_groups_its_writes_and_writes_all_before_it_sleeps(
    pg_dsn: str, pg_schema: str, interval_s: float, max_changes: int
) -> None:
    """While busy, each partition's ticks are kept and written as one transaction when
    the group is commit_interval_s old or holds commit_max_changes transitions; before
    the worker sleeps it writes everything. Every session ends synced either way."""
    policy = Policy(batch_size=10, incremental_interval_s=0.0, tick_interval_s=0.05)
    ids = [f"g{i}" for i in range(400)]
    Coordinator(pg_dsn, schema=pg_schema, partitions=2).close()
    with Producer(pg_dsn, schema=pg_schema) as producer:
        producer.enqueue(ids)
    relay = Recorder()
    worker = Worker(
        pg_dsn,
        relay.sender("w1"),
        schema=pg_schema,
        policy=policy,
        worker_id="w1",
        log=False,
        lease_s=30.0,
        commit_interval_s=interval_s,
        commit_max_changes=max_changes,
    )
    worker.run(until=lambda: worker.stats.get("sent", 0) >= 40 and not _busy(worker))
    synced = f"SELECT count(*) FROM \"{pg_schema}\".session WHERE state = 'synced'"
    assert _sql(pg_dsn, synced) == [(400,)]
    per_partition = [sum(partition_of(i, 2) == p for i in ids) for p in (0, 1)]
    # Each session sent once, in batches of 10 per partition.
    assert len(relay.sent) == sum(-(-n // 10) for n in per_partition)
    groups = _history_per_transaction(pg_dsn, pg_schema)
    assert sum(groups) == 800
    if interval_s == 0:
        # Written every turn: one batch sent and acked per transaction.
        assert groups == sorted(2 * len(sids) for *_, sids in relay.sent)
        assert worker.stats["commits"] >= len(relay.sent)
    elif max_changes == 100:
        # Written when a group reaches 100: five turns of one batch each.
        assert max(groups) <= 100
        assert len(groups) <= sum(-(-2 * n // 100) for n in per_partition)
    else:
        # One group per partition, written when the worker went idle.
        assert groups == sorted(2 * n for n in per_partition)
        assert worker.stats["commits"] <= 6  # the inbox, the group, the last turn


def _busy(worker: Worker) -> bool:
    """Whether any owned engine still has sessions to send."""
    return any(o.engine.sessions_by_state()[SessionState.QUEUED] for o in worker.owned.values())


def test_the_group_hold_api_keeps_counts_drops_and_writes_in_the_background(
    pg_dsn: str, pg_schema: str
) -> None:
    """begin_hold / write_held / drop_held: held saves are counted, written as one
    transaction (now, or in the background), or dropped writing nothing; a refused
    background write raises at the next use of the store; misuse is a UsageError."""
    from sessionfsm import Engine, UsageError

    store = PostgresStore(pg_dsn, schema=pg_schema)
    engine = Engine(POLICY, store=store, log=False)
    with pytest.raises(UsageError):
        store.write_held()
    store.begin_hold()
    with pytest.raises(UsageError):
        store.begin_hold()
    engine.enqueue_many(["a", "b"], now=1.0)
    assert store.holding
    assert store.held_changes == 2
    store.drop_held()
    assert not store.holding
    assert store.held_changes == 0
    assert _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".history') == [(0,)]
    store.begin_hold()
    engine.enqueue("c", now=2.0)
    engine.enqueue("d", now=2.0)
    store.write_held()
    rows = _sql(pg_dsn, f'SELECT count(DISTINCT xmin::text), count(*) FROM "{pg_schema}".history')
    assert rows == [(1, 2)]
    # In the background: the caller goes on; the next use of the store waits for it.
    store.begin_hold()
    engine.enqueue("e", now=3.0)
    store.write_held(wait=False)
    assert engine.session("e").state is SessionState.QUEUED
    assert [c.event for c in store.history("e")] == ["enqueued"]  # waited for the write
    assert not store.writing
    # A background write the fence refuses raises at the next use, and writes nothing.
    _sql(pg_dsn, f'UPDATE "{pg_schema}".part SET epoch = epoch + 1')
    store.begin_hold()
    engine.enqueue("f", now=4.0)
    store.write_held(wait=False)
    with pytest.raises(StoreFenced):
        store.settle()
    store.settle()  # reported once
    assert _sql(pg_dsn, f'SELECT changes FROM "{pg_schema}".fence_log') == [(1,)]
    assert _sql(pg_dsn, f"SELECT count(*) FROM \"{pg_schema}\".history WHERE session_id = 'f'") == [
        (0,)
    ]
    store.begin_hold()
    engine.enqueue("g", now=5.0)
    store.write_held(wait=False)
    store.close()  # waits for it; its refusal is not raised from close
    assert _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".fence_log') == [(2,)]


def test_a_group_refused_by_the_fence_is_dropped_whole_and_resent_by_the_new_owner(
    pg_dsn: str, pg_schema: str
) -> None:
    """A worker that still believes it holds a partition (its clock says so) but has
    lost it on the server has its whole held group refused: the server records the
    refusal with the group's size, no row of the old epoch is written, and the new
    owner recovers those sessions from the store and sends them again."""
    relay = Recorder()
    ids = [f"f{i}" for i in range(30)]
    Coordinator(pg_dsn, schema=pg_schema, partitions=1).close()
    with Producer(pg_dsn, schema=pg_schema) as producer:
        producer.enqueue(ids)
    w2 = _worker(pg_dsn, pg_schema, relay.sender("w2"), "w2")
    send_w1 = relay.sender("w1")
    taken: list[int] = []

    def send(partition: int, epoch: int, batch: Batch) -> acks.Ack:
        if not taken:
            # The server expires w1 and its lease early (as a skewed clock
            # would), and w2 takes the partition while w1 is mid-group.
            _sql(pg_dsn, f'UPDATE "{pg_schema}".worker SET expires_at = now() WHERE id = %s', "w1")
            _sql(pg_dsn, f'UPDATE "{pg_schema}".part SET expires_at = now()')
            w2.step()
            taken.append(w2.owned[0].epoch)
        return send_w1(partition, epoch, batch)

    policy = Policy(batch_size=10, incremental_interval_s=0.0, tick_interval_s=0.05)
    w1 = Worker(
        pg_dsn, send, schema=pg_schema, policy=policy, worker_id="w1", log=False, lease_s=30.0
    )
    w1.step()  # applies the inbox (written), then sends a batch into its group
    assert w1.owned == {}
    assert w1.stats["dropped_fenced"] == 1
    old_epoch = taken[0] - 1
    refused = _sql(pg_dsn, f'SELECT epoch, current_epoch, changes FROM "{pg_schema}".fence_log')
    assert refused == [(old_epoch, taken[0], 20)]  # ten sessions sent and acked
    first = relay.sent[0][3]
    for _ in range(10):
        w2.step()
    synced = f"SELECT count(*) FROM \"{pg_schema}\".session WHERE state = 'synced'"
    assert _sql(pg_dsn, synced) == [(30,)]
    assert sorted(name for name, *_, sids in relay.sent if first[0] in sids) == ["w1", "w2"]
    late = _sql(
        pg_dsn,
        f'SELECT count(*) FROM "{pg_schema}".history WHERE epoch = %s AND event <> %s',
        old_epoch,
        "enqueued",
    )
    assert late == [(0,)]
    _assert_epochs_only_grow(pg_dsn, pg_schema)
    w2.stop()


def test_inbox_rows_the_engine_refuses_are_logged_and_do_not_stop_the_partition(
    pg_dsn: str, pg_schema: str, logs: list[dict[str, Any]]
) -> None:
    """Rows another writer put in the inbox (an id too long, a wrong partition, an
    unknown lane) are refused one by one with ``sessionfsm.inbox_row_refused`` and
    consumed; the good rows around them sync. A producer refuses such an id itself."""
    from sessionfsm import UsageError
    from sessionfsm.validation import MAX_SESSION_ID_BYTES

    too_long = "x" * (MAX_SESSION_ID_BYTES + 1)
    other = next(f"o{i}" for i in range(100) if partition_of(f"o{i}", 2) == 1)
    mine = next(f"m{i}" for i in range(100) if partition_of(f"m{i}", 2) == 0)
    Coordinator(pg_dsn, schema=pg_schema, partitions=2).close()
    with Producer(pg_dsn, schema=pg_schema) as producer:
        with pytest.raises(UsageError, match="at most"):
            producer.enqueue([too_long])
        good = [f"k{i}" for i in range(40)]
        producer.enqueue(good[:20])
        _sql(
            pg_dsn,
            f'INSERT INTO "{pg_schema}".inbox (partition, session_id, lane) VALUES '
            "(0, %s, 'incremental'), (0, %s, 'incremental'), (0, %s, 'express')",
            too_long,
            other,
            mine,
        )
        producer.enqueue(good[20:])
    worker = Worker(
        pg_dsn, Recorder().sender("w1"), schema=pg_schema, policy=POLICY, worker_id="w1"
    )
    for _ in range(5):
        worker.step()
    worker.stop()
    synced = f"SELECT count(*) FROM \"{pg_schema}\".session WHERE state = 'synced'"
    assert _sql(pg_dsn, synced) == [(40,)]
    assert _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".inbox') == [(0,)]
    assert worker.stats["inbox_refused"] == 3
    refused = [e for e in logs if e["event"] == "sessionfsm.inbox_row_refused"]
    assert sorted(e["error"].split(" ")[0] for e in refused) == ["a", "session", "unknown"]


def test_a_leaving_worker_hands_over_at_once_and_a_joining_one_gets_a_share(
    pg_dsn: str, pg_schema: str
) -> None:
    """A second worker joining takes half the partitions once the first gives them
    back; when one stops, the other takes everything without waiting for a lease."""
    relay = Recorder()
    w1 = _worker(pg_dsn, pg_schema, relay.sender("w1"), "w1", partitions=4, lease_s=30.0)
    w1.step()
    w2 = _worker(pg_dsn, pg_schema, relay.sender("w2"), "w2", lease_s=30.0)
    w2.step()
    assert w2.owned == {}  # w1 still holds them
    w1._next_heartbeat = 0.0
    w1.step()  # sees w2, gives its share back
    w2._next_heartbeat = 0.0
    w2.step()
    assert len(w1.owned) == len(w2.owned) == 2
    w1.stop()
    w2._next_heartbeat = 0.0
    w2.step()
    assert set(w2.owned) == {0, 1, 2, 3}
    w2.stop()


# ---------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------

LEASE_S = 1.0


def _spawn(dsn: str, schema: str, relay: RecordingRelay, name: str) -> subprocess.Popen[str]:
    return _start_worker(dsn, schema, relay, name)[0]


def _start_worker(
    dsn: str, schema: str, relay: RecordingRelay, name: str, *extra: str
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A worker process (``python -m sessionfsm.fleet``), and its ready line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sessionfsm.fleet",
            "--dsn",
            dsn,
            "--schema",
            schema,
            "--relay",
            relay.url,
            "--lease-s",
            str(LEASE_S),
            "--tick-s",
            "0.05",
            "--batch-size",
            "50",
            "--worker-id",
            name,
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    assert ready["ready"] == name
    assert set(ready) == ({"ready", "metrics"} if "--metrics-port" in extra else {"ready"})
    return proc, ready


def _reap(procs: dict[str, subprocess.Popen[str]]) -> None:
    """Kill the worker processes a failed test left running (stopped ones too)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.communicate(timeout=30)


def test_workers_killed_stopped_added_and_disconnected_lose_nothing(
    pg_dsn: str, pg_schema: str, recording_relay: RecordingRelay, request: pytest.FixtureRequest
) -> None:
    """Three workers; one SIGKILLed, one SIGSTOPped past its lease with a save
    pending (the server refuses it), a fourth added, a store connection terminated
    by the server: every session ends synced at its latest version, none is lost,
    and no superseded epoch wrote."""
    app = f"{pg_schema}_app"
    rng = random.Random(16)
    Coordinator(pg_dsn, schema=pg_schema, partitions=8).close()  # the database, 8 partitions
    procs = {name: _spawn(pg_dsn, pg_schema, recording_relay, name) for name in "abc"}
    request.addfinalizer(lambda: _reap(procs))
    producer = Producer(pg_dsn, schema=pg_schema)
    ids = [f"doc{i}" for i in range(400)]
    routed = itertools.count()
    figures: dict[str, Any] = {"cores": os.cpu_count(), "sessions": len(ids)}

    def produce(n_new: int, n_changed: int) -> None:
        new = [ids.pop() for _ in range(min(n_new, len(ids)))]
        known = [r[0] for r in _sql(pg_dsn, f'SELECT id FROM "{app}".doc')]
        changed = rng.sample(known, min(n_changed, len(known)))
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for sid in new:
                conn.execute(f'INSERT INTO "{app}".doc VALUES (%s, 1)', (sid,))
            for sid in changed:
                conn.execute(f'UPDATE "{app}".doc SET version = version + 1 WHERE id = %s', (sid,))
        producer.enqueue(new + changed)

    def produce_to(partitions: set[int], n: int) -> None:
        """``n`` new sessions that belong to these partitions."""
        new: list[str] = []
        while len(new) < n:
            sid = f"to{next(routed)}"
            if partition_of(sid, producer.partitions) in partitions:
                new.append(sid)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            for sid in new:
                conn.execute(f'INSERT INTO "{app}".doc VALUES (%s, 1)', (sid,))
        producer.enqueue(new)

    def history_rows(leases: dict[int, int]) -> dict[tuple[int, int], int]:
        """History rows written under each of these (partition, epoch) leases."""
        rows = _sql(
            pg_dsn,
            f'SELECT partition, epoch, count(*) FROM "{pg_schema}".history GROUP BY 1, 2',
        )
        return {(p, e): n for p, e, n in rows if leases.get(p) == e}

    def refused(owner: str) -> list[tuple[int, int, int]]:
        """The saves of ``owner`` the server refused: (partition, epoch, epoch then)."""
        return _sql(
            pg_dsn,
            f'SELECT partition, epoch, current_epoch FROM "{pg_schema}".fence_log '
            "WHERE owner = %s ORDER BY seq",
            owner,
        )

    def owners() -> dict[int, tuple[str, int]]:
        rows = _sql(
            pg_dsn,
            f'SELECT partition, owner, epoch FROM "{pg_schema}".part '
            "WHERE expires_at > clock_timestamp()",
        )
        return {p: (o, e) for p, o, e in rows}

    _until(lambda: len(owners()) == producer.partitions, "every partition owned")
    for _ in range(5):
        produce(40, 10)
        time.sleep(0.1)

    # SIGKILL a mid-run: its partitions are taken over and recovered.
    killed = {p for p, (o, _) in owners().items() if o == "a"}
    assert killed
    procs["a"].kill()
    t0 = time.monotonic()
    produce(40, 20)
    _until(
        lambda: all(owners().get(p, ("a", 0))[0] != "a" for p in killed),
        "the killed worker's partitions taken over",
    )
    figures["takeover_after_sigkill_s"] = round(time.monotonic() - t0, 2)

    # SIGSTOP b while it waits on the relay for an answer, so the save of that
    # answer is pending; its partitions are taken over; on SIGCONT the save
    # reaches the server under b's old epoch and must be refused there.
    stopped = {p: e for p, (o, e) in owners().items() if o == "b"}
    assert stopped
    recording_relay.hold = set(stopped.items())
    produce_to(set(stopped), 10)
    assert recording_relay.holding.wait(timeout=60), "b sent no batch to hold"
    procs["b"].send_signal(signal.SIGSTOP)
    written_by_b = history_rows(stopped)
    produce(40, 30)
    _until(
        lambda: all(owners().get(p, ("b", 0))[0] != "b" for p in stopped),
        "the stopped worker's partitions taken over",
    )
    produce(40, 30)
    procs["b"].send_signal(signal.SIGCONT)
    recording_relay.release()
    _until(lambda: bool(refused("b")), "the server to refuse b's pending save")

    # A fourth worker joins; once the fleet is b, c and d, the server cuts the
    # store connection of one of c's partitions, and that partition gets work.
    procs["d"] = _spawn(pg_dsn, pg_schema, recording_relay, "d")
    produce(40, 30)
    _until(
        lambda: (
            len(owners()) == producer.partitions
            and {o for o, _ in owners().values()} == {"b", "c", "d"}
        ),
        "the partitions shared by b, c and d",
    )
    cut, (_, cut_epoch) = min((p, oe) for p, oe in owners().items() if oe[0] == "c")
    victims = _sql(
        pg_dsn,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
        "AND datname = current_database()",
        f"sessionfsm:p{cut}:c",
    )
    assert len(victims) == 1
    _sql(pg_dsn, "SELECT pg_terminate_backend(%s)", victims[0][0])
    figures["terminated_backends"] = len(victims)
    produce_to({cut}, 10)
    _until(
        lambda: owners().get(cut, ("", 0))[1] > cut_epoch,
        "the cut partition to be taken again under a new epoch",
    )
    assert owners()[cut][0] == "c"  # its own again: c dropped it, then took it back
    while ids:
        produce(40, 30)
        time.sleep(0.05)

    def settled() -> bool:
        docs = dict(_sql(pg_dsn, f'SELECT id, version FROM "{app}".doc'))
        synced = _sql(
            pg_dsn, f"SELECT count(*) FROM \"{pg_schema}\".session WHERE state = 'synced'"
        )[0][0]
        return synced == len(docs) and all(
            recording_relay.accepted.get(sid) == v for sid, v in docs.items()
        )

    _until(settled, "every session synced at its latest version", limit_s=90)
    stats: dict[str, dict[str, int]] = {}
    for name, proc in procs.items():
        if name == "a":
            proc.wait()
            continue
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, name
        stats[name] = json.loads(out.strip().splitlines()[-1])["stats"]
    producer.close()

    docs = dict(_sql(pg_dsn, f'SELECT id, version FROM "{app}".doc'))
    sessions = dict(_sql(pg_dsn, f'SELECT id, state FROM "{pg_schema}".session'))
    assert sessions.keys() == docs.keys()  # nothing lost
    assert set(sessions.values()) == {"synced"}
    assert all(recording_relay.accepted[sid] == v for sid, v in docs.items())
    assert _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".inbox') == [(0,)]
    written = _assert_epochs_only_grow(pg_dsn, pg_schema)
    # The fence fired on the server for b's pending save, in b's old epoch,
    # after the takeover; and nothing b wrote in those epochs landed after
    # it was stopped.
    fenced = refused("b")
    assert fenced
    assert all(stopped.get(p) == e and now > e for p, e, now in fenced), fenced
    assert history_rows(stopped) == written_by_b
    assert stats["b"].get("fenced", 0) >= 1, stats["b"]  # and b learnt of it
    # c's save on the cut connection failed clearly; c took the partition again.
    assert stats["c"].get("dropped_store_error", 0) >= 1, stats["c"]
    # d got a share.
    assert stats["d"].get("acquired", 0) > 0
    recovered = _sql(
        pg_dsn, f"SELECT count(*) FROM \"{pg_schema}\".history WHERE event = 'recovered'"
    )[0][0]
    figures.update(
        {
            "history_rows": written,
            "relay_batches": recording_relay.batches,
            "stale_batches_refused_by_relay": recording_relay.stale,
            "recovered_in_flight": recovered,
            "leases_granted": _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".lease_log')[0][0],
            "fenced_saves": _sql(pg_dsn, f'SELECT sum(fenced)::int FROM "{pg_schema}".part')[0][0],
            "fence_log": _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".fence_log')[0][0],
            "worker_stats": stats,
        }
    )
    print("fleet run:", json.dumps(figures, sort_keys=True))


def test_a_worker_process_serves_its_metrics(
    pg_dsn: str,
    pg_schema: str,
    recording_relay: RecordingRelay,
    parse_exposition: Callable[[str], dict[tuple[str, frozenset[tuple[str, str]]], float]],
) -> None:
    """``python -m sessionfsm.fleet --metrics-port 0`` names its metrics URL in its
    ready line and serves its figures there while it runs."""
    import urllib.request

    Coordinator(pg_dsn, schema=pg_schema, partitions=4).close()
    proc, ready = _start_worker(pg_dsn, pg_schema, recording_relay, "m", "--metrics-port", "0")
    try:
        assert ready["metrics"].startswith("http://127.0.0.1:")

        def owned() -> float:
            with urllib.request.urlopen(ready["metrics"], timeout=10) as response:
                samples = parse_exposition(response.read().decode())
            return samples["sessionfsm_fleet_partitions_owned", frozenset()]

        _until(lambda: owned() == 4, "the worker to report its 4 partitions")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert json.loads(out.splitlines()[-1])["stats"]["acquired"] == 4


def test_fleet_status_shows_leases_heartbeats_and_fencing(
    pg_dsn: str, pg_schema: str, sessionfsm_cli: Callable[..., Any]
) -> None:
    """``sessionfsm fleet status --dsn`` reports each lease's owner and epoch, the
    workers' heartbeats, fenced saves and the inbox, as a table or JSON."""
    relay = Recorder()
    worker = _worker(pg_dsn, pg_schema, relay.sender("w1"), "w1", partitions=2)
    worker.step()
    with Producer(pg_dsn, schema=pg_schema) as producer:
        producer.enqueue(["a", "b", "c"])
    result = sessionfsm_cli("fleet", "status", "--dsn", pg_dsn, "--schema", pg_schema, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(lease["owner"], lease["epoch"]) for lease in data["leases"]] == [("w1", 1)] * 2
    assert data["workers"][0]["id"] == "w1"
    assert data["workers"][0]["alive"] is True
    assert data["inbox"] == 3
    table = sessionfsm_cli("fleet", "status", "--dsn", pg_dsn, "--schema", pg_schema)
    assert "partition leases" in table.output
    assert "fenced" in table.output
    assert "inbox: 3" in table.output
    worker.stop()
    missing = sessionfsm_cli("fleet", "status", "--dsn", pg_dsn, "--schema", "nothing_here")
    assert missing.exit_code != 0
    assert "does not exist" in missing.output


def test_fleet_check_prints_the_trace_of_the_broken_variant(
    sessionfsm_cli: Callable[..., Any],
) -> None:
    """``sessionfsm fleet check --no-fencing`` fails and prints the violating trace."""
    result = sessionfsm_cli("fleet", "check", "--no-fencing", "--changes", "2")
    assert result.exit_code == 1
    assert "VIOLATED safety 1" in result.output
    assert "stall w0" in result.output


def test_a_redrive_request_is_applied_by_the_owner_while_it_runs(
    pg_dsn: str, pg_schema: str, sessionfsm_cli: Callable[..., Any]
) -> None:
    """``fleet redrive --dsn`` revives a dead letter through its running owner, which
    syncs it; an id that is not a dead letter is ignored and counted."""
    worker = _dead_letter_big(pg_dsn, pg_schema)
    reader = PostgresStore(pg_dsn, schema=pg_schema, readonly=True, partition=None)
    result = sessionfsm_cli(
        "fleet", "redrive", "--dsn", pg_dsn, "--schema", pg_schema, "big", "nobody"
    )
    assert result.exit_code == 0, result.output
    _until(
        lambda: (worker.step(), reader.session("big").state)[1] is SessionState.SYNCED,
        "the owner to redrive and sync big",
    )
    assert "redriven" in [c.event for c in reader.history("big")]
    _until(lambda: worker.stats["redrive_ignored"] == 1, "the unknown id to be ignored")
    reader.close()
    worker.stop()


def _dead_letter_big(pg_dsn: str, pg_schema: str) -> Worker:
    """A running worker whose relay refuses ``big`` (PayloadTooLarge) once and
    accepts everything else: ``a`` and ``b`` synced, ``big`` dead-lettered."""

    def send(partition: int, epoch: int, batch: Batch) -> acks.Ack | dict[str, acks.Ack]:
        if "big" in batch.session_ids and not send.refused:  # type: ignore[attr-defined]
            send.refused = True  # type: ignore[attr-defined]
            return {
                sid: acks.PayloadTooLarge() if sid == "big" else acks.Ok()
                for sid in batch.session_ids
            }
        return acks.Ok()

    send.refused = False  # type: ignore[attr-defined]
    worker = _worker(pg_dsn, pg_schema, send, "w1", partitions=2)
    reader = PostgresStore(pg_dsn, schema=pg_schema, readonly=True, partition=None)
    with Producer(pg_dsn, schema=pg_schema) as producer:
        producer.enqueue(["a", "b", "big"])
    _until(
        lambda: (worker.step(), reader.sessions_by_state())[1].get(SessionState.DEAD_LETTERED) == 1,
        "big to be dead-lettered",
    )
    reader.close()
    return worker


def test_operating_commands_read_a_fleet_with_dsn(
    pg_dsn: str, pg_schema: str, sessionfsm_cli: Callable[..., Any]
) -> None:
    """``status``, ``dead-letters`` and ``history`` take ``--dsn`` and read every
    partition of a fleet's database beside a running worker, never naming the DSN."""
    worker = _dead_letter_big(pg_dsn, pg_schema)
    where = ("--dsn", pg_dsn, "--schema", pg_schema)
    status = sessionfsm_cli("status", *where, "--json")
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert data["schema"] == pg_schema
    assert data["counts"]["dead_lettered"] == 1
    assert data["sessions"] == 3
    dead = json.loads(sessionfsm_cli("dead-letters", *where, "--json").output)
    assert [(s["id"], s["reason"]) for s in dead["sessions"]] == [("big", "PayloadTooLarge")]
    history = json.loads(sessionfsm_cli("history", "big", *where, "--json").output)
    assert history["session"]["state"] == "dead_lettered"
    assert [c["event"] for c in history["history"]][-1] == "rejected"
    table = sessionfsm_cli("status", *where)
    assert table.exit_code == 0, table.output
    assert f"postgresql schema '{pg_schema}'" in table.output
    assert pg_dsn not in table.output + status.output
    worker.stop()


def test_redrive_with_dsn_goes_through_the_running_owner(
    pg_dsn: str, pg_schema: str, sessionfsm_cli: Callable[..., Any]
) -> None:
    """``redrive --dsn`` asks each dead letter's owner through the inbox while the
    worker runs; the owner revives and syncs it, and its lease is never bypassed."""
    worker = _dead_letter_big(pg_dsn, pg_schema)
    where = ("--dsn", pg_dsn, "--schema", pg_schema)
    refused = sessionfsm_cli("redrive", "a", *where)
    assert refused.exit_code == 2
    assert "not dead-lettered (it is synced)" in refused.output
    result = sessionfsm_cli("redrive", "--all", *where, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["requested"] == ["big"]
    reader = PostgresStore(pg_dsn, schema=pg_schema, readonly=True, partition=None)
    _until(
        lambda: (worker.step(), reader.session("big").state)[1] is SessionState.SYNCED,
        "the owner to redrive and sync big",
    )
    assert "redriven" in [c.event for c in reader.history("big")]
    history = _sql(pg_dsn, f'SELECT DISTINCT epoch FROM "{pg_schema}".history')
    assert history == [(1,)]  # every write under the worker's own lease
    reader.close()
    worker.stop()


def test_operating_commands_refuse_mixed_or_missing_sources(
    pg_dsn: str, pg_schema: str, sessionfsm_cli: Callable[..., Any]
) -> None:
    """``--db`` with ``--dsn``, ``--policy`` or ``--schema`` in the wrong place are
    usage errors; a schema that holds no sessionfsm tables is a clear error."""
    both = sessionfsm_cli("status", "--db", "x.db", "--dsn", pg_dsn)
    assert both.exit_code == 2
    assert "--db or --dsn, not both" in both.output
    schema_alone = sessionfsm_cli("dead-letters", "--schema", pg_schema)
    assert schema_alone.exit_code == 2
    policy = sessionfsm_cli("redrive", "--all", "--dsn", pg_dsn, "--policy", "p.toml")
    assert policy.exit_code == 2
    assert "--policy goes with --db" in policy.output
    missing = sessionfsm_cli("status", "--dsn", pg_dsn, "--schema", "nothing_here")
    assert missing.exit_code == 1
    assert "does not exist" in missing.output
