"""Every shared fixture lives here; hypothesis strategies live in strategies.py.

Profiles: ``dev`` (fast, the default on a workstation) and ``ci`` (many more
examples; chosen when ``CI`` is set, or with ``HYPOTHESIS_PROFILE=ci``).
"""

from __future__ import annotations

import os
import random
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


@pytest.fixture(params=["memory", "sqlite"])
def open_store(request: pytest.FixtureRequest, db_path: Path) -> Iterator[Callable[..., Store]]:
    """``open_store(**kw)``: the store a (re)started process opens, of each kind.

    SQLite: closes the store opened before (its process is gone) and opens
    the same file again, passing ``kw`` to ``SqliteStore``. Memory: hands back
    the one ``MemoryStore`` of the test, which outlives its engines.
    """
    memory = MemoryStore(history_retention=None)
    opened: list[SqliteStore] = []

    def open_(**kw: Any) -> Store:
        if request.param == "memory":
            return memory
        for store in opened:
            store.close()
        kw.setdefault("history_retention", None)
        store = SqliteStore(db_path, **kw)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


# ------------------------------------------------------ the exhaustive check


@pytest.fixture(scope="session")
def checked_two_sessions() -> Any:
    """``sessionfsm.check.explore(sessions=2)``: the whole reachable space of two
    sessions under the small policy, explored once per test run (a few seconds)."""
    from sessionfsm.check import explore

    return explore(sessions=2)
