"""``HttpTransport``: one POST per batch, with httpx (``sessionfsm[http]``).

You pass the relay's URL and a ``payload(session_id)`` callable (the engine
only knows ids; the data comes from your service), and optionally your own
``httpx.AsyncClient`` so your auth, TLS and proxy settings stay yours::

    transport = HttpTransport("https://relay.example/sessions", payload=load_session)
    await Runner(engine, transport).run()

Each batch is POSTed as JSON (see :mod:`sessionfsm.transports.wire`) with an
``Idempotency-Key`` header that is the same for the same sessions at the
same payload versions, so a resend after a crash is safe for a relay that
honours it. The reply's status decides the answer (:data:`STATUS_TABLE`,
also in ``docs/transports.md``; a test checks that the two agree).

Nothing the relay sends back raises into the runner: a malformed body, an
unknown status or an unreadable ``Retry-After`` is logged (event names
``sessionfsm.http_*``) and handled as the table says.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from .. import acks
from .._errors import InvalidAck, UsageError
from .._log import get_logger
from ..engine import Batch
from ..runner import AckResult
from .status import (
    PREVIEW,
    STATUS_TABLE,
    answer_of_status,
    outcome_of,
    parse_retry_after,
    preview,
)
from .wire import PayloadFn, VersionFn, encode_batch, idempotency_key

__all__ = ["STATUS_TABLE", "HttpTransport", "outcome_of", "parse_retry_after"]


class HttpTransport:
    """POSTs each batch to ``url`` and maps the reply to acks.

    You pass:

    * ``url``: where batches go;
    * ``payload``: ``payload(session_id)`` returns the session's data, a
      JSON-able value or ``bytes`` holding JSON;
    * ``version``: optionally ``version(session_id)``, your own version of
      that data; by default a digest of the payload is the version;
    * ``client``: your ``httpx.AsyncClient``; you close it. Without one the
      transport makes its own and :meth:`aclose` closes it;
    * ``headers``: extra headers on every POST;
    * ``retry_after_cap_s``: the longest ``Retry-After`` taken as given;
    * ``clock``: wall-clock seconds, for HTTP-dates and the batch deadline.

    The request timeout is what is left until the batch's deadline. An
    exception from your ``payload`` or ``version`` callable (or ``UsageError``
    for a payload that is not JSON-able) propagates: the runner logs it and
    the batch times out.
    """

    def __init__(
        self,
        url: str,
        payload: PayloadFn,
        *,
        version: VersionFn | None = None,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        retry_after_cap_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
        log: bool = True,
    ) -> None:
        if not callable(payload):
            raise UsageError(f"payload must be a callable payload(session_id), got {payload!r}")
        if version is not None and not callable(version):
            raise UsageError(f"version must be a callable version(session_id), got {version!r}")
        if not (math.isfinite(retry_after_cap_s) and retry_after_cap_s >= 0):
            raise UsageError(
                f"retry_after_cap_s must be a finite number >= 0, got {retry_after_cap_s!r}"
            )
        try:
            scheme = httpx.URL(url).scheme
        except (httpx.InvalidURL, TypeError) as exc:
            raise UsageError(f"url must be an http(s) URL, got {url!r}: {exc}") from None
        if scheme not in ("http", "https"):
            raise UsageError(f"url must be an http(s) URL, got {url!r}")
        self.url = url
        self._payload = payload
        self._version = version
        self._client = client
        self._own_client = client is None
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._cap = float(retry_after_cap_s)
        self._clock = clock
        self._log = get_logger(log)
        #: Replies by outcome (``body``, ``RateLimited``, ..., ``network``,
        #: ``timeout``, ``bad_body``), for dashboards and tests.
        self.stats: dict[str, int] = {}

    async def __aenter__(self) -> HttpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client if the transport made it."""
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _count(self, outcome: str) -> None:
        self.stats[outcome] = self.stats.get(outcome, 0) + 1

    async def send(self, batch: Batch) -> AckResult:
        """POST the batch; return its answer (an empty mapping: unanswered)."""
        body, wire = encode_batch(
            batch.id, batch.lane.value, batch.session_ids, self._payload, self._version
        )
        headers = {**self._headers, "Idempotency-Key": idempotency_key(wire.sessions)}
        if self._client is None:
            self._client = httpx.AsyncClient()
        timeout = max(batch.deadline - self._clock(), 0.001)
        try:
            response = await self._client.post(
                self.url, content=body, headers=headers, timeout=timeout
            )
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            # The relay may have the batch: an ack timeout, as if it never answered.
            self._count("timeout")
            self._log.info("sessionfsm.http_timeout", batch_id=batch.id, error=repr(exc))
            return acks.AckTimeout()
        except (httpx.TransportError, OSError) as exc:
            # Connect errors, pool and connect timeouts, resets, TLS failures,
            # a server that dropped the connection: the link's fault, never a session's.
            self._count("network")
            self._log.info("sessionfsm.http_unavailable", batch_id=batch.id, error=repr(exc))
            return acks.RelayUnavailable()
        except httpx.HTTPError as exc:
            self._count("unanswered")
            self._log.warning("sessionfsm.http_failed", batch_id=batch.id, error=repr(exc))
            return {}
        return self.answer(batch, response.status_code, response.headers, response.content)

    def answer(
        self, batch: Batch, status: int, headers: Mapping[str, str], content: bytes
    ) -> AckResult:
        """Map one reply to the batch's answer, as :data:`STATUS_TABLE` says.

        Public so you can reuse the mapping with a client of your own making.
        Never raises on anything the relay sent.
        """
        outcome = outcome_of(status)
        self._count(outcome)
        if outcome == "body":
            return self._decode_body(batch, status, headers, content)
        return answer_of_status(
            outcome,
            status,
            headers,
            content,
            batch_id=batch.id,
            now=self._clock(),
            cap_s=self._cap,
            log=self._log,
        )

    def _decode_body(
        self, batch: Batch, status: int, headers: Mapping[str, str], content: bytes
    ) -> AckResult:
        if not content.strip():
            return acks.Ok()
        try:
            message = acks.decode_message(content)
        except InvalidAck as exc:
            self._count("bad_body")
            self._log.warning(
                "sessionfsm.http_bad_reply",
                batch_id=batch.id,
                status=status,
                content_type=headers.get("content-type", ""),
                error=str(exc)[:PREVIEW],
                body=preview(content),
            )
            return {}
        # An HTTP reply belongs to its request, so its batch_id is not checked:
        # a relay that honours Idempotency-Key replays the first answer
        # verbatim, batch id and all, and that answer is still the right one.
        result: Any = message.ack if message.ack is not None else message.sessions
        return result  # type: ignore[no-any-return]
