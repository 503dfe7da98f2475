"""RedisCheckBudget: one status-check budget shared by several processes through Redis.

Each budget object has its own Redis client, like a separate process. Grant times are the Redis
server's clock at the moment of each grant (``last_acquired_at``), the clock the limit is kept on.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as aioredis

from resilient_payout.reconcile import CheckBudget
from resilient_payout.storage.redis import RedisCheckBudget
from tests.contract.conftest import TcpProxy, server_url, with_port

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

RATE = 50.0
BURST = 5


@pytest.fixture
async def redis_url() -> str:
    return await server_url("redis")


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def key(admin: aioredis.Redis) -> AsyncIterator[str]:
    name = f"rp-test:{uuid.uuid4().hex[:12]}:budget"
    yield name
    await admin.delete(name, name + ":pause")


async def _server_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1_000_000


def _budgets(url: str, key: str, n: int) -> list[RedisCheckBudget]:
    return [RedisCheckBudget(url, rate=RATE, burst=BURST, key=key) for _ in range(n)]


async def test_processes_sharing_a_budget_never_exceed_burst_plus_rate_times_t(
    redis_url: str, key: str
) -> None:
    budgets = _budgets(redis_url, key, 4)
    grants: list[float] = []

    async def spend(budget: RedisCheckBudget) -> None:
        while True:
            await budget.acquire()
            assert budget.last_acquired_at is not None
            grants.append(budget.last_acquired_at)

    try:
        with anyio.move_on_after(1.0):
            async with anyio.create_task_group() as tg:
                for budget in budgets:
                    for _ in range(3):
                        tg.start_soon(spend, budget)
    finally:
        for budget in budgets:
            await budget.aclose()

    assert sum(b.sent for b in budgets) == len(grants)
    # Whole microseconds, as Redis TIME gives them: epoch seconds in a float are only exact to
    # a fraction of a microsecond, and windows sit right at the limit.
    micros = sorted(round(t * 1_000_000) for t in grants)
    # Every window [micros[i], micros[j]] holds j - i + 1 grants.
    worst = max(
        (j - i + 1) - (BURST + RATE * (micros[j] - micros[i]) / 1_000_000)
        for i in range(len(micros))
        for j in range(i, len(micros))
    )
    assert worst <= 1e-9
    # ...and the budget is spent, not wasted: close to the limit over the whole run.
    span = (micros[-1] - micros[0]) / 1_000_000
    assert len(grants) >= 0.8 * (BURST + RATE * span)
    assert span >= 0.8


async def test_a_fresh_budget_allows_a_burst_then_one_per_interval(
    redis_url: str, key: str
) -> None:
    (budget,) = _budgets(redis_url, key, 1)
    async with budget:
        times: list[float] = []
        for _ in range(BURST + 2):
            await budget.acquire()
            assert budget.last_acquired_at is not None
            times.append(budget.last_acquired_at)
    assert times[BURST - 1] - times[0] < 1 / RATE  # the burst went out at once
    assert times[BURST] - times[0] >= 1 / RATE - 1e-6
    assert times[BURST + 1] - times[0] >= 2 / RATE - 1e-6


async def test_a_pause_from_one_process_holds_every_process(
    redis_url: str, key: str, admin: aioredis.Redis
) -> None:
    pauser, other, third = _budgets(redis_url, key, 3)
    try:
        before = await _server_time(admin)
        await pauser.pause(0.3)
        await third.pause(0.05)  # a shorter pause never cuts a longer one short
        grants: list[float] = []

        async def spend(budget: RedisCheckBudget) -> None:
            await budget.acquire()
            assert budget.last_acquired_at is not None
            grants.append(budget.last_acquired_at)

        async with anyio.create_task_group() as tg:
            for budget in (pauser, other, third, other):
                tg.start_soon(spend, budget)
        # Redis expires keys at millisecond precision: allow one millisecond.
        assert min(grants) >= before + 0.3 - 0.001
        assert (pauser.pauses, third.pauses, other.pauses) == (1, 1, 0)
    finally:
        for budget in (pauser, other, third):
            await budget.aclose()


async def test_budget_is_a_check_budget_and_leaves_a_given_client_open(
    admin: aioredis.Redis, key: str
) -> None:
    budget = RedisCheckBudget(admin, rate=RATE, burst=BURST, key=key)
    assert isinstance(budget, CheckBudget)
    await budget.acquire()
    await budget.aclose()
    assert await admin.ping() is True
    assert await admin.exists(key) == 1
    for rate, burst in ((0, 1), (-1.0, 1), (1.0, 0)):
        with pytest.raises(ValueError, match="rate"):
            RedisCheckBudget(admin, rate=rate, burst=burst)


async def test_acquire_waits_out_a_redis_outage(redis_url: str, key: str) -> None:
    server = TcpProxy(redis_url)
    await server.start()
    budget = RedisCheckBudget(with_port(redis_url, server.port), rate=RATE, burst=BURST, key=key)
    try:
        await budget.acquire()
        await server.stop()
        acquired = anyio.Event()

        async def spend() -> None:
            await budget.acquire()
            acquired.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(spend)
            await anyio.sleep(0.3)
            assert not acquired.is_set()  # no check goes out uncounted
            await server.start()
            with anyio.fail_after(5):
                await acquired.wait()
        assert budget.sent == 2
    finally:
        await budget.aclose()
        await server.stop()
