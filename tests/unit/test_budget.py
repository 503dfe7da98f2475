"""The local status-check budget: exact rate, burst, start-full, pause — on virtual time."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_payout import LocalCheckBudget
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, run_virtual

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


def most_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    return max(
        (sum(1 for u in times if t <= u < t + width - 1e-9) for t in times),
        default=0,
    )


async def grab(budget: LocalCheckBudget, n: int) -> list[float]:
    out = []
    for _ in range(n):
        await budget.acquire()
        out.append(anyio.current_time())
    return out


async def test_starts_full_then_spaces_checks_at_the_rate() -> None:
    t0 = anyio.current_time()
    times = await grab(LocalCheckBudget(rate=2.0, burst=2), 5)
    assert [round(t - t0, 6) for t in times] == [0.5, 1.0, 1.5, 2.0, 2.5]


async def test_an_idle_budget_refills_to_its_burst() -> None:
    budget = LocalCheckBudget(rate=2.0, burst=3)
    await grab(budget, 1)
    await anyio.sleep(10)
    t = anyio.current_time()
    times = await grab(budget, 4)
    assert [round(x - t, 6) for x in times] == [0.0, 0.0, 0.0, 0.5]


async def test_pause_holds_every_check() -> None:
    budget = LocalCheckBudget(rate=10.0, burst=1)
    await grab(budget, 1)
    await budget.pause(60)
    t = anyio.current_time()
    (after,) = await grab(budget, 1)
    assert after - t == pytest.approx(60.0)
    assert budget.pauses == 1


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        LocalCheckBudget(rate=0)
    with pytest.raises(ValueError, match="burst"):
        LocalCheckBudget(rate=1, burst=0)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(0.2, 50.0),
    burst=st.integers(1, 6),
    gaps=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=60),
    width=st.sampled_from([0.5, 1.0, 2.5, 10.0]),
)
def test_no_window_ever_exceeds_burst_plus_rate_times_width(
    rate: float, burst: int, gaps: list[float], width: float
) -> None:
    async def run() -> list[float]:
        budget = LocalCheckBudget(rate=rate, burst=burst)
        times: list[float] = []

        async def one(delay: float) -> None:
            await anyio.sleep(delay)
            await budget.acquire()
            times.append(anyio.current_time())

        async with anyio.create_task_group() as tg:
            at = 0.0
            for gap in gaps:
                at += gap
                tg.start_soon(one, at)
        return times

    times = run_virtual(run)
    assert len(times) == len(gaps)
    assert most_in_window(times, width) <= burst + rate * width + 1e-6
