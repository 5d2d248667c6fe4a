"""The command line through its entry point: simulate, and operating a real store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from sessionfsm import Engine, Policy, SqliteStore, acks

Cli = Callable[..., Result]


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _one_line_error(result: Result, code: int = 1) -> str:
    """The error: exit ``code``, one line on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    if code == 1 or result.stderr.startswith("sessionfsm: error: "):
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("sessionfsm: error: ")
        assert result.stdout == ""
    return lines[-1]


def _real_service_db(path: Path, sessions: int = 3) -> None:
    """A database a service wrote: sessions, and no simulation marker."""
    store = SqliteStore(path)
    engine = Engine(Policy(), store=store, log=False)
    for i in range(sessions):
        engine.enqueue(f"real{i}", now=1_700_000_000.0)
    store.close()


# ---------------------------------------------------------------- simulate


def test_simulate_incident_json_has_the_figures(sessionfsm_cli: Cli) -> None:
    """`simulate incident --json`: one dead letter, after 5 RateLimited, then a quiet log."""
    data = _json(sessionfsm_cli("simulate", "incident", "--json"))
    for key in ("synced", "dead_lettered", "wrongly_dead_lettered", "attempts", "drain_time_s"):
        assert key in data
    assert data["dead_lettered"] == {"RateLimited": 1}
    assert data["wrongly_dead_lettered"] == 0
    assert data["synced"] == data["sessions"] - 1
    assert data["attempts"] > data["synced"]
    assert data["drain_time_s"] > 0
    assert data["log_lines_per_session"]["after_dead_letter"] == 0
    (big,) = data["invalid_sessions"]
    assert big["answers"]["RateLimited"] == 5
    assert (big["log_lines"], big["log_lines_after_dead_letter"]) == (5, 0)
    assert data["db"] == "sessionfsm.db"


def test_simulate_flapping_relay_wrongly_dead_letters_nobody(sessionfsm_cli: Cli) -> None:
    """On flapping-relay no valid session is dead-lettered."""
    data = _json(sessionfsm_cli("simulate", "flapping-relay", "--json"))
    assert data["wrongly_dead_lettered"] == 0
    assert data["dead_lettered"] == {}


def test_simulate_prints_the_summary_table(sessionfsm_cli: Cli) -> None:
    """Without --json the figures come as a table, with the database it saved to."""
    result = sessionfsm_cli("simulate", "incident")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for label in (
        "synced",
        "dead-lettered",
        "valid sessions wrongly dead-lettered",
        "attempts (session sends)",
        "wasted sends",
        "time to drain (simulated)",
        "log lines per session",
        "oversized big-0001",
    ):
        assert label in out, label
    assert "1 (RateLimited 1)" in out
    assert "saved to sessionfsm.db" in out


def test_simulate_twice_replaces_the_previous_simulation(
    sessionfsm_cli: Cli, tmp_path: Path
) -> None:
    """A second `simulate` replaces the first run's database, says so, and matches it."""
    first = _json(sessionfsm_cli("simulate", "incident", "--json"))
    second = sessionfsm_cli("simulate", "incident", "--json")
    assert "replaced the previous simulation of 'incident'" in second.stderr
    assert _json(second) == first
    status = _json(sessionfsm_cli("status", "--json"))
    assert status["sessions"] == first["sessions"]


def test_simulate_refuses_a_database_a_service_wrote(sessionfsm_cli: Cli, tmp_path: Path) -> None:
    """A database holding a service's sessions is refused (exit 1) unless --fresh."""
    _real_service_db(tmp_path / "service.db")
    result = sessionfsm_cli("simulate", "incident", "--db", "service.db")
    message = _one_line_error(result, code=2)
    assert "holds 3 sessions that no simulation wrote" in message
    assert "--fresh" in message
    with SqliteStore(tmp_path / "service.db", readonly=True) as store:
        assert sum(store.sessions_by_state().values()) == 3  # untouched
    data = _json(sessionfsm_cli("simulate", "incident", "--db", "service.db", "--fresh", "--json"))
    assert data["synced"] == 49


def test_simulate_leaves_a_foreign_file_alone(sessionfsm_cli: Cli, tmp_path: Path) -> None:
    """A file that is not a sessionfsm database is never touched, even with --fresh."""
    (tmp_path / "notes.db").write_text("my notes\n")
    message = _one_line_error(sessionfsm_cli("simulate", "--db", "notes.db", "--fresh"))
    assert "not a SQLite database" in message
    assert (tmp_path / "notes.db").read_text() == "my notes\n"


def test_simulate_a_scenario_file_with_a_policy(
    sessionfsm_cli: Cli, scenario_file: Callable[..., Path], tmp_path: Path
) -> None:
    """A scenario file and a policy file are taken from paths; with nothing but
    culprits in it, they are dead-lettered through the refusal bound."""
    path = scenario_file(
        '[relay]\nsize_limit_bytes = 50\n[[sessions]]\nname = "x"\ncount = 2\nsize_bytes = 99\n'
    )
    # Only culprits and no good session: without a bound on refusals nothing
    # would tell them from a throttle (docs/blame.md), so charge every one.
    (tmp_path / "policy.toml").write_text(
        "max_relay_refusal_s = 0\n[rate_limited]\nthreshold = 2\n"
    )
    data = _json(sessionfsm_cli("simulate", str(path), "--policy", "policy.toml", "--json"))
    assert data["scenario"] == "custom"
    assert data["dead_lettered"] == {"RateLimited": 2}
    assert data["wrongly_dead_lettered"] == 0
    assert data["policy"].startswith("RateLimited 2 x")


def test_simulate_seed_is_reported_and_changes_the_run(sessionfsm_cli: Cli) -> None:
    """--seed overrides the scenario's seed."""
    data = _json(sessionfsm_cli("simulate", "steady", "--seed", "9", "--json"))
    assert data["seed"] == 9


def test_simulate_log_level_does_not_change_the_figures(sessionfsm_cli: Cli) -> None:
    """--log-level info shows the deferrals, and the log figures stay the same."""
    quiet = _json(sessionfsm_cli("simulate", "incident", "--json"))
    loud = sessionfsm_cli("--log-level", "info", "--log-json", "simulate", "incident", "--json")
    events = [json.loads(line) for line in loud.stderr.splitlines() if line.startswith("{")]
    about_big = [e["event"] for e in events if e.get("session_id") == "big-0001"]
    assert about_big == ["sessionfsm.deferred"] * 4 + ["sessionfsm.dead_lettered"]
    assert _json(loud)["log_lines_per_session"] == quiet["log_lines_per_session"]


def test_simulate_list_names_the_shipped_scenarios(sessionfsm_cli: Cli) -> None:
    """--list prints every shipped scenario with its description."""
    result = sessionfsm_cli("simulate", "--list")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"incident", "flapping-relay", "outage-3min", "steady"} <= set(names)


def test_simulate_unknown_scenario_is_a_usage_error(sessionfsm_cli: Cli) -> None:
    """An unknown scenario name exits 2 and lists the shipped ones."""
    message = _one_line_error(sessionfsm_cli("simulate", "nope"), code=2)
    assert "incident" in message


def test_simulate_bad_scenario_file_names_file_and_field(
    sessionfsm_cli: Cli, scenario_file: Callable[..., Path]
) -> None:
    """A bad scenario file exits 1 with one line naming the file and the field."""
    path = scenario_file('[[sessions]]\nname = "s"\ncount = -2\n', "broken.toml")
    message = _one_line_error(sessionfsm_cli("simulate", str(path)), code=2)
    assert "broken.toml" in message
    assert "$.sessions[0].count" in message


def test_simulate_bad_policy_file_is_one_line(sessionfsm_cli: Cli, tmp_path: Path) -> None:
    """A bad policy file exits 1 with one line naming it."""
    (tmp_path / "p.toml").write_text("batch_size = 0\n")
    message = _one_line_error(sessionfsm_cli("simulate", "--policy", "p.toml"), code=2)
    assert "p.toml" in message
    assert "batch_size" in message


def test_simulate_plot_without_matplotlib_says_what_to_install(
    sessionfsm_cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--plot without matplotlib fails before running, naming the extra to install."""
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    message = _one_line_error(sessionfsm_cli("simulate", "--plot", "t.png"), code=2)
    assert "sessionfsm[plot]" in message
    assert not (tmp_path / "sessionfsm.db").exists()


def test_simulate_plot_writes_the_timeline(
    sessionfsm_cli: Cli, tmp_path: Path, matplotlib_or_fail: Any
) -> None:
    """--plot FILE.svg writes the timeline next to the summary."""
    result = sessionfsm_cli("simulate", "incident", "--plot", "t.svg")
    assert result.exit_code == 0, result.output
    assert "timeline written to t.svg" in result.stdout
    assert "<svg" in (tmp_path / "t.svg").read_text()


def test_simulate_plot_and_sweep_do_not_mix(sessionfsm_cli: Cli) -> None:
    """--plot draws one run, so it cannot go with --sweep (exit 2)."""
    _one_line_error(sessionfsm_cli("simulate", "--sweep", "--plot", "t.png"), code=2)


def test_sweep_prints_the_trade_off(sessionfsm_cli: Cli, tmp_path: Path) -> None:
    """--sweep prints one trade-off row per policy, whole at 80 columns, and never
    touches the database; under the blame rules no cell dead-letters a valid session."""
    result = sessionfsm_cli("simulate", "slow-throttle", "--sweep")
    assert result.exit_code == 0, result.output
    assert "wrongly dead-lettered" in result.stdout
    assert "wasted sends" in result.stdout
    assert "5 *" in result.stdout  # the policy given is marked
    assert not (tmp_path / "sessionfsm.db").exists()
    data = _json(
        sessionfsm_cli(
            "simulate", "slow-throttle", "--sweep", "--json", "--thresholds", "3,12",
            "--backoffs", "fixed:10,fixed:60",
        )
    )  # fmt: skip
    rows = {(r["threshold"], r["backoff"]): r for r in data["rows"]}
    assert len(rows) == 4
    assert {r["wrongly_dead_lettered"] for r in rows.values()} == {0}
    assert rows[(3, "10 s")]["dead_lettered"] == 1  # the 40 MiB session


@pytest.mark.parametrize(
    "args",
    [
        ("--thresholds", "0"),
        ("--thresholds", "five"),
        ("--backoffs", "linear:3"),
        ("--backoffs", ""),
    ],
)
def test_sweep_bad_grid_is_a_usage_error(sessionfsm_cli: Cli, args: tuple[str, str]) -> None:
    """A bad threshold or backoff in the grid exits 2."""
    _one_line_error(sessionfsm_cli("simulate", "--sweep", *args), code=2)


# ----------------------------------------------------------------- operate


@pytest.fixture
def simulated(sessionfsm_cli: Cli) -> Cli:
    """The CLI, after `simulate incident` wrote ./sessionfsm.db."""
    assert sessionfsm_cli("simulate", "incident", "--json").exit_code == 0
    return sessionfsm_cli


def test_status_counts_states_and_the_link(simulated: Cli) -> None:
    """status shows the sessions by state and the link, as a table or JSON."""
    data = _json(simulated("status", "--json"))
    assert data["counts"]["synced"] == 49
    assert data["counts"]["dead_lettered"] == 1
    assert data["link"]["state"] == "up"
    table = simulated("status")
    assert re.search(r"^dead_lettered +1$", table.stdout, re.M), table.stdout
    assert "link up" in table.stdout


def test_dead_letters_lists_reason_attempts_and_when(simulated: Cli) -> None:
    """dead-letters lists each dead letter with its reason, attempts and time."""
    data = _json(simulated("dead-letters", "--json"))
    assert data["by_reason"] == {"RateLimited": 1}
    (entry,) = data["sessions"]
    assert (entry["id"], entry["reason"]) == ("big-0001", "RateLimited")
    assert entry["dead_lettered_at"] > 0
    assert _json(simulated("dead-letters", "--reason", "AckTimeout", "--json"))["total"] == 0
    assert "big-0001" in simulated("dead-letters").stdout


def test_history_shows_the_five_rate_limited_transitions(simulated: Cli) -> None:
    """history shows every transition; the 5th rate_limited dead-letters the session."""
    data = _json(simulated("history", "big-0001", "--json"))
    limited = [h["target"] for h in data["history"] if h["event"] == "rate_limited"]
    assert limited == ["backoff"] * 4 + ["dead_lettered"]
    assert data["session"]["state"] == "dead_lettered"
    last = _json(simulated("history", "big-0001", "--limit", "1", "--json"))["history"]
    assert [h["event"] for h in last] == ["rate_limited"]
    assert "rate_limited" in simulated("history", "big-0001").stdout


def test_history_of_an_unknown_session_fails_in_one_line(simulated: Cli) -> None:
    """history of a session the database never saw exits 1."""
    assert "unknown session 'ghost'" in _one_line_error(simulated("history", "ghost"), code=2)


def test_redrive_one_session_requeues_it(simulated: Cli) -> None:
    """redrive SESSION_ID moves the dead letter back to queued, counters cleared."""
    data = _json(simulated("redrive", "big-0001", "--json"))
    assert data == {"db": "sessionfsm.db", "redriven": ["big-0001"], "dead_letters_left": 0}
    status = _json(simulated("status", "--json"))
    assert status["counts"]["queued"] == 1
    assert status["counts"]["dead_lettered"] == 0
    events = [h["event"] for h in _json(simulated("history", "big-0001", "--json"))["history"]]
    assert events[-1] == "redriven"


def test_redrive_by_reason_with_a_limit(simulated: Cli) -> None:
    """redrive --reason R --limit N redrives at most N of that reason."""
    assert _json(simulated("redrive", "--reason", "AckTimeout", "--json"))["redriven"] == []
    data = _json(simulated("redrive", "--reason", "RateLimited", "--limit", "1", "--json"))
    assert data["redriven"] == ["big-0001"]
    assert "redrove 0 sessions" in simulated("redrive", "--all").stdout


def test_redrive_a_session_that_is_not_dead_fails_in_one_line(simulated: Cli) -> None:
    """Redriving a synced session is refused with the state named."""
    message = _one_line_error(simulated("redrive", "s-0001"), code=2)
    assert "session 's-0001' is not dead-lettered (it is synced)" in message


@pytest.mark.parametrize(
    "args",
    [(), ("big-0001", "--all"), ("--all", "--reason", "RateLimited"), ("big-0001", "--limit", "2")],
)
def test_redrive_needs_exactly_one_target(simulated: Cli, args: tuple[str, ...]) -> None:
    """redrive takes one of SESSION_ID, --all or --reason (else exit 2)."""
    _one_line_error(simulated("redrive", *args), code=2)


def test_redrive_refuses_a_database_a_service_holds(simulated: Cli, tmp_path: Path) -> None:
    """While a service holds the database, redrive fails in one line and status still works."""
    holder = SqliteStore(tmp_path / "sessionfsm.db")
    try:
        message = _one_line_error(simulated("redrive", "--all"))
        assert f"holds it for writing (pid {os.getpid()})" in message
        assert "Stop the service first" in message
        assert "readonly=True" not in message  # a Python argument, not a command-line one
        assert _json(simulated("status", "--json"))["counts"]["dead_lettered"] == 1
    finally:
        holder.close()


@pytest.mark.parametrize(
    "command", [("status",), ("dead-letters",), ("history", "x"), ("redrive", "--all")]
)
def test_a_missing_database_is_not_created(
    sessionfsm_cli: Cli, tmp_path: Path, command: tuple[str, ...]
) -> None:
    """Pointing an operating command at a missing database fails and creates nothing."""
    message = _one_line_error(sessionfsm_cli(*command, "--db", "missing.db"), code=2)
    assert "missing.db" in message
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize(
    "command", ["simulate", "status", "dead-letters", "history", "redrive", None]
)
def test_every_command_has_help(sessionfsm_cli: Cli, command: str | None) -> None:
    """--help works on the group and on every command (exit 0)."""
    args = [command, "--help"] if command else ["--help"]
    result = sessionfsm_cli(*args)
    assert result.exit_code == 0
    assert "Usage:" in result.stdout


def test_the_installed_entry_point_runs_the_main_job(tmp_path: Path) -> None:
    """`python -m sessionfsm simulate incident --json` works as a real process."""
    proc = subprocess.run(
        [sys.executable, "-m", "sessionfsm", "simulate", "incident", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dead_lettered"] == {"RateLimited": 1}
    assert (tmp_path / "sessionfsm.db").exists()


def test_operating_commands_read_any_store_reader(
    sessionfsm_cli: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """status, dead-letters and history work on any StoreReader, here a MemoryStore."""
    from sessionfsm import MemoryStore, acks, run_until_idle
    from sessionfsm.testing import ScriptedRelay
    from sessionfsm.tools import cli

    def populated(db: Path) -> MemoryStore:
        # A fresh store per command: each one closes the store it read.
        store = MemoryStore()
        engine = Engine(Policy(), store=store, log=False)
        for sid in ("m1", "m2"):
            engine.enqueue(sid, now=0.0)
        relay = ScriptedRelay()
        relay.always("m2", acks.PayloadTooLarge())
        run_until_idle(engine, relay)
        return store

    monkeypatch.setattr(cli, "open_reader", populated)
    status = _json(sessionfsm_cli("status", "--json"))
    assert status["counts"]["synced"] == 1
    assert status["counts"]["dead_lettered"] == 1
    dead = _json(sessionfsm_cli("dead-letters", "--json"))
    assert [s["id"] for s in dead["sessions"]] == ["m2"]
    history = _json(sessionfsm_cli("history", "m1", "--json"))
    assert history["session"]["state"] == "synced"


# ------------------------------------------------ operators' findings


def test_log_level_is_accepted_after_the_subcommand(sessionfsm_cli: Cli) -> None:
    """`simulate incident --log-level info` works and logs, in simulated seconds, labelled."""
    result = sessionfsm_cli("simulate", "incident", "--log-level", "info", "--log-json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    deferred = [e for e in lines if e["event"] == "sessionfsm.deferred"]
    assert deferred
    assert deferred[0]["retry_at"].endswith("s (simulated)")
    assert deferred[0]["sim_time"].endswith("s (simulated)")
    assert all("timestamp" not in e for e in lines)  # no wall time next to simulated time


def test_reason_is_case_insensitive(simulated: Cli) -> None:
    """--reason ratelimited means RateLimited, in dead-letters and in redrive."""
    data = _json(simulated("dead-letters", "--reason", "ratelimited", "--json"))
    assert [s["id"] for s in data["sessions"]] == ["big-0001"]
    assert _json(simulated("redrive", "--reason", "RATELIMITED", "--json"))["redriven"] == [
        "big-0001"
    ]


def test_redrive_on_a_simulations_database_keeps_its_history(
    sessionfsm_cli: Cli,
) -> None:
    """Redriving in a simulation's database stays on its clock: no history is aged out."""
    assert sessionfsm_cli("simulate", "slow-throttle", "--json").exit_code == 0
    with SqliteStore("sessionfsm.db", readonly=True) as store:
        before = store.now()
        kept = len(store.history("live-0001"))
    assert kept > 0
    assert before is not None
    dead = _json(sessionfsm_cli("dead-letters", "--json"))["sessions"]
    assert dead, "the scenario dead-letters some sessions"
    assert sessionfsm_cli("redrive", dead[0]["id"]).exit_code == 0
    assert sessionfsm_cli("redrive", "--all").exit_code == 0
    with SqliteStore("sessionfsm.db", readonly=True) as store:
        assert len(store.history("live-0001")) == kept
        assert store.now() == before
        (last,) = store.history(dead[0]["id"], limit=1)
    assert last.event == "redriven"
    assert last.at == before


def _long_id_db(path: Path) -> str:
    sid = "2f9c1a7e-6a43-4f0e-9b1d-8c7e5a3b2d10-attachment-upload"
    # A lone session: charged at once only when every refusal counts.
    policy = Policy(max_relay_refusal_s=0.0)
    with Engine(policy, store=SqliteStore(path), log=False) as engine:
        engine.enqueue(sid, now=1_796_000_000.0)
        engine.enqueue("other", now=1_796_000_000.0)
        (batch,) = engine.tick(1_796_000_000.0)
        # The relay accepts "other" in the same answer: evidence against sid.
        answer = {sid: acks.PayloadTooLarge(), "other": acks.Ok()}
        engine.on_ack(batch.id, answer, now=1_796_000_001.0)
    return sid


@pytest.mark.parametrize("terminal", [False, True])
def test_tables_never_cut_ids_or_reasons(
    sessionfsm_cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, terminal: bool
) -> None:
    """At 80 columns or piped, dead-letters and history show whole ids and reasons."""
    sid = _long_id_db(tmp_path / "sessionfsm.db")
    monkeypatch.setenv("COLUMNS", "80")
    if terminal:
        monkeypatch.setattr("sessionfsm.tools.cli._is_terminal", lambda: True)
    out = sessionfsm_cli("dead-letters").stdout
    assert ("│" in out) is terminal  # rich draws it on a terminal, plain text when piped
    assert sid in out
    assert "…" not in out
    history = sessionfsm_cli("history", sid).stdout
    assert "PayloadTooLarge" in history
    assert "2026-11-30T" in history  # ISO-8601 UTC
    assert "…" not in history


@pytest.mark.parametrize(
    "args",
    [
        ("simulate", "no-such-scenario.toml"),
        ("simulate", "--policy", "no-such-policy.toml"),
        ("status", "--db", "no-such.db"),
        ("redrive", "--all", "--db", "no-such.db"),
    ],
)
def test_a_missing_file_is_the_callers_mistake_exit_2(
    sessionfsm_cli: Cli, args: tuple[str, ...]
) -> None:
    """Every missing file named on the command line exits 2 (usage), in one line."""
    message = _one_line_error(sessionfsm_cli(*args), code=2)
    assert "no-such" in message


def test_demo_prints_sentences_not_dicts(sessionfsm_cli: Cli) -> None:
    """demo ends with a readable summary line, and its help says what it shows."""
    result = sessionfsm_cli("demo")
    assert result.exit_code == 0, result.output
    assert "relay link: up" in result.stdout
    assert "{" not in result.stdout
    assert "scripted relay" in sessionfsm_cli("demo", "--help").stdout


def test_plot_into_a_missing_directory_fails_before_the_run(sessionfsm_cli: Cli) -> None:
    """--plot /nonexistent/x.svg is refused at once: no simulation, no database written."""
    message = _one_line_error(sessionfsm_cli("simulate", "--plot", "/nonexistent/x.svg"), code=2)
    assert "no directory '/nonexistent'" in message
    assert not Path("sessionfsm.db").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--thresholds", "3,5"), "--thresholds only mean something with --sweep"),
        (("--backoffs", "fixed:10"), "--backoffs only mean something with --sweep"),
        (("--sweep", "--db", "x.db"), "--sweep runs in memory and writes no database"),
        (("--sweep", "--fresh"), "--sweep runs in memory and writes no database"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(
    sessionfsm_cli: Cli, args: tuple[str, ...], words: str
) -> None:
    """A flag that the chosen mode would silently ignore is a usage error instead."""
    result = sessionfsm_cli("simulate", "slow-throttle", *args)
    assert result.exit_code == 2
    assert words in result.stderr
    assert not Path("x.db").exists()


def test_list_json_prints_json(sessionfsm_cli: Cli) -> None:
    """simulate --list --json prints the shipped scenarios as JSON, not text."""
    data = _json(sessionfsm_cli("simulate", "--list", "--json"))
    assert {entry["name"] for entry in data} >= {"incident", "slow-throttle", "steady"}
    assert all(entry["description"] for entry in data)


@pytest.mark.parametrize(
    ("scenario", "shaded"),
    [("incident", "flap: RelayUnavailable"), ("slow-throttle", "throttle")],
)
def test_the_plot_shades_the_incident(
    sessionfsm_cli: Cli, tmp_path: Path, matplotlib_or_fail: Any, scenario: str, shaded: str
) -> None:
    """The timeline shades the scenario's outages and throttles, labelled, at a readable size."""
    result = sessionfsm_cli("simulate", scenario, "--plot", "t.svg")
    assert result.exit_code == 0, result.output
    svg = (tmp_path / "t.svg").read_text()
    assert shaded in svg  # the legend names the shaded span
    width = float(re.search(r'<svg[^>]* width="([0-9.]+)pt"', svg).group(1))  # type: ignore[union-attr]
    assert width >= 12 * 72  # 12 inches, not the old 9


def test_simulated_times_are_labelled_in_tables(simulated: Cli) -> None:
    """On a simulation's database, times in tables say they are simulated seconds."""
    out = simulated("dead-letters").stdout
    assert re.search(r"big-0001 +RateLimited +[0-9]+ +[0-9.,]+ s \(sim\)", out), out
    assert "(sim)" in simulated("status").stdout


def test_a_bad_reason_lists_the_reasons_as_spelt(sessionfsm_cli: Cli) -> None:
    """--reason bogus is a usage error naming AckTimeout, RateLimited, PayloadTooLarge."""
    result = sessionfsm_cli("dead-letters", "--reason", "bogus")
    assert result.exit_code == 2
    assert "use one of AckTimeout, RateLimited, PayloadTooLarge" in result.stderr
