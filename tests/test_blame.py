"""Charge a session only for its own failure: the issue's table, row by row.

Each test drives the real engine with ``Policy()`` against a relay written
for the purpose (in simulated time: the relay answers as soon as it is
sent a batch), 200 sessions in batches of 10, and asserts what a team that
relies on sessionfsm expects: no valid session dead-lettered, every culprit
dead-lettered, and isolating the culprits costs few extra batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from sessionfsm import Engine, Policy, SessionState, acks
from sessionfsm.engine import Batch

Answer = acks.Ack | dict[str, acks.Ack] | None
Relay = Callable[[Batch, float], Answer]

DEAD = SessionState.DEAD_LETTERED
SYNCED = SessionState.SYNCED
IDS = [f"s{i:03d}" for i in range(200)]


class Outcome:
    """What a run did: the engine at rest, and what was sent."""

    def __init__(self, engine: Engine, batches: int, parts: int, probes: int) -> None:
        self.engine = engine
        self.batches = batches
        #: Batches that were parts of a split batch (isolating a failure).
        self.parts = parts
        self.probes = probes

    def dead(self) -> set[str]:
        return {v.id for v in self.engine.dead_letters()}


def run(relay: Relay, *, policy: Policy | None = None, until: float = 8 * 3600.0) -> Outcome:
    """Enqueue IDS at 0, tick every 5 s and answer each batch at once until idle."""
    engine = Engine(policy if policy is not None else Policy(), log=False)
    for sid in IDS:
        engine.enqueue(sid, now=0.0)
    now = batches = parts = probes = 0
    t = 0.0
    while not engine.idle():
        assert t < until, "never came to rest"
        for batch in engine.tick(t):
            batches += 1
            parts += batch.part
            probes += batch.probe
            answer = relay(batch, t)
            if answer is not None:
                engine.on_ack(batch.id, answer, now=t + 0.5)
        engine.check()
        t += 5.0
        now += 1
    return Outcome(engine, batches, parts, probes)


def isolation_bound(culprits: int, batch_size: int = 10) -> int:
    """Extra batches to isolate ``culprits`` in batches of ``batch_size``:
    each culprit splits at most ceil(log2 n) times, two parts a split."""
    return 2 * culprits * math.ceil(math.log2(batch_size))


def assert_blame(out: Outcome, culprits: set[str], reason: str | None) -> None:
    dead = out.dead()
    assert dead == culprits, f"wrongly dead-lettered: {sorted(dead - culprits)}"
    for view in out.engine.sessions():
        if view.id in culprits:
            assert view.dead_letter_reason == reason
        else:
            assert view.state is SYNCED


def test_inv11_whole_request_413_charges_only_the_oversized() -> None:
    """One 413 for a whole request holding an oversized payload: 0 valid
    sessions dead-lettered, the 4 oversized ones dead, few extra batches."""
    culprits = {"s007", "s060", "s061", "s150"}

    def relay(batch: Batch, now: float) -> Answer:
        if culprits & set(batch.session_ids):
            return acks.PayloadTooLarge()
        return acks.Ok()

    out = run(relay)
    assert_blame(out, culprits, "PayloadTooLarge")
    assert out.parts <= isolation_bound(len(culprits))


def test_inv11_whole_request_429_without_retry_after_charges_only_the_culprits() -> None:
    """One 429 (no Retry-After) for a request holding the incident's culprit:
    the 3 culprits die at their 5th RateLimited, nobody else."""
    culprits = {"s000", "s055", "s101"}

    def relay(batch: Batch, now: float) -> Answer:
        if culprits & set(batch.session_ids):
            return acks.RateLimited()
        return acks.Ok()

    out = run(relay)
    assert_blame(out, culprits, "RateLimited")
    assert out.parts <= isolation_bound(len(culprits))


def test_inv11_whole_batch_silence_charges_only_the_slow_upload() -> None:
    """A batch holding a 40 MiB upload is never answered: only the 2 slow
    sessions are dead-lettered (AckTimeout), after few extra batches."""
    culprits = {"s030", "s120"}

    def relay(batch: Batch, now: float) -> Answer:
        return None if culprits & set(batch.session_ids) else acks.Ok()

    out = run(relay)
    assert_blame(out, culprits, "AckTimeout")
    assert out.parts <= isolation_bound(len(culprits))


def test_inv13_per_session_throttle_for_an_hour_charges_nobody() -> None:
    """Every session RateLimited (per session) for an hour: nobody is
    dead-lettered, everyone syncs, and the relay sees one probe per wait."""

    def relay(batch: Batch, now: float) -> Answer:
        ack: acks.Ack = acks.RateLimited() if now < 3600.0 else acks.Ok()
        return dict.fromkeys(batch.session_ids, ack)

    out = run(relay)
    assert_blame(out, set(), None)
    # One probe per wait: the waits grow to relay_throttle's cap (300 s).
    assert out.probes <= 3600 / 10 + 1


def test_inv13_whole_request_429_with_retry_after_for_an_hour_charges_nobody() -> None:
    """One 429 with Retry-After 20 s for every request for an hour: nobody
    dead-lettered, and at most one batch per wait reaches the relay."""
    during = 0

    def relay(batch: Batch, now: float) -> Answer:
        nonlocal during
        if now < 3600.0:
            during += 1
            return acks.RateLimited(retry_after_s=20.0)
        return acks.Ok()

    out = run(relay)
    assert_blame(out, set(), None)
    # The first refusal, then one probe per 20 s wait (the link honours it).
    assert during <= 3600 / 20 + 1


def test_inv12_a_lone_culprit_with_nothing_else_to_send_dies_at_the_bound() -> None:
    """The limit: a session alone with a relay that refuses it looks like a
    throttle, so it is charged only past max_relay_refusal_s."""
    policy = Policy(max_relay_refusal_s=3600.0)
    engine = Engine(policy, log=False)
    engine.enqueue("big", now=0.0)
    t = 0.0
    refusals = 0
    while engine.state("big") is not DEAD:
        for batch in engine.tick(t):
            refusals += 1
            engine.on_ack(batch.id, acks.RateLimited(), now=t)
        t += 5.0
        assert t < 3 * 3600.0
    # Nothing was charged before the bound: the last 5 refusals were.
    assert t >= 3600.0
    assert refusals > 5


def test_inv12_the_incident_culprit_is_charged_when_others_get_through() -> None:
    """A session refused while another in the same answer got Ok is charged,
    and dies at its 5th RateLimited; a charged session is sent alone."""
    engine = Engine(Policy(incremental_interval_s=0.0), log=False)
    sizes: list[int] = []
    n = 0
    t = 0.0
    while engine.state("big") is not DEAD if "big" in engine else True:
        engine.enqueue("big" if n == 0 else f"ok{n}", now=t)
        engine.enqueue(f"ok{n}b", now=t)
        n += 1
        for batch in engine.tick(t):
            sizes.append(len(batch.session_ids))
            engine.on_ack(
                batch.id,
                {
                    sid: acks.RateLimited() if sid == "big" else acks.Ok()
                    for sid in batch.session_ids
                },
                now=t,
            )
        t += 5.0
        assert t < 3600.0
    view = engine.session("big")
    assert view.dead_letter_reason == "RateLimited"
    assert view.attempts == 5


def test_inv13_a_whole_request_413_on_a_probe_reopens_the_link() -> None:
    """A probe answered with one 413 shows the relay is answering: the link
    reopens and the batch is split, instead of the throttle growing longer."""
    engine = Engine(Policy(batch_size=4, incremental_interval_s=0.0), log=False)
    for sid in ("a", "b", "c", "d"):
        engine.enqueue(sid, now=0.0)
    (first,) = engine.tick(0.0)
    engine.on_ack(first.id, acks.RateLimited(retry_after_s=1.0), now=0.0)
    assert engine.link.state.value == "throttled"
    (probe,) = engine.tick(1.0)
    assert probe.probe
    engine.on_ack(probe.id, acks.PayloadTooLarge(), now=1.0)
    assert engine.link.state.value == "up"
    assert all(engine.session(s).charges == {} for s in "abcd")  # shared: nobody charged
    parts = engine.tick(1.0)
    assert parts
    assert all(b.part for b in parts)
    assert parts[0].session_ids == ("a", "b")
