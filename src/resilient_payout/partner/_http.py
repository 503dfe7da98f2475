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

Status checks: 200 -> ``Found(status)``, 404 with an empty or JSON body -> ``NotFound()`` (a 404
page in HTML or text is a gateway's, not the partner's: ``CheckFailed``), 429 -> ``RateLimited``,
anything else -> ``CheckFailed(reason)``. A ``Retry-After`` is passed on as given; the client
caps it at ``Policy.max_retry_after``.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import quote

import httpx

from ._closing import AsyncClosing
from ._http import MAX_BODY, AiohttpClient, Answer, TransportError, clean_text, describe_error
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

# Thousands of slow calls in flight (answers take up to 10 s, 504s 30 s): at 200 new payouts/s
# that is 2,000 open POSTs. Beyond it, calls wait for a connection up to connect_timeout and then
# fail as NotSent, which the lifecycle retries.
_MAX_CONNECTIONS = 2048

log = logging.getLogger("resilient_payout.partner")

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


class HttpPartner(AsyncClosing):
    """The partner over HTTP, classifying every answer as the module table says.

    Without ``client`` it owns an aiohttp connection pool sized for thousands of slow concurrent
    calls (see :mod:`resilient_payout._http` for why not httpx there), opened on first use and
    closed by :meth:`aclose` (or ``async with``). With an injected :class:`httpx.AsyncClient`
    (ASGI apps in tests, mocks, proxies, client certificates) that client is used as it is and
    never closed here. Timeouts come from the policy per request either way, and redirects are
    never followed.
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
        policy = self._policy
        # Write and pool waits are bounded by the connect timeout, so that a pool wait fails as
        # NotSent; the default client also caps the whole exchange at connect + read, below
        # policy.submit_deadline (an injected httpx client bounds each read only).
        self._submit_timeout = httpx.Timeout(
            connect=policy.connect_timeout,
            read=policy.read_timeout,
            write=policy.connect_timeout,
            pool=policy.connect_timeout,
        )
        self._check_timeout = httpx.Timeout(
            connect=policy.connect_timeout,
            read=policy.check_timeout,
            write=policy.connect_timeout,
            pool=policy.connect_timeout,
        )
        self._client = client
        self._own: AiohttpClient | None = (
            AiohttpClient(max_connections=_MAX_CONNECTIONS) if client is None else None
        )

    async def aclose(self) -> None:
        """Close the connection pool if this partner created it."""
        if self._own is not None:
            await self._own.aclose()

    async def submit(self, payout_id: str, webhook_url: str) -> SubmitOutcome:
        """POST ``{base}/transaction`` and classify the result; never raises for the partner."""
        url = f"{self._base}/transaction"
        payload = {"id": payout_id, "webhookUrl": webhook_url}
        try:
            answer = await self._exchange("POST", url, payload, self._submit_timeout)
        except TransportError as exc:
            # The reason may quote the partner's bytes (a malformed status line): cleaned, as
            # it goes to logs and the audit trail.
            reason = clean_text(exc.reason)[:_MAX_REASON]
            outcome: SubmitOutcome = Uncertain(reason) if exc.sent else NotSent(reason)
        except _NOT_SENT_ERRORS as exc:
            outcome = NotSent(_reason(exc))
        except _SENT_ERRORS as exc:
            outcome = Uncertain(_reason(exc))
        except Exception as exc:
            # Not a transport error (e.g. an ASGI app raising through ASGITransport): we cannot
            # know whether the partner saw the request, so it must not be re-POSTed blindly.
            log.error("submit %s: unexpected %s", payout_id, type(exc).__name__, exc_info=True)
            outcome = Uncertain(f"unexpected {_reason(exc)}")
        else:
            outcome = _classify_submit(payout_id, answer)
        _log_outcome("submit", payout_id, outcome)
        return outcome

    async def check(self, payout_id: str) -> CheckOutcome:
        """GET ``{base}/transaction/{id}`` and classify the result; never raises for the partner."""
        url = f"{self._base}/transaction/{quote(payout_id, safe='')}"
        try:
            answer = await self._exchange("GET", url, None, self._check_timeout)
        except TransportError as exc:
            outcome: CheckOutcome = CheckFailed(clean_text(exc.reason)[:_MAX_REASON])
        except _NOT_SENT_ERRORS + _SENT_ERRORS as exc:
            outcome = CheckFailed(_reason(exc))
        except Exception as exc:
            log.error("check %s: unexpected %s", payout_id, type(exc).__name__, exc_info=True)
            outcome = CheckFailed(f"unexpected {_reason(exc)}")
        else:
            outcome = _classify_check(payout_id, answer)
        _log_outcome("check", payout_id, outcome)
        return outcome

    async def _exchange(
        self,
        method: str,
        url: str,
        payload: dict[str, Any] | None,
        timeouts: httpx.Timeout,
    ) -> Answer:
        if self._own is not None:
            assert timeouts.connect is not None
            assert timeouts.read is not None
            return await self._own.request(
                method,
                url,
                payload,
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.read,
                # sock_read bounds each read, not the exchange: a partner trickling bytes must
                # not keep a POST open past submit_deadline (> connect + read).
                total_timeout=timeouts.connect + timeouts.read,
            )
        assert self._client is not None
        # A redirect of the POST could re-send it elsewhere; the partner never redirects.
        async with self._client.stream(
            method, url, json=payload, timeout=timeouts, follow_redirects=False
        ) as response:
            body = await _read_capped(response)
            return Answer(response.status_code, response.headers, body)


async def _read_capped(response: httpx.Response) -> bytes | None:
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > MAX_BODY:
            return None
    return bytes(buf)


def _classify_submit(payout_id: str, answer: Answer) -> SubmitOutcome:
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


def _classify_check(payout_id: str, answer: Answer) -> CheckOutcome:
    code = answer.status_code
    if code == 200:
        status = _parse_record(payout_id, answer.body)
        if isinstance(status, PartnerStatus):
            return Found(status)
        return CheckFailed(f"HTTP 200 with garbage body: {status}")
    if code == 404:
        if _partner_404(answer.body):
            return NotFound()
        # A 404 page of a gateway or a misrouted GET says nothing about the partner's records,
        # and a NotFound after the window is taken as proof that the transfer never happened.
        return CheckFailed("HTTP 404 with a body that is not the partner's JSON")
    if code == 429:
        return RateLimited(_parse_retry_after(answer.headers))
    return CheckFailed(f"HTTP {code}")


def _partner_404(body: bytes | None) -> bool:
    """Whether a 404's body can be the partner's: empty, or JSON (never an HTML page)."""
    if body is None:
        return False
    if not body.strip():
        return True
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


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
        return f"status {clean_text(status)[:32]!r} outside the partner vocabulary"


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
    text = clean_text(text)
    return text[:_MAX_REASON] if text else f"HTTP {code}"


def _parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
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


def _reason(exc: BaseException) -> str:
    return describe_error(exc)[:_MAX_REASON]


def _log_outcome(op: str, payout_id: str, outcome: SubmitOutcome | CheckOutcome) -> None:
    if isinstance(outcome, Accepted | Found | NotFound):
        log.debug("%s %s: %s", op, payout_id, outcome)
    else:
        log.warning("%s %s: %s", op, payout_id, outcome)
