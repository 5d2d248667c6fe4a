"""The fleet's shared bookkeeping in PostgreSQL: workers, leases, and the inbox.

Everything here is one short statement or transaction on the server, timed by
the server's clock (``clock_timestamp()``), so workers' clocks never need to
agree. See ``docs/scaling-out.md`` for the protocol and
``sessionfsm.tools.lease_check`` for its model check.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Final

import psycopg

from .._errors import StoreConnectionLost, StoreError, UsageError
from ..machine import Lane
from ..postgres_store import PostgresStore, connect, partition_of
from ..validation import check_session_id

__all__ = ["Coordinator", "InboxRow", "Producer", "assign"]

_LANES: Final = {lane.value for lane in Lane}
#: The inbox "lane" of a redrive request.
_REDRIVE: Final = "redrive"

#: (seq, session id, lane, seconds since it was enqueued, by the server's clock)
InboxRow = tuple[int, str, str, float]


def assign(workers: Sequence[str], partitions: int) -> dict[str, set[int]]:
    """Which partitions each live worker should own: round robin over the sorted ids.

    Every worker computes the same answer from the same live set, so no
    leader is needed; a worker only ever takes a partition whose lease is free
    or expired, and gives back the ones no longer its own, so disagreement
    while views differ costs time, never safety.
    """
    ordered = sorted(set(workers))
    out: dict[str, set[int]] = {w: set() for w in ordered}
    if ordered:
        for p in range(partitions):
            out[ordered[p % len(ordered)]].add(p)
    return out


class Coordinator:
    """One connection for a worker's lease and membership calls.

    It opens (and creates or migrates) the schema through a read-only check by
    :class:`PostgresStore`, so a foreign or newer schema is refused the same way.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "sessionfsm",
        partitions: int | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        # Opening a store for partition 0 creates or migrates the schema and
        # checks it is sessionfsm's; it does not take the lease (``lease=``).
        from ..postgres_store import Lease

        probe = PostgresStore(
            dsn,
            schema=schema,
            partitions=partitions,
            lease=Lease(owner="", epoch=-1),
            connect_timeout=connect_timeout,
        )
        self.partitions = probe.partitions
        probe.close()
        self.schema = schema
        self._s = f'"{schema}"'
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self.channel = f"{schema}_inbox"

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    # --------------------------------------------------------- membership

    def register(self, worker_id: str, lease_s: float) -> None:
        """Say this worker is alive for ``lease_s`` seconds (insert or renew)."""
        self._run(
            f"INSERT INTO {self._s}.worker (id, host, pid, expires_at) VALUES "
            "(%s, %s, %s, clock_timestamp() + %s * interval '1 second') ON CONFLICT (id) DO "
            "UPDATE SET heartbeat_at = clock_timestamp(), expires_at = excluded.expires_at",
            (worker_id, socket.gethostname(), os.getpid(), lease_s),
        )

    def leave(self, worker_id: str) -> None:
        """Forget a worker that stops on purpose, so the others rebalance at once."""
        self._run(f"DELETE FROM {self._s}.worker WHERE id = %s", (worker_id,))

    def live_workers(self) -> list[str]:
        """Ids of the workers whose heartbeat has not expired, sorted."""
        rows = self._run(
            f"SELECT id FROM {self._s}.worker WHERE expires_at > clock_timestamp() ORDER BY id",
            (),
        )
        return [r[0] for r in rows]

    def next_change_s(self, worker_id: str, wanted: Iterable[int] = ()) -> float | None:
        """Seconds (by the server's clock) until the next expiry that could change
        this worker's share: another live worker's heartbeat, or the lease of a
        partition it wants but someone else holds. None if there is none.

        A worker rebalances again at that moment, so a dead worker's partitions
        are taken over within a tick of its lease running out, not a heartbeat.
        """
        rows = self._run(
            "SELECT extract(epoch FROM least("
            f"(SELECT min(expires_at) FROM {self._s}.worker "
            "WHERE expires_at > clock_timestamp() AND id <> %s), "
            f"(SELECT min(expires_at) FROM {self._s}.part WHERE partition = ANY(%s::int[]) "
            "AND expires_at > clock_timestamp())) - clock_timestamp())::float8",
            (worker_id, sorted(wanted)),
        )
        value = rows[0][0] if rows else None
        return None if value is None else max(float(value), 0.0)

    # ------------------------------------------------------------- leases

    def heartbeat(self, worker_id: str, lease_s: float, held: dict[int, int]) -> set[int]:
        """Renew the worker and the leases it holds (partition -> epoch).

        Returns the partitions still held; any other was lost (expired, or
        taken over) and must be dropped.
        """
        conn = self._live()
        try:
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO {self._s}.worker (id, host, pid, expires_at) VALUES "
                    "(%s, %s, %s, clock_timestamp() + %s * interval '1 second') "
                    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = clock_timestamp(), "
                    "expires_at = excluded.expires_at",
                    (worker_id, socket.gethostname(), os.getpid(), lease_s),
                )
                if not held:
                    return set()
                rows = conn.execute(
                    f"UPDATE {self._s}.part AS p SET expires_at = clock_timestamp() + "
                    "%s * interval '1 second', renewed_at = clock_timestamp() "
                    "FROM unnest(%s::int[], %s::int8[]) AS h(partition, epoch) "
                    "WHERE p.partition = h.partition AND p.epoch = h.epoch AND p.owner = %s "
                    "AND p.expires_at > clock_timestamp() RETURNING p.partition",
                    (lease_s, list(held), list(held.values()), worker_id),
                ).fetchall()
        except psycopg.Error as exc:
            raise self._error("renew leases in", exc) from exc
        return {r[0] for r in rows}

    def acquire(self, partition: int, worker_id: str, lease_s: float) -> int | None:
        """Take a partition whose lease is free or expired; its new epoch, or None."""
        conn = self._live()
        try:
            with conn.transaction():
                row = conn.execute(
                    f"UPDATE {self._s}.part SET owner = %s, epoch = epoch + 1, "
                    "acquired_at = clock_timestamp(), renewed_at = clock_timestamp(), "
                    "expires_at = clock_timestamp() + %s * interval '1 second' "
                    "WHERE partition = %s AND (owner IS NULL OR expires_at IS NULL OR "
                    "expires_at <= clock_timestamp()) RETURNING epoch",
                    (worker_id, lease_s, partition),
                ).fetchone()
                if row is None:
                    return None
                conn.execute(
                    f"INSERT INTO {self._s}.lease_log (partition, epoch, owner) "
                    "VALUES (%s, %s, %s)",
                    (partition, row[0], worker_id),
                )
        except psycopg.Error as exc:
            raise self._error("acquire a lease in", exc) from exc
        return int(row[0])

    def release(self, partition: int, worker_id: str, epoch: int) -> None:
        """Give a lease back now, so its next owner need not wait for it to expire."""
        self._run(
            f"UPDATE {self._s}.part SET expires_at = clock_timestamp() "
            "WHERE partition = %s AND owner = %s AND epoch = %s",
            (partition, worker_id, epoch),
        )

    # -------------------------------------------------------------- inbox

    def inbox(self, partition: int, limit: int) -> list[InboxRow]:
        """The oldest ``limit`` sessions producers enqueued for a partition."""
        rows = self._run(
            f"SELECT seq, session_id, lane, "
            f"extract(epoch FROM clock_timestamp() - enqueued_at)::float8 "
            f"FROM {self._s}.inbox WHERE partition = %s ORDER BY seq LIMIT %s",
            (partition, limit),
        )
        return [(int(a), b, c, float(d)) for a, b, c, d in rows]

    def waiting(self) -> set[int]:
        """Partitions with anything in the inbox."""
        return {r[0] for r in self._run(f"SELECT DISTINCT partition FROM {self._s}.inbox", ())}

    # ---------------------------------------------------------- internals

    def _live(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = connect(
                self._dsn,
                self._connect_timeout,
                "sessionfsm-coordinator",
                f"cannot reach postgresql schema {self.schema!r}",
            )
            conn.execute("SET lock_timeout = '10s'")
            self._conn = conn
        return conn

    def _run(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self._live()
        try:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise self._error("use", exc) from exc

    def _error(self, doing: str, exc: psycopg.Error) -> StoreError:
        conn = self._conn
        if conn is not None and (conn.closed or conn.broken):
            self.close()
            return StoreConnectionLost(
                f"cannot {doing} postgresql schema {self.schema!r}: lost the connection ({exc})"
            )
        return StoreError(f"cannot {doing} postgresql schema {self.schema!r}: {exc}")


class Producer:
    """Enqueues sessions from anywhere (a web request, a change feed) for their owners.

    Rows go into the inbox, routed to each session's partition, and a NOTIFY
    wakes the workers; the owner applies them in its next tick, in one fenced
    transaction with their deletion from the inbox.
    """

    def __init__(self, dsn: str, *, schema: str = "sessionfsm") -> None:
        self._coord = Coordinator(dsn, schema=schema)
        self.partitions = self._coord.partitions

    def enqueue(self, session_ids: Iterable[str], lane: Lane | str = Lane.INCREMENTAL) -> int:
        """Enqueue sessions (one transaction); return how many."""
        name = lane.value if isinstance(lane, Lane) else lane
        if name not in _LANES and name != _REDRIVE:
            raise UsageError(f"lane must be one of {', '.join(sorted(_LANES))}, got {lane!r}")
        ids = list(session_ids)
        for sid in ids:
            check_session_id(sid)  # the engine's own rule, so no worker refuses a row
        if not ids:
            return 0
        n = self.partitions
        parts = [partition_of(sid, n) for sid in ids]
        c = self._coord
        conn = c._live()
        try:
            with conn.transaction():
                conn.execute(
                    f"INSERT INTO {c._s}.inbox (partition, session_id, lane) "
                    "SELECT u.p, u.id, %s FROM unnest(%s::int[], %s::text[]) AS u(p, id)",
                    (name, parts, ids),
                )
                conn.execute(
                    "SELECT pg_notify(%s, %s)",
                    (c.channel, ",".join(map(str, sorted(set(parts))))),
                )
        except psycopg.Error as exc:
            raise c._error("enqueue to", exc) from exc
        return len(ids)

    def redrive(self, session_ids: Iterable[str]) -> int:
        """Ask each dead letter's owner to redrive it (while workers run); return how many.

        The request goes through the inbox like an enqueue; the owner applies
        ``Engine.redrive``, and ignores (and logs) a session that is unknown
        or not dead-lettered.
        """
        return self.enqueue(session_ids, _REDRIVE)

    def close(self) -> None:
        self._coord.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
