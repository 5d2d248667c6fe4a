"""The exhaustive checker (``sessionfsm check``): it proves the real engine
correct for small bounds, and it catches each flaw of the motivating review
when one is planted into a copy of the engine or of its transition table."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click.testing
import msgspec
import pytest

from sessionfsm import (
    Engine,
    InvariantViolation,
    Lane,
    Policy,
    SessionFSMError,
    SessionState,
    acks,
    machine,
)
from sessionfsm.inspection import EngineState
from sessionfsm.machine import CHARGED_REASONS, LinkRecord, SessionRecord, Step, bury, settle
from sessionfsm.rooms import Blame, Lanes, PacedRedrive, Rooms
from sessionfsm.runtime import LINK_TABLE, SESSION_TABLE, CompiledRuntime, Table
from sessionfsm.tools import check as checker
from sessionfsm.tools.check import (
    CHECK_POLICY,
    INVARIANTS,
    CheckResult,
    explore,
    format_result,
    replay,
)

QUEUED, BACKOFF = SessionState.QUEUED, SessionState.BACKOFF
INCREMENTAL = Lane.INCREMENTAL

# --------------------------------------------------------------------------
# Planted flaws. Each is a subclass of one of the engine's rooms (passed in
# through ``Engine(rooms=...)``) or a copy of the real transition table with
# one effect swapped (through ``Engine(runtime=...)``); the real modules stay
# untouched.
# --------------------------------------------------------------------------


def _table_with(
    event: str,
    effects: Callable[[tuple[Any, ...]], tuple[Any, ...]],
    table: Table = SESSION_TABLE,
) -> Table:
    """A copy of ``table`` whose ``event`` rows get ``effects(old effects)``."""
    rows = tuple(
        dataclasses.replace(row, effects=effects(row.effects)) if row.event == event else row
        for row in table.rows
    )
    index: dict[Any, list[Any]] = {}
    for row in rows:
        index.setdefault((row.source, row.event), []).append(row)
    return dataclasses.replace(
        table, rows=rows, index={key: tuple(value) for key, value in index.items()}
    )


def _with_table(table: Table) -> Callable[[Policy], Engine]:
    def flawed_table(policy: Policy) -> Engine:
        return Engine(policy, rng=random.Random(0), log=False, runtime=CompiledRuntime(table))

    return flawed_table


def _charge_the_bounce(model: SessionRecord, step: Step) -> None:
    # Flaw (a): a relay that merely went away is counted as a RateLimited.
    i = CHARGED_REASONS.index("RateLimited")
    model.counts = (*model.counts[:i], model.counts[i] + 1, *model.counts[i + 1 :])


def _settle_keeping_counts(model: SessionRecord, step: Step) -> None:
    # Flaw (d): success forgets the retry time but not the counters.
    model.retry_at = None
    model.attempts = 0


def _bury_own_reason_only(model: SessionRecord, step: Step) -> None:
    # Flaw (e): dead-lettering clears the counter of its own reason only.
    i = step.reason
    model.counts = (*model.counts[:i], 0, *model.counts[i + 1 :])
    model.retry_at = None
    model.dirty = False
    model.dead_letter_reason = CHARGED_REASONS[i]
    model.dead_lettered_at = step.now


relay_flap_charged = _with_table(_table_with("bounced", lambda old: (*old, _charge_the_bounce)))
counter_kept_on_success = _with_table(
    _table_with(
        "acked", lambda old: tuple(_settle_keeping_counts if e is settle else e for e in old)
    )
)


def _bury_flawed(old: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(_bury_own_reason_only if e is bury else e for e in old)


_flawed_bury = SESSION_TABLE
for _event in ("timed_out", "rate_limited", "rejected"):
    _flawed_bury = _table_with(_event, _bury_flawed, _flawed_bury)
stale_counter_after_dead_letter = _with_table(_flawed_bury)


class _Quiet(Engine):
    #: The engine's rooms; a planted flaw replaces one of them.
    rooms = Rooms()

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy, rng=random.Random(0), log=False, rooms=self.rooms)


class _IncrementalFirstLanes(Lanes):
    """Flaw (b): the incremental lane is chosen whenever it holds sessions at
    all, so a tick whose incremental sessions are all backed off sends nothing."""

    def pick(self, now: float) -> Lane | None:
        if self.is_open(INCREMENTAL, now) and any(
            rec.lane is INCREMENTAL and rec.state in (QUEUED, BACKOFF)
            for rec in self.sessions.values()
        ):
            return INCREMENTAL if self.has_ready(INCREMENTAL) else None
        return super().pick(now)


class BackfillSkipped(_Quiet):
    """Flaw (b), in an engine: see ``_IncrementalFirstLanes``."""

    rooms = Rooms(lanes=_IncrementalFirstLanes)


class _EagerStampLanes(Lanes):
    """Flaw (c): the incremental throttle is stamped as soon as the lane is
    considered, even when all its sessions are backed off and no batch forms."""

    def pick(self, now: float) -> Lane | None:
        if (
            self.is_open(INCREMENTAL, now)
            and not self.has_ready(INCREMENTAL)
            and any(
                rec.lane is INCREMENTAL and rec.state is BACKOFF for rec in self.sessions.values()
            )
        ):
            self.stamps[INCREMENTAL] = now
        return super().pick(now)


class ThrottleStampedEmpty(_Quiet):
    """Flaw (c), in an engine: see ``_EagerStampLanes``."""

    rooms = Rooms(lanes=_EagerStampLanes)


class _NeverResumes:
    """A link runtime that, once lost, never resumes by itself and ignores relay_ready."""

    def __init__(self) -> None:
        self.table = LINK_TABLE
        self._inner = CompiledRuntime(LINK_TABLE)

    def fire(self, record: LinkRecord, event: str, step: Step) -> Any:
        if event == "reported_ready":
            return None
        target = self._inner.fire(record, event, step)
        if event == "lost":
            record.resume_at = math.inf
        return target


def paused_forever(policy: Policy) -> Engine:
    """An engine whose link, once lost, never resumes (a planted liveness flaw)."""
    return Engine(policy, rng=random.Random(0), log=False, link_runtime=_NeverResumes())


FLAWS: dict[str, tuple[Callable[[Policy], Engine], str]] = {
    "a_relay_unavailable_charged": (relay_flap_charged, "inv4_transport_not_charged"),
    "b_backfill_skipped": (BackfillSkipped, "inv6_no_starvation"),
    "c_throttle_stamped_without_batch": (ThrottleStampedEmpty, "inv9_stamp_only_with_batch"),
    "d_counter_kept_on_success": (counter_kept_on_success, "inv2_reset_on_success"),
    "e_stale_counter_after_dead_letter": (
        stale_counter_after_dead_letter,
        "inv3_dead_letter_clean",
    ),
}


def _first_violation(factory: Callable[[Policy], Engine], sessions: int = 2) -> CheckResult:
    return explore(sessions=sessions, engine_factory=factory, stop_at_first=True)


# --------------------------------------------------------------------------
# The real engine holds every property
# --------------------------------------------------------------------------


def test_check_two_sessions_whole_space_holds(checked_two_sessions: CheckResult) -> None:
    """Two sessions, both lanes, the small policy: every reachable state is
    explored to the fixpoint and every property holds (its speed is the
    benchmark's business, not a test's)."""
    result = checked_two_sessions
    assert result.violations == []
    assert result.complete
    assert result.states > 10_000
    assert result.transitions > 10 * result.states
    assert set(result.invariants) == set(INVARIANTS) - checker._RELAY_ONLY


def test_check_counts_every_property_once_per_transition(
    checked_two_sessions: CheckResult,
) -> None:
    """Each transition and each new state is checked, and liveness per state."""
    result = checked_two_sessions
    assert result.checks >= result.transitions + result.states
    assert result.failed_checks == 0


def test_check_one_session_free_clock_holds() -> None:
    """With a clock that may advance without a tick, one session still holds everything."""
    result = explore(sessions=1, free_clock=True)
    assert result.ok
    assert result.complete
    assert result.states > explore(sessions=1).states


def test_check_depth_bound_cuts_the_search_short() -> None:
    """A depth bound stops the search early and says the space is not complete."""
    result = explore(sessions=2, depth=4)
    assert result.ok
    assert not result.complete
    assert result.max_depth == 4
    assert result.states < 1_000


def test_check_strips_jitter_from_the_policy() -> None:
    """Jittered backoffs are checked at their upper bound, so successors are deterministic."""
    jittery = msgspec.structs.replace(
        CHECK_POLICY,
        rate_limited=msgspec.structs.replace(
            CHECK_POLICY.rate_limited,
            backoff=checker.Exponential(base_s=1.0, factor=2.0, cap_s=2.0, jitter=True),
        ),
    )
    result = explore(sessions=1, policy=jittery)
    assert result.ok
    assert isinstance(result.policy.rate_limited.backoff, checker.Exponential)
    assert result.policy.rate_limited.backoff.jitter is False


class _StickySchedule(PacedRedrive):
    """A flaw the checker found in the engine, planted back: a session that
    leaves the dead letters other than by the paced redrive itself (by hand,
    here) keeps its paced-redrive entry, so when the session is dead-lettered
    again (for any reason) the schedule revives a dead letter that no
    schedule_redrive covered."""

    def drop(self, session_id: str) -> None:
        pass


class StaleScheduleEntry(_Quiet):
    """The stale schedule entry, in an engine: see ``_StickySchedule``."""

    rooms = Rooms(redrive=_StickySchedule)


def test_check_one_session_paced_redrive_holds() -> None:
    """With schedule_redrive among the actions, one session holds everything."""
    result = explore(sessions=1, paced_redrive=True)
    assert result.ok
    assert result.complete
    assert result.states > explore(sessions=1).states


def test_check_finds_a_stale_paced_redrive_entry() -> None:
    """The checker reports a schedule entry that outlives a redrive by hand,
    with a short trace that replays."""
    result = explore(sessions=1, paced_redrive=True, engine_factory=StaleScheduleEntry)
    assert result.complete
    (violation,) = result.violations
    assert violation.invariant == "paced_redrive_as_scheduled"
    # Alone, s0 is dead-lettered only past the 3 s refusal bound: a few more steps.
    assert len(violation.trace) <= 16
    assert ("redrive", "s0") in violation.trace
    replayed = replay(violation.trace, engine_factory=StaleScheduleEntry)
    assert replayed.broken == ["paced_redrive_as_scheduled"]


@pytest.mark.slow
def test_check_two_sessions_paced_redrive_holds() -> None:
    """Two sessions with paced redrive among the actions: the whole space holds."""
    result = explore(sessions=2, paced_redrive=True)
    assert result.ok
    assert result.complete


@pytest.mark.slow
def test_check_two_sessions_two_batches_in_flight_holds() -> None:
    """Two sessions with two batches allowed in flight at once: the whole space holds."""
    result = explore(sessions=2, policy=msgspec.structs.replace(CHECK_POLICY, max_in_flight=2))
    assert result.ok
    assert result.complete


@pytest.mark.slow
def test_check_three_sessions_whole_space_holds() -> None:
    """The CLI's default configuration, three sessions: the whole space holds
    (about 1.4 million states; this takes minutes and about 3 GB)."""
    result = explore(sessions=3)
    assert result.ok
    assert result.complete
    assert result.states > 100_000


@pytest.mark.slow
def test_check_two_sessions_free_clock_holds() -> None:
    """Two sessions with a clock that may skip ticks: the whole space holds."""
    result = explore(sessions=2, free_clock=True)
    assert result.ok
    assert result.complete


# --------------------------------------------------------------------------
# Planted flaws are caught, with short traces that replay
# --------------------------------------------------------------------------


@pytest.mark.parametrize("flaw", sorted(FLAWS))
def test_check_catches_planted_flaw(flaw: str) -> None:
    """Each flaw of the motivating review, planted in a copy, is reported with a short trace."""
    factory, invariant = FLAWS[flaw]
    result = _first_violation(factory)
    assert [v.invariant for v in result.violations] == [invariant]
    assert len(result.violations[0].trace) <= 12


@pytest.mark.parametrize("flaw", sorted(FLAWS))
def test_check_trace_replays_to_the_same_violation(flaw: str) -> None:
    """A reported trace, replayed, breaks the same property at its last step,
    and the real engine runs the same trace without breaking anything."""
    factory, invariant = FLAWS[flaw]
    violation = _first_violation(factory).violations[0]
    steps = json.loads(json.dumps([list(a) for a in violation.trace]))  # as from --json
    again = replay(steps, engine_factory=factory)
    assert invariant in again.broken
    assert {index for index, _ in again.violations} == {len(steps) - 1}
    assert replay(steps).violations == []


def test_check_reports_the_shortest_trace() -> None:
    """Breadth-first search finds the shortest counterexample: a bounce charged
    to a session needs exactly enqueue, tick and the RelayUnavailable ack."""
    (violation,) = _first_violation(relay_flap_charged, sessions=1).violations
    assert violation.trace == (
        ("enqueue", "s0", "incremental"),
        ("tick",),
        ("ack", 1, "RelayUnavailable"),
    )


def test_check_finds_liveness_violations() -> None:
    """A link that never resumes strands its sessions: both liveness
    properties fail, though no single step breaks a safety property."""
    result = explore(sessions=1, engine_factory=paused_forever)
    assert sorted(v.invariant for v in result.violations) == [
        "live_lane_served",
        "live_session_can_rest",
    ]
    for violation in result.violations:
        assert ("relay_unavailable",) in violation.trace
        assert replay(violation.trace, engine_factory=paused_forever).violations == []


def test_check_reports_an_exception_as_a_crash() -> None:
    """An engine that raises on a valid call is reported under no_crash."""

    class Crashes(_Quiet):
        def relay_ready(self, now: float) -> None:
            raise RuntimeError("boom")

    result = _first_violation(Crashes, sessions=1)
    assert [v.invariant for v in result.violations] == ["no_crash"]
    assert result.violations[0].trace == (("relay_ready",),)
    assert "RuntimeError: boom" in result.violations[0].message


# --------------------------------------------------------------------------
# Copies and keys: the search's copies behave exactly like the engine, and
# its key knows every field of the engine's view
# --------------------------------------------------------------------------


def test_search_copies_match_deepcopy() -> None:
    """A clone with the search's shared generator, a plain clone, a deep copy and
    a pickled copy of a busy engine stay identical under the same inputs, and the
    original is untouched by any of them."""
    engine = Engine(CHECK_POLICY, rng=random.Random(0), log=False)
    for sid, lane in (("a", "incremental"), ("b", "incremental"), ("c", "backfill")):
        engine.enqueue(sid, lane, now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, {batch.session_ids[0]: acks.RateLimited()}, now=0.0)
    engine.relay_unavailable(0.5)
    before = engine.inspect()
    twins = [
        engine.clone(rng=random.Random(0)),
        engine.clone(),
        copy.deepcopy(engine),
        pickle.loads(pickle.dumps(engine)),
    ]
    for twin in twins:
        assert twin.inspect() == before
        twin.enqueue("a", "incremental", now=1.0)
        twin.enqueue("c", "incremental", now=1.0)
        twin.tick(3.0)
        for open_batch in twin.in_flight():
            twin.on_ack(open_batch.id, acks.Ok(), now=3.0)
        twin.tick(6.0)
        twin.check()
    assert twins[0].inspect() != before
    assert all(twin.inspect() == twins[0].inspect() for twin in twins)
    assert engine.inspect() == before


def test_frozen_frontier_engine_thaws_to_the_same_engine() -> None:
    """An engine frozen in the search frontier thaws into an equal, independent
    engine of the same class that shares the policy instead of a copy of it;
    one that cannot be pickled is kept as it is."""
    rng = random.Random(0)
    engine = _Quiet(CHECK_POLICY).clone(rng=rng)
    engine.enqueue("a", now=0.0)
    engine.enqueue("b", "backfill", now=0.0)
    engine.tick(0.0)
    shared = checker._shared_state(engine, rng)
    assert engine.policy in shared.values()
    frozen = checker._freeze(engine, shared)
    assert isinstance(frozen, checker._Frozen)
    thawed = checker._thaw(frozen)
    assert thawed is not engine
    assert type(thawed) is _Quiet
    assert thawed.policy is engine.policy
    assert thawed.inspect() == engine.inspect()
    thawed.tick(5.0)
    thawed.check()
    assert engine.in_flight() != thawed.in_flight()

    class Unpicklable(_Quiet):
        def __init__(self, policy: Policy) -> None:
            super().__init__(policy)
            # Each copy has its own list (a lambda alone is shared, as a copy shares it).
            self.hooks = [lambda: None]

    odd = Unpicklable(CHECK_POLICY)
    assert checker._freeze(odd, checker._shared_state(odd, rng)) is odd


def _structs_in(struct: type[msgspec.Struct]) -> set[type[msgspec.Struct]]:
    """``struct`` and every struct type its fields hold, however deeply nested."""
    found: set[type[msgspec.Struct]] = set()

    def walk(info: msgspec.inspect.Type) -> None:
        if isinstance(info, msgspec.inspect.StructType):
            if info.cls in found:
                return
            found.add(info.cls)
            for f in info.fields:
                walk(f.type)
            return
        for name in ("type", "key_type", "value_type", "item_type", "item_types", "types"):
            inner = getattr(info, name, None)
            for item in inner if isinstance(inner, tuple) else (inner,):
                if isinstance(item, msgspec.inspect.Type):
                    walk(item)

    walk(msgspec.inspect.type_info(struct))
    return found


def test_check_key_knows_every_field_of_the_engine_view() -> None:
    """Every field of ``Engine.inspect()``'s view, and of every struct in it, is
    either keyed or left out of the state key on purpose; a new field (or a new
    struct) fails here until the key is reviewed."""
    structs = _structs_in(EngineState)
    assert {SessionRecord, LinkRecord} <= structs
    assert set(checker.KEY_FIELDS) == structs
    for struct, fields in checker.KEY_FIELDS.items():
        assert set(fields) == set(struct.__struct_fields__), struct.__name__

    class Grown(msgspec.Struct, frozen=True):
        fresh: int

    widened = msgspec.defstruct(
        "Widened", [("extra", Grown)], bases=(EngineState,), frozen=True, kw_only=True
    )
    assert _structs_in(widened) - set(checker.KEY_FIELDS) == {widened, Grown}


def test_clone_deep_copies_a_subclass_attribute() -> None:
    """An attribute the engine does not know (a subclass's) is deep-copied by
    ``Engine.clone()``, never shared."""

    class Tagged(_Quiet):
        def __init__(self, policy: Policy) -> None:
            super().__init__(policy)
            self.seen: list[str] = []

    engine = Tagged(CHECK_POLICY)
    twin = engine.clone(rng=random.Random(0))
    twin.seen.append("x")
    assert engine.seen == []
    assert type(twin) is Tagged


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def test_cli_check_json_reports_the_space(
    sessionfsm_cli: Callable[..., click.testing.Result],
) -> None:
    """``sessionfsm check --json`` prints one object: states, transitions,
    invariants and an empty list of violations, and exits 0."""
    result = sessionfsm_cli("check", "--sessions", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["states"] == explore(sessions=1).states
    assert report["transitions"] > report["states"]
    assert report["invariants"] == [n for n in INVARIANTS if n not in checker._RELAY_ONLY]
    assert report["violations"] == []
    assert report["complete"] is True


def test_cli_check_text_report(sessionfsm_cli: Callable[..., click.testing.Result]) -> None:
    """The text report names the states, transitions, checks and time."""
    result = sessionfsm_cli("check", "--sessions", "1", "--depth", "3")
    assert result.exit_code == 0, result.output
    for words in ("reachable states", "transitions explored", "invariants checked", "time"):
        assert words in result.output
    assert "up to the depth bound" in result.output


def test_cli_check_loads_a_policy_file(
    sessionfsm_cli: Callable[..., click.testing.Result], tmp_path: Path
) -> None:
    """``--policy FILE`` is read with load_policy and checked instead of the small policy."""
    path = tmp_path / "policy.toml"
    path.write_text(
        "tick_interval_s = 1.0\nack_timeout_s = 2.0\nbatch_size = 1\nmax_relay_refusal_s = 3.0\n"
        "incremental_interval_s = 1.0\n"
        '[ack_timeout]\nthreshold = 1\nbackoff = { type = "fixed", delay_s = 1.0 }\n'
        '[rate_limited]\nthreshold = 1\nbackoff = { type = "fixed", delay_s = 1.0 }\n'
        "[relay_pause]\nbase_s = 1.0\nfactor = 1.0\ncap_s = 1.0\n"
        "[relay_throttle]\nbase_s = 1.0\nfactor = 1.0\ncap_s = 1.0\n",
        encoding="utf-8",
    )
    result = sessionfsm_cli("check", "--sessions", "1", "--policy", str(path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["policy"]["batch_size"] == 1
    assert report["policy"]["rate_limited"]["threshold"] == 1
    assert report["violations"] == []


def test_cli_check_exits_1_and_prints_the_trace_on_a_violation(
    sessionfsm_cli: Callable[..., click.testing.Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A violation makes the command exit 1 and print its trace, replayable as given."""
    monkeypatch.setattr(checker, "_default_factory", relay_flap_charged)
    result = sessionfsm_cli("check", "--sessions", "1", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    names = [v["invariant"] for v in report["violations"]]
    assert "inv4_transport_not_charged" in names
    trace = report["violations"][names.index("inv4_transport_not_charged")]["trace"]
    assert "inv4_transport_not_charged" in replay(trace, engine_factory=relay_flap_charged).broken

    text = sessionfsm_cli("check", "--sessions", "1")
    assert text.exit_code == 1
    assert "inv4_transport_not_charged" in text.output
    assert "assert not replay(" in text.output


def test_cli_check_one_session_passes(
    sessionfsm_cli: Callable[..., click.testing.Result],
) -> None:
    """One session is checked exhaustively from the command line and passes."""
    result = sessionfsm_cli("check", "--sessions", "1")
    assert result.exit_code == 0


def test_cli_check_reports_progress_by_default(
    sessionfsm_cli: Callable[..., click.testing.Result],
) -> None:
    """A plain `sessionfsm check` says what it explores and reports each depth on stderr."""
    result = sessionfsm_cli("check", "--sessions", "1", "--depth", "2")
    assert result.exit_code == 0, result.output
    assert "check: exploring every reachable state with 1 session" in result.stderr
    assert "depth 1:" in result.stderr
    quiet = sessionfsm_cli("check", "--sessions", "1", "--depth", "2", "--no-progress")
    assert quiet.stderr == ""


class _NoSharedFailure(Blame):
    """Before blame: no answer is ever a shared failure, so one failure
    answered for a whole batch is charged to every session in it. The
    engine's own deadline keeps the real rule (in the relay model, which never
    answers AckTimeout, an AckTimeout is always that deadline)."""

    def verdict(
        self,
        answered: int,
        failed: int,
        whole: bool,
        alike: bool,
        failure: acks.Ack,
        past_bound: bool,
    ) -> tuple[bool, bool]:
        if isinstance(failure, acks.AckTimeout):
            return super().verdict(answered, failed, whole, alike, failure, past_bound)
        return False, False


class ChargeEveryone(_Quiet):
    """Before blame: one failure answered for a whole batch is charged to
    every session in it, and every refusal counts (no evidence needed)."""

    rooms = Rooms(blame=_NoSharedFailure)

    def __init__(self, policy: Policy) -> None:
        super().__init__(msgspec.structs.replace(policy, max_relay_refusal_s=0.0))


def test_inv11_inv12_inv13_relay_model_two_sessions_holds() -> None:
    """With the relay model, two sessions: no good session dead-lettered by a
    throttle shorter than the bound, bad ones still die, good ones still sync."""
    result = explore(sessions=2, relay=True)
    assert result.ok, format_result(result)
    assert result.complete
    assert {"blame_good_never_dead", "live_bad_dies", "live_good_syncs"} <= set(result.invariants)
    assert result.states > 1000


@pytest.mark.slow
def test_inv11_inv12_inv13_relay_model_three_sessions_holds() -> None:
    """The relay model with three sessions (slow: opt in with --run-slow)."""
    result = explore(sessions=3, relay=True)
    assert result.ok, format_result(result)


def test_check_catches_a_whole_batch_failure_charged_to_everyone() -> None:
    """The behaviour before blame, planted as a mutant: the relay model
    catches it with a short trace."""
    result = explore(sessions=2, relay=True, engine_factory=ChargeEveryone, stop_at_first=True)
    assert not result.ok
    (violation,) = result.violations
    assert violation.invariant in (
        "inv11_shared_failure_not_charged",
        "inv12_charged_only_on_evidence",
        "blame_good_never_dead",
    )
    assert len(violation.trace) <= 8
    replayed = replay(violation.trace, engine_factory=ChargeEveryone, relay=True)
    assert violation.invariant in replayed.broken


# --------------------------------------------------------------------------
# The invariant registry and Engine.check()'s exception
# --------------------------------------------------------------------------


def test_invariant_registry_numbers_match_the_machine_docstring() -> None:
    """``machine.INVARIANTS`` lists exactly the invariants the docstring numbers, in order."""
    doc = (machine.__doc__ or "").split("Invariants\n----------", 1)[1]
    numbers = [int(n) for n in re.findall(r"^(\d+)\. ", doc, re.M)]
    assert numbers == list(range(1, 14))
    assert list(machine.INVARIANTS) == numbers
    for number, invariant in machine.INVARIANTS.items():
        assert invariant.number == number
        assert invariant.key == f"inv{number}_{invariant.name}"
        assert INVARIANTS[invariant.key] == invariant.sentence


def test_inv3_engine_check_raises_invariant_violation_naming_it() -> None:
    """A dead letter left with another reason's count makes ``Engine.check()`` raise
    ``InvariantViolation`` carrying invariant 3's number and name (still an AssertionError)."""
    engine = stale_counter_after_dead_letter(Policy())
    for sid in ("a", "b"):
        engine.enqueue(sid, now=0.0)
    (batch,) = engine.tick(0.0)
    engine.on_ack(batch.id, {"a": acks.Ok(), "b": acks.AckTimeout()}, now=0.0)
    assert engine.session("b").charges == {"AckTimeout": 1}
    engine.enqueue("c", now=0.0)
    now = 0.0
    while engine.session("b").state is not SessionState.IN_FLIGHT:
        now += 1.0
        engine.tick(now)
    (batch,) = [b for b in engine.in_flight() if "b" in b.session_ids]
    answer = {sid: acks.Ok() for sid in batch.session_ids}
    answer["b"] = acks.PayloadTooLarge()
    engine.on_ack(batch.id, answer, now=now)
    assert engine.session("b").state is SessionState.DEAD_LETTERED
    with pytest.raises(InvariantViolation) as caught:
        engine.check()
    assert (caught.value.number, caught.value.name) == (3, "dead_letter_clean")
    assert caught.value.key == "inv3_dead_letter_clean"
    assert isinstance(caught.value, SessionFSMError)
    assert isinstance(caught.value, AssertionError)
