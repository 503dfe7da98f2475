"""PostgresStorage beyond the contract: several instances on one schema, migrations, outages.

Each storage object has its own connection pool, like a separate process would.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import anyio
import asyncpg
import pytest

from resilient_payout._errors import StorageError, StorageUnavailable
from resilient_payout._model import PayoutStatus
from resilient_payout.storage.postgres import MIGRATIONS, PostgresStorage
from resilient_payout.testing.contract import T0, make_outbox, make_payout

from .conftest import TcpProxy, closed_port, drop_schema, fresh_schema, with_port

pytestmark = pytest.mark.anyio
needs_postgres = pytest.mark.postgres


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    """A schema name nobody uses yet; dropped after the test."""
    name = fresh_schema()
    yield name
    await drop_schema(postgres_url, name)


async def _opened(url: str, schema: str, **options: int) -> PostgresStorage:
    storage = PostgresStorage(url, schema=schema, **options)
    await storage.open()
    return storage


# -- URLs --------------------------------------------------------------------------------------


def test_from_url_takes_our_options_and_passes_the_rest_to_asyncpg() -> None:
    storage = PostgresStorage.from_url(
        "postgres://app:s3cret@db.example:5433/payments?schema=rp_prod&pool_max=20&sslmode=require"
    )
    assert storage.schema == "rp_prod"
    assert storage._pool_max == 20
    assert storage._dsn == "postgresql://app:s3cret@db.example:5433/payments?sslmode=require"
    assert "s3cret" not in repr(storage)
    assert repr(storage) == (
        "PostgresStorage('postgresql://app:***@db.example:5433/payments?sslmode=require', "
        "schema='rp_prod')"
    )
    default = PostgresStorage.from_url("postgresql://localhost/db")
    assert (default.schema, default._pool_min, default._pool_max) == ("resilient_payout", 1, 10)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://localhost/db",
        "postgresql:///db",
        "postgresql://localhost/db?schema=drop table",
        "postgresql://localhost/db?pool_max=many",
        "postgresql://localhost/db?pool_min=5&pool_max=2",
    ],
)
def test_from_url_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"PostgreSQL|pool|schema"):
        PostgresStorage.from_url(url)


# -- several instances -------------------------------------------------------------------------


@needs_postgres
async def test_instances_on_one_schema_claim_disjoint_sets(postgres_url: str, schema: str) -> None:
    workers = [await _opened(postgres_url, schema, pool_max=4) for _ in range(3)]
    try:
        ids = {f"p-{i:03}" for i in range(90)}
        for i, pid in enumerate(sorted(ids)):
            stored, _ = await workers[i % 3].create_if_absent(
                make_payout(pid, next_check_at=T0 - i)
            )
            if i % 2:  # half of them also get an outbox entry
                final = replace(stored, status=PayoutStatus.COMPLETED)
                await workers[0].compare_and_set(
                    final, expected_version=1, outbox=make_outbox(pid, at=T0 - i)
                )
        claimed: list[str] = []
        pushed: list[str] = []

        async def drain(storage: PostgresStorage, owner: str) -> None:
            for _ in range(len(ids)):  # bounded: a broken backend fails instead of hanging
                batch = await storage.claim_due(T0, owner=owner, lease_seconds=30, limit=4)
                entries = await storage.claim_outbox(T0, owner=owner, lease_seconds=30, limit=3)
                if not batch and not entries:
                    return
                claimed.extend(p.id for p in batch)
                pushed.extend(e.payout_id for e in entries)

        async with anyio.create_task_group() as tg:
            for n, storage in enumerate(workers):
                tg.start_soon(drain, storage, f"w{n}a")
                tg.start_soon(drain, storage, f"w{n}b")
        assert len(claimed) == len(set(claimed)) == 45
        assert set(claimed) == {f"p-{i:03}" for i in range(0, 90, 2)}
        assert len(pushed) == len(set(pushed)) == 45
        assert set(pushed) == ids - set(claimed)
    finally:
        for storage in workers:
            await storage.close()


@needs_postgres
async def test_concurrent_open_on_a_fresh_schema_migrates_exactly_once(
    postgres_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_payout.storage")
    instances = [PostgresStorage(postgres_url, schema=schema) for _ in range(5)]
    try:
        async with anyio.create_task_group() as tg:
            for storage in instances:
                tg.start_soon(storage.open)
        applied = [r.getMessage() for r in caplog.records if "applied migrations" in r.message]
        assert applied == [f"PostgreSQL schema {schema!r}: applied migrations 1..{len(MIGRATIONS)}"]
        conn = await asyncpg.connect(postgres_url)
        try:
            rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
        finally:
            await conn.close()
        assert sorted(r["version"] for r in rows) == list(range(1, len(MIGRATIONS) + 1))
        stored, _ = await instances[0].create_if_absent(make_payout("p-1"))
        assert await instances[4].get("p-1") == stored
        assert await instances[2].migrate() == 0
    finally:
        for storage in instances:
            await storage.close()


@needs_postgres
async def test_migrate_without_open_then_open_applies_nothing(
    postgres_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resilient_payout.storage")
    storage = PostgresStorage(postgres_url, schema=schema)
    assert await storage.migrate() == len(MIGRATIONS)
    assert await storage.migrate() == 0
    await storage.open()
    try:
        assert await storage.get("p-1") is None
    finally:
        await storage.close()
    assert len([r for r in caplog.records if "applied migrations" in r.message]) == 1


@needs_postgres
async def test_stale_owner_loses_after_another_instance_takes_over_its_lease(
    postgres_url: str, schema: str
) -> None:
    a = await _opened(postgres_url, schema)
    b = await _opened(postgres_url, schema)
    try:
        await a.create_if_absent(make_payout("p-1"))
        (stale,) = await a.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        assert await b.claim_due(T0 + 29, owner="b", lease_seconds=30, limit=10) == []
        (fresh,) = await b.claim_due(T0 + 31, owner="b", lease_seconds=30, limit=10)
        assert fresh.version == stale.version + 1 == 3
        final = replace(stale, status=PayoutStatus.COMPLETED, next_check_at=None)
        assert await a.compare_and_set(final, expected_version=2, outbox=make_outbox()) is None
        assert await b.get_outbox("p-1") is None
        won = await b.compare_and_set(
            replace(fresh, status=PayoutStatus.DECLINED, next_check_at=None),
            expected_version=fresh.version,
            outbox=make_outbox(status=PayoutStatus.DECLINED),
        )
        assert won is not None
        assert (await a.get("p-1"), await a.get_outbox("p-1")) == (
            won,
            make_outbox(status=PayoutStatus.DECLINED),
        )
    finally:
        await a.close()
        await b.close()


@needs_postgres
async def test_claim_writes_version_and_lease_columns(postgres_url: str, schema: str) -> None:
    storage = await _opened(postgres_url, schema)
    try:
        await storage.create_if_absent(make_payout("p-1"))
        (claimed,) = await storage.claim_due(T0, owner="a", lease_seconds=30, limit=1)
    finally:
        await storage.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        row = await conn.fetchrow(
            "SELECT version, lease_owner, lease_until, doc::jsonb ? 'version' AS v_in_doc "
            f'FROM "{schema}".payouts'
        )
    finally:
        await conn.close()
    assert tuple(row) == (claimed.version, "a", T0 + 30, False)
    assert claimed.version == 2


# -- outages -----------------------------------------------------------------------------------


@needs_postgres
async def test_survives_the_server_ending_every_connection(postgres_url: str, schema: str) -> None:
    app = f"rp-test-{schema}"
    sep = "&" if "?" in postgres_url else "?"
    storage = await _opened(f"{postgres_url}{sep}application_name={app}", schema, pool_min=3)
    admin = await asyncpg.connect(postgres_url)
    try:
        stored, _ = await storage.create_if_absent(make_payout("p-1"))
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1",
            app,
        )
        assert killed == 3
        # Each pooled connection is dead; every operation still succeeds on fresh ones.
        assert await storage.get("p-1") == stored
        (claimed,) = await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        assert claimed.version == 2
    finally:
        await admin.close()
        await storage.close()


@needs_postgres
async def test_unreachable_server_raises_storage_unavailable(postgres_url: str) -> None:
    storage = PostgresStorage(with_port(postgres_url, closed_port()), connect_timeout=2)
    with pytest.raises(StorageUnavailable, match="PostgreSQL"):
        await storage.open()
    with pytest.raises(StorageError, match="not open"):
        await storage.get("p-1")
    await storage.close()


@needs_postgres
async def test_outage_raises_storage_unavailable_then_recovers(
    postgres_url: str, schema: str, proxy: Callable[[str], Awaitable[TcpProxy]]
) -> None:
    server = await proxy(postgres_url)
    storage = await _opened(with_port(postgres_url, server.port), schema, pool_min=2)
    try:
        stored, _ = await storage.create_if_absent(make_payout("p-1"))
        await server.stop()
        with pytest.raises(StorageUnavailable):
            await storage.create_if_absent(make_payout("p-2"))
        with pytest.raises(StorageUnavailable):
            await storage.compare_and_set(stored, expected_version=1, outbox=make_outbox())
        with pytest.raises(StorageUnavailable):
            await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        await server.start()
        assert await storage.get("p-1") == stored
        assert await storage.get("p-2") is None
        assert await storage.compare_and_set(stored, expected_version=1) is not None
    finally:
        await storage.close()


@needs_postgres
async def test_refuses_a_newer_schema(postgres_url: str, schema: str) -> None:
    storage = await _opened(postgres_url, schema)
    await storage.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'INSERT INTO "{schema}".schema_migrations (version) VALUES (99)')
    finally:
        await conn.close()
    with pytest.raises(StorageError, match="newer"):
        await storage.open()
    await storage.close()
