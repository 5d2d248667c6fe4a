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
from typing import Final

__all__ = ["STATUS_TABLE", "outcome_of", "parse_retry_after"]

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
