"""Pushing final outcomes to the app: the :class:`Notifier` protocol, its HTTP and in-process
implementations, and the retry round used to drain the outbox.

A final transition writes an :class:`~resilient_payout.OutboxEntry` in the same atomic step as the
payout record, so a crash can never lose a notification. Outbox workers deliver each entry until
the app acknowledges it (a round of :func:`deliver_with_retries`; if it gives up, the entry goes
back to the outbox for a later round after :func:`next_round_delay`). Delivery is at least once:
the app may get the same outcome again, but since there is one entry per payout and a final
status never changes, it never gets two different outcomes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from ._closing import AsyncClosing
from ._errors import NotificationFailed
from ._http import AiohttpClient, TransportError
from ._model import PayoutStatus
from ._policy import Policy

__all__ = [
    "CallbackNotifier",
    "HttpNotifier",
    "NotificationFailed",
    "Notifier",
    "deliver_with_retries",
    "next_round_delay",
]

logger = logging.getLogger("resilient_payout.notify")

BodyShape = Literal["flat", "nested"]

# One app backend, answering in milliseconds: a few hundred outcomes/s need a few connections.
_MAX_CONNECTIONS = 100


@runtime_checkable
class Notifier(Protocol):
    """Delivers one final outcome to the app."""

    async def deliver(self, payout_id: str, status: PayoutStatus) -> None:
        """Return once the app acknowledged; raise :class:`NotificationFailed` otherwise."""
        ...


class HttpNotifier(AsyncClosing):
    """``PUT {url}`` with ``{"id", "status"}`` (``body="flat"``) or ``{"status": {"id",
    "status"}}`` (``body="nested"``, what the historic client parses). Any 2xx acknowledges.

    Without ``client`` it owns an aiohttp connection pool (the same lean client as
    :class:`~resilient_payout.HttpPartner`), opened on first use and closed by :meth:`aclose` (or
    ``async with``). An injected :class:`httpx.AsyncClient` is used instead and never closed here;
    note that pushes are cut off by ``notify_timeout``, and httpcore 1.0.9 can leak pool slots
    on such cancellations under contention (encode/httpcore#1093).
    """

    def __init__(
        self,
        url: str,
        *,
        body: BodyShape = "flat",
        client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
        method: str = "PUT",
    ) -> None:
        if body not in ("flat", "nested"):
            raise ValueError(f"body must be 'flat' or 'nested', not {body!r}")
        self.url = url
        self.body: BodyShape = body
        self.method = method
        self._timeout = httpx.Timeout(timeout)
        self._seconds = timeout
        self._client = client
        self._own = AiohttpClient(max_connections=_MAX_CONNECTIONS) if client is None else None

    def payload(self, payout_id: str, status: PayoutStatus) -> dict[str, Any]:
        """The JSON body sent for one outcome."""
        flat = {"id": payout_id, "status": status.value}
        return flat if self.body == "flat" else {"status": flat}

    async def deliver(self, payout_id: str, status: PayoutStatus) -> None:
        payload = self.payload(payout_id, status)
        if self._own is not None:
            try:
                answer = await self._own.request(
                    self.method,
                    self.url,
                    payload,
                    connect_timeout=self._seconds,
                    read_timeout=self._seconds,
                    total_timeout=self._seconds,
                )
            except TransportError as exc:
                raise NotificationFailed(f"push of {payout_id!r} failed: {exc.reason}") from exc
            code = answer.status_code
        else:
            assert self._client is not None
            try:
                response = await self._client.request(
                    self.method, self.url, json=payload, timeout=self._timeout
                )
            except (httpx.RequestError, httpx.InvalidURL) as exc:
                raise NotificationFailed(
                    f"push of {payout_id!r} failed: {type(exc).__name__}"
                ) from exc
            code = response.status_code
        if not 200 <= code < 300:
            raise NotificationFailed(f"push of {payout_id!r} got HTTP {code}")

    async def aclose(self) -> None:
        """Close the connection pool if this notifier created it."""
        if self._own is not None:
            await self._own.aclose()


class CallbackNotifier:
    """Calls ``await fn(payout_id, status)``; returning acknowledges (in-process apps, tests).

    Any exception from ``fn`` is a failed delivery (:class:`NotificationFailed`), to be retried.
    """

    def __init__(self, fn: Callable[[str, PayoutStatus], Awaitable[object]]) -> None:
        self._fn = fn

    async def deliver(self, payout_id: str, status: PayoutStatus) -> None:
        try:
            await self._fn(payout_id, status)
        except NotificationFailed:
            raise
        except Exception as exc:
            raise NotificationFailed(
                f"callback for {payout_id!r} raised {type(exc).__name__}: {exc}"
            ) from exc


async def deliver_with_retries(
    notifier: Notifier, payout_id: str, status: PayoutStatus, policy: Policy
) -> bool:
    """One delivery round: up to ``policy.notify_attempts_per_round`` pushes with jittered
    exponential backoff. True once delivered; False if the round gave up (the caller puts the
    entry back in the outbox).

    Each push is cut off after ``policy.notify_timeout`` (a hung notifier must not hold an outbox
    lease forever; a cut-off push is just one more repeat the app may see). Sleeps go through
    :func:`anyio.sleep`, so a virtual-time loop drives them. An exception other than
    :class:`NotificationFailed` is a notifier bug: it is logged and ends the round without retry.
    """

    async def push() -> None:
        try:
            with anyio.fail_after(policy.notify_timeout):
                await notifier.deliver(payout_id, status)
        except TimeoutError as exc:
            raise NotificationFailed(
                f"push of {payout_id!r} took longer than {policy.notify_timeout:g} s"
            ) from exc

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.notify_attempts_per_round),
        wait=wait_random_exponential(
            multiplier=policy.notify_backoff_initial, max=policy.notify_backoff_max
        ),
        retry=retry_if_exception_type(NotificationFailed),
        sleep=anyio.sleep,
        before_sleep=_log_retry,
        reraise=False,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await push()
    except RetryError as exc:
        logger.warning(
            "notify %s: not acknowledged after %d attempts: %s",
            payout_id,
            exc.last_attempt.attempt_number,
            exc.last_attempt.exception(),
        )
        return False
    except Exception:
        logger.error("notify %s: notifier raised unexpectedly", payout_id, exc_info=True)
        return False
    logger.debug("notify %s: delivered %s", payout_id, status.value)
    return True


def next_round_delay(attempts: int, policy: Policy) -> float:
    """Delay before the next delivery round, after ``attempts`` failed rounds (>= 1).

    Continues the exponential sequence of the in-round backoff (a round already waited up to
    ``notify_backoff_initial * 2 ** (notify_attempts_per_round - 2)``), capped at
    ``notify_backoff_max``.
    """
    if policy.notify_backoff_initial <= 0:
        return 0.0
    exponent = max(0, policy.notify_attempts_per_round - 1) + max(0, attempts - 1)
    # Clamped so that 2.0 ** exponent cannot overflow; the cap is reached long before anyway.
    delay = policy.notify_backoff_initial * 2.0 ** min(exponent, 1000)
    return min(policy.notify_backoff_max, delay)


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    logger.info(
        "notify attempt %d failed (%s); retrying in %.3g s", state.attempt_number, exc, wait
    )
