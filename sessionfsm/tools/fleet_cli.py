"""``sessionfsm fleet``: inspect a fleet's PostgreSQL database, and check its protocol.

``fleet status --dsn URL`` shows sessions by state, every partition's lease
(owner, epoch, time left, writes, fenced saves), the workers' heartbeats and
the inbox. ``fleet check`` model-checks the lease protocol
(:mod:`sessionfsm.tools.lease_check`), with ``--no-fencing`` for the planted
broken variant and its trace. psycopg is imported only when a command runs.
"""

from __future__ import annotations

from typing import Any

import click
import msgspec


@click.group("fleet")
def command() -> None:
    """Many workers on one PostgreSQL database (needs the 'postgres' extra)."""


@command.command("status")
@click.option("--dsn", required=True, help="libpq URL of the fleet's database.")
@click.option("--schema", default="sessionfsm", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status(dsn: str, schema: str, as_json: bool) -> None:
    """Sessions by state, leases, heartbeats and fencing, from the server."""
    try:
        from ..postgres_store import PostgresStore
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    from .._errors import SessionFSMError

    try:
        with PostgresStore(dsn, schema=schema, readonly=True, partition=None) as store:
            counts = {state.value: n for state, n in store.sessions_by_state().items()}
            leases, workers, inbox = store.leases(), store.workers(), store.inbox_depth()
    except SessionFSMError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        data: dict[str, Any] = {
            "schema": schema,
            "counts": counts,
            "inbox": inbox,
            "leases": msgspec.to_builtins(leases),
            "workers": msgspec.to_builtins(workers),
        }
        click.echo(msgspec.json.encode(data))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="sessions by state", title_justify="left")
    table.add_column("state")
    table.add_column("sessions")
    for state, n in counts.items():
        table.add_row(state, str(n))
    console.print(table)
    table = Table(title="partition leases", title_justify="left")
    for name in ("partition", "owner", "epoch", "expires in", "renewed ago", "writes", "fenced"):
        table.add_column(name)
    for lease in leases:
        left = lease.expires_in_s
        table.add_row(
            str(lease.partition),
            lease.owner or "-",
            str(lease.epoch),
            "-" if left is None else (f"{left:.1f} s" if left > 0 else "expired"),
            "-" if lease.renewed_ago_s is None else f"{lease.renewed_ago_s:.1f} s",
            str(lease.writes),
            str(lease.fenced),
        )
    console.print(table)
    table = Table(title="workers", title_justify="left")
    for name in ("worker", "host", "pid", "heartbeat", "alive"):
        table.add_column(name)
    for w in workers:
        table.add_row(w.id, w.host, str(w.pid), f"{w.heartbeat_ago_s:.1f} s ago", str(w.alive))
    console.print(table)
    click.echo(f"inbox: {inbox} session(s) waiting for their owner")


@command.command("check")
@click.option("--workers", type=click.IntRange(2, 3), default=2, show_default=True)
@click.option("--changes", type=click.IntRange(1, 3), default=1, show_default=True)
@click.option("--no-fencing", is_flag=True, help="Check the broken variant without the fence.")
@click.option(
    "--no-symmetry",
    is_flag=True,
    help="Keep states that differ only by worker names apart (slower; same verdicts).",
)
def check(workers: int, changes: int, no_fencing: bool, no_symmetry: bool) -> None:
    """Model-check the lease protocol; print a shortest trace for any violation.

    Three workers with two or three changes take minutes.
    """
    from .lease_check import explore, format_trace

    result = explore(
        workers,
        fenced=not no_fencing,
        max_version=changes,
        stop_after_safety=no_fencing,
        symmetry=not no_symmetry,
    )
    reduced = "" if no_symmetry else " (up to worker names)"
    click.echo(f"{result.states} states{reduced}, {result.transitions} transitions explored")
    if result.ok:
        click.echo("every property holds")
        return
    for name, trace in sorted(result.violations.items()):
        click.echo(f"VIOLATED {name}:")
        click.echo(format_trace(trace))
    raise SystemExit(1)


@command.command("redrive")
@click.option("--dsn", required=True, help="libpq URL of the fleet's database.")
@click.option("--schema", default="sessionfsm", show_default=True)
@click.argument("session_ids", nargs=-1, required=True)
def redrive(dsn: str, schema: str, session_ids: tuple[str, ...]) -> None:
    """Ask the running owners to redrive these dead letters (through the inbox)."""
    from .._errors import SessionFSMError

    try:
        from ..fleet import Producer

        with Producer(dsn, schema=schema) as producer:
            n = producer.redrive(session_ids)
    except (ImportError, SessionFSMError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{n} redrive request(s) queued for their owners")
