"""One conformance suite for every store: MemoryStore, SqliteStore, PostgresStore.

Each test in the first part runs against all three through the ``any_store``
fixture (River's driver suite is the model: one behaviour, every driver). The
restart scenarios of ``tests/test_store.py`` run against all three as well,
through ``open_store``. The second part pins what only a shared server can get
wrong: another application's schema, a newer schema, a lost connection, a
second writer, and fencing after a takeover; each is checked against the
server's own rows.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from sessionfsm import (
    Engine,
    HistoryRetention,
    NotAStore,
    SessionState,
    Store,
    StoreError,
    StoreLocked,
    StoreTooNew,
    UnknownSession,
    UsageError,
    acks,
)
from sessionfsm import postgres_store as pg_module
from sessionfsm._errors import StoreConnectionLost, StoreFenced
from sessionfsm.postgres_store import Lease, PostgresStore, partition_of
from tests.conftest import FAST

DEAD = SessionState.DEAD_LETTERED
SYNCED = SessionState.SYNCED
QUEUED = SessionState.QUEUED

AnyStore = Callable[..., Store]


def _engine(store: Store) -> Engine:
    return Engine(FAST, store=store, rng=random.Random(0), log=False)


def _busy(engine: Engine) -> None:
    """Sessions in every resting and moving state, a paused link, a later clock."""
    for sid in ("ok1", "ok2", "big", "slow", "wait"):
        engine.enqueue(sid, now=1.0)
    for batch in engine.tick(1.0):
        engine.on_ack(
            batch.id,
            {
                sid: {"big": acks.PayloadTooLarge(), "slow": acks.RateLimited()}.get(sid, acks.Ok())
                for sid in batch.session_ids
            },
            now=2.0,
        )
    engine.enqueue("late", now=3.0)
    engine.relay_unavailable(now=4.0)


# ---------------------------------------------------------------------------
# Every store
# ---------------------------------------------------------------------------


def test_every_store_reads_back_what_the_engine_saved(any_store: AnyStore) -> None:
    """counts, dead_letters, session, history, link and now agree with the live engine."""
    store = any_store()
    engine = _engine(store)
    _busy(engine)
    reader: Any = store
    assert reader.sessions_by_state() == engine.sessions_by_state()
    assert reader.dead_letters() == engine.dead_letters()
    assert reader.dead_letters("PayloadTooLarge") == engine.dead_letters()
    assert reader.dead_letters("AckTimeout") == []
    for view in engine.sessions():
        assert reader.session(view.id) == view
    assert reader.link() == engine.link
    assert reader.now() == engine.now == 4.0
    assert [c.event for c in reader.history("big")] == ["enqueued", "sent", "rejected"]
    assert [c.event for c in reader.history("big", limit=1)] == ["rejected"]
    with pytest.raises(UnknownSession):
        reader.session("nobody")


def test_every_store_recovers_in_flight_at_the_head_and_keeps_the_dead(
    any_store: AnyStore,
) -> None:
    """A restarted engine finds in-flight sessions queued first with their counts,
    dead letters still dead, and a recovered row in the history."""
    engine = _engine(any_store())
    _busy(engine)
    engine.relay_ready(now=5.0)
    batches = engine.tick(40.0)  # late, then slow after its backoff
    sent = [sid for batch in batches for sid in batch.session_ids]
    assert "late" in sent
    restarted = _engine(any_store())
    for sid in sent:
        assert restarted.state(sid) is QUEUED
        assert restarted.session(sid).attempts == engine.session(sid).attempts
    assert restarted.state("big") is DEAD
    again = restarted.tick(41.0)
    assert [sid for batch in again for sid in batch.session_ids][: len(sent)] == sent
    assert min(batch.id for batch in again) > max(batch.id for batch in batches)


def test_every_store_refuses_calls_once_closed(any_store: AnyStore) -> None:
    """After close, load and save raise StoreError."""
    store = any_store()
    _engine(store).enqueue("s1", now=0.0)
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load()


@pytest.mark.parametrize("limit", [40])
def test_every_store_keeps_at_most_max_rows_of_history(any_store: AnyStore, limit: int) -> None:
    """With max_rows, the newest rows stay and the total stays near the cap."""
    store = any_store(history_retention=HistoryRetention(max_age_s=None, max_rows=limit))
    engine = _engine(store)
    now = 0.0
    for _ in range(30):
        now += 1.0
        engine.enqueue("s1", now=now)
        engine.enqueue("s2", now=now)
        for batch in engine.tick(now):
            engine.on_ack(batch.id, acks.Ok(), now=now)
    kept = len(store.history("s1")) + len(store.history("s2"))  # type: ignore[attr-defined]
    assert limit - 6 <= kept <= limit + limit // 10 + 6
    assert store.history("s1")[-1].event == "acked"  # type: ignore[attr-defined]


def test_every_store_drops_history_older_than_max_age(any_store: AnyStore) -> None:
    """With max_age_s, pruning keeps only recent rows and never a session's record."""
    store = any_store(history_retention=HistoryRetention(max_age_s=10.0, max_rows=None))
    engine = _engine(store)
    engine.enqueue("dead", now=0.0)
    engine.enqueue("ok", now=0.0)
    (batch,) = engine.tick(0.0)
    # "ok" accepted in the same answer: the evidence that charges "dead".
    engine.on_ack(batch.id, {"dead": acks.PayloadTooLarge(), "ok": acks.Ok()}, now=0.0)
    for now in range(1, 40):
        engine.enqueue("s1", now=float(now))
        for b in engine.tick(float(now)):
            engine.on_ack(b.id, acks.Ok(), now=float(now))
    store.prune()  # type: ignore[attr-defined]
    assert all(c.at >= 39.0 - 10.0 for c in store.history("s1"))  # type: ignore[attr-defined]
    assert store.history("dead") == []  # type: ignore[attr-defined]
    assert store.session("dead").state is DEAD  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# PostgreSQL: a shared server
# ---------------------------------------------------------------------------


def _sql(dsn: str, query: str, *params: Any) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def _tables(dsn: str, schema: str) -> dict[str, int]:
    names = _sql(
        dsn,
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind = 'r'",
        schema,
    )
    return {name: _sql(dsn, f'SELECT count(*) FROM "{schema}"."{name}"')[0][0] for (name,) in names}


def test_another_applications_schema_is_refused_and_left_alone(pg_dsn: str, pg_schema: str) -> None:
    """A schema holding someone else's tables raises NotAStore naming them; nothing changes."""
    _sql(pg_dsn, f'CREATE SCHEMA "{pg_schema}"')
    _sql(pg_dsn, f'CREATE TABLE "{pg_schema}".orders (id int)')
    _sql(pg_dsn, f'CREATE TABLE "{pg_schema}".meta (id int, application text)')
    _sql(pg_dsn, f"INSERT INTO \"{pg_schema}\".meta VALUES (1, 'billing')")
    before = _tables(pg_dsn, pg_schema)
    with pytest.raises(NotAStore, match=r"another application's tables \(meta, orders\)"):
        PostgresStore(pg_dsn, schema=pg_schema)
    with pytest.raises(NotAStore):
        PostgresStore(pg_dsn, schema=pg_schema, readonly=True, partition=None)
    assert _tables(pg_dsn, pg_schema) == before


def test_a_newer_schema_version_is_refused(pg_dsn: str, pg_schema: str) -> None:
    """A schema written by a newer sessionfsm raises StoreTooNew and is not touched."""
    with PostgresStore(pg_dsn, schema=pg_schema) as store:
        _engine(store).enqueue("s1", now=0.0)
    _sql(pg_dsn, f'UPDATE "{pg_schema}".meta SET schema_version = 99')
    before = _tables(pg_dsn, pg_schema)
    with pytest.raises(StoreTooNew, match="99, newer than"):
        PostgresStore(pg_dsn, schema=pg_schema)
    assert _tables(pg_dsn, pg_schema) == before


def test_an_older_schema_is_migrated_in_place(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version-1 schema with a session in it gets the fleet tables of version 2
    and the one-statement save of version 3, keeps its rows, and takes saves."""
    with monkeypatch.context() as m:
        m.setattr(pg_module, "_MIGRATIONS", {1: pg_module._MIGRATIONS[1]})
        m.setattr(pg_module, "SCHEMA_VERSION", 1)
        PostgresStore(pg_dsn, schema=pg_schema).close()
    # The rows a version-1 writer left: one queued session and its history.
    _sql(
        pg_dsn,
        f'INSERT INTO "{pg_schema}".session VALUES '
        "(0, 's1', 'queued', 'incremental', 0, 0, 0, NULL, false, 0, NULL, NULL, 1, 1)",
    )
    _sql(
        pg_dsn,
        f'INSERT INTO "{pg_schema}".history (partition, epoch, session_id, target, event, at, '
        "attempt) VALUES (0, 1, 's1', 'queued', 'enqueued', 0.0, 0)",
    )
    _sql(pg_dsn, f'UPDATE "{pg_schema}".part SET now = 0.0, queue_tail = 1')
    assert "inbox" not in _tables(pg_dsn, pg_schema)
    with pytest.raises(StoreError, match="needs a migration"):
        PostgresStore(pg_dsn, schema=pg_schema, readonly=True)
    with PostgresStore(pg_dsn, schema=pg_schema, history_retention=None) as store:
        assert store.session("s1").state is QUEUED
        engine = _engine(store)
        (batch,) = engine.tick(1.0)
        assert batch.session_ids == ("s1",)
        assert [c.event for c in store.history("s1")] == ["enqueued", "sent"]
    assert _sql(pg_dsn, f'SELECT schema_version FROM "{pg_schema}".meta') == [(3,)]
    tables = _tables(pg_dsn, pg_schema)
    assert tables["inbox"] == tables["fence_log"] == 0


def test_an_unreachable_server_is_a_clear_store_error() -> None:
    """A DSN nobody answers raises StoreConnectionLost naming the schema."""
    with pytest.raises(StoreConnectionLost, match="cannot connect"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout=1)


def test_a_lost_connection_is_a_store_error_and_nothing_half_written(
    pg_dsn: str, pg_schema: str
) -> None:
    """Terminating the store's backend mid-run: the save raises StoreConnectionLost,
    the server holds the state before that call, and the store reconnects after."""
    store = PostgresStore(pg_dsn, schema=pg_schema, history_retention=None)
    engine = _engine(store)
    engine.enqueue("s1", now=0.0)
    pid = store._live().info.backend_pid
    _sql(pg_dsn, "SELECT pg_terminate_backend(%s)", pid)
    with pytest.raises(StoreConnectionLost, match="lost the connection"):
        engine.tick(1.0)  # s1 in flight: this save never reaches the server
    rows = _sql(pg_dsn, f'SELECT id, state FROM "{pg_schema}".session')
    assert rows == [("s1", "queued")]
    assert [c.event for c in store.history("s1")] == ["enqueued"]
    restarted = _engine(store)  # the same store, connected again
    (batch,) = restarted.tick(2.0)
    assert batch.session_ids == ("s1",)
    store.close()


def test_a_second_writer_on_a_partition_is_refused(pg_dsn: str, pg_schema: str) -> None:
    """While one store holds partition 0, another gets StoreLocked; after close it may."""
    first = PostgresStore(pg_dsn, schema=pg_schema)
    with pytest.raises(StoreLocked, match="partition 0 is held by"):
        PostgresStore(pg_dsn, schema=pg_schema)
    first.close()
    with PostgresStore(pg_dsn, schema=pg_schema) as second:
        assert second.lease is not None
        assert second.lease.epoch == 2


def test_a_write_after_a_takeover_is_fenced_and_leaves_nothing(pg_dsn: str, pg_schema: str) -> None:
    """Once another owner takes the partition (a higher epoch), every save of the old
    one raises StoreFenced, writes no row, and the server records the refusal."""
    old = PostgresStore(pg_dsn, schema=pg_schema, lease_s=0.2, history_retention=None)
    engine = _engine(old)
    engine.enqueue("s1", now=0.0)
    threading.Event().wait(0.3)  # the lease runs out (server clock)
    new = PostgresStore(pg_dsn, schema=pg_schema, history_retention=None)
    assert new.lease is not None
    assert old.lease is not None
    assert new.lease.epoch == old.lease.epoch + 1
    before = _tables(pg_dsn, pg_schema)
    with pytest.raises(StoreFenced, match="no longer held") as caught:
        engine.tick(1.0)
    assert (caught.value.partition, caught.value.epoch) == (0, old.lease.epoch)
    after = _tables(pg_dsn, pg_schema)
    assert after == {**before, "fence_log": before["fence_log"] + 1}
    assert _sql(pg_dsn, f'SELECT fenced FROM "{pg_schema}".part') == [(1,)]
    refused = _sql(
        pg_dsn,
        f'SELECT partition, epoch, owner, current_epoch, changes FROM "{pg_schema}".fence_log',
    )
    assert refused == [(0, old.lease.epoch, old.lease.owner, new.lease.epoch, 1)]  # s1 sent
    # Every committed history row carries the epoch that wrote it.
    epochs = _sql(pg_dsn, f'SELECT DISTINCT epoch FROM "{pg_schema}".history')
    assert epochs == [(old.lease.epoch,)]
    old.close()
    new.close()


def test_a_fleet_lease_is_checked_on_every_save(pg_dsn: str, pg_schema: str) -> None:
    """A store given a lease it does not hold cannot write at all."""
    PostgresStore(pg_dsn, schema=pg_schema).close()
    store = PostgresStore(pg_dsn, schema=pg_schema, lease=Lease(owner="ghost", epoch=7))
    with pytest.raises(StoreFenced):
        _engine(store).enqueue("s1", now=0.0)
    assert _sql(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".session') == [(0,)]
    store.close()


def test_a_session_of_another_partition_is_refused(pg_dsn: str, pg_schema: str) -> None:
    """With several partitions, a store only takes new sessions that hash to its own."""
    store = PostgresStore(pg_dsn, schema=pg_schema, partitions=4, partition=0)
    mine = next(f"s{i}" for i in range(100) if partition_of(f"s{i}", 4) == 0)
    other = next(f"s{i}" for i in range(100) if partition_of(f"s{i}", 4) == 1)
    engine = _engine(store)
    engine.enqueue(mine, now=0.0)
    with pytest.raises(UsageError, match="belongs to partition 1"):
        engine.enqueue(other, now=0.0)
    with pytest.raises(UsageError, match="has 4 partitions, not 2"):
        PostgresStore(pg_dsn, schema=pg_schema, partitions=2, partition=1)
    store.close()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"schema": "Bad-Name"}, "schema must be"),
        ({"partition": -1}, "partition must be"),
        ({"partitions": 0}, "partitions must be"),
        ({"lease_s": 0}, "lease_s must be"),
        ({"partition": None}, "bound to one partition"),
    ],
)
def test_bad_postgres_store_options_are_refused(kw: dict[str, Any], match: str) -> None:
    """Each bad option raises UsageError before anything connects."""
    with pytest.raises(UsageError, match=match):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none", **kw)
