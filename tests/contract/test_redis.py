"""RedisStorage beyond the contracts: URLs, key layout, the durability check, outages.

Several instances racing on one prefix are :class:`MultiInstanceContract`'s (run from
test_storage_contract.py). Each storage object has its own client and connection pool, like a
separate process would.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex

from resilient_payout._errors import StorageError, StorageUnavailable
from resilient_payout._model import AuditEntry, Cause, PayoutStatus
from resilient_payout.storage import PayoutQuery
from resilient_payout.storage import redis as redis_storage
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


# -- key layout ---------------------------------------------------------------------------------


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
        expected = {"p:p-1", "o:p-1", "idx:outbox", "counts", "schema"}
        # The operator indexes: every payout by creation, per status, finals by last change
        # (retention), and undelivered outcomes.
        expected |= {"idx:created", "idx:st:completed", "idx:final", "idx:undelivered"}
        assert keys == {prefix + k for k in expected}
        assert await admin.hget(prefix + "p:p-1", "v") == "2"
        assert await other.get("p-1") is None
        assert await other.count_by_status() == dict.fromkeys(PayoutStatus, 0)
    finally:
        await storage.close()
        await other.close()
        await delete_prefix(redis_url, other_prefix)


@needs_redis
async def test_outbox_entries_written_before_dead_lettering_need_no_migration(
    redis_url: str, prefix: str, admin: aioredis.Redis
) -> None:
    # An entry as the previous release wrote it: no dead_at field, no idx:dead key.
    await admin.hset(
        prefix + "o:old",
        mapping={"status": "completed", "created_at": repr(T0), "at": repr(T0), "attempts": "3"},
    )
    await admin.zadd(prefix + "idx:outbox", {"old": T0})
    storage = await _opened(redis_url, prefix)
    try:
        assert await storage.get_outbox("old") == replace(make_outbox("old"), attempts=3)
        assert await storage.count_dead_outbox() == 0
        await storage.dead_letter_outbox("old", at=T0 + 1, error="gave up")
        assert await storage.claim_outbox(T0 + 60, owner="a", lease_seconds=30, limit=9) == []
        assert await admin.zrange(prefix + "idx:outbox", 0, -1) == []  # left the claimable set
        assert await admin.zrange(prefix + "idx:dead", 0, -1) == ["old"]
        assert await storage.count_dead_outbox() == 1
    finally:
        await storage.close()


@needs_redis
async def test_payouts_written_before_the_operator_indexes_are_filed_on_open(
    redis_url: str, prefix: str, admin: aioredis.Redis
) -> None:
    # Keys as the previous release wrote them: hashes with v/doc/status only, no operator index.
    conflict = AuditEntry(
        T0 - 5, Cause.WEBHOOK, "conflict", PayoutStatus.COMPLETED, PayoutStatus.COMPLETED,
        "webhook reported declined after final completed", conflict=True,
    )  # fmt: skip
    old = {
        "open": make_payout("open", status=PayoutStatus.UNKNOWN, attempt_started_at=T0 - 900),
        "done": make_payout(
            "done", status=PayoutStatus.COMPLETED, next_check_at=None, created_at=T0 - 20
        ),
    }
    old["done"] = replace(old["done"], audit=(*old["done"].audit, conflict))
    for pid, payout in old.items():
        doc = payout.to_dict()
        del doc["version"]
        await admin.hset(
            f"{prefix}p:{pid}",
            mapping={"v": "1", "doc": json.dumps(doc), "status": payout.status.value},
        )
        await admin.hincrby(prefix + "counts", payout.status.value, 1)
    await admin.hset(
        prefix + "o:done",
        mapping={"status": "completed", "created_at": repr(T0), "at": repr(T0), "attempts": "2"},
    )
    storage = await _opened(redis_url, prefix)
    try:
        page = await storage.list_payouts(PayoutQuery())
        assert [p.id for p in page.items] == ["done", "open"]  # oldest first
        unknown = await storage.list_payouts(PayoutQuery(statuses={PayoutStatus.UNKNOWN}))
        assert [p.id for p in unknown.items] == ["open"]
        conflicts = await storage.list_payouts(PayoutQuery(conflicts_only=True))
        assert [p.id for p in conflicts.items] == ["done"]
        undelivered = await storage.list_payouts(PayoutQuery(undelivered_only=True))
        assert [p.id for p in undelivered.items] == ["done"]
        snap = await storage.ops_snapshot(T0 + 3600, late_after=600, failing_after=60)
        assert (snap.open_past_window, snap.conflicts, snap.outbox_failing) == (1, 1, 1)
        assert await admin.get(prefix + "schema") == "2"
    finally:
        await storage.close()


@needs_redis
async def test_a_listing_script_reads_a_bounded_number_of_entries(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter the index does not serve (here: updated_at) may skip many entries; each call
    reads at most _LIST_BUDGET of them and hands back a cursor where it stopped."""
    monkeypatch.setattr(redis_storage, "_LIST_BUDGET", 4)
    storage = await _opened(redis_url, prefix)
    try:
        for i in range(30):
            updated = T0 + 100 if i in (3, 17, 18, 29) else T0
            await storage.create_if_absent(
                make_payout(f"p-{i:02}", created_at=T0 - 100 + i, updated_at=updated)
            )
        query = PayoutQuery(updated_after=T0 + 50, limit=2)
        found: list[str] = []
        calls = 0
        while True:
            calls += 1
            page = await storage.list_payouts(query)
            found += [p.id for p in page.items]
            if page.next_cursor is None:
                break
            query = replace(query, cursor=page.next_cursor)
        assert found == ["p-03", "p-17", "p-18", "p-29"]
        assert calls >= 30 // 4  # bounded work per call
    finally:
        await storage.close()


# -- the durability check at open -------------------------------------------------------------

_RISK = "second payment"


def _durability_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "resilient_payout.storage" and ("appendfsync" in r.getMessage())
    ]


@needs_redis
async def test_open_warns_when_the_server_may_roll_decisions_back(
    redis_url: str, prefix: str, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    config = await admin.config_get("append*")
    if (config["appendonly"], config["appendfsync"]) == ("yes", "always"):
        pytest.skip("this Redis keeps every write on disk: nothing to warn about")
    caplog.set_level(logging.INFO, logger="resilient_payout.storage")
    storage = await _opened(redis_url, prefix)
    try:
        (record,) = _durability_records(caplog)
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert f"appendonly {config['appendonly']}, appendfsync {config['appendfsync']}" in message
        assert _RISK in message
        assert "POSTed to the partner again" in message
        assert "pushed to the app again" in message
        await storage.open()  # idempotent: no second warning
        assert len(_durability_records(caplog)) == 1
    finally:
        await storage.close()


@needs_redis
async def test_open_is_quiet_on_a_durable_server(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def durable(self: aioredis.Redis, pattern: str = "*") -> dict[str, str]:
        return {"appendonly": "yes", "appendfsync": "always", "appenddirname": "x"}

    monkeypatch.setattr(aioredis.Redis, "config_get", durable)
    caplog.set_level(logging.INFO, logger="resilient_payout.storage")
    storage = await _opened(redis_url, prefix)
    await storage.close()
    assert _durability_records(caplog) == []


@needs_redis
async def test_open_says_at_info_when_config_is_refused(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(self: aioredis.Redis, pattern: str = "*") -> dict[str, str]:
        raise rex.ResponseError("unknown command 'CONFIG'")  # as managed Redis answers

    monkeypatch.setattr(aioredis.Redis, "config_get", refused)
    caplog.set_level(logging.INFO, logger="resilient_payout.storage")
    storage = await _opened(redis_url, prefix)
    try:
        (record,) = _durability_records(caplog)
        assert record.levelno == logging.INFO
        assert "could not be verified" in record.getMessage()
        assert "unknown command" in record.getMessage()
        assert await storage.get("p-1") is None  # open went on
    finally:
        await storage.close()


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
