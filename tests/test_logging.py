"""Logging: silent until the host configures it, structured when it does."""

from __future__ import annotations

import logging
import random
import re

import pytest
import structlog

from sessionfsm import Engine, Policy, acks
from sessionfsm._log import format_time
from sessionfsm.tools.cli import configure_logging

from .conftest import Cycle


def _defer(engine: Engine, cycle: Cycle) -> None:
    engine.enqueue("s1", now=1_796_091_300.0)
    cycle(engine, 1_796_091_300.0, acks.RateLimited(retry_after_s=9.38))


def test_an_unconfigured_host_sees_no_output(
    policy: Policy, cycle: Cycle, capfd: pytest.CaptureFixture[str]
) -> None:
    """With neither structlog nor logging configured, the library prints nothing anywhere."""
    assert not structlog.is_configured()
    engine = Engine(policy, rng=random.Random(0))
    _defer(engine, cycle)
    engine.enqueue("big", now=1_796_091_400.0)
    for _ in range(3):
        cycle(engine, engine.now + 60.0, acks.PayloadTooLarge())
    assert engine.dead_letters()  # a warning-level event happened
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_stdlib_logging_gets_namespaced_records_with_iso_times(
    policy: Policy, cycle: Cycle, caplog: pytest.LogCaptureFixture
) -> None:
    """A host that configured only stdlib logging gets sessionfsm.* records, times in ISO UTC."""
    caplog.set_level(logging.INFO, logger="sessionfsm")
    _defer(Engine(policy, rng=random.Random(0)), cycle)
    (record,) = [r for r in caplog.records if r.getMessage().startswith("sessionfsm.deferred")]
    assert record.name == "sessionfsm"
    assert record.levelno == logging.INFO
    assert record.sessionfsm_event == "sessionfsm.deferred"  # type: ignore[attr-defined]
    assert record.sessionfsm_fields["session_id"] == "s1"  # type: ignore[attr-defined]
    assert "retry_at=2026-12-01T" in record.getMessage()
    assert record.getMessage().split("retry_at=")[1].split()[0].endswith("Z")


def test_stdlib_below_the_hosts_level_formats_nothing(
    policy: Policy, cycle: Cycle, caplog: pytest.LogCaptureFixture
) -> None:
    """At the host's WARNING level, an info event is not even formatted."""
    caplog.set_level(logging.WARNING, logger="sessionfsm")
    _defer(Engine(policy, rng=random.Random(0)), cycle)
    assert caplog.records == []


def test_a_configured_structlog_gets_the_events(
    logs: list[dict[str, object]], policy: Policy, cycle: Cycle
) -> None:
    """Once the host configured structlog, events go there with their fields as data."""
    _defer(Engine(policy, rng=random.Random(0)), cycle)
    (event,) = [e for e in logs if e["event"] == "sessionfsm.deferred"]
    assert event["session_id"] == "s1"
    assert isinstance(event["retry_at"], float)


def test_the_cli_logs_times_in_iso_utc(capsys: pytest.CaptureFixture[str]) -> None:
    """The command line's configuration renders epoch times as ISO-8601 UTC, not raw floats."""
    configure_logging("info", json=True)
    from sessionfsm._log import get_logger

    get_logger(True).info("sessionfsm.deferred", session_id="s1", retry_at=1796091309.38)
    err = capsys.readouterr().err
    assert '"retry_at": "2026-12-01T02:15:09.380Z"' in err
    assert "1796091309.38" not in err
    assert re.search(r'"timestamp": "[0-9T:.-]+Z"', err)


def test_format_time_labels_simulated_seconds() -> None:
    """Simulated seconds are labelled as such, never passed off as dates."""
    assert format_time(331.0, simulated=True) == "331.000s (simulated)"
    assert format_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert format_time("n/a") == "n/a"
