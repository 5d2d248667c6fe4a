"""PostgresStore: an engine's state in PostgreSQL, shared by many workers.

Install the extra: ``pip install 'sessionfsm[postgres]'`` (psycopg 3).
``import sessionfsm`` never imports this module.

Partitions
----------
A database holds a fixed number of *partitions*, chosen when it is created
(``partitions=``, 1 by default). A session belongs to partition
``crc32(id) % partitions`` (:func:`partition_of`) forever. Each partition is
what one :class:`~sessionfsm.Engine` holds: its own clock, batch ids, relay
link, lane throttles and queue order, as a SQLite file holds one engine.
A ``PostgresStore`` opened for writing is bound to one partition.

Leases and fencing
------------------
Whoever writes a partition holds its *lease*: a row with an ``owner``, an
``epoch`` that grows by one at every change of owner, and an expiry in the
server's clock. Every save starts with one ``UPDATE`` of that row guarded by
``owner = me AND epoch = mine AND expires_at > clock_timestamp()``; if it
matches nothing, the save writes no row of the engine's, records the refusal
(``part.fenced`` and a ``fence_log`` row naming the writer and its epoch) and
raises :class:`~sessionfsm._errors.StoreFenced`. The guard takes the row lock
a takeover also needs, so a save and a takeover are serialised by the server:
after a takeover commits, no write of an older epoch can commit. This is the
range-id fencing of Temporal's history shards, checked by the database in the
same transaction as the write.

A store opened on its own (no ``lease=``) takes the partition's lease itself
and renews it on every save, like SQLite's one-writer lock; a second writer
gets :class:`~sessionfsm._errors.StoreLocked` until the first closes or its
lease (``lease_s``) runs out. A fleet worker (:mod:`sessionfsm.fleet`)
acquires and heartbeats leases itself and passes them in.

How it writes
-------------
One ``Delta`` is one statement, ``SELECT save(...)``, a PL/pgSQL function
of the schema: one round trip, one transaction, prepared once per
connection. It runs the fence, then upserts the changed sessions, appends the
history rows, writes the changed lane stamps and deletes the inbox rows the
call consumed. The sessions and history rows travel as two JSON arrays that
msgspec encodes straight from the engine's records and the server decodes
with ``json_to_recordset``; one array parameter per column cost more in
Python than the whole server side. A failed save rolls back whole and raises
``StoreError``; the engine's memory is then ahead of the database, so rebuild
the engine from the store (recovery re-queues what was in flight) before
going on. ``hold()`` writes several engine calls as one such statement.

Bad input
---------
Everything lives in one schema (``sessionfsm`` by default), marked by a
``meta`` row naming the application and schema version. A schema holding
another application's tables, a newer schema version, a server that cannot be
reached, or a connection lost mid-call each raise a ``StoreError`` subclass
naming the schema and the problem; nothing is written to a schema that is not
sessionfsm's, and a transaction cut short leaves nothing behind.

Schema and migrations
---------------------
``_MIGRATIONS`` maps each version to the statements that take the previous
one there; opening applies the missing ones in one transaction under an
advisory lock, so workers that start together migrate once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import socket
import uuid
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Final

import msgspec

from ._errors import (
    NotAStore,
    StoreConnectionLost,
    StoreError,
    StoreFenced,
    StoreLocked,
    StoreReadOnly,
    StoreTooNew,
    UnknownSession,
    UsageError,
)
from .machine import (
    CHARGED_REASONS,
    ZERO_COUNTS,
    Lane,
    LinkRecord,
    LinkState,
    SessionRecord,
    SessionState,
)
from .records import Change, Delta, Snapshot, number_places
from .store import DEFAULT_RETENTION, KEEP_ALL, HistoryRetention
from .views import LinkView, SessionView, link_view, session_view

try:
    import psycopg
    import psycopg.errors
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("PostgresStore needs psycopg 3: pip install 'sessionfsm[postgres]'") from exc

__all__ = [
    "SCHEMA_VERSION",
    "Lease",
    "LeaseView",
    "PostgresStore",
    "WorkerView",
    "partition_of",
]

APPLICATION: Final = "sessionfsm"
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

#: Schema version -> the statements that take the previous version to it.
#: ``{s}`` is the schema, quoted.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        """CREATE TABLE {s}.meta (
            id integer PRIMARY KEY CHECK (id = 1),
            application text NOT NULL,
            schema_version integer NOT NULL,
            partitions integer NOT NULL CHECK (partitions > 0)
        )""",
        # One row per partition: its engine's row and its lease, together, so
        # the fenced update of a save is also the write of the engine row.
        """CREATE TABLE {s}.part (
            partition integer PRIMARY KEY,
            owner text,
            epoch bigint NOT NULL DEFAULT 0,
            expires_at timestamptz,
            acquired_at timestamptz,
            renewed_at timestamptz,
            now double precision,
            next_batch_id bigint NOT NULL DEFAULT 1,
            link_state text NOT NULL DEFAULT 'up',
            link_failures integer NOT NULL DEFAULT 0,
            link_resume_at double precision,
            queue_head bigint NOT NULL DEFAULT 0,
            queue_tail bigint NOT NULL DEFAULT 0,
            writes bigint NOT NULL DEFAULT 0,
            fenced bigint NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE {s}.session (
            partition integer NOT NULL,
            id text NOT NULL,
            state text NOT NULL,
            lane text NOT NULL,
            ack_timeouts integer NOT NULL,
            rate_limits integer NOT NULL,
            too_large integer NOT NULL,
            retry_at double precision,
            dirty boolean NOT NULL,
            attempts integer NOT NULL,
            dead_letter_reason text,
            dead_lettered_at double precision,
            position bigint,
            epoch bigint NOT NULL,
            PRIMARY KEY (partition, id)
        )""",
        "CREATE INDEX session_dead ON {s}.session (partition, position) "
        "WHERE state = 'dead_lettered'",
        """CREATE TABLE {s}.history (
            seq bigserial PRIMARY KEY,
            partition integer NOT NULL,
            epoch bigint NOT NULL,
            session_id text NOT NULL,
            source text,
            target text NOT NULL,
            event text NOT NULL,
            reason text,
            at double precision NOT NULL,
            attempt integer NOT NULL
        )""",
        "CREATE INDEX history_session ON {s}.history (session_id, seq)",
        "CREATE INDEX history_partition ON {s}.history (partition, seq)",
        """CREATE TABLE {s}.lane (
            partition integer NOT NULL,
            name text NOT NULL,
            stamped_at double precision,
            PRIMARY KEY (partition, name)
        )""",
        # The fence: a save's first statement passes it the number of lease
        # rows its guarded update matched; anything but 1 aborts the whole
        # transaction on the server, so a save is one round trip.
        """CREATE FUNCTION {s}.fence(matched bigint) RETURNS bigint LANGUAGE plpgsql AS $$
        BEGIN
            IF matched <> 1 THEN
                RAISE EXCEPTION 'sessionfsm: the writer no longer holds the partition lease'
                    USING ERRCODE = 'SF001';
            END IF;
            RETURN matched;
        END $$""",
        # Every lease ever granted: who held which partition in which epoch.
        """CREATE TABLE {s}.lease_log (
            partition integer NOT NULL,
            epoch bigint NOT NULL,
            owner text NOT NULL,
            acquired_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (partition, epoch)
        )""",
    ),
    2: (
        # Fleet: live workers, and the inbox
        # through which producers that are not workers enqueue sessions.
        """CREATE TABLE {s}.worker (
            id text PRIMARY KEY,
            host text NOT NULL,
            pid integer NOT NULL,
            started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            expires_at timestamptz NOT NULL
        )""",
        """CREATE TABLE {s}.inbox (
            seq bigserial PRIMARY KEY,
            partition integer NOT NULL,
            session_id text NOT NULL,
            lane text NOT NULL,
            enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )""",
        "CREATE INDEX inbox_partition ON {s}.inbox (partition, seq)",
    ),
    3: (
        # Every save refused by the fence, recorded by the server in the
        # transaction that refused it: which writer, in which epoch, when.
        """CREATE TABLE {s}.fence_log (
            seq bigserial PRIMARY KEY,
            partition integer NOT NULL,
            epoch bigint NOT NULL,
            owner text NOT NULL,
            current_epoch bigint NOT NULL,
            changes integer NOT NULL,
            refused_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )""",
        # History retention for one partition; returns how many rows went.
        """CREATE FUNCTION {s}.prune(p_partition integer, p_keep_rows bigint,
                p_keep_after double precision) RETURNS bigint LANGUAGE plpgsql AS $$
        DECLARE
            deleted bigint := 0;
            n bigint;
        BEGIN
            IF p_keep_rows IS NOT NULL THEN
                DELETE FROM {s}.history WHERE partition = p_partition AND seq <= (
                    SELECT seq FROM {s}.history WHERE partition = p_partition
                    ORDER BY seq DESC OFFSET p_keep_rows LIMIT 1);
                GET DIAGNOSTICS n = ROW_COUNT;
                deleted := deleted + n;
            END IF;
            IF p_keep_after IS NOT NULL THEN
                DELETE FROM {s}.history WHERE partition = p_partition AND at < p_keep_after;
                GET DIAGNOSTICS n = ROW_COUNT;
                deleted := deleted + n;
            END IF;
            RETURN deleted;
        END $$""",
        # One engine call's delta in one statement, so one round trip and one
        # transaction. Its first statement is the fence: the guarded update of
        # the partition's row, which takes the row lock a takeover also needs,
        # so the server serialises a save against a takeover. If the guard
        # matches nothing, the save writes nothing but its own refusal and
        # returns false. The rows come as JSON arrays of the engine's records
        # (decoded by the server in C, instead of one Python array per column).
        # p_now NULL leaves the engine row as it is (an inbox-only save).
        """CREATE FUNCTION {s}.save(
                p_partition integer, p_owner text, p_epoch bigint, p_renew_s double precision,
                p_now double precision, p_next_batch_id bigint, p_link_state text,
                p_link_failures integer, p_link_resume_at double precision,
                p_head bigint, p_tail bigint,
                p_sessions json, p_positions json, p_changes json, p_stamps json,
                p_inbox bigint[], p_prune boolean, p_keep_rows bigint,
                p_keep_after double precision) RETURNS boolean LANGUAGE plpgsql AS $$
        DECLARE
            held_by bigint;
            -- jsonb: one parse, then each lookup is a binary search.
            positions jsonb := p_positions::jsonb;
        BEGIN
            UPDATE {s}.part SET
                now = coalesce(p_now, now),
                next_batch_id = coalesce(p_next_batch_id, next_batch_id),
                link_state = coalesce(p_link_state, link_state),
                link_failures = coalesce(p_link_failures, link_failures),
                link_resume_at = CASE WHEN p_now IS NULL THEN link_resume_at
                                      ELSE p_link_resume_at END,
                queue_head = coalesce(p_head, queue_head),
                queue_tail = coalesce(p_tail, queue_tail),
                writes = writes + 1,
                expires_at = CASE WHEN p_renew_s IS NULL THEN expires_at
                    ELSE clock_timestamp() + p_renew_s * interval '1 second' END,
                renewed_at = CASE WHEN p_renew_s IS NULL THEN renewed_at
                    ELSE clock_timestamp() END
            WHERE partition = p_partition AND owner = p_owner AND epoch = p_epoch
                AND expires_at > clock_timestamp();
            IF NOT FOUND THEN
                UPDATE {s}.part SET fenced = fenced + 1 WHERE partition = p_partition
                    RETURNING epoch INTO held_by;
                INSERT INTO {s}.fence_log (partition, epoch, owner, current_epoch, changes)
                    VALUES (p_partition, p_epoch, p_owner, coalesce(held_by, -1),
                            coalesce(json_array_length(p_changes), 0));
                RETURN false;
            END IF;
            IF p_sessions IS NOT NULL THEN
                INSERT INTO {s}.session AS t (partition, id, state, lane, ack_timeouts,
                    rate_limits, too_large, retry_at, dirty, attempts, dead_letter_reason,
                    dead_lettered_at, position, epoch)
                SELECT p_partition, r.id, r.state, r.lane, r.counts[1], r.counts[2],
                    r.counts[3], r.retry_at, r.dirty, r.attempts, r.dead_letter_reason,
                    r.dead_lettered_at, (positions ->> r.id)::bigint, p_epoch
                FROM json_to_recordset(p_sessions) AS r(id text, state text, lane text,
                    counts integer[], retry_at double precision, dirty boolean,
                    attempts integer, dead_letter_reason text,
                    dead_lettered_at double precision)
                ON CONFLICT (partition, id) DO UPDATE SET state = excluded.state,
                    lane = excluded.lane, ack_timeouts = excluded.ack_timeouts,
                    rate_limits = excluded.rate_limits, too_large = excluded.too_large,
                    retry_at = excluded.retry_at, dirty = excluded.dirty,
                    attempts = excluded.attempts,
                    dead_letter_reason = excluded.dead_letter_reason,
                    dead_lettered_at = excluded.dead_lettered_at,
                    position = coalesce(excluded.position, t.position),
                    epoch = excluded.epoch;
            END IF;
            IF p_changes IS NOT NULL THEN
                INSERT INTO {s}.history (partition, epoch, session_id, source, target,
                    event, reason, at, attempt)
                SELECT p_partition, p_epoch, c.session_id, c.source, c.target, c.event,
                    c.reason, c.at, c.attempt
                FROM ROWS FROM (json_to_recordset(p_changes) AS (session_id text,
                    source text, target text, event text, reason text,
                    at double precision, attempt integer)) WITH ORDINALITY
                    AS c(session_id, source, target, event, reason, at, attempt, n)
                ORDER BY c.n;
            END IF;
            IF p_stamps IS NOT NULL THEN
                INSERT INTO {s}.lane AS t (partition, name, stamped_at)
                SELECT p_partition, l.key, (l.value)::double precision
                FROM json_each_text(p_stamps) AS l
                ON CONFLICT (partition, name) DO UPDATE SET stamped_at = excluded.stamped_at;
            END IF;
            IF p_inbox IS NOT NULL THEN
                DELETE FROM {s}.inbox WHERE seq = ANY(p_inbox) AND partition = p_partition;
            END IF;
            IF p_prune THEN
                PERFORM {s}.prune(p_partition, p_keep_rows, p_keep_after);
            END IF;
            RETURN true;
        END $$""",
        "DROP FUNCTION {s}.fence(bigint)",
        # Every transition rewrites its session's row and appends a history
        # row, so each index there is paid on every save. A session row's
        # update stays on its page (HOT, no index entry) only if it touches
        # no indexed column: the partial index of dead letters named `state`,
        # so it goes (listing dead letters scans the partition instead), and
        # pages keep room for the new versions. History keeps one index per
        # reader: (partition, seq) for loading and pruning, (session_id, seq)
        # for a session's history.
        "DROP INDEX {s}.session_dead",
        "ALTER TABLE {s}.session SET (fillfactor = 80)",
        "ALTER TABLE {s}.history DROP CONSTRAINT history_pkey, ADD PRIMARY KEY (partition, seq)",
        "DROP INDEX {s}.history_partition",
    ),
}
#: The schema version this code writes.
SCHEMA_VERSION: Final = max(_MIGRATIONS)

if CHARGED_REASONS != ("AckTimeout", "RateLimited", "PayloadTooLarge"):  # pragma: no cover
    raise ImportError("a charged reason was added: add its count column in a migration")

_COLUMNS: Final = (
    "id, state, lane, ack_timeouts, rate_limits, too_large, retry_at, dirty, attempts, "
    "dead_letter_reason, dead_lettered_at"
)
#: Encodes the engine's records (msgspec Structs) as the JSON ``save`` takes.
#: JSON has no infinity, but every time in a record is finite: the engine
#: refuses any other clock, and a store's records are validated on load.
_JSON: Final = msgspec.json.Encoder()
_STATES: Final = {s.value: s for s in SessionState}
_LANES: Final = {lane.value: lane for lane in Lane}
_LINK_STATES: Final = {s.value: s for s in LinkState}


def partition_of(session_id: str, partitions: int) -> int:
    """The partition a session belongs to: ``crc32(utf-8 id) % partitions``."""
    return zlib.crc32(session_id.encode()) % partitions


class Lease(msgspec.Struct, frozen=True):
    """The right to write one partition: who holds it, and in which epoch."""

    owner: str
    epoch: int


class LeaseView(msgspec.Struct, frozen=True):
    """One partition's lease as the server sees it (``PostgresStore.leases``)."""

    partition: int
    owner: str | None
    epoch: int
    #: Seconds until it expires (negative: expired), by the server's clock.
    expires_in_s: float | None
    #: Seconds since its owner last renewed it.
    renewed_ago_s: float | None
    #: Saves committed to the partition, ever.
    writes: int
    #: Saves refused because the writer no longer held the lease, as reported by them.
    fenced: int


class WorkerView(msgspec.Struct, frozen=True):
    """A worker that has registered (``PostgresStore.workers``)."""

    id: str
    host: str
    pid: int
    #: Seconds since its last heartbeat, by the server's clock.
    heartbeat_ago_s: float
    alive: bool


def new_owner_id() -> str:
    """A name for a lease holder: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _q(schema: str) -> str:
    return f'"{schema}"'


class PostgresStore:
    """The state of one partition's engine in PostgreSQL. Opening checks the schema at once.

    You pass a libpq ``dsn`` (``"postgresql://user@host/db"``) and optionally:

    * ``schema``: where sessionfsm keeps its tables (``sessionfsm``), created
      if missing; it must hold nothing else;
    * ``partition``: which partition this store writes (0); a read-only store
      with ``partition=None`` reads the whole database;
    * ``partitions``: how many partitions a new database gets (1); an existing
      database keeps its own, and a different number is refused;
    * ``lease``: a :class:`Lease` a fleet worker already holds; without it a
      writable store takes the partition's lease itself for ``lease_s``
      seconds, renewed by every save, and gives it back on ``close``;
    * ``history_retention``: as for ``SqliteStore``, per partition;
    * ``readonly=True``: the read helpers only, beside running workers;
    * ``synchronous_commit=False``: do not wait for the server's WAL flush
      (a server crash may lose the last commits; a worker crash never does).

    Not thread-safe: use it from one thread at a time, like the engine.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "sessionfsm",
        partition: int | None = 0,
        partitions: int | None = None,
        lease: Lease | None = None,
        lease_s: float = 30.0,
        history_retention: HistoryRetention | None = DEFAULT_RETENTION,
        readonly: bool = False,
        connect_timeout: float = 5.0,
        synchronous_commit: bool = True,
    ) -> None:
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise UsageError(
                f"schema must be a lower-case SQL name (letters, digits, _), got {schema!r}"
            )
        if partitions is not None and (
            isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1
        ):
            raise UsageError(f"partitions must be an integer >= 1, got {partitions!r}")
        if partition is None and not readonly:
            raise UsageError("a writable store is bound to one partition: pass partition=")
        if partition is not None and (
            isinstance(partition, bool) or not isinstance(partition, int) or partition < 0
        ):
            raise UsageError(f"partition must be an integer >= 0, got {partition!r}")
        if not isinstance(lease_s, (int, float)) or not lease_s > 0:
            raise UsageError(f"lease_s must be a number of seconds > 0, got {lease_s!r}")
        if lease is not None and not isinstance(lease, Lease):
            raise UsageError(f"lease must be a sessionfsm Lease, got {lease!r}")
        self.schema = schema
        self.partition = partition
        self.readonly = readonly
        self.lease_s = float(lease_s)
        self.history_retention = history_retention if history_retention is not None else KEEP_ALL
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._synchronous_commit = synchronous_commit
        self._where = f"postgresql schema {schema!r}"
        self._s = _q(schema)
        self._own_lease = lease is None and not readonly
        self._lease: Lease | None = lease
        self._head = 0
        self._tail = 0
        self._stamps: dict[str, float | None] = {}
        self._since_prune = 0
        self._held: list[Delta] | None = None
        self._held_changes = 0
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[None] | None = None
        self._inbox_done: list[int] = []
        self._save_sql = (
            f"SELECT {self._s}.save(%s::int, %s::text, %s::int8, %s::float8, %s::float8, "
            "%s::int8, %s::text, %s::int, %s::float8, %s::int8, %s::int8, %s::json, %s::json, "
            "%s::json, %s::json, %s::int8[], %s::bool, %s::int8, %s::float8)"
        )
        self.partitions = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._conn = self._connect()
        try:
            self._open(partitions)
            if self._own_lease:
                self._acquire_own()
            if not readonly:
                self._load_counters()
        except BaseException:
            self._drop_connection()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({self._where}, partition={self.partition}, readonly={self.readonly})"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lease(self) -> Lease | None:
        """The lease this store writes under (None when read-only)."""
        return self._lease

    # ------------------------------------------------------------ the Store

    def load(self) -> Snapshot | None:
        """The partition's saved state, sessions in queue order; None if nothing was saved."""
        p = self._bound("load")
        s = self._s
        try:
            conn = self._live()
            with conn.transaction():
                row = conn.execute(
                    f"SELECT now, next_batch_id, link_state, link_failures, link_resume_at "
                    f"FROM {s}.part WHERE partition = %s",
                    (p,),
                ).fetchone()
                if row is None:
                    raise StoreError(f"store {self._where} is damaged: partition {p} is missing")
                if row[0] is None:
                    return None
                stamps = dict(
                    conn.execute(
                        f"SELECT name, stamped_at FROM {s}.lane WHERE partition = %s", (p,)
                    ).fetchall()
                )
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM {s}.session WHERE partition = %s ORDER BY position",
                    (p,),
                ).fetchall()
        except psycopg.Error as exc:
            raise self._error("read", exc) from exc
        now, next_batch_id, link_state, failures, resume_at = row
        return Snapshot(
            sessions=self._decode(rows),
            link=self._link_record(link_state, failures, resume_at),
            stamps=stamps,
            next_batch_id=next_batch_id,
            now=now,
        )

    def save(self, delta: Delta) -> None:
        """Write one engine call's changes in one fenced transaction, or raise ``StoreError``.

        ``StoreFenced`` means the lease was lost: nothing was written, and
        nothing this store's engine does will be again.
        """
        if self.readonly:
            raise StoreError(f"cannot save to store {self._where}: it was opened read-only")
        if self._held is not None:
            if getattr(self, "_closed", False):
                raise StoreError(f"store {self._where} is closed")
            # Serialise now: the engine keeps mutating the same records.
            self._held_changes += len(delta.changes)
            self._held.append(
                Delta(
                    sessions=[msgspec.structs.replace(r) for r in delta.sessions],
                    changes=list(delta.changes),
                    link=msgspec.structs.replace(delta.link),
                    stamps=dict(delta.stamps),
                    next_batch_id=delta.next_batch_id,
                    now=delta.now,
                    queue_front=list(delta.queue_front),
                    queue_back=list(delta.queue_back),
                )
            )
            return
        self._write(delta.sessions, delta.changes, delta, [delta])

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Within the block, saves are kept and written as one transaction at its end.

        A worker applies a whole inbox drain this way. If the block raises,
        nothing is written; if the final write fails, it raises ``StoreError``.
        """
        self.begin_hold()
        try:
            yield
        except BaseException:
            self.drop_held()
            raise
        self.write_held()

    def begin_hold(self) -> None:
        """Keep the saves from now on, until :meth:`write_held` writes them as one transaction.

        The open form of :meth:`hold`, for a group commit that spans several
        turns of a loop (a fleet worker holds its ticks while it is busy).
        Holds do not nest.
        """
        if self._held is not None:
            raise UsageError("hold() does not nest")
        self._held = []
        self._held_changes = 0

    @property
    def holding(self) -> bool:
        """Whether saves are being kept for :meth:`write_held`."""
        return self._held is not None

    @property
    def held_changes(self) -> int:
        """How many transitions the open hold keeps (0 when not holding)."""
        return self._held_changes if self._held is not None else 0

    def write_held(self, *, wait: bool = True) -> None:
        """Write every save kept since :meth:`begin_hold` as one fenced transaction.

        The hold ends whatever happens. On ``StoreError`` (``StoreFenced`` when
        the lease was lost) nothing of it was written: the engine that made
        those saves is ahead of the store and must be thrown away, and its
        partition recovered from the store again.

        With ``wait=False`` the write goes to the server from a background
        thread and the caller goes on, so the next group's work overlaps this
        one's round trip and the server's work on it (as a queue's
        asynchronous completer does). At most one is on its way: the next
        write, and every other call that uses the connection, waits for it
        first and raises its ``StoreError`` if it failed (:meth:`settle`).
        """
        if self._held is None:
            raise UsageError("write_held() without begin_hold()")
        held, self._held = self._held, None
        self._held_changes = 0
        if not held and not self._inbox_done:
            return
        self.settle()  # the one before, in order
        if not held:
            prepared = self._prepare_write([], [], None, [])
        else:
            merged: dict[str, SessionRecord] = {}
            changes: list[Change] = []
            for d in held:
                for rec in d.sessions:
                    merged[rec.id] = rec
                changes.extend(d.changes)
            prepared = self._prepare_write(list(merged.values()), changes, held[-1], held)
        if wait:
            self._run_write(*prepared)
            return
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"sessionfsm-p{self.partition}"
            )
        self._pending = self._writer.submit(self._run_write, *prepared)

    def settle(self) -> None:
        """Wait for the write :meth:`write_held` left in the background, if any.

        Raises its ``StoreError`` (``StoreFenced`` when the lease was lost) if
        it failed. Every call that uses the connection settles first.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    @property
    def writing(self) -> bool:
        """Whether a background write is still on its way to the server."""
        return self._pending is not None and not self._pending.done()

    def drop_held(self) -> None:
        """End the hold writing nothing; the engine that made those saves must be thrown away."""
        self._held = None
        self._held_changes = 0
        self._inbox_done.clear()

    def consume_inbox(self, seqs: Sequence[int]) -> None:
        """Delete these inbox rows in the same transaction as the next save."""
        self._inbox_done.extend(seqs)

    def close(self) -> None:
        """Give back a lease this store took itself, and close. Later calls raise ``StoreError``.

        A background write still on its way is waited for; its error, if any, is not raised.
        """
        with contextlib.suppress(StoreError):
            self.settle()
        if self._writer is not None:
            self._writer.shutdown()
            self._writer = None
        conn = self._conn
        if conn is not None and self._own_lease and self._lease is not None and not conn.broken:
            with contextlib.suppress(psycopg.Error):
                conn.execute(
                    f"UPDATE {self._s}.part SET expires_at = clock_timestamp() "
                    "WHERE partition = %s AND owner = %s AND epoch = %s",
                    (self.partition, self._lease.owner, self._lease.epoch),
                )
        self._drop_connection()
        self._closed = True

    # --------------------------------------------------------- maintenance

    def prune(self) -> int:
        """Drop this partition's history rows the retention no longer keeps; return how many."""
        p = self._bound("prune")
        if self.readonly:
            raise StoreError(f"cannot prune store {self._where}: it was opened read-only")
        keep = self.history_retention
        try:
            row = (
                self._live()
                .execute(
                    f"SELECT {self._s}.prune(%s::int, %s::int8, now - %s::float8) "
                    f"FROM {self._s}.part WHERE partition = %s",
                    (p, keep.max_rows, keep.max_age_s, p),
                )
                .fetchone()
            )
        except psycopg.Error as exc:
            raise self._error("prune", exc) from exc
        self._since_prune = 0
        return int(row[0]) if row else 0

    # -------------------------------------------------------- read helpers

    def history(self, session_id: str, *, limit: int | None = None) -> list[Change]:
        """The session's kept transitions, oldest first (the last ``limit`` if given)."""
        sql = (
            f"SELECT session_id, source, target, event, reason, at, attempt "
            f"FROM {self._s}.history WHERE session_id = %s ORDER BY seq DESC"
        )
        params: tuple[Any, ...] = (session_id,)
        if limit is not None:
            sql += " LIMIT %s"
            params = (session_id, limit)
        rows = self._query(sql, params)
        states = _STATES
        return [
            Change(
                session_id=sid,
                source=None if source is None else states.get(source, source),
                target=states.get(target, target),
                event=event,
                reason=reason,
                at=at,
                attempt=attempt,
            )
            for sid, source, target, event, reason, at, attempt in reversed(rows)
        ]

    def session(self, session_id: str) -> SessionView:
        """The session as last saved, or ``UnknownSession``."""
        rows = self._query(
            f"SELECT {_COLUMNS} FROM {self._s}.session WHERE partition = %s AND id = %s",
            (partition_of(session_id, self.partitions), session_id),
        )
        if not rows:
            raise UnknownSession(session_id)
        return session_view(self._decode(rows)[0])

    def dead_letters(self, reason: str | None = None) -> list[SessionView]:
        """Dead letters as last saved (only ``reason``'s, if given), oldest first."""
        where, params = self._scope()
        sql = f"SELECT {_COLUMNS} FROM {self._s}.session WHERE state = 'dead_lettered'{where}"
        if reason is not None:
            sql += " AND dead_letter_reason = %s"
            params = (*params, reason)
        sql += " ORDER BY dead_lettered_at, partition, position"
        return [session_view(rec) for rec in self._decode(self._query(sql, params))]

    def sessions_by_state(self) -> dict[SessionState, int]:
        """How many sessions are in each state as last saved (every state present)."""
        where, params = self._scope()
        where = where.replace(" AND", " WHERE", 1)
        counts = dict.fromkeys(SessionState, 0)
        for state, n in self._query(
            f"SELECT state, count(*) FROM {self._s}.session{where} GROUP BY state", params
        ):
            counts[_STATES[state]] = n
        return counts

    def link(self) -> LinkView:
        """The relay link as last saved: this partition's, or the worst of all of them."""
        where, params = self._scope()
        where = where.replace(" AND", " WHERE", 1)
        rows = self._query(
            f"SELECT link_state, link_failures, link_resume_at FROM {self._s}.part{where} "
            "ORDER BY (link_state = 'up'), link_failures DESC, partition LIMIT 1",
            params,
        )
        if not rows:
            raise StoreError(f"store {self._where} is damaged: no partition rows")
        return link_view(self._link_record(*rows[0]))

    def now(self) -> float | None:
        """The engine clock when last saved (the latest of all partitions if unbound)."""
        where, params = self._scope()
        where = where.replace(" AND", " WHERE", 1)
        now: float | None = self._query(f"SELECT max(now) FROM {self._s}.part{where}", params)[0][0]
        return now

    def leases(self) -> list[LeaseView]:
        """Every partition's lease, heartbeat and fencing counters, by the server's clock."""
        rows = self._query(
            f"SELECT partition, owner, epoch, "
            f"extract(epoch FROM expires_at - clock_timestamp())::float8, "
            f"extract(epoch FROM clock_timestamp() - renewed_at)::float8, writes, fenced "
            f"FROM {self._s}.part ORDER BY partition",
            (),
        )
        return [LeaseView(*row) for row in rows]

    def workers(self) -> list[WorkerView]:
        """Every registered worker, and whether its heartbeat is still current."""
        rows = self._query(
            f"SELECT id, host, pid, "
            f"extract(epoch FROM clock_timestamp() - heartbeat_at)::float8, "
            f"expires_at > clock_timestamp() FROM {self._s}.worker ORDER BY id",
            (),
        )
        return [WorkerView(*row) for row in rows]

    def inbox_depth(self) -> int:
        """Sessions enqueued by producers that no worker has applied yet."""
        n: int = self._query(f"SELECT count(*) FROM {self._s}.inbox", ())[0][0]
        return n

    # ------------------------------------------------------------ internals

    def _write(
        self,
        sessions: Sequence[SessionRecord],
        changes: list[Change],
        last: Delta | None,
        placed: Sequence[Delta],
    ) -> None:
        """One call of the server's ``save``: the fence and every row in one transaction.

        ``last`` is None for a save that only deletes consumed inbox rows.
        """
        self.settle()
        self._run_write(*self._prepare_write(sessions, changes, last, placed))

    def _prepare_write(
        self,
        sessions: Sequence[SessionRecord],
        changes: list[Change],
        last: Delta | None,
        placed: Sequence[Delta],
    ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """The ``save`` call's parameters, and the counters after it succeeds."""
        p = self.partition
        lease = self._lease
        assert p is not None
        assert lease is not None
        if self.partitions > 1:
            for change in changes:
                if change.event == "enqueued" and (
                    partition_of(change.session_id, self.partitions) != p
                ):
                    raise UsageError(
                        f"session {change.session_id!r} belongs to partition "
                        f"{partition_of(change.session_id, self.partitions)}, not to this "
                        f"store's partition {p}: enqueue it through its owner or the inbox"
                    )
        # The engine decided the queue order; number its placements, call by call.
        positions: dict[str, int] = {}
        head, tail = self._head, self._tail
        for d in placed:
            more, head, tail = number_places(d, head, tail)
            positions.update(more)
        saved = self._stamps
        stamps: dict[str, float | None] = {}
        engine_row: tuple[Any, ...] = (None,) * 7
        keep = self.history_retention
        prune = False
        keep_after: float | None = None
        if last is not None:
            stamps = {
                lane: at
                for lane, at in last.stamps.items()
                if lane not in saved or saved[lane] != at
            }
            link = last.link
            engine_row = (
                last.now,
                last.next_batch_id,
                link.state.value,
                link.failures,
                link.resume_at,
                head,
                tail,
            )
            prune = self._since_prune + len(changes) >= keep.prune_every
            if prune and keep.max_age_s is not None:
                keep_after = last.now - keep.max_age_s
        encode = _JSON.encode
        inbox = self._inbox_done
        params: tuple[Any, ...] = (
            p,
            lease.owner,
            lease.epoch,
            self.lease_s if self._own_lease else None,
            *engine_row,
            encode(sessions).decode() if sessions else None,
            encode(positions).decode() if positions else None,
            encode(changes).decode() if changes else None,
            encode(stamps).decode() if stamps else None,
            list(inbox) if inbox else None,
            prune,
            keep.max_rows if prune else None,
            keep_after,
        )
        inbox.clear()  # consumed by this save, whatever becomes of it
        since = self._since_prune
        if last is not None:
            since = 0 if prune else since + len(changes)
        return params, (head, tail, stamps, since)

    def _run_write(self, params: tuple[Any, ...], after: tuple[Any, ...]) -> None:
        """Send one prepared ``save``; on success, move the counters on to ``after``."""
        lease = self._lease
        p = self.partition
        assert lease is not None
        assert p is not None
        try:
            row = self._conn_now().execute(self._save_sql, params, prepare=True).fetchone()
        except psycopg.Error as exc:
            raise self._error("save to", exc) from exc
        if row is None or row[0] is not True:
            raise StoreFenced(
                f"cannot save to store {self._where}: partition {p} is no longer "
                f"held by {lease.owner!r} in epoch {lease.epoch} (its lease ran out or another "
                "worker took it over); nothing was written",
                partition=p,
                epoch=lease.epoch,
            )
        self._head, self._tail, stamps, self._since_prune = after
        self._stamps.update(stamps)

    def _drop_inbox(self) -> None:
        """Delete consumed inbox rows that changed nothing, under the same fence."""
        self._write([], [], None, [])

    def _connect(self) -> psycopg.Connection[Any]:
        # Named in pg_stat_activity for operators: which partition, which owner.
        if self.readonly:
            name = "sessionfsm:readonly"
        else:
            owner = self._lease.owner if self._lease is not None else ""
            name = f"sessionfsm:p{self.partition}:{owner}"[:63]
        conn = connect(
            self._dsn,
            self._connect_timeout,
            name,
            f"cannot open store {self._where}: cannot connect to the server",
        )
        try:
            conn.execute("SET lock_timeout = '10s'")
            if not self._synchronous_commit:
                conn.execute("SET synchronous_commit = off")
            if self.readonly:
                conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot open store {self._where}: {exc}") from exc
        return conn

    def _open(self, partitions: int | None) -> None:
        """Recognise the schema, create or migrate it, and check the partition."""
        conn = self._conn
        assert conn is not None
        where = self._where
        s = self._s
        try:
            with conn.transaction():
                if not self.readonly:
                    # Workers that start together create or migrate the schema once.
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext('sessionfsm schema ' || %s))",
                        (self.schema,),
                    )
                tables = [
                    name
                    for (name,) in conn.execute(
                        "SELECT c.relname FROM pg_class c JOIN pg_namespace n "
                        "ON n.oid = c.relnamespace WHERE n.nspname = %s "
                        "AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY c.relname",
                        (self.schema,),
                    )
                ]
                meta: tuple[Any, ...] | None = None
                if "meta" in tables:
                    try:
                        with conn.transaction():
                            meta = conn.execute(
                                f"SELECT application, schema_version, partitions FROM {s}.meta "
                                "WHERE id = 1"
                            ).fetchone()
                    except psycopg.Error:
                        meta = None  # not our meta table
                if not tables:
                    if self.readonly:
                        raise NotAStore(
                            f"cannot open store {where} read-only: it does not exist "
                            "(no sessionfsm tables)"
                        )
                    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                    version = 0
                    self.partitions = partitions or 1
                elif meta is None or meta[0] != APPLICATION:
                    listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
                    raise NotAStore(
                        f"cannot open store {where}: it holds another application's tables "
                        f"({listed}); it was left as it is (pass another schema=)"
                    )
                else:
                    version, self.partitions = int(meta[1]), int(meta[2])
                    if version > SCHEMA_VERSION:
                        raise StoreTooNew(
                            f"cannot open store {where}: its schema version is {version}, "
                            f"newer than the {SCHEMA_VERSION} this sessionfsm knows; upgrade "
                            "sessionfsm (the schema was left as it is)"
                        )
                    if version < SCHEMA_VERSION and self.readonly:
                        raise StoreError(
                            f"cannot open store {where} read-only: its schema version "
                            f"{version} needs a migration; open it once for writing"
                        )
                    if partitions is not None and partitions != self.partitions:
                        raise UsageError(
                            f"store {where} has {self.partitions} partitions, not {partitions}: "
                            "the number is fixed when the database is created"
                        )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target]:
                        conn.execute(statement.format(s=s))
                    if target == 1:
                        conn.execute(
                            f"INSERT INTO {s}.meta VALUES (1, %s, 1, %s)",
                            (APPLICATION, self.partitions),
                        )
                        conn.execute(
                            f"INSERT INTO {s}.part (partition) SELECT generate_series(0, %s)",
                            (self.partitions - 1,),
                        )
                    conn.execute(f"UPDATE {s}.meta SET schema_version = %s", (target,))
        except psycopg.Error as exc:
            raise self._error("open", exc) from exc
        if self.partition is not None and self.partition >= self.partitions:
            raise UsageError(
                f"partition {self.partition} does not exist in store {where}: it has "
                f"{self.partitions} (0 to {self.partitions - 1})"
            )

    def _acquire_own(self) -> None:
        owner = new_owner_id()
        s = self._s
        conn = self._conn
        assert conn is not None
        try:
            with conn.transaction():
                row = conn.execute(
                    f"UPDATE {s}.part SET owner = %s, epoch = epoch + 1, acquired_at = "
                    "clock_timestamp(), renewed_at = clock_timestamp(), expires_at = "
                    "clock_timestamp() + %s * interval '1 second' WHERE partition = %s AND "
                    "(owner IS NULL OR expires_at IS NULL OR expires_at <= clock_timestamp()) "
                    "RETURNING epoch",
                    (owner, self.lease_s, self.partition),
                ).fetchone()
                if row is None:
                    holder = conn.execute(
                        f"SELECT owner, extract(epoch FROM expires_at - clock_timestamp()) "
                        f"FROM {s}.part WHERE partition = %s",
                        (self.partition,),
                    ).fetchone()
                    who, left = holder if holder else ("unknown", 0.0)
                    raise StoreLocked(
                        f"cannot open store {self._where}: partition {self.partition} is "
                        f"held by {who} for {float(left or 0):.1f} s more; close that store "
                        "first, or pass readonly=True to inspect it"
                    )
                conn.execute(
                    f"INSERT INTO {s}.lease_log (partition, epoch, owner) VALUES (%s, %s, %s)",
                    (self.partition, row[0], owner),
                )
        except psycopg.Error as exc:
            raise self._error("open", exc) from exc
        self._lease = Lease(owner=owner, epoch=int(row[0]))

    def _load_counters(self) -> None:
        # Also called by a background write reconnecting: it must not wait for itself.
        rows = self._query(
            f"SELECT queue_head, queue_tail FROM {self._s}.part WHERE partition = %s",
            (self.partition,),
            settle=False,
        )
        self._head, self._tail = rows[0]
        self._stamps = dict(
            self._query(
                f"SELECT name, stamped_at FROM {self._s}.lane WHERE partition = %s",
                (self.partition,),
                settle=False,
            )
        )

    def _bound(self, doing: str) -> int:
        if self.partition is None:
            raise UsageError(f"cannot {doing} store {self._where}: it is bound to no partition")
        return self.partition

    def _scope(self) -> tuple[str, tuple[Any, ...]]:
        if self.partition is None:
            return "", ()
        return " AND partition = %s", (self.partition,)

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, once a background write has finished (its error raised)."""
        if self._pending is not None:
            self.settle()
        return self._conn_now()

    def _conn_now(self) -> psycopg.Connection[Any]:
        if getattr(self, "_closed", False):
            raise StoreError(f"store {self._where} is closed")
        conn = self._conn
        if conn is None or conn.closed:
            # The connection broke in an earlier call: connect again. The
            # lease (and its fencing) is the server's, so nothing is assumed.
            conn = self._conn = self._connect()
            if not self.readonly:
                self._load_counters()
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _query(self, sql: str, params: tuple[Any, ...], *, settle: bool = True) -> list[Any]:
        try:
            conn = self._live() if settle else self._conn_now()
            return conn.execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise self._error("read", exc) from exc

    def _decode(self, rows: list[Any]) -> list[SessionRecord]:
        states, lanes, zero, make = _STATES, _LANES, ZERO_COUNTS, SessionRecord
        try:
            return [
                make(
                    sid,
                    states[state],
                    lanes[lane],
                    (c0, c1, c2) if c0 or c1 or c2 else zero,
                    retry_at,
                    dirty,
                    attempts,
                    reason,
                    at,
                )
                for sid, state, lane, c0, c1, c2, retry_at, dirty, attempts, reason, at in rows
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"store {self._where} is damaged: bad session row ({exc})") from None

    def _link_record(self, state: str, failures: int, resume_at: float | None) -> LinkRecord:
        try:
            return LinkRecord(state=_LINK_STATES[state], failures=failures, resume_at=resume_at)
        except KeyError:
            raise StoreError(
                f"store {self._where} is damaged: unknown link state {state!r}"
            ) from None

    def _error(self, doing: str, exc: psycopg.Error) -> StoreError:
        where = self._where
        conn = self._conn
        if isinstance(exc, psycopg.OperationalError) and (
            conn is None or conn.closed or conn.broken
        ):
            self._drop_connection()
            return StoreConnectionLost(
                f"cannot {doing} store {where}: lost the connection to the server ({exc}); "
                "nothing of this call was kept"
            )
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return StoreLocked(f"cannot {doing} store {where}: a lock wait timed out ({exc})")
        if isinstance(exc, (psycopg.errors.ReadOnlySqlTransaction,)):
            return StoreReadOnly(f"cannot {doing} store {where}: the server is read-only ({exc})")
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return StoreReadOnly(f"cannot {doing} store {where}: permission denied ({exc})")
        return StoreError(f"cannot {doing} store {where}: {exc}")


class _Fenced(Exception):
    """The fenced update matched nothing (internal)."""


def connect(
    dsn: str, timeout_s: float, application_name: str, failure: str
) -> psycopg.Connection[Any]:
    """An autocommit connection, or ``StoreConnectionLost`` starting with ``failure``."""
    try:
        return psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=max(1, round(timeout_s)),
            application_name=application_name,
        )
    except psycopg.Error as exc:
        raise StoreConnectionLost(f"{failure} ({exc})") from exc
