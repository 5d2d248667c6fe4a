"""Typed acks: what the relay answers for a batch, or for each session in it.

Each ack reason is a frozen msgspec Struct tagged by its class name, so the
wire form is ``{"type": "RateLimited", "retry_after_s": 3}``. ``Ack`` is the
union of all of them. New fields always get defaults, so older relays keep
decoding (msgspec's schema-evolution rules).

You decode untrusted bytes with :func:`decode` (one ack) or
:func:`decode_message` (an ack for a whole batch). Anything malformed raises
:class:`sessionfsm.InvalidAck`, naming the offending field and value.
"""

from __future__ import annotations

import math
import reprlib
from typing import Annotated, TypeAlias

import msgspec

from ._errors import InvalidAck, UsageError

__all__ = [
    "Ack",
    "AckTimeout",
    "BatchAck",
    "Ok",
    "PayloadTooLarge",
    "RateLimited",
    "RelayUnavailable",
    "decode",
    "decode_message",
    "encode",
    "validate",
]


class _AckBase(msgspec.Struct, frozen=True, tag=True, tag_field="type"):
    """Base of every ack; the tag is the class name."""


class Ok(_AckBase, frozen=True):
    """The relay stored the payload."""


class AckTimeout(_AckBase, frozen=True):
    """No answer arrived in time. The engine also raises this itself."""


class RateLimited(_AckBase, frozen=True):
    """The server refused this payload for now, optionally saying when to retry."""

    retry_after_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


class RelayUnavailable(_AckBase, frozen=True):
    """The transport was not ready or disconnected. Never charged to a session."""


class PayloadTooLarge(_AckBase, frozen=True):
    """The payload can never be accepted as it is."""


Ack: TypeAlias = Ok | AckTimeout | RateLimited | RelayUnavailable | PayloadTooLarge

ACK_TYPES: tuple[type[Ack], ...] = (Ok, AckTimeout, RateLimited, RelayUnavailable, PayloadTooLarge)


class BatchAck(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The relay's answer to one batch: one ``ack`` for all, or one per session."""

    batch_id: int
    ack: Ack | None = None
    sessions: dict[str, Ack] | None = None

    def __post_init__(self) -> None:
        if (self.ack is None) == (self.sessions is None):
            raise msgspec.ValidationError("exactly one of `ack` or `sessions` must be set")


class _RawBatchAck(msgspec.Struct, frozen=True):
    # Decoded first, so an error in one session's answer can name the session
    # (msgspec locates errors in dict values only as ``$.sessions[...]``).
    batch_id: int
    # Raw cannot sit in a union with None; a missing or null ack stays b"null".
    ack: msgspec.Raw = msgspec.Raw(b"null")
    sessions: dict[str, msgspec.Raw] | None = None


_decoder = msgspec.json.Decoder(Ack)
_raw_message_decoder = msgspec.json.Decoder(_RawBatchAck)
_encoder = msgspec.json.Encoder()


def decode(data: bytes | str) -> Ack:
    """You pass the JSON of one ack; you get the typed ack or ``InvalidAck``.

    Whatever the bytes hold, nothing else escapes: a value that is not bytes
    or str at all is your mistake (``UsageError``), anything else the relay's.
    """
    raw = _wire_bytes(data, "ack")
    try:
        ack: Ack = _decoder.decode(raw)
        return ack
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise InvalidAck(f"invalid ack {_preview(raw)}: {exc}") from None
    except RecursionError:
        raise InvalidAck(f"invalid ack {_preview(raw)}: nested too deeply") from None


def decode_message(data: bytes | str) -> BatchAck:
    """You pass the JSON of a batch answer; you get a ``BatchAck`` or ``InvalidAck``.

    As with :func:`decode`, only ``InvalidAck`` (or ``UsageError`` for a
    value that is not bytes or str) ever escapes.
    """
    data = _wire_bytes(data, "batch ack")
    where = "$"
    try:
        raw = _raw_message_decoder.decode(data)
        where = "$.ack"
        ack = None if bytes(raw.ack) == b"null" else _decoder.decode(raw.ack)
        sessions: dict[str, Ack] | None = None
        if raw.sessions is not None:
            sessions = {}
            for session_id, value in raw.sessions.items():
                where = f"$.sessions[{session_id!r}]"
                sessions[session_id] = _decoder.decode(value)
        where = "$"
        return BatchAck(batch_id=raw.batch_id, ack=ack, sessions=sessions)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Errors inside a nested ack are reported relative to it: say where.
        detail = str(exc)
        if where != "$":
            detail = (
                detail.replace("`$", f"`{where}") if "`$" in detail else f"{detail} - at `{where}`"
            )
        raise InvalidAck(f"invalid batch ack {_preview(data)}: {detail}") from None
    except RecursionError:
        raise InvalidAck(f"invalid batch ack {_preview(data)}: nested too deeply") from None


def encode(ack: Ack | BatchAck) -> bytes:
    """The JSON wire form of an ack or a batch answer."""
    return _encoder.encode(ack)


def validate(ack: object) -> Ack:
    """Check an ack built in Python (constraints only run when decoding)."""
    if not isinstance(ack, ACK_TYPES):
        raise InvalidAck(
            f"expected an ack ({', '.join(t.__name__ for t in ACK_TYPES)}), got {reprlib.repr(ack)}"
        )
    if isinstance(ack, RateLimited) and ack.retry_after_s is not None:
        value = ack.retry_after_s
        if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise InvalidAck(f"RateLimited.retry_after_s must be a number >= 0, got {value!r}")
    return ack


def _wire_bytes(data: object, what: str) -> bytes:
    """The JSON as bytes; a str with unpaired surrogates is the relay's bad data."""
    if isinstance(data, str):
        try:
            return data.encode("utf-8")
        except UnicodeEncodeError:
            text = data.encode("utf-8", "backslashreplace").decode("utf-8")
            raise InvalidAck(
                f"invalid {what} {_preview(text)}: not valid Unicode (unpaired surrogate)"
            ) from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise UsageError(f"expected the {what}'s JSON as bytes or str, got {type(data).__name__}")


def _preview(data: bytes | str, limit: int = 80) -> str:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")
