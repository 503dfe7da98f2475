"""``create_app``'s fast paths answer exactly as the FastAPI routes they stand in for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import Request

from resilient_payout.service import ServiceSettings
from resilient_payout.testing import VIRTUAL_TIME_BACKEND
from resilient_payout.testing.mock_partner import MockPartnerConfig
from tests.integration.conftest import ServiceStack, service_stack

pytestmark = pytest.mark.anyio

QUIET = MockPartnerConfig(seed=1, p_timeout=0.0, p_webhook=0.0, p_completed=1.0)
JSON = {"content-type": "application/json"}

# (method, path, body, headers): plain cases, every error the hot routes answer, and requests
# the fast paths leave to FastAPI (odd `wait` values, HEAD, a trailing slash).
REQUESTS: list[tuple[str, str, bytes | None, dict[str, str]]] = [
    ("POST", "/pay/transaction", b'{"id": "tx-1", "amount": 10}', JSON),
    ("POST", "/pay/transaction", b'{"amount": 10, "id": "tx-1"}', JSON),
    ("POST", "/pay/transaction", b'{"id": "tx-1", "amount": 11}', JSON),
    ("POST", "/pay/transaction", b'{"id": "tx-2"}', {**JSON, "Prefer": "wait=5"}),
    ("POST", "/pay/transaction", b'{"id": "tx-3"}', {**JSON, "Prefer": "respond-async, wait=0"}),
    ("POST", "/pay/transaction", b'{"id": "tx-4", "x": NaN}', JSON),
    ("POST", "/pay/transaction", b'{"id": ', JSON),
    ("POST", "/pay/transaction", b"", JSON),
    ("POST", "/pay/transaction", b'{"id": "tx-5"}', {"content-type": "text/plain"}),
    ("POST", "/pay/transaction", b'{"id": "' + b"x" * 20_000 + b'"}', JSON),
    ("POST", "/pay/transaction", b"[1, 2]", JSON),
    ("GET", "/pay/transaction/tx-1", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=2", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=0", None, {}),
    ("GET", "/pay/transaction/tx-2?wait=1.5", None, {}),
    ("GET", "/pay/transaction/nope", None, {}),
    ("GET", "/pay/transaction/nope?wait=0.25", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=-1", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=abc", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=31", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=1e1", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=", None, {}),
    ("GET", "/pay/transaction/tx-1?wait=1&wait=2", None, {}),
    ("GET", "/pay/transaction/tx-1/", None, {}),
    ("GET", "/pay/transaction/", None, {}),
    ("HEAD", "/pay/transaction/tx-1", None, {}),
    ("PUT", "/pay/transaction", b"{}", JSON),
    ("POST", "/pay/webhook", b'{"id": "tx-1", "status": "completed"}', JSON),
    ("POST", "/pay/webhook", b'{"id": "tx-1", "status": "declined"}', JSON),
    ("POST", "/pay/webhook", b'{"id": "unknown", "status": "completed"}', JSON),
    ("POST", "/pay/webhook", b'{"id": "tx-1", "status": "nonsense"}', JSON),
    ("POST", "/pay/webhook", b"not json", JSON),
    ("POST", "/pay/webhook", b"x" * 70_000, JSON),
]


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


@asynccontextmanager
async def running(fast: bool, verify_webhooks: bool = False) -> AsyncIterator[ServiceStack]:
    cfg = ServiceSettings(storage_url="memory://", public_url="http://service", route_prefix="/pay")
    async with service_stack(cfg, QUIET, verify_webhooks=verify_webhooks) as svc:
        if not fast:
            svc.app.fast_paths = None  # type: ignore[attr-defined]
        yield svc


def _answer(r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    return r.status_code, list(r.headers.multi_items()), r.content


def _request_counts(metrics_text: str) -> list[str]:
    """Request counts and latencies (on virtual time), without the wall-clock ``_created``."""
    lines = metrics_text.splitlines()
    return sorted(
        ln for ln in lines if ln.startswith("resilient_payout_http") and "_created" not in ln
    )


async def _answers(fast: bool, verify_webhooks: bool = False) -> tuple[list[Any], list[str]]:
    async with running(fast, verify_webhooks) as svc:
        got = []
        for method, path, body, headers in REQUESTS:
            r = await svc.http.request(method, path, content=body, headers=headers)
            got.append((method, path, _answer(r)))
        metrics = await svc.http.get("/pay/metrics")
    return got, _request_counts(metrics.text)


@pytest.mark.parametrize(
    ("verify_webhooks", "expected"),
    [(False, {200, 307, 400, 404, 405, 409, 413, 422}), (True, {401})],
)
async def test_every_answer_and_metric_is_the_one_fastapi_gives(
    verify_webhooks: bool, expected: set[int]
) -> None:
    fast, fast_metrics = await _answers(True, verify_webhooks)
    slow, slow_metrics = await _answers(False, verify_webhooks)
    assert fast == slow
    assert fast_metrics == slow_metrics
    assert expected.issubset({answer[0] for _, _, answer in fast})


async def test_plain_requests_skip_the_fastapi_stack_and_others_do_not() -> None:
    async with running(fast=True) as svc:
        fast = svc.app.fast_paths  # type: ignore[attr-defined]
        scope: dict[str, Any] = {"type": "http", "query_string": b"", "root_path": ""}
        for method, path, query in [
            ("POST", "/pay/transaction", b""),
            ("POST", "/pay/webhook", b""),
            ("GET", "/pay/transaction/tx-1", b""),
            ("GET", "/pay/transaction/tx-1", b"wait=30"),
        ]:
            assert fast.match({**scope, "method": method, "path": path, "query_string": query})
        for method, path, query in [
            ("GET", "/pay/transaction/tx-1", b"wait=30.5"),
            ("GET", "/pay/transaction/tx-1", b"wait=01"),
            ("GET", "/pay/transaction/a/b", b""),
            ("HEAD", "/pay/transaction/tx-1", b""),
            ("POST", "/transaction", b""),
            ("GET", "/pay/healthz", b""),
        ]:
            assert (
                fast.match({**scope, "method": method, "path": path, "query_string": query}) is None
            )
        plain = {**scope, "method": "POST", "path": "/pay/transaction"}
        assert fast.match({**plain, "root_path": "/behind-proxy"}) is None


async def test_a_middleware_or_handler_added_later_sees_the_hot_routes_again() -> None:
    async with running(fast=True) as svc:
        seen: list[str] = []

        @svc.app.middleware("http")
        async def record(request: Request, call_next: Any) -> Any:
            seen.append(request.url.path)
            return await call_next(request)

        r = await svc.http.post("/pay/transaction", json={"id": "tx-9"})
        assert r.status_code == 200
        assert seen == ["/pay/transaction"]
