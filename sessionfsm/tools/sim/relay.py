"""The simulated relay and the sessions it is sent.

:class:`World` holds every simulated session: its payload size and version
now, the version the relay has stored, and every answer it got.
:class:`SimRelay` answers batches as the scenario says, from a seeded RNG, in
simulated time; it implements :class:`sessionfsm.runner.SyncRelay`.

Per session, the relay answers in this order: oversized payloads get the
scenario's ``oversize_ack`` (``RateLimited`` in the incident); during a
throttle everyone gets ``RateLimited``; an empty token bucket gives
``RateLimited`` with the time until the next token; anything else is
stored and answered ``Ok``. During a flap the whole batch gets the flap's
answer instead, and a lost answer never arrives (what the relay accepted is
still stored).

Before any of that, a batch too slow to upload within the engine's ack
timeout is never answered, and a batch above the request body limit gets
one ``PayloadTooLarge`` for the whole request. A ``per-request`` relay
answers the whole batch with the first refusal any session of it would get
(one 429 during a throttle, with or without ``retry_after_s``), storing
nothing, or ``Ok`` for all.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from sessionfsm import acks
from sessionfsm.engine import Batch
from sessionfsm.machine import Lane
from sessionfsm.runner import Reply
from sessionfsm.tools.sim.scenario import Flap, RateLimit, RelaySpec, Scenario, Throttle

__all__ = ["SimRelay", "SimSession", "World"]


@dataclass(slots=True)
class SimSession:
    """One simulated session, as the simulator knows it."""

    id: str
    lane: Lane
    arrive_at: float
    size: int
    #: The size after its last scheduled change: what decides validity.
    final_size: int
    #: Valid: a healthy relay would accept its final payload.
    valid: bool
    #: The payload version now (1 on arrival, +1 per change).
    version: int = 1
    #: The version the relay stored last (0: none).
    stored: int = 0
    #: Times it was in a batch the relay received.
    sends: int = 0
    #: Answers it got, by ack type name; ``lost`` for a lost answer.
    answers: Counter[str] = field(default_factory=Counter)


class World:
    """Every session of a scenario, built deterministically from a seed."""

    def __init__(
        self, scenario: Scenario, rng: random.Random, ack_timeout_s: float | None = None
    ) -> None:
        relay = scenario.relay
        limit = relay.size_limit_bytes
        if relay.body_limit_bytes is not None:
            limit = min(limit, relay.body_limit_bytes)
        if relay.upload_bytes_per_s is not None and ack_timeout_s is not None:
            # Alone in a batch, it must upload and be answered in time.
            room = (ack_timeout_s - relay.latency_s - relay.latency_jitter_s) * (
                relay.upload_bytes_per_s
            )
            limit = min(limit, max(0, int(room) - 1))
        self.sessions: dict[str, SimSession] = {}
        #: Per session, the times it changes after arriving.
        self.changes: dict[str, list[float]] = {}
        self.grow: dict[str, int] = {}
        for group in scenario.sessions:
            width = max(4, len(str(group.count)))
            for i in range(group.count):
                sid = f"{group.name}-{i + 1:0{width}d}"
                if isinstance(group.size_bytes, tuple):
                    size = rng.randint(group.size_bytes[0], group.size_bytes[1])
                else:
                    size = group.size_bytes
                arrive = group.arrive_at_s
                if group.arrive_over_s and i:
                    arrive += rng.uniform(0.0, group.arrive_over_s)
                final = size + group.changes * group.grow_bytes
                self.sessions[sid] = SimSession(
                    id=sid,
                    lane=group.lane,
                    arrive_at=arrive,
                    size=size,
                    final_size=final,
                    valid=final <= limit,
                )
                self.changes[sid] = [
                    arrive + k * group.change_every_s for k in range(1, group.changes + 1)
                ]
                self.grow[sid] = group.grow_bytes

    def __len__(self) -> int:
        return len(self.sessions)

    def change(self, session_id: str) -> SimSession:
        """The session changed locally: a new payload version."""
        session = self.sessions[session_id]
        session.version += 1
        session.size += self.grow[session_id]
        return session


class _Bucket:
    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, spec: RateLimit) -> None:
        self.rate = spec.sessions_per_s
        self.burst = float(spec.burst)
        self.tokens = self.burst
        self.at = 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = max(self.at, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def take_all(self, now: float, n: int) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = max(self.at, now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def wait(self) -> float:
        return (1.0 - self.tokens) / self.rate


def _active(periods: tuple[Flap, ...] | tuple[Throttle, ...], now: float) -> Flap | Throttle | None:
    for period in periods:
        if period.at_s <= now < period.at_s + period.for_s:
            return period
    return None


class SimRelay:
    """A relay in simulated time. It implements ``SyncRelay.answer``."""

    def __init__(
        self,
        spec: RelaySpec,
        world: World,
        rng: random.Random,
        ack_timeout_s: float = math.inf,
    ) -> None:
        self.spec = spec
        self.world = world
        self._rng = rng
        self._ack_timeout_s = ack_timeout_s
        #: Batches sent as parts of a split batch (isolating a failure).
        self.part_batches = 0
        #: Batches received while a throttle was on.
        self.throttled_batches = 0
        self._bucket = _Bucket(spec.rate_limit) if spec.rate_limit is not None else None
        oversize: acks.Ack = (
            acks.RateLimited() if spec.oversize_ack == "RateLimited" else acks.PayloadTooLarge()
        )
        self._oversize = oversize
        #: Batches received.
        self.batches = 0

    def flap_at(self, now: float) -> Flap | None:
        """The flap in progress at ``now``, if any."""
        flap = _active(self.spec.flaps, now)
        assert flap is None or isinstance(flap, Flap)
        return flap

    def answer(self, batch: Batch, now: float) -> Reply | None:
        spec, sessions = self.spec, self.world.sessions
        self.batches += 1
        delay = spec.latency_s
        if spec.latency_jitter_s:
            delay += self._rng.uniform(0.0, spec.latency_jitter_s)
        for sid in batch.session_ids:
            sessions[sid].sends += 1
        if batch.part:
            self.part_batches += 1
        flap = self.flap_at(now)
        if flap is not None:
            if flap.answer == "lost":
                self._tally(batch, "lost")
                return None
            ack: acks.Ack = (
                acks.RelayUnavailable() if flap.answer == "RelayUnavailable" else acks.RateLimited()
            )
            self._tally(batch, flap.answer)
            return Reply(ack, delay)
        throttle = _active(spec.throttles, now)
        if throttle is not None:
            self.throttled_batches += 1
        total = sum(sessions[sid].size for sid in batch.session_ids)
        if spec.upload_bytes_per_s is not None:
            delay += total / spec.upload_bytes_per_s
            if delay >= self._ack_timeout_s:
                # The client gives up before the upload ends: nothing stored.
                self._tally(batch, "lost")
                return None
        if spec.body_limit_bytes is not None and total > spec.body_limit_bytes:
            self._tally(batch, "PayloadTooLarge")
            return Reply(acks.PayloadTooLarge(), delay)
        if spec.answers == "per-request":
            return self._answer_request(batch, now, throttle, delay)
        limit, bucket = spec.size_limit_bytes, self._bucket
        per: dict[str, acks.Ack] = {}
        for sid in batch.session_ids:
            session = sessions[sid]
            if session.size > limit:
                per[sid] = self._oversize
            elif isinstance(throttle, Throttle):
                per[sid] = acks.RateLimited(retry_after_s=throttle.retry_after_s)
            elif bucket is not None and not bucket.take(now):
                hint = bucket.wait() if spec.rate_limit and spec.rate_limit.retry_after else None
                per[sid] = acks.RateLimited(retry_after_s=hint)
            else:
                # Stored when received; the answer may still be lost below.
                session.stored = session.version
                per[sid] = acks.Ok()
        if spec.ack_loss and self._rng.random() < spec.ack_loss:
            self._tally(batch, "lost")
            return None
        for sid, ack in per.items():
            sessions[sid].answers[type(ack).__name__] += 1
        return Reply(per, delay)

    def _answer_request(
        self, batch: Batch, now: float, throttle: Flap | Throttle | None, delay: float
    ) -> Reply | None:
        """One answer for the whole request, as an HTTP relay gives."""
        spec, sessions = self.spec, self.world.sessions
        ack: acks.Ack | None = None
        if any(sessions[sid].size > spec.size_limit_bytes for sid in batch.session_ids):
            ack = self._oversize
        elif isinstance(throttle, Throttle):
            ack = acks.RateLimited(retry_after_s=throttle.retry_after_s)
        elif self._bucket is not None and not self._bucket.take_all(now, len(batch.session_ids)):
            hint = self._bucket.wait() if spec.rate_limit and spec.rate_limit.retry_after else None
            ack = acks.RateLimited(retry_after_s=hint)
        if ack is None:
            for sid in batch.session_ids:
                sessions[sid].stored = sessions[sid].version
            ack = acks.Ok()
        if spec.ack_loss and self._rng.random() < spec.ack_loss:
            self._tally(batch, "lost")
            return None
        self._tally(batch, type(ack).__name__)
        return Reply(ack, delay)

    def _tally(self, batch: Batch, kind: str) -> None:
        sessions = self.world.sessions
        for sid in batch.session_ids:
            sessions[sid].answers[kind] += 1
