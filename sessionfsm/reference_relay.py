"""A reference relay to develop and test against (needs ``sessionfsm[http]``).

It accepts the batches :class:`~sessionfsm.transports.http.HttpTransport`
POSTs (and, with ``socketio=True``, those
:class:`~sessionfsm.transports.socketio.SocketIOTransport` emits), and
stores each session version once:

* a request whose ``Idempotency-Key`` it has answered before gets the same
  answer again and stores nothing;
* a (session, version) it already stored is not stored again.

You can tell it to misbehave, from flags, a TOML file with the same keys as
:class:`RelayConfig`, or at run time with ``POST /_relay/config`` (a JSON
object of the keys to change): throttle every n-th request (429 with
``Retry-After``), refuse requests larger than a size (413 for the whole
request), drop every n-th connection after storing (so the answer is lost),
or go down (503, and Socket.IO clients are disconnected and refused).
``GET /_relay/state`` returns what it stored and counted.

Run it as a process::

    python -m sessionfsm.reference_relay --port 8080 --socketio
    sessionfsm relay --port 8080 --socketio

It prints ``sessionfsm relay listening on http://HOST:PORT`` once it accepts
connections (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from . import acks
from ._errors import UsageError
from .transports.wire import WireBatch, batch_decoder

__all__ = ["ReferenceRelay", "RelayConfig", "main", "serve"]

#: Where batches are POSTed, and the Socket.IO event they are emitted as.
SESSIONS_PATH = "/sessions"
SESSIONS_EVENT = "sessions"


class RelayConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How the relay behaves; every key can be changed at run time."""

    #: Requests with a larger body get 413 (Socket.IO: ``payload_too_large``).
    max_body_bytes: int | None = None
    #: Every n-th request gets 429 (Socket.IO: ``rate_limited``); 0 never.
    throttle_every: int = 0
    #: Throttle every request while set.
    throttled: bool = False
    #: The ``Retry-After`` sent with 429: delta-seconds or an HTTP-date.
    retry_after: str = "1"
    #: Every n-th request is stored, then its connection dropped unanswered; 0 never.
    drop_every: int = 0
    #: While set, every request gets 503 and Socket.IO clients are refused.
    down: bool = False
    #: Seconds to wait before answering.
    latency_s: float = 0.0


class ReferenceRelay:
    """The relay's state and rules, independent of how requests arrive."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config if config is not None else RelayConfig()
        #: Every (session id, version) stored, in order; never a pair twice.
        self.log: list[tuple[str, str]] = []
        self.payloads: dict[str, bytes] = {}
        self._stored: set[tuple[str, str]] = set()
        self._answers: dict[str, bytes] = {}
        self.counts: Counter[str] = Counter()
        self.sio: Any = None
        self._conns: dict[str, Any] = {}
        #: The port it listens on, once serving.
        self.port: int | None = None

    # -------------------------------------------------------------- the rules

    def verdict(self, size: int) -> str:
        """What to do with the next request: ``down``, ``throttle``, ``too_large`` or ``ok``."""
        cfg = self.config
        self.counts["requests"] += 1
        n = self.counts["requests"]
        if cfg.down:
            self.counts["down"] += 1
            return "down"
        if cfg.throttled or (cfg.throttle_every and n % cfg.throttle_every == 0):
            self.counts["throttled"] += 1
            return "throttle"
        if cfg.max_body_bytes is not None and size > cfg.max_body_bytes:
            self.counts["too_large"] += 1
            return "too_large"
        return "ok"

    def store(self, batch: WireBatch, key: str | None) -> tuple[bytes, bool]:
        """Store the batch's new versions; return the answer and whether to drop it."""
        if key is not None and key in self._answers:
            self.counts["replayed"] += 1
            return self._answers[key], False
        for session in batch.sessions:
            pair = (session.id, session.version)
            if pair in self._stored:
                self.counts["duplicate_versions"] += 1
                continue
            self._stored.add(pair)
            self.log.append(pair)
            self.payloads[session.id] = bytes(session.payload)
        answer = acks.encode(
            acks.BatchAck(
                batch_id=batch.batch_id, sessions={s.id: acks.Ok() for s in batch.sessions}
            )
        )
        if key is not None:
            self._answers[key] = answer
        self.counts["stored_batches"] += 1
        drop = (
            bool(self.config.drop_every)
            and self.counts["stored_batches"] % self.config.drop_every == 0
        )
        if drop:
            self.counts["dropped"] += 1
        return answer, drop

    def state(self) -> dict[str, Any]:
        """What was stored and counted, as JSON-able data."""
        stored: dict[str, list[str]] = {}
        for sid, version in self.log:
            stored.setdefault(sid, []).append(version)
        return {
            "stored": stored,
            "counts": dict(self.counts),
            "config": msgspec.to_builtins(self.config),
        }

    async def configure(self, changes: dict[str, Any]) -> RelayConfig:
        """Change some keys of the config (raises ``UsageError`` on a bad one)."""
        merged = {**msgspec.to_builtins(self.config), **changes}
        try:
            config = msgspec.convert(merged, RelayConfig)
        except msgspec.ValidationError as exc:
            raise UsageError(f"invalid relay config: {exc}") from None
        self.config = config
        if config.down and self.sio is not None:
            for sid in list(self._clients):
                await self._cut(sid)
        return config

    async def _cut(self, sid: str) -> None:
        """Cut a Socket.IO client off as a network failure would: no goodbye,
        so the client sees its connection fail and reconnects by itself."""
        request = self._conns.pop(sid, None)
        transport = getattr(request, "transport", None)
        if transport is None:  # long-polling: only a clean disconnect is possible
            await self.sio.disconnect(sid)
            return
        transport.abort()

    @property
    def _clients(self) -> list[str]:
        if self.sio is None:
            return []
        return [sid for sid, _ in self.sio.manager.get_participants("/", None)]

    # ------------------------------------------------------------------- HTTP

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.config.latency_s:
            await asyncio.sleep(self.config.latency_s)
        verdict = self.verdict(len(body))
        if verdict == "down":
            return web.Response(status=503, text="relay is down")
        if verdict == "throttle":
            return web.Response(status=429, headers={"Retry-After": self.config.retry_after})
        if verdict == "too_large":
            return web.Response(status=413, text="request too large")
        try:
            batch = batch_decoder.decode(body)
        except msgspec.DecodeError as exc:
            self.counts["bad_requests"] += 1
            return web.Response(status=400, text=f"bad batch: {exc}")
        answer, drop = self.store(batch, request.headers.get("Idempotency-Key"))
        if drop and request.transport is not None:
            request.transport.abort()  # stored, but the answer is lost on the way
            return web.Response(status=204)
        return web.Response(body=answer, content_type="application/json")

    async def _get_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise UsageError("the body must be a JSON object")
            config = await self.configure(changes)
        except (ValueError, UsageError) as exc:
            return web.Response(status=400, text=str(exc))
        return web.json_response(msgspec.to_builtins(config))

    # -------------------------------------------------------------- Socket.IO

    def _attach_socketio(self, app: web.Application) -> None:
        import socketio  # type: ignore[import-untyped]

        sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=64 * 1024 * 1024)
        sio.attach(app)
        self.sio = sio

        @sio.event  # type: ignore[untyped-decorator]
        async def connect(sid: str, environ: Any, auth: Any = None) -> None:
            if self.config.down:
                raise socketio.exceptions.ConnectionRefusedError("relay is down")
            # Over a websocket this is the socket's own request: aborting its
            # transport is a network failure, as far as the client can tell.
            self._conns[sid] = environ.get("aiohttp.request")

        @sio.event  # type: ignore[untyped-decorator]
        async def disconnect(sid: str, *args: Any) -> None:
            self._conns.pop(sid, None)

        @sio.on(SESSIONS_EVENT)  # type: ignore[untyped-decorator]
        async def sessions(sid: str, data: Any) -> Any:
            return await self._on_sessions(sid, data)

    async def _on_sessions(self, sid: str, data: Any) -> Any:
        if self.config.latency_s:
            await asyncio.sleep(self.config.latency_s)
        body = msgspec.json.encode(data)
        verdict = self.verdict(len(body))
        if verdict == "down":
            return {"reason": "relay_unavailable"}
        if verdict == "throttle":
            try:
                retry: float | None = float(self.config.retry_after)
            except ValueError:  # an HTTP-date: Socket.IO acks carry seconds only
                retry = None
            return {"reason": "rate_limited", "retry_after_s": retry}
        if verdict == "too_large":
            return {"reason": "payload_too_large"}
        try:
            key = data.get("idempotency_key") if isinstance(data, dict) else None
            batch = batch_decoder.decode(body)
        except msgspec.DecodeError as exc:
            self.counts["bad_requests"] += 1
            return {"reason": "bad_request", "error": str(exc)}
        _answer, drop = self.store(batch, key)
        if drop:
            await self._cut(sid)  # stored, but the ack is lost
            return None
        return {"reason": "ok"}

    # -------------------------------------------------------------------- app

    def app(self, *, socketio: bool = False) -> web.Application:
        """The aiohttp application; with ``socketio``, a Socket.IO server too."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(SESSIONS_PATH, self._post)
        app.router.add_get("/_relay/state", self._get_state)
        app.router.add_post("/_relay/config", self._post_config)
        if socketio:
            self._attach_socketio(app)
        return app


def load_config(path: str | Path) -> RelayConfig:
    """A :class:`RelayConfig` from a TOML file (``UsageError`` if it is wrong)."""
    try:
        data = tomllib.loads(Path(path).read_text())
        return msgspec.convert(data, RelayConfig)
    except (OSError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise UsageError(f"cannot read relay config {str(path)!r}: {exc}") from None


async def serve(
    relay: ReferenceRelay,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    socketio: bool = False,
    ready: asyncio.Event | None = None,
    announce: bool = True,
) -> None:
    """Serve ``relay`` until cancelled (or SIGINT/SIGTERM in the main thread)."""
    runner = web.AppRunner(relay.app(socketio=socketio), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    relay.port = bound
    if announce:
        print(f"sessionfsm relay listening on http://{host}:{bound}", flush=True)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    """The config a file and flags describe (flags win)."""
    config = load_config(args.config) if args.config else RelayConfig()
    changes = {
        key: getattr(args, key)
        for key in ("max_body_bytes", "throttle_every", "retry_after", "drop_every", "latency_s")
        if getattr(args, key) is not None
    }
    if args.down:
        changes["down"] = True
    return msgspec.convert({**msgspec.to_builtins(config), **changes}, RelayConfig)


def parser() -> argparse.ArgumentParser:
    """The command-line flags (shared with ``sessionfsm relay``)."""
    p = argparse.ArgumentParser(prog="python -m sessionfsm.reference_relay", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--socketio", action="store_true", help="also serve Socket.IO")
    p.add_argument("--config", help="a TOML file of RelayConfig keys")
    p.add_argument("--max-body-bytes", type=int, dest="max_body_bytes")
    p.add_argument("--throttle-every", type=int, dest="throttle_every")
    p.add_argument("--retry-after", dest="retry_after")
    p.add_argument("--drop-every", type=int, dest="drop_every")
    p.add_argument("--latency-s", type=float, dest="latency_s")
    p.add_argument("--down", action="store_true", help="start down")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the relay as a process until SIGINT or SIGTERM."""
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (UsageError, msgspec.ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(
        serve(ReferenceRelay(config), host=args.host, port=args.port, socketio=args.socketio)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
