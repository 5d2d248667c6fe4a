"""The engine as a whole, under random enqueues, ticks, acks, redrives and clock moves.

A hypothesis ``RuleBasedStateMachine``: each rule checks the invariants that
concern its own step (comparing before and after), and the ``@invariant``s
check the ones that must hold in every state.
"""

from __future__ import annotations

import random

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sessionfsm import Engine, Lane, LinkState, Policy, SessionState, SessionView, acks
from sessionfsm.machine import CHARGED_REASONS
from tests.strategies import any_ack, lanes, policies, session_ids

DEAD, SYNCED = SessionState.DEAD_LETTERED, SessionState.SYNCED
BACKOFF, QUEUED = SessionState.BACKOFF, SessionState.QUEUED


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = Engine(Policy(), log=False)
        self.now = 0.0
        self.enqueued: set[str] = set()
        self.stamps: dict[Lane, float | None] = {lane: None for lane in Lane}

    @initialize(policy=policies, seed=st.integers(0, 2**16))
    def start(self, policy: Policy, seed: int) -> None:
        self.engine = Engine(policy, rng=random.Random(seed), log=False)

    # ------------------------------------------------------------------ rules

    @rule(sid=session_ids, lane=lanes)
    def enqueue(self, sid: str, lane: Lane) -> None:
        self.engine.enqueue(sid, lane=lane)
        self.enqueued.add(sid)

    @rule(dt=st.sampled_from([0.0, 1.0, 5.0, 12.0, 40.0, 400.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._tick(self.now)

    @precondition(lambda self: self.now > 0)
    @rule(back=st.sampled_from([1.0, 100.0]))
    def clock_goes_back(self, back: float) -> None:
        regressions = self.engine.anomalies.get("clock_regressed", 0)
        self._tick(self.now - back)
        assert self.engine.anomalies["clock_regressed"] == regressions + 1
        assert self.engine.now == self.now

    def _tick(self, passed: float) -> None:
        """Tick with ``passed`` (maybe behind the clock) and check the result."""
        engine = self.engine
        before = {v.id: v for v in engine.sessions()}
        overdue = {
            sid for b in engine.in_flight() if b.deadline <= self.now for sid in b.session_ids
        }
        link = engine.link
        waiting = link.state is LinkState.THROTTLED and (
            link.resume_at is not None and link.resume_at > max(passed, self.now)
        )
        overdue_any = bool(overdue)
        batches = engine.tick(passed)
        # inv13: a throttled link sends nothing before its wait is over (unless
        # a timeout in this tick re-opened it), and a probing one one probe.
        if waiting and not overdue_any:
            assert not batches
        if engine.link.state is LinkState.PROBING:
            assert len(batches) <= 1
            assert all(b.probe for b in batches)
        sent = [sid for b in batches for sid in b.session_ids]
        # inv1: nobody sent twice in one tick, nobody sent who was not waiting
        assert len(sent) == len(set(sent))
        for sid in sent:
            old = before[sid]
            # inv5: sent only if ready: queued, a backoff whose time has come,
            # or timed out by this very tick with a retry time already due
            assert old.state in (QUEUED, BACKOFF) or sid in overdue, (sid, old.state)
            if old.state is BACKOFF:
                assert old.retry_at is not None
                assert old.retry_at <= self.now
        for batch in batches:
            # inv9: a stamp only with a real batch, and never inside the interval
            assert batch.session_ids
            interval = self._interval(batch.lane)
            last = self.stamps[batch.lane]
            assert last is None or self.now - last >= interval
            self.stamps[batch.lane] = self.now
        stamps = engine.debug_state()["stamps"]
        assert {lane: stamps[lane] for lane in Lane} == self.stamps
        self._check_no_starvation()

    @rule(pick=st.integers(0, 3), ack=any_ack, whole=st.booleans(), data=st.data())
    def ack(self, pick: int, ack: acks.Ack, whole: bool, data: st.DataObject) -> None:
        engine = self.engine
        open_batches = engine.in_flight()
        if not open_batches:
            engine.on_ack(10_000 + pick, ack, now=self.now)  # unknown: ignored
            return
        batch = open_batches[pick % len(open_batches)]
        if whole:
            answer: acks.Ack | dict[str, acks.Ack] = ack
            targets = list(batch.session_ids)
        else:
            answer = data.draw(
                st.dictionaries(st.sampled_from(batch.session_ids), any_ack, min_size=1)
            )
            targets = list(answer)
        before = {sid: engine.session(sid) for sid in targets}
        # Only sessions still awaiting an answer in *this* batch are affected;
        # one answered earlier may since be in flight again in another batch.
        awaiting = set(engine.debug_state()["pending"][batch.id])
        # inv11: one failure for several sessions at once is nobody's own.
        shared = (
            whole and len(awaiting) >= 2 and not isinstance(ack, (acks.Ok, acks.RelayUnavailable))
        )
        engine.on_ack(batch.id, answer, now=self.now)
        for sid in targets:
            if sid not in awaiting:
                assert engine.session(sid) == before[sid], "an ignored entry changed a session"
                continue
            got = answer if isinstance(answer, acks._AckBase) else answer[sid]
            self._check_ack(before[sid], got, engine.session(sid), shared)

    @rule(sid=session_ids)
    def redrive(self, sid: str) -> None:
        if sid in self.engine and self.engine.state(sid) is DEAD:
            self.engine.redrive(sid, now=self.now)
            view = self.engine.session(sid)
            assert (view.state, view.charges, view.attempts) == (QUEUED, {}, 0)

    @rule()
    def relay_ready(self) -> None:
        throttled = self.engine.link.state in (LinkState.THROTTLED, LinkState.PROBING)
        self.engine.relay_ready(now=self.now)
        # The transport being ready says nothing about a relay's throttle.
        if throttled:
            assert self.engine.link.state in (LinkState.THROTTLED, LinkState.PROBING)
        else:
            assert self.engine.link.state is LinkState.UP

    @rule()
    def relay_unavailable(self) -> None:
        counts = {v.id: v.charges for v in self.engine.sessions()}
        self.engine.relay_unavailable(now=self.now)
        assert {v.id: v.charges for v in self.engine.sessions()} == counts  # inv4

    # ------------------------------------------------------------- invariants

    @invariant()
    def inv1_every_session_in_exactly_one_state_and_place(self) -> None:
        self.engine.check()
        assert {v.id for v in self.engine.sessions()} == self.enqueued
        assert sum(self.engine.sessions_by_state().values()) == len(self.enqueued)

    @invariant()
    def inv13_a_throttled_link_waits_then_probes_once(self) -> None:
        link = self.engine.link
        if link.state is LinkState.THROTTLED:
            assert link.resume_at is not None
        probes = [b for b in self.engine.in_flight() if b.probe]
        assert len(probes) <= 1

    @invariant()
    def inv3_dead_letters_hold_no_counters(self) -> None:
        for view in self.engine.dead_letters():
            assert view.charges == {}
            assert view.retry_at is None
            assert view.dead_letter_reason in CHARGED_REASONS

    # ---------------------------------------------------------------- helpers

    def _interval(self, lane: Lane) -> float:
        policy = self.engine.policy
        if lane is Lane.INCREMENTAL:
            return policy.incremental_interval_s
        return policy.backfill_interval_s

    def _check_no_starvation(self) -> None:
        """inv6: after a tick, no lane that may send still has a ready session."""
        engine = self.engine
        if engine.link.state is not LinkState.UP:
            return
        if len(engine.in_flight()) >= engine.policy.max_in_flight:
            return
        for lane in Lane:
            last = self.stamps[lane]
            may_send = last is None or self.now - last >= self._interval(lane)
            if may_send:
                waiting = [v.id for v in engine.sessions() if v.state is QUEUED and v.lane is lane]
                assert not waiting, f"{lane} may send but left {waiting} waiting"

    def _check_ack(
        self, old: SessionView, ack: acks.Ack, new: SessionView, shared: bool = False
    ) -> None:
        policy = self.engine.policy
        if isinstance(ack, acks.Ok):
            # inv2 reset on success; inv8 no lost update
            assert new.charges == {}
            assert new.retry_at is None
            assert new.state is (QUEUED if old.dirty else SYNCED)
            return
        if isinstance(ack, acks.RelayUnavailable):
            # inv4: never charged, never dead-lettered
            assert new.charges == old.charges
            assert new.state is QUEUED
            return
        if shared or new.state is QUEUED:
            # inv11, inv12: not its own failure (shared, or no evidence):
            # back to the queue untouched.
            assert new.state is QUEUED
            assert new.charges == old.charges
            assert new.retry_at is None
            return
        reason = type(ack).__name__
        rp = policy.reason(reason)
        count = old.charges.get(reason, 0) + 1
        if new.state is DEAD:
            # inv7: exactly at the threshold, or non-retryable
            assert not rp.retryable or count == rp.threshold
            assert new.dead_letter_reason == reason
        else:
            assert new.state is BACKOFF
            assert rp.retryable
            assert count < rp.threshold
            assert new.charges.get(reason) == count  # inv10
            others = {k: v for k, v in old.charges.items() if k != reason}
            assert {k: v for k, v in new.charges.items() if k != reason} == others


EngineMachine.TestCase.settings = EngineMachine.TestCase.settings  # profile from conftest
TestEngineInvariants = EngineMachine.TestCase
