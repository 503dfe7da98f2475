"""PostgresStorage's two pools: background scans never take a request-path connection.

Each test holds every connection of one pool (as scans or requests stuck on a slow server
would) and checks what the other pool's statements still do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import anyio
import asyncpg
import pytest

from resilient_payout._errors import StorageUnavailable
from resilient_payout._model import PayoutStatus
from resilient_payout.storage import PayoutQuery
from resilient_payout.storage.postgres import PostgresStorage
from resilient_payout.testing.contract import T0, make_outbox, make_payout

from .conftest import drop_schema, fresh_schema

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    name = fresh_schema()
    yield name
    await drop_schema(postgres_url, name)


async def _opened(url: str, schema: str, **options: Any) -> PostgresStorage:
    storage = PostgresStorage(url, schema=schema, pool_timeout=0.2, **options)
    await storage.open()
    return storage


def test_from_url_takes_bg_pool_max() -> None:
    assert PostgresStorage.from_url("postgresql://localhost/db")._bg_pool_max == 2
    shared = PostgresStorage.from_url("postgresql://localhost/db?bg_pool_max=0&sslmode=x")
    assert (shared._bg_pool_max, shared._dsn) == (0, "postgresql://localhost/db?sslmode=x")
    with pytest.raises(ValueError, match="bg_pool_max") as raised:
        PostgresStorage.from_url("postgresql://app:s3cret@db/x?bg_pool_max=few")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(ValueError, match="bg_pool_max"):
        PostgresStorage("postgresql://localhost/db", bg_pool_max=-1)


async def test_requests_go_on_while_every_background_connection_is_held(
    postgres_url: str, schema: str
) -> None:
    storage = await _opened(postgres_url, schema, pool_max=1, bg_pool_max=1)
    try:
        assert storage._bg_pool is not None
        held = await storage._bg_pool.acquire()  # a scan stuck on a slow server
        try:
            with anyio.fail_after(2):  # far below a pool_timeout wait per statement
                stored, created = await storage.create_if_absent(make_payout("p-1"))
                assert created
                assert await storage.get("p-1") == stored
                final = replace(stored, status=PayoutStatus.COMPLETED, next_check_at=None)
                final = replace(final, partner_ref="ref-1")
                done = await storage.compare_and_set(
                    final, expected_version=1, outbox=make_outbox()
                )
                assert done is not None
                assert await storage.get_by_partner_ref("ref-1") == done
                await storage.ack_outbox("p-1", delivered_at=T0)
                await storage.beat("instance-a", T0)  # a heartbeat never waits behind scans
                assert await storage.instances() == {"instance-a": T0}
            with pytest.raises(StorageUnavailable, match="background connection pool exhausted"):
                await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        finally:
            await storage._bg_pool.release(held)
        assert await storage.count_by_status() == {
            **dict.fromkeys(PayoutStatus, 0),
            PayoutStatus.COMPLETED: 1,
        }
    finally:
        await storage.close()


async def test_background_scans_go_on_while_every_request_connection_is_held(
    postgres_url: str, schema: str
) -> None:
    storage = await _opened(postgres_url, schema, pool_max=1, bg_pool_max=1)
    try:
        stored, _ = await storage.create_if_absent(make_payout("p-1", next_check_at=T0 - 1))
        held = await storage._conn().acquire()
        try:
            with anyio.fail_after(2):
                assert await storage.next_due_at() == T0 - 1
                (claimed,) = await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
                assert claimed.version == stored.version + 1
                assert await storage.claim_outbox(T0, owner="a", lease_seconds=30, limit=10) == []
                assert (await storage.count_by_status())[PayoutStatus.RECEIVED] == 1
                assert await storage.count_dead_outbox() == 0
                page = await storage.list_payouts(PayoutQuery())
                assert [p.id for p in page.items] == ["p-1"]
                snapshot = await storage.ops_snapshot(T0, late_after=60, failing_after=60)
                assert snapshot.oldest_open_age == 10.0
                assert await storage.prune(T0, dry_run=True, limit=10) == 0
            with pytest.raises(StorageUnavailable, match=r"^PostgreSQL: connection pool exhausted"):
                await storage.get("p-1")
        finally:
            await storage._conn().release(held)
    finally:
        await storage.close()


async def test_bg_pool_max_0_shares_one_pool(postgres_url: str, schema: str) -> None:
    storage = await _opened(postgres_url, schema, pool_max=1, bg_pool_max=0)
    try:
        assert storage._bg_pool is None
        await storage.create_if_absent(make_payout("p-1"))
        held = await storage._conn().acquire()
        try:
            with pytest.raises(StorageUnavailable, match=r"^PostgreSQL: connection pool exhausted"):
                await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        finally:
            await storage._conn().release(held)
        assert len(await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)) == 1
    finally:
        await storage.close()


async def test_both_pools_survive_the_server_ending_every_connection(
    postgres_url: str, schema: str
) -> None:
    app = f"rp-test-{schema}"
    sep = "&" if "?" in postgres_url else "?"
    storage = await _opened(f"{postgres_url}{sep}application_name={app}", schema, pool_min=2)
    admin = await asyncpg.connect(postgres_url)
    try:
        stored, _ = await storage.create_if_absent(make_payout("p-1"))
        assert await storage.next_due_at() == T0  # opens a background connection
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            app,
        )
        assert killed == 3  # 2 request connections, 1 background one
        assert await storage.get("p-1") == stored
        (claimed,) = await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        assert claimed.version == 2
    finally:
        await admin.close()
        await storage.close()
