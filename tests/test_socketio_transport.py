"""SocketIOTransport: reason strings to acks, fuzzed acks, and a real Socket.IO
relay process for connects, drops, timeouts and refusals."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import socketio
from hypothesis import given

from sessionfsm import LinkEvent, acks
from sessionfsm.transports.socketio import REASONS, SocketIOTransport, ack_of_reply
from tests.conftest import RelayProcess, batch_in_flight
from tests.strategies import socketio_replies

# ------------------------------------------------------------- the mapping


@pytest.mark.parametrize(("reason", "kind"), sorted(REASONS.items()))
def test_every_reason_string_maps_to_its_ack(reason: str, kind: type[acks.Ack]) -> None:
    """Each documented reason string, in any spelling, answers its ack."""
    for spelling in (reason, reason.upper(), reason.title()):
        assert ack_of_reply(spelling) == kind()
    assert ack_of_reply({"reason": reason}) == kind()


def test_reply_shapes() -> None:
    """Reason objects, tagged acks, and per-session replies all decode."""
    assert ack_of_reply("rate_limited") == acks.RateLimited()
    assert ack_of_reply({"reason": "RateLimited", "retry_after_s": 3}) == acks.RateLimited(
        retry_after_s=3.0
    )
    assert ack_of_reply({"type": "PayloadTooLarge"}) == acks.PayloadTooLarge()
    assert ack_of_reply({"ack": "not_ready"}) == acks.RelayUnavailable()
    assert ack_of_reply({"sessions": {"a": "ok", "b": {"type": "AckTimeout"}}}) == {
        "a": acks.Ok(),
        "b": acks.AckTimeout(),
    }


def test_unknown_reasons_are_logged_and_left_unanswered(logs: list[dict[str, Any]]) -> None:
    """An unknown reason leaves its session (or the batch) unanswered, with a log."""
    assert ack_of_reply("exploded", batch_id=3) == {}
    assert ack_of_reply({"sessions": {"a": "ok", "b": "exploded"}}) == {"a": acks.Ok()}
    assert ack_of_reply({"reason": "rate_limited", "retry_after_s": -1}) == {}
    assert [e["event"] for e in logs] == ["sessionfsm.socketio_bad_reply"] * 3


@given(socketio_replies)
def test_fuzzed_acks_give_a_valid_answer_and_never_raise(reply: Any) -> None:
    """Whatever a relay acks with, the answer is a valid ack or mapping, applied cleanly."""
    from sessionfsm._log import NullLogger

    result = ack_of_reply(reply, NullLogger())
    engine, batch = batch_in_flight()
    if isinstance(result, dict):
        for value in result.values():
            acks.validate(value)
    else:
        acks.validate(result)
    engine.on_ack(batch.id, result, 1.0)
    assert len(engine) == 3


# ------------------------------------------------------ against a real relay


async def _transport(relay: RelayProcess, **kw: Any) -> SocketIOTransport:
    client = socketio.AsyncClient(reconnection_delay=0.1, reconnection_delay_max=0.2)
    kw.setdefault("payload", lambda sid: {"id": sid})
    transport = SocketIOTransport(
        client, url=relay.url, connect_kwargs={"transports": ["websocket"]}, **kw
    )
    await transport.connect()
    return transport


async def _next(events: AsyncIterator[LinkEvent]) -> LinkEvent:
    return await asyncio.wait_for(events.__anext__(), timeout=30)


def test_a_batch_is_stored_and_acked_ok(relay_process: RelayProcess) -> None:
    """A batch emitted to a real relay is stored and acknowledged Ok."""
    _, batch = batch_in_flight()

    async def run() -> Any:
        transport = await _transport(relay_process, clock=lambda: 0.0)
        try:
            return await transport.send(batch)
        finally:
            await transport.aclose()

    assert asyncio.run(run()) == acks.Ok()
    assert set(relay_process.state()["stored"]) == {"a", "b", "c"}


def test_not_connected_is_relay_unavailable() -> None:
    """Sending on a client that is not connected answers RelayUnavailable at once."""
    _, batch = batch_in_flight()
    transport = SocketIOTransport(socketio.AsyncClient(), payload=str)
    assert asyncio.run(transport.send(batch)) == acks.RelayUnavailable()


def test_a_slow_relay_is_an_ack_timeout(relay_process: RelayProcess) -> None:
    """No ack before the batch's deadline answers AckTimeout."""
    relay_process.configure(latency_s=5.0)
    _, batch = batch_in_flight()

    async def run() -> Any:
        transport = await _transport(relay_process, clock=lambda: batch.deadline - 0.3)
        try:
            return await transport.send(batch)
        finally:
            await transport.aclose()

    assert asyncio.run(run()) == acks.AckTimeout()


def test_throttling_is_rate_limited_with_its_retry_after(relay_process: RelayProcess) -> None:
    """A throttling relay's reason and retry delay come back as RateLimited."""
    relay_process.configure(throttled=True, retry_after="2.5")
    _, batch = batch_in_flight()

    async def run() -> Any:
        transport = await _transport(relay_process, clock=lambda: 0.0)
        try:
            return await transport.send(batch)
        finally:
            await transport.aclose()

    assert asyncio.run(run()) == acks.RateLimited(retry_after_s=2.5)


def test_connects_and_drops_become_link_events(relay_process: RelayProcess) -> None:
    """The socket's connect and drop are reported as READY and UNAVAILABLE, a call cut
    short by the drop answers RelayUnavailable, and the reconnect reports READY."""
    _, batch = batch_in_flight()

    async def run() -> list[Any]:
        transport = await _transport(relay_process, clock=lambda: 0.0)
        events = transport.link_events()
        seen: list[Any] = [await _next(events)]
        relay_process.configure(drop_every=1)
        seen.append(await transport.send(batch))  # stored, then the socket is cut
        seen.append(await _next(events))
        seen.append(await _next(events))  # python-socketio reconnects by itself
        relay_process.configure(down=True)
        seen.append(await _next(events))
        seen.append(await transport.send(batch))
        relay_process.configure(down=False)
        seen.append(await _next(events))
        await transport.aclose()
        return seen

    assert asyncio.run(run()) == [
        LinkEvent.READY,
        acks.RelayUnavailable(),
        LinkEvent.UNAVAILABLE,
        LinkEvent.READY,
        LinkEvent.UNAVAILABLE,
        acks.RelayUnavailable(),
        LinkEvent.READY,
    ]


def test_a_send_right_after_the_connect_event_goes_out(relay_process: RelayProcess) -> None:
    """READY is reported from the socket's connect handler, before python-socketio's
    ``connect()`` returns; a batch sent the moment it arrives is stored and acked,
    not answered RelayUnavailable (which would pause the link for nothing)."""
    _, batch = batch_in_flight()

    async def run() -> list[Any]:
        client = socketio.AsyncClient(reconnection=False)
        transport = SocketIOTransport(
            client,
            payload=lambda sid: {"id": sid},
            url=relay_process.url,
            connect_kwargs={"transports": ["websocket"]},
            clock=lambda: 0.0,
        )
        events = transport.link_events()
        seen: list[Any] = [await events.__anext__()]
        connecting = asyncio.ensure_future(transport.connect())
        seen.append(await events.__anext__())
        seen.append(client.connected)  # still connecting
        seen.append(await transport.send(batch))
        await connecting
        await transport.aclose()
        return seen

    assert asyncio.run(run()) == [LinkEvent.UNAVAILABLE, LinkEvent.READY, False, acks.Ok()]
    assert set(relay_process.state()["stored"]) == set(batch.session_ids)
