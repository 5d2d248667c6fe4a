"""``SocketIOTransport``: each batch is one Socket.IO ``call`` (``sessionfsm[socketio]``).

You pass a python-socketio ``AsyncClient`` (connected or not; with ``url``
the transport connects it in :meth:`SocketIOTransport.connect`) and a
``payload(session_id)`` callable::

    client = socketio.AsyncClient(reconnection=True)
    transport = SocketIOTransport(client, payload=load_session, url="https://relay.example")
    await transport.connect()
    await Runner(engine, transport).run()

Each batch is emitted as the ``sessions`` event (the wire format of
:mod:`sessionfsm.transports.wire`, plus ``idempotency_key``), with the
batch's deadline as the call's timeout. The relay's ack is read by
:func:`ack_of_reply`: a reason string (:data:`REASONS`, as a Socket.IO relay
such as ``sendAgentSessions`` answers), a ``{"reason": ..., "retry_after_s": ...}``
object, a tagged ack, or ``{"sessions": {id: one of those}}``.

The socket's own connect and disconnect events become
:class:`sessionfsm.LinkEvent` values through :meth:`link_events`, so the
runner pauses the link the moment the socket drops and resumes when it
returns. A call made while disconnected answers ``RelayUnavailable``
(never charged); one cut short by a disconnect does too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import msgspec
import socketio  # type: ignore[import-untyped]

from .. import acks
from .._errors import InvalidAck, UsageError
from .._log import get_logger
from ..engine import Batch
from ..runner import AckResult, LinkEvent
from .wire import PayloadFn, VersionFn, encode_batch, idempotency_key

__all__ = ["REASONS", "SocketIOTransport", "ack_of_reply"]

#: Reason strings a relay may answer, normalised (lower case, no ``_``, ``-``
#: or spaces), and the ack each means.
REASONS: Final[dict[str, type[acks.Ack]]] = {
    "ok": acks.Ok,
    "accepted": acks.Ok,
    "stored": acks.Ok,
    "ratelimited": acks.RateLimited,
    "throttled": acks.RateLimited,
    "timeout": acks.AckTimeout,
    "acktimeout": acks.AckTimeout,
    "relayunavailable": acks.RelayUnavailable,
    "unavailable": acks.RelayUnavailable,
    "notready": acks.RelayUnavailable,
    "notconnected": acks.RelayUnavailable,
    "payloadtoolarge": acks.PayloadTooLarge,
    "toolarge": acks.PayloadTooLarge,
}

_PREVIEW: Final = 200


def _norm(reason: str) -> str:
    return reason.lower().replace("_", "").replace("-", "").replace(" ", "")


def _retry_after(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidAck(f"retry_after_s must be a number >= 0, got {value!r}")
    if math.isnan(value) or value < 0:
        raise InvalidAck(f"retry_after_s must be a number >= 0, got {value!r}")
    return float(value)


def _item(value: Any) -> acks.Ack:
    """One ack from a reason string, a reason object or a tagged ack."""
    if isinstance(value, str):
        kind = REASONS.get(_norm(value))
        if kind is None:
            raise InvalidAck(f"unknown ack reason {value[:_PREVIEW]!r}")
        return kind()
    if isinstance(value, dict):
        if "type" in value:
            return acks.decode(msgspec.json.encode(value))
        reason = value.get("reason")
        if not isinstance(reason, str):
            raise InvalidAck(f"an ack object needs a string 'reason', got {reason!r}")
        kind = REASONS.get(_norm(reason))
        if kind is None:
            raise InvalidAck(f"unknown ack reason {reason[:_PREVIEW]!r}")
        if kind is acks.RateLimited and value.get("retry_after_s") is not None:
            return acks.RateLimited(retry_after_s=_retry_after(value["retry_after_s"]))
        return kind()
    raise InvalidAck(f"expected a reason string or object, got {type(value).__name__}")


def ack_of_reply(reply: Any, log: Any = None, batch_id: int | None = None) -> AckResult:
    """The answer a Socket.IO ack carries; unreadable parts are left unanswered.

    An unknown reason or malformed entry is logged (``sessionfsm.socketio_bad_reply``)
    and that session (or, for a whole-batch reply, the batch) is left to time
    out. Never raises.
    """
    log = log if log is not None else get_logger(True)
    try:
        if isinstance(reply, dict) and "sessions" in reply:
            sessions = reply["sessions"]
            if not isinstance(sessions, dict):
                raise InvalidAck(f"'sessions' must be an object, got {type(sessions).__name__}")
            result: dict[str, acks.Ack] = {}
            for sid, value in sessions.items():
                try:
                    result[str(sid)] = _item(value)
                except InvalidAck as exc:
                    log.warning(
                        "sessionfsm.socketio_bad_reply",
                        batch_id=batch_id,
                        session_id=str(sid)[:_PREVIEW],
                        error=str(exc)[:_PREVIEW],
                    )
            return result
        if isinstance(reply, dict) and "ack" in reply:
            return _item(reply["ack"])
        if reply is None:
            raise InvalidAck("empty ack")
        return _item(reply)
    except (InvalidAck, msgspec.EncodeError, TypeError, ValueError) as exc:
        log.warning(
            "sessionfsm.socketio_bad_reply",
            batch_id=batch_id,
            error=str(exc)[:_PREVIEW],
            reply=repr(reply)[:_PREVIEW],
        )
        return {}


def _retrieve(task: asyncio.Future[Any]) -> None:
    # A call that times out just as its send is cancelled has nobody to read
    # its exception; read it here so asyncio does not report it as lost.
    if not task.cancelled():
        task.exception()


class SocketIOTransport:
    """Sends each batch with ``client.call(event, data, timeout=...)``.

    You pass the ``client``, a ``payload`` callable (and optionally a
    ``version`` callable, as for :class:`~sessionfsm.transports.http.HttpTransport`),
    and optionally the ``url`` (plus ``connect_kwargs``) that
    :meth:`connect` uses, the ``event`` name and a ``clock``.

    It registers ``connect`` and ``disconnect`` handlers on the client's
    default namespace, calling any you had registered before.
    """

    def __init__(
        self,
        client: socketio.AsyncClient,
        payload: PayloadFn,
        *,
        version: VersionFn | None = None,
        url: str | None = None,
        connect_kwargs: Mapping[str, Any] | None = None,
        event: str = "sessions",
        clock: Callable[[], float] = time.time,
        log: bool = True,
    ) -> None:
        if not callable(payload):
            raise UsageError(f"payload must be a callable payload(session_id), got {payload!r}")
        self.client = client
        self.url = url
        self.event = event
        self._payload = payload
        self._version = version
        self._connect_kwargs = dict(connect_kwargs or {})
        self._clock = clock
        self._log = get_logger(log)
        self._events: asyncio.Queue[LinkEvent] = asyncio.Queue()
        # One future per call under way, resolved when the socket drops.
        self._waiters: set[asyncio.Future[None]] = set()
        #: Calls by outcome: ``answered``, ``timeout``, ``disconnected``, ``unavailable``.
        self.stats: dict[str, int] = {}
        handlers = client.handlers.get("/", {})
        self._chain(handlers.get("connect"), handlers.get("disconnect"))

    def _chain(self, on_connect: Any, on_disconnect: Any) -> None:
        async def connect() -> None:
            self._events.put_nowait(LinkEvent.READY)
            if on_connect is not None:
                result = on_connect()
                if asyncio.iscoroutine(result):
                    await result

        async def disconnect(*args: Any) -> None:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._events.put_nowait(LinkEvent.UNAVAILABLE)
            if on_disconnect is not None:
                result = on_disconnect(*args)
                if asyncio.iscoroutine(result):
                    await result

        self.client.on("connect", connect)
        self.client.on("disconnect", disconnect)

    async def connect(self) -> None:
        """Connect the client to ``url`` (python-socketio reconnects it after a drop)."""
        if self.url is None:
            raise UsageError("connect() needs the url passed to SocketIOTransport")
        await self.client.connect(self.url, **self._connect_kwargs)

    async def aclose(self) -> None:
        """Disconnect the client."""
        await self.client.disconnect()

    async def link_events(self) -> AsyncIterator[LinkEvent]:
        """The socket's state now, then its connects and disconnects as they happen."""
        # Start from the socket's state now; what happened before is history.
        while not self._events.empty():
            self._events.get_nowait()
        yield LinkEvent.READY if self._ready() else LinkEvent.UNAVAILABLE
        while True:
            yield await self._events.get()

    def _ready(self) -> bool:
        # The default namespace is connected: what ``call`` needs. Not
        # ``client.connected``, which python-socketio sets only after the
        # connect handlers ran, so a batch sent the moment READY is reported
        # would be answered RelayUnavailable for nothing.
        return "/" in self.client.namespaces

    def _count(self, outcome: str) -> None:
        self.stats[outcome] = self.stats.get(outcome, 0) + 1

    async def send(self, batch: Batch) -> AckResult:
        """Call the relay with the batch; return its answer."""
        if not self._ready():
            self._count("unavailable")
            return acks.RelayUnavailable()
        body, wire = encode_batch(
            batch.id, batch.lane.value, batch.session_ids, self._payload, self._version
        )
        data = msgspec.json.decode(body)
        data["idempotency_key"] = idempotency_key(wire.sessions)
        timeout = max(batch.deadline - self._clock(), 0.001)
        drop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(drop)
        # python-socketio warns that concurrent calls may interleave the packets
        # of binary messages; a batch is plain JSON, one packet, so calls for
        # concurrent batches (policy.max_in_flight > 1) do not interleave.
        call = asyncio.ensure_future(self.client.call(self.event, data, timeout=timeout))
        call.add_done_callback(_retrieve)
        try:
            await asyncio.wait({call, drop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters.discard(drop)
            if not call.done():
                call.cancel()  # the socket dropped, or this send was cancelled
                await asyncio.wait({call})
        if call.cancelled():
            self._count("disconnected")
            self._log.info("sessionfsm.socketio_disconnected", batch_id=batch.id)
            return acks.RelayUnavailable()
        exc = call.exception()
        if exc is None:
            self._count("answered")
            return ack_of_reply(call.result(), self._log, batch.id)
        if isinstance(exc, socketio.exceptions.TimeoutError):
            if drop.done():
                self._count("disconnected")
                return acks.RelayUnavailable()
            self._count("timeout")
            self._log.info("sessionfsm.socketio_timeout", batch_id=batch.id)
            return acks.AckTimeout()
        if isinstance(exc, (socketio.exceptions.SocketIOError, ConnectionError, OSError)):
            self._count("unavailable")
            self._log.info("sessionfsm.socketio_unavailable", batch_id=batch.id, error=repr(exc))
            return acks.RelayUnavailable()
        raise exc
