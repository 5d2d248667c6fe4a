"""The ``sessionfsm`` command line.

Only this module (and the runner) configures structlog; the library never
does. Exit codes: 0 ok, 1 failure, 2 usage. Errors go to stderr in one line.
"""

from __future__ import annotations

import datetime
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import msgspec
import structlog

from . import acks
from ._errors import SessionFSMError
from .bench import command as bench_command
from .check import command as check_command
from .diagrams import command as diagrams_command
from .engine import Engine
from .machine import CHARGED_REASONS
from .policy import Policy, load_policy
from .sim.command import command as simulate_command
from .sqlite_store import SqliteStore
from .testing import EngineHarness, ScriptedRelay
from .tools.fleet_cli import command as fleet_command

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


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


main.add_command(diagrams_command)
main.add_command(bench_command)
main.add_command(check_command)
main.add_command(fleet_command)  # sessionfsm fleet status --dsn / fleet check


# ------------------------------------------------------------------------
# Simulate, and operate a real store: status, dead-letters, history, redrive.
# ------------------------------------------------------------------------

_DB_HELP = "SQLite database of the engine (written by a service or `simulate`)."


def _db_option(func: Any) -> Any:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        default="sessionfsm.db",
        show_default=True,
        help=_DB_HELP,
    )(func)


def _json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def _read_store(db: Path) -> SqliteStore:
    # Read-only: works while a service holds the file for writing, and never
    # creates an empty database by mistake.
    return SqliteStore(db, readonly=True)


def _when(at: float | None) -> str:
    if at is None:
        return ""
    if at >= 1e9:  # wall-clock seconds: a service's, or a redrive's
        return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds")
    return f"{at:,.3f} s"  # simulated seconds


def _echo_json(data: Any) -> None:
    click.echo(msgspec.json.encode(data))


def _show_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@main.command()
@_db_option
@_json_option
def status(db: Path, as_json: bool) -> None:
    """Sessions by state, and the relay link, as last saved in the database."""
    with _read_store(db) as store:
        counts = {state.value: n for state, n in store.counts().items()}
        link, now = store.link(), store.now()
    if as_json:
        _echo_json(
            {
                "db": str(db),
                "sessions": sum(counts.values()),
                "counts": counts,
                "link": {
                    "state": link.state.value,
                    "failures": link.failures,
                    "resume_at": link.resume_at,
                },
                "now": now,
            }
        )
        return
    rows: list[tuple[str, ...]] = [(state, str(n)) for state, n in counts.items()]
    rows.append(("total", str(sum(counts.values()))))
    _show_table("sessions by state", ("state", "sessions"), rows)
    resume = f", resumes at {_when(link.resume_at)}" if link.resume_at is not None else ""
    click.echo(
        f"{db}: link {link.state.value} ({link.failures} consecutive failures{resume}), "
        f"last saved at {_when(now) or 'never'}"
    )


@main.command("dead-letters")
@_db_option
@click.option(
    "--reason",
    type=click.Choice(CHARGED_REASONS),
    help="Only the dead letters of this reason.",
)
@_json_option
def dead_letters(db: Path, reason: str | None, as_json: bool) -> None:
    """List dead-lettered sessions, oldest first: reason, attempts and when."""
    with _read_store(db) as store:
        dead = store.dead_letters(reason)
    by_reason = dict(sorted(Counter(v.dead_letter_reason or "?" for v in dead).items()))
    if as_json:
        _echo_json(
            {
                "db": str(db),
                "total": len(dead),
                "by_reason": by_reason,
                "sessions": [
                    {
                        "id": v.id,
                        "reason": v.dead_letter_reason,
                        "attempts": v.attempts,
                        "dead_lettered_at": v.dead_lettered_at,
                        "lane": v.lane.value,
                    }
                    for v in dead
                ],
            }
        )
        return
    _show_table(
        f"{len(dead)} dead letter{'' if len(dead) == 1 else 's'}"
        + (f" ({', '.join(f'{r} {n}' for r, n in by_reason.items())})" if dead else ""),
        ("session", "reason", "attempts", "dead-lettered at", "lane"),
        [
            (v.id, v.dead_letter_reason or "", str(v.attempts), _when(v.dead_lettered_at), v.lane)
            for v in dead
        ],
    )


@main.command()
@click.argument("session_id")
@_db_option
@click.option("--limit", type=click.IntRange(min=1), help="Only the last N transitions.")
@_json_option
def history(session_id: str, db: Path, limit: int | None, as_json: bool) -> None:
    """The transition history of one session, oldest first."""
    with _read_store(db) as store:
        view = store.session(session_id)
        rows = store.history(session_id, limit=limit)
    if as_json:
        _echo_json(
            {
                "db": str(db),
                "session": msgspec.to_builtins(view),
                "history": msgspec.to_builtins(rows),
            }
        )
        return
    _show_table(
        f"{session_id}: {view.state.value}"
        + (f" ({view.dead_letter_reason})" if view.dead_letter_reason else ""),
        ("at", "event", "from", "to", "reason", "attempt"),
        [
            (_when(c.at), c.event, c.source or "", c.target, c.reason or "", str(c.attempt))
            for c in rows
        ],
    )


@main.command()
@click.argument("session_id", required=False)
@_db_option
@click.option("--all", "redrive_all", is_flag=True, help="Redrive every dead letter.")
@click.option(
    "--reason",
    type=click.Choice(CHARGED_REASONS),
    help="Redrive the dead letters of this reason.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="With --all or --reason: at most N, oldest first (run again for the next N).",
)
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy TOML of the service (default: the built-in policy).",
)
@_json_option
def redrive(
    session_id: str | None,
    db: Path,
    redrive_all: bool,
    reason: str | None,
    limit: int | None,
    policy_path: Path | None,
    as_json: bool,
) -> None:
    """Give dead letters a fresh start: back to queued, counters cleared.

    Pass one SESSION_ID, --all, or --reason R; --limit N paces a recovered
    relay by redriving at most N per run. The database must not be held by a
    running service (stop it first; it picks the sessions up when it starts).
    Times are written in wall-clock seconds.
    """
    chosen = [x for x in (session_id is not None, redrive_all, reason is not None) if x]
    if len(chosen) != 1:
        raise click.UsageError("pass exactly one of SESSION_ID, --all or --reason")
    if session_id is not None and limit is not None:
        raise click.UsageError("--limit goes with --all or --reason, not a SESSION_ID")
    policy = load_policy(policy_path) if policy_path is not None else Policy()
    if not db.exists():
        from ._errors import StoreError

        # A writable store would create an empty database: nothing to redrive there.
        raise StoreError(f"cannot open store {str(db)!r}: the file does not exist")
    store = SqliteStore(db)
    try:
        engine = Engine(policy, store=store)
        now = max(time.time(), engine.now)
        if session_id is not None:
            engine.redrive(session_id, now)
            ids = [session_id]
        else:
            ids = engine.redrive_all(now, reason=reason, limit=limit)
        left = len(engine.dead_letters())
    finally:
        store.close()
    if as_json:
        _echo_json({"db": str(db), "redriven": ids, "dead_letters_left": left})
        return
    plural = "s" if len(ids) != 1 else ""
    click.echo(f"redrove {len(ids)} session{plural}; {left} dead letters left")
    for sid in ids:
        click.echo(sid)


main.add_command(simulate_command)


if __name__ == "__main__":  # pragma: no cover
    main()
