"""Faults never cost a session: hostile input, failed saves, refused stores."""

from __future__ import annotations

import contextlib
import random
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionfsm import (
    Engine,
    HistoryRetention,
    InvalidAck,
    MemoryStore,
    NotAStore,
    SqliteStore,
    StoreError,
    StoreLocked,
    StoreReadOnly,
    StoreTooNew,
    TransitionNotAllowed,
    UsageError,
    acks,
)
from tests.conftest import SMALL_POLICY, FailingStore, filled_store
from tests.strategies import fault_scripts, hostile_objects, hostile_wire

# ------------------------------------------------------------ decoding


@given(data=hostile_wire)
def test_decode_raises_only_invalid_ack_or_usage_error(data: Any) -> None:
    """decode and decode_message turn any input into an ack or a sessionfsm error."""
    for decode in (acks.decode, acks.decode_message):
        with contextlib.suppress(InvalidAck, UsageError):
            decode(data)


def test_deeply_nested_json_is_an_invalid_ack() -> None:
    """A 2 KB message nested 1000 deep is the relay's fault, not a RecursionError."""
    deep = b'{"type":"Ok","x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    with pytest.raises(InvalidAck, match="nested too deeply"):
        acks.decode(deep)
    with pytest.raises(InvalidAck, match="nested too deeply"):
        acks.decode_message(b'{"batch_id":1,"ack":' + b"[" * 1000 + b"]" * 1000 + b"}")


def test_text_with_a_lone_surrogate_is_an_invalid_ack() -> None:
    """A str that is not valid Unicode came from a broken wire: InvalidAck."""
    with pytest.raises(InvalidAck, match="unpaired surrogate"):
        acks.decode('{"type":"Ok"}\udcff')
    with pytest.raises(InvalidAck, match="unpaired surrogate"):
        acks.decode_message("\udcff")


def test_decoding_something_that_is_not_json_text_is_a_usage_error() -> None:
    """Passing an int or None to a decoder is the caller's mistake."""
    with pytest.raises(UsageError, match="bytes or str, got int"):
        acks.decode(5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="bytes or str, got NoneType"):
        acks.decode_message(None)  # type: ignore[arg-type]


def _engine_with_a_batch() -> tuple[Engine, int]:
    engine = Engine(SMALL_POLICY, rng=random.Random(0), log=False)
    engine.enqueue("s1", now=0.0)
    (batch,) = engine.tick(0.0)
    return engine, batch.id


@given(batch_id=hostile_objects | st.integers(), ack=hostile_objects, message=hostile_objects)
def test_on_ack_and_on_message_raise_only_sessionfsm_errors(
    batch_id: Any, ack: Any, message: Any
) -> None:
    """on_ack and on_message turn any input into a result or InvalidAck/UsageError."""
    engine, _ = _engine_with_a_batch()
    with contextlib.suppress(InvalidAck, UsageError):
        engine.on_ack(batch_id, ack, 1.0)
    with contextlib.suppress(InvalidAck, UsageError):
        engine.on_message(message, 1.0)
    engine.check()


def test_misused_ack_calls_are_usage_errors_and_change_nothing() -> None:
    """A list as batch id, or a non-BatchAck message, is a UsageError, not a TypeError."""
    engine, batch_id = _engine_with_a_batch()
    before = engine.debug_state()
    with pytest.raises(UsageError, match="batch_id must be an int, got list"):
        engine.on_ack([1], acks.Ok(), 1.0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"takes an acks.BatchAck .*got dict"):
        engine.on_message({"batch_id": batch_id}, 1.0)  # type: ignore[arg-type]
    assert engine.debug_state() == before
    assert engine.now == 0.0


def test_a_refused_redrive_does_not_move_the_clock() -> None:
    """redrive of a session that is not dead-lettered raises and leaves the clock alone."""
    engine, _ = _engine_with_a_batch()
    with pytest.raises(TransitionNotAllowed):
        engine.redrive("s1", 99.0)
    assert engine.now == 0.0


# ------------------------------------------------------------ session ids


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("\udcff", "encode as UTF-8"),
        ("", "must not be empty"),
        ("é" * 513, "at most 1024 bytes"),
        (b"s1", "must be a str, got bytes"),
        (7, "must be a str, got int"),
    ],
)
@pytest.mark.parametrize("kind", ["none", "memory", "sqlite"])
def test_an_invalid_session_id_is_refused_at_the_door_for_every_store(
    bad: Any, why: str, kind: str, db_path: Any
) -> None:
    """enqueue refuses a bad id with UsageError and it never enters memory or the file."""
    store = {"none": None, "memory": MemoryStore(), "sqlite": SqliteStore(db_path)}[kind]
    engine = Engine(store=store, log=False)
    engine.enqueue("before", now=0.0)
    with pytest.raises(UsageError, match=why):
        engine.enqueue(bad)
    engine.enqueue("after")
    assert bad not in engine
    if isinstance(store, SqliteStore):
        store.close()
        store = SqliteStore(db_path)
    if store is not None:
        assert [s.id for s in Engine(store=store, log=False).sessions()] == ["before", "after"]
        store.close()


def test_the_longest_allowed_id_round_trips_through_sqlite(db_path: Any) -> None:
    """An id of exactly 1024 UTF-8 bytes is accepted and saved."""
    longest = "é" * 512
    with SqliteStore(db_path) as store:
        Engine(store=store, log=False).enqueue(longest, now=0.0)
    with SqliteStore(db_path) as store:
        assert longest in Engine(store=store, log=False)


# ------------------------------------------------------- a failed save


def test_a_tick_whose_save_fails_charges_nobody_later(db_path: Any) -> None:
    """A tick that raises StoreError takes its batch back: no AckTimeout is charged later."""
    store = FailingStore(SqliteStore(db_path))
    engine = Engine(SMALL_POLICY, store=store, log=False)
    engine.enqueue("s1", now=0.0)
    for t in (1.0, 2.0, 3.0):
        store.fail_next("locked")
        with pytest.raises(StoreError):
            engine.tick(t)
        engine.check()
        assert engine.session("s1").state == "queued"
        assert engine.session("s1").attempts == 0
        assert engine.in_flight() == []
    (batch,) = engine.tick(100.0)  # sent now, for real
    assert batch.session_ids == ("s1",)
    assert engine.tick(200.0) == []  # timed out: charged once, for that one send
    view = engine.session("s1")
    assert view.charges == {"AckTimeout": 1}
    assert view.attempts == 1
    store.close()


# --------------------------------------------------- refuse before writing


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _history_rows(path: Path) -> int:
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM history").fetchone()[0])
    finally:
        conn.close()


def test_a_store_refused_for_a_lock_has_written_nothing(
    db_path: Path, held_store: Callable[[Path], Any]
) -> None:
    """Opening a store another process holds raises StoreLocked before pruning its history."""
    filled_store(db_path)
    rows = _history_rows(db_path)
    assert rows > 60
    holder = held_store(db_path)
    before = _files(db_path.parent)
    with pytest.raises(StoreLocked, match=f"pid {holder.proc.pid}"):
        SqliteStore(db_path, history_retention=HistoryRetention(max_rows=0))
    assert _files(db_path.parent) == before
    assert _history_rows(db_path) == rows
    holder.stop()
    with SqliteStore(db_path, readonly=True) as reader:
        assert len(reader.history("s000")) > 0


def _too_new(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 42")
    conn.close()


def _read_only_file(path: Path) -> None:
    path.chmod(0o444)


@pytest.mark.parametrize(
    ("spoil", "error"),
    [(_too_new, StoreTooNew), (_foreign, NotAStore), (_read_only_file, StoreReadOnly)],
)
def test_every_refusal_leaves_the_file_and_its_directory_as_they_were(
    db_path: Path, spoil: Callable[[Path], None], error: type[Exception]
) -> None:
    """A store refused for its schema, owner or permissions changes no byte and adds no file."""
    filled_store(db_path)
    spoil(db_path)
    before = _files(db_path.parent)
    with pytest.raises(error):
        SqliteStore(db_path, history_retention=HistoryRetention(max_rows=0))
    assert _files(db_path.parent) == before


def test_a_clean_close_leaves_no_lock_file(db_path: Path) -> None:
    """After a writable store closes, only the database is left: no ``-lock`` file."""
    with SqliteStore(db_path) as store:
        Engine(store=store, log=False).enqueue("s1", now=0.0)
        assert Path(f"{db_path}-lock").exists()
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]
    with SqliteStore(db_path) as again:  # the lock still excludes a second writer
        with pytest.raises(StoreLocked):
            SqliteStore(db_path)
        assert again.load() is not None


# ------------------------------------------------ read-only means read-only


def _owned_by(directory: Path, uid: int) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.stat().st_uid == uid)


def test_a_second_user_reads_a_cleanly_closed_store_in_a_directory_it_cannot_write(
    shared_dir: Callable[[int], Path], as_other_user: Callable[..., Any]
) -> None:
    """status, dead-letters, history and doctor work as another user and change nothing."""
    directory = shared_dir(0o755)
    db = directory / "s.db"
    filled_store(db)
    before = _files(directory)
    for args in (
        ("status", "--json"),
        ("dead-letters", "--json"),
        ("history", "s000"),
        ("doctor",),
    ):
        done = (
            as_other_user(*args, "--db", str(db))
            if args[0] != "history"
            else (as_other_user("history", "--db", str(db), "s000"))
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
    assert _files(directory) == before


def test_a_second_user_reads_a_live_store_and_the_service_keeps_working(
    shared_dir: Callable[[int], Path],
    as_other_user: Callable[..., Any],
    other_user: tuple[int, int],
) -> None:
    """A reader in a shared directory leaves no file of its own; the service then redrives."""
    directory = shared_dir(0o1777)
    db = directory / "s.db"
    filled_store(db)
    # Cleanly closed first, then live: neither may leave the reader's files behind.
    done = as_other_user("status", "--json", "--db", str(db))
    assert done.returncode == 0, done.stderr
    assert _owned_by(directory, other_user[0]) == []
    with SqliteStore(db) as store:
        engine = Engine(SMALL_POLICY, store=store, log=False)
        dead = [view.id for view in engine.dead_letters()]
        assert dead
        for args in (("status", "--json"), ("dead-letters", "--json"), ("doctor",)):
            done = as_other_user(*args, "--db", str(db))
            assert done.returncode == 0, done.stderr
        assert _owned_by(directory, other_user[0]) == []
        engine.redrive(dead[0], engine.now + 1)
        engine.redrive_all(engine.now + 2)
        engine.enqueue("new", now=engine.now + 3)
        assert engine.tick(engine.now + 100)
    with SqliteStore(db, readonly=True) as reader:
        assert reader.dead_letters() == []
        assert reader.session("new").state != "dead_lettered"


def test_a_second_user_reads_a_consistent_state_while_the_service_writes(
    shared_dir: Callable[[int], Path], as_other_user: Callable[..., Any]
) -> None:
    """doctor run as another user during a stream of saves finds every invariant intact."""
    import threading

    directory = shared_dir(0o755)
    db = directory / "s.db"
    filled_store(db)
    stop = threading.Event()
    saves = 0

    def serve() -> None:
        nonlocal saves
        with SqliteStore(db) as store:
            engine = Engine(SMALL_POLICY, store=store, rng=random.Random(2), log=False)
            t = engine.now
            i = 0
            while not stop.is_set():
                t += 7.0
                engine.enqueue(f"live{i % 50}", now=t)
                for batch in engine.tick(t):
                    engine.on_ack(batch.id, (acks.Ok(), acks.RateLimited())[batch.id % 2], t)
                i += 1
                saves += 1

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(3):
            done = as_other_user("doctor", "--db", str(db))
            assert done.returncode == 0, done.stdout + done.stderr
            assert done.stdout.strip().endswith(": ok")
    finally:
        stop.set()
        server.join()
    assert saves > 0


def test_a_store_on_a_read_only_mount_can_be_read(
    tmp_path: Path, read_only_mount: Callable[[], None]
) -> None:
    """readonly=True reads a database on a file system mounted read-only; writing is refused."""
    db = tmp_path / "ro" / "s.db"
    filled_store(db)
    with SqliteStore(db, readonly=True) as reader:
        expected = (reader.sessions_by_state(), reader.dead_letters(), reader.history("s001"))
    read_only_mount()
    with SqliteStore(db, readonly=True) as reader:
        assert (
            reader.sessions_by_state(),
            reader.dead_letters(),
            reader.history("s001"),
        ) == expected
        assert reader.verify() == []
        assert reader.load() is not None
    with pytest.raises(StoreReadOnly):
        SqliteStore(db)


def test_an_immutable_reader_sees_a_writer_that_starts_after_it(db_path: Path) -> None:
    """A read-only store opened on a closed file still sees what a later writer saves."""
    filled_store(db_path)
    with SqliteStore(db_path, readonly=True) as reader:
        total = sum(reader.sessions_by_state().values())
        with SqliteStore(db_path) as store:
            Engine(SMALL_POLICY, store=store, log=False).enqueue("later", now=10_000.0)
            assert sum(reader.sessions_by_state().values()) == total + 1
            assert reader.session("later").state == "queued"
        assert sum(reader.sessions_by_state().values()) == total + 1


# ------------------------------------------- corruption and load validation


def _memory_error_corruption(db: Path, session_id: str) -> bytes:
    """Bytes of ``db`` with 32 bytes of 0xFF in a page, chosen so that plain
    sqlite3 raises MemoryError reading ``session_id``'s history."""
    data = db.read_bytes()
    conn = sqlite3.connect(db)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = [n for (n,) in conn.execute("SELECT pageno FROM dbstat WHERE name = 'history'")]
    conn.close()
    probe = db.with_name("probe.db")
    for start in ((n - 1) * page for n in pages):
        for offset in range(0, page, 8):
            spoiled = bytearray(data)
            spoiled[start + offset : start + offset + 32] = b"\xff" * 32
            probe.write_bytes(spoiled)
            conn = sqlite3.connect(probe)
            try:  # what the bytes do to SQLite itself, not to sessionfsm
                conn.execute("SELECT * FROM history WHERE session_id = ?", (session_id,)).fetchall()
            except MemoryError:
                return bytes(spoiled)
            except sqlite3.Error:
                pass
            finally:
                conn.close()
    raise AssertionError("no 32-byte corruption makes SQLite run out of memory")


def test_a_damaged_history_page_is_a_store_error_naming_the_file(
    db_path: Path, sessionfsm_cli: Callable[..., Any]
) -> None:
    """A page that makes SQLite report out-of-memory is a StoreError, and one CLI line."""
    filled_store(db_path, sessions=300, rounds=5)
    db_path.write_bytes(_memory_error_corruption(db_path, "s005"))
    with SqliteStore(db_path, readonly=True) as reader:
        with pytest.raises(StoreError, match=re.escape(repr(str(db_path)))):
            reader.history("s005")
        assert reader.verify() != []
    result = sessionfsm_cli("history", "--db", str(db_path), "s005")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("sessionfsm: error: cannot read store")
    result = sessionfsm_cli("doctor", "--db", str(db_path))
    assert result.exit_code == 1


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("UPDATE session SET retry_at = 5.0 WHERE state = 'synced'", "invariant 10"),
        (
            "UPDATE session SET dead_letter_reason = NULL WHERE state = 'dead_lettered'",
            "invariant 7",
        ),
        ("UPDATE session SET rate_limits = -1 WHERE state = 'backoff'", "counts must be"),
        ("UPDATE session SET ack_timeouts = 'many' WHERE state = 'backoff'", "counts must be"),
        ("UPDATE session SET attempts = 'x' WHERE state = 'queued'", "attempts must be"),
        ("UPDATE session SET too_large = 1 WHERE state = 'dead_lettered'", "invariant 3"),
        ("UPDATE engine SET link_failures = -3", "link: failures"),
        ("UPDATE engine SET next_batch_id = 0", "next batch id"),
    ],
)
def test_a_state_that_breaks_an_invariant_is_refused_on_load(
    db_path: Path, sql: str, rule: str, sessionfsm_cli: Callable[..., Any]
) -> None:
    """load raises StoreError naming the session and the rule; no engine starts on it."""
    filled_store(db_path)
    conn = sqlite3.connect(db_path)
    with conn:
        assert conn.execute(sql).rowcount > 0
    conn.close()
    with SqliteStore(db_path) as store:
        with pytest.raises(StoreError, match=rule) as caught:
            Engine(SMALL_POLICY, store=store, log=False)
        if not rule.startswith(("link", "next")):
            assert "session 's" in str(caught.value)
        problems = store.verify()
        assert any(rule in problem for problem in problems)
    result = sessionfsm_cli("doctor", "--db", str(db_path))
    assert result.exit_code == 1
    assert rule in result.output


def test_a_healthy_store_verifies_clean(db_path: Path, sessionfsm_cli: Callable[..., Any]) -> None:
    """verify() finds nothing wrong with a store an engine wrote; doctor says ok."""
    filled_store(db_path)
    with SqliteStore(db_path) as store:
        assert store.verify() == []
    result = sessionfsm_cli("doctor", "--db", str(db_path))
    assert result.exit_code == 0
    assert result.output.strip().endswith(": ok")


def test_the_read_helpers_refuse_a_damaged_row(db_path: Path) -> None:
    """session, dead_letters, sessions_by_state and link name the damage instead of crashing."""
    filled_store(db_path)
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE session SET state = 'lost' WHERE id = 's000'")
        conn.execute("UPDATE session SET attempts = 'x' WHERE state = 'dead_lettered'")
        conn.execute("UPDATE engine SET link_state = 'sideways'")
    conn.close()
    dead = "SELECT id FROM session WHERE state = 'dead_lettered' LIMIT 1"
    with SqliteStore(db_path, readonly=True) as reader:
        for call in (
            reader.sessions_by_state,
            reader.dead_letters,
            reader.link,
            lambda: reader.session("s000"),
            lambda: reader.session(reader._query(dead, ())[0][0]),
        ):
            with pytest.raises(StoreError, match="is damaged"):
                call()


# ------------------------------------- random calls against a failing store


def _saved_state(engine: Engine) -> dict[str, Any]:
    state = engine.debug_state()
    return {
        "sessions": state["sessions"],
        "link": state["link"],
        "now": engine.now,
        "stamps": {lane.value: at for lane, at in state["stamps"].items()},
    }


def _file_state(db: Path) -> dict[str, Any]:
    with SqliteStore(db, readonly=True) as reader:
        snapshot = reader.load()
    assert snapshot is not None
    return {
        "sessions": {rec.id: msgspec.to_builtins(rec) for rec in snapshot.sessions},
        "link": msgspec.to_builtins(snapshot.link),
        "now": snapshot.now,
        "stamps": {lane: snapshot.stamps.get(lane) for lane in ("incremental", "backfill")},
    }


def _call(engine: Engine, call: tuple[Any, ...], sends: Counter[str]) -> None:
    t = engine.now
    match call:
        case ("enqueue", sid, lane):
            engine.enqueue(sid, lane, now=t + 0.5)
        case ("tick", dt):
            for batch in engine.tick(t + dt):
                sends.update(batch.session_ids)
        case ("ack" | "acks", pick, ack):
            open_batches = engine.in_flight()
            if open_batches:
                batch = open_batches[pick % len(open_batches)]
                answer = ack if call[0] == "ack" else dict.fromkeys(batch.session_ids[:2], ack)
                engine.on_ack(batch.id, answer, t + 0.5)
        case ("redrive", pick):
            dead = engine.dead_letters()
            if dead:
                engine.redrive(dead[pick % len(dead)].id, t + 0.5)
        case ("redrive_all",):
            engine.redrive_all(t + 0.5)
        case ("ready",):
            engine.relay_ready(t + 0.5)
        case ("unavailable",):
            engine.relay_unavailable(t + 0.5)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(script=fault_scripts)
def test_random_calls_against_a_failing_store_never_lose_or_charge_anything(
    script: list[tuple[tuple[Any, ...], str | None]],
) -> None:
    """After every call, failed or not: Engine.check() holds, the file holds the state
    of the last successful call, and no session is charged more than it was sent."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "s.db"
        store = FailingStore(SqliteStore(db, timeout=0))
        engine = Engine(SMALL_POLICY, store=store, rng=random.Random(0), log=False)
        engine.enqueue("s0", now=0.0)
        last_saved = _saved_state(engine)
        sends: Counter[str] = Counter()
        for call, fault in script:
            if fault is not None:
                store.fail_next(fault)
            failures, saves = store.failures, store.saves
            try:
                _call(engine, call, sends)
            except StoreError:
                assert store.failures == failures + 1, "only the injected fault may fail"
            if store.saves > saves:
                last_saved = _saved_state(engine)
            store.fail_next(None)  # a call that saved nothing never met its fault
            engine.check()
            assert _file_state(db) == last_saved
            for view in engine.sessions():
                charged = sum(view.charges.values())
                assert charged <= sends[view.id], (
                    f"{view.id} charged {charged}, sent {sends[view.id]}"
                )
                assert view.attempts <= sends[view.id]
        store.close()
        with SqliteStore(db) as reopened:
            recovered = Engine(SMALL_POLICY, store=reopened, log=False)
            recovered.check()
            assert set(recovered.debug_state()["sessions"]) == set(last_saved["sessions"])


def test_a_second_user_reads_what_a_killed_writer_left(
    shared_dir: Callable[[int], Path], as_other_user: Callable[..., Any]
) -> None:
    """A writer killed mid-run leaves its -wal and -shm; another user still reads the
    last saved state from them, and a new writer then recovers the file as usual."""
    import signal
    import subprocess
    import sys

    directory = shared_dir(0o755)
    db = directory / "s.db"
    code = (
        "import os, signal\n"
        "from sessionfsm import Engine, SqliteStore\n"
        f"engine = Engine(store=SqliteStore({str(db)!r}), log=False)\n"
        "for i in range(50):\n"
        "    engine.enqueue(f's{i}', now=float(i))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False)
    assert done.returncode == -signal.SIGKILL
    assert Path(f"{db}-wal").exists()
    before = _files(directory)
    read = as_other_user("status", "--json", "--db", str(db))
    assert read.returncode == 0, read.stderr
    assert msgspec.json.decode(read.stdout)["counts"]["queued"] == 50
    assert _files(directory) == before
    with SqliteStore(db) as store:
        assert len(Engine(store=store, log=False)) == 50


@given(now=hostile_objects | st.integers() | st.floats())
def test_any_time_is_a_time_or_a_usage_error(now: Any) -> None:
    """Every call taking ``now`` accepts a usable time or raises UsageError, never
    OverflowError or TypeError, and a refused time changes nothing."""
    engine, batch_id = _engine_with_a_batch()
    engine.enqueue("dead", now=0.0)
    calls: list[Callable[[], object]] = [
        lambda: engine.tick(now),
        lambda: engine.enqueue("s2", now=now),
        lambda: engine.on_ack(batch_id, acks.Ok(), now),
        lambda: engine.relay_ready(now),
        lambda: engine.relay_unavailable(now),
        lambda: engine.redrive_all(now),
    ]
    for call in calls:
        before = engine.debug_state(), engine.now
        try:
            call()
        except UsageError:
            assert (engine.debug_state(), engine.now) == before
        engine.check()
