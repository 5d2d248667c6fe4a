"""The compiled runtime and python-statemachine agree, state for state and counter for counter.

Two engines, one on the compiled table and one driving real
python-statemachine instances of the same declared class, get the same random
operations. After every operation their whole state (every record, the link,
the lane stamps, the open batches, the anomaly counters) and every return
value must be equal.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from sessionfsm import Engine, Policy
from sessionfsm.runtime import SESSION_TABLE, ReferenceRuntime
from tests.conftest import apply_operation
from tests.strategies import blame_operations, operations, policies


def _both_runtimes_agree(policy: Policy, seed: int, ops: list[tuple[Any, ...]]) -> None:
    """Apply ``ops`` to a compiled and a reference engine; they agree after each."""
    compiled = Engine(policy, rng=random.Random(seed), log=False, runtime="compiled")
    reference = Engine(policy, rng=random.Random(seed), log=False, runtime="reference")
    now = 0.0
    for step, op in enumerate(ops):
        if op[0] == "tick":
            now += op[1]
        got = apply_operation(compiled, op, now)
        want = apply_operation(reference, op, now)
        assert msgspec.to_builtins(got) == msgspec.to_builtins(want), (step, op)
        assert compiled.debug_state() == reference.debug_state(), (step, op)
    compiled.check()
    reference.check()


@given(
    policy=policies,
    seed=st.integers(0, 2**16),
    ops=st.lists(operations, min_size=1, max_size=80),
)
def test_compiled_and_reference_runtimes_agree(
    policy: Policy, seed: int, ops: list[tuple[Any, ...]]
) -> None:
    """Random operations leave both runtimes in identical states with identical results."""
    _both_runtimes_agree(policy, seed, ops)


def test_reference_runtime_really_runs_python_statemachine() -> None:
    """The reference engine holds one live python-statemachine instance per session."""
    from statemachine import StateMachine

    runtime = ReferenceRuntime(SESSION_TABLE)
    engine = Engine(Policy(), log=False, runtime=runtime)
    engine.enqueue("s1")
    engine.enqueue("s2")
    engine.tick(0.0)
    machines = runtime._machines
    assert len(machines) == 2
    assert all(isinstance(m, StateMachine) for m in machines.values())


@given(
    policy=policies,
    seed=st.integers(0, 2**16),
    ops=st.lists(blame_operations, min_size=1, max_size=60),
)
def test_inv11_inv12_inv13_blame_agrees_between_runtimes(
    policy: Policy, seed: int, ops: list[tuple[Any, ...]]
) -> None:
    """Whole-batch failures, splits, throttles and probes: both runtimes agree."""
    _both_runtimes_agree(policy, seed, ops)
