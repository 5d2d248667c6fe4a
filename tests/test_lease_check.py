"""The ownership protocol of the fleet, model-checked (sessionfsm.tools.lease_check)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import pytest

from sessionfsm.tools.lease_check import actions, explore, format_trace


def test_the_fenced_protocol_keeps_every_property_with_two_workers() -> None:
    """Two workers, two partitions, stalls, crashes, expiry, rebalancing: one writer per
    partition and epoch, no change lost, and ownership and delivery always reachable."""
    result = explore(2, max_version=1)
    assert result.ok, {k: format_trace(v) for k, v in result.violations.items()}
    assert result.states > 10_000  # the space really was explored


def test_the_worker_symmetry_reduction_changes_no_verdict() -> None:
    """Exploring without the symmetry reduction gives the same verdicts and shortest
    traces of the same length, over at most twice the states (two workers: orbits of 2)."""
    for fenced in (True, False):
        reduced = explore(2, fenced=fenced, max_version=1)
        plain = explore(2, fenced=fenced, max_version=1, symmetry=False)
        assert set(reduced.violations) == set(plain.violations)
        for name, trace in reduced.violations.items():
            assert len(trace) == len(plain.violations[name]), name
        assert plain.states / 2 <= reduced.states < plain.states
        assert plain.transitions / 2 <= reduced.transitions < plain.transitions


def test_without_fencing_a_stalled_worker_overwrites_its_successor() -> None:
    """The planted bug (the server applies writes without the fence check) is caught:
    a worker stalled between deciding and committing a write commits after another
    took over, and the newer change is lost; the checker prints the trace."""
    result = explore(2, fenced=False, stop_after_safety=True)
    assert set(result.violations) == {"safety 1", "safety 2"}
    lost = result.violations["safety 2"]
    labels = [label for label, _ in lost]
    stall, takeover, stale = (
        labels.index("stall w0"),
        labels.index("acquire w1 p0"),
        len(labels) - 1,
    )
    assert stall < takeover < stale
    assert labels[stale].startswith("commit w0 p0")
    final = lost[-1][1]
    assert final.lease[0] == (1, 2, True)  # w1 owns partition 0 in the second epoch ...
    assert final.row[0] < final.want  # ... and w0's stale write replaced the newer version
    text = format_trace(lost)
    print(text)
    assert "commit w0 p0 apply v1" in text


def test_a_trace_replays_as_real_actions_from_the_start() -> None:
    """Each step of a printed trace is an action of the model from the previous state,
    with real worker names and epochs, though the search stored only canonical keys."""
    result = explore(3, fenced=False, stop_after_safety=True)
    two = explore(2, fenced=False, stop_after_safety=True)
    for name, trace in result.violations.items():
        # A third worker makes no counterexample shorter.
        assert len(trace) == len(two.violations[name]), name
        assert trace[0][0] == "start"
        for (_, before), (label, after) in pairwise(trace):
            assert (label, after) in actions(before, fenced=False), label
    assert result.violations["safety 1"][-1][0].startswith("commit w0 p0")


def test_the_fenced_protocol_keeps_every_property_with_three_workers() -> None:
    """The same with three workers joining, stalling and crashing (one change)."""
    result = explore(3, max_version=1)
    assert result.ok, {k: format_trace(v) for k, v in result.violations.items()}
    assert result.states > 100_000


def test_fleet_check_with_and_without_the_symmetry_reduction(
    sessionfsm_cli: Callable[..., Any],
) -> None:
    """``sessionfsm fleet check`` says every property holds either way; ``--no-symmetry``
    counts the states apart that differ only by worker names, so it reports more."""
    reduced = sessionfsm_cli("fleet", "check")
    plain = sessionfsm_cli("fleet", "check", "--no-symmetry")
    for result in (reduced, plain):
        assert result.exit_code == 0, result.output
        assert "every property holds" in result.output
    assert "(up to worker names)" in reduced.output
    assert _states(reduced.output) < _states(plain.output)


def _states(output: str) -> int:
    return int(output.split(" states", 1)[0])


@pytest.mark.slow
def test_the_fenced_protocol_keeps_every_property_with_three_workers_and_two_changes() -> None:
    """Three workers and two changes of the session, the largest space (minutes)."""
    result = explore(3, max_version=2)
    assert result.ok, {k: format_trace(v) for k, v in result.violations.items()}
