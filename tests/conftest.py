"""Every shared fixture lives here; hypothesis strategies live in strategies.py.

Profiles: ``dev`` (fast, the default on a workstation) and ``ci`` (many more
examples; chosen when ``CI`` is set, or with ``HYPOTHESIS_PROFILE=ci``).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click.testing
import pytest
import structlog
from hypothesis import HealthCheck, settings

from sessionfsm import (
    Batch,
    Engine,
    MemoryStore,
    Policy,
    SessionFSMError,
    SqliteStore,
    Store,
    StoreError,
)
from sessionfsm.testing import EngineHarness, FakeClock, ScriptedRelay, postgres_server

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
    max_relay_refusal_s=0.0,
    batch_size=3,
    incremental_interval_s=10.0,
    backfill_batch_size=2,
    backfill_interval_s=0.0,
    ack_timeout_s=20.0,
    tick_interval_s=5.0,
)


@pytest.fixture
def policy() -> Policy:
    """The service's default policy, except that a session answered on its own
    is charged at once (``max_relay_refusal_s=0``), as if the relay had
    refused everything for longer than the bound: most engine tests pin down
    what a charge does. What is charged at all is pinned down with the
    default bound in test_blame.py."""
    return Policy(max_relay_refusal_s=0.0)


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
    with ``ack`` (one ack for all, or a {session: ack} mapping; with
    ``each=True``, ``ack`` for each session) at ``now``.
    Returns the batches that were sent."""

    def run(engine: Engine, now: float, ack: Any = None, *, each: bool = False) -> list[Batch]:
        batches = engine.tick(now)
        if ack is not None:
            for batch in batches:
                # ``each``: the ack once per session, as a per-session answer.
                answer = dict.fromkeys(batch.session_ids, ack) if each else ack
                engine.on_ack(batch.id, answer, now=now)
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
    from sessionfsm.tools.cli import main

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
    """A ``sessionfsm.tools.sim.LogCounter`` that every structlog event passes through
    (nothing is printed); pass it to ``Simulation(log_counter=...)``."""
    from sessionfsm.tools.sim import LogCounter
    from sessionfsm.tools.sim.command import counting_logs

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
    """``sessionfsm.tools.check.explore(sessions=2)``: the whole reachable space of two
    sessions under the small policy, explored once per test run (a few seconds)."""
    from sessionfsm.tools.check import explore

    return explore(sessions=2)


# ------------------------------------------------------------ faulty stores


class FailingStore:
    """A store wrapper that makes chosen saves fail, the way real ones do.

    ``fail_next(kind)`` makes the next save fail: ``"locked"`` holds the
    database's write lock from a second connection (a real ``StoreLocked``;
    open the inner ``SqliteStore`` with ``timeout=0``), ``"full"`` makes the
    transaction fail half-way, after its session and history rows, as a disk
    filling up does (SQLite rolls it back), ``"io"`` raises ``StoreError`` before
    anything is written (an I/O error SQLite cannot be made to produce here).
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self._next: str | None = None
        self.saves = 0
        self.failures = 0

    def fail_next(self, kind: str | None) -> None:
        """Make the next save fail this way (None: the next save succeeds)."""
        assert kind in (None, "locked", "full", "io")
        self._next = kind

    def load(self) -> Any:
        return self.inner.load()

    def save(self, delta: Any) -> None:
        kind, self._next = self._next, None
        if kind is None:
            self.inner.save(delta)
            self.saves += 1
            return
        self.failures += 1
        inner = self.inner
        if kind == "io" or not isinstance(inner, SqliteStore):
            raise StoreError(f"injected I/O error saving to {inner!r}")
        if kind == "locked":
            other = sqlite3.connect(inner.path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            try:
                inner.save(delta)
            finally:
                other.execute("ROLLBACK")
                other.close()
        else:
            # The engine row is written last, after every session and history
            # row of the save: failing there leaves a half-written transaction
            # for the store to roll back, as a disk that fills up mid-way does.
            conn = inner._conn
            assert conn is not None
            conn.execute(
                "CREATE TEMP TRIGGER disk_full BEFORE UPDATE ON main.engine "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
            try:
                inner.save(delta)
            finally:
                conn.execute("DROP TRIGGER temp.disk_full")
        raise AssertionError(f"the injected {kind!r} fault did not make the save fail")

    def close(self) -> None:
        self.inner.close()


# ------------------------------------------------- processes and other users


def filled_store(path: Path, *, sessions: int = 60, rounds: int = 4) -> None:
    """A closed store at ``path`` with history, backoffs and dead letters."""
    from sessionfsm import acks

    with SqliteStore(path, history_retention=None) as store:
        engine = Engine(SMALL_POLICY, store=store, rng=random.Random(1), log=False)
        for i in range(sessions):
            engine.enqueue(f"s{i:03d}", now=float(i))
        t = 100.0
        for r in range(rounds):
            for batch in engine.tick(t):
                # Per session, with an Ok in most answers: evidence that the
                # relay accepts others, so the refusals are charged (blame).
                kinds = (acks.Ok(), acks.RateLimited(), acks.PayloadTooLarge())
                answer = {
                    sid: kinds[(i + batch.id + r) % 3] for i, sid in enumerate(batch.session_ids)
                }
                engine.on_ack(batch.id, answer, t)
            t += 100.0


class HeldStore:
    """A second process that opens a store for writing and holds it until stopped."""

    def __init__(self, path: Path) -> None:
        import subprocess
        import sys

        code = (
            "import sys; from sessionfsm import SqliteStore\n"
            f"s = SqliteStore({str(path)!r}, history_retention=None)\n"
            "print('ready', flush=True); sys.stdin.readline(); s.close()\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)


@pytest.fixture
def held_store() -> Iterator[Callable[[Path], HeldStore]]:
    """``held_store(path)``: another process holding the store at ``path`` for writing."""
    held: list[HeldStore] = []

    def hold(path: Path) -> HeldStore:
        held.append(HeldStore(path))
        return held[-1]

    yield hold
    for h in held:
        if h.proc.poll() is None:
            h.stop()


def _must_have(what: str) -> None:
    """Skip a test whose component is missing, or fail it under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI requires {what}")
    pytest.skip(f"needs {what}")


OTHER_USER = "sessionfsm-reader"


@pytest.fixture(scope="session")
def other_user() -> tuple[int, int]:
    """A second OS user (uid, gid), created once with useradd; needs root."""
    import pwd
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        _must_have("root, useradd and setpriv to act as a second OS user")
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            check=True,
        )
        entry = pwd.getpwnam(OTHER_USER)
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def as_other_user(other_user: tuple[int, int]) -> Callable[..., Any]:
    """``as_other_user(*args)`` runs ``python -m sessionfsm *args`` as the second user."""
    import subprocess
    import sys

    uid, gid = other_user

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/"}
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={gid}",
                "--clear-groups",
                "--",
                sys.executable,
                "-m",
                "sessionfsm",
                *args,
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=120,
            check=False,
        )

    return run


@pytest.fixture
def shared_dir() -> Iterator[Callable[[int], Path]]:
    """``shared_dir(mode)``: a root-owned directory outside pytest's private tmp
    (which other users cannot enter), e.g. 0o755 (others read only) or 0o1777."""
    import shutil
    import tempfile

    made: list[Path] = []

    def make(mode: int) -> Path:
        path = Path(tempfile.mkdtemp(prefix="sessionfsm-shared-", dir="/tmp"))
        path.chmod(mode)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A tmpfs mounted at ``tmp_path / "ro"``; calling the fixture's value
    remounts it read-only. Unmounted afterwards. Needs root and mount."""
    import subprocess

    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        _must_have("root to mount a tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        _must_have(f"permission to mount a tmpfs ({done.stderr.decode().strip()})")

    def remount_read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)

    yield remount_read_only
    subprocess.run(["umount", "-l", str(where)], check=False)


# ------------------------------------------------------------------ metrics


@pytest.fixture
def metrics_registry() -> Any:
    """A fresh ``prometheus_client.CollectorRegistry``, so tests never collide."""
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


@pytest.fixture
def otel_reader() -> Iterator[Any]:
    """``(reader, provider)``: the OpenTelemetry SDK's in-memory metric reader
    and a meter provider feeding it, shut down after the test."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


@pytest.fixture
def parse_exposition() -> Callable[[str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """``parse_exposition(text)``: every sample of a Prometheus text exposition,
    parsed by prometheus_client's own parser, as {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name, frozenset(sample.labels.items())] = sample.value
        return samples

    return parse


@pytest.fixture
def matplotlib_or_fail() -> Any:
    """matplotlib (the ``plot`` extra); a test needing it skips locally, fails under CI."""
    try:
        import matplotlib
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("matplotlib is missing: install '.[test]', which includes the plot extra")
        pytest.skip("matplotlib is not installed (pip install 'sessionfsm[plot]')")
    return matplotlib


# ------------------------------------------- real relay and service processes

#: The repository root: service processes run from here (``python -m tests...``).
ROOT = Path(__file__).resolve().parent.parent


def need(module: str) -> Any:
    """Import an optional dependency; a missing one skips, or fails under CI=true."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is required under CI=true: {exc}")
        pytest.skip(f"needs {module} (pip install -e '.[test]')")


class RelayProcess:
    """A reference relay running as a separate process on 127.0.0.1."""

    def __init__(self, proc: Any, url: str, log_path: Path | None = None) -> None:
        self.proc = proc
        self.url = url
        #: Where the relay's stderr goes (a file, never a pipe nobody reads:
        #: a full pipe would block the relay mid-test).
        self.log_path = log_path

    def log_tail(self, size: int = 4000) -> str:
        """The end of the relay's stderr, for a failing assertion's message."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-size:]

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change the relay's behaviour at run time (POST /_relay/config)."""
        import httpx

        response = httpx.post(f"{self.url}/_relay/config", json=changes, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def state(self) -> dict[str, Any]:
        """What the relay stored and counted (GET /_relay/state)."""
        import httpx

        response = httpx.get(f"{self.url}/_relay/state", timeout=10)
        response.raise_for_status()
        return dict(response.json())


def _stop(proc: Any) -> None:
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start reference relays (``python -m sessionfsm.reference_relay``, or with
    ``via_cli=True`` ``sessionfsm relay``) on free ports; every one is stopped at
    the end of the test."""
    import subprocess
    import sys

    need("aiohttp")
    need("socketio")
    procs: list[Any] = []

    def start(*args: str, via_cli: bool = False) -> RelayProcess:
        module = ["sessionfsm", "relay"] if via_cli else ["sessionfsm.reference_relay"]
        log_path = tmp_path / f"relay-{len(procs)}.log"
        with open(log_path, "w") as log:
            # The relay prints one line on stdout (its address); everything
            # else it says goes to stderr, into the file.
            proc = subprocess.Popen(
                [sys.executable, "-m", *module, "--port", "0", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
            )
        procs.append(proc)
        line = proc.stdout.readline() if proc.stdout is not None else ""
        if "listening on" not in line:
            _stop(proc)
            raise RuntimeError(f"the relay did not start: {line!r} {log_path.read_text()}")
        return RelayProcess(proc, line.split()[-1], log_path)

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture
def relay_process(start_relay: Callable[..., RelayProcess]) -> RelayProcess:
    """One reference relay process with Socket.IO, on a free port."""
    return start_relay("--socketio")


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start the sync service (``python -m tests.transport_service``) as a
    separate process; every one still running at the end is killed."""
    import subprocess
    import sys

    procs: list[Any] = []

    def start(*args: str) -> Any:
        log = open(tmp_path / f"service-{len(procs)}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.transport_service", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        log.close()
        proc.log_path = tmp_path / f"service-{len(procs)}.log"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------- transport unit tests


def batch_in_flight(session_ids: tuple[str, ...] = ("a", "b", "c")) -> tuple[Engine, Batch]:
    """An engine with one batch of ``session_ids`` in flight at t=0."""
    engine = Engine(
        Policy(batch_size=len(session_ids), incremental_interval_s=0.0, ack_timeout_s=30.0),
        rng=random.Random(0),
        log=False,
    )
    for sid in session_ids:
        engine.enqueue(sid, now=0.0)
    (batch,) = engine.tick(0.0)
    return engine, batch


@pytest.fixture
def mock_http() -> Callable[..., Any]:
    """An ``HttpTransport`` on an ``httpx.MockTransport`` that answers with the
    handler you pass; the requests it saw are in ``transport.requests``.
    For unit tests of the status mapping only."""
    httpx = need("httpx")
    from sessionfsm.transports.http import HttpTransport

    def make(handler: Callable[[Any], Any], **kw: Any) -> Any:
        requests: list[Any] = []

        def record(request: Any) -> Any:
            requests.append(request)
            return handler(request)

        client = httpx.AsyncClient(transport=httpx.MockTransport(record))
        kw.setdefault("payload", lambda sid: {"id": sid})
        transport = HttpTransport("http://relay.test/sessions", client=client, **kw)
        transport.requests = requests
        return transport

    return make


# ------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A real PostgreSQL server for the whole run (``sessionfsm.testing.postgres_server``:
    ``SESSIONFSM_TEST_DSN`` if set, else a throwaway one started with pgserver).
    With ``CI=true`` a missing server fails the tests that need it; elsewhere
    they are skipped."""
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(postgres_server())
        except ImportError as exc:
            if os.environ.get("CI"):
                pytest.fail(f"CI: PostgreSQL tests need a server: {exc}")
            pytest.skip(f"no PostgreSQL: {exc}")
        yield dsn


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


class CannedHttp:
    """A real HTTP server on 127.0.0.1 that answers each POST with the next
    ``(status, headers, body)`` of ``replies`` and keeps each request body in
    ``bodies``; for unit tests of a sender's reply mapping."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.replies: list[tuple[int, dict[str, str], bytes]] = []
        self.bodies: list[bytes] = []
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                canned.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                status, headers, body = canned.replies.pop(0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/batch"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def canned_http() -> Iterator[CannedHttp]:
    """A :class:`CannedHttp` server, stopped at the end of the test."""
    server = CannedHttp()
    yield server
    server.close()


class RecordingRelay:
    """A relay on 127.0.0.1 for fleet tests: a real HTTP server on a free port.

    For each POSTed batch it refuses (409) one whose epoch is older than the
    partition's current epoch on the server (a relay that honours fencing
    tokens), otherwise reads the version of every session from the
    application's table at that moment (the payload the worker sends) and
    answers Ok. ``accepted[sid]`` is the highest version it took;
    ``stale`` counts refused batches.

    A batch of a (partition, epoch) in ``hold`` is left unanswered (its
    sender waits in the send) until ``release()``; ``holding`` is set when
    one arrives.
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
        self.hold: set[tuple[int, int]] = set()
        self.holding = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        conn = psycopg.connect(dsn, autocommit=True)
        relay = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if (body["partition"], body["epoch"]) in relay.hold:
                    relay.holding.set()
                    relay._released.wait(timeout=60)
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

    def release(self) -> None:
        """Answer the held batches now (by the rules above), and hold no more."""
        self.hold = set()
        self._released.set()

    def close(self) -> None:
        self.release()
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


# ------------------------------------------------ engine operations and policies


def apply_operation(engine: Engine, op: tuple[Any, ...], now: float) -> Any:
    """One operation of ``tests.strategies.operations``; what it returned or raised."""
    kind = op[0]
    try:
        if kind == "enqueue":
            return engine.enqueue(op[1], lane=op[2])
        if kind in ("tick", "clock_back"):
            return engine.tick(now if kind == "tick" else now - op[1])
        if kind in ("ack", "ack_each"):
            batches = engine.in_flight()
            batch_id = batches[op[1] % len(batches)].id if batches else 999
            return engine.on_ack(batch_id, op[2], now=now)
        if kind == "redrive":
            return engine.redrive(op[1], now=now)
        if kind == "relay_ready":
            return engine.relay_ready(now=now)
        if kind == "relay_unavailable":
            return engine.relay_unavailable(now=now)
    except SessionFSMError as exc:
        return (type(exc).__name__, str(exc))
    raise AssertionError(f"unknown operation {op!r}")


#: Batches of up to 3, no throttle, two batches in flight at once, acks awaited 2 min.
FAST = Policy(
    batch_size=3,
    incremental_interval_s=0.0,
    max_in_flight=2,
    tick_interval_s=5.0,
    ack_timeout_s=120.0,
)
