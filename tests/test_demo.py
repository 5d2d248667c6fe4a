"""The demo command: the engine against a scripted relay, end to end."""

from __future__ import annotations

from click.testing import CliRunner

from sessionfsm.tools.cli import main


def test_demo_dead_letters_the_oversized_session_and_syncs_the_rest() -> None:
    """The oversized session is dead-lettered for RateLimited; the flap costs nobody."""
    result = CliRunner().invoke(main, ["--log-level", "error", "demo"])
    assert result.exit_code == 0, result.output
    rows = {
        cells[0]: cells[1:]
        for line in result.output.splitlines()
        for cells in [line.split()]
        if cells
        and cells[0].startswith(("s", "old"))
        and cells[0] != "session"
        and cells[0] != "sessions:"
    }
    assert rows["s03"][1:] == ["dead_lettered", "5", "RateLimited"]
    others = [sid for sid in rows if sid != "s03"]
    assert len(others) == 11
    assert all(rows[sid][1] == "synced" for sid in others)
    assert "sessions: synced 11, dead_lettered 1; relay link: up" in result.output
    assert "{" not in result.output  # no raw dicts
