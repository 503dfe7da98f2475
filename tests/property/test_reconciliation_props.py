"""Reconciliation under a budget: for any arrivals, budget and partner, never over budget, and
every payout final and equal to the partner's truth."""

from __future__ import annotations

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_payout import PayoutStatus, Policy
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import FakePartner, run_virtual
from resilient_payout.testing.reconciliation import Profile, simulate
from tests._harness import running


def most_in_window(times: list[float], width: float) -> int:
    times = sorted(times)
    return max((sum(1 for u in times if t <= u < t + width - 1e-9) for t in times), default=0)


@settings(max_examples=40, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 20.0), min_size=1, max_size=40),
    rate=st.floats(0.1, 5.0),
    burst=st.integers(1, 4),
    p_uncertain=st.floats(0.0, 1.0),
    p_land=st.floats(0.0, 1.0),
    p_webhook=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_any_load_stays_within_budget_and_ends_final_and_true(
    gaps: list[float],
    rate: float,
    burst: int,
    p_uncertain: float,
    p_land: float,
    p_webhook: float,
    seed: int,
) -> None:
    policy = Policy(check_rate=rate, check_burst=burst, poll_interval=2.0)
    # The partner tolerates exactly the budget's worst 1 s: any excess would be a block.
    partner = FakePartner(
        seed=seed,
        p_uncertain=p_uncertain,
        p_land_given_uncertain=p_land,
        p_webhook=p_webhook,
        check_limit=int(burst + rate),
    )
    pushed: dict[str, list[PayoutStatus]] = {}

    async def push(pid: str, status: PayoutStatus) -> None:
        pushed.setdefault(pid, []).append(status)

    async def run() -> dict[str, PayoutStatus]:
        async with partner, running(MemoryStorage(), partner, push, policy=policy) as client:
            for i, gap in enumerate(gaps):
                await anyio.sleep(gap)
                await client.submit({"id": f"r{i}"})
            # Checks may queue behind a small budget: allow for all of them.
            horizon = 2 * (policy.submit_deadline + policy.late_arrival_window) + 60
            horizon += len(gaps) * 8 / rate
            for i in range(len(gaps)):
                await client.wait_final(f"r{i}", horizon)
            await anyio.sleep(5)
            out = {}
            for i in range(len(gaps)):
                p = await client.get(f"r{i}")
                out[p.id] = p.status
            return out

    statuses = run_virtual(run)
    for width in (1.0, 5.0, 30.0):
        assert most_in_window(partner.check_times, width) <= burst + rate * width + 1e-6
    assert partner.blocks == 0
    assert partner.double_payments == []
    for pid, status in statuses.items():
        truth = partner.truth(pid)
        assert status is (PayoutStatus(truth.value) if truth else PayoutStatus.FAILED), pid
        assert set(pushed[pid]) == {status}


def test_the_reference_profile_meets_its_targets_at_a_smaller_size() -> None:
    report = run_virtual(simulate, Profile(duration=200.0, seed=3))
    assert report.final == report.payouts == 1000
    assert report.correct == report.payouts
    assert report.blocks == 0
    assert report.double_payments == 0
    assert report.max_checks_in_any_1s <= report.budget_per_1s
    assert report.zero_check_share_of_certain == 1.0
    assert report.late_landings > 20
    assert report.p50_over_bound <= 1.25
