"""The policy: every tunable number of the engine in one immutable Struct.

The defaults equal the constants of the sync service this project was built
for: ``RateLimited`` dead-letters at 5 consecutive, ``AckTimeout`` at 3, a
30 s per-session backoff, incremental batches of at most 10 sessions at least
30 s apart. ``PayloadTooLarge`` is non-retryable.

You can load a policy from TOML with :func:`load_policy`; unknown keys and
out-of-range values raise :class:`sessionfsm.InvalidPolicy`.
"""

from __future__ import annotations

import difflib
import math
import random
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeAlias

import msgspec

from ._errors import InvalidPolicy

__all__ = ["Backoff", "Exponential", "Fixed", "Policy", "ReasonPolicy", "load_policy"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidPolicy(message)


def _finite_nonneg(value: float, name: str) -> None:
    _check(
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
        f"{name} must be a finite number >= 0, got {value!r}",
    )


class Fixed(msgspec.Struct, frozen=True, tag="fixed", forbid_unknown_fields=True):
    """Wait the same ``delay_s`` after every failure."""

    delay_s: float = 30.0

    def __post_init__(self) -> None:
        _finite_nonneg(self.delay_s, "Fixed.delay_s")

    def delay(self, count: int, rng: random.Random) -> float:
        return self.delay_s

    def describe(self) -> str:
        return f"{self.delay_s:g} s"


class Exponential(msgspec.Struct, frozen=True, tag="exponential", forbid_unknown_fields=True):
    """Wait ``base_s * factor**(n-1)``, capped at ``cap_s``; with ``jitter``, a
    uniform draw from 0 to that (AWS's "full jitter")."""

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        _finite_nonneg(self.base_s, "Exponential.base_s")
        _finite_nonneg(self.cap_s, "Exponential.cap_s")
        _check(
            isinstance(self.factor, (int, float)) and 1.0 <= self.factor <= 100.0,
            f"Exponential.factor must be between 1 and 100, got {self.factor!r}",
        )

    def delay(self, count: int, rng: random.Random) -> float:
        # count is >= 1. Cap the exponent first so huge counts cannot overflow.
        raw = min(self.cap_s, self.base_s * self.factor ** min(count - 1, 64))
        return rng.uniform(0.0, raw) if self.jitter else raw

    def describe(self) -> str:
        jitter = ", full jitter" if self.jitter else ""
        return f"{self.base_s:g} s x{self.factor:g} up to {self.cap_s:g} s{jitter}"


Backoff: TypeAlias = Fixed | Exponential


class ReasonPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one charged ack reason does to a session.

    ``threshold`` consecutive acks of this reason dead-letter the session; a
    non-``retryable`` reason dead-letters at once. In between, the session
    waits ``backoff`` (or the server's ``retry_after_s``, capped, when
    ``honour_retry_after`` is set).
    """

    threshold: int = 3
    backoff: Backoff = Fixed()
    honour_retry_after: bool = False
    retry_after_cap_s: float = 300.0
    retryable: bool = True

    def __post_init__(self) -> None:
        _check(
            isinstance(self.threshold, int) and 1 <= self.threshold <= 1_000_000,
            f"threshold must be an integer from 1 to 1000000, got {self.threshold!r}",
        )
        _finite_nonneg(self.retry_after_cap_s, "retry_after_cap_s")

    def delay(self, count: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Seconds to wait after the ``count``-th consecutive failure."""
        if self.honour_retry_after and retry_after_s is not None:
            return min(retry_after_s, self.retry_after_cap_s)
        return self.backoff.delay(count, rng)


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every number the engine uses. Immutable; build a new one to change it.

    Times are in seconds; counts are sessions or batches.

    * ``batch_size`` (10): at most this many sessions in one incremental batch.
    * ``incremental_interval_s`` (30): at least this long between two
      incremental batches.
    * ``backfill_batch_size`` (10), ``backfill_interval_s`` (0): the same for
      the backfill lane.
    * ``max_in_flight`` (1): at most this many batches awaiting an ack at once.
    * ``ack_timeout_s`` (30): a batch with no ack after this long is timed out
      by the engine itself.
    * ``tick_interval_s`` (5): how often a runner calls ``tick``.
    * ``max_backoff_s`` (3600): no retry is scheduled further out than this
      (also caps retry times read back from a store after a clock jump).
    * ``ack_timeout``, ``rate_limited``, ``payload_too_large``: a
      :class:`ReasonPolicy` each: threshold, backoff, retry-after handling.
    * ``relay_pause``: how long the link stays paused after the n-th
      consecutive ``RelayUnavailable``; grows, capped; never charged.
    * ``relay_throttle``: how long the link stays ``throttled`` after the
      n-th consecutive relay-wide refusal without ``retry_after_s`` (a hint
      is honoured instead, capped); grows, capped; never charged.
    * ``max_relay_refusal_s``: refusals are charged only on evidence (the
      relay accepted another session since); after the relay has accepted
      nothing for this long, they are charged again (6 hours).
    """

    #: At most this many sessions in one incremental batch.
    batch_size: int = 10
    #: At least this long between two incremental batches.
    incremental_interval_s: float = 30.0
    #: At most this many sessions in one backfill batch.
    backfill_batch_size: int = 10
    #: At least this long between two backfill batches.
    backfill_interval_s: float = 0.0
    #: At most this many batches awaiting an ack at once.
    max_in_flight: int = 1
    #: A batch with no ack after this long is timed out by the engine itself.
    ack_timeout_s: float = 30.0
    #: How often a runner calls ``tick``.
    tick_interval_s: float = 5.0
    #: No retry is ever scheduled further out than this (also caps retry times
    #: read back from a store after a clock jump).
    max_backoff_s: float = 3600.0
    ack_timeout: ReasonPolicy = ReasonPolicy(threshold=3)
    rate_limited: ReasonPolicy = ReasonPolicy(threshold=5, honour_retry_after=True)
    payload_too_large: ReasonPolicy = ReasonPolicy(threshold=1, retryable=False)
    #: How long the relay link stays paused after the n-th consecutive
    #: ``RelayUnavailable``. Grows, capped; never charged to a session.
    relay_pause: Exponential = Exponential(base_s=1.0, factor=2.0, cap_s=60.0, jitter=False)
    #: How long the link waits after the n-th consecutive relay-wide refusal
    #: (a throttle) that carried no ``retry_after_s``; a hint is honoured,
    #: capped at ``rate_limited.retry_after_cap_s``. Never charged to a session.
    relay_throttle: Exponential = Exponential(base_s=10.0, factor=2.0, cap_s=300.0, jitter=False)
    #: A refusal is charged to a session only on evidence against it (the
    #: relay accepted another session since its previous attempt). A relay
    #: that has accepted nothing for this long looks exactly like a queue of
    #: culprits only, so past it every refusal is charged again: no culprit
    #: retries forever, and no throttle shorter than this dead-letters a valid
    #: session. 0 charges every refusal of a session answered on its own.
    max_relay_refusal_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "backfill_batch_size", "max_in_flight"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and 1 <= value <= 1_000_000,
                f"{name} must be an integer from 1 to 1000000, got {value!r}",
            )
        for name in (
            "incremental_interval_s",
            "backfill_interval_s",
            "max_backoff_s",
            "max_relay_refusal_s",
        ):
            _finite_nonneg(getattr(self, name), name)
        for name in ("ack_timeout_s", "tick_interval_s"):
            value = getattr(self, name)
            _finite_nonneg(value, name)
            _check(value > 0, f"{name} must be > 0, got {value!r}")

    def reason(self, name: str) -> ReasonPolicy:
        """The policy of a charged reason by its ack name, e.g. ``"RateLimited"``."""
        try:
            return {
                "AckTimeout": self.ack_timeout,
                "RateLimited": self.rate_limited,
                "PayloadTooLarge": self.payload_too_large,
            }[name]
        except KeyError:
            raise InvalidPolicy(f"{name!r} is not a charged ack reason") from None


def load_policy(source: str | Path | dict[str, Any]) -> Policy:
    """You pass a TOML file path (or an already-parsed dict); you get a Policy.

    The file holds the Policy fields at top level, e.g.::

        batch_size = 20
        [rate_limited]
        threshold = 8
        backoff = { type = "exponential", base_s = 2.0, cap_s = 120.0 }
    """
    if isinstance(source, dict):
        data, where = source, "policy"
    else:
        path = Path(source)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidPolicy(f"policy file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidPolicy(f"cannot read policy file {str(path)!r}: {exc}") from None
        where = f"policy file {str(path)!r}"
    _check_names(data, Policy, where)
    try:
        # Merge over the defaults, so a file that sets only
        # ``rate_limited.backoff`` keeps ``rate_limited.threshold = 5`` rather
        # than falling back to ReasonPolicy's generic default.
        return msgspec.convert(_merge(msgspec.to_builtins(Policy()), data), Policy)
    except InvalidPolicy as exc:
        raise InvalidPolicy(f"{where}: {exc}") from None
    except msgspec.ValidationError as exc:
        raise InvalidPolicy(f"{where}: {exc}") from None


def _check_names(data: object, struct: type[msgspec.Struct], where: str, path: str = "") -> None:
    """Refuse a misspelt field by name, with the closest real one if any."""
    if not isinstance(data, dict):
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            if key == "type" and struct.__struct_config__.tag is not None:
                continue
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean {f'{path}{close[0]}'!r}?)" if close else ""
            known = ", ".join(fields)
            raise InvalidPolicy(
                f"{where}: unknown field {f'{path}{key}'!r}{hint}; the fields are: {known}"
            )
        for member in _struct_members(field.type):
            if isinstance(value, dict) and (
                len(_struct_members(field.type)) == 1
                or value.get("type") == member.__struct_config__.tag
            ):
                _check_names(value, member, where, f"{path}{key}.")


def _struct_members(annotation: object) -> list[type[msgspec.Struct]]:
    """The Struct types an annotation allows (one, or the members of a union)."""
    candidates = typing.get_args(annotation) or (annotation,)
    return [c for c in candidates if isinstance(c, type) and issubclass(c, msgspec.Struct)]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        old = merged.get(key)
        # A tagged union member of another type (fixed -> exponential) replaces
        # the old one wholesale; merging fields across types would be nonsense.
        if (
            isinstance(old, dict)
            and isinstance(value, dict)
            and value.get("type", old.get("type")) == old.get("type")
        ):
            merged[key] = _merge(old, value)
        else:
            merged[key] = value
    return merged
