"""HttpPartner: the partner over HTTP, every answer classified as the package table says."""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Final

import httpx

from .._closing import AsyncClosing
from .._http import MAX_BODY, AiohttpClient, Answer, TransportError, clean_text, describe_error
from .._model import (
    Accepted,
    CheckFailed,
    CheckOutcome,
    Found,
    IdempotencyKeys,
    NotFound,
    NotSent,
    RateLimited,
    Refused,
    SubmitAttempt,
    SubmitOutcome,
    Uncertain,
)
from .._policy import Policy
from ._codec import ExerciseCodec, PartnerCodec, PartnerRecord, PartnerRequest

__all__ = ["HttpPartner"]

# Thousands of slow calls in flight (answers take up to 10 s, 504s 30 s): at 200 new payouts/s
# that is 2,000 open POSTs. Beyond it, calls wait for a connection up to connect_timeout and then
# fail as NotSent, which the lifecycle retries.
_MAX_CONNECTIONS = 2048

log = logging.getLogger("resilient_payout.partner")

_MAX_REASON: Final = 200
_MAX_REF: Final = 200
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


class HttpPartner(AsyncClosing):
    """The partner over HTTP, classifying every answer as the module table says.

    Without ``client`` it owns an aiohttp connection pool sized for thousands of slow concurrent
    calls (see :mod:`resilient_payout._http` for why not httpx there), opened on first use and
    closed by :meth:`aclose` (or ``async with``). With an injected :class:`httpx.AsyncClient`
    (ASGI apps in tests, mocks, proxies, client certificates) that client is used as it is and
    never closed here. Timeouts come from the policy per request either way, and redirects are
    never followed.

    ``codec`` speaks the partner's dialect (request bodies, headers, status words, where its
    reference is); by default :class:`~resilient_payout.partner.ExerciseCodec`. Its
    ``idempotency`` is this partner's.
    """

    def __init__(
        self,
        base_url: str,
        *,
        client: httpx.AsyncClient | None = None,
        policy: Policy | None = None,
        codec: PartnerCodec | None = None,
    ) -> None:
        self.codec: PartnerCodec = codec if codec is not None else ExerciseCodec()
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

    @property
    def idempotency(self) -> IdempotencyKeys | None:
        """Whether the partner's POST honours an idempotency key (the codec's declaration)."""
        return self.codec.idempotency

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        """POST the codec's request and classify the result; never raises for the partner."""
        payout_id = attempt.payout_id
        try:
            request = self.codec.submit_request(attempt)
        except ValueError as exc:
            # The codec says this request cannot be made (an amount the partner cannot take):
            # nothing left this process, and sending it again would fail the same way. On a
            # re-send an earlier send may have landed, so that is no proof: uncertain.
            reason = f"request not encodable: {_reason(exc)}"
            outcome: SubmitOutcome = Refused(0, reason) if attempt.send == 1 else Uncertain(reason)
            _log_outcome("submit", payout_id, outcome)
            return outcome
        except Exception as exc:
            # A codec bug: nothing was sent, but a bug must never lead to a new attempt either.
            log.error("submit %s: the codec raised %s", payout_id, type(exc).__name__,
                      exc_info=True)  # fmt: skip
            return Uncertain(f"codec raised {_reason(exc)}")
        try:
            answer = await self._exchange(request, self._submit_timeout)
        except TransportError as exc:
            # The reason may quote the partner's bytes (a malformed status line): cleaned, as
            # it goes to logs and the audit trail.
            reason = clean_text(exc.reason)[:_MAX_REASON]
            outcome = Uncertain(reason) if exc.sent else NotSent(reason)
        except _NOT_SENT_ERRORS as exc:
            outcome = NotSent(_reason(exc))
        except _SENT_ERRORS as exc:
            outcome = Uncertain(_reason(exc))
        except Exception as exc:
            # Not a transport error (e.g. an ASGI app raising through ASGITransport, or a codec
            # failing): we cannot know whether the partner saw the request, so it must not be
            # re-POSTed blindly.
            log.error("submit %s: unexpected %s", payout_id, type(exc).__name__, exc_info=True)
            outcome = Uncertain(f"unexpected {_reason(exc)}")
        else:
            outcome = self._classify_submit(attempt, answer)
        _log_outcome("submit", payout_id, outcome)
        return outcome

    async def check(self, payout_id: str, partner_ref: str | None = None) -> CheckOutcome:
        """GET the codec's status request and classify the result; never raises for the
        partner."""
        try:
            request = self.codec.check_request(payout_id, partner_ref)
            answer = await self._exchange(request, self._check_timeout)
        except TransportError as exc:
            outcome: CheckOutcome = CheckFailed(clean_text(exc.reason)[:_MAX_REASON])
        except _NOT_SENT_ERRORS + _SENT_ERRORS as exc:
            outcome = CheckFailed(_reason(exc))
        except Exception as exc:
            log.error("check %s: unexpected %s", payout_id, type(exc).__name__, exc_info=True)
            outcome = CheckFailed(f"unexpected {_reason(exc)}")
        else:
            outcome = self._classify_check(payout_id, partner_ref, answer)
        _log_outcome("check", payout_id, outcome)
        return outcome

    async def _exchange(self, request: PartnerRequest, timeouts: httpx.Timeout) -> Answer:
        url = self._base + request.path
        method, payload, headers = request.method, request.json, dict(request.headers)
        if self._own is not None:
            assert timeouts.connect is not None
            assert timeouts.read is not None
            return await self._own.request(
                method,
                url,
                payload,
                headers=headers,
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.read,
                # sock_read bounds each read, not the exchange: a partner trickling bytes must
                # not keep a POST open past submit_deadline (> connect + read).
                total_timeout=timeouts.connect + timeouts.read,
            )
        assert self._client is not None
        # A redirect of the POST could re-send it elsewhere; the partner never redirects.
        async with self._client.stream(
            method, url, json=payload, headers=headers, timeout=timeouts, follow_redirects=False
        ) as response:
            body = await _read_capped(response)
            return Answer(response.status_code, response.headers, body)

    def _classify_submit(self, attempt: SubmitAttempt, answer: Answer) -> SubmitOutcome:
        code = answer.status_code
        if code == 200:
            record = self._record(attempt.payout_id, None, answer.body)
            if isinstance(record, PartnerRecord):
                return Accepted(record.status, record.partner_ref)
            return Uncertain(f"HTTP 200 with garbage body: {record}")
        if code in _REFUSED:
            return Refused(code, _refusal_reason(code, answer.body))
        if code == 429:
            return RateLimited(_parse_retry_after(answer.headers))
        if code == 409 and self.codec.idempotency is not None:
            # The key's first request is still being processed: ask again later, same key.
            retry_after = _parse_retry_after(answer.headers)
            return Uncertain("HTTP 409: a request with this idempotency key is in progress",
                             retry_after)  # fmt: skip
        return Uncertain(f"HTTP {code}")

    def _classify_check(
        self, payout_id: str, partner_ref: str | None, answer: Answer
    ) -> CheckOutcome:
        code = answer.status_code
        if code == 200:
            record = self._record(payout_id, partner_ref, answer.body)
            if isinstance(record, PartnerRecord):
                return Found(record.status, record.partner_ref)
            return CheckFailed(f"HTTP 200 with garbage body: {record}")
        return _classify_check_error(answer)

    def _record(
        self, payout_id: str, partner_ref: str | None, body: bytes | None
    ) -> PartnerRecord | str:
        """The partner's record, or a short description of what is wrong with the body."""
        if body is None:
            return "too large"
        try:
            data = json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            return "not JSON"
        try:
            record = self.codec.read_record(data, payout_id, partner_ref)
        except (ValueError, TypeError, KeyError) as exc:
            return clean_text(str(exc))[:_MAX_REASON] or type(exc).__name__
        ref = record.partner_ref
        if ref is not None and not (isinstance(ref, str) and 0 < len(ref) <= _MAX_REF):
            return "partner reference is not a string of 1-200 characters"
        return record


async def _read_capped(response: httpx.Response) -> bytes | None:
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > MAX_BODY:
            return None
    return bytes(buf)


def _classify_check_error(answer: Answer) -> CheckOutcome:
    code = answer.status_code
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
