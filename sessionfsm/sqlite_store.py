"""SqliteStore: an engine's whole state in one SQLite file, on the standard library.

You pass a path; ``Engine(store=SqliteStore(path))`` creates the database or
reopens it and carries on from its state (sessions that were in flight go
back to the head of their queue). The engine stays sans-IO: after each public call it hands the
store one :class:`~sessionfsm.store.Delta`, and the store writes it.

How it writes
-------------
* One ``Delta`` is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``): the
  file always holds the state after some whole engine call, never half of one.
  A save that fails rolls back and raises :class:`StoreError`; the engine's
  memory is then ahead of the file, and its next successful save catches up
  (a tick takes back the batches it formed; see docs/faults.md).
* WAL journal mode, ``synchronous=NORMAL`` by default: a killed process loses
  nothing it saved; a power cut may lose the last few transactions (and never
  corrupts the file). ``synchronous="full"`` syncs every commit to disk.
* Changed sessions go in with one prepared upsert through ``executemany``,
  history rows with one prepared insert; counts are three integer columns.

What it keeps
-------------
``session``: one row per session (state, lane, one count per charged reason,
retry time, dirty flag, attempts, dead-letter reason and time) and its
*position*, which keeps each lane's queue and the dead letters in order across
a restart (the order the engine decided, from ``Delta.queue_front`` / ``queue_back``;
see :func:`~sessionfsm.records.number_places`). ``engine``: one row
with the engine clock, the next batch id and the relay link. ``lane``: each
lane's last batch time. ``history``: the append-only transition history,
pruned by a :class:`~sessionfsm.store.HistoryRetention` (30 days and a million
rows by default) in cheap range deletes, once every few thousand rows.

Time
----
Every time in the file (retry times, dead-letter times, history, the clock) is
in the engine's clock, in seconds. A runner that persists must pass wall time
(``time.time()``), never ``time.monotonic()``, which restarts at boot: retry
times must mean the same after a restart. Recovery caps any retry time further
than ``policy.max_backoff_s`` past the saved clock, in case the wall clock
jumped forward before the crash.

Bad input
---------
A missing directory, a read-only file, a database another process holds, a
file that is not a sessionfsm database (not SQLite, or another application's
SQLite), or one written by a newer sessionfsm: each raises a
:class:`StoreError` naming the path and the problem, before anything is
written (the writer's lock is taken before SQLite opens the file, so not even
retention pruning runs). A foreign file is never changed. A damaged file is a
``StoreError`` naming it on every read, and a state that breaks an invariant
is refused on load; :meth:`SqliteStore.verify` lists every problem.

Read-only
---------
``readonly=True`` never creates, changes or chowns a file. A database no
connection has open (no ``-wal`` beside it) or one on a read-only file system
is read as ``immutable``: no lock, no ``-shm``; the reader re-checks the file
around each read and reconnects when a writer appears. A live database is
read with ``mode=ro`` through the writer's own ``-wal`` and ``-shm``.

Schema and migrations
---------------------
``PRAGMA application_id`` marks the file as sessionfsm's; ``PRAGMA
user_version`` is the schema version. ``_MIGRATIONS`` maps each version to the
statements that take the previous one there; opening applies the missing ones
in one transaction. A version newer than this code knows is refused.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import sqlite3
import stat
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import msgspec

from ._errors import (
    NotAStore,
    SessionFSMError,
    StoreError,
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
from .validation import link_problems, record_problems, snapshot_problems
from .views import LinkView, SessionView, link_view, session_view

if sys.platform != "win32":
    import fcntl

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

#: ``PRAGMA application_id`` of every sessionfsm database: "sfsm" in ASCII.
APPLICATION_ID: Final = 0x7366736D
_MAGIC: Final = b"SQLite format 3\x00"

#: Schema version -> the statements that take the previous version to it.
_MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        # One count column per charged reason, in CHARGED_REASONS order.
        # A rowid table, so rows sit in the order sessions were first
        # enqueued, which is the order batches take them: one batch's updates
        # then dirty one or two pages instead of one random page per session
        # (keyed by a random-looking id). The pages a commit dirties are what
        # a save costs; this doubled saves per second with UUID ids.
        """CREATE TABLE session (
            row INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL,
            lane TEXT NOT NULL,
            ack_timeouts INTEGER NOT NULL,
            rate_limits INTEGER NOT NULL,
            too_large INTEGER NOT NULL,
            retry_at REAL,
            dirty INTEGER NOT NULL,
            attempts INTEGER NOT NULL,
            dead_letter_reason TEXT,
            dead_lettered_at REAL,
            position INTEGER
        )""",
        "CREATE INDEX session_dead ON session (position) WHERE state = 'dead_lettered'",
        """CREATE TABLE history (
            seq INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL,
            source TEXT,
            target TEXT NOT NULL,
            event TEXT NOT NULL,
            reason TEXT,
            at REAL NOT NULL,
            attempt INTEGER NOT NULL
        )""",
        # No index on history.session_id: it would put every history row on
        # a random index page, and the pages a commit dirties are what a save
        # costs (an index halved saves per second). history(session_id) scans
        # instead: about 50 ms per million rows, and retention bounds the rows.
        """CREATE TABLE engine (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            now REAL,
            next_batch_id INTEGER NOT NULL,
            link_state TEXT NOT NULL,
            link_failures INTEGER NOT NULL,
            link_resume_at REAL,
            queue_head INTEGER NOT NULL,
            queue_tail INTEGER NOT NULL
        )""",
        """INSERT INTO engine (id, next_batch_id, link_state, link_failures, queue_head, queue_tail)
        VALUES (1, 1, 'up', 0, 0, 0)""",
        "CREATE TABLE lane (name TEXT PRIMARY KEY, stamped_at REAL) WITHOUT ROWID",
    ),
}
#: The schema version this code writes.
SCHEMA_VERSION: Final = max(_MIGRATIONS)

if CHARGED_REASONS != ("AckTimeout", "RateLimited", "PayloadTooLarge"):  # pragma: no cover
    raise ImportError("a charged reason was added: add its count column in a migration")

_SESSION_COLUMNS: Final = (
    "id, state, lane, ack_timeouts, rate_limits, too_large, retry_at, dirty, attempts, "
    "dead_letter_reason, dead_lettered_at"
)
_SELECT_SESSIONS: Final = f"SELECT {_SESSION_COLUMNS} FROM session"
_SELECT_FOR_LOAD: Final = f"SELECT {_SESSION_COLUMNS}, coalesce(position, 0) FROM session"
_by_position: Final = operator.itemgetter(11)
# A session's position changes only when it moved in line; NULL keeps the old one.
_UPSERT_SESSION: Final = f"""
INSERT INTO session ({_SESSION_COLUMNS}, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    state = excluded.state, lane = excluded.lane, ack_timeouts = excluded.ack_timeouts,
    rate_limits = excluded.rate_limits, too_large = excluded.too_large,
    retry_at = excluded.retry_at, dirty = excluded.dirty, attempts = excluded.attempts,
    dead_letter_reason = excluded.dead_letter_reason,
    dead_lettered_at = excluded.dead_lettered_at,
    position = coalesce(excluded.position, session.position)
"""
_APPEND_HISTORY: Final = """
INSERT INTO history (session_id, source, target, event, reason, at, attempt)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""
_UPDATE_ENGINE: Final = """
UPDATE engine SET now = ?, next_batch_id = ?, link_state = ?, link_failures = ?,
    link_resume_at = ?, queue_head = ?, queue_tail = ?
WHERE id = 1
"""
_SELECT_ENGINE: Final = """
SELECT now, next_batch_id, link_state, link_failures, link_resume_at, queue_head, queue_tail
FROM engine WHERE id = 1
"""
_UPSERT_LANE: Final = """
INSERT INTO lane (name, stamped_at) VALUES (?, ?)
ON CONFLICT (name) DO UPDATE SET stamped_at = excluded.stamped_at
"""
# The history's ``at`` never decreases along ``seq`` (the engine clock never
# goes back, and a recovered engine resumes from the saved clock), so both
# limits cut off a prefix of the rowids: a range delete, no scan of the rest.
_PRUNE_ROWS: Final = "DELETE FROM history WHERE seq <= (SELECT max(seq) FROM history) - ?"
_PRUNE_AGE: Final = """
DELETE FROM history WHERE seq < coalesce(
    (SELECT seq FROM history WHERE at >= ? ORDER BY seq LIMIT 1),
    (SELECT max(seq) + 1 FROM history))
"""

_STATES: Final = {s.value: s for s in SessionState}
_LANES: Final = {lane.value: lane for lane in Lane}
_LINK_STATES: Final = {s.value: s for s in LinkState}
_SYNCHRONOUS: Final = {"normal": "NORMAL", "full": "FULL"}

# Primary result codes (the low byte of ``sqlite3.Error.sqlite_errorcode``).
_BUSY, _LOCKED, _READONLY, _CORRUPT, _NOTADB = 5, 6, 8, 11, 26
_T = TypeVar("_T")


class SqliteStore:
    """The engine's state in one SQLite file. Opening it checks it at once.

    You pass the database ``path`` (its directory must exist; the file is
    created if it does not). ``history_retention`` bounds the transition
    history (``None`` keeps all of it). ``readonly=True`` opens an existing
    database for the read helpers only, even while an engine in another
    process writes to it. ``timeout`` is how long to wait for another
    process's write lock before raising ``StoreLocked``. ``synchronous``
    is ``"normal"`` (safe against a killed process) or ``"full"`` (also
    against a power cut, at the cost of a disk sync per call).

    Only one writable store may hold a file at a time (a lock file next to it,
    ``<path>-lock``, says which process, and is removed on a clean close;
    POSIX only). A read-only store writes nothing at all, so another OS user
    can read a service's database (see the module notes). Not thread-safe:
    use it from one thread at a time, like the engine.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        history_retention: HistoryRetention | None = DEFAULT_RETENTION,
        readonly: bool = False,
        timeout: float = 5.0,
        synchronous: Literal["normal", "full"] = "normal",
    ) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise UsageError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise UsageError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        self.path = Path(path)
        self.readonly = readonly
        self.history_retention = history_retention if history_retention is not None else KEEP_ALL
        self._timeout = float(timeout)
        self._where = repr(os.fspath(path))
        self._lock_fd: int | None = None
        self._head = 0
        self._tail = 0
        self._stamps: dict[str, float | None] = {}
        self._since_prune = 0
        self._fresh = False  # no file yet, or an empty one: nothing to lose
        self._opened = False  # recognised as ours and set up
        self._synchronous = _SYNCHRONOUS[synchronous]
        # A read-only store on a file no connection has open (no WAL next to
        # it) reads it as immutable: no lock, no -shm, no -wal, so a reader
        # that cannot write the directory still reads, and never leaves files
        # another user's service then cannot write. It re-checks the file
        # around every read and reconnects once a writer appears.
        self._immutable = False
        self._signature: tuple[int, ...] | None = None
        self._conn: sqlite3.Connection | None = None
        self._check_path()
        try:
            if not readonly:
                # Before SQLite touches the file: a store that is refused
                # (another writer holds it) has written nothing, not even a
                # pruned history row or a PRAGMA.
                self._claim()
            self._connect()
        except BaseException:
            self.close()
            raise
        self._opened = True

    def __repr__(self) -> str:
        return f"SqliteStore({self._where}, readonly={self.readonly})"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._conn is None

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the Store

    def load(self) -> Snapshot | None:
        """Everything saved, sessions in queue order; None for a new database.

        One SELECT per table, in one read transaction. A state that breaks an
        invariant is refused with ``StoreError`` naming the session and the
        rule, never handed to an engine (:meth:`verify` lists every problem).
        """
        snapshot = self._read(self._load)
        if snapshot is None:
            return None
        head = snapshot_problems(
            Snapshot(
                sessions=[],
                link=snapshot.link,
                stamps=snapshot.stamps,
                next_batch_id=snapshot.next_batch_id,
                now=snapshot.now,
            )
        )
        problems = head  # the sessions were checked as they were read (_records)
        if problems:
            raise StoreError(
                f"store {self._where} is damaged: {problems[0]}; nothing was loaded "
                f"(`sessionfsm doctor --db {os.fspath(self.path)}` lists every problem)"
            )
        return snapshot

    def _load(self, conn: sqlite3.Connection, check: bool = True) -> Snapshot | None:
        conn.execute("BEGIN")
        try:
            row = self._engine_row(conn)
            if row[0] is None:
                return None
            stamps = dict(conn.execute("SELECT name, stamped_at FROM lane").fetchall())
            # Sorting in Python is about twice as fast as ORDER BY here.
            rows = conn.execute(_SELECT_FOR_LOAD).fetchall()
            rows.sort(key=_by_position)
            sessions = self._decode(rows, check)
        finally:
            _rollback(conn)
        now, next_batch_id, link_state, failures, resume_at, _, _ = row
        return Snapshot(
            sessions=sessions,
            link=_link_record(self._where, link_state, failures, resume_at),
            stamps=stamps,
            next_batch_id=next_batch_id,
            now=now,
        )

    def verify(self) -> list[str]:
        """Check the file and the state in it; you get every problem found (empty if none).

        It runs SQLite's ``integrity_check``, then the rules :meth:`load`
        enforces on every session, then loads the state into an engine and
        runs ``Engine.check()``. Nothing is written. Reading a large database
        takes a few seconds; ``sessionfsm doctor --db PATH`` runs it.
        """
        try:
            checked = self._query("PRAGMA integrity_check", ())
        except StoreError as exc:
            checked = [(str(exc),)]
        problems = [f"sqlite: {message}" for (message,) in checked if message != "ok"]
        try:
            snapshot = self._read(lambda conn: self._load(conn, check=False))
        except StoreError as exc:
            return [*problems, str(exc)]
        if snapshot is None:
            return problems
        found = snapshot_problems(snapshot)
        problems.extend(found)
        if not found:
            from .engine import Engine  # the engine imports stores, not the reverse

            try:
                Engine(store=_Loaded(snapshot), log=False).check()
            except AssertionError as exc:
                problems.append(f"engine: {exc}")
            except SessionFSMError as exc:
                problems.append(f"engine: {exc}")
        return problems

    def save(self, delta: Delta) -> None:
        """Write one engine call's changes in one transaction, or raise ``StoreError``."""
        conn = self._live()
        if self.readonly:
            raise StoreError(f"cannot save to store {self._where}: it was opened read-only")
        changes = delta.changes
        positions, head, tail = number_places(delta, self._head, self._tail)
        where = positions.get
        rows: list[tuple[Any, ...]] = []
        append = rows.append
        for rec in delta.sessions:
            counts = rec.counts
            append(
                (
                    rec.id,
                    rec.state,
                    rec.lane,
                    counts[0],
                    counts[1],
                    counts[2],
                    rec.retry_at,
                    rec.dirty,
                    rec.attempts,
                    rec.dead_letter_reason,
                    rec.dead_lettered_at,
                    where(rec.id),
                )
            )
        link = delta.link
        engine_row = (
            delta.now,
            delta.next_batch_id,
            link.state,
            link.failures,
            link.resume_at,
            head,
            tail,
        )
        saved = self._stamps
        stamps = [
            (lane, at)
            for lane, at in delta.stamps.items()
            if lane not in saved or saved[lane] != at
        ]
        prune = self._since_prune + len(changes) >= self.history_retention.prune_every
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if rows:
                    conn.executemany(_UPSERT_SESSION, rows)
                if changes:
                    conn.executemany(_APPEND_HISTORY, map(msgspec.structs.astuple, changes))
                conn.execute(_UPDATE_ENGINE, engine_row)
                if stamps:
                    conn.executemany(_UPSERT_LANE, stamps)
                if prune:
                    self._prune(conn, delta.now)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise self._error("save to", exc) from exc
        # Only now that the file holds them do the counters move on.
        self._head, self._tail = head, tail
        saved.update(stamps)
        self._since_prune = 0 if prune else self._since_prune + len(changes)

    def close(self) -> None:
        """Close the database and release the file. Any later call raises ``StoreError``.

        A writable store also removes its lock file: a clean close leaves
        only the database behind.
        """
        conn, self._conn = self._conn, None
        if conn is not None:
            # Never on a file that was refused: it may be another application's.
            if self._opened and not self.readonly:
                with contextlib.suppress(sqlite3.Error):  # an optimisation only
                    conn.execute("PRAGMA optimize")
            conn.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            # Unlinked while still held, and only if it is still ours: a
            # process that opened it meanwhile finds it gone after its flock
            # and opens a new one (see _claim).
            lock_path = self._lock_path()
            with contextlib.suppress(OSError):
                if _same_file(fd, lock_path):
                    os.unlink(lock_path)
            os.close(fd)  # releases the lock

    # --------------------------------------------------------- maintenance

    def prune(self) -> int:
        """Drop history rows the retention policy no longer keeps; return how many.

        Saving prunes by itself every few thousand rows; call this to prune now.
        """
        conn = self._live()
        if self.readonly:
            raise StoreError(f"cannot prune store {self._where}: it was opened read-only")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = self._prune(conn, self._engine_row(conn)[0])
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            raise self._error("prune", exc) from exc
        self._since_prune = 0
        return deleted

    # -------------------------------------------------------- read helpers

    def history(self, session_id: str, *, limit: int | None = None) -> list[Change]:
        """The session's kept transitions, oldest first (the last ``limit`` if given).

        It scans the history, which is not indexed by session so that saving
        stays cheap: about 50 ms per million rows kept.
        """
        sql = (
            "SELECT session_id, source, target, event, reason, at, attempt FROM history "
            "WHERE session_id = ? ORDER BY seq DESC"
        )
        params: tuple[object, ...] = (session_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (session_id, limit)
        rows = self._query(sql, params)
        states = _STATES
        if not all(type(row[0]) is str and type(row[3]) is str for row in rows):
            raise StoreError(f"store {self._where} is damaged: a history row is malformed")
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
        rows = self._query(f"{_SELECT_SESSIONS} WHERE id = ?", (session_id,))
        if not rows:
            raise UnknownSession(session_id)
        return session_view(self._decode(rows)[0])

    def dead_letters(self, reason: str | None = None) -> list[SessionView]:
        """Dead letters as last saved (only ``reason``'s, if given), oldest first."""
        sql = f"{_SELECT_SESSIONS} WHERE state = 'dead_lettered'"
        params: tuple[object, ...] = ()
        if reason is not None:
            sql += " AND dead_letter_reason = ?"
            params = (reason,)
        rows = self._query(sql + " ORDER BY position", params)
        return [session_view(rec) for rec in self._decode(rows)]

    def counts(self) -> dict[SessionState, int]:
        """Deprecated name of :meth:`sessions_by_state`."""
        warnings.warn(
            "store.counts() is deprecated; use sessions_by_state()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.sessions_by_state()

    def sessions_by_state(self) -> dict[SessionState, int]:
        """How many sessions are in each state as last saved (every state present)."""
        counts = dict.fromkeys(SessionState, 0)
        for state, n in self._query("SELECT state, count(*) FROM session GROUP BY state", ()):
            if state not in _STATES:
                raise StoreError(f"store {self._where} is damaged: unknown state {state!r}")
            counts[_STATES[state]] = n
        return counts

    def link(self) -> LinkView:
        """The relay link as last saved."""
        row = self._engine_query()
        link = _link_record(self._where, row[2], row[3], row[4])
        problems = link_problems(link)
        if problems:
            raise StoreError(f"store {self._where} is damaged: {problems[0]}")
        return link_view(link)

    def now(self) -> float | None:
        """The engine clock when last saved, or None for a new database."""
        now = self._engine_query()[0]
        if now is not None and not isinstance(now, float):
            raise StoreError(f"store {self._where} is damaged: engine clock {now!r}")
        return now

    def _engine_query(self) -> Any:
        rows = self._query(_SELECT_ENGINE, ())
        if not rows:
            raise StoreError(f"store {self._where} is damaged: its engine row is missing")
        return rows[0]

    # ------------------------------------------------------------ internals

    def _check_path(self) -> None:
        """Refuse what SQLite would misread or silently create, before it opens anything."""
        path, where = self.path, self._where
        parent = path.parent
        if not parent.is_dir():
            raise StoreError(
                f"cannot open store {where}: directory {os.fspath(parent)!r} does not exist"
            )
        try:
            info = path.stat()
        except FileNotFoundError:
            if self.readonly:
                raise StoreError(
                    f"cannot open store {where} read-only: the file does not exist"
                ) from None
            if not os.access(parent, os.W_OK):
                raise StoreReadOnly(
                    f"cannot create store {where}: directory {os.fspath(parent)!r} is read-only"
                ) from None
            self._fresh = True
            return
        except OSError as exc:
            raise StoreError(f"cannot open store {where}: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise NotAStore(f"cannot open store {where}: it is not a regular file")
        self._fresh = not info.st_size
        if info.st_size:
            try:
                with path.open("rb") as f:
                    head = f.read(len(_MAGIC))
            except OSError as exc:
                raise StoreError(f"cannot open store {where}: {exc.strerror}") from exc
            if head != _MAGIC:
                raise NotAStore(
                    f"cannot open store {where}: it is not a SQLite database, "
                    "so not a sessionfsm database; it was left as it is"
                )
        if not self.readonly and (
            not info.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            or not os.access(path, os.W_OK)
            or not os.access(parent, os.W_OK)
        ):
            # Refused even for root: a file marked read-only is not ours to write.
            raise StoreReadOnly(
                f"cannot open store {where} for writing: the file or its directory is "
                "read-only (pass readonly=True to inspect it)"
            )

    def _open(self, conn: sqlite3.Connection, synchronous: str) -> None:
        """Recognise the file, create or migrate its schema, then set it up."""
        where = self._where
        try:
            if self._fresh and not self.readonly:
                # WAL before the first write: a process killed while creating
                # the schema then leaves uncommitted WAL frames, which every
                # reader ignores, never a hot rollback journal that only a
                # writer could undo.
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN" if self.readonly else "BEGIN IMMEDIATE")
            try:
                app_id, version, tables = _inspect(conn)
                if (
                    not self.readonly
                    and not (app_id or version or tables)
                    and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
                ):
                    # An empty database still in rollback mode: its creation
                    # was interrupted (SQLite itself switches to WAL through a
                    # rollback journal). Switch first, for the reason above.
                    conn.execute("ROLLBACK")
                    conn.execute("PRAGMA journal_mode = WAL")
                    conn.execute("BEGIN IMMEDIATE")
                    app_id, version, tables = _inspect(conn)
                if app_id != APPLICATION_ID:
                    if app_id or version or tables:
                        listed = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
                        raise NotAStore(
                            f"cannot open store {where}: it is another application's SQLite "
                            f"database (application_id {app_id}, tables: {listed or 'none'}); "
                            "it was left as it is"
                        )
                    if self.readonly:
                        raise NotAStore(
                            f"cannot open store {where} read-only: it is an empty SQLite "
                            "database, not a sessionfsm one"
                        )
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                elif version > SCHEMA_VERSION:
                    raise StoreTooNew(
                        f"cannot open store {where}: its schema version is {version}, newer "
                        f"than the {SCHEMA_VERSION} this sessionfsm knows; upgrade sessionfsm "
                        "(the file was left as it is)"
                    )
                elif version < 1:
                    raise NotAStore(f"cannot open store {where}: it has no schema version")
                elif version < SCHEMA_VERSION and self.readonly:
                    raise StoreError(
                        f"cannot open store {where} read-only: its schema version {version} "
                        "needs a migration; open it once without readonly=True"
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {target}")
                row = self._engine_row(conn)
                self._head, self._tail = row[5], row[6]
                self._stamps = dict(conn.execute("SELECT name, stamped_at FROM lane").fetchall())
                if not self.readonly:
                    self._prune(conn, row[0])
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            if self.readonly:
                conn.execute("PRAGMA query_only = ON")
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(f"cannot open store {where}: WAL mode refused ({mode})")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
            # About 64 MiB of page cache: a million sessions' rows stay hot.
            conn.execute("PRAGMA cache_size = -65536")
            # Checkpoint every ~80 MB of WAL rather than SQLite's 4 MB: a
            # checkpoint is where synchronous=normal syncs to disk, and with
            # small commits those syncs dominated the wall time of a save.
            conn.execute("PRAGMA wal_autocheckpoint = 20000")
            conn.execute("PRAGMA temp_store = MEMORY")
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc

    def _lock_path(self) -> str:
        return f"{os.fspath(self.path)}-lock"

    def _claim(self) -> None:
        """Hold ``<path>-lock`` for as long as the store is open (one writer per file)."""
        if sys.platform == "win32":  # pragma: no cover
            return
        lock_path = self._lock_path()
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StoreError(
                    f"cannot open store {self._where}: cannot open its lock file "
                    f"{lock_path!r}: {exc.strerror}"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise StoreLocked(
                    f"cannot open store {self._where}: another store holds it for writing "
                    f"(pid {holder}); close that one first, or pass readonly=True to inspect it"
                ) from None
            if _same_file(fd, lock_path):
                break
            # Its holder closed and removed it between our open and our
            # flock: this lock guards nothing any more; take the new file.
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _prune(self, conn: sqlite3.Connection, now: float | None) -> int:
        keep = self.history_retention
        deleted = 0
        if keep.max_rows is not None:
            deleted += conn.execute(_PRUNE_ROWS, (keep.max_rows,)).rowcount
        if keep.max_age_s is not None and now is not None:
            deleted += conn.execute(_PRUNE_AGE, (now - keep.max_age_s,)).rowcount
        return deleted

    def _engine_row(
        self, conn: sqlite3.Connection
    ) -> tuple[float | None, int, str, int, float | None, int, int]:
        row = conn.execute(_SELECT_ENGINE).fetchone()
        if row is None:
            raise StoreError(f"store {self._where} is damaged: its engine row is missing")
        return row  # type: ignore[no-any-return]

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self._where} is closed")
        return self._conn

    def _query(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        return self._read(lambda conn: conn.execute(sql, params).fetchall())

    def _read(self, read: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run one read, mapping every failure of a damaged file to ``StoreError``.

        An immutable reader checks the file did not change under it (a writer
        appeared, or checkpointed); if it did, it reconnects and reads again.
        """
        for _ in range(5):
            conn = self._live()
            if self._immutable and self._file_signature() != self._signature:
                self._reconnect()
                continue
            try:
                result = read(conn)
            except sqlite3.Error as exc:
                if self._immutable and self._file_signature() != self._signature:
                    continue
                raise self._error("read", exc) from exc
            except MemoryError:
                # SQLite reports some damaged pages as out of memory.
                raise StoreError(
                    f"cannot read store {self._where}: it is damaged (SQLite ran out of memory "
                    "decoding a page); `sessionfsm doctor` checks it"
                ) from None
            if not self._immutable or self._file_signature() == self._signature:
                return result
        raise StoreLocked(f"cannot read store {self._where}: it kept changing while being read")

    def _file_signature(self) -> tuple[int, ...]:
        """What changes when a writer touches the file: its WAL, size and times."""
        try:
            info = os.stat(self.path)
        except OSError:
            return ()
        wal = os.path.exists(f"{os.fspath(self.path)}-wal")
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, wal)

    def _connect(self) -> None:
        """Open the connection: read-write, read-only, or read-only and immutable."""
        if self.readonly:
            self._signature = self._file_signature()
            wal = bool(self._signature and self._signature[-1])
            self._immutable = not wal or _on_read_only_fs(self.path)
            mode = "ro&immutable=1" if self._immutable else "ro"
        else:
            mode = "rwc"
        try:
            conn = sqlite3.connect(
                f"{self.path.absolute().as_uri()}?mode={mode}",
                uri=True,
                timeout=self._timeout,
                isolation_level=None,  # we BEGIN and COMMIT ourselves
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        self._conn = conn
        self._open(conn, self._synchronous)

    def _reconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._connect()

    def _decode(self, rows: Iterable[Any], check: bool = True) -> list[SessionRecord]:
        try:
            return _records(rows, check)
        except _Damaged as exc:
            raise StoreError(
                f"store {self._where} is damaged: {exc}; nothing was loaded "
                f"(`sessionfsm doctor --db {os.fspath(self.path)}` lists every problem)"
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(
                f"store {self._where} is damaged: bad session row (unknown value {exc})"
            ) from None

    def _error(self, doing: str, exc: sqlite3.Error) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        where = self._where
        if code in (_BUSY, _LOCKED):
            return StoreLocked(
                f"cannot {doing} store {where}: the database is locked by another process "
                f"(waited {self._timeout:g} s)"
            )
        if code == _READONLY:
            if self.readonly:
                return StoreReadOnly(
                    f"cannot {doing} store {where} read-only: the process writing it stopped "
                    "without closing it, and only a writer can recover its last changes; start "
                    f"the service, or open it once for writing as the file's owner ({exc})"
                )
            return StoreReadOnly(f"cannot {doing} store {where}: the database is read-only ({exc})")
        if code == _NOTADB:
            return NotAStore(f"cannot {doing} store {where}: it is not a SQLite database")
        if code == _CORRUPT:
            return StoreError(
                f"cannot {doing} store {where}: it is damaged ({exc}); `sessionfsm doctor` "
                "checks it"
            )
        return StoreError(f"cannot {doing} store {where}: {exc}")


class _Loaded:
    """A store that hands out one snapshot and keeps nothing: for verify()."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def load(self) -> Snapshot:
        return self._snapshot

    def save(self, delta: Delta) -> None:
        pass

    def close(self) -> None:
        pass


def _same_file(fd: int, path: str) -> bool:
    """Whether the open ``fd`` is still the file at ``path``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _on_read_only_fs(path: Path) -> bool:
    """Whether the file sits on a file system mounted read-only: nobody can write it."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs (Windows)
        return False


def _inspect(conn: sqlite3.Connection) -> tuple[int, int, list[str]]:
    """The file's application id, schema version and table names."""
    app_id: int = conn.execute("PRAGMA application_id").fetchone()[0]
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    query = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    return app_id, version, [name for (name,) in conn.execute(query)]


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        # The original error is the one to report; SQLite rolls back on close anyway.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class _Damaged(ValueError):
    """A row breaks a rule of :mod:`sessionfsm.validation`; the message says which."""


def _records(rows: Iterable[Any], check: bool = True) -> list[SessionRecord]:
    """Rows of ``_SELECT_SESSIONS`` as records (a trailing position is ignored):
    the hot loop of a recovery.

    It screens each row on the columns it already holds, which costs far less
    than a second pass; a row the screen flags is checked in full by
    :func:`~sessionfsm.validation.record_problems` and, if it breaks a rule,
    refused with ``_Damaged``. ``check=False`` reads rows as they are, for
    :meth:`SqliteStore.verify` to report every problem.
    """
    states, lanes, zero, make = _STATES, _LANES, ZERO_COUNTS, SessionRecord
    backoff, dead, synced = SessionState.BACKOFF, SessionState.DEAD_LETTERED, SessionState.SYNCED
    inf = math.inf
    out: list[SessionRecord] = []
    append = out.append
    for sid, state, lane, c0, c1, c2, retry_at, dirty, attempts, reason, at, *_ in rows:
        st = states[state]
        rec = make(
            sid,
            st,
            lanes[lane],
            (c0, c1, c2) if c0 or c1 or c2 else zero,
            retry_at,
            dirty == 1,
            attempts,
            reason,
            at,
        )
        if check and (
            type(attempts) is not int
            or attempts < 0
            or (retry_at is None) == (st is backoff)
            or (reason is None) == (st is dead)
            or (
                (c0 or c1 or c2)
                and (
                    st is dead
                    or st is synced
                    or not (type(c0) is int and type(c1) is int and type(c2) is int)
                    or c0 < 0
                    or c1 < 0
                    or c2 < 0
                )
            )
            or (retry_at is not None and not -inf < retry_at < inf)
            or (st is dead and at is None)
            or type(sid) is not str
            or not sid
        ):
            problems = record_problems(rec)
            if problems:
                raise _Damaged(problems[0])
        append(rec)
    return out


def _link_record(where: str, state: str, failures: int, resume_at: float | None) -> LinkRecord:
    try:
        return LinkRecord(state=_LINK_STATES[state], failures=failures, resume_at=resume_at)
    except KeyError:
        raise StoreError(f"store {where} is damaged: unknown link state {state!r}") from None
