"""The ``sessionfsm`` command line (the ``cli`` extra: click and rich).

Only the command line configures logging; the library never does. Exit
codes: 0 ok, 1 a failure that is not the caller's (the store, the relay, a
check that found a problem), 2 the caller's mistake (a bad option, a missing
file, an unknown session). Errors go to stderr in one line.

The heavy subcommands (``check``, ``simulate``, ``diagrams``, ``bench``) are
registered by name in :data:`LAZY_COMMANDS` and imported only when run (or
listed by ``--help``), so ``sessionfsm status`` never loads the model
checker, the simulator, the benchmark, cProfile or tracemalloc.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import logging
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import msgspec
import structlog

from sessionfsm import acks
from sessionfsm._errors import SessionFSMError, StoreLocked, UsageError
from sessionfsm._log import render_times
from sessionfsm.engine import Engine
from sessionfsm.machine import CHARGED_REASONS, SessionState
from sessionfsm.policy import Policy, load_policy
from sessionfsm.sqlite_store import SqliteStore
from sessionfsm.store import StoreReader
from sessionfsm.testing import EngineHarness, ScriptedRelay

__all__ = ["configure_logging", "main", "open_reader"]


_LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "warning", *, json: bool | None = None) -> None:
    """Configure structlog for a command-line run: console on a terminal, JSON otherwise.

    Times (the ``timestamp`` and fields such as ``retry_at``) are ISO-8601 in UTC.
    """
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
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            render_times(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


#: Subcommands imported on first use: name -> (module, attribute). The
#: attribute is the click command, or a function that returns it.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("sessionfsm.tools.bench_command", "load"),
    "check": ("sessionfsm.tools.check", "command"),
    "diagrams": ("sessionfsm.tools.diagrams", "command"),
    "relay": ("sessionfsm.tools.live", "relay_command"),
    "fleet": ("sessionfsm.tools.fleet_cli", "command"),
    "simulate": ("sessionfsm.tools.sim.command", "command"),
}


def _set_log_level(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """``--log-level`` / ``--log-json`` given after the subcommand: reconfigure."""
    if value is None:
        return
    root = ctx.find_root()
    root.params[str(param.name)] = value
    configure_logging(
        str(root.params.get("log_level") or "warning"), json=root.params.get("log_json")
    )


def _log_options() -> list[click.Parameter]:
    return [
        click.Option(
            ["--log-level"],
            type=click.Choice(_LOG_LEVELS, case_sensitive=False),
            default=None,
            expose_value=False,
            callback=_set_log_level,
            help="Log events at this level and above go to stderr (default: warning).",
        ),
        click.Option(
            ["--log-json/--log-console"],
            default=None,
            expose_value=False,
            callback=_set_log_level,
            help="Log format (default: by terminal).",
        ),
    ]


class _Group(click.Group):
    """Turns library errors into one line on stderr: exit 2 if the caller's, else 1.

    Every subcommand also accepts the group's logging options, so
    ``sessionfsm simulate incident --log-level info`` works as well as
    ``sessionfsm --log-level info simulate incident``.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        have = {opt for param in cmd.params for opt in getattr(param, "opts", ())}
        if "--log-level" not in have:
            cmd.params.extend(_log_options())
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in LAZY_COMMANDS:
            return command
        module_name, attribute = LAZY_COMMANDS[cmd_name]
        found = getattr(importlib.import_module(module_name), attribute)
        # A loader function picks the command at run time (bench: next to the source).
        loaded: click.Command = found if isinstance(found, click.Command) else found()
        self.add_command(loaded, cmd_name)
        return loaded

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            click.echo(f"sessionfsm: error: {exc}", err=True)
            ctx.exit(2)
        except SessionFSMError as exc:
            click.echo(f"sessionfsm: error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    default="warning",
    show_default=True,
    help="Log events at this level and above go to stderr.",
)
@click.option("--log-json/--log-console", default=None, help="Log format (default: by terminal).")
@click.version_option(package_name="sessionfsm")
def main(log_level: str, log_json: bool | None) -> None:
    """An explicit, compiled state-machine engine for syncing sessions."""
    configure_logging(log_level.lower(), json=log_json)


@main.command()
@click.option("--seed", type=int, default=7, show_default=True, help="Seed for backoff jitter.")
@click.option("--live", is_flag=True, help="Run for real against the reference relay on loopback.")
@click.option(
    "--seconds",
    type=float,
    default=15.0,
    show_default=True,
    help="With --live: at most this long; it stops once every session is at rest.",
)
def demo(seed: int, live: bool, seconds: float) -> None:
    """Sync a dozen sessions against a scripted relay and show what happened.

    The relay refuses one oversized session with RateLimited every time, goes
    unavailable for a while, loses one ack, and one session changes while in
    flight; another (s01, the user's open session) keeps changing every 20 s.
    Watch the oversized session dead-letter after 5 RateLimited acks, each
    charged because the relay accepted s01 meanwhile, while the flap costs
    nobody anything. With --live: see docs/transports.md.
    """
    if live:
        from sessionfsm.tools.live import live_demo

        live_demo(seconds=seconds, seed=seed)
        return
    engine = Engine(Policy(), rng=random.Random(seed))
    relay = ScriptedRelay()
    harness = EngineHarness(engine, relay)
    harness.enqueue([f"s{i:02d}" for i in range(1, 9)])
    harness.enqueue([f"old{i}" for i in range(1, 5)], lane="backfill")
    relay.always("s03", acks.RateLimited())  # the oversized session of the incident
    relay.script("s05", None)  # its ack is lost: the engine times it out
    harness.step()  # t=0: the first incremental batch
    engine.enqueue("s02", now=harness.clock.now)  # changed after it was synced
    changes = 0

    def step_until(end: float) -> None:
        # s01 is open on the user's machine: it changes every 20 s. That the
        # relay accepts it is the evidence that charges s03 (docs/blame.md);
        # alone, s03 would be charged only past Policy.max_relay_refusal_s.
        nonlocal changes
        while harness.clock.now < end:
            if harness.clock.now >= 20.0 * (changes + 1):
                changes += 1
                engine.enqueue("s01", now=harness.clock.now)
            harness.step()

    step_until(35.0)
    relay.down()  # the relay flaps for 20 s: nobody may be charged for it
    step_until(55.0)
    relay.up()
    engine.relay_ready(harness.clock.now)
    while engine.state("s03") is not SessionState.DEAD_LETTERED and harness.clock.now < 3600.0:
        step_until(harness.clock.now + 20.0)
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
    _show_table(
        f"demo: idle after {done_at:g} simulated seconds, {len(relay.sent)} batches sent",
        ("session", "lane", "state", "sends", "dead-letter reason"),
        rows,
    )
    counts = ", ".join(f"{state.value} {n}" for state, n in engine.sessions_by_state().items() if n)
    ignored = ", ".join(f"{kind} {n}" for kind, n in engine.anomalies.items()) or "none"
    click.echo(
        f"sessions: {counts}; relay link: {engine.link.state.value}; inputs ignored: {ignored}"
    )


# ------------------------------------------------------------------------
# Simulate, and operate a real store: status, dead-letters, history, redrive.
# ------------------------------------------------------------------------

_DB_HELP = (
    "SQLite database of the engine (written by a service or `simulate`) [default: sessionfsm.db]."
)
_DSN_HELP = (
    "PostgreSQL database of a fleet (libpq URL) instead of --db; needs the 'postgres' extra."
)


class _Reason(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A charged ack reason, in any case (``ratelimited`` is ``RateLimited``)."""

    name = "reason"

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return "[" + "|".join(CHARGED_REASONS) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        by_key = {reason.lower(): reason for reason in CHARGED_REASONS}
        found = by_key.get(str(value).lower())
        if found is None:
            self.fail(f"{value!r} is not an ack reason: use one of {', '.join(CHARGED_REASONS)}")
        return found


_REASON = _Reason()


def _db_option(func: Any) -> Any:
    return click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        default="sessionfsm.db",
        show_default=True,
        help=_DB_HELP,
    )(func)


class _Source(msgspec.Struct, frozen=True):
    """Where an operating command reads: a SQLite file or a PostgreSQL schema."""

    db: Path | None
    dsn: str | None
    schema: str

    @property
    def label(self) -> str:
        """How output names the database: the file, or the schema (never the
        DSN, which may hold a password)."""
        return f"postgresql schema {self.schema!r}" if self.dsn is not None else str(self.db)

    def as_json(self) -> dict[str, str]:
        if self.dsn is not None:
            return {"schema": self.schema}
        return {"db": str(self.db)}


def _source_options(func: Any) -> Any:
    """``--db FILE`` or ``--dsn URL [--schema NAME]``, given to the command as ``source``."""

    func = click.option(
        "--schema",
        default="sessionfsm",
        show_default=True,
        help="With --dsn: the schema sessionfsm keeps its tables in.",
    )(func)
    func = click.option("--dsn", help=_DSN_HELP)(func)
    func = click.option(
        "--db", type=click.Path(dir_okay=False, path_type=Path), default=None, help=_DB_HELP
    )(func)
    return func


def _source(db: Path | None, dsn: str | None, schema: str) -> _Source:
    if db is not None and dsn is not None:
        raise click.UsageError("pass --db or --dsn, not both")
    if dsn is not None:
        return _Source(None, dsn, schema)
    if schema != "sessionfsm":
        raise click.UsageError("--schema goes with --dsn")
    return _Source(db if db is not None else Path("sessionfsm.db"), None, schema)


def _json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def open_reader(
    db: Path | None = None, *, dsn: str | None = None, schema: str = "sessionfsm"
) -> StoreReader:
    """The store the operating commands read (``status``, ``dead-letters``,
    ``history``, and ``redrive``'s choice of sessions): the SQLite file ``db``,
    or with ``dsn`` a fleet's PostgreSQL ``schema``, read-only in both cases.
    They use only the :class:`~sessionfsm.store.StoreReader` protocol, so
    another store plugs in here."""
    if dsn is not None:
        try:
            from sessionfsm.postgres_store import PostgresStore
        except ImportError as exc:
            raise UsageError(
                f"--dsn needs the 'postgres' extra: pip install 'sessionfsm[postgres]' ({exc})"
            ) from None
        # partition=None: the whole database, every partition, beside running workers.
        return PostgresStore(dsn, schema=schema, readonly=True, partition=None)
    db = db if db is not None else Path("sessionfsm.db")
    if not db.exists():
        raise UsageError(f"cannot read {str(db)!r}: the file does not exist (see --db)")
    # Read-only: works while a service holds the file for writing, and never
    # creates an empty database by mistake.
    return SqliteStore(db, readonly=True)


@contextlib.contextmanager
def _read_store(source: _Source) -> Iterator[StoreReader]:
    if source.dsn is not None:
        store = open_reader(dsn=source.dsn, schema=source.schema)
    else:
        store = open_reader(source.db)
    try:
        yield store
    finally:
        store.close()


def _when(at: float | None) -> str:
    if at is None:
        return ""
    if at >= 1e9:  # wall-clock seconds: a service's, or a redrive's
        return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds")
    return f"{at:,.3f} s (sim)"  # simulated seconds, labelled as such


def _echo_json(data: Any) -> None:
    click.echo(msgspec.json.encode(data))


def _is_terminal() -> bool:
    return sys.stdout.isatty()


def _show_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table that never cuts a value: operators copy ids out of it.

    On a terminal, rich draws it; the first column (the ids) is never wrapped
    and the others fold onto more lines instead of ending in "...". Piped or
    redirected, it is plain text: the title, then one line per row with the
    columns padded, so ``grep`` and ``cut``/``awk`` see whole values.
    """
    if not _is_terminal():
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
        click.echo(title)
        for row in (header, *rows):
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        if i == 0:
            table.add_column(
                name, no_wrap=True, min_width=max([len(name), *(len(r[0]) for r in rows)])
            )
        else:
            table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@main.command()
@_source_options
@_json_option
def status(db: Path | None, dsn: str | None, schema: str, as_json: bool) -> None:
    """Sessions by state, and the relay link, as last saved in the database.

    With --dsn, a fleet's sessions over every partition; the link is the one
    last saved by any worker (`sessionfsm fleet status` shows each lease).
    """
    source = _source(db, dsn, schema)
    with _read_store(source) as store:
        counts = {state.value: n for state, n in store.sessions_by_state().items()}
        link, now = store.link(), store.now()
    if as_json:
        _echo_json(
            {
                **source.as_json(),
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
        f"{source.label}: link {link.state.value} ({link.failures} consecutive failures{resume}), "
        f"last saved at {_when(now) or 'never'}"
    )


@main.command("dead-letters")
@_source_options
@click.option(
    "--reason",
    type=_REASON,
    help="Only the dead letters of this reason (any case).",
)
@_json_option
def dead_letters(
    db: Path | None, dsn: str | None, schema: str, reason: str | None, as_json: bool
) -> None:
    """List dead-lettered sessions, oldest first: reason, attempts and when."""
    source = _source(db, dsn, schema)
    with _read_store(source) as store:
        dead = store.dead_letters(reason)
    by_reason = dict(sorted(Counter(v.dead_letter_reason or "?" for v in dead).items()))
    if as_json:
        _echo_json(
            {
                **source.as_json(),
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
@_source_options
@click.option("--limit", type=click.IntRange(min=1), help="Only the last N transitions.")
@_json_option
def history(
    session_id: str,
    db: Path | None,
    dsn: str | None,
    schema: str,
    limit: int | None,
    as_json: bool,
) -> None:
    """The transition history of one session, oldest first."""
    source = _source(db, dsn, schema)
    with _read_store(source) as store:
        view = store.session(session_id)
        rows = store.history(session_id, limit=limit)
    if as_json:
        _echo_json(
            {
                **source.as_json(),
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
@_source_options
@click.option("--all", "redrive_all", is_flag=True, help="Redrive every dead letter.")
@click.option(
    "--reason",
    type=_REASON,
    help="Redrive the dead letters of this reason (any case).",
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
    help="Policy TOML of the service (default: the built-in policy; not with --dsn).",
)
@_json_option
def redrive(
    session_id: str | None,
    db: Path | None,
    dsn: str | None,
    schema: str,
    redrive_all: bool,
    reason: str | None,
    limit: int | None,
    policy_path: Path | None,
    as_json: bool,
) -> None:
    """Give dead letters a fresh start: back to queued, counters cleared.

    Pass one SESSION_ID, --all, or --reason R; --limit N paces a recovered
    relay by redriving at most N per run. A SQLite database must not be held
    by a running service (stop it first; it picks the sessions up when it
    starts). Times are written in wall-clock seconds, or, on a database that
    ``sessionfsm simulate`` wrote, on its simulated clock (so the redrive
    lands after the simulated history instead of aging all of it out).

    With --dsn, workers may run: the request goes through the fleet's inbox
    and each session's owner applies it with its own policy on its next tick
    (or when a worker next takes the partition).
    """
    chosen = [x for x in (session_id is not None, redrive_all, reason is not None) if x]
    if len(chosen) != 1:
        raise click.UsageError("pass exactly one of SESSION_ID, --all or --reason")
    if session_id is not None and limit is not None:
        raise click.UsageError("--limit goes with --all or --reason, not a SESSION_ID")
    source = _source(db, dsn, schema)
    if source.dsn is not None:
        if policy_path is not None:
            raise click.UsageError("--policy goes with --db: with --dsn each owner uses its own")
        _redrive_fleet(source, session_id, reason, limit, as_json)
        return
    db = source.db
    assert db is not None
    policy = load_policy(policy_path) if policy_path is not None else Policy()
    if not db.exists():
        # A writable store would create an empty database: nothing to redrive there.
        raise UsageError(f"cannot redrive in {str(db)!r}: the file does not exist")
    from sessionfsm.tools.sim.database import simulated_by

    simulated = simulated_by(db) is not None
    try:
        store = SqliteStore(db)
    except StoreLocked as exc:
        # The store's own advice (readonly=True) is for Python callers; say it
        # in the command line's words, keeping the holder's pid.
        pid = re.search(r"\(pid (\w+)\)", str(exc))
        holder = f" (pid {pid.group(1)})" if pid else ""
        raise StoreLocked(
            f"cannot redrive in {str(db)!r}: another process holds it for writing{holder}. "
            "Stop the service first; `sessionfsm status` and `dead-letters` read it meanwhile"
        ) from None
    with Engine(policy, store=store) as engine:
        # A simulation's clock starts at 0: wall-clock time would jump it by
        # decades, and history retention would prune everything it recorded.
        now = engine.now if simulated else max(time.time(), engine.now)
        if session_id is not None:
            _redrive_one(engine, session_id, now)
            ids = [session_id]
        else:
            ids = engine.redrive_all(now, reason=reason, limit=limit)
        left = len(engine.dead_letters())
    if as_json:
        _echo_json({**source.as_json(), "redriven": ids, "dead_letters_left": left})
        return
    plural = "s" if len(ids) != 1 else ""
    click.echo(f"redrove {len(ids)} session{plural}; {left} dead letters left")
    for sid in ids:
        click.echo(sid)


def _redrive_fleet(
    source: _Source, session_id: str | None, reason: str | None, limit: int | None, as_json: bool
) -> None:
    """Redrive on a fleet's database: choose the dead letters from a read-only
    view, then ask their owners through the inbox (``Producer.redrive``), so a
    running worker applies it and nothing writes behind its lease."""
    with _read_store(source) as store:
        if session_id is not None:
            state = store.session(session_id).state.value
            if state != "dead_lettered":
                raise UsageError(
                    f"session {session_id!r} is not dead-lettered (it is {state}); "
                    "only dead letters can be redriven"
                )
            ids = [session_id]
        else:
            ids = [v.id for v in store.dead_letters(reason)][:limit]
        dead = len(store.dead_letters())
    from sessionfsm.fleet import Producer

    assert source.dsn is not None
    with Producer(source.dsn, schema=source.schema) as producer:
        producer.redrive(ids)
    left = dead - len(ids)
    if as_json:
        _echo_json({**source.as_json(), "requested": ids, "dead_letters_left": left})
        return
    plural = "s" if len(ids) != 1 else ""
    click.echo(
        f"asked the owners to redrive {len(ids)} session{plural}; {left} dead letters left "
        "once they have (`sessionfsm dead-letters --dsn ...` shows it)"
    )
    for sid in ids:
        click.echo(sid)


def _redrive_one(engine: Engine, session_id: str, now: float) -> None:
    from sessionfsm.machine import SessionState

    state = engine.state(session_id)
    if state is not SessionState.DEAD_LETTERED:
        raise UsageError(
            f"session {session_id!r} is not dead-lettered (it is {state.value}); "
            "only dead letters can be redriven"
        )
    engine.redrive(session_id, now)


@main.command()
@_db_option
def doctor(db: Path) -> None:
    """Check a database: SQLite's integrity check, then every session against the invariants.

    Read-only, safe while a service writes. Exits 1 and lists each problem if any.
    """
    with SqliteStore(db, readonly=True) as store:  # integrity_check is SQLite's own
        problems = store.verify()
    for problem in problems:
        click.echo(problem)
    if problems:
        click.echo(f"{db}: {len(problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo(f"{db}: ok")


if __name__ == "__main__":  # pragma: no cover
    main()
