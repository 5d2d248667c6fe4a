"""Typed acks: decoding untrusted bytes, and what each error names."""

from __future__ import annotations

import pytest
from hypothesis import given

from sessionfsm import InvalidAck, RemoteError, acks
from tests.strategies import any_ack


@given(ack=any_ack)
def test_every_ack_round_trips_through_json(ack: acks.Ack) -> None:
    """encode then decode gives back an equal ack of the same type."""
    assert acks.decode(acks.encode(ack)) == ack


def test_wire_form_is_tagged_by_class_name() -> None:
    """The tag field is "type" and its value is the ack's class name."""
    assert acks.encode(acks.RateLimited(retry_after_s=3.0)) == (
        b'{"type":"RateLimited","retry_after_s":3.0}'
    )
    assert acks.decode(b'{"type": "RelayUnavailable"}') == acks.RelayUnavailable()


def test_new_fields_default_so_old_relays_still_decode() -> None:
    """A RateLimited without retry_after_s decodes with the default None."""
    assert acks.decode(b'{"type": "RateLimited"}').retry_after_s is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (b'{"type": "Nope"}', ["'Nope'", "$.type"]),
        (b'{"type": "RateLimited", "retry_after_s": -1}', [">= 0", "$.retry_after_s"]),
        (b'{"type": "RateLimited", "retry_after_s": "soon"}', ["str", "$.retry_after_s"]),
        (b'{"retry_after_s": 1}', ["type"]),
        (b"not json", ["malformed"]),
        (b"", ["truncated"]),
    ],
    ids=["unknown-type", "negative", "wrong-type", "no-tag", "garbage", "empty"],
)
def test_malformed_ack_names_the_field_and_value(raw: bytes, names: list[str]) -> None:
    """Bad bytes raise InvalidAck (a RemoteError and a ValueError) naming what is wrong."""
    with pytest.raises(InvalidAck) as info:
        acks.decode(raw)
    assert isinstance(info.value, RemoteError)
    assert isinstance(info.value, ValueError)
    for name in names:
        assert name in str(info.value)


def test_batch_message_needs_exactly_one_of_ack_or_sessions() -> None:
    """A batch answer with neither or both forms is refused."""
    with pytest.raises(InvalidAck, match="exactly one of"):
        acks.decode_message(b'{"batch_id": 1}')
    with pytest.raises(InvalidAck, match="exactly one of"):
        acks.decode_message(b'{"batch_id": 1, "ack": {"type": "Ok"}, "sessions": {}}')
    message = acks.decode_message(b'{"batch_id": 4, "ack": {"type": "AckTimeout"}}')
    assert (message.batch_id, message.ack) == (4, acks.AckTimeout())


def test_a_nested_bad_session_entry_is_located() -> None:
    """An error inside a per-session answer names the session's path."""
    with pytest.raises(InvalidAck, match=r"required field `type` - at `\$\.sessions\['s2'\]`"):
        acks.decode_message(b'{"batch_id": 1, "sessions": {"s1": {"type": "Ok"}, "s2": {}}}')


def test_validate_rejects_non_acks_by_name() -> None:
    """A plain dict is not an ack, and the message lists the ack types."""
    with pytest.raises(InvalidAck, match="expected an ack \\(Ok, AckTimeout"):
        acks.validate({"type": "Ok"})
