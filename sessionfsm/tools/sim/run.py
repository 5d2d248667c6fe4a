"""Running a scenario against a policy, and the figures that come out.

:class:`Simulation` builds the :class:`~sessionfsm.sim.relay.World`, drives
a real :class:`~sessionfsm.Engine` (with whatever store you give it) against
the :class:`~sessionfsm.sim.relay.SimRelay` through
:class:`~sessionfsm.runner.SyncRunner`, which ticks on the same rule as the
asyncio runner, and reports :class:`Figures`. Everything is seeded: the same
scenario, policy and seed give the same figures.

:func:`sweep` runs one scenario under a grid of ``RateLimited`` thresholds
and backoffs, in memory, and returns one :class:`SweepRow` per policy.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import msgspec

from sessionfsm._errors import UsageError
from sessionfsm.engine import Batch, Engine
from sessionfsm.machine import SessionState
from sessionfsm.policy import Backoff, Exponential, Fixed, Policy, ReasonPolicy
from sessionfsm.runner import SyncRunner
from sessionfsm.store import Store
from sessionfsm.testing import FakeClock
from sessionfsm.tools.sim.logs import LogCounter
from sessionfsm.tools.sim.relay import SimRelay, World
from sessionfsm.tools.sim.scenario import Scenario

__all__ = [
    "Figures",
    "LogLines",
    "SessionFate",
    "SimResult",
    "Simulation",
    "SweepRow",
    "backoff_label",
    "describe_policy",
    "parse_backoff",
    "sweep",
]

#: How many sessions the figures list by name, at most.
_LISTED = 20

Progress = Callable[[float, int, int], object]


class SessionFate(msgspec.Struct, frozen=True):
    """What became of one session."""

    id: str
    size_bytes: int
    valid: bool
    state: str
    dead_letter_reason: str | None
    sends: int
    #: Answers by ack type (``lost``: the answer never came).
    answers: dict[str, int]
    log_lines: int | None
    log_lines_after_dead_letter: int | None


class LogLines(msgspec.Struct, frozen=True):
    """The engine's log lines (info and above), per session."""

    mean: float
    max: int
    max_session: str | None
    total: int
    #: Lines about no one session (link pauses, batch timeouts).
    about_no_session: int
    #: Lines about a session after it was dead-lettered: should be 0.
    after_dead_letter: int


class Figures(msgspec.Struct, frozen=True):
    """The outcome of one simulation. ``--json`` prints exactly this."""

    scenario: str
    seed: int
    policy: str
    sessions: int
    #: Sessions a healthy relay would accept (their final payload fits).
    valid: int
    synced: int
    #: Dead letters by reason.
    dead_lettered: dict[str, int]
    #: Valid sessions that ended dead-lettered: the number to keep at 0.
    wrongly_dead_lettered: int
    wrongly_dead_lettered_ids: list[str]
    #: Session sends (a batch of 10 is 10 attempts) and batches.
    attempts: int
    batches: int
    #: Session sends not answered ``Ok``: refused, bounced or unanswered.
    wasted_sends: int
    #: Batches sent as parts of a split batch, to find which session failed it.
    isolation_batches: int
    #: Batches the relay received while it was throttling everyone.
    throttled_batches: int
    wasted_by_answer: dict[str, int]
    drained: bool
    #: Simulated seconds until every session was at rest and no input was
    #: left; None if the scenario's ``max_time_s`` ran out first.
    drain_time_s: float | None
    log_lines_per_session: LogLines | None
    #: Synced sessions whose stored payload is not the latest: should be 0.
    lost_updates: int
    #: The sessions no relay would accept, and what became of them.
    invalid_sessions: list[SessionFate]
    #: Inputs the engine ignored or clamped (late acks, ...).
    anomalies: dict[str, int]


class SimResult(msgspec.Struct):
    """Figures, plus the timeline of state counts for plotting."""

    figures: Figures
    #: (simulated time, {state: count}) at every tick where a count changed.
    timeline: list[tuple[float, dict[str, int]]]
    #: What the scenario did to the relay: (what, from, to) in simulated
    #: seconds, e.g. ("flap: RelayUnavailable", 60.0, 85.0), ("throttle", ...).
    incidents: list[tuple[str, float, float]] = msgspec.field(default_factory=list)


def describe_policy(policy: Policy) -> str:
    """One line: each charged reason's threshold and backoff."""
    parts = []
    for name, rp in (("RateLimited", policy.rate_limited), ("AckTimeout", policy.ack_timeout)):
        hint = ", honours retry_after" if rp.honour_retry_after else ""
        parts.append(f"{name} {rp.threshold} x {rp.backoff.describe()}{hint}")
    return "; ".join(parts)


class Simulation:
    """One scenario, one policy, one seed.

    You pass the scenario and optionally a ``policy`` (the default
    :class:`Policy`), a ``seed`` (the scenario's by default), a ``store`` for
    the engine (it must be empty; you close it), and a ``log_counter`` that
    your structlog configuration runs (see :class:`LogCounter`) for the log
    figures. ``log=False`` turns the engine's logging off (faster).
    """

    def __init__(
        self,
        scenario: Scenario,
        policy: Policy | None = None,
        *,
        seed: int | None = None,
        store: Store | None = None,
        log: bool = True,
        log_counter: LogCounter | None = None,
    ) -> None:
        self.scenario = scenario
        self.policy = policy if policy is not None else Policy()
        self.seed = scenario.seed if seed is None else seed
        self.log_counter = log_counter if log else None
        timeout = self.policy.ack_timeout_s
        self.world = World(scenario, random.Random(f"{self.seed}:world"), timeout)
        self.relay = SimRelay(
            scenario.relay, self.world, random.Random(f"{self.seed}:relay"), timeout
        )
        self.engine = Engine(
            self.policy, store=store, rng=random.Random(f"{self.seed}:engine"), log=log
        )
        if len(self.engine):
            raise UsageError(
                f"the store already holds {len(self.engine)} sessions; a simulation needs an "
                "empty one"
            )
        self.clock = FakeClock(self.engine.now)
        self.timeline: list[tuple[float, dict[str, int]]] = []

    def run(self, progress: Progress | None = None) -> SimResult:
        """Run to the end; ``progress(now, at_rest, total)`` is called every tick."""
        engine, world, scenario = self.engine, self.world, self.scenario
        runner = SyncRunner(engine, self.relay, self.clock)
        start = self.clock.now
        if self.log_counter is not None:
            self.log_counter.reset()

        for session in world.sessions.values():
            runner.at(start + session.arrive_at, self._arrival(session.id))
            for at in world.changes[session.id]:
                runner.at(start + at, self._change(session.id))
        for flap in scenario.relay.flaps:
            if flap.reported:
                runner.at(start + flap.at_s, engine.relay_unavailable, essential=False)
                runner.at(start + flap.at_s + flap.for_s, engine.relay_ready, essential=False)

        total = len(world)
        last: dict[str, int] = {}

        def on_tick(now: float, batches: list[Batch]) -> None:
            counts = {state.value: n for state, n in engine.sessions_by_state().items()}
            if counts != last:
                last.clear()
                last.update(counts)
                self.timeline.append((now - start, counts))
            if progress is not None:
                progress(now - start, counts["synced"] + counts["dead_lettered"], total)

        runner.on_tick = on_tick
        drained = True
        try:
            end = runner.run_until_idle(max_seconds=scenario.max_time_s)
        except TimeoutError:
            drained = False
            end = self.clock.now
        counts = {state.value: n for state, n in engine.sessions_by_state().items()}
        self.timeline.append((end - start, counts))
        relay = scenario.relay
        incidents = [
            (f"flap: {flap.answer}", float(flap.at_s), float(flap.at_s + flap.for_s))
            for flap in relay.flaps
        ] + [
            ("throttle", float(throttle.at_s), float(throttle.at_s + throttle.for_s))
            for throttle in relay.throttles
        ]
        return SimResult(
            figures=self._figures(drained, end - start),
            timeline=self.timeline,
            incidents=sorted(incidents, key=lambda incident: incident[1]),
        )

    def _arrival(self, session_id: str) -> Callable[[float], None]:
        lane = self.world.sessions[session_id].lane

        def arrive(now: float) -> None:
            self.engine.enqueue(session_id, lane, now=now)

        return arrive

    def _change(self, session_id: str) -> Callable[[float], None]:
        def change(now: float) -> None:
            session = self.world.change(session_id)
            self.engine.enqueue(session_id, session.lane, now=now)

        return change

    def _figures(self, drained: bool, elapsed: float) -> Figures:
        engine, world, counter = self.engine, self.world, self.log_counter
        dead: Counter[str] = Counter()
        wrongly: list[str] = []
        invalid: list[SessionFate] = []
        synced = lost_updates = attempts = 0
        wasted: Counter[str] = Counter()
        for view in engine.sessions():
            session = world.sessions[view.id]
            attempts += session.sends
            for kind, n in session.answers.items():
                if kind != "Ok":
                    wasted[kind] += n
            if view.state is SessionState.SYNCED:
                synced += 1
                if session.stored != session.version:
                    lost_updates += 1
            elif view.state is SessionState.DEAD_LETTERED:
                dead[view.dead_letter_reason or "?"] += 1
                if session.valid:
                    wrongly.append(view.id)
            if not session.valid and len(invalid) < _LISTED:
                invalid.append(
                    SessionFate(
                        id=view.id,
                        size_bytes=session.size,
                        valid=False,
                        state=view.state.value,
                        dead_letter_reason=view.dead_letter_reason,
                        sends=session.sends,
                        answers=dict(sorted(session.answers.items())),
                        log_lines=counter.per_session[view.id] if counter else None,
                        log_lines_after_dead_letter=(
                            counter.after_dead_letter[view.id] if counter else None
                        ),
                    )
                )
        lines: LogLines | None = None
        if counter is not None:
            busiest = max(world.sessions, key=lambda sid: counter.per_session[sid], default=None)
            lines = LogLines(
                mean=round(sum(counter.per_session[sid] for sid in world.sessions) / len(world), 3),
                max=counter.per_session[busiest] if busiest is not None else 0,
                max_session=busiest,
                total=counter.total,
                about_no_session=counter.other,
                after_dead_letter=sum(counter.after_dead_letter.values()),
            )
        return Figures(
            scenario=self.scenario.name,
            seed=self.seed,
            policy=describe_policy(self.policy),
            sessions=len(world),
            valid=sum(s.valid for s in world.sessions.values()),
            synced=synced,
            dead_lettered=dict(sorted(dead.items())),
            wrongly_dead_lettered=len(wrongly),
            wrongly_dead_lettered_ids=wrongly[:_LISTED],
            attempts=attempts,
            batches=self.relay.batches,
            wasted_sends=sum(wasted.values()),
            isolation_batches=self.relay.part_batches,
            throttled_batches=self.relay.throttled_batches,
            wasted_by_answer=dict(sorted(wasted.items())),
            drained=drained,
            drain_time_s=round(elapsed, 3) if drained else None,
            log_lines_per_session=lines,
            lost_updates=lost_updates,
            invalid_sessions=invalid,
            anomalies=dict(sorted(engine.anomalies.items())),
        )


class SweepRow(msgspec.Struct, frozen=True):
    """One policy of a sweep and what it cost."""

    threshold: int
    #: See :func:`backoff_label`.
    backoff: str
    wrongly_dead_lettered: int
    dead_lettered: int
    wasted_sends: int
    attempts: int
    batches: int
    isolation_batches: int
    throttled_batches: int
    drained: bool
    drain_time_s: float | None


#: The default grid: the incident's 5 x 30 s, and around it.
DEFAULT_THRESHOLDS: tuple[int, ...] = (3, 5, 8, 12)
DEFAULT_BACKOFFS: tuple[str, ...] = ("fixed:10", "fixed:30", "fixed:60", "exp:5:300")


def backoff_label(backoff: Backoff) -> str:
    """A short name for a backoff: ``30 s``, or ``exp 5-300 s`` (jittered)."""
    if isinstance(backoff, Fixed):
        return f"{backoff.delay_s:g} s"
    jitter = "" if backoff.jitter else ", no jitter"
    factor = "" if backoff.factor == 2.0 else f" x{backoff.factor:g}"
    return f"exp{factor} {backoff.base_s:g}-{backoff.cap_s:g} s{jitter}"


def parse_backoff(text: str) -> Backoff:
    """``fixed:SECONDS`` or ``exp:BASE:CAP`` (doubling, full jitter)."""
    kind, _, rest = text.strip().partition(":")
    try:
        numbers = [float(part) for part in rest.split(":")] if rest else []
    except ValueError:
        numbers = []
    if kind == "fixed" and len(numbers) == 1:
        return Fixed(delay_s=numbers[0])
    if kind in ("exp", "exponential") and len(numbers) == 2:
        return Exponential(base_s=numbers[0], factor=2.0, cap_s=numbers[1], jitter=True)
    raise UsageError(f"backoff must be fixed:SECONDS or exp:BASE:CAP, got {text!r}")


def sweep(
    scenario: Scenario,
    policy: Policy | None = None,
    *,
    thresholds: Sequence[int] = DEFAULT_THRESHOLDS,
    backoffs: Iterable[str | Backoff] = DEFAULT_BACKOFFS,
    seed: int | None = None,
    progress: Callable[[int, int], object] | None = None,
) -> list[SweepRow]:
    """Run ``scenario`` once per (``RateLimited`` threshold, backoff), in memory.

    Everything else comes from ``policy``. Runs use no store and no logging,
    so they are fast; the figures are the same as with a store.
    """
    base = policy if policy is not None else Policy()
    grid = [
        (threshold, parse_backoff(b) if isinstance(b, str) else b)
        for threshold in thresholds
        for b in backoffs
    ]
    rows: list[SweepRow] = []
    for done, (threshold, backoff) in enumerate(grid):
        rp = base.rate_limited
        # Built anew rather than replaced, so the threshold is validated.
        reason = ReasonPolicy(
            threshold=threshold,
            backoff=backoff,
            honour_retry_after=rp.honour_retry_after,
            retry_after_cap_s=rp.retry_after_cap_s,
            retryable=rp.retryable,
        )
        candidate = msgspec.structs.replace(base, rate_limited=reason)
        figures = Simulation(scenario, candidate, seed=seed, log=False).run().figures
        rows.append(
            SweepRow(
                threshold=threshold,
                backoff=backoff_label(backoff),
                wrongly_dead_lettered=figures.wrongly_dead_lettered,
                dead_lettered=sum(figures.dead_lettered.values()),
                wasted_sends=figures.wasted_sends,
                attempts=figures.attempts,
                batches=figures.batches,
                isolation_batches=figures.isolation_batches,
                throttled_batches=figures.throttled_batches,
                drained=figures.drained,
                drain_time_s=figures.drain_time_s,
            )
        )
        if progress is not None:
            progress(done + 1, len(grid))
    return rows
