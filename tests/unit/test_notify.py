"""Notifiers and the delivery round, on virtual time (no test here sleeps for real)."""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import respx

from resilient_payout._errors import PayoutError
from resilient_payout._model import PayoutStatus
from resilient_payout._policy import Policy
from resilient_payout.notify import (
    CallbackNotifier,
    HttpNotifier,
    NotificationFailed,
    Notifier,
    deliver_with_retries,
    next_round_delay,
)
from resilient_payout.testing import VIRTUAL_TIME_BACKEND

pytestmark = pytest.mark.anyio

PUSH_URL = "http://127.0.0.1:3100/transaction"
POLICY = Policy()  # notify_backoff_initial=0.5, notify_backoff_max=60, 4 attempts per round


@asynccontextmanager
async def on_httpx(**kwargs: Any) -> AsyncIterator[HttpNotifier]:
    """An HttpNotifier on an injected httpx client, which respx intercepts. The default (aiohttp)
    client is tested against real sockets in test_default_transport.py."""
    async with httpx.AsyncClient() as client, HttpNotifier(PUSH_URL, client=client, **kwargs) as n:
        yield n


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


@pytest.fixture(autouse=True)
def real_time_budget() -> Iterator[None]:
    # Backoffs reach seconds of virtual time; spending them for real would mean a broken setup.
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < 0.5


@pytest.fixture
def max_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every full-jitter wait its upper bound, so the schedule is exact."""
    # tenacity's wait_random_exponential draws from the global random module.
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


class Flaky:
    """A notifier failing ``failures`` times (or hanging), then acknowledging."""

    def __init__(self, failures: int = 0, *, hang: bool = False) -> None:
        self.failures = failures
        self.hang = hang
        self.calls: list[tuple[str, PayoutStatus, float]] = []

    async def deliver(self, payout_id: str, status: PayoutStatus) -> None:
        self.calls.append((payout_id, status, anyio.current_time()))
        if self.hang:
            await anyio.sleep_forever()
        if len(self.calls) <= self.failures:
            raise NotificationFailed("HTTP 503")


def gaps(n: Flaky) -> list[float]:
    return [b[2] - a[2] for a, b in itertools.pairwise(n.calls)]


# --- HttpNotifier ------------------------------------------------------------------------------


async def test_flat_body_is_put_exactly(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.put(PUSH_URL).respond(200)

    async with on_httpx() as n:
        await n.deliver("p1", PayoutStatus.COMPLETED)

    request = route.calls.last.request
    assert request.method == "PUT"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.content) == {"id": "p1", "status": "completed"}


async def test_nested_body_is_what_the_historic_client_parses(
    respx_mock: respx.MockRouter,
) -> None:
    route = respx_mock.put(PUSH_URL).respond(204)

    async with on_httpx(body="nested") as n:
        await n.deliver("p1", PayoutStatus.DECLINED)

    assert json.loads(route.calls.last.request.content) == {
        "status": {"id": "p1", "status": "declined"}
    }


async def test_method_is_a_setting(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(PUSH_URL).respond(200)

    async with on_httpx(method="POST") as n:
        await n.deliver("p1", PayoutStatus.FAILED)

    assert route.call_count == 1


@pytest.mark.parametrize("code", [200, 201, 202, 204, 299])
async def test_any_2xx_acknowledges(respx_mock: respx.MockRouter, code: int) -> None:
    route = respx_mock.put(PUSH_URL).respond(code)

    async with on_httpx() as n:
        await n.deliver("p1", PayoutStatus.COMPLETED)

    assert route.call_count == 1


@pytest.mark.parametrize("code", [500, 503, 404, 400, 301, 304, 100])
async def test_non_2xx_is_not_acknowledged(respx_mock: respx.MockRouter, code: int) -> None:
    respx_mock.put(PUSH_URL).respond(code)

    async with on_httpx() as n:
        with pytest.raises(NotificationFailed, match=f"HTTP {code}"):
            await n.deliver("p1", PayoutStatus.COMPLETED)


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectTimeout("timed out"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_network_errors_and_timeouts_are_not_acknowledged(
    respx_mock: respx.MockRouter, exc: Exception
) -> None:
    respx_mock.put(PUSH_URL).mock(side_effect=exc)

    async with on_httpx() as n:
        with pytest.raises(NotificationFailed, match=type(exc).__name__) as info:
            await n.deliver("p1", PayoutStatus.COMPLETED)

    assert info.value.__cause__ is exc


async def test_timeout_is_passed_per_request(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.put(PUSH_URL).respond(200)

    async with httpx.AsyncClient(timeout=99.0) as client:
        await HttpNotifier(PUSH_URL, client=client, timeout=3.0).deliver(
            "p1", PayoutStatus.COMPLETED
        )

    assert route.calls.last.request.extensions["timeout"] == {
        "connect": 3.0,
        "read": 3.0,
        "write": 3.0,
        "pool": 3.0,
    }


async def test_owned_client_is_closed_by_aclose_injected_one_is_not() -> None:
    owned = HttpNotifier(PUSH_URL)
    assert owned._own is not None
    await owned.aclose()
    assert owned._own.is_closed
    with pytest.raises(NotificationFailed, match="closed"):
        await owned.deliver("p1", PayoutStatus.COMPLETED)

    async with httpx.AsyncClient() as client:
        await HttpNotifier(PUSH_URL, client=client).aclose()
        assert not client.is_closed


def test_unknown_body_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="flat"):
        HttpNotifier(PUSH_URL, body="xml")  # type: ignore[arg-type]


def test_notification_failed_is_a_payout_error() -> None:
    assert issubclass(NotificationFailed, PayoutError)


async def test_notifiers_satisfy_the_protocol() -> None:
    async def fn(payout_id: str, status: PayoutStatus) -> None:
        pass

    async with on_httpx() as n:
        assert isinstance(n, Notifier)
    assert isinstance(CallbackNotifier(fn), Notifier)


# --- CallbackNotifier ------------------------------------------------------------------------


async def test_callback_notifier_calls_the_function() -> None:
    got: list[tuple[str, PayoutStatus]] = []

    async def fn(payout_id: str, status: PayoutStatus) -> None:
        got.append((payout_id, status))

    await CallbackNotifier(fn).deliver("p1", PayoutStatus.DECLINED)

    assert got == [("p1", PayoutStatus.DECLINED)]


async def test_callback_exception_is_a_failed_delivery() -> None:
    async def fn(payout_id: str, status: PayoutStatus) -> None:
        raise ConnectionError("app is down")

    with pytest.raises(NotificationFailed, match="app is down") as info:
        await CallbackNotifier(fn).deliver("p1", PayoutStatus.DECLINED)
    assert isinstance(info.value.__cause__, ConnectionError)


# --- deliver_with_retries on virtual time ------------------------------------------------------


async def test_first_push_acknowledged_is_delivered_without_waiting() -> None:
    n = Flaky()
    start = anyio.current_time()

    assert await deliver_with_retries(n, "p1", PayoutStatus.COMPLETED, POLICY) is True

    assert len(n.calls) == 1
    assert anyio.current_time() == start


async def test_fails_twice_then_succeeds_within_backoff_bounds() -> None:
    n = Flaky(failures=2)
    start = anyio.current_time()

    assert await deliver_with_retries(n, "p1", PayoutStatus.COMPLETED, POLICY) is True

    assert [c[:2] for c in n.calls] == [("p1", PayoutStatus.COMPLETED)] * 3
    elapsed = anyio.current_time() - start
    # Full jitter: waits are uniform in [0, 0.5] then [0, 1.0].
    assert 0.0 <= elapsed <= 0.5 + 1.0


async def test_backoff_doubles_from_initial(max_jitter: None) -> None:
    n = Flaky(failures=3)

    assert await deliver_with_retries(n, "p1", PayoutStatus.COMPLETED, POLICY) is True

    assert gaps(n) == pytest.approx([0.5, 1.0, 2.0])


async def test_backoff_is_capped(max_jitter: None) -> None:
    policy = POLICY.replace(notify_backoff_max=0.7)
    n = Flaky(failures=3)

    assert await deliver_with_retries(n, "p1", PayoutStatus.COMPLETED, policy) is True

    assert gaps(n) == pytest.approx([0.5, 0.7, 0.7])


async def test_always_failing_gives_up_after_attempts_per_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = Flaky(failures=10**6)

    with caplog.at_level(logging.WARNING, logger="resilient_payout.notify"):
        ok = await deliver_with_retries(n, "p1", PayoutStatus.FAILED, POLICY)

    assert ok is False
    assert len(n.calls) == POLICY.notify_attempts_per_round == 4
    assert "not acknowledged after 4 attempts" in caplog.text


async def test_attempts_per_round_is_a_setting() -> None:
    n = Flaky(failures=10**6)

    ok = await deliver_with_retries(
        n, "p1", PayoutStatus.FAILED, POLICY.replace(notify_attempts_per_round=2)
    )

    assert ok is False
    assert len(n.calls) == 2


async def test_a_hung_push_is_cut_off_at_notify_timeout() -> None:
    policy = POLICY.replace(notify_timeout=10.0, notify_attempts_per_round=2)
    n = Flaky(hang=True)
    start = anyio.current_time()

    assert await deliver_with_retries(n, "p1", PayoutStatus.COMPLETED, policy) is False

    assert len(n.calls) == 2
    elapsed = anyio.current_time() - start
    assert 20.0 <= elapsed <= 20.0 + 0.5


async def test_unexpected_notifier_error_ends_the_round_without_retry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def fn(payout_id: str, status: PayoutStatus) -> None:
        nonlocal calls
        calls += 1
        raise NotImplementedError

    class Buggy:
        async def deliver(self, payout_id: str, status: PayoutStatus) -> None:
            await fn(payout_id, status)

    with caplog.at_level(logging.ERROR, logger="resilient_payout.notify"):
        assert await deliver_with_retries(Buggy(), "p1", PayoutStatus.COMPLETED, POLICY) is False

    assert calls == 1
    assert any(r.exc_info for r in caplog.records)


async def test_http_notifier_retried_until_acknowledged(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.put(PUSH_URL).mock(
        side_effect=[httpx.Response(500), httpx.ConnectError("refused"), httpx.Response(204)]
    )

    async with on_httpx(body="nested") as n:
        ok = await deliver_with_retries(n, "p1", PayoutStatus.COMPLETED, POLICY)

    assert ok is True
    assert route.call_count == 3
    bodies = [json.loads(c.request.content) for c in route.calls]
    assert bodies == [{"status": {"id": "p1", "status": "completed"}}] * 3


# --- next_round_delay ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(0, 4.0), (1, 4.0), (2, 8.0), (3, 16.0), (4, 32.0), (5, 60.0), (50, 60.0), (10**9, 60.0)],
)
def test_next_round_delay_continues_the_backoff_and_is_capped(attempts: int, delay: float) -> None:
    # The round waited up to 0.5, 1 and 2 s between its 4 pushes; the next round waits 4 s.
    assert next_round_delay(attempts, POLICY) == delay


def test_next_round_delay_scales_with_policy() -> None:
    assert next_round_delay(1, POLICY.scaled(0.01)) == pytest.approx(0.04)
    assert next_round_delay(1, POLICY.replace(notify_backoff_initial=0.0)) == 0.0
