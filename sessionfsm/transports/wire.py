"""The wire format both transports send, and the idempotency key.

A batch goes out as one JSON object::

    {"batch_id": 7, "lane": "incremental",
     "sessions": [{"id": "s1", "version": "9f2c...", "payload": {...}}, ...]}

``payload`` is whatever your ``payload(session_id)`` callable returned:
a JSON-able value, or ``bytes`` that already hold JSON (sent as they are).
``version`` is your ``version(session_id)`` if you gave one, else the first
16 hex digits of the SHA-256 of the payload's JSON, so a changed payload is a
new version and an unchanged one is the same version.

The idempotency key is a digest of the batch's (session id, version) pairs,
sorted: the same sessions at the same versions give the same key, whatever
the batch id or order, so a resend after a crash is recognisable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import msgspec

from .._errors import UsageError

__all__ = ["PayloadFn", "VersionFn", "WireBatch", "WireSession", "encode_batch", "idempotency_key"]

#: ``payload(session_id)``: the session's data, JSON-able or JSON bytes.
PayloadFn: TypeAlias = Callable[[str], Any]
#: ``version(session_id)``: the version of that data, if you track one.
VersionFn: TypeAlias = Callable[[str], "str | int"]


class WireSession(msgspec.Struct, frozen=True):
    """One session in a batch on the wire."""

    id: str
    version: str
    payload: msgspec.Raw


class WireBatch(msgspec.Struct, frozen=True):
    """One batch on the wire."""

    batch_id: int
    lane: str
    sessions: list[WireSession]


_encoder = msgspec.json.Encoder()
#: Decodes a batch on the relay's side.
batch_decoder = msgspec.json.Decoder(WireBatch)


def encode_session(session_id: str, payload: PayloadFn, version: VersionFn | None) -> WireSession:
    """The wire form of one session, calling your callables once each."""
    value = payload(session_id)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    else:
        try:
            raw = _encoder.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise UsageError(
                f"payload({session_id!r}) returned a value that is not JSON-able: {exc}"
            ) from None
    ver = hashlib.sha256(raw).hexdigest()[:16] if version is None else str(version(session_id))
    return WireSession(id=session_id, version=ver, payload=msgspec.Raw(raw))


def encode_batch(
    batch_id: int,
    lane: str,
    session_ids: Sequence[str],
    payload: PayloadFn,
    version: VersionFn | None = None,
) -> tuple[bytes, WireBatch]:
    """The JSON body of a batch and the structure it was built from."""
    wire = WireBatch(
        batch_id=batch_id,
        lane=lane,
        sessions=[encode_session(sid, payload, version) for sid in session_ids],
    )
    return _encoder.encode(wire), wire


def idempotency_key(sessions: Sequence[WireSession]) -> str:
    """Stable for the same sessions at the same versions, in any order."""
    digest = hashlib.sha256()
    for sid, ver in sorted((s.id, s.version) for s in sessions):
        digest.update(sid.encode())
        digest.update(b"\0")
        digest.update(ver.encode())
        digest.update(b"\n")
    return "sfsm-" + digest.hexdigest()[:32]
