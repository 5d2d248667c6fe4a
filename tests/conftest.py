"""Every shared fixture lives here; hypothesis strategies live in strategies.py.

Profiles: ``dev`` (fast, the default on a workstation) and ``ci`` (many more
examples; chosen when ``CI`` is set, or with ``HYPOTHESIS_PROFILE=ci``).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click.testing
import pytest
import structlog
from hypothesis import HealthCheck, settings

from sessionfsm import Batch, Engine, MemoryStore, Policy, SqliteStore, Store
from sessionfsm.testing import EngineHarness, FakeClock, ScriptedRelay

settings.register_profile(
    "ci",
    max_examples=1000,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=100, stateful_step_count=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


#: A policy small enough that every path is reached in a few ticks.
SMALL_POLICY = Policy(
    batch_size=3,
    incremental_interval_s=10.0,
    backfill_batch_size=2,
    backfill_interval_s=0.0,
    ack_timeout_s=20.0,
    tick_interval_s=5.0,
)


@pytest.fixture
def policy() -> Policy:
    """The service's default policy."""
    return Policy()


@pytest.fixture
def small_policy() -> Policy:
    return SMALL_POLICY


@pytest.fixture
def engine(policy: Policy) -> Engine:
    """A compiled engine with the default policy, seeded, logging off."""
    return Engine(policy, rng=random.Random(0), log=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def relay() -> ScriptedRelay:
    return ScriptedRelay()


@pytest.fixture
def harness(engine: Engine, relay: ScriptedRelay, clock: FakeClock) -> EngineHarness:
    return EngineHarness(engine, relay, clock)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Undo any structlog.configure a CLI test did, so log levels never leak."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Log events the engine emits, as dicts (structlog.testing.capture_logs)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def logged_engine(policy: Policy) -> Engine:
    """Like ``engine`` but with logging on (use with ``logs``)."""
    return Engine(policy, rng=random.Random(0), log=True)


Cycle = Callable[..., list[Batch]]


@pytest.fixture
def cycle() -> Cycle:
    """``cycle(engine, now, ack)``: tick at ``now``, then answer every batch
    with ``ack`` (one ack for all, or a {session: ack} mapping) at ``now``.
    Returns the batches that were sent."""

    def run(engine: Engine, now: float, ack: Any = None) -> list[Batch]:
        batches = engine.tick(now)
        if ack is not None:
            for batch in batches:
                engine.on_ack(batch.id, ack, now=now)
        return batches

    return run


# --------------------------------------------------- simulation and the CLI


@pytest.fixture
def sessionfsm_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., click.testing.Result]:
    """``sessionfsm_cli(*args)`` runs the command line in a fresh directory
    (``tmp_path``, so the default ``./sessionfsm.db`` is private to the test).
    Exceptions other than exits propagate: an error path must never traceback."""
    from sessionfsm.cli import main

    monkeypatch.chdir(tmp_path)
    runner = click.testing.CliRunner()

    def invoke(*args: str) -> click.testing.Result:
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def scenario_file(tmp_path: Path) -> Callable[..., Path]:
    """``scenario_file(text, name="custom.toml")`` writes a scenario file and
    returns its path."""

    def write(text: str, name: str = "custom.toml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def counted_logs() -> Iterator[Any]:
    """A ``sessionfsm.sim.LogCounter`` that every structlog event passes through
    (nothing is printed); pass it to ``Simulation(log_counter=...)``."""
    from sessionfsm.sim import LogCounter
    from sessionfsm.sim.command import counting_logs

    counter = LogCounter()
    with counting_logs(counter, "critical"):
        yield counter


# ------------------------------------------------------------------- stores


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where this test's SQLite store lives; the file does not exist yet."""
    return tmp_path / "sessions.db"


@pytest.fixture
def open_store(any_store: Callable[..., Store]) -> Callable[..., Store]:
    """``open_store(**kw)``: the store a (re)started process opens, of each kind
    (memory, SQLite, PostgreSQL); see ``any_store``."""
    return any_store


# ------------------------------------------------------ the exhaustive check


@pytest.fixture(scope="session")
def checked_two_sessions() -> Any:
    """``sessionfsm.check.explore(sessions=2)``: the whole reachable space of two
    sessions under the small policy, explored once per test run (a few seconds)."""
    from sessionfsm.check import explore

    return explore(sessions=2)


# ------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL server for the whole run: ``SESSIONFSM_TEST_DSN`` if set,
    else a throwaway one started with pgserver. With ``CI=true`` a missing
    server fails the tests that need it; elsewhere they are skipped."""
    dsn = os.environ.get("SESSIONFSM_TEST_DSN")
    if dsn:
        yield dsn
        return
    # pgserver asks platformdirs for a runtime directory, which warns without one.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(tmp_path_factory.mktemp("run")))
    try:
        import pgserver
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI: PostgreSQL tests need pgserver or SESSIONFSM_TEST_DSN")
        pytest.skip("no PostgreSQL: install pgserver or set SESSIONFSM_TEST_DSN")
    # Not under pytest's base directory: as root, pgserver runs the server as
    # another user, who cannot enter pytest's private (0700) directories.
    data = tempfile.mkdtemp(prefix="sessionfsm-pg-")
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


_schemas = iter(range(1, 1_000_000))


@pytest.fixture
def pg_schema(pg_dsn: str) -> str:
    """A fresh, unused schema name on the test server (``t_<pid>_<n>``)."""
    return f"t_{os.getpid()}_{next(_schemas)}"


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def any_store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Callable[..., Store]]:
    """``any_store(**kw)``: the store a (re)started process opens, of every kind.

    Like ``open_store``, with PostgreSQL too: each call closes the store opened
    before (its process is gone) and opens the same database (for PostgreSQL,
    the test's own schema) again, passing ``kw`` to the store.
    """
    memories: list[MemoryStore] = []
    opened: list[Any] = []
    dsn = schema = ""
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        schema = request.getfixturevalue("pg_schema")

    def open_(**kw: Any) -> Store:
        kw.setdefault("history_retention", None)
        if request.param == "memory":
            if not memories:  # one store outlives its engines; the first call's options
                memories.append(MemoryStore(**kw))
            return memories[0]
        for store in opened:
            store.close()
        store: Any
        if request.param == "sqlite":
            store = SqliteStore(db_path, **kw)
        else:
            from sessionfsm.postgres_store import PostgresStore

            store = PostgresStore(dsn, schema=schema, **kw)
        opened.append(store)
        return store  # type: ignore[no-any-return]

    open_.kind = request.param  # type: ignore[attr-defined]
    yield open_
    for store in opened:
        store.close()


class RecordingRelay:
    """A relay on 127.0.0.1 for fleet tests: a real HTTP server on a free port.

    For each POSTed batch it refuses (409) one whose epoch is older than the
    partition's current epoch on the server (a relay that honours fencing
    tokens), otherwise reads the version of every session from the
    application's table at that moment (the payload the worker sends) and
    answers Ok. ``accepted[sid]`` is the highest version it took;
    ``stale`` counts refused batches.
    """

    def __init__(self, dsn: str, schema: str, app_schema: str) -> None:
        import http.server
        import json
        import threading

        import psycopg

        from sessionfsm import acks

        self.accepted: dict[str, int] = {}
        self.batches = 0
        self.stale = 0
        self._lock = threading.Lock()
        conn = psycopg.connect(dsn, autocommit=True)
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with relay._lock:
                    (epoch,) = conn.execute(
                        f'SELECT epoch FROM "{schema}".part WHERE partition = %s',
                        (body["partition"],),
                    ).fetchone()  # type: ignore[misc]
                    if body["epoch"] < epoch:
                        relay.stale += 1
                        self.send_response(409)
                        self.end_headers()
                        return
                    versions = dict(
                        conn.execute(
                            f'SELECT id, version FROM "{app_schema}".doc WHERE id = ANY(%s)',
                            (body["sessions"],),
                        ).fetchall()
                    )
                    relay.batches += 1
                    for sid in body["sessions"]:
                        relay.accepted[sid] = max(relay.accepted.get(sid, 0), versions[sid])
                reply = acks.encode(acks.BatchAck(batch_id=body["batch_id"], ack=acks.Ok()))
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._conn = conn
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/batch"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._conn.close()


@pytest.fixture
def recording_relay(pg_dsn: str, pg_schema: str) -> Iterator[RecordingRelay]:
    """A ``RecordingRelay`` for the test's schema; the application's table is
    ``"<schema>_app".doc(id text primary key, version int)``, created empty."""
    import psycopg

    app = f"{pg_schema}_app"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{app}"')
        conn.execute(f'CREATE TABLE "{app}".doc (id text PRIMARY KEY, version int NOT NULL)')
    relay = RecordingRelay(pg_dsn, pg_schema, app)
    yield relay
    relay.close()
