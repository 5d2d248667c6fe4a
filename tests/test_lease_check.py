"""The ownership protocol of the fleet, model-checked (sessionfsm.tools.lease_check)."""

from __future__ import annotations

import pytest

from sessionfsm.tools.lease_check import explore, format_trace


def test_the_fenced_protocol_keeps_every_property_with_two_workers() -> None:
    """Two workers, two partitions, stalls, crashes, expiry, rebalancing: one writer per
    partition and epoch, no change lost, and ownership and delivery always reachable."""
    result = explore(2, max_version=1)
    assert result.ok, {k: format_trace(v) for k, v in result.violations.items()}
    assert result.states > 10_000  # the space really was explored


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
    assert final.lease[0][0] == 1  # w1 owns partition 0 ...
    assert final.row[0] < final.want  # ... and w0's stale write replaced the newer version
    text = format_trace(lost)
    print(text)
    assert "commit w0 p0 apply v1" in text


@pytest.mark.slow
def test_the_fenced_protocol_keeps_every_property_with_three_workers() -> None:
    """The same with three workers joining, stalling and crashing."""
    result = explore(3, max_version=1)
    assert result.ok, {k: format_trace(v) for k, v in result.violations.items()}
