"""Restarts: a drain on leaving the client, and recovery at once after a crash (issue #14).

Each test runs on virtual time against the scripted fake partner. A *crash* is the client left by
cancellation (it stops at once, as a killed process does); a *deploy* is leaving it normally.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from resilient_payout import (
    Cause,
    PartnerStatus,
    Payout,
    PayoutRequest,
    PayoutStatus,
    Policy,
    ShuttingDown,
)
from resilient_payout._lifecycle import OwnerGone, StatusChecked, SubmitNow, decide
from resilient_payout._model import Found
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner, Fate, Script
from tests._harness import crashing, running, scripted, settled

pytestmark = pytest.mark.anyio
S = PayoutStatus
POLICY = Policy()


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


def owner_gone(p: Payout) -> bool:
    return any(a.event == "owner_gone" and a.cause is Cause.RECOVERY for a in p.audit)


# -- the pure rules --------------------------------------------------------------------------


def test_a_post_belongs_to_the_instance_that_makes_it_and_to_nobody_once_answered() -> None:
    p = Payout.new(PayoutRequest(id="a"), 100.0, next_check_at=120.0, owner="one")
    posted = decide(p, SubmitNow(), 100.0, POLICY, actor="two")
    assert posted.payout.status is S.SUBMITTING
    assert posted.payout.owner == "two"
    checked = decide(
        posted.payout, StatusChecked(1, Found(PartnerStatus.COMPLETED)), 105.0, POLICY, "one"
    )
    assert checked.payout.status is S.COMPLETED
    assert checked.payout.owner is None


def test_owner_gone_makes_an_open_post_unknown_and_checks_it_now() -> None:
    p = Payout.new(PayoutRequest(id="a"), 100.0, next_check_at=120.0, owner="one")
    posting = decide(p, SubmitNow(), 100.0, POLICY, actor="one").payout
    gone = decide(posting, OwnerGone("one"), 103.0, POLICY, actor="two").payout
    assert gone.status is S.UNKNOWN
    assert gone.next_check_at == 103.0  # at once, not after earliest_landing
    assert gone.owner is None
    assert owner_gone(gone)
    assert gone.posts == 1  # never a second POST: an uncertain attempt is checked
    # Someone else's payout, or one recovered already, is left alone.
    assert decide(posting, OwnerGone("other"), 103.0, POLICY).payout is posting
    assert decide(gone, OwnerGone("one"), 104.0, POLICY).payout is gone


def test_owner_gone_hands_a_never_posted_payout_over_for_anyone_to_post_now() -> None:
    p = Payout.new(PayoutRequest(id="a"), 100.0, next_check_at=120.0, owner="one")
    handed = decide(p, OwnerGone("one"), 101.0, POLICY).payout
    assert handed.status is S.RECEIVED
    assert handed.owner is None
    assert handed.next_check_at == 101.0
    assert handed.posts == 0


def test_pending_seen_only_by_a_check_is_checked_again_soon_not_after_the_webhook_grace() -> None:
    p = Payout.new(PayoutRequest(id="a"), 100.0, next_check_at=120.0, owner="one")
    posting = decide(p, SubmitNow(), 100.0, POLICY, actor="one").payout
    gone = decide(posting, OwnerGone("one"), 103.0, POLICY).payout
    seen = decide(gone, StatusChecked(1, Found(PartnerStatus.PENDING)), 103.5, POLICY).payout
    assert seen.status is S.AWAITING
    assert seen.answered_at is None
    assert seen.next_check_at == pytest.approx(103.5 + POLICY.check_interval)


# -- the drain -------------------------------------------------------------------------------


async def test_leaving_the_client_waits_for_the_partners_answers_and_records_them() -> None:
    storage = MemoryStorage()
    async with scripted(Script(answer_delay=8, webhook=False)) as partner:
        async with running(storage, partner) as client:
            for i in range(5):
                await client.submit({"id": f"d{i}"})
            await anyio.sleep(1)
            t0 = anyio.current_time()
        waited = anyio.current_time() - t0
        for i in range(5):
            p = await storage.get(f"d{i}")
            assert p is not None
            assert p.status is S.COMPLETED, p
            assert p.owner is None
            assert p.resolved_by is Cause.PARTNER_ANSWER
    assert 6.5 <= waited <= 8.0  # the answers, not the drain timeout
    assert client.stats.drains_cut_short == 0
    assert client.stats.handed_over == 0
    assert all(partner.reached(f"d{i}") == 1 for i in range(5))


async def test_a_draining_client_refuses_new_submits_and_writes_nothing() -> None:
    storage = MemoryStorage()
    async with scripted(Script(answer_delay=5)) as partner:
        async with running(storage, partner) as client:
            await client.submit({"id": "before"})
            client.begin_drain()
            assert client.draining
            with pytest.raises(ShuttingDown) as caught:
                await client.submit({"id": "after"})
            assert caught.value.retry_after > 0
            assert await storage.get("after") is None
    final = await storage.get("before")
    assert final is not None
    assert final.status is S.COMPLETED


async def test_a_drain_cut_short_hands_the_open_post_over_and_the_next_checks_it_at_once() -> None:
    storage = MemoryStorage()
    script = Script(Fate.SLOW, PartnerStatus.DECLINED, answer_delay=70, webhook=False)
    policy = POLICY.replace(drain_timeout=20.0)
    async with scripted(script) as partner:
        async with running(storage, partner, policy=policy, instance_id="old") as first:
            await first.submit({"id": "long"})
            await anyio.sleep(1)
            t0 = anyio.current_time()
        assert anyio.current_time() - t0 == pytest.approx(20.0, abs=0.5)
        assert first.stats.drains_cut_short == 1
        assert first.stats.handed_over == 1
        left = await storage.get("long")
        assert left is not None
        assert left.status is S.UNKNOWN
        assert owner_gone(left)
        restart = anyio.current_time()
        async with running(storage, partner, instance_id="new") as second:
            p = await settled(second, "long", within=500)
    assert p.status is S.DECLINED
    assert partner.reached("long") == 1  # never re-POSTed
    assert partner.check_times[0] - restart < 2.0  # checked at once, not after a timer


# -- recovery after a crash --------------------------------------------------------------------


async def test_an_instance_restarted_under_its_name_recovers_its_open_post_at_once() -> None:
    storage = MemoryStorage()
    script = Script(Fate.ANSWER, PartnerStatus.COMPLETED, answer_delay=6, webhook=False)
    async with scripted(script) as partner:
        async with crashing(storage, partner, instance_id="slot-1") as (first, die):
            await first.submit({"id": "k"})
            await anyio.sleep(2)
            die.cancel()
        left = await storage.get("k")
        assert left is not None
        assert left.status is S.SUBMITTING
        assert left.owner == "slot-1"
        await anyio.sleep(5)  # the restart; meanwhile the partner answered into the void
        restart = anyio.current_time()
        async with running(storage, partner, instance_id="slot-1") as again:
            p = await settled(again, "k", within=500)
            done = anyio.current_time()
    assert p.status is S.COMPLETED
    assert owner_gone(p)
    assert done - restart < 1.0  # one status check, at once
    assert partner.reached("k") == 1
    assert again.stats.takeovers == 1


async def test_another_instance_takes_over_a_dead_ones_posts_within_seconds() -> None:
    storage = MemoryStorage()
    script = Script(Fate.ANSWER, PartnerStatus.DECLINED, answer_delay=4, webhook=False)
    async with scripted(script) as partner:
        async with running(storage, partner, instance_id="survivor") as survivor:
            async with crashing(storage, partner, instance_id="victim") as (victim, die):
                await victim.submit({"id": "v"})
                await anyio.sleep(2)
                died = anyio.current_time()
                die.cancel()
            p = await settled(survivor, "v", within=500)
            settled_at = anyio.current_time()
    assert p.status is S.DECLINED
    assert owner_gone(p)
    # takeover_after of silence since its last beat (at most one interval before it died),
    # plus a beat or two: never the 60 s submit_deadline.
    lag = settled_at - died
    beat = POLICY.heartbeat_interval
    assert POLICY.takeover_after - beat <= lag <= POLICY.takeover_after + 3 * beat
    assert partner.reached("v") == 1
    assert survivor.stats.takeovers == 1


async def test_a_stalled_instance_presumed_dead_costs_a_check_never_a_second_post() -> None:
    # The victim's heartbeat stops (a frozen loop, a GC pause), but its POST is still open:
    # the survivor recovers the payout while the answer is on its way; the late answer applies.
    storage = MemoryStorage()
    script = Script(Fate.ANSWER, PartnerStatus.COMPLETED, answer_delay=15, webhook=False)
    stalled = POLICY.replace(heartbeat_interval=1_000.0)
    pushes: list[tuple[str, PayoutStatus]] = []

    async def push(payout_id: str, status: PayoutStatus) -> None:
        pushes.append((payout_id, status))

    async with scripted(script) as partner:
        async with running(storage, partner, push, instance_id="watcher") as watcher:
            async with running(storage, partner, push, instance_id="frozen", policy=stalled) as f:
                await f.submit({"id": "s"})
                await anyio.sleep(POLICY.takeover_after + 3)
                mid = await storage.get("s")
                assert mid is not None
                assert owner_gone(mid)
                assert mid.status in (S.UNKNOWN, S.AWAITING)
                p = await settled(f, "s", within=100)
            await anyio.sleep(5)
    assert p.status is S.COMPLETED
    assert partner.reached("s") == 1
    assert partner.double_payments == []
    assert pushes == [("s", S.COMPLETED)]
    assert watcher.stats.takeovers == 1


async def test_a_drain_releases_claimed_checks_so_the_next_instance_need_not_wait_out_leases() -> (
    None
):
    # Uncertain payouts claimed for checks the budget has not granted yet are released on exit.
    storage = MemoryStorage()
    script = Script(Fate.TIMEOUT_LAND, PartnerStatus.COMPLETED, land_after=45, webhook=False)
    slow_budget = POLICY.replace(check_rate=0.01, check_burst=1)
    async with scripted(script) as partner:
        async with running(storage, partner, policy=slow_budget, instance_id="a") as first:
            for i in range(3):
                await first.submit({"id": f"u{i}"})
            await anyio.sleep(60)  # 504s, unknown, due for checks the budget withholds
        assert first.stats.handed_over >= 2
        restart = anyio.current_time()
        async with running(storage, partner, instance_id="b") as second:
            for i in range(3):
                await settled(second, f"u{i}", within=500)
            first_check = min(t for t in partner.check_times if t >= restart)
    assert first_check - restart < 2.0  # not the 30 s lease


async def test_a_restart_under_its_name_pushes_an_outcome_its_crashed_run_had_claimed_at_once() -> (
    None
):
    # The crashed run had claimed the push (its lease outlasts a notify round: a minute or
    # more); the restarted run releases its own old leases and pushes at once.
    storage = MemoryStorage()
    pushed: list[tuple[str, PayoutStatus, float]] = []

    async def hang(payout_id: str, status: PayoutStatus) -> None:
        await anyio.sleep_forever()

    async def record(payout_id: str, status: PayoutStatus) -> None:
        pushed.append((payout_id, status, anyio.current_time()))

    async with scripted(Script(answer_delay=1, webhook=False)) as partner:
        async with crashing(storage, partner, hang, instance_id="slot-1") as (first, die):
            await first.submit({"id": "k"})
            await anyio.sleep(3)  # answered at 1 s; its push is open
            die.cancel()
        entry = await storage.get_outbox("k")
        assert entry is not None
        assert entry.delivered_at is None
        assert entry.next_attempt_at - anyio.current_time() > 30  # the lease's end
        restart = anyio.current_time()
        async with running(storage, partner, record, instance_id="slot-1") as again:
            await anyio.sleep(2)
    assert [(pid, status) for pid, status, _ in pushed] == [("k", S.COMPLETED)]
    assert pushed[0][2] - restart < 1.0
    assert again.stats.notifications_delivered == 1
    assert again.stats.leases_released == 1


async def test_a_takeover_releases_a_dead_ones_checks_at_once_and_its_pushes_soon_after() -> None:
    storage = MemoryStorage()
    uncertain = Script(Fate.TIMEOUT_LAND, PartnerStatus.COMPLETED, land_after=40, webhook=False)
    answered = Script(answer_delay=1, webhook=False)
    slow_budget = POLICY.replace(check_rate=0.01, check_burst=1)
    ids = ("u0", "u1", "u2")
    pushes: list[tuple[str, float]] = []

    async def hang(payout_id: str, status: PayoutStatus) -> None:
        await anyio.sleep_forever()

    async def record(payout_id: str, status: PayoutStatus) -> None:
        pushes.append((payout_id, anyio.current_time()))

    partner = FakePartner(script=lambda pid, _n: answered if pid == "pushed" else uncertain)
    async with partner:
        with anyio.CancelScope() as die:
            async with running(storage, partner, hang, policy=slow_budget, instance_id="v") as v:
                for i in ids:
                    await v.submit({"id": i})
                # 504s at 30 s, unknown, claimed for checks the budget withholds; claimed
                # again when those leases ran out (at about 63 s)
                await anyio.sleep(66)
                await v.submit({"id": "pushed"})
                await anyio.sleep(2)  # answered at 1 s; its push is open, leased to v
                left = [await storage.get(i) for i in ids]
                unknown = [p.id for p in left if p is not None and p.status is S.UNKNOWN]
                assert len(unknown) >= 2
                die.cancel()
        died = anyio.current_time()
        async with running(storage, partner, record, instance_id="survivor") as survivor:
            for i in ids:
                p = await settled(survivor, i, within=500)
                assert p.status is S.COMPLETED
            checked = min(t for t in partner.check_times if t >= died)
            await anyio.sleep(300)
    # Released at the takeover (takeover_after and a few beats), not after the 30 s lease.
    assert checked - died < POLICY.takeover_after + 4 * POLICY.heartbeat_interval
    assert survivor.stats.leases_released >= len(unknown) + 1  # the checks, then the push
    assert sorted(pid for pid, _ in pushes) == ["pushed", *ids]
    # Its open push: released notify_timeout after the takeover, not at the lease's end
    # (a whole round of retries: minutes).
    late = next(t for pid, t in pushes if pid == "pushed")
    takeover = POLICY.takeover_after + POLICY.notify_timeout
    assert takeover <= late - died <= takeover + 4 * POLICY.heartbeat_interval
    assert all(partner.reached(i) == 1 for i in ("pushed", *ids))


async def test_a_draining_instance_keeps_beating_so_nobody_takes_over_its_open_posts() -> None:
    # The drain waits 20 s for the partner's answer: far past takeover_after. A drain is no
    # death: the watcher leaves the POST to it, and no status check is spent.
    storage = MemoryStorage()
    script = Script(Fate.ANSWER, PartnerStatus.COMPLETED, answer_delay=20, webhook=False)
    async with scripted(script) as partner:
        async with running(storage, partner, instance_id="watcher") as watcher:
            async with running(storage, partner, instance_id="leaving") as leaving:
                await leaving.submit({"id": "d"})
                await anyio.sleep(1)
                t0 = anyio.current_time()
            drained = anyio.current_time() - t0
            p = await storage.get("d")
            assert list(await storage.instances()) == ["watcher"]  # it left on leaving
            await anyio.sleep(2 * POLICY.takeover_after)
    assert 18.0 <= drained <= 20.0  # the answer, recorded by the draining instance
    assert p is not None
    assert p.status is S.COMPLETED
    assert p.resolved_by is Cause.PARTNER_ANSWER
    assert not owner_gone(p)
    assert partner.check_times == []
    assert watcher.stats.takeovers == 0
    assert list(await storage.instances()) == []  # both left the registry on leaving
