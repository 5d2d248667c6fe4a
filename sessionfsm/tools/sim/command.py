"""``sessionfsm simulate``: run a scenario against a policy and show the figures.

The command configures structlog for the run (it is the command line, so it
may): every ``sessionfsm.*`` event at info and above goes through a
:class:`~sessionfsm.sim.logs.LogCounter` first, and only then through the
level filter of ``--log-level``, so the log figures do not depend on what is
shown on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import click
import msgspec
import structlog

from sessionfsm._errors import UsageError
from sessionfsm._log import format_time, render_times
from sessionfsm.policy import Policy, load_policy
from sessionfsm.tools.sim.database import DEFAULT_DB, mark, open_for_simulation
from sessionfsm.tools.sim.logs import LogCounter
from sessionfsm.tools.sim.plot import check_plot_target, write_timeline
from sessionfsm.tools.sim.run import (
    DEFAULT_BACKOFFS,
    DEFAULT_THRESHOLDS,
    SimResult,
    Simulation,
    SweepRow,
    backoff_label,
    describe_policy,
    parse_backoff,
    sweep,
)
from sessionfsm.tools.sim.scenario import Scenario, load_scenario, scenario_names

__all__ = ["command"]

#: A run slower than this (wall time) gets a progress bar, on a terminal only.
_PROGRESS_AFTER_S = 0.5
#: Oversized sessions listed in the summary table (``--json`` lists up to 20).
_FATES_SHOWN = 5


@contextlib.contextmanager
def counting_logs(
    counter: LogCounter, level: str, clock: Callable[[], float | None] | None = None
) -> Iterator[None]:
    """Run ``counter`` on every event at info and above, then filter to ``level``.

    Times are simulated seconds, and say so: the wall-clock timestamp gives
    way to ``sim_time`` (read from ``clock``), and time fields such as
    ``retry_at`` read ``331.000s (simulated)``. Restores the previous
    structlog configuration on the way out.
    """
    saved = structlog.get_config()
    shown = logging.getLevelNamesMapping()[level.upper()]

    def sim_time(
        logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = clock() if clock is not None else None
        if now is not None:
            event_dict["sim_time"] = format_time(now, simulated=True)
        return event_dict

    def floor(
        logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if logging.getLevelNamesMapping().get(method_name.upper(), logging.INFO) < shown:
            raise structlog.DropEvent
        return event_dict

    rest = [p for p in saved["processors"] if not isinstance(p, structlog.processors.TimeStamper)]
    structlog.configure(
        processors=[counter, floor, sim_time, render_times(simulated=True), *rest],
        wrapper_class=structlog.make_filtering_bound_logger(min(shown, logging.INFO)),
    )
    try:
        yield
    finally:
        structlog.configure(**saved)


class _Progress:
    """A rich progress bar that appears only once a run has taken a while."""

    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.label = label
        self._start = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: float, total: float) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self._start < _PROGRESS_AFTER_S:
                return
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _load_policy(path: Path | None) -> Policy:
    return load_policy(path) if path is not None else Policy()


def _seconds(value: float | None) -> str:
    return "not drained" if value is None else f"{value:,.1f} s"


def _by_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


def _print_summary(result: SimResult, db: Path | None, persisted: dict[str, int] | None) -> None:
    from rich.console import Console
    from rich.table import Table

    f = result.figures
    table = Table(title=f"simulate {f.scenario} (seed {f.seed})", title_justify="left")
    table.add_column("figure")
    table.add_column("value", overflow="fold")
    lines = f.log_lines_per_session
    rows: list[tuple[str, str]] = [
        ("policy", f.policy),
        ("sessions", f"{f.sessions} ({f.valid} valid, {f.sessions - f.valid} oversized)"),
        ("synced", str(f.synced)),
        ("dead-lettered", f"{sum(f.dead_lettered.values())} ({_by_reason(f.dead_lettered)})"),
        ("valid sessions wrongly dead-lettered", str(f.wrongly_dead_lettered)),
        ("attempts (session sends)", f"{f.attempts} in {f.batches} batches"),
        ("wasted sends", f"{f.wasted_sends} ({_by_reason(f.wasted_by_answer)})"),
        ("batches isolating a failure (split parts)", str(f.isolation_batches)),
        ("batches sent during a relay throttle", str(f.throttled_batches)),
        ("time to drain (simulated)", _seconds(f.drain_time_s)),
    ]
    if lines is not None:
        rows.append(
            (
                "log lines per session",
                f"mean {lines.mean:g}, max {lines.max}"
                + (f" ({lines.max_session})" if lines.max else "")
                + f"; {lines.after_dead_letter} after a dead letter",
            )
        )
    rows.append(("lost updates", str(f.lost_updates)))
    if f.anomalies:
        rows.append(("ignored inputs", _by_reason(f.anomalies)))
    shown = f.invalid_sessions[:_FATES_SHOWN]
    for fate in shown:
        state = fate.state + (f" ({fate.dead_letter_reason})" if fate.dead_letter_reason else "")
        logged = (
            ""
            if fate.log_lines is None
            else f"; {fate.log_lines} log lines, {fate.log_lines_after_dead_letter} after"
            " the dead letter"
        )
        rows.append(
            (
                f"oversized {fate.id} ({fate.size_bytes / 2**20:.1f} MiB)",
                f"{state} after {_by_reason(fate.answers)}{logged}",
            )
        )
    hidden = f.sessions - f.valid - len(shown)
    if hidden > 0:
        rows.append(("oversized, not listed", str(hidden)))
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    if f.wrongly_dead_lettered_ids:
        more = f.wrongly_dead_lettered - len(f.wrongly_dead_lettered_ids)
        click.echo(
            "wrongly dead-lettered: "
            + ", ".join(f.wrongly_dead_lettered_ids)
            + (f" and {more} more" if more else "")
        )
    if db is not None and persisted is not None:
        states = ", ".join(f"{k} {v}" for k, v in persisted.items() if v)
        click.echo(f"saved to {db} ({states}): try `sessionfsm status --db {db}`")


def _print_sweep(scenario: Scenario, policy: Policy, rows: list[SweepRow]) -> None:
    # The operating commands' table: whole values on a terminal (folded, never
    # cut at 80 columns) and plain columns when piped.
    from sessionfsm.tools.cli import _show_table

    current = (policy.rate_limited.threshold, backoff_label(policy.rate_limited.backoff))
    _show_table(
        f"sweep {scenario.name}: RateLimited threshold x backoff (in memory)",
        (
            "threshold",
            "backoff",
            "wrongly dead-lettered",
            "wasted sends",
            "batches",
            "split parts",
            "during throttle",
            "drain",
        ),
        [
            (
                f"{row.threshold}{' *' if (row.threshold, row.backoff) == current else ''}",
                row.backoff,
                str(row.wrongly_dead_lettered),
                str(row.wasted_sends),
                str(row.batches),
                str(row.isolation_batches),
                str(row.throttled_batches),
                _seconds(row.drain_time_s),
            )
            for row in rows
        ],
    )
    click.echo("* the policy given (or the default); everything else as in it")


def _prometheus_exporter() -> Any:
    """``PrometheusMetrics`` bound to a private registry, or a usage error."""
    try:
        from prometheus_client import CollectorRegistry

        from sessionfsm.metrics.prometheus import PrometheusMetrics
    except ImportError:
        raise click.UsageError(
            "--metrics-out needs prometheus_client: pip install 'sessionfsm[prometheus]'"
        ) from None
    return lambda engine: PrometheusMetrics(engine, registry=CollectorRegistry())


def _split(text: str, what: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise click.BadParameter(f"give at least one {what}")
    return items


@click.command("simulate")
@click.argument("scenario", default="incident", metavar="[SCENARIO|FILE]")
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy TOML to try (default: the built-in policy).",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_DB,
    show_default=True,
    help="SQLite database the engine persists to.",
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Replace the database even if something other than a simulation wrote it.",
)
@click.option("--seed", type=int, default=None, help="Seed (default: the scenario's).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a timeline of state counts (.png or .svg; needs sessionfsm[plot]).",
)
@click.option(
    "--metrics-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the final Prometheus exposition here (needs sessionfsm[prometheus]).",
)
@click.option(
    "--sweep",
    "do_sweep",
    is_flag=True,
    help="Run a grid of RateLimited thresholds x backoffs (in memory) and print the trade-off.",
)
@click.option(
    "--thresholds",
    default=",".join(map(str, DEFAULT_THRESHOLDS)),
    show_default=True,
    help="With --sweep: the thresholds, comma-separated.",
)
@click.option(
    "--backoffs",
    default=",".join(DEFAULT_BACKOFFS),
    show_default=True,
    help="With --sweep: fixed:SECONDS or exp:BASE:CAP, comma-separated.",
)
@click.option("--list", "list_only", is_flag=True, help="List the shipped scenarios and exit.")
@click.pass_context
def command(
    ctx: click.Context,
    scenario: str,
    policy_path: Path | None,
    db: Path,
    fresh: bool,
    seed: int | None,
    as_json: bool,
    plot: Path | None,
    metrics_out: Path | None,
    do_sweep: bool,
    thresholds: str,
    backoffs: str,
    list_only: bool,
) -> None:
    """Run a scenario against a simulated relay, in simulated time, and show
    what happened: synced, dead-lettered by reason, valid sessions wrongly
    dead-lettered, attempts and wasted sends, time to drain, log lines.

    SCENARIO is a shipped name (see --list) or a TOML/JSON file. The engine
    persists to --db, so `sessionfsm status`, `dead-letters` and `history`
    can inspect the run afterwards. A database left by an earlier simulation
    is replaced; one holding anything else is refused unless --fresh.
    """
    if list_only:
        shipped = {name: load_scenario(name).description for name in scenario_names()}
        if as_json:
            click.echo(
                msgspec.json.encode([{"name": n, "description": d} for n, d in shipped.items()])
            )
            return
        for name, description in shipped.items():
            click.echo(f"{name:20} {description}")
        return
    given = {
        name
        for name in ("db", "fresh", "thresholds", "backoffs")
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    }
    if plot is not None and do_sweep:
        raise click.UsageError("--plot draws one run; it cannot be combined with --sweep")
    if do_sweep and given & {"db", "fresh"}:
        raise click.UsageError(
            "--sweep runs in memory and writes no database; drop --db/--fresh, "
            "or run without --sweep to persist one run"
        )
    if not do_sweep and given & {"thresholds", "backoffs"}:
        flags = " and ".join(f"--{name}" for name in sorted(given & {"thresholds", "backoffs"}))
        raise click.UsageError(f"{flags} only mean something with --sweep; add --sweep")
    if metrics_out is not None and do_sweep:
        raise click.UsageError("--metrics-out shows one run; it cannot be combined with --sweep")
    exporter = _prometheus_exporter() if metrics_out is not None else None
    if scenario not in scenario_names() and not Path(scenario).exists():
        raise click.BadParameter(
            f"no shipped scenario {scenario!r} and no such file "
            f"(shipped: {', '.join(scenario_names())})",
            param_hint="SCENARIO",
        )
    loaded = load_scenario(scenario)
    policy = _load_policy(policy_path)
    if plot is not None:
        check_plot_target(plot)
    progress_on = sys.stderr.isatty()

    if do_sweep:
        grid_thresholds: list[int] = []
        for item in _split(thresholds, "threshold"):
            if not item.isdigit() or int(item) < 1:
                raise click.BadParameter(
                    f"thresholds are integers >= 1, got {item!r}", param_hint="--thresholds"
                )
            grid_thresholds.append(int(item))
        grid_backoffs = []
        for item in _split(backoffs, "backoff"):
            try:
                grid_backoffs.append(parse_backoff(item))
            except UsageError as exc:
                raise click.BadParameter(str(exc), param_hint="--backoffs") from None
        bar = _Progress(progress_on, f"sweep {loaded.name}")
        try:
            rows = sweep(
                loaded,
                policy,
                thresholds=grid_thresholds,
                backoffs=grid_backoffs,
                seed=seed,
                progress=lambda done, total: bar(done, total),
            )
        finally:
            bar.close()
        if as_json:
            click.echo(
                msgspec.json.encode(
                    {
                        "scenario": loaded.name,
                        "seed": loaded.seed if seed is None else seed,
                        "base_policy": describe_policy(policy),
                        "rows": rows,
                    }
                )
            )
        else:
            _print_sweep(loaded, policy, rows)
        return

    level = str(ctx.find_root().params.get("log_level") or "warning")
    counter = LogCounter()
    run_seed = loaded.seed if seed is None else seed
    store, notice = open_for_simulation(db, fresh=fresh)
    if notice:
        click.echo(notice, err=True)
    try:
        mark(db, loaded.name, run_seed, describe_policy(policy))
    except BaseException:
        store.close()
        raise
    bar = _Progress(progress_on, f"simulate {loaded.name}")
    try:
        running: list[Simulation] = []
        with counting_logs(counter, level, lambda: running[0].clock.now if running else None):
            simulation = Simulation(loaded, policy, seed=run_seed, store=store, log_counter=counter)
            running.append(simulation)
            metrics = exporter(simulation.engine) if exporter is not None else None
            result = simulation.run(progress=lambda now, done, total: bar(done, total))
        persisted = {state.value: n for state, n in store.sessions_by_state().items()}
    finally:
        bar.close()
        store.close()
    if plot is not None:
        write_timeline(result, plot)
    if metrics is not None and metrics_out is not None:
        metrics.write(metrics_out)
    if as_json:
        data = msgspec.to_builtins(result.figures)
        data["db"] = str(db)
        click.echo(msgspec.json.encode(data))
    else:
        _print_summary(result, db, persisted)
        if plot is not None:
            click.echo(f"timeline written to {plot}")
        if metrics_out is not None:
            click.echo(f"metrics written to {metrics_out}")
