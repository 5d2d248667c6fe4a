"""End to end, per transport: a real relay process, a real service process
that is SIGKILLed and restarted on the same SQLite file, and a relay that
throttles, refuses oversized requests, drops connections and goes down."""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sessionfsm import SessionState, SqliteStore
from tests.conftest import RelayProcess

SESSIONS = 300
OVERSIZED = {f"s{i:03d}" for i in (17, 101, 222, 290)}
CHANGING = {f"s{i:03d}" for i in range(0, SESSIONS, 7)} - OVERSIZED
#: Longer than the ack-timeout threshold x backoff of the service's policy
#: (3 x 0.2 s) and its rate-limit threshold x backoff (5 x 0.2 s).
DOWN_S = 2.5
KILLS = 5


def _initial_data() -> dict[str, Any]:
    return {
        f"s{i:03d}": {
            "v": 1,
            "size": 20_000 if f"s{i:03d}" in OVERSIZED else 100,
            "changes": 3 if f"s{i:03d}" in CHANGING else 0,
        }
        for i in range(SESSIONS)
    }


def _wait_until_running(service: Any) -> None:
    """Until the service's runner has started (and so handles SIGTERM)."""
    for _ in range(600):
        if "sessionfsm.runner_started" in service.log_path.read_text():
            return
        assert service.poll() is None, service.log_path.read_text()[-2000:]
        time.sleep(0.05)
    raise AssertionError("the service did not start")


def _logs(service: Any, relay: RelayProcess) -> str:
    """The ends of the service's and the relay's logs, for a failure's message."""
    return (
        f"service log:\n{service.log_path.read_text()[-4000:]}\nrelay log:\n{relay.log_tail(2000)}"
    )


def _run_chaos(
    transport: str,
    tmp_path: Path,
    relay: RelayProcess,
    start_service: Callable[..., Any],
) -> None:
    rng = random.Random(f"e2e-{transport}")
    db = tmp_path / "sessions.db"
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(_initial_data()))
    relay.configure(
        max_body_bytes=16_000, throttle_every=7, retry_after="0.2", drop_every=6, latency_s=0.05
    )

    def start(seed: int, *extra: str) -> Any:
        return start_service(
            "--db", str(db), "--data", str(data_path), "--url", relay.url,
            "--transport", transport, "--seed", str(seed), *extra,
        )  # fmt: skip

    kills = 0
    service = start(0, "--changes", "20")
    for run in range(1, KILLS + 1):
        time.sleep(rng.uniform(0.3, 1.2))
        if run == 3:
            relay.configure(down=True)
            time.sleep(DOWN_S)
            relay.configure(down=False)
            time.sleep(rng.uniform(0.0, 0.5))
        assert service.poll() is None, "the service exited on its own"
        service.send_signal(signal.SIGKILL)
        service.wait()
        kills += 1
        service = start(run, "--changes", "20")
    assert kills >= 5

    # A clean stop in the middle of work leaves nothing in flight.
    time.sleep(rng.uniform(0.3, 0.8))
    _wait_until_running(service)
    service.send_signal(signal.SIGTERM)
    assert service.wait(timeout=60) == 0, _logs(service, relay)
    with SqliteStore(db, readonly=True) as store:
        assert store.sessions_by_state()[SessionState.IN_FLIGHT] == 0

    # The last run, on a well-behaved relay except for throttling, to idle.
    relay.configure(drop_every=0)
    service = start(99, "--until-idle")
    assert service.wait(timeout=180) == 0, _logs(service, relay)


def _check(tmp_path: Path, relay: RelayProcess) -> None:
    data = json.loads((tmp_path / "data.json").read_text())
    state = relay.state()
    stored: dict[str, list[str]] = state["stored"]
    with SqliteStore(tmp_path / "sessions.db", readonly=True) as store:
        counts = store.sessions_by_state()
        dead = {view.id: view.dead_letter_reason for view in store.dead_letters()}
    assert counts[SessionState.IN_FLIGHT] == 0
    assert counts[SessionState.QUEUED] == counts[SessionState.BACKOFF] == 0
    # Every oversized session is dead-lettered as too large, and none was stored.
    assert {sid: dead.get(sid) for sid in OVERSIZED} == dict.fromkeys(OVERSIZED, "PayloadTooLarge")
    assert not OVERSIZED & set(stored)
    # Each version is stored once, however often it was resent.
    for sid, versions in stored.items():
        assert Counter(versions).most_common(1)[0][1] == 1, (sid, versions)
    valid = set(data) - OVERSIZED
    # The blame rules split a whole-request 413: only the culprit is charged.
    lost = {sid: reason for sid, reason in dead.items() if sid in valid}
    assert not lost
    # Answers lost to dropped connections were resent, and recognised as resends.
    relay_counts = state["counts"]
    assert relay_counts.get("dropped", 0) > 0
    assert relay_counts.get("duplicate_versions", 0) + relay_counts.get("replayed", 0) > 0
    # Every valid session's latest version is on the relay.
    missing = {sid for sid in valid if str(data[sid]["v"]) not in stored.get(sid, [])}
    assert not missing
    assert any(data[sid]["v"] > 1 for sid in CHANGING)


def test_http_end_to_end_with_kills_and_a_misbehaving_relay(
    tmp_path: Path, relay_process: RelayProcess, start_service: Callable[..., Any]
) -> None:
    """Over HTTP, through kills, throttling, 413s, drops and an outage, every valid
    session's latest version is stored once and only oversized ones dead-letter."""
    _run_chaos("http", tmp_path, relay_process, start_service)
    _check(tmp_path, relay_process)


def test_socketio_end_to_end_with_kills_and_a_misbehaving_relay(
    tmp_path: Path, relay_process: RelayProcess, start_service: Callable[..., Any]
) -> None:
    """Over Socket.IO, through kills, throttling, oversized refusals, drops and an
    outage, every valid session's latest version is stored once and only oversized
    ones dead-letter."""
    _run_chaos("socketio", tmp_path, relay_process, start_service)
    _check(tmp_path, relay_process)
