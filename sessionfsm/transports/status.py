"""What an HTTP relay's reply status means: the table both HTTP senders share.

:class:`~sessionfsm.transports.http.HttpTransport` (asyncio, httpx) and the
fleet's :class:`~sessionfsm.fleet.HttpSender` (a worker's blocking ``send``)
map a reply the same way. Core dependencies only, so the fleet needs no
HTTP client library.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from typing import Any, Final

from .. import acks
from ..runner import AckResult

__all__ = [
    "PREVIEW",
    "STATUS_TABLE",
    "answer_of_status",
    "outcome_of",
    "parse_retry_after",
    "preview",
]

#: How much of a bad reply body goes into the log.
PREVIEW: Final = 200

#: What each reply status means, row by row, as the docs' table shows it.
#: ``body``: the reply body's per-session acks, or ``Ok`` for all if empty;
#: ``refused``: ``RelayUnavailable`` plus an error-level log (the relay
#: refuses *us*); ``unanswered``: logged, and the batch is left to time out.
STATUS_TABLE: Final[tuple[tuple[str, str], ...]] = (
    ("2xx", "body"),
    ("408", "AckTimeout"),
    ("413", "PayloadTooLarge"),
    ("429", "RateLimited"),
    ("401, 403", "refused"),
    ("502, 503, 504", "RelayUnavailable"),
    ("any other", "unanswered"),
)

_REFUSED: Final = frozenset({401, 403})
_UNAVAILABLE: Final = frozenset({502, 503, 504})
_DELTA: Final = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*$")


def outcome_of(status: int) -> str:
    """The :data:`STATUS_TABLE` outcome of an HTTP status."""
    if 200 <= status < 300:
        return "body"
    if status == 408:
        return "AckTimeout"
    if status == 413:
        return "PayloadTooLarge"
    if status == 429:
        return "RateLimited"
    if status in _REFUSED:
        return "refused"
    if status in _UNAVAILABLE:
        return "RelayUnavailable"
    return "unanswered"


def parse_retry_after(value: str | None, now: float, cap_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or None if absent or unreadable.

    You pass delta-seconds (``"120"``, a decimal is accepted too) or an
    HTTP-date; a date in the past means 0. The result is clamped to
    ``[0, cap_s]``. Anything else returns None, and the caller logs it.
    """
    if value is None:
        return None
    match = _DELTA.match(value)
    if match is not None:
        seconds = float(match.group(1))
    else:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is read as such
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return cap_s
    return min(max(seconds, 0.0), cap_s)


def preview(data: bytes) -> str:
    """The start of a reply body, for a log line."""
    text = data[:PREVIEW].decode("utf-8", "replace")
    return text + ("..." if len(data) > PREVIEW else "")


def answer_of_status(
    outcome: str,
    status: int,
    headers: Mapping[str, str],
    content: bytes,
    *,
    batch_id: int,
    now: float,
    cap_s: float,
    log: Any,
) -> AckResult:
    """The answer an outcome of :func:`outcome_of` other than ``body`` means.

    ``headers`` are looked up by lower-case name; ``now`` is wall-clock
    seconds (for an HTTP-date ``Retry-After``), capped at ``cap_s``. An
    unreadable ``Retry-After``, a refusal (401, 403) and an unexpected status
    are logged; the last is left unanswered (an empty mapping). Never raises.
    """
    if outcome == "AckTimeout":
        return acks.AckTimeout()
    if outcome == "PayloadTooLarge":
        return acks.PayloadTooLarge()
    if outcome == "RateLimited":
        raw = headers.get("retry-after")
        retry = parse_retry_after(raw, now, cap_s)
        if raw is not None and retry is None:
            log.warning(
                "sessionfsm.http_retry_after_ignored", batch_id=batch_id, retry_after=raw[:PREVIEW]
            )
        return acks.RateLimited(retry_after_s=retry)
    if outcome == "refused":
        log.error(
            "sessionfsm.http_refused",
            batch_id=batch_id,
            status=status,
            body=preview(content),
            hint="check the transport's credentials; sending pauses, nobody is charged",
        )
        return acks.RelayUnavailable()
    if outcome == "RelayUnavailable":
        return acks.RelayUnavailable()
    log.warning(
        "sessionfsm.http_unexpected_status", batch_id=batch_id, status=status, body=preview(content)
    )
    return {}
