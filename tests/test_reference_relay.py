"""The reference relay as a real process: stores each version once, honours the
idempotency key, throttles, refuses sizes and goes down as told; and the live demo."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec

from sessionfsm import acks
from sessionfsm.transports.wire import encode_batch, idempotency_key
from tests.conftest import ROOT, RelayProcess


def _post(relay: RelayProcess, batch_id: int, versions: dict[str, int], **kw: Any) -> Any:
    body, wire = encode_batch(
        batch_id,
        "incremental",
        list(versions),
        lambda sid: {"v": versions[sid]},
        lambda sid: versions[sid],
    )
    key = kw.pop("key", idempotency_key(wire.sessions))
    return httpx.post(
        f"{relay.url}/sessions", content=body, headers={"Idempotency-Key": key}, timeout=10
    )


def test_relay_stores_each_version_once_and_replays_a_known_key(
    start_relay: Callable[..., RelayProcess],
) -> None:
    """`sessionfsm relay` stores each (session, version) once and answers a repeated
    Idempotency-Key with its first answer."""
    relay = start_relay(via_cli=True)
    first = _post(relay, 1, {"a": 1, "b": 1})
    assert first.status_code == 200
    assert acks.decode_message(first.content).sessions == {"a": acks.Ok(), "b": acks.Ok()}
    again = _post(relay, 2, {"a": 1, "b": 1})
    assert again.content == first.content
    _post(relay, 3, {"b": 1, "a": 2}, key="another-key")
    state = relay.state()
    assert state["stored"] == {"a": ["1", "2"], "b": ["1"]}
    assert state["counts"]["replayed"] == 1
    assert state["counts"]["duplicate_versions"] == 1


def test_relay_throttles_refuses_sizes_and_goes_down_as_told(
    start_relay: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    """Flags, a config file and /_relay/config make it answer 429, 413 and 503."""
    config = tmp_path / "relay.toml"
    config.write_text('retry_after = "Wed, 21 Oct 2026 07:28:00 GMT"\nmax_body_bytes = 300\n')
    relay = start_relay("--config", str(config), "--throttle-every", "2", via_cli=True)
    assert _post(relay, 1, {"a": 1}).status_code == 200
    throttled = _post(relay, 2, {"b": 1})
    assert throttled.status_code == 429
    assert throttled.headers["retry-after"] == "Wed, 21 Oct 2026 07:28:00 GMT"
    assert _post(relay, 3, {f"s{i}": 1 for i in range(20)}).status_code == 413
    relay.configure(down=True, throttle_every=0)
    assert _post(relay, 4, {"c": 1}).status_code == 503
    bad = httpx.post(f"{relay.url}/_relay/config", json={"no_such_key": 1}, timeout=10)
    assert bad.status_code == 400
    assert "no_such_key" in bad.text
    assert relay.state()["stored"] == {"a": ["1"]}


def test_relay_refuses_a_bad_config_file(tmp_path: Path) -> None:
    """A config file with an unknown key stops the relay with a usage error."""
    config = tmp_path / "relay.toml"
    config.write_text("throttle_evry = 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sessionfsm.reference_relay", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "throttle_evry" in proc.stderr


def test_demo_live_runs_the_main_job_against_the_relay(
    sessionfsm_cli: Callable[..., Any],
) -> None:
    """`demo --live` runs through HttpTransport against the reference relay until
    idle and ends with a summary table."""
    result = sessionfsm_cli("--log-level", "error", "demo", "--live", "--seconds", "30")
    assert result.exit_code == 0, result.output
    assert "summary" in result.output
    assert "latest versions on the relay" in result.output


def test_live_demo_dead_letters_only_the_oversized_session() -> None:
    """In the live demo a whole-request 413 is split until the oversized session is
    alone: it alone is dead-lettered, nothing is left in flight, and every other
    session has its latest version on the relay."""
    import asyncio

    from sessionfsm.tools.live import LiveDemo

    demo = LiveDemo(sessions=120, seconds=30.0)
    asyncio.run(demo.run())
    summary = demo.summary()
    assert summary["dead_letters"] == {"big": "PayloadTooLarge"}
    assert summary["states"] == {"synced": 120, "dead_lettered": 1}
    stored = set(demo.relay.log)
    synced = [v.id for v in demo.engine.sessions() if v.state.value == "synced"]
    assert synced
    assert all((sid, str(demo.versions[sid])) in stored for sid in synced)
    assert summary["relay"]["throttled"] > 0


def test_wire_batch_round_trips() -> None:
    """The request body decodes back to the sessions, versions and payloads sent."""
    body, wire = encode_batch(5, "backfill", ["x"], lambda sid: b'{"raw":true}')
    decoded = msgspec.json.decode(body)
    assert decoded == {
        "batch_id": 5,
        "lane": "backfill",
        "sessions": [{"id": "x", "version": wire.sessions[0].version, "payload": {"raw": True}}],
    }
