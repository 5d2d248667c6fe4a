"""``sessionfsm relay`` and ``sessionfsm demo --live``: the reference relay, and
the main job against it in real time on loopback.

Both need the ``http`` and ``socketio`` extras (httpx, aiohttp and
python-socketio); they are imported only when a command runs, so the rest of
the command line works without them.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import click

from .._errors import UsageError

__all__ = ["LiveDemo", "live_demo", "relay_command"]


def _need_extras() -> None:
    try:
        import aiohttp  # noqa: F401
        import httpx  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"this command needs the http extra: pip install 'sessionfsm[http,socketio]' ({exc})"
        ) from None


@click.command("relay")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True, help="0 picks a free port.")
@click.option("--socketio", is_flag=True, help="Also serve Socket.IO (the `sessions` event).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML of settings.")
@click.option("--max-body-bytes", type=int, help="Answer 413 to larger requests.")
@click.option("--throttle-every", type=int, help="Answer 429 to every n-th request.")
@click.option("--retry-after", help="Retry-After with 429: seconds or an HTTP-date.")
@click.option("--drop-every", type=int, help="Cut every n-th stored batch's connection.")
@click.option("--latency-s", type=float, help="Wait this long before answering.")
@click.option("--down", is_flag=True, help="Start down (503; Socket.IO refused).")
def relay_command(config_path: str | None, **flags: Any) -> None:
    """Run the reference relay: stores each session version once, and misbehaves
    on request (POST /_relay/config changes the settings while it runs)."""
    _need_extras()
    import argparse

    from ..reference_relay import ReferenceRelay, config_from_args, serve

    args = argparse.Namespace(config=config_path, **flags)
    try:
        config = config_from_args(args)
    except UsageError as exc:
        raise click.ClickException(str(exc)) from None
    asyncio.run(
        serve(
            ReferenceRelay(config),
            host=flags["host"],
            port=flags["port"],
            socketio=flags["socketio"],
        )
    )


class LiveDemo:
    """The live demo's moving parts, so a test can run it without a terminal.

    A reference relay on a free loopback port, an :class:`~sessionfsm.Engine`
    on a short policy, and a :class:`~sessionfsm.Runner` with
    :class:`~sessionfsm.transports.http.HttpTransport`, for ``seconds`` of
    real time while the relay throttles, drops connections, refuses an
    oversized session and goes down for a moment.
    """

    def __init__(self, *, sessions: int = 200, seconds: float = 15.0, seed: int = 7) -> None:
        from ..engine import Engine
        from ..policy import Exponential, Fixed, Policy, ReasonPolicy
        from ..reference_relay import ReferenceRelay, RelayConfig

        self.seconds = seconds
        self.rng = random.Random(seed)
        self.relay = ReferenceRelay(
            RelayConfig(throttle_every=9, retry_after="0.3", drop_every=11, max_body_bytes=50_000)
        )
        self.policy = Policy(
            batch_size=10,
            incremental_interval_s=0.05,
            max_in_flight=2,
            ack_timeout_s=2.0,
            tick_interval_s=0.05,
            ack_timeout=ReasonPolicy(threshold=3, backoff=Fixed(delay_s=0.3)),
            rate_limited=ReasonPolicy(
                threshold=5, backoff=Fixed(delay_s=0.3), honour_retry_after=True
            ),
            relay_pause=Exponential(base_s=0.2, factor=2.0, cap_s=1.0, jitter=False),
            # Scaled down like every other wait: the default (10 s, doubling)
            # outlasts the whole demo, and a failed probe extends a throttle.
            relay_throttle=Exponential(base_s=0.3, factor=2.0, cap_s=1.0, jitter=False),
        )
        self.engine = Engine(self.policy, rng=random.Random(seed), log=False)
        self.versions = {f"s{i:03d}": 1 for i in range(sessions)}
        self.oversized = "big"
        self.versions[self.oversized] = 1
        self.events: list[str] = []
        self.started = 0.0

    def payload(self, session_id: str) -> Any:
        size = 80_000 if session_id == self.oversized else 200
        return {"id": session_id, "v": self.versions[session_id], "data": "x" * size}

    def version(self, session_id: str) -> str:
        return str(self.versions[session_id])

    async def run(self, on_frame: Any = None) -> None:
        """Run the demo; ``on_frame(self)`` is called about ten times a second."""
        from ..reference_relay import serve
        from ..runner import Runner
        from ..transports.http import HttpTransport

        ready = asyncio.Event()
        server = asyncio.create_task(serve(self.relay, port=0, ready=ready, announce=False))
        await ready.wait()
        url = f"http://127.0.0.1:{self.relay.port}/sessions"
        self.transport = HttpTransport(url, self.payload, version=self.version, log=False)
        runner = Runner(self.engine, self.transport, log=False)
        self.started = time.monotonic()
        for sid in self.versions:
            if sid != self.oversized:
                runner.enqueue(sid)
        loop_task = asyncio.create_task(runner.run())
        script = asyncio.create_task(self._script(runner))
        try:
            while time.monotonic() - self.started < self.seconds:
                if on_frame is not None:
                    on_frame(self)
                await asyncio.sleep(0.1)
                if script.done() and self.engine.idle():
                    break
        finally:
            script.cancel()
            runner.stop()
            await asyncio.gather(loop_task, script, return_exceptions=True)
            await self.transport.aclose()
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
        if on_frame is not None:
            on_frame(self)

    def _note(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:5.1f}s  {text}")

    async def _script(self, runner: Any) -> None:
        # Timed for the default 6 s, squeezed into a shorter run; a longer one
        # just ends once everything is at rest.
        scale = min(1.0, self.seconds / 6.0)
        await asyncio.sleep(0.9 * scale)
        runner.enqueue(self.oversized)
        self._note(f"{self.oversized} enqueued: its payload is larger than the relay takes")
        for sid in self.rng.sample(sorted(self.versions), 15):
            if sid != self.oversized:
                self.versions[sid] += 1
                runner.enqueue(sid)
        self._note("15 sessions changed")
        await asyncio.sleep(0.9 * scale)
        self.relay.config.down = True
        self._note("relay down (503)")
        await asyncio.sleep(1.2 * scale)
        self.relay.config.down = False
        self._note("relay back up")

    def view(self) -> Any:
        """A rich renderable of the states, the link and the relay."""
        from rich.table import Table

        table = Table(title=f"sessionfsm demo --live  ({time.monotonic() - self.started:4.1f} s)")
        table.add_column("state")
        table.add_column("sessions", justify="right")
        for state, n in self.engine.sessions_by_state().items():
            table.add_row(state.value, str(n))
        link = self.engine.link
        table.add_section()
        table.add_row("link", f"{link.state.value} (failures {link.failures})")
        counts = self.relay.counts
        table.add_row("relay", "down" if self.relay.config.down else "up")
        for key in ("requests", "stored_batches", "throttled", "dropped", "too_large", "down"):
            table.add_row(f"  {key}", str(counts.get(key, 0)))
        table.add_row("  versions stored", str(len(self.relay.log)))
        for line in self.events[-4:]:
            table.add_row("", line)
        return table

    def summary(self) -> dict[str, Any]:
        """What happened, as plain data."""
        stored_latest = sum(
            1 for sid, v in self.versions.items() if (sid, str(v)) in set(self.relay.log)
        )
        return {
            "states": {s.value: n for s, n in self.engine.sessions_by_state().items() if n},
            "dead_letters": {v.id: v.dead_letter_reason for v in self.engine.dead_letters()},
            "link": self.engine.link.state.value,
            "relay": dict(self.relay.counts),
            "latest_versions_stored": stored_latest,
            "sessions": len(self.versions),
            "transport": dict(self.transport.stats),
        }


def live_demo(*, seconds: float = 15.0, sessions: int = 200, seed: int = 7) -> dict[str, Any]:
    """Run :class:`LiveDemo` with a live rich view, then print a summary."""
    _need_extras()
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    demo = LiveDemo(sessions=sessions, seconds=seconds, seed=seed)
    console = Console()
    with Live(console=console, refresh_per_second=10, transient=False) as live:
        asyncio.run(demo.run(lambda d: live.update(d.view())))
    summary = demo.summary()
    table = Table(title="summary")
    table.add_column("what")
    table.add_column("value")
    table.add_row("states", ", ".join(f"{k}={v}" for k, v in summary["states"].items()))
    table.add_row(
        "dead letters",
        ", ".join(f"{k} ({v})" for k, v in summary["dead_letters"].items()) or "none",
    )
    table.add_row(
        "latest versions on the relay",
        f"{summary['latest_versions_stored']} of {summary['sessions']}",
    )
    table.add_row("relay", ", ".join(f"{k}={v}" for k, v in sorted(summary["relay"].items())))
    table.add_row(
        "transport replies", ", ".join(f"{k}={v}" for k, v in sorted(summary["transport"].items()))
    )
    table.add_row("link", summary["link"])
    console.print(table)
    return summary
