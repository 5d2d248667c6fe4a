"""The policy: defaults, validation, backoff arithmetic and TOML loading."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessionfsm import Exponential, Fixed, InvalidPolicy, Policy, ReasonPolicy, load_policy


def test_defaults_equal_the_motivating_service() -> None:
    """5 RateLimited, 3 AckTimeout, 30 s backoff, batches of 10 at least 30 s apart."""
    policy = Policy()
    assert policy.rate_limited.threshold == 5
    assert policy.ack_timeout.threshold == 3
    assert policy.rate_limited.backoff == Fixed(30.0)
    assert policy.ack_timeout.backoff == Fixed(30.0)
    assert (policy.batch_size, policy.incremental_interval_s) == (10, 30.0)
    assert not policy.payload_too_large.retryable


def test_policy_is_immutable() -> None:
    """A policy cannot be changed in place; build a new one."""
    with pytest.raises(AttributeError):
        Policy().batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"max_in_flight": 1.5}, "max_in_flight"),
        ({"incremental_interval_s": -1.0}, "incremental_interval_s"),
        ({"ack_timeout_s": 0.0}, "ack_timeout_s must be > 0"),
        ({"max_backoff_s": float("inf")}, "max_backoff_s"),
    ],
)
def test_out_of_range_values_are_refused_by_name(kwargs: dict[str, object], message: str) -> None:
    """Each bad field raises InvalidPolicy naming the field and the value."""
    with pytest.raises(InvalidPolicy, match=message):
        Policy(**kwargs)  # type: ignore[arg-type]


@given(count=st.integers(1, 10_000), seed=st.integers(0, 1000))
def test_exponential_full_jitter_stays_within_zero_and_the_cap(count: int, seed: int) -> None:
    """Full jitter draws from [0, min(cap, base*factor**(n-1))]."""
    backoff = Exponential(base_s=1.0, factor=2.0, cap_s=60.0, jitter=True)
    delay = backoff.delay(count, random.Random(seed))
    assert 0.0 <= delay <= min(60.0, 2.0 ** min(count - 1, 64))


def test_exponential_without_jitter_doubles_to_the_cap() -> None:
    """Without jitter the delays are 1, 2, 4, ... capped."""
    backoff = Exponential(base_s=1.0, factor=2.0, cap_s=10.0, jitter=False)
    assert [backoff.delay(n, random.Random(0)) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_retry_after_is_used_only_when_honoured() -> None:
    """honour_retry_after swaps the backoff for the server's hint, capped."""
    rng = random.Random(0)
    honour = ReasonPolicy(honour_retry_after=True, retry_after_cap_s=20.0, backoff=Fixed(30.0))
    ignore = ReasonPolicy(honour_retry_after=False, backoff=Fixed(30.0))
    assert honour.delay(1, 5.0, rng) == 5.0
    assert honour.delay(1, 500.0, rng) == 20.0
    assert honour.delay(1, None, rng) == 30.0
    assert ignore.delay(1, 5.0, rng) == 30.0


def test_load_policy_from_toml_merges_over_the_defaults(tmp_path: Path) -> None:
    """A file that tunes one field keeps every other default, nested ones too."""
    path = tmp_path / "policy.toml"
    path.write_text(
        'batch_size = 20\n[rate_limited]\nbackoff = { type = "exponential", cap_s = 120.0 }\n'
    )
    policy = load_policy(path)
    assert policy.batch_size == 20
    assert policy.rate_limited.threshold == 5  # not ReasonPolicy's generic default
    assert policy.rate_limited.backoff == Exponential(cap_s=120.0)
    assert policy.ack_timeout == Policy().ack_timeout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_size = 0", "batch_size must be an integer"),
        ("nope = 1", "unknown field 'nope'"),
        ("[rate_limited]\nthreshold = 0", r"threshold must be .* - at `\$.rate_limited`"),
        ('[rate_limited]\nbackoff = { type = "linear" }', "Invalid value 'linear'"),
        ("batch_size = ", "cannot read policy file"),
    ],
)
def test_bad_policy_file_names_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    """A bad policy file raises InvalidPolicy with the path and what is wrong."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidPolicy, match=message) as info:
        load_policy(path)
    assert "bad.toml" in str(info.value)


def test_missing_policy_file_is_named(tmp_path: Path) -> None:
    """A policy path that does not exist says so."""
    with pytest.raises(InvalidPolicy, match="does not exist"):
        load_policy(tmp_path / "absent.toml")


def test_policy_round_trips_through_builtins() -> None:
    """A policy serialises and loads back equal (what --policy files contain)."""
    policy = Policy(rate_limited=ReasonPolicy(threshold=8, backoff=Exponential(jitter=False)))
    assert load_policy(msgspec.to_builtins(policy)) == policy


def test_a_misspelt_field_is_refused_with_the_closest_name() -> None:
    """`bach_size` in a policy gets "did you mean 'batch_size'", nested fields too."""
    with pytest.raises(
        InvalidPolicy, match=r"unknown field 'bach_size' \(did you mean 'batch_size'\?\)"
    ):
        load_policy({"bach_size": 20})
    with pytest.raises(
        InvalidPolicy, match=r"'rate_limited.treshold' \(did you mean 'rate_limited.threshold'\?\)"
    ):
        load_policy({"rate_limited": {"treshold": 8}})
    with pytest.raises(InvalidPolicy, match=r"did you mean 'rate_limited.backoff.base_s'"):
        load_policy({"rate_limited": {"backoff": {"type": "exponential", "base": 2.0}}})
