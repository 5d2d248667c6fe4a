"""Scenario files: what the simulated relay does, and which sessions it sees.

A scenario is a TOML or JSON file validated with msgspec. Unknown keys and
out-of-range values are refused with :class:`ScenarioError`, which names the
file and the field (``$.relay.flaps[0].for_s``). Named scenarios ship with
the package in ``sessionfsm/tools/sim/scenarios/``; :func:`load_scenario` takes either
a name or a path.

A minimal file::

    description = "a healthy relay"

    [[sessions]]
    name = "s"
    count = 20
    size_bytes = 200_000
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from sessionfsm._errors import UsageError
from sessionfsm.machine import Lane

__all__ = [
    "Flap",
    "RateLimit",
    "RelaySpec",
    "Scenario",
    "ScenarioError",
    "SessionGroup",
    "Throttle",
    "load_scenario",
    "scenario_names",
]

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Bytes = Annotated[int, msgspec.Meta(ge=0)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]


class ScenarioError(UsageError):
    """A scenario file is missing, unreadable or invalid."""


class _Spec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class SessionGroup(_Spec, frozen=True):
    """``count`` sessions named ``{name}-0001``... that behave alike."""

    #: Prefix of the session ids; unique within the scenario.
    name: Annotated[str, msgspec.Meta(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    count: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1
    lane: Lane = Lane.INCREMENTAL
    #: Payload size: one number, or ``[min, max]`` drawn uniformly per session.
    # Not ``Bytes | tuple[Bytes, Bytes]``: msgspec 0.22 mis-decodes a fixed
    # tuple of constrained ints inside a union, so the range is checked below.
    size_bytes: int | tuple[int, int] = 100_000
    #: The first session arrives at this time...
    arrive_at_s: NonNeg = 0.0
    #: ...and the rest spread uniformly (seeded) over this window.
    arrive_over_s: NonNeg = 0.0
    #: How often each session changes after it arrives (0: never). A change
    #: re-enqueues it: a session in flight must be sent again.
    changes: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0
    change_every_s: Positive = 30.0
    #: Each change grows the payload by this much (it may outgrow the limit).
    grow_bytes: Bytes = 0

    def __post_init__(self) -> None:
        sizes = self.size_bytes if isinstance(self.size_bytes, tuple) else (self.size_bytes,)
        if min(sizes) < 0:
            raise ValueError(f"size_bytes must be >= 0, got {self.size_bytes!r}")
        if len(sizes) == 2 and sizes[0] > sizes[1]:
            raise ValueError(f"size_bytes range must be [min, max], got {list(sizes)}")


class Flap(_Spec, frozen=True):
    """The relay is disconnected (or not ready) from ``at_s`` for ``for_s``."""

    at_s: NonNeg
    for_s: Positive
    #: What a send gets meanwhile: ``RelayUnavailable`` (a transport that
    #: tells the truth), ``RateLimited`` (the transport of the incident, which
    #: said rate_limited when merely disconnected) or ``lost`` (no answer).
    answer: Literal["RelayUnavailable", "RateLimited", "lost"] = "RelayUnavailable"
    #: The transport also reports the disconnect and the reconnect, so the
    #: engine pauses at once and resumes as soon as the relay is back.
    reported: bool = True


class Throttle(_Spec, frozen=True):
    """The server is overloaded: every session gets ``RateLimited`` for a while.

    A ``per-session`` relay refuses each session of a batch; a
    ``per-request`` one answers the whole request with one 429.
    """

    at_s: NonNeg
    for_s: Positive
    #: The hint sent with each refusal; omit it for a server that sends none.
    retry_after_s: NonNeg | None = None


class RateLimit(_Spec, frozen=True):
    """A token bucket on the server: ``sessions_per_s`` refill, ``burst`` deep."""

    sessions_per_s: Positive
    burst: Annotated[int, msgspec.Meta(ge=1)] = 10
    #: Refusals carry ``retry_after_s`` (the time until a token is free).
    retry_after: bool = True


class RelaySpec(_Spec, frozen=True):
    """How the simulated relay behaves."""

    #: ``per-session``: one answer per session of a batch. ``per-request``:
    #: one answer for the whole batch, as an HTTP relay gives one status per
    #: POST: any refused session refuses the request, and nothing is stored.
    answers: Literal["per-session", "per-request"] = "per-session"
    #: Payloads above this are never accepted.
    size_limit_bytes: Bytes = 8 * 1024 * 1024
    #: A request whose payloads add up to more than this is refused whole with
    #: one ``PayloadTooLarge`` (HTTP 413), however the relay answers otherwise.
    body_limit_bytes: Bytes | None = None
    #: Upload speed. A batch whose bytes take longer than the engine's ack
    #: timeout to upload is never answered, and nothing of it is stored.
    upload_bytes_per_s: Positive | None = None
    #: What an oversized payload gets. The relay of the incident said
    #: ``RateLimited``; a well-behaved one says ``PayloadTooLarge``.
    oversize_ack: Literal["RateLimited", "PayloadTooLarge"] = "RateLimited"
    latency_s: NonNeg = 0.5
    #: Each answer takes ``latency_s`` plus up to this much more (uniform).
    latency_jitter_s: NonNeg = 0.0
    #: Probability that a batch's answer is lost (the engine times it out).
    #: The relay still stores what it accepted.
    ack_loss: Probability = 0.0
    rate_limit: RateLimit | None = None
    throttles: tuple[Throttle, ...] = ()
    flaps: tuple[Flap, ...] = ()


class Scenario(_Spec, frozen=True):
    """One simulation: a relay and the sessions it is sent."""

    sessions: Annotated[tuple[SessionGroup, ...], msgspec.Meta(min_length=1)]
    #: Defaults to the file's stem.
    name: str = ""
    description: str = ""
    seed: int = 1
    #: Give up (and report not drained) after this much simulated time.
    max_time_s: Positive = 86_400.0
    relay: RelaySpec = RelaySpec()

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for group in self.sessions:
            if group.name in seen:
                raise ValueError(f"session group name {group.name!r} is used twice")
            seen.add(group.name)


def _scenario_dir() -> Any:
    return resources.files("sessionfsm.tools.sim").joinpath("scenarios")


def scenario_names() -> list[str]:
    """The scenarios that ship with sessionfsm, sorted."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in _scenario_dir().iterdir()
        if entry.name.endswith(".toml")
    )


def load_scenario(source: str | Path) -> Scenario:
    """You pass a shipped scenario's name (``incident``) or a file path; you
    get a validated :class:`Scenario` or a :class:`ScenarioError`."""
    text: str
    if isinstance(source, str) and source in scenario_names():
        where = f"scenario {source!r}"
        text = _scenario_dir().joinpath(f"{source}.toml").read_text(encoding="utf-8")
        stem, suffix = source, ".toml"
    else:
        path = Path(source)
        where = f"scenario file {str(path)!r}"
        if not path.exists():
            known = ", ".join(scenario_names())
            raise ScenarioError(
                f"no scenario named {str(source)!r} and no such file (known: {known})"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError(f"cannot read {where}: {exc}") from None
        stem, suffix = path.stem, path.suffix.lower()
    try:
        data = json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"{where}: not valid {suffix.lstrip('.').upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: expected a table of settings, got {type(data).__name__}")
    try:
        scenario = msgspec.convert(data, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    if not scenario.name:
        scenario = msgspec.structs.replace(scenario, name=stem)
    return scenario
