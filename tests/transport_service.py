"""A sync service as a user would write one, run as its own process by the
end-to-end tests (``python -m tests.transport_service``).

It syncs the sessions of a JSON data file (``{id: {"v": version, "size":
bytes, "changes": n}}``) to a relay through a real transport, persisting the
engine in SQLite, and changes some sessions while it runs. A change updates
the data in memory, enqueues the session (persisted at once) and then
rewrites the data file, so a kill at any point leaves at worst a queued
session whose stored version is the older one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

from sessionfsm import Engine, Exponential, Fixed, Policy, ReasonPolicy, Runner, SqliteStore

#: Small intervals and timeouts, so the chaos of a test fits in a few seconds.
POLICY = Policy(
    batch_size=10,
    incremental_interval_s=0.0,
    max_in_flight=2,
    ack_timeout_s=2.0,
    tick_interval_s=0.05,
    ack_timeout=ReasonPolicy(threshold=3, backoff=Fixed(delay_s=0.2)),
    rate_limited=ReasonPolicy(
        threshold=5, backoff=Fixed(delay_s=0.2), honour_retry_after=True, retry_after_cap_s=1.0
    ),
    relay_pause=Exponential(base_s=0.1, factor=2.0, cap_s=0.5, jitter=False),
    # The relay-wide throttle's own wait too (the default starts at 10 s and
    # doubles): a probe answered with a whole-request 413 extends the throttle.
    relay_throttle=Exponential(base_s=0.2, factor=2.0, cap_s=1.0, jitter=False),
    # An oversized session that is the last one left is refused with nothing
    # else going through: no evidence against it, so it is charged only once
    # the relay has accepted nothing for this long (docs/blame.md, "The limit,
    # and the bound"; 6 hours by default). Longer than the relay's outage in
    # the tests (2.5 s), so no valid session is charged by the bound.
    max_relay_refusal_s=5.0,
)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def main(args: argparse.Namespace) -> int:
    data_path = Path(args.data)
    data: dict[str, Any] = json.loads(data_path.read_text())
    rng = random.Random(args.seed)

    def payload(sid: str) -> Any:
        item = data[sid]
        return {"id": sid, "v": item["v"], "pad": "x" * item["size"]}

    def version(sid: str) -> str:
        return str(data[sid]["v"])

    store = SqliteStore(args.db)
    engine = Engine(POLICY, store=store, rng=random.Random(args.seed))
    connector: asyncio.Task[None] | None = None
    if args.transport == "http":
        from sessionfsm.transports.http import HttpTransport

        transport: Any = HttpTransport(f"{args.url}/sessions", payload, version=version)
    else:
        import socketio

        from sessionfsm.transports.socketio import SocketIOTransport

        client = socketio.AsyncClient(reconnection_delay=0.1, reconnection_delay_max=0.5)
        transport = SocketIOTransport(
            client,
            payload,
            version=version,
            url=args.url,
            connect_kwargs={"transports": ["websocket"]},
        )

        async def connect() -> None:
            # Until the first connect succeeds; python-socketio reconnects
            # after that. Any failure is said and retried: a connector that
            # died quietly would leave the service waiting on a dead link.
            while not client.connected:
                try:
                    await transport.connect()
                except Exception as exc:
                    logging.getLogger("service").warning("connect failed: %r", exc)
                    await asyncio.sleep(0.1)

        connector = asyncio.create_task(connect())
    runner = Runner(engine, transport, store=store, grace_s=5.0)
    for sid in data:
        if sid not in engine:
            runner.enqueue(sid)

    async def change() -> None:
        candidates = [sid for sid, item in data.items() if item.get("changes", 0) > 0]
        for _ in range(args.changes):
            await asyncio.sleep(rng.uniform(0.0, 0.1))
            if not candidates:
                return
            sid = rng.choice(candidates)
            data[sid] = {**data[sid], "v": data[sid]["v"] + 1, "changes": data[sid]["changes"] - 1}
            if data[sid]["changes"] == 0:
                candidates.remove(sid)
            runner.enqueue(sid)
            _write(data_path, data)

    changer = asyncio.create_task(change())
    try:
        await runner.run(until_idle=args.until_idle, handle_signals=True, max_seconds=120)
    finally:
        changer.cancel()
        if connector is not None:
            connector.cancel()
        await transport.aclose()
    print(json.dumps({"counts": {s.value: n for s, n in engine.sessions_by_state().items() if n}}))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--transport", choices=["http", "socketio"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--changes", type=int, default=0)
    parser.add_argument("--until-idle", action="store_true")
    # The library is silent until its host configures logging; this service
    # logs to stdout, which the test reads (it waits for runner_started).
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
