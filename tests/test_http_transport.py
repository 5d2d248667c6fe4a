"""HttpTransport: the status mapping row by row (on httpx's MockTransport),
Retry-After, the idempotency key, the docs' table, and fuzzed replies."""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import given

from sessionfsm import SessionState, acks
from sessionfsm.transports.http import STATUS_TABLE, outcome_of, parse_retry_after
from sessionfsm.transports.wire import batch_decoder
from tests.conftest import batch_in_flight
from tests.strategies import REPLY_SESSIONS, http_replies

DOCS = Path(__file__).resolve().parent.parent / "docs" / "transports.md"


def _send(transport: Any, batch: Any) -> Any:
    return asyncio.run(transport.send(batch))


def _reply(status: int, body: bytes = b"", **headers: str) -> Callable[[Any], httpx.Response]:
    return lambda request: httpx.Response(status, content=body, headers=headers)


# ------------------------------------------------------------ row by row


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_with_an_empty_body_is_ok_for_every_session(
    mock_http: Callable[..., Any], status: int
) -> None:
    """A 2xx with no body acknowledges the whole batch."""
    _engine, batch = batch_in_flight()
    assert _send(mock_http(_reply(status)), batch) == acks.Ok()


def test_2xx_with_per_session_acks_answers_each_session(mock_http: Callable[..., Any]) -> None:
    """A 2xx body with per-session acks gives each session its own answer."""
    engine, batch = batch_in_flight()
    body = acks.encode(
        acks.BatchAck(
            batch_id=batch.id,
            sessions={"a": acks.Ok(), "b": acks.RateLimited(retry_after_s=4), "c": acks.Ok()},
        )
    )
    result = _send(mock_http(_reply(200, body, **{"content-type": "application/json"})), batch)
    assert result == {"a": acks.Ok(), "b": acks.RateLimited(retry_after_s=4.0), "c": acks.Ok()}
    engine.on_ack(batch.id, result, 1.0)
    assert [engine.state(s) for s in "abc"] == [
        SessionState.SYNCED,
        SessionState.BACKOFF,
        SessionState.SYNCED,
    ]


def test_2xx_whole_batch_ack_from_an_idempotent_replay_is_accepted(
    mock_http: Callable[..., Any],
) -> None:
    """A replayed answer carrying an earlier batch id still answers this request."""
    _engine, batch = batch_in_flight()
    body = acks.encode(acks.BatchAck(batch_id=batch.id + 40, ack=acks.Ok()))
    assert _send(mock_http(_reply(200, body)), batch) == acks.Ok()


def test_408_is_an_ack_timeout(mock_http: Callable[..., Any]) -> None:
    """408 Request Timeout answers AckTimeout for the batch."""
    _, batch = batch_in_flight()
    assert _send(mock_http(_reply(408)), batch) == acks.AckTimeout()


def test_413_is_payload_too_large_for_the_whole_batch(mock_http: Callable[..., Any]) -> None:
    """413 answers PayloadTooLarge for the whole batch."""
    _, batch = batch_in_flight()
    assert _send(mock_http(_reply(413, b"too big")), batch) == acks.PayloadTooLarge()


@pytest.mark.parametrize(
    ("header", "expected"),
    [("7", 7.0), ("0", 0.0), ("2.5", 2.5), (" 12 ", 12.0), ("999999999", 3600.0)],
)
def test_429_is_rate_limited_with_retry_after_seconds(
    mock_http: Callable[..., Any], header: str, expected: float
) -> None:
    """429 answers RateLimited with Retry-After's delta-seconds, clamped to the cap."""
    _, batch = batch_in_flight()
    result = _send(mock_http(_reply(429, **{"Retry-After": header})), batch)
    assert result == acks.RateLimited(retry_after_s=expected)


def test_429_with_an_http_date_waits_until_that_date(mock_http: Callable[..., Any]) -> None:
    """A Retry-After HTTP-date is read against the transport's clock."""
    _, batch = batch_in_flight()
    now = 1_900_000_000.0
    date = email.utils.formatdate(now + 90, usegmt=True)
    transport = mock_http(_reply(429, **{"Retry-After": date}), clock=lambda: now)
    result = transport.answer(batch, 429, {"retry-after": date}, b"")
    assert result == acks.RateLimited(retry_after_s=90.0)
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert transport.answer(batch, 429, {"retry-after": past}, b"") == acks.RateLimited(
        retry_after_s=0.0
    )


@pytest.mark.parametrize("header", ["-5", "soon", "", "1e3", "Wed, 21 Oct 2015 07:28:00", "nan"])
def test_429_with_an_unreadable_retry_after_is_logged_and_ignored(
    mock_http: Callable[..., Any], logs: list[dict[str, Any]], header: str
) -> None:
    """Garbage in Retry-After gives RateLimited without a delay, and a log line."""
    _, batch = batch_in_flight()
    result = _send(mock_http(_reply(429, **{"Retry-After": header})), batch)
    assert result == acks.RateLimited(retry_after_s=None)
    assert [e["event"] for e in logs] == ["sessionfsm.http_retry_after_ignored"]


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_pause_the_link_with_an_error_and_charge_nobody(
    mock_http: Callable[..., Any], logs: list[dict[str, Any]], status: int
) -> None:
    """A relay refusing us pauses the link, logs an error and charges no session."""
    engine, batch = batch_in_flight()
    result = _send(mock_http(_reply(status, b"bad token")), batch)
    assert result == acks.RelayUnavailable()
    assert [(e["event"], e["log_level"]) for e in logs] == [("sessionfsm.http_refused", "error")]
    engine.on_ack(batch.id, result, 1.0)
    assert engine.link.state.value == "paused"
    for sid in "abc":
        view = engine.session(sid)
        assert (view.state, view.charges) == (SessionState.QUEUED, {})


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_are_relay_unavailable(mock_http: Callable[..., Any], status: int) -> None:
    """502, 503 and 504 answer RelayUnavailable, never charged."""
    _, batch = batch_in_flight()
    assert _send(mock_http(_reply(status)), batch) == acks.RelayUnavailable()


@pytest.mark.parametrize("status", [100, 301, 400, 404, 409, 418, 422, 500, 501, 505, 599])
def test_any_other_status_is_logged_and_left_unanswered(
    mock_http: Callable[..., Any], logs: list[dict[str, Any]], status: int
) -> None:
    """Any other status leaves the batch unanswered, with a log event naming it."""
    engine, batch = batch_in_flight()
    result = _send(mock_http(_reply(status, b"x" * 500)), batch)
    assert result == {}
    (event,) = logs
    assert (event["event"], event["status"]) == ("sessionfsm.http_unexpected_status", status)
    assert len(event["body"]) <= 203
    engine.on_ack(batch.id, result, 1.0)
    assert {engine.state(s) for s in "abc"} == {SessionState.IN_FLIGHT}


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (httpx.ConnectError("refused"), acks.RelayUnavailable()),
        (httpx.ConnectTimeout("slow connect"), acks.RelayUnavailable()),
        (httpx.PoolTimeout("no connection"), acks.RelayUnavailable()),
        (httpx.RemoteProtocolError("Server disconnected"), acks.RelayUnavailable()),
        (httpx.ReadError("connection reset"), acks.RelayUnavailable()),
        (httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]"), acks.RelayUnavailable()),
        (httpx.ReadTimeout("no answer"), acks.AckTimeout()),
        (httpx.WriteTimeout("stuck"), acks.AckTimeout()),
        (httpx.DecodingError("bad gzip"), {}),
    ],
)
def test_errors_without_a_status(
    mock_http: Callable[..., Any], error: Exception, expected: Any
) -> None:
    """Network failures are RelayUnavailable, timeouts AckTimeout, other errors unanswered."""
    _, batch = batch_in_flight()

    def fail(request: Any) -> Any:
        raise error

    assert _send(mock_http(fail), batch) == expected


# ------------------------------------------------------- the request itself


def test_the_request_carries_the_payloads_and_a_stable_idempotency_key(
    mock_http: Callable[..., Any],
) -> None:
    """The same sessions at the same versions give the same key, whatever the batch."""
    versions = {"a": 1, "b": 1, "c": 1}
    transport = mock_http(_reply(204), payload=lambda sid: {"id": sid, "v": versions[sid]})
    _, first = batch_in_flight(("a", "b", "c"))
    _, again = batch_in_flight(("c", "a", "b"))
    _send(transport, first)
    _send(transport, msgspec.structs.replace(again, id=first.id + 9))
    versions["b"] = 2
    _send(transport, first)
    keys = [r.headers["idempotency-key"] for r in transport.requests]
    assert keys[0] == keys[1] != keys[2]
    sent = batch_decoder.decode(transport.requests[2].content)
    assert [(s.id, msgspec.json.decode(s.payload)) for s in sent.sessions] == [
        ("a", {"id": "a", "v": 1}),
        ("b", {"id": "b", "v": 2}),
        ("c", {"id": "c", "v": 1}),
    ]
    assert transport.requests[0].headers["content-type"] == "application/json"


def test_request_timeout_is_what_is_left_of_the_batch_deadline(
    mock_http: Callable[..., Any],
) -> None:
    """The POST times out at the batch's deadline, not at httpx's default."""
    _, batch = batch_in_flight()
    transport = mock_http(_reply(204), clock=lambda: batch.deadline - 2.5)
    _send(transport, batch)
    assert transport.requests[0].extensions["timeout"]["read"] == pytest.approx(2.5)


# ------------------------------------------------------- the docs' table


def _docs_table() -> list[tuple[str, str]]:
    text = DOCS.read_text()
    section = text.split("### Status mapping", 1)[1].split("\n\n| Status |", 1)[1]
    rows = []
    for line in ("| Status |" + section).splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], cells[1].strip("`")))
    return rows


def test_the_docs_status_table_matches_the_code() -> None:
    """docs/transports.md's status table is STATUS_TABLE, and every status it names
    maps as it says."""
    rows = _docs_table()
    assert rows == list(STATUS_TABLE)
    listed: set[int] = set()
    for statuses, outcome in rows:
        if statuses == "2xx":
            codes = list(range(200, 300))
        elif statuses == "any other":
            continue
        else:
            codes = [int(code) for code in re.split(r",\s*", statuses)]
        listed.update(codes)
        assert {outcome_of(code) for code in codes} == {outcome}, statuses
    assert {outcome_of(code) for code in range(100, 600) if code not in listed} == {"unanswered"}


# ------------------------------------------------------------- Retry-After


def test_parse_retry_after_handles_dates_deltas_and_garbage() -> None:
    """Retry-After as delta-seconds or an HTTP-date, clamped; garbage is None."""
    now = time.time()
    assert parse_retry_after(None, now, 60) is None
    assert parse_retry_after("30", now, 60) == 30.0
    assert parse_retry_after("3000", now, 60) == 60.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now, 60) == (
        pytest.approx(30.0, abs=1.0)
    )
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now, 60) == 60.0
    for bad in ("-1", "abc", "Wed, 21 Oct 2015 07:28:00", "inf", ""):
        assert parse_retry_after(bad, now, 60) is None, bad


# ------------------------------------------------------------- fuzzing


@given(http_replies())
def test_fuzzed_replies_never_raise_lose_or_mischarge_a_session(
    reply: tuple[int, dict[str, str], bytes],
) -> None:
    """Whatever status, headers and body come back, the answer is a valid one, no
    session is lost, and only the statuses and acks that charge a session do."""
    from sessionfsm.transports.http import HttpTransport

    status, headers, body = reply
    engine, batch = batch_in_flight(REPLY_SESSIONS)
    transport = HttpTransport("http://relay.test", payload=str, log=False, clock=lambda: 1e9)
    result = transport.answer(batch, status, headers, body)
    engine.on_ack(batch.id, result, 1.0)  # never InvalidAck: the transport validated it
    assert len(engine) == len(REPLY_SESSIONS)
    outcome = outcome_of(status)
    states = {engine.state(sid) for sid in REPLY_SESSIONS}
    if outcome in ("refused", "RelayUnavailable"):
        assert states == {SessionState.QUEUED}
        assert all(not engine.session(s).charges for s in REPLY_SESSIONS)
    elif outcome == "unanswered":
        assert states == {SessionState.IN_FLIGHT}
    elif outcome == "RateLimited":
        assert isinstance(result, acks.RateLimited)
        assert result.retry_after_s is None or 0.0 <= result.retry_after_s <= 3600.0
    elif outcome == "body" and result == {}:
        assert states == {SessionState.IN_FLIGHT}
    if isinstance(result, dict):
        assert set(result) <= {*REPLY_SESSIONS, "zz"}


def test_import_sessionfsm_imports_no_transport_dependency() -> None:
    """`import sessionfsm` (and its command line) never imports httpx, python-socketio
    or aiohttp: the transports are optional extras."""
    import subprocess
    import sys

    code = (
        "import sys, sessionfsm, sessionfsm.tools.cli, sessionfsm.transports;"
        "print(sorted(m for m in ('httpx', 'socketio', 'aiohttp', 'engineio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_url_that_is_not_http_is_a_usage_error() -> None:
    """A misconfigured URL fails at construction, not as an endless pause."""
    from sessionfsm import UsageError
    from sessionfsm.transports.http import HttpTransport

    for url in ("ftp://relay.test/x", "relay.test/sessions", "http://[::1"):
        with pytest.raises(UsageError, match="http"):
            HttpTransport(url, payload=str)
