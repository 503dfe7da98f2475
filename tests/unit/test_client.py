"""PayoutClient end to end against the scripted fake partner, on virtual time."""

from __future__ import annotations

from functools import partial
from typing import Any

import anyio
import pytest

from resilient_payout import (
    Cause,
    ConflictDetected,
    IdempotencyConflict,
    InvalidRequest,
    InvalidWebhook,
    LoopClock,
    NotificationFailed,
    PartnerStatus,
    Payout,
    PayoutRequest,
    PayoutStatus,
    Policy,
    UnknownPayout,
)
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner, Fate, Script
from tests._harness import crashing, running, scripted, settled

pytestmark = pytest.mark.anyio
S = PayoutStatus
POLICY = Policy()
settle = partial(settled, within=1_000)  # every payout here is final within 1,000 s


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


class Pushes:
    """The app's backend: records every push, can be told to fail."""

    def __init__(self, fail_first: int = 0) -> None:
        self.got: list[tuple[str, PayoutStatus]] = []
        self.fail_first = fail_first
        self.calls = 0

    async def __call__(self, payout_id: str, status: PayoutStatus) -> None:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise NotificationFailed("app backend down")
        self.got.append((payout_id, status))


async def test_submit_answers_at_once_and_the_outcome_is_pushed_once() -> None:
    pushes = Pushes()
    async with scripted(Script(Fate.ANSWER, PartnerStatus.DECLINED, answer_delay=4)) as partner:
        async with running(MemoryStorage(), partner, pushes) as client:
            t0 = anyio.current_time()
            result = await client.submit({"id": "tx-1", "amount": 10})
            assert anyio.current_time() == t0  # no waiting on the partner
            assert not result.replayed
            # Stored straight into submitting: this process POSTs it at once.
            assert result.payout.status is S.SUBMITTING
            p = await settle(client, "tx-1")
            assert anyio.current_time() - t0 == pytest.approx(4.0)
            assert p.status is S.DECLINED
            assert p.resolved_by is Cause.PARTNER_ANSWER
            await anyio.sleep(60)  # the webhook repeats the outcome: a no-op
    assert pushes.got == [("tx-1", S.DECLINED)]
    assert partner.reached("tx-1") == 1


async def test_fifty_concurrent_submits_make_one_payout_and_one_post() -> None:
    results = []
    async with scripted(Script(answer_delay=1)) as partner:
        async with running(MemoryStorage(), partner) as client:

            async def one() -> None:
                results.append(await client.submit({"id": "dup", "amount": 5}))

            async with anyio.create_task_group() as tg:
                for _ in range(50):
                    tg.start_soon(one)
            await settle(client, "dup")
            late = await client.submit({"amount": 5, "id": "dup"})
    assert sum(not r.replayed for r in results) == 1
    assert late.replayed
    assert late.payout.status is S.COMPLETED
    assert partner.reached("dup") == 1
    assert client.stats.replays == 50


async def test_same_id_with_other_contents_is_a_conflict() -> None:
    async with scripted(Script()) as partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "x", "amount": 5})
        with pytest.raises(IdempotencyConflict):
            await client.submit({"id": "x", "amount": 6})
        with pytest.raises(InvalidRequest, match="id"):
            await client.submit({"amount": 6})
        assert (await settle(client, "x")).request == {"id": "x", "amount": 5}
    assert partner.reached("x") == 1


async def test_late_landing_after_504_is_found_by_a_status_check() -> None:
    script = Script(Fate.TIMEOUT_LAND, PartnerStatus.COMPLETED, land_after=70)
    async with scripted(script) as partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "late"})
        p = await settle(client, "late")
    assert p.status is S.COMPLETED
    assert p.resolved_by is Cause.STATUS_CHECK
    assert partner.reached("late") == 1
    assert partner.double_payments == []
    assert all(t >= POLICY.earliest_landing for t in partner.check_times)


async def test_dropped_504_is_resubmitted_only_after_confirmed_absence() -> None:
    def script(_id: str, n: int) -> Script:
        return Script(Fate.TIMEOUT_DROP) if n == 1 else Script(Fate.ANSWER, answer_delay=2)

    async with FakePartner(script=script) as partner:
        async with running(MemoryStorage(), partner) as client:
            await client.submit({"id": "drop"})
            p = await settle(client, "drop")
    assert p.status is S.COMPLETED
    assert p.attempt == 2
    assert partner.reached("drop") == 2
    assert partner.double_payments == []
    second_post = partner.posts["drop"][1].at
    assert second_post >= POLICY.late_arrival_window
    assert client.stats.resubmissions == 1


async def test_twice_dropped_payout_fails_after_the_second_window() -> None:
    async with scripted(Script(Fate.TIMEOUT_DROP)) as partner:
        async with running(MemoryStorage(), partner) as client:
            await client.submit({"id": "gone"})
            p = await settle(client, "gone")
    assert p.status is S.FAILED
    assert partner.reached("gone") == 2
    assert partner.double_payments == []


async def test_webhooks_for_unknown_ids_never_create_a_payout() -> None:
    storage = MemoryStorage()
    async with scripted(Script()) as partner, running(storage, partner) as client:
        with pytest.raises(UnknownPayout):
            await client.handle_webhook({"id": "nope", "status": "completed"})
        with pytest.raises(InvalidWebhook):
            await client.handle_webhook(b'{"id": "nope", "status": "paid"}')
        with pytest.raises(InvalidWebhook):
            await client.handle_webhook(b"{not json")
        assert await storage.get("nope") is None
        assert client.stats.webhooks_unknown == 1


async def test_crash_while_submitting_recovers_to_unknown_and_never_reposts() -> None:
    # Restarted under a new name: the old name's silence gives it away after takeover_after.
    storage = MemoryStorage()
    script = Script(Fate.SLOW, PartnerStatus.DECLINED, answer_delay=50, webhook=False)
    async with scripted(script) as partner:
        async with crashing(storage, partner) as (first, die):
            await first.submit({"id": "crash"})
            await anyio.sleep(5)  # the POST is in flight; the process dies now
            die.cancel()
        assert (await storage.get("crash")).status is S.SUBMITTING  # type: ignore[union-attr]
        async with running(storage, partner) as second:
            p = await settle(second, "crash")
    assert p.status is S.DECLINED
    assert partner.reached("crash") == 1
    assert any(a.event == "owner_gone" for a in p.audit)
    assert second.stats.recovered_orphans == 1
    assert second.stats.takeovers == 1


async def test_crash_before_submitting_is_resumed_by_the_next_process() -> None:
    storage = MemoryStorage()
    await storage.open()
    # What a process that died between storing and calling the partner leaves behind.
    _, created = await storage.create_if_absent(
        Payout.new(PayoutRequest(id="early"), LoopClock().now(), next_check_at=0.0)
    )
    assert created
    async with scripted(Script(answer_delay=1)) as partner, running(storage, partner) as survivor:
        p = await settle(survivor, "early")
    assert p.status is S.COMPLETED
    assert partner.reached("early") == 1
    assert [a.cause for a in p.audit][:2] == [Cause.APP_REQUEST, Cause.RECOVERY]


async def test_disagreeing_webhook_after_final_is_a_conflict_and_not_pushed() -> None:
    seen: list[ConflictDetected] = []

    async def hook(_p: Payout, c: ConflictDetected) -> None:
        seen.append(c)

    pushes = Pushes()
    async with scripted(Script(webhook=False)) as partner:
        async with running(MemoryStorage(), partner, pushes, on_conflict=hook) as client:
            await client.submit({"id": "c"})
            await settle(client, "c")
            p = await client.handle_webhook({"id": "c", "status": "declined"})
            await anyio.sleep(10)
    assert p.status is S.COMPLETED
    assert [c.reported for c in seen] == [S.DECLINED]
    assert pushes.got == [("c", S.COMPLETED)]
    assert p.audit[-1].conflict


async def test_pushes_are_retried_until_the_app_acknowledges() -> None:
    pushes = Pushes(fail_first=7)
    storage = MemoryStorage()
    async with scripted(Script(answer_delay=1, webhook=False)) as partner:
        async with running(storage, partner, pushes) as client:
            await client.submit({"id": "n"})
            await settle(client, "n")
            await anyio.sleep(600)
    assert pushes.got == [("n", S.COMPLETED)]
    entry = await storage.get_outbox("n")
    assert entry is not None
    assert entry.delivered_at is not None
    assert client.stats.notification_rounds_failed >= 1


async def test_undelivered_push_is_resumed_after_a_restart() -> None:
    storage = MemoryStorage()
    down = Pushes(fail_first=10**6)
    async with scripted(Script(answer_delay=1, webhook=False)) as partner:
        async with running(storage, partner, down) as client:
            await client.submit({"id": "r"})
            await settle(client, "r")
        up = Pushes()
        async with running(storage, partner, up):
            await anyio.sleep(POLICY.lease * 20)
    assert down.got == []
    assert up.got == [("r", S.COMPLETED)]


async def test_checks_stay_within_budget_when_many_are_due_at_once() -> None:
    script = Script(Fate.TIMEOUT_LAND, land_after=100)
    async with scripted(script) as partner, running(MemoryStorage(), partner) as client:
        for i in range(60):
            await client.submit({"id": f"b{i}"})
        for i in range(60):
            await settle(client, f"b{i}", within=2_000)
    assert partner.blocks == 0
    times = sorted(partner.check_times)
    worst = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert worst <= POLICY.check_burst + POLICY.check_rate
    assert client.stats.checks_sent == len(times)


async def test_a_block_pauses_all_checks_for_the_penalty() -> None:
    script = Script(Fate.TIMEOUT_LAND, land_after=100)
    partner = FakePartner(script=lambda _i, _n: script, check_limit=1, block_penalty=60)
    fast = POLICY.replace(check_rate=3.0, check_burst=3)
    async with partner, running(MemoryStorage(), partner, policy=fast) as client:
        for i in range(10):
            await client.submit({"id": f"k{i}"})
        for i in range(10):
            await settle(client, f"k{i}", within=3_000)
    assert partner.blocks >= 1
    assert client.stats.check_pauses >= 1
    for blocked_at in partner.block_times:
        # (A check exactly at the end of the penalty is allowed: compare with float slack.)
        assert [t for t in partner.check_times if blocked_at < t < blocked_at + 60 - 1e-6] == []


async def test_leaving_at_once_still_posts_what_was_accepted() -> None:
    storage = MemoryStorage()
    async with scripted(Script(answer_delay=3)) as partner:
        async with running(storage, partner):
            pass
        async with running(storage, partner) as client:
            await client.submit({"id": "quick"})
    # Left before the background submit ran: the drain still waits for it and its answer.
    stored = await storage.get("quick")
    assert stored is not None
    assert stored.status is S.COMPLETED
    assert stored.owner is None
    assert partner.reached("quick") == 1
