"""PostgresStorage beyond the contracts: URLs, migrations, the pool's bound, atomicity, outages.

Several instances racing on one schema are :class:`MultiInstanceContract`'s (run from
test_storage_contract.py). Each storage object has its own connection pool, like a separate
process would.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
import asyncpg
import pytest

from resilient_payout._errors import PartnerReferenceTaken, StorageError, StorageUnavailable
from resilient_payout._model import AuditEntry, Cause, PayoutStatus
from resilient_payout.storage import PayoutQuery
from resilient_payout.storage.postgres import _MIGRATIONS_TABLE, MIGRATIONS, PostgresStorage
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


async def _opened(url: str, schema: str, **options: Any) -> PostgresStorage:
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
    assert default._pool_timeout == 10.0
    bounded = PostgresStorage.from_url("postgresql://localhost/db?pool_timeout=0.5&sslmode=x")
    assert (bounded._pool_timeout, bounded._dsn) == (0.5, "postgresql://localhost/db?sslmode=x")


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_from_url_rejects_a_bad_pool_timeout_without_echoing_the_url(value: str) -> None:
    with pytest.raises(ValueError, match="pool_timeout") as raised:
        PostgresStorage.from_url(f"postgresql://app:s3cret@db/x?pool_timeout={value}")
    assert "s3cret" not in str(raised.value)


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


# -- schema -----------------------------------------------------------------------------------


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
    assert row is not None
    assert tuple(row) == (claimed.version, "a", T0 + 30, False)
    assert claimed.version == 2


@needs_postgres
async def test_upgrades_a_first_release_schema_in_place(
    postgres_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        # The schema as the first release left it (migration 1 only), with an undelivered entry.
        async with conn.transaction():
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(_MIGRATIONS_TABLE.format(s=f'"{schema}"'))
            await conn.execute(MIGRATIONS[0].format(s=f'"{schema}"'))
            await conn.execute(f'INSERT INTO "{schema}".schema_migrations (version) VALUES (1)')
            await conn.execute(
                f'INSERT INTO "{schema}".outbox (payout_id, status, created_at, next_attempt_at, '
                "attempts, last_error) VALUES ('old', 'completed', $1, $1, 3, 'HTTP 502')",
                T0,
            )
            await conn.execute(
                f'INSERT INTO "{schema}".payouts (id, version, status, doc) '
                "VALUES ('old', 2, 'completed', $1::json)",
                _old_document(),
            )
    finally:
        await conn.close()
    caplog.set_level(logging.INFO, logger="resilient_payout.storage")
    a, b = (
        PostgresStorage(postgres_url, schema=schema),
        PostgresStorage(postgres_url, schema=schema),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.open)
        tg.start_soon(b.open)
    try:
        applied = [r.getMessage() for r in caplog.records if "applied migrations" in r.message]
        assert applied == [f"PostgreSQL schema {schema!r}: applied migrations 2..{len(MIGRATIONS)}"]
        entry = replace(make_outbox("old"), attempts=3, last_error="HTTP 502")
        assert await b.get_outbox("old") == entry
        await a.dead_letter_outbox("old", at=T0 + 1, error="gave up")
        assert await b.claim_outbox(T0 + 60, owner="b", lease_seconds=30, limit=9) == []
        assert await b.count_dead_outbox() == 1
        # Step 3 filled the indexed columns from the document.
        (conflicted,) = (await a.list_payouts(PayoutQuery(conflicts_only=True))).items
        assert conflicted.id == "old"
        assert (await b.list_payouts(PayoutQuery(undelivered_only=True))).items == [conflicted]
        assert await b.get_by_partner_ref("ref-old") == conflicted
        with pytest.raises(PartnerReferenceTaken):
            await a.create_if_absent(make_payout("new", partner_ref="ref-old"))
        # Step 4 made the instance registry.
        await a.beat("instance-a", T0)
        assert await b.instances() == {"instance-a": T0}
    finally:
        await a.close()
        await b.close()


def _old_document() -> str:
    """A final payout with a conflict and a partner reference, as a document without version."""
    conflict = AuditEntry(
        T0 - 5, Cause.WEBHOOK, "conflict", PayoutStatus.COMPLETED, PayoutStatus.COMPLETED,
        "webhook reported declined after final completed", conflict=True,
    )  # fmt: skip
    payout = make_payout("old", status=PayoutStatus.COMPLETED, next_check_at=None)
    doc = replace(payout, partner_ref="ref-old", audit=(*payout.audit, conflict)).to_dict()
    del doc["version"]
    return json.dumps(doc)


# -- atomicity ----------------------------------------------------------------------------------


@needs_postgres
async def test_outbox_insert_fails_with_its_compare_and_set(postgres_url: str, schema: str) -> None:
    """A failure between the update and the outbox insert undoes the update: one transaction."""
    storage = await _opened(postgres_url, schema)
    admin = await asyncpg.connect(postgres_url)
    try:
        v1, _ = await storage.create_if_absent(make_payout("p-1"))
        await admin.execute(
            f"""
            CREATE FUNCTION "{schema}".fail_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'injected outbox failure'; END $$;
            CREATE TRIGGER fail_outbox BEFORE INSERT ON "{schema}".outbox
                FOR EACH ROW EXECUTE FUNCTION "{schema}".fail_outbox();
            """
        )
        final = replace(v1, status=PayoutStatus.COMPLETED, next_check_at=None)
        with pytest.raises(StorageError, match="injected outbox failure"):
            await storage.compare_and_set(final, expected_version=1, outbox=make_outbox("p-1"))
        after = await storage.get("p-1")
        assert after is not None
        assert (after.version, after.status) == (1, PayoutStatus.RECEIVED)
        assert after == v1
        assert await storage.get_outbox("p-1") is None
        # Also as another session sees it: nothing of the failed statement was committed.
        row = await admin.fetchrow(f'SELECT version, status FROM "{schema}".payouts')
        assert row is not None
        assert tuple(row) == (1, "received")
        assert await admin.fetchval(f'SELECT count(*) FROM "{schema}".outbox') == 0
        assert await storage.compare_and_set(final, expected_version=1) is not None
    finally:
        await admin.close()
        await storage.close()


# -- the pool's bound ---------------------------------------------------------------------------


@needs_postgres
async def test_an_exhausted_pool_raises_storage_unavailable_after_pool_timeout(
    postgres_url: str, schema: str
) -> None:
    storage = await _opened(postgres_url, schema, pool_min=1, pool_max=1, pool_timeout=0.3)
    try:
        stored, _ = await storage.create_if_absent(make_payout("p-1"))
        held = await storage._conn().acquire()  # a stuck operation holding the only connection
        started = anyio.current_time()
        try:
            with anyio.fail_after(5), pytest.raises(StorageUnavailable, match="pool exhausted"):
                await storage.get("p-1")
            waited = anyio.current_time() - started
        finally:
            await storage._conn().release(held)
        assert 0.3 <= waited < 3
        assert await storage.get("p-1") == stored  # the connection is back: all is well again
    finally:
        await storage.close()


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
