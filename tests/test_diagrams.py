"""The diagrams in ``diagrams/`` and the design page come from the declaration, never stale."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from statemachine import State, StateMachine

from sessionfsm import Policy, ReasonPolicy, SessionState
from sessionfsm.machine import (
    RESTING_STATES,
    bury,
    charge,
    exhausted,
    pause,
    pause_elapsed,
    resume,
    steady,
)
from sessionfsm.runtime import SESSION_TABLE, Row, Table, compile_machine
from sessionfsm.tools.cli import main
from sessionfsm.tools.diagrams import (
    MACHINES,
    README_HEADING,
    Machine,
    find_stale,
    generate,
    readme_section,
    regenerate_command,
    render_svgs,
    splice_readme,
    write,
)

REPO = Path(__file__).resolve().parents[1]
DIAGRAMS = REPO / "diagrams"
#: The page whose section shows the session diagram (the README only links there).
DESIGN = REPO / "docs" / "design.md"

# Locally a missing Graphviz skips the SVG tests; under CI=true (where .ci/run
# installs it) they run, and a missing `dot` fails them.
needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None and os.environ.get("CI") != "true",
    reason="Graphviz `dot` is not on PATH; SVGs are checked by .ci/run, which installs it",
)


def _stale_message(stale: list[object]) -> str:
    lines = "\n".join(f"  {problem}" for problem in stale)
    return (
        f"diagrams are stale:\n{lines}\nregenerate with: "
        "sessionfsm diagrams --out diagrams --page docs/design.md"
    )


def _retargeted(table: Table, event: str, source: SessionState, target: SessionState) -> Table:
    """The table with one row sent elsewhere, as if its declaration changed."""
    rows = tuple(
        replace(row, target=target) if (row.event, row.source) == (event, source) else row
        for row in table.rows
    )
    index: dict[tuple[object, str], list[Row]] = {}
    for row in rows:
        index.setdefault((row.source, row.event), []).append(row)
    return replace(table, rows=rows, index={k: tuple(v) for k, v in index.items()})


def _mermaid_transitions(source: str) -> list[tuple[str, str, str]]:
    found = re.findall(r"^    (\S+) --> (\S+?)(?:: (.*))?$", source, flags=re.MULTILINE)
    return [(a, b, label) for a, b, label in found]


def test_committed_diagrams_match_the_declaration() -> None:
    """Every committed Mermaid, DOT and Markdown file, each SVG's source hash and
    the design page's session section equal what the declaration generates now."""
    stale = find_stale(DIAGRAMS, generate(), svgs=None, readme=DESIGN)
    assert not stale, _stale_message(stale)


@needs_dot
def test_committed_svgs_match_a_fresh_graphviz_rendering() -> None:
    """Each committed SVG is byte for byte what Graphviz renders from the declaration."""
    files = generate()
    stale = [p for p in find_stale(DIAGRAMS, files, render_svgs(files)) if p.path.suffix == ".svg"]
    assert not stale, _stale_message(stale)


def test_a_changed_transition_makes_its_diagrams_stale(tmp_path: Path) -> None:
    """Sending `bounced` to another state is reported in every session file; the SVG
    by the DOT hash it was rendered from, so even without Graphviz."""
    original = generate()
    svgs = render_svgs(original) if shutil.which("dot") else {}
    write(tmp_path, original, svgs)
    (now,) = {r.target for r in SESSION_TABLE.rows if r.event == "bounced"}
    elsewhere = SessionState.BACKOFF if now != SessionState.BACKOFF else SessionState.SYNCED
    changed = _retargeted(SESSION_TABLE, "bounced", SessionState.IN_FLIGHT, elsewhere)
    machines = (Machine("session", "Session machine", changed), MACHINES[1])
    files = generate(machines=machines)

    stale = {p.path.name for p in find_stale(tmp_path, files) if svgs or p.path.suffix != ".svg"}

    expected = {"session.mmd", "session.dot", "session-table.md", "README.md"}
    assert stale == expected | ({"session.svg"} if svgs else set())
    bounced_to = {
        b for _, b, label in _mermaid_transitions(files["session.mmd"]) if "bounced" in label
    }
    assert bounced_to == {elsewhere.value}


def test_a_redeclared_machine_changes_only_its_own_diagrams(tmp_path: Path) -> None:
    """Dropping the guard of the link's `resumed` in a re-declaration changes the
    link's files and the review page, and nothing of the session machine."""

    class LinkMachine(StateMachine):  # same name, so only the transition differs
        up = State("up", initial=True, value="up")
        paused = State("paused", value="paused")
        lost = up.to(paused, on=pause) | paused.to.itself(internal=True, on=pause)
        resumed = paused.to(up, on=resume)
        reported_ready = paused.to(up, on=resume) | up.to.itself(internal=True)
        answered = up.to.itself(internal=True, on=steady) | paused.to(up, on=steady)

    original = generate()
    machines = (MACHINES[0], Machine("link", "Relay link machine", compile_machine(LinkMachine)))
    changed = generate(machines=machines)

    differing = {name for name in original if original[name] != changed[name]}
    assert differing == {"link.mmd", "link.dot", "link-table.md", "README.md"}
    assert pause_elapsed.__name__ in original["link-table.md"]
    assert pause_elapsed.__name__ not in changed["link-table.md"]


def test_states_at_the_same_distance_share_a_row_top_to_bottom() -> None:
    """The link's paused and throttled (both one step from up) sit in one row of a
    top-to-bottom drawing, so the edges between them and their labels do not cross the
    rest; the session machine, one state per distance, stays left to right."""
    files = generate()
    link, session = files["link.dot"], files["session.dot"]
    assert "rankdir=TB" in link
    assert "{ rank=same; paused; throttled; }" in link
    # Edges within the row are written as they go, not reversed with dir=back.
    assert 'paused -> throttled [label="refused / throttle\\l"];' in link
    assert "rankdir=LR" in session
    assert "rank=same" not in session


def test_generating_twice_gives_identical_files() -> None:
    """Two generations in one process are byte for byte equal."""
    assert generate() == generate()


def test_generation_does_not_depend_on_the_interpreter_run(tmp_path: Path) -> None:
    """Fresh interpreters with different hash seeds write the same bytes (no id() or set order)."""
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        code = (
            "import sys; from pathlib import Path; "
            "from sessionfsm.tools.diagrams import generate, write; "
            "write(Path(sys.argv[1]), generate())"
        )
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=REPO)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert outputs[0] == {name: text.encode() for name, text in generate().items()}


@needs_dot
def test_svg_rendering_is_deterministic_and_carries_no_graphviz_version() -> None:
    """Rendering twice gives the same SVG bytes, with the version comment replaced by a stamp."""
    files = generate()
    first, second = render_svgs(files), render_svgs(files)
    assert first == second
    assert set(first) == {"session.svg", "link.svg"}
    for svg in first.values():
        assert b"Generated by graphviz" not in svg
        assert b"<!-- sessionfsm diagrams: from " in svg


def test_guards_are_labelled_by_policy_field_and_number() -> None:
    """Charged guards read like `rate_limited.threshold reached (5)`, never `exhausted`."""
    mermaid = generate()["session.mmd"]
    labels = " ".join(label for _, _, label in _mermaid_transitions(mermaid))
    assert "rate_limited [rate_limited.threshold reached (5)] / bury" in labels
    assert "timed_out [ack_timeout.threshold reached (3)] / bury" in labels
    assert "rejected [payload_too_large not retryable] / bury" in labels
    assert (
        "rate_limited [below rate_limited.threshold (5) and its own and evidence against it]"
        in labels
    )
    assert "rate_limited [shared by the batch]" in labels
    assert "rate_limited [no evidence against it]" in labels
    assert "exhausted" not in labels


def test_a_policy_relabels_guards_and_backoffs() -> None:
    """A proposed policy's thresholds and backoffs appear in every rendering of it."""
    policy = Policy(rate_limited=ReasonPolicy(threshold=8, honour_retry_after=False))
    files = generate(policy, policy_name="policy in proposed.toml")
    for name in ("session.mmd", "session.dot", "session-table.md", "README.md"):
        assert "rate_limited.threshold reached (8)" in files[name], name
        assert "(5)" not in files[name], name
    assert "The 8th RateLimited in a row dead-letters" in files["README.md"]
    assert "SessionMachine (policy in proposed.toml)" in files["session.dot"]


def _charged_backoff_guards(table_md: str) -> dict[str, str]:
    """The guard cell of each charged event's row into backoff, by event."""
    rows = {}
    for line in table_md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 5 or not cells[1].startswith("`"):
            continue
        event = cells[1].split("`")[1]
        if event in {"timed_out", "rate_limited", "rejected"} and cells[3] == "`backoff`":
            rows[event] = cells[2]
    return rows


def test_rows_that_a_policy_makes_impossible_are_marked_never() -> None:
    """A backoff row behind a non-retryable reason says never, under any policy."""
    default = _charged_backoff_guards(generate()["session-table.md"])
    assert default["rejected"].startswith("never, payload_too_large not retryable")
    assert not default["timed_out"].startswith("never")
    assert not default["rate_limited"].startswith("never")

    never = ReasonPolicy(threshold=3, retryable=False)
    policy = Policy(ack_timeout=never, rate_limited=never, payload_too_large=never)
    guards = _charged_backoff_guards(generate(policy)["session-table.md"])
    assert len(guards) == 3
    assert all(guard.startswith("never, ") for guard in guards.values())


def test_an_edge_is_dashed_exactly_when_none_of_its_rows_can_fire() -> None:
    """In the DOT, an edge whose every row says never is dashed, and no other edge is."""

    class Charging(StateMachine):
        in_flight = State(initial=True, value="in_flight")
        parked = State(value="parked", final=True)
        backoff = State(value="backoff", final=True)
        dead_lettered = State(value="dead_lettered", final=True)
        # Under the policy below only rate_limited can ever back off.
        timed_out = in_flight.to(dead_lettered, cond=exhausted, on=bury) | in_flight.to(
            parked, on=charge
        )
        rejected = in_flight.to(dead_lettered, cond=exhausted, on=bury) | in_flight.to(
            backoff, on=charge
        )
        rate_limited = in_flight.to(dead_lettered, cond=exhausted, on=bury) | in_flight.to(
            backoff, on=charge
        )

    policy = Policy(ack_timeout=ReasonPolicy(retryable=False))
    machine = Machine("charging", "Charging", compile_machine(Charging))
    dot = generate(policy, machines=(machine,))["charging.dot"]

    edges = dict(re.findall(r"^    in_flight -> (\w+) \[(.*)\];$", dot, re.MULTILINE))
    assert "timed_out [never, ack_timeout not retryable]" in edges["parked"]
    assert "style=dashed" in edges["parked"]
    assert "rejected [never, payload_too_large not retryable]" in edges["backoff"]
    assert "rate_limited [below rate_limited.threshold (5)]" in edges["backoff"]
    assert "style=dashed" not in edges["backoff"]
    assert "style=dashed" not in edges["dead_lettered"]


def test_resting_states_are_drawn_as_final() -> None:
    """synced and dead_lettered end in [*] in Mermaid and have a double border in DOT."""
    files = generate()
    finals = {a for a, b, _ in _mermaid_transitions(files["session.mmd"]) if b == "[*]"}
    assert finals == {s.value for s in RESTING_STATES}
    doubled = set(re.findall(r"^    (\w+) \[.*peripheries=2", files["session.dot"], re.MULTILINE))
    assert doubled == finals
    assert "[*] --> queued" in files["session.mmd"]


def test_mermaid_sources_stay_within_the_syntax_mermaid_parses() -> None:
    """Mermaid ends a label at ':' or ';', so no transition label contains one."""
    for name, text in generate().items():
        if not name.endswith(".mmd"):
            continue
        lines = text.splitlines()
        assert lines[0] == "stateDiagram-v2"
        transitions = _mermaid_transitions(text)
        assert len(transitions) == sum("-->" in line for line in lines)
        for _, _, label in transitions:
            assert ":" not in label, label
            assert ";" not in label, label


def test_transition_table_lists_every_row_in_order() -> None:
    """The Markdown table has one line per compiled row, in the runtime's order."""
    table_md = generate()["session-table.md"]
    body = [line for line in table_md.splitlines() if line.startswith("| `")]
    assert len(body) == len(SESSION_TABLE.rows)
    for line, row in zip(body, SESSION_TABLE.rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == f"`{row.source}`"
        assert cells[1].startswith(f"`{row.event}`")
        assert cells[3].startswith(f"`{row.target}`")


def test_review_page_explains_every_guard_with_its_default_numbers() -> None:
    """diagrams/README.md has a plain-words line for each guarded event, with its numbers."""
    page = generate()["README.md"]
    guarded = {(row.event, fn.__name__) for row in SESSION_TABLE.rows for fn, _ in row.guards}
    guards_section = page.split("## Guards in plain words")[1]
    for event, guard in guarded:
        assert f"| `{event}` | `{guard}` |" in guards_section, (event, guard)
    assert "The 5th RateLimited in a row dead-letters the session" in guards_section
    assert "The 3rd AckTimeout in a row dead-letters the session" in guards_section
    assert "The first PayloadTooLarge dead-letters the session" in guards_section
    assert "```mermaid" in page


@needs_dot
def test_states_are_laid_out_from_queued_to_the_resting_states() -> None:
    """In the SVG, queued, in flight, backoff and the resting states go left to right."""
    svg = render_svgs(generate())["session.svg"].decode()
    # Each node's outline is a path; its first point stands for the node's position.
    x = {
        name: float(at)
        for name, at in re.findall(r"<title>(\w+)</title>\n<path[^>]*?d=\"M([-\d.]+)", svg)
    }
    assert x["queued"] < x["in_flight"] < x["backoff"] < x["synced"]
    assert x["backoff"] < x["dead_lettered"]


def test_readme_section_is_spliced_before_the_first_heading_and_replaced_in_place() -> None:
    """The section goes after the opening paragraphs, later replaces only itself,
    and a '## ' line inside a code block is not taken for a heading."""
    section = readme_section()
    original = "# t\n\nintro\n\n## Set-up\n\n```sh\n## not a heading\n```\n\n## Later\n"
    once = splice_readme(original, section)
    assert once == "# t\n\nintro\n\n" + section + original.split("intro\n\n")[1]
    assert splice_readme(once, section) == once
    edited = once.replace("stateDiagram-v2", "stateDiagram-v2\n    %% hand edit")
    assert splice_readme(edited, section) == once
    fenced = "# t\n\n" + section.replace(README_HEADING, "```\n" + README_HEADING) + "```\n"
    assert splice_readme("# t\n\n", section) == "# t\n\n" + section
    assert README_HEADING in splice_readme(fenced, section).split("```\n", 2)[2]


def test_check_names_every_missing_file_and_the_command_to_regenerate(tmp_path: Path) -> None:
    """`sessionfsm diagrams --check` on an empty directory exits 1 naming each file."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n## Set-up\n", encoding="utf-8")
    out = tmp_path / "out"

    result = CliRunner().invoke(
        main, ["diagrams", "--check", "--out", str(out), "--readme", str(readme)]
    )

    assert result.exit_code == 1
    for name in [*generate(), "session.svg", "link.svg"]:
        assert f"{out / name}: missing" in result.output
    assert f"{readme}: stale: section '{README_HEADING}' differs" in result.output
    assert f"regenerate with: {regenerate_command(out, None, readme)}" in result.output
    assert not out.exists()
    assert readme.read_text(encoding="utf-8") == "# x\n\nintro\n\n## Set-up\n"


@needs_dot
def test_write_then_check_passes_and_a_hand_edit_is_caught(tmp_path: Path) -> None:
    """After writing, --check exits 0 and writing again changes nothing; editing a file fails it."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n## Set-up\n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["diagrams", "--out", str(out), "--readme", str(readme)]
    runner = CliRunner()

    assert runner.invoke(main, args).exit_code == 0
    assert runner.invoke(main, [*args, "--check"]).exit_code == 0
    assert runner.invoke(main, args).output == ""
    assert "```mermaid" in readme.read_text(encoding="utf-8")

    (out / "session.svg").write_bytes((out / "session.svg").read_bytes() + b"\n")
    result = runner.invoke(main, [*args, "--check"])
    assert result.exit_code == 1
    assert f"{out / 'session.svg'}: stale" in result.output


def test_policy_option_writes_its_labels_and_leaves_the_readme_alone(tmp_path: Path) -> None:
    """--policy labels the guards with that file's numbers, in --out, without touching README."""
    policy = tmp_path / "proposed.toml"
    policy.write_text("[rate_limited]\nthreshold = 8\n", encoding="utf-8")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n", encoding="utf-8")
    out = tmp_path / "proposed"

    result = CliRunner().invoke(
        main,
        ["diagrams", "--out", str(out), "--policy", str(policy), "--readme", str(readme)],
    )

    assert "rate_limited.threshold reached (8)" in (out / "session.mmd").read_text()
    assert "policy in proposed.toml" in (out / "README.md").read_text()
    assert readme.read_text(encoding="utf-8") == "# x\n"
    assert result.exit_code == (0 if shutil.which("dot") else 1)


def test_diagrams_writes_only_where_it_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run in someone else's project, `sessionfsm diagrams` touches no README and makes no dir."""
    monkeypatch.chdir(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# their project\n\n## Usage\n", encoding="utf-8")
    runner = CliRunner()

    bare = runner.invoke(main, ["diagrams"])
    assert bare.exit_code == 2
    assert "--out" in bare.output
    runner.invoke(main, ["diagrams", "--out", "drawn"])
    assert readme.read_text(encoding="utf-8") == "# their project\n\n## Usage\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "drawn"]
    assert "diagrams" not in runner.invoke(main, ["--help"]).output


def test_mermaid_draws_only_takeable_rows_and_keeps_events_apart() -> None:
    """The Mermaid picture leaves out rows the policy makes impossible and bullets each row
    of a shared edge, so `settle` and `bounced` never read as one label."""
    mmd = generate()["session.mmd"]
    assert "never" not in mmd
    assert "| never, payload_too_large not retryable" in generate()["session-table.md"]
    (to_queued,) = [line for line in mmd.splitlines() if "in_flight --> queued:" in line]
    label = to_queued.split(": ", 1)[1]
    assert label.startswith("• acked [changed in flight] / settle<br>")
    assert label.endswith("<br>• bounced")
    assert label.count("•") == label.count("<br>") + 1  # every row its own bullet
    assert "• rate_limited [shared by the batch]" in label  # blame's spared rows too
    (to_synced,) = [line for line in mmd.splitlines() if "in_flight --> synced:" in line]
    assert "•" not in to_synced  # one row, no bullet
