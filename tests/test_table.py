"""Every (state, event) pair of the session table, compiled against the declaration.

Modelled on h2's ``test_state_machines.py``: draw every pair with hypothesis
and assert one property over all of them.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionfsm import Policy, SessionState, acks
from sessionfsm.machine import (
    ACK_EVENTS,
    CHARGED_REASONS,
    REASON_INDEX,
    LinkRecord,
    LinkState,
    SessionMachine,
    SessionRecord,
    Step,
)
from sessionfsm.runtime import (
    LINK_TABLE,
    SESSION_TABLE,
    CompiledRuntime,
    ReferenceRuntime,
    compile_machine,
)
from tests.strategies import pair_contexts, policies, times

EVENT_ACK = {event: ack_type for ack_type, event in ACK_EVENTS.items()}
PAIRS = [(state, event) for state in SessionState for event in SESSION_TABLE.events]
LINK_PAIRS = [(state, event) for state in LinkState for event in LINK_TABLE.events]


def _unpack(ctx: dict[str, Any]) -> tuple[Policy, tuple[int, ...], bool, float, float, Any]:
    return (
        ctx["policy"],
        ctx["counts"],
        ctx["dirty"],
        ctx["retry"],
        ctx["now"],
        ctx["retry_after_s"],
    )


def _ack_for(event: str, retry_after_s: float | None) -> acks.Ack | None:
    ack_type = EVENT_ACK.get(event)
    if ack_type is None:
        return None
    if ack_type is acks.RateLimited:
        return acks.RateLimited(retry_after_s=retry_after_s)
    return ack_type()


def _record(state: SessionState, counts: tuple[int, ...], dirty: bool, retry: float) -> Any:
    # A record as the engine could hold it in that state (invariants 3 and 10).
    return SessionRecord(
        id="s1",
        state=state,
        counts=(0,) * len(counts) if state is SessionState.DEAD_LETTERED else counts,
        retry_at=retry if state is SessionState.BACKOFF else None,
        dirty=dirty,
        attempts=sum(counts),
        dead_letter_reason="RateLimited" if state is SessionState.DEAD_LETTERED else None,
        dead_lettered_at=1.0 if state is SessionState.DEAD_LETTERED else None,
    )


def _fire(
    runtime_cls: type,
    rec: Any,
    event: str,
    step_args: tuple[Any, ...],
    blame: tuple[bool, bool] = (False, True),
) -> Any:
    policy, now, ack, seed = step_args
    shared, evidence = blame
    step = Step(policy, random.Random(seed)).load(now, ack)
    step.blame(shared, 1 if evidence else 0, 0, None)
    return runtime_cls(SESSION_TABLE).fire(rec, event, step)


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s}-{e}" for s, e in PAIRS])
@given(ctx=pair_contexts)
def test_compiled_table_matches_declaration_on_every_pair(
    state: SessionState, event: str, ctx: dict[str, Any]
) -> None:
    """The compiled table and python-statemachine pick the same target and effects."""
    policy, rec_counts, dirty, retry, now, retry_after_s = _unpack(ctx)
    ack = _ack_for(event, retry_after_s)
    compiled = _record(state, rec_counts, dirty, retry)
    reference = _record(state, rec_counts, dirty, retry)
    args = (policy, now, ack, 1234)
    blame = (ctx["shared"], ctx["evidence"])
    got = _fire(CompiledRuntime, compiled, event, args, blame)
    want = _fire(ReferenceRuntime, reference, event, args, blame)
    assert got == want
    assert msgspec.to_builtins(compiled) == msgspec.to_builtins(reference)
    if got is None:
        assert compiled == _record(state, rec_counts, dirty, retry), "a refused event changed"


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s}-{e}" for s, e in PAIRS])
@given(ctx=pair_contexts)
def test_inv2_to_inv10_hold_on_every_pair(
    state: SessionState, event: str, ctx: dict[str, Any]
) -> None:
    """Every single transition keeps the per-session invariants 2, 3, 4, 5, 7, 8, 10."""
    policy, rec_counts, dirty, retry, now, retry_after_s = _unpack(ctx)
    ack = _ack_for(event, retry_after_s)
    rec = _record(state, rec_counts, dirty, retry)
    before = msgspec.structs.replace(rec)
    # A failure attributable to this session alone: what a charge does.
    target = _fire(CompiledRuntime, rec, event, (policy, now, ack, 99), (False, True))
    if target is None:
        return
    # inv10: retry_at exactly in backoff
    assert (rec.retry_at is not None) == (target is SessionState.BACKOFF)
    if event == "acked":  # inv2: reset on success
        assert rec.counts == (0, 0, 0)
        assert rec.retry_at is None
        # inv8: a payload changed in flight is never marked synced
        assert (target is SessionState.SYNCED) == (not before.dirty)
    if event == "bounced":  # inv4: transport reasons are never charged
        assert rec.counts == before.counts
        assert target is SessionState.QUEUED
    if target is SessionState.DEAD_LETTERED and before.state is not target:  # inv3, inv7
        assert rec.counts == (0, 0, 0)
        assert rec.retry_at is None
        assert ack is not None
        i = REASON_INDEX[type(ack)]
        rp = policy.reason(CHARGED_REASONS[i])
        assert (
            not rp.retryable
            or before.counts[i] + 1 == rp.threshold
            or (before.counts[i] + 1 > rp.threshold)
        )
        assert rec.dead_letter_reason == CHARGED_REASONS[i]
    if target is SessionState.BACKOFF and before.state is SessionState.IN_FLIGHT:
        assert ack is not None
        i = REASON_INDEX[type(ack)]
        rp = policy.reason(CHARGED_REASONS[i])
        # inv7: deferred only below the threshold, and only if retryable
        assert rp.retryable
        assert before.counts[i] + 1 < rp.threshold
        # inv10: exactly one more of this reason, the others untouched
        assert rec.counts[i] == before.counts[i] + 1
        assert [c for j, c in enumerate(rec.counts) if j != i] == [
            c for j, c in enumerate(before.counts) if j != i
        ]
        assert rec.retry_at is not None
        assert now <= rec.retry_at <= now + policy.max_backoff_s
    if event == "elapsed":  # inv5: leaves backoff only when due
        assert before.retry_at is not None
        assert now >= before.retry_at


CHARGED_EVENTS = [event for ack_type, event in ACK_EVENTS.items() if REASON_INDEX[ack_type] >= 0]


@pytest.mark.parametrize("event", CHARGED_EVENTS)
@given(ctx=pair_contexts)
def test_inv11_inv12_a_failure_not_its_own_changes_nothing_on_every_pair(
    event: str, ctx: dict[str, Any]
) -> None:
    """A shared failure, or one without evidence, sends the session back untouched."""
    policy, rec_counts, dirty, retry, now, retry_after_s = _unpack(ctx)
    ack = _ack_for(event, retry_after_s)
    shared, evidence = ctx["shared"], ctx["evidence"]
    for runtime in (CompiledRuntime, ReferenceRuntime):
        rec = _record(SessionState.IN_FLIGHT, rec_counts, dirty, retry)
        before = msgspec.structs.replace(rec)
        # refusing_since None: the relay has not refused for long (the bound aside).
        target = _fire(runtime, rec, event, (policy, now, ack, 7), (shared, evidence))
        if shared or not evidence:
            assert target is SessionState.QUEUED
            assert rec.counts == before.counts
            assert rec.retry_at is None
        else:
            assert target in (SessionState.BACKOFF, SessionState.DEAD_LETTERED)


@given(policy=policies, now=times, since=times)
def test_inv12_past_the_bound_a_refusal_is_charged_again(
    policy: Policy, now: float, since: float
) -> None:
    """Without evidence, a refusal is charged exactly when the relay has
    accepted nothing for max_relay_refusal_s."""
    rec = _record(SessionState.IN_FLIGHT, (0, 0, 0), False, 0.0)
    step = Step(policy, random.Random(1)).load(now, acks.AckTimeout())
    step.blame(False, 0, 0, since)
    target = CompiledRuntime(SESSION_TABLE).fire(rec, "timed_out", step)
    past = now - since >= policy.max_relay_refusal_s
    assert (target is not SessionState.QUEUED) == past


@pytest.mark.parametrize(("state", "event"), LINK_PAIRS, ids=[f"{s}-{e}" for s, e in LINK_PAIRS])
@given(policy=policies, failures=st.integers(0, 6), resume=times, now=times)
def test_link_table_matches_declaration_on_every_pair(
    state: LinkState, event: str, policy: Policy, failures: int, resume: float, now: float
) -> None:
    """The compiled link table and python-statemachine agree on every pair."""
    resume_at = resume if state in (LinkState.PAUSED, LinkState.THROTTLED) else None
    compiled = LinkRecord(state=state, failures=failures, resume_at=resume_at)
    reference = LinkRecord(state=state, failures=failures, resume_at=resume_at)
    step_c = Step(policy, random.Random(5)).load(now)
    step_r = Step(policy, random.Random(5)).load(now)
    got = CompiledRuntime(LINK_TABLE).fire(compiled, event, step_c)
    want = ReferenceRuntime(LINK_TABLE).fire(reference, event, step_r)
    assert got == want
    assert compiled == reference
    if got is LinkState.PAUSED or (got is LinkState.THROTTLED and event == "refused"):
        assert compiled.resume_at is not None
        assert compiled.resume_at >= now
    if event == "refused":  # inv13: a throttle always has an end, within the policy's caps
        assert got is LinkState.THROTTLED
        assert compiled.resume_at is not None
        assert compiled.resume_at <= now + policy.max_backoff_s


def test_every_state_is_declared_and_every_ack_has_an_event() -> None:
    """The table covers all five states, and every ack type fires a declared event."""
    assert set(SESSION_TABLE.states) == set(SessionState)
    assert SESSION_TABLE.initial is SessionState.QUEUED
    for ack_type in acks.ACK_TYPES:
        assert ACK_EVENTS[ack_type] in SESSION_TABLE.events
    # Every ack event is answerable from in_flight, and only from there.
    for event in ACK_EVENTS.values():
        sources = {row.source for row in SESSION_TABLE.rows if row.event == event}
        assert sources == {SessionState.IN_FLIGHT}


def test_relay_unavailable_is_the_only_transport_reason_and_is_declared_uncharged() -> None:
    """The bounced rows carry no guard and no effect: nothing to charge with (invariant 4)."""
    rows = [row for row in SESSION_TABLE.rows if row.event == "bounced"]
    assert [(row.target, row.guards, row.effects) for row in rows] == [
        (SessionState.QUEUED, (), ())
    ]


def test_compiler_refuses_callbacks_it_cannot_run() -> None:
    """A guard given by name would be silently skipped, so compiling it fails loudly."""
    from statemachine import State, StateMachine

    class ByName(StateMachine):
        a = State(initial=True)
        b = State(final=True)
        go = a.to(b, cond="ready")

        def ready(self) -> bool:
            return True

    with pytest.raises(TypeError, match="must be a function"):
        compile_machine(ByName)


def test_compiled_rows_keep_declaration_order() -> None:
    """Guarded rows come before their fallback, as python-statemachine tries them."""
    rows = SESSION_TABLE.index[(SessionState.IN_FLIGHT, "rate_limited")]
    assert [row.target for row in rows] == [
        SessionState.QUEUED,
        SessionState.QUEUED,
        SessionState.DEAD_LETTERED,
        SessionState.BACKOFF,
    ]
    assert [row.guard_label for row in rows] == ["shared", "not attributable", "exhausted", ""]
    assert SESSION_TABLE.machine is SessionMachine
