"""Fault injection: the example service through partner, push-endpoint and storage outages.

Everything runs in this process, on the stack of conftest.py, with a :class:`Faulty` transport in
front of the partner that refuses connections or hangs past our read timeout on demand; pushes go
to a callback that can be "down". Partner faults run on virtual time at the partner's real
durations. Storage outages need real I/O (an SQLite write lock held by another connection; a TCP
proxy in front of PostgreSQL or Redis, stopped and restarted), so they run on real time against a
time-scaled partner.

After each scenario :func:`settle_and_check` asserts that every transfer is final and equal to
the partner's settled truth, that nothing was paid twice and that every push is the one final
status of its transfer.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from resilient_payout.service import PROBLEM_TYPE_PREFIX, ServiceSettings
from resilient_payout.storage import Storage
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.storage.postgres import PostgresStorage
from resilient_payout.storage.redis import RedisStorage
from resilient_payout.storage.sqlite import SQLiteStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND
from resilient_payout.testing.mock_partner import MockPartnerConfig
from tests.contract.conftest import (
    TcpProxy,
    delete_prefix,
    drop_schema,
    fresh_prefix,
    fresh_schema,
    server_url,
    with_port,
)
from tests.integration.conftest import ServiceStack, service_stack

pytestmark = pytest.mark.anyio

# Webhooks always, no 504s unless a test asks: each scenario isolates its own fault.
BASE = MockPartnerConfig(seed="faults", p_timeout=0.0, p_webhook=1.0)
REAL_SCALE = 0.02
"""Time scale of the real-time (storage) scenarios: the partner's 120 s late landing is 2.4 s."""


class Faulty(httpx.AsyncBaseTransport):
    """In front of the partner: ``refuse`` makes every call fail with ``ConnectError`` (nothing
    sent); ``hang_first_post`` makes each id's first POST hang until its read timeout, reaching
    the partner for every other id and never for the rest."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.refuse = False
        self.hang_first_post = False
        self.refused = 0
        self.hung: dict[str, bool] = {}
        """id -> whether its hung POST reached the partner."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.refuse:
            self.refused += 1
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if self.hang_first_post and request.method == "POST":
            payout_id = json.loads(request.content)["id"]
            if payout_id not in self.hung:
                read = request.extensions["timeout"]["read"]
                deadline = anyio.current_time() + read
                reached = len(self.hung) % 2 == 0
                self.hung[payout_id] = reached
                if reached:  # the partner gets it and answers; the answer never comes back
                    answer = await self.inner.handle_async_request(request)
                    await answer.aread()
                # ASGITransport has no timeouts of its own: play httpcore's read timeout.
                await anyio.sleep(max(0.0, deadline - anyio.current_time()))
                raise httpx.ReadTimeout("timed out", request=request)
        return await self.inner.handle_async_request(request)


class Stack(ServiceStack):
    @property
    def faulty(self) -> Faulty:
        assert isinstance(self.partner_transport, Faulty)
        return self.partner_transport

    @property
    def scale(self) -> float:
        scale: float = self.app.state.settings.time_scale
        return scale

    async def submit(self, ids: list[str]) -> None:
        for payout_id in ids:
            answer = await self.http.post("/transaction", json={"id": payout_id, "amount": 5})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"id": payout_id, "status": "pending"}


@asynccontextmanager
async def stack(
    config: MockPartnerConfig = BASE,
    storage: Callable[[], Storage] = MemoryStorage,
    storage_url: str = "memory://",
    scale: float = 1.0,
) -> AsyncIterator[Stack]:
    settings = ServiceSettings(
        storage_url=storage_url, public_url="http://service", time_scale=scale
    )
    async with service_stack(
        settings,
        config.replace(time_scale=scale),
        storage=storage,
        partner_transport=Faulty,
        stack_type=Stack,
    ) as st:
        assert isinstance(st, Stack)
        yield st


async def settle_and_check(st: Stack, ids: list[str], limit: float = 1_500.0) -> dict[str, str]:
    """Wait (at most ``limit`` scenario seconds) until the partner's truth is settled and every
    transfer is final and pushed; assert they all match. Returns id -> final status."""
    step = 5.0 * st.scale
    with anyio.fail_after(limit * st.scale):
        while True:
            truth = st.partner.truth()["transactions"]
            if all(truth.get(i, {}).get("settled", True) for i in ids):
                break
            await anyio.sleep(step)
        finals: dict[str, str] = {}
        for payout_id in ids:
            while True:
                answer = await st.http.get(f"/transaction/{payout_id}", params={"wait": 1})
                assert answer.status_code == 200, answer.text
                if (status := answer.json()["status"]) != "pending":
                    finals[payout_id] = status
                    break
        # Outbox delivery trails the final status a little.
        while not all(st.pushed(i) for i in ids):  # noqa: ASYNC110 - polled, like the rest
            await anyio.sleep(step)
    truth = st.partner.truth()["transactions"]
    expected = {
        i: "failed" if truth.get(i, {}).get("status") is None else truth[i]["status"] for i in ids
    }
    assert finals == expected
    assert st.partner.stats()["double_payments"] == []
    assert not any(truth.get(i, {}).get("double_payment") for i in ids)
    # One final status per transfer, and every push (repeats allowed) says exactly that.
    assert {i: set(st.pushed(i)) for i in ids} == {i: {finals[i]} for i in ids}
    assert st.client.stats.conflicts == 0
    return finals


def new_ids(n: int) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"f-{run}-{i}" for i in range(n)]


# -- partner faults, on virtual time ---------------------------------------------------------


class TestPartnerFaults:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        return VIRTUAL_TIME_BACKEND

    async def test_partner_down_for_a_while_posts_are_retried_once_it_is_back(self) -> None:
        async with stack() as st:
            st.faulty.refuse = True
            ids = new_ids(20)
            await st.submit(ids)
            await anyio.sleep(12)  # within the send backoff (1+2+4+8+16 s, 5 retries)
            assert st.faulty.refused >= 3 * len(ids)
            assert st.partner.truth()["transactions"] == {}
            st.faulty.refuse = False
            finals = await settle_and_check(st, ids)
        truth = st.partner.truth()["transactions"]
        assert set(finals.values()) <= {"completed", "declined"}  # none lost
        assert all(truth[i]["posts"] == 1 for i in ids)  # none doubled

    async def test_partner_never_reachable_ends_failed_and_nothing_was_paid(self) -> None:
        async with stack() as st:
            st.faulty.refuse = True
            ids = new_ids(5)
            await st.submit(ids)
            finals = await settle_and_check(st, ids)
        assert set(finals.values()) == {"failed"}
        assert st.partner.stats()["posts_total"] == 0

    async def test_500s_html_truncated_json_and_dropped_connections(self) -> None:
        config = BASE.replace(p_500=0.25, p_drop=0.2, p_garbage=0.3, p_timeout=0.1)
        async with stack(config) as st:
            ids = new_ids(40)
            await st.submit(ids)
            await settle_and_check(st, ids)
            answers = st.partner.stats()["answers"]
            outcomes = st.client.stats
        assert answers["error"] > 0  # 500s, garbage bodies, drops: each became Uncertain
        assert outcomes.posts > len(ids)  # some were resubmitted once absence was confirmed

    async def test_partner_hanging_past_our_read_timeout_is_uncertain_never_blind(self) -> None:
        async with stack() as st:
            st.faulty.hang_first_post = True
            ids = new_ids(10)
            await st.submit(ids)
            finals = await settle_and_check(st, ids)
            resubmissions = st.client.stats.resubmissions
        truth = st.partner.truth()["transactions"]
        assert len(st.faulty.hung) == len(ids)
        for payout_id in st.faulty.hung:
            # Reached: the status check found it, no second POST. Not reached: re-POSTed only
            # after the late-arrival window confirmed absence, so it is paid once either way.
            assert truth[payout_id]["posts"] == 1
            assert finals[payout_id] in ("completed", "declined")
        assert resubmissions == sum(not r for r in st.faulty.hung.values())

    async def test_duplicate_out_of_order_and_early_webhooks(self) -> None:
        config = BASE.replace(
            p_duplicate_webhook=0.6,
            p_out_of_order_webhook=0.6,
            p_webhook_before_answer=0.5,
            p_pending_answer=0.5,
        )
        async with stack(config) as st:
            ids = new_ids(40)
            await st.submit(ids)
            await settle_and_check(st, ids)
            webhooks = st.client.stats.webhooks
        assert webhooks > len(ids)  # duplicates arrived and changed nothing

    async def test_push_endpoint_down_for_minutes_then_every_push_arrives_once(self) -> None:
        async with stack() as st:
            st.push_down = True
            ids = new_ids(20)
            await st.submit(ids)
            await anyio.sleep(300)
            assert st.push_failures > 0
            assert not st.pushes
            finals_before = {i: (await st.client.get(i)).status.value for i in ids}
            assert set(finals_before.values()) <= {"completed", "declined"}
            st.push_down = False
            finals = await settle_and_check(st, ids)
        assert finals == finals_before  # decided during the outage, delivered unchanged after
        assert all(len(st.pushed(i)) == 1 for i in ids)


# -- storage outages, on real time -----------------------------------------------------------


async def _outage_scenario(
    st: Stack, outage: Callable[[], AbstractAsyncContextManager[None]], slug: str
) -> None:
    before = new_ids(15)
    await st.submit(before)
    await anyio.sleep(0.2)  # some are in flight at the partner when storage goes away
    during = new_ids(5)
    refused: list[str] = []
    async with outage():
        for payout_id in during:
            answer = await st.http.post("/transaction", json={"id": payout_id})
            if answer.status_code == 503:
                assert answer.headers["content-type"] == "application/problem+json"
                assert int(answer.headers["retry-after"]) >= 1
                assert answer.json()["type"] == PROBLEM_TYPE_PREFIX + slug
                refused.append(payout_id)
            else:
                assert answer.status_code == 200, answer.text
    assert refused, "no request saw the outage"
    await st.submit(refused)  # the app retries after Retry-After
    await settle_and_check(st, before + during)
    # A 503 stored nothing; the retry made the one payout (a second POST only after a timeout).
    assert all(t["posts"] <= 2 for t in st.partner.truth()["transactions"].values())


async def test_sqlite_locked_gives_503_with_retry_after_and_then_everything_completes(
    tmp_path: Path,
) -> None:
    db = tmp_path / "faults.db"

    @asynccontextmanager
    async def locked() -> AsyncIterator[None]:
        # Another process holding the write lock: WAL readers go on, every writer waits out
        # busy_timeout and gets "database is locked".
        conn = sqlite3.connect(db, timeout=5, isolation_level=None, check_same_thread=False)
        try:
            await anyio.to_thread.run_sync(conn.execute, "BEGIN IMMEDIATE")
            yield
            await anyio.sleep(0.5)
        finally:
            conn.execute("ROLLBACK")
            conn.close()

    config = BASE.replace(p_timeout=0.2)
    async with stack(
        config,
        storage=lambda: SQLiteStorage(db, busy_timeout=0.1),
        storage_url=f"sqlite:///{db}",
        scale=REAL_SCALE,
    ) as st:
        await _outage_scenario(st, locked, "storage-unavailable")


def _proxied(proxy: TcpProxy) -> Callable[[], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def down() -> AsyncIterator[None]:
        await proxy.stop()  # drops every connection, refuses new ones
        try:
            yield
            await anyio.sleep(0.5)
        finally:
            await proxy.start()

    return down


_SERVER_BACKENDS = [
    pytest.param(
        "postgres", PostgresStorage, "schema", fresh_schema, drop_schema, marks=pytest.mark.postgres
    ),
    pytest.param(
        "redis", RedisStorage, "prefix", fresh_prefix, delete_prefix, marks=pytest.mark.redis
    ),
]


@pytest.mark.parametrize(("server", "backend", "param", "fresh", "cleanup"), _SERVER_BACKENDS)
async def test_server_storage_outage_gives_503_and_then_everything_completes(
    server: str,
    backend: Any,
    param: str,
    fresh: Callable[[], str],
    cleanup: Callable[[str, str], Awaitable[None]],
) -> None:
    url = await server_url(server)
    proxy = TcpProxy(url)
    await proxy.start()
    namespace = fresh()
    sep = "&" if "?" in url else "?"
    proxied = f"{with_port(url, proxy.port)}{sep}{param}={namespace}"
    try:
        async with stack(
            BASE.replace(p_timeout=0.2),
            storage=lambda: backend.from_url(proxied),
            storage_url=proxied,
            scale=REAL_SCALE,
        ) as st:
            await _outage_scenario(st, _proxied(proxy), "storage-unavailable")
    finally:
        await proxy.stop()
        await cleanup(url, namespace)
