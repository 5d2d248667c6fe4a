"""The engine's rooms: the public seam through which a test plants a flaw, and
``Engine.clone()`` copying room by room."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sessionfsm import Engine, Exponential, Lane, Policy, SessionState, UsageError, acks
from sessionfsm.rooms import Blame, Lanes, PacedRedrive, Rooms


class _BackfillFirst(Lanes):
    """A deliberately different choice of lane: backfill before incremental."""

    def pick(self, now: float) -> Lane | None:
        for lane in (Lane.BACKFILL, Lane.INCREMENTAL):
            if self.is_open(lane, now) and self.has_ready(lane):
                return lane
        return None


def _two_lanes(engine: Engine) -> Engine:
    engine.enqueue("inc", "incremental", now=0.0)
    engine.enqueue("back", "backfill", now=0.0)
    return engine


def test_a_room_passed_in_rooms_is_the_one_the_engine_uses() -> None:
    """``Engine(rooms=Rooms(lanes=...))`` replaces the choice of lane, and only it."""
    real = _two_lanes(Engine(log=False))
    flawed = _two_lanes(Engine(log=False, rooms=Rooms(lanes=_BackfillFirst)))
    assert [b.lane for b in real.tick(0.0)] == [Lane.INCREMENTAL]
    assert [b.lane for b in flawed.tick(0.0)] == [Lane.BACKFILL]


def test_a_clone_keeps_the_rooms_it_was_given() -> None:
    """A clone of an engine with a planted room carries the same room class."""
    flawed = _two_lanes(Engine(log=False, rooms=Rooms(lanes=_BackfillFirst)))
    twin = flawed.clone()
    assert [b.lane for b in twin.tick(0.0)] == [Lane.BACKFILL]


@pytest.mark.parametrize(
    "bad",
    [
        {"lanes": Blame},
        {"blame": Lanes},
        {"redrive": object},
        {"journal": "journal"},
    ],
)
def test_rooms_takes_only_subclasses_of_the_real_rooms(bad: dict[str, Any]) -> None:
    """A room that is not a subclass of the real one is a UsageError naming it."""
    (name,) = bad
    with pytest.raises(UsageError, match=f"Rooms\\({name}=...\\)"):
        Rooms(**bad)


def test_engine_rooms_must_be_a_rooms() -> None:
    """``Engine(rooms=...)`` takes a Rooms, not a bare class."""
    with pytest.raises(UsageError, match="rooms must be"):
        Engine(log=False, rooms=PacedRedrive)  # type: ignore[arg-type]


def _jittered() -> Policy:
    return Policy(relay_pause=Exponential(base_s=1.0, factor=2.0, cap_s=60.0, jitter=True))


def test_a_clone_draws_the_same_jitter_from_its_own_rng() -> None:
    """With a jittered policy the clone copies the random generator: fed the same
    calls, it draws exactly what the original draws, and neither disturbs the other."""
    engine = Engine(_jittered(), rng=random.Random(7), log=False)
    engine.relay_unavailable(0.0)
    engine.relay_ready(1.0)
    twin = engine.clone()
    engine.relay_unavailable(2.0)
    twin.relay_unavailable(2.0)
    drawn = engine.link.resume_at
    assert drawn is not None
    assert 2.0 < drawn < 4.0
    # Had they shared one generator, the twin would have drawn the next number.
    assert twin.link.resume_at == drawn


def test_a_clone_of_a_reference_engine_is_independent() -> None:
    """The reference runtime (one python-statemachine per record) clones too:
    the copy starts equal and diverges only by its own calls."""
    engine = Engine(Policy(batch_size=2), log=False, runtime="reference")
    engine.enqueue("a", now=0.0)
    engine.enqueue("b", now=0.0)
    (batch,) = engine.tick(0.0)
    before = engine.inspect()
    twin = engine.clone()
    assert twin.inspect() == before
    twin.on_ack(batch.id, acks.Ok(), now=1.0)
    twin.check()
    assert twin.state("a") is SessionState.SYNCED
    assert engine.state("a") is SessionState.IN_FLIGHT
    assert engine.inspect() == before


def test_a_clone_of_a_subclass_copies_its_own_attributes() -> None:
    """An attribute a subclass of the engine adds is deep-copied, never shared."""

    class Tagged(Engine):
        def __init__(self) -> None:
            super().__init__(log=False)
            self.seen: list[str] = []

    engine = Tagged()
    twin = engine.clone()
    twin.seen.append("x")
    assert type(twin) is Tagged
    assert engine.seen == []
