"""The ``sessionfsm`` command line.

Only this module (and the runner) configures structlog; the library never
does. Exit codes: 0 ok, 1 failure, 2 usage. Errors go to stderr in one line.
"""

from __future__ import annotations

import logging
import random
import sys
from typing import Any

import click
import structlog

from . import acks
from ._errors import SessionFSMError
from .diagrams import command as diagrams_command
from .engine import Engine
from .policy import Policy
from .testing import EngineHarness, ScriptedRelay

__all__ = ["configure_logging", "main"]


def configure_logging(level: str = "warning", *, json: bool | None = None) -> None:
    """Configure structlog for a command-line run: console on a terminal, JSON otherwise."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class _Group(click.Group):
    """Turns library errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SessionFSMError as exc:
            click.echo(f"sessionfsm: error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="Log events at this level and above go to stderr.",
)
@click.option("--log-json/--log-console", default=None, help="Log format (default: by terminal).")
@click.version_option(package_name="sessionfsm")
def main(log_level: str, log_json: bool | None) -> None:
    """An explicit, compiled state-machine engine for syncing sessions."""
    configure_logging(log_level, json=log_json)


@main.command()
@click.option("--seed", type=int, default=7, show_default=True, help="Seed for backoff jitter.")
def demo(seed: int) -> None:
    """Sync a dozen sessions against a scripted relay and show what happened.

    The relay refuses one oversized session with RateLimited every time, goes
    unavailable for a while, loses one ack, and one session changes while in
    flight. Watch the oversized session dead-letter after 5 RateLimited acks
    while the flap costs nobody anything.
    """
    engine = Engine(Policy(), rng=random.Random(seed))
    relay = ScriptedRelay()
    harness = EngineHarness(engine, relay)
    harness.enqueue([f"s{i:02d}" for i in range(1, 9)])
    harness.enqueue([f"old{i}" for i in range(1, 5)], lane="backfill")
    relay.always("s03", acks.RateLimited())  # the oversized session of the incident
    relay.script("s05", None)  # its ack is lost: the engine times it out
    harness.step()  # t=0: the first incremental batch
    engine.enqueue("s02", now=harness.clock.now)  # changed after it was synced
    while harness.clock.now < 35.0:
        harness.step()
    relay.down()  # the relay flaps for 20 s: nobody may be charged for it
    while harness.clock.now < 55.0:
        harness.step()
    relay.up()
    engine.relay_ready(harness.clock.now)
    done_at = harness.run_until_idle()

    rows = []
    for view in engine.sessions():
        rows.append(
            (
                view.id,
                view.lane.value,
                view.state.value,
                str(relay.sends_of(view.id)),
                view.dead_letter_reason or "",
            )
        )
    _print_table(
        f"demo: idle after {done_at:g} simulated seconds, {len(relay.sent)} batches sent",
        ("session", "lane", "state", "sends", "dead-letter reason"),
        rows,
    )
    counts = {state.value: n for state, n in engine.counts().items() if n}
    click.echo(f"states: {counts}  link: {engine.link.state.value}  ignored: {engine.anomalies}")


def _print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


main.add_command(diagrams_command)


if __name__ == "__main__":  # pragma: no cover
    main()
