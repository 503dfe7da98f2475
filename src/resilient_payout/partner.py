"""The partner seam: the :class:`Partner` protocol and its HTTP implementation.

A partner call never raises for partner behaviour: every answer, error and non-answer is
classified into a typed outcome, because each one is an ordinary lifecycle event:

==============================================  ===================================
what happened                                   outcome
==============================================  ===================================
200 with ``completed``/``declined``/``pending``   ``Accepted(status)``
400 / 401 / 403 / 422                           ``Refused(http_status, reason)``
429                                             ``RateLimited(retry_after)``
connection refused, DNS failure (before send)   ``NotSent(reason)``
504, 5xx, read timeout, reset after sending,    ``Uncertain(reason)``
garbage body, any other status
==============================================  ===================================

Status checks: 200 -> ``Found(status)``, 404 -> ``NotFound()``, 429 -> ``RateLimited``, anything
else -> ``CheckFailed(reason)``.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
import zlib
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, Self, runtime_checkable
from urllib.parse import quote

import httpx

from ._model import (
    Accepted,
    CheckFailed,
    CheckOutcome,
    Found,
    NotFound,
    NotSent,
    PartnerStatus,
    RateLimited,
    Refused,
    SubmitOutcome,
    Uncertain,
)
from ._policy import Policy

__all__ = ["HttpPartner", "Partner"]

# 16 pools of 128 connections: 2,048 slow calls in flight without any pool growing large.
_SHARDS = 16
_SHARD_CONNECTIONS = 128
_SHARD_KEEPALIVE = 16

logger = logging.getLogger("resilient_payout.partner")

_MAX_BODY: Final = 64 * 1024
"""Partner answers are tiny; a bigger body is garbage and is not read further."""
_MAX_REASON: Final = 200
_REFUSED: Final = frozenset({400, 401, 403, 422})
_DELAY_SECONDS: Final = re.compile(r"\d+(\.\d+)?")
_REASON_KEYS: Final = ("error", "message", "detail", "reason", "title")

# Errors raised before a single byte of the request left this process: re-POSTing is safe.
# ConnectError covers refused connections, DNS failures and TLS handshake failures; httpcore
# raises it only while establishing a connection, never on a connection that carried a request.
_NOT_SENT_ERRORS: Final = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.InvalidURL,
)
# Every other request error may come after the request was (partly) written: a write error can
# come after the partner already has the whole request, so it is as uncertain as a read timeout,
# a reset or a protocol error.
_SENT_ERRORS: Final = (httpx.RequestError,)


@runtime_checkable
class Partner(Protocol):
    """What the client needs from a payment partner."""

    async def submit(self, payout_id: str, webhook_url: str) -> SubmitOutcome:
        """POST the transfer. Must not raise for anything the partner or network does."""
        ...

    async def check(self, payout_id: str) -> CheckOutcome:
        """Ask the partner for the transfer's status. Must not raise either."""
        ...


@dataclass(frozen=True, slots=True)
class _Answer:
    status_code: int
    headers: httpx.Headers
    body: bytes | None
    """None when the body exceeded :data:`_MAX_BODY`."""


class HttpPartner:
    """The partner over HTTP (httpx), classifying every answer as the module table says.

    Without ``client`` it owns an :class:`httpx.AsyncClient` sized for thousands of slow
    concurrent calls, closed by :meth:`aclose` (or ``async with``). An injected client is used as
    it is and never closed here; timeouts are passed per request either way.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        policy: Policy | None = None,
    ) -> None:
        self._policy = policy if policy is not None else Policy()
        self._base = base_url.rstrip("/")
        p = self._policy
        # Write and pool waits are bounded by the connect timeout so that one POST cannot outlive
        # policy.submit_deadline (> connect + read) by much, and a pool wait fails as NotSent.
        self._submit_timeout = httpx.Timeout(
            connect=p.connect_timeout,
            read=p.read_timeout,
            write=p.connect_timeout,
            pool=p.connect_timeout,
        )
        self._check_timeout = httpx.Timeout(
            connect=p.connect_timeout,
            read=p.check_timeout,
            write=p.connect_timeout,
            pool=p.connect_timeout,
        )
        self._owns_client = client is None
        if client is None:
            # Several small pools instead of one big one: httpcore walks every connection of a
            # pool on each request start and close, so one pool of 2,000 connections costs
            # O(n) per event and dominated the CPU with ~1,000 slow POSTs in flight
            # (docs/performance.md). A payout always uses the same shard. One TLS context for
            # all of them: building one per client is the expensive part of creating a client.
            tls = httpx.create_ssl_context()
            self._clients = [
                httpx.AsyncClient(
                    verify=tls,
                    timeout=self._submit_timeout,
                    limits=httpx.Limits(
                        max_connections=_SHARD_CONNECTIONS,
                        max_keepalive_connections=_SHARD_KEEPALIVE,
                        # Below common server idle timeouts (5 s in uvicorn and Node): reusing a
                        # connection the server is closing makes a POST Uncertain for nothing.
                        keepalive_expiry=2.0,
                    ),
                    follow_redirects=False,
                )
                for _ in range(_SHARDS)
            ]
        else:
            self._clients = [client]

    def _client_for(self, payout_id: str) -> httpx.AsyncClient:
        if len(self._clients) == 1:
            return self._clients[0]
        return self._clients[zlib.crc32(payout_id.encode()) % len(self._clients)]

    async def aclose(self) -> None:
        """Close the HTTP client if this partner created it."""
        if self._owns_client:
            for client in self._clients:
                await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def submit(self, payout_id: str, webhook_url: str) -> SubmitOutcome:
        """POST ``{base}/transaction`` and classify the result; never raises for the partner."""
        url = f"{self._base}/transaction"
        payload = {"id": payout_id, "webhookUrl": webhook_url}
        try:
            answer = await self._exchange(payout_id, "POST", url, payload, self._submit_timeout)
        except _NOT_SENT_ERRORS as exc:
            outcome: SubmitOutcome = NotSent(_describe(exc))
        except _SENT_ERRORS as exc:
            outcome = Uncertain(_describe(exc))
        except Exception as exc:
            # Not a transport error (e.g. an ASGI app raising through ASGITransport): we cannot
            # know whether the partner saw the request, so it must not be re-POSTed blindly.
            logger.error("submit %s: unexpected %s", payout_id, type(exc).__name__, exc_info=True)
            outcome = Uncertain(f"unexpected {_describe(exc)}")
        else:
            outcome = _classify_submit(payout_id, answer)
        _log_outcome("submit", payout_id, outcome)
        return outcome

    async def check(self, payout_id: str) -> CheckOutcome:
        """GET ``{base}/transaction/{id}`` and classify the result; never raises for the partner."""
        url = f"{self._base}/transaction/{quote(payout_id, safe='')}"
        try:
            answer = await self._exchange(payout_id, "GET", url, None, self._check_timeout)
        except _NOT_SENT_ERRORS + _SENT_ERRORS as exc:
            outcome: CheckOutcome = CheckFailed(_describe(exc))
        except Exception as exc:
            logger.error("check %s: unexpected %s", payout_id, type(exc).__name__, exc_info=True)
            outcome = CheckFailed(f"unexpected {_describe(exc)}")
        else:
            outcome = _classify_check(payout_id, answer)
        _log_outcome("check", payout_id, outcome)
        return outcome

    async def _exchange(
        self,
        payout_id: str,
        method: str,
        url: str,
        payload: dict[str, Any] | None,
        timeouts: httpx.Timeout,
    ) -> _Answer:
        # A redirect of the POST could re-send it elsewhere; the partner never redirects.
        async with self._client_for(payout_id).stream(
            method, url, json=payload, timeout=timeouts, follow_redirects=False
        ) as response:
            body = await _read_capped(response)
            return _Answer(response.status_code, response.headers, body)


async def _read_capped(response: httpx.Response) -> bytes | None:
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > _MAX_BODY:
            return None
    return bytes(buf)


def _classify_submit(payout_id: str, answer: _Answer) -> SubmitOutcome:
    code = answer.status_code
    if code == 200:
        status = _parse_record(payout_id, answer.body)
        # PartnerStatus is a StrEnum, so test for it rather than for the str error description.
        if isinstance(status, PartnerStatus):
            return Accepted(status)
        return Uncertain(f"HTTP 200 with garbage body: {status}")
    if code in _REFUSED:
        return Refused(code, _refusal_reason(code, answer.body))
    if code == 429:
        return RateLimited(_parse_retry_after(answer.headers))
    return Uncertain(f"HTTP {code}")


def _classify_check(payout_id: str, answer: _Answer) -> CheckOutcome:
    code = answer.status_code
    if code == 200:
        status = _parse_record(payout_id, answer.body)
        if isinstance(status, PartnerStatus):
            return Found(status)
        return CheckFailed(f"HTTP 200 with garbage body: {status}")
    if code == 404:
        return NotFound()
    if code == 429:
        return RateLimited(_parse_retry_after(answer.headers))
    return CheckFailed(f"HTTP {code}")


def _parse_record(payout_id: str, body: bytes | None) -> PartnerStatus | str:
    """The record's status, or a short description of what is wrong with the body."""
    if body is None:
        return "too large"
    try:
        data = json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return "not JSON"
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("id") != payout_id:
        return "id does not match the request"
    status = data.get("status")
    if not isinstance(status, str):
        return "status missing or not a string"
    try:
        return PartnerStatus(status)
    except ValueError:
        return f"status {_clean(status)[:32]!r} outside the partner vocabulary"


def _refusal_reason(code: int, body: bytes | None) -> str:
    text = ""
    if body:
        text = body.decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for key in _REASON_KEYS:
                value = data.get(key)
                if isinstance(value, str) and value.strip():
                    text = value
                    break
        elif isinstance(data, str):
            text = data
    text = _clean(text)
    return text[:_MAX_REASON] if text else f"HTTP {code}"


def _clean(text: str) -> str:
    # Reasons end up in logs and the audit trail: one line, no control characters.
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _parse_retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date), or None.

    An HTTP-date is measured against the response's own ``Date`` header when there is one, so
    that clock skew between us and the partner does not matter; a date in the past gives 0.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    ref = _http_date(headers.get("date", ""))
    if ref is None:
        ref = time.time() if now is None else now
    return max(0.0, when - ref)


def _http_date(value: str) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _describe(exc: BaseException) -> str:
    text = _clean(str(exc))
    name = type(exc).__name__
    return f"{name}: {text}"[:_MAX_REASON] if text else name


def _log_outcome(op: str, payout_id: str, outcome: SubmitOutcome | CheckOutcome) -> None:
    if isinstance(outcome, Accepted | Found | NotFound):
        logger.debug("%s %s: %s", op, payout_id, outcome)
    else:
        logger.warning("%s %s: %s", op, payout_id, outcome)
