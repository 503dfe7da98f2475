"""RedisStorage beyond the contract: several instances on one prefix, key layout, outages.

Each storage object has its own client and connection pool, like a separate process would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from resilient_payout._errors import StorageError, StorageUnavailable
from resilient_payout._model import PayoutStatus
from resilient_payout.storage.redis import RedisStorage
from resilient_payout.testing.contract import T0, make_outbox, make_payout

from .conftest import TcpProxy, closed_port, delete_prefix, fresh_prefix, with_port

pytestmark = pytest.mark.anyio
needs_redis = pytest.mark.redis


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix nobody uses yet; its keys are deleted after the test."""
    name = fresh_prefix()
    yield name
    await delete_prefix(redis_url, name)


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def _opened(url: str, prefix: str, **options: Any) -> RedisStorage:
    storage = RedisStorage(url, prefix=prefix, **options)
    await storage.open()
    return storage


# -- URLs --------------------------------------------------------------------------------------


def test_from_url_takes_the_prefix_and_passes_the_rest_to_redis_py() -> None:
    storage = RedisStorage.from_url("rediss://:s3cret@cache.example:6380/2?prefix=pay:&db=3")
    assert storage.prefix == "pay:"
    assert storage._url == "rediss://:s3cret@cache.example:6380/2?db=3"
    assert "s3cret" not in repr(storage)
    assert RedisStorage.from_url("redis://localhost").prefix == "rp:"


@pytest.mark.parametrize(
    "url", ["http://localhost", "redis://", "redis://localhost?prefix=", "memory://"]
)
def test_from_url_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="Redis"):
        RedisStorage.from_url(url)


# -- several instances -------------------------------------------------------------------------


@needs_redis
async def test_instances_on_one_prefix_claim_disjoint_sets(redis_url: str, prefix: str) -> None:
    workers = [await _opened(redis_url, prefix) for _ in range(3)]
    try:
        ids = {f"p-{i:03}" for i in range(90)}
        for i, pid in enumerate(sorted(ids)):
            stored, _ = await workers[i % 3].create_if_absent(
                make_payout(pid, next_check_at=T0 - i)
            )
            if i % 2:
                final = replace(stored, status=PayoutStatus.COMPLETED)
                await workers[0].compare_and_set(
                    final, expected_version=1, outbox=make_outbox(pid, at=T0 - i)
                )
        claimed: list[str] = []
        pushed: list[str] = []

        async def drain(storage: RedisStorage, owner: str) -> None:
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


@needs_redis
async def test_instances_on_one_prefix_race_create_and_cas(redis_url: str, prefix: str) -> None:
    workers = [await _opened(redis_url, prefix) for _ in range(4)]
    try:
        created: list[bool] = []
        won: list[bool] = []

        async def create(storage: RedisStorage, n: int) -> None:
            _, was_created = await storage.create_if_absent(make_payout("p", fingerprint=str(n)))
            created.append(was_created)

        async def finish(storage: RedisStorage, n: int) -> None:
            final = replace(make_payout("p"), status=PayoutStatus.FAILED, next_check_at=None)
            out = await storage.compare_and_set(
                final, expected_version=1, outbox=make_outbox("p", at=T0 + n)
            )
            won.append(out is not None)

        for step in (create, finish):
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(step, workers[n % 4], n)
        assert created.count(True) == 1
        assert won.count(True) == 1
        stored = await workers[1].get("p")
        assert stored is not None
        assert stored.version == 2
        assert await workers[2].count_by_status() == {
            **dict.fromkeys(PayoutStatus, 0),
            PayoutStatus.FAILED: 1,
        }
    finally:
        for storage in workers:
            await storage.close()


@needs_redis
async def test_stale_owner_loses_after_another_instance_takes_over_its_lease(
    redis_url: str, prefix: str
) -> None:
    a = await _opened(redis_url, prefix)
    b = await _opened(redis_url, prefix)
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


@needs_redis
async def test_keys_stay_under_the_prefix_and_prefixes_are_isolated(
    redis_url: str, prefix: str, admin: aioredis.Redis
) -> None:
    storage = await _opened(redis_url, prefix)
    other_prefix = fresh_prefix()
    other = await _opened(redis_url, other_prefix)
    try:
        stored, _ = await storage.create_if_absent(make_payout("p-1"))
        final = replace(stored, status=PayoutStatus.COMPLETED, next_check_at=None)
        await storage.compare_and_set(final, expected_version=1, outbox=make_outbox())
        keys = {key async for key in admin.scan_iter(match=prefix + "*")}
        assert keys == {prefix + k for k in ("p:p-1", "o:p-1", "idx:outbox", "counts")}
        assert await admin.hget(prefix + "p:p-1", "v") == "2"
        assert await other.get("p-1") is None
        assert await other.count_by_status() == dict.fromkeys(PayoutStatus, 0)
    finally:
        await storage.close()
        await other.close()
        await delete_prefix(redis_url, other_prefix)


# -- outages -----------------------------------------------------------------------------------


@needs_redis
async def test_survives_the_server_dropping_its_connections(
    redis_url: str, prefix: str, admin: aioredis.Redis
) -> None:
    storage = await _opened(redis_url, prefix)
    try:
        stored, _ = await storage.create_if_absent(make_payout("p-1"))
        ours = [c["id"] for c in await admin.client_list() if c["name"] == "resilient_payout"]
        assert ours
        for client_id in ours:
            assert await admin.client_kill_filter(_id=client_id) == 1
        assert await storage.get("p-1") == stored
        (claimed,) = await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        assert claimed.version == 2
    finally:
        await storage.close()


@needs_redis
async def test_unreachable_server_raises_storage_unavailable(redis_url: str) -> None:
    storage = RedisStorage(with_port(redis_url, closed_port()), retries=1, socket_timeout=2)
    with pytest.raises(StorageUnavailable, match="Redis"):
        await storage.open()
    with pytest.raises(StorageError, match="not open"):
        await storage.get("p-1")
    await storage.close()


@needs_redis
async def test_outage_raises_storage_unavailable_then_recovers(
    redis_url: str, prefix: str, proxy: Callable[[str], Awaitable[TcpProxy]]
) -> None:
    server = await proxy(redis_url)
    storage = await _opened(with_port(redis_url, server.port), prefix, retries=1)
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
