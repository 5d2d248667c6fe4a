"""The database a simulation writes, and how a new run treats an old one.

A simulation persists through the real :class:`~sessionfsm.SqliteStore`, so
``sessionfsm status``, ``dead-letters`` and ``history`` work on its result.
A new run must never silently mix with whatever the file already holds, and
running ``sessionfsm simulate`` twice in a row must just work. So:

* a missing file, or one with no sessions, is used as it is;
* a file that an earlier simulation wrote is replaced, with a notice;
* a file holding sessions that no simulation wrote (a real service's state)
  is refused, unless you pass ``fresh=True`` (``--fresh``);
* a file that is not a sessionfsm database, or is held by another process,
  is never touched: the store's own error says why.

A simulation marks its file with one extra table, ``sessionfsm_simulation``
(scenario, seed, policy, when). The store ignores it; nothing else reads it.
"""

from __future__ import annotations

import datetime
import sqlite3
from pathlib import Path
from typing import Final

from sessionfsm._errors import StoreError, UsageError
from sessionfsm.sqlite_store import SqliteStore

__all__ = ["DEFAULT_DB", "MARKER_TABLE", "mark", "open_for_simulation", "simulated_by"]

#: Where ``sessionfsm`` keeps its state unless told otherwise.
DEFAULT_DB: Final = Path("sessionfsm.db")
MARKER_TABLE: Final = "sessionfsm_simulation"


class DatabaseInUse(UsageError):
    """The database holds a real engine's sessions; a simulation will not overwrite them."""


def simulated_by(path: Path) -> str | None:
    """The scenario that last simulated into ``path``, or None if none did."""
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(
            f"SELECT scenario FROM {MARKER_TABLE} ORDER BY rowid DESC LIMIT 1"
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def mark(path: Path, scenario: str, seed: int, policy: str) -> None:
    """Record in ``path`` that a simulation wrote it."""
    try:
        conn = sqlite3.connect(path, timeout=5.0)
        try:
            with conn:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {MARKER_TABLE} "
                    "(scenario TEXT NOT NULL, seed INTEGER NOT NULL, policy TEXT NOT NULL, "
                    "started_at TEXT NOT NULL)"
                )
                conn.execute(
                    f"INSERT INTO {MARKER_TABLE} VALUES (?, ?, ?, ?)",
                    (scenario, seed, policy, datetime.datetime.now(datetime.UTC).isoformat()),
                )
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot mark {str(path)!r} as a simulation: {exc}") from None


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def open_for_simulation(path: Path, *, fresh: bool = False) -> tuple[SqliteStore, str | None]:
    """Open ``path`` for a new simulation; return the store and a notice, if any.

    Raises :class:`DatabaseInUse` for a real engine's database (unless
    ``fresh``) and the store's own ``StoreError`` for anything it refuses.
    """
    notice: str | None = None
    if path.exists():
        # Opening for writing first also proves no other process holds it.
        store = SqliteStore(path)
        sessions = sum(store.sessions_by_state().values())
        store.close()
        if sessions:
            previous = simulated_by(path)
            if previous is None and not fresh:
                raise DatabaseInUse(
                    f"{str(path)!r} holds {sessions} sessions that no simulation wrote; "
                    "pass --fresh to replace them, or --db to simulate into another file"
                )
            try:
                _remove(path)
            except OSError as exc:
                raise StoreError(f"cannot replace {str(path)!r}: {exc.strerror}") from None
            what = f"simulation of {previous!r}" if previous else f"{sessions} sessions"
            notice = f"replaced the previous {what} in {path}"
    return SqliteStore(path), notice
