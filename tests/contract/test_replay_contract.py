"""The webhook replay-store contract, on every store: memory, Redis and PostgreSQL.

A fixture gives ``handle(prefix)``: a new opened handle on one shared backend, as another process
would hold. The memory store is shared only within a process, so its handle for a prefix is the
same object. Time is the ``now`` each call passes (no sleeping): marks expire on the caller's
clock. Then what only one backend has: Redis's TTL, PostgreSQL's pruning and table creation, the
re-sent command that must not refuse itself, and the URLs the wiring builds stores from.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import asyncpg
import pytest
import redis.asyncio as aioredis

from resilient_payout._errors import StorageError, StorageUnavailable
from resilient_payout._replay import replay_store_for
from resilient_payout.webhooks import (
    InMemoryReplayStore,
    PostgresReplayStore,
    RedisReplayStore,
    ReplayStore,
)

from .conftest import (
    closed_port,
    delete_prefix,
    drop_schema,
    fresh_prefix,
    fresh_schema,
    server_url,
    with_port,
)

pytestmark = pytest.mark.anyio

T0 = 1_700_000_000.0

Handle = Callable[[str], Awaitable[ReplayStore]]
"""``handle(prefix)``: an opened store on the shared backend, keys under ``prefix``."""


@asynccontextmanager
async def memory_handles() -> AsyncIterator[Handle]:
    stores: dict[str, InMemoryReplayStore] = {}

    async def handle(prefix: str) -> ReplayStore:
        return stores.setdefault(prefix, InMemoryReplayStore())

    yield handle


@asynccontextmanager
async def redis_handles() -> AsyncIterator[Handle]:
    url = await server_url("redis")
    base = fresh_prefix()
    opened: list[RedisReplayStore] = []

    async def handle(prefix: str) -> ReplayStore:
        store = RedisReplayStore(url, prefix=base + prefix)
        await store.open()
        opened.append(store)
        return store

    try:
        yield handle
    finally:
        for store in opened:
            await store.close()
        await delete_prefix(url, base)


@asynccontextmanager
async def postgres_handles() -> AsyncIterator[Handle]:
    url = await server_url("postgres")
    schema = fresh_schema()
    opened: list[PostgresReplayStore] = []

    async def handle(prefix: str) -> ReplayStore:
        store = PostgresReplayStore(url, schema=schema, prefix=prefix)
        await store.open()
        opened.append(store)
        return store

    try:
        yield handle
    finally:
        for store in opened:
            await store.close()
        await drop_schema(url, schema)


STORES = [
    pytest.param(memory_handles, id="memory"),
    pytest.param(redis_handles, id="redis", marks=pytest.mark.redis),
    pytest.param(postgres_handles, id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(params=STORES)
async def handle(request: pytest.FixtureRequest) -> AsyncIterator[Handle]:
    factory: Callable[[], AbstractAsyncContextManager[Handle]] = request.param
    async with factory() as opened:
        yield opened


async def _all_at_once(calls: list[Callable[[], Awaitable[bool]]]) -> list[bool]:
    results: list[bool] = [False] * len(calls)

    async def run(i: int) -> None:
        results[i] = await calls[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    return results


# -- the contract --------------------------------------------------------------------------------


async def test_the_first_add_wins_and_a_repeat_is_refused(handle: Handle) -> None:
    store = await handle("a:")
    assert await store.add("msg_1", T0 + 300, T0) is True
    assert await store.add("msg_1", T0 + 400, T0 + 1) is False
    assert await store.add("msg_2", T0 + 300, T0 + 1) is True


async def test_fifty_concurrent_adds_through_two_handles_have_one_winner(handle: Handle) -> None:
    one, two = await handle("a:"), await handle("a:")
    calls = [(lambda s=(one if i % 2 else two): s.add("msg_race", T0 + 300, T0)) for i in range(50)]
    assert sorted(await _all_at_once(calls)) == [False] * 49 + [True]
    # A mark set through one handle is seen through the other.
    assert await one.add("msg_seen", T0 + 300, T0) is True
    assert await two.add("msg_seen", T0 + 300, T0) is False


async def test_an_expired_mark_is_taken_again_on_the_callers_clock(handle: Handle) -> None:
    store = await handle("a:")
    assert await store.add("msg_1", T0 + 10, T0) is True
    assert await store.add("msg_1", T0 + 99, T0 + 9.999) is False
    # Expired at its expiry (expires_at <= now), and the new mark lives until its own.
    assert await store.add("msg_1", T0 + 30, T0 + 10) is True
    assert await store.add("msg_1", T0 + 99, T0 + 29) is False
    assert await store.add("msg_1", T0 + 99, T0 + 30) is True


async def test_a_mark_already_expired_when_added_does_not_block(handle: Handle) -> None:
    store = await handle("a:")
    assert await store.add("msg_old", T0, T0) is True
    assert await store.add("msg_old", T0 + 300, T0) is True
    assert await store.add("msg_old", T0 + 300, T0 + 1) is False


async def test_fifty_concurrent_takeovers_of_an_expired_mark_have_one_winner(
    handle: Handle,
) -> None:
    one, two = await handle("a:"), await handle("a:")
    assert await one.add("msg_x", T0 + 10, T0) is True
    calls = [
        (lambda s=(one if i % 2 else two): s.add("msg_x", T0 + 320, T0 + 20)) for i in range(50)
    ]
    assert sorted(await _all_at_once(calls)) == [False] * 49 + [True]


async def test_discard_frees_a_key_for_every_handle(handle: Handle) -> None:
    one, two = await handle("a:"), await handle("a:")
    assert await one.add("msg_1", T0 + 300, T0) is True
    await one.discard("msg_1")  # type: ignore[attr-defined]
    assert await two.add("msg_1", T0 + 300, T0 + 1) is True
    assert await one.add("msg_1", T0 + 300, T0 + 2) is False
    await two.discard("never-added")  # type: ignore[attr-defined]  # no error


async def test_prefixes_are_isolated(handle: Handle) -> None:
    a, b = await handle("a:"), await handle("b:")
    assert await a.add("msg_1", T0 + 300, T0) is True
    assert await b.add("msg_1", T0 + 300, T0) is True
    await b.discard("msg_1")  # type: ignore[attr-defined]
    assert await a.add("msg_1", T0 + 300, T0) is False


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisReplayStore]:
    prefix = fresh_prefix()
    async with RedisReplayStore(redis_url, prefix=prefix, grace=30) as store:
        yield store
    await delete_prefix(redis_url, prefix)


@pytest.mark.redis
async def test_redis_marks_live_in_redis_for_the_time_left_plus_grace(
    redis_store: RedisReplayStore, redis_url: str
) -> None:
    assert await redis_store.add("msg_1", T0 + 300, T0 + 100) is True
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        ttl_ms = await admin.pttl(redis_store.prefix + "msg_1")
        value = await admin.get(redis_store.prefix + "msg_1")
    finally:
        await admin.aclose()
    assert (200 + 30) * 1000 - 2000 < ttl_ms <= (200 + 30) * 1000
    assert value is not None
    assert value.split(" ")[0] == repr(T0 + 300)


@pytest.mark.redis
async def test_redis_a_resent_add_finds_its_own_mark(redis_store: RedisReplayStore) -> None:
    # What redis-py's retry after a dropped connection does: the same script, the same token.
    script, key = redis_store._script, [redis_store.prefix + "msg_1"]
    args = [repr(T0 + 300), "token-1", repr(T0), "300000"]
    assert await script(keys=key, args=args) == 1
    assert await script(keys=key, args=args) == 1
    assert await script(keys=key, args=[args[0], "token-2", *args[2:]]) == 0


@pytest.mark.redis
async def test_redis_refuses_non_finite_times_and_use_before_open(redis_url: str) -> None:
    store = RedisReplayStore(redis_url, prefix=fresh_prefix())
    with pytest.raises(StorageError, match="not open"):
        await store.add("msg_1", T0 + 300, T0)
    async with store:
        with pytest.raises(ValueError, match="finite"):
            await store.add("msg_1", float("inf"), T0)
    await store.close()  # idempotent


@pytest.mark.redis
async def test_redis_unreachable_is_storage_unavailable(redis_url: str) -> None:
    store = RedisReplayStore(with_port(redis_url, closed_port()), retries=0, socket_timeout=2)
    with pytest.raises(StorageUnavailable):
        await store.open()
    await store.close()


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
async def pg_schema(postgres_url: str) -> AsyncIterator[str]:
    schema = fresh_schema()
    yield schema
    await drop_schema(postgres_url, schema)


async def _rows(url: str, schema: str) -> list[tuple[str, float]]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        rows = await conn.fetch(
            f'SELECT key, expires_at FROM "{schema}".webhook_replays ORDER BY key'
        )
    finally:
        await conn.close()
    return [(r["key"], r["expires_at"]) for r in rows]


@pytest.mark.postgres
async def test_postgres_instances_opening_together_create_the_table_once(
    postgres_url: str, pg_schema: str
) -> None:
    stores = [PostgresReplayStore(postgres_url, schema=pg_schema) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.open)
    try:
        assert [await s.add("msg_1", T0 + 300, T0) for s in stores] == [True] + [False] * 3
    finally:
        for store in stores:
            await store.close()


@pytest.mark.postgres
async def test_postgres_prunes_marks_expired_past_grace_now_and_then(
    postgres_url: str, pg_schema: str
) -> None:
    async with PostgresReplayStore(
        postgres_url, schema=pg_schema, grace=10, prune_every=60
    ) as store:
        assert await store.add("old", T0 + 5, T0) is True  # the first add prunes (nothing yet)
        assert await store.add("mid", T0 + 55, T0 + 1) is True
        assert await store.add("new", T0 + 300, T0 + 2) is True
        # Not yet prune_every after the first prune: nothing is deleted, expired or not.
        assert await store.add("x", T0 + 300, T0 + 30) is True
        assert [k for k, _ in await _rows(postgres_url, pg_schema)] == ["mid", "new", "old", "x"]
        # Past it: "old" expired more than grace ago, "mid" not yet.
        assert await store.add("y", T0 + 400, T0 + 61) is True
        assert [k for k, _ in await _rows(postgres_url, pg_schema)] == ["mid", "new", "x", "y"]
        assert await store.prune(T0 + 1000) == 4


@pytest.mark.postgres
async def test_postgres_a_resent_add_finds_its_own_mark(postgres_url: str, pg_schema: str) -> None:
    async with PostgresReplayStore(postgres_url, schema=pg_schema) as store:
        # What _run does after a dropped connection: the same statement, the same token.
        assert await store._run("add", "msg_1", T0 + 300, "token-1", T0)
        assert await store._run("add", "msg_1", T0 + 300, "token-1", T0)
        assert not await store._run("add", "msg_1", T0 + 300, "token-2", T0)


@pytest.mark.postgres
async def test_postgres_long_and_nul_keys_are_stored_as_digests(
    postgres_url: str, pg_schema: str
) -> None:
    async with PostgresReplayStore(postgres_url, schema=pg_schema, prefix="p:") as store:
        for key in ("e" * 5000, "evt\x00id"):
            assert await store.add(key, T0 + 300, T0) is True
            assert await store.add(key, T0 + 300, T0) is False
        await store.discard("evt\x00id")
        assert await store.add("evt\x00id", T0 + 300, T0) is True
    keys = [k for k, _ in await _rows(postgres_url, pg_schema)]
    assert len(keys) == 2
    assert all(k.startswith("sha256:") and len(k) == 71 for k in keys)


@pytest.mark.postgres
async def test_postgres_unreachable_is_storage_unavailable(postgres_url: str) -> None:
    store = PostgresReplayStore(with_port(postgres_url, closed_port()), connect_timeout=2)
    with pytest.raises(StorageUnavailable):
        await store.open()
    with pytest.raises(StorageError, match="not open"):
        await store.add("msg_1", T0 + 300, T0)


# -- URLs and laziness (no server) ---------------------------------------------------------------


def test_stores_follow_the_storage_url_next_to_the_storage() -> None:
    redis = replay_store_for("redis://:pw@cache:6379/2?prefix=shop:&db=3")
    assert isinstance(redis, RedisReplayStore)
    assert redis.prefix == "shop:replay:"
    assert redis._url == "redis://:pw@cache:6379/2?db=3"
    assert "pw" not in repr(redis)
    default = replay_store_for("rediss://cache:6380/0")
    assert isinstance(default, RedisReplayStore)
    assert default.prefix == "rp:replay:"
    pg = replay_store_for("postgres://u:pw@db/app?schema=shop&pool_max=20&sslmode=require")
    assert isinstance(pg, PostgresReplayStore)
    assert (pg.schema, pg.prefix) == ("shop", "")
    assert pg._dsn == "postgresql://u:pw@db/app?sslmode=require"
    assert "pw" not in repr(pg)
    for other in ("memory://", "sqlite:///payouts.db"):
        assert replay_store_for(other) is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="schema name"):
        PostgresReplayStore("postgresql://db/x", schema="a; drop")
    with pytest.raises(ValueError, match="prefix"):
        RedisReplayStore("redis://cache", prefix="")
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisReplayStore.from_url("redis://")


def test_importing_the_library_imports_no_driver() -> None:
    code = (
        "import sys, resilient_payout, resilient_payout.webhooks as w, resilient_payout.wiring\n"
        "bad = sorted(m for m in ('asyncpg', 'redis') if m in sys.modules)\n"
        "assert not bad, bad\n"
        "assert {'RedisReplayStore', 'PostgresReplayStore'} <= set(w.__all__)\n"
        "w.RedisReplayStore('redis://cache'); w.PostgresReplayStore('postgresql://db/x')\n"
        "assert 'redis' not in sys.modules and 'asyncpg' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
