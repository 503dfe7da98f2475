"""Money under hostile time: stalls between deciding and sending, clocks apart, late answers.

Each test reproduces a path to a second payment (or a wrong outcome) found in review; every one
of them failed on the code before the fix (see CHANGELOG, "Fixed"). All run on virtual time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from resilient_payout import (
    CheckOutcome,
    ConflictDetected,
    Found,
    LoopClock,
    PartnerStatus,
    Payout,
    PayoutClient,
    PayoutStatus,
    Policy,
    RateLimited,
    SubmitAttempt,
    SubmitOutcome,
    Uncertain,
)
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import (
    VIRTUAL_TIME_BACKEND,
    FakePartner,
    Fate,
    Script,
    SkewedClock,
    StallingStorage,
)
from tests._harness import WEBHOOK_URL, scripted, settled

pytestmark = pytest.mark.anyio
S = PayoutStatus
POLICY = Policy()
final = partial(settled, within=2_000)


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


def stall_once(seconds: float) -> Callable[[Payout], float]:
    done: list[bool] = []

    def stall(_: Payout) -> float:
        if done:
            return 0.0
        done.append(True)
        return seconds

    return stall


@asynccontextmanager
async def instances(
    partner: Any, *configs: dict[str, Any], storage: MemoryStorage | None = None
) -> AsyncIterator[list[PayoutClient]]:
    """Clients on one shared storage (like separate processes), each with its own options."""
    shared = storage or MemoryStorage()
    await shared.open()
    async with AsyncExitStack() as stack:
        clients = []
        for config in configs:
            opts = dict(config)
            wrap = opts.pop("stall", None)
            client = PayoutClient(
                storage=StallingStorage(shared, wrap) if wrap else shared,  # type: ignore[arg-type]
                partner=partner,
                webhook_url=WEBHOOK_URL,
                close_storage=False,
                **opts,
            )
            clients.append(await stack.enter_async_context(client))
        if isinstance(partner, FakePartner):
            partner.webhook_sink = clients[-1].handle_webhook
        yield clients


async def settle_one(partner: FakePartner, payout_id: str) -> tuple[PayoutClient, Payout, float]:
    """Submit on one instance: its client, the final payout and the virtual time that took."""
    async with partner, instances(partner, {}) as (client,):
        t0 = anyio.current_time()
        await client.submit({"id": payout_id, "amount": 5})
        p = await final(client, payout_id)
        return client, p, anyio.current_time() - t0


# -- 1. the window starts before the bytes leave ----------------------------------------------


async def test_a_stall_after_the_submitting_write_is_not_sent_late() -> None:
    """Stall 40 s, one instance: the old code POSTed at 40 s, confirmed absence at 152 s and
    POSTed again while attempt 1 landed at 159 s."""
    partner = scripted(
        Script(Fate.TIMEOUT_LAND, PartnerStatus.COMPLETED, land_after=119.0),
        Script(Fate.ANSWER, PartnerStatus.DECLINED, answer_delay=1.0),
    )
    async with partner, instances(partner, {"stall": stall_once(40.0)}) as (client,):
        await client.submit({"id": "stalled", "amount": 5})
        p = await final(client, "stalled")
    assert partner.double_payments == []
    assert p.status is S.COMPLETED  # the partner's truth
    assert partner.truth("stalled") is PartnerStatus.COMPLETED
    assert [a.event for a in p.audit].count("send_expired") == 1
    assert client.stats.sends_expired == 1


async def test_a_stalled_instance_never_sends_a_stale_attempt_after_takeover() -> None:
    """Stall 200 s, two instances: B orphans the payout, confirms absence and POSTs attempt 2;
    the old code then let A wake and send attempt 1 as well."""
    partner = scripted(Script(Fate.ANSWER, PartnerStatus.COMPLETED, answer_delay=1.0))
    configs = ({"stall": stall_once(200.0), "background": False}, {"instance_id": "b"})
    async with partner, instances(partner, *configs) as (a, b):
        await a.submit({"id": "frozen", "amount": 5})
        p = await final(b, "frozen")
        await anyio.sleep(300)  # A wakes at 200 s
    assert partner.reached("frozen") == 1
    assert partner.double_payments == []
    assert p.status is S.COMPLETED
    assert a.stats.sends_expired == 1
    assert a.stats.posts == 0


# -- 2. clocks of different instances are compared ---------------------------------------------


async def test_a_checker_whose_clock_runs_ahead_does_not_confirm_absence_early() -> None:
    """A decides, stalls 20 s and its POST is 5 s in transit; B, 10 s ahead (the tolerated
    skew), makes the confirming check. The old code's 30 s of slack did not cover both."""
    partner = scripted(
        Script(Fate.TIMEOUT_LAND, PartnerStatus.COMPLETED, land_after=120.0),
        Script(Fate.ANSWER, PartnerStatus.DECLINED, answer_delay=1.0),
        send_delay=POLICY.connect_timeout,
    )
    configs = (
        {"stall": stall_once(20.0), "background": False},
        {"clock": SkewedClock(POLICY.max_clock_skew), "instance_id": "b"},
    )
    async with partner, instances(partner, *configs) as (a, b):
        await a.submit({"id": "skewed", "amount": 5})
        p = await final(b, "skewed")
    assert partner.double_payments == []
    assert p.status is S.COMPLETED


def test_the_policy_refuses_more_skew_than_its_window_leaves_room_for() -> None:
    # B 34 s ahead paid twice with the old window; such a policy is now refused outright.
    with pytest.raises(ValueError, match="late_arrival_window"):
        Policy(max_clock_skew=34.0, submit_deadline=90.0)
    with pytest.raises(ValueError, match="late_arrival_window"):
        Policy(late_arrival_window=Policy().latest_landing)  # no slack at all
    with pytest.raises(ValueError, match="submit_deadline"):
        Policy(max_clock_skew=20.0, late_arrival_window=160.0)
    with pytest.raises(ValueError, match="max_send_delay"):
        Policy(max_send_delay=Policy().connect_timeout)


# -- 3. a 404 is judged by when its GET left ---------------------------------------------------


async def test_a_404_answered_late_does_not_confirm_absence() -> None:
    """Every answer comes 36 s after the partner looked: a GET sent at 117 s says 404, truthfully
    then, and is applied at 153 s, after the window; attempt 1 landed at 119 s."""
    partner = scripted(
        Script(Fate.TIMEOUT_LAND, PartnerStatus.COMPLETED, land_after=119.0),
        Script(Fate.ANSWER, PartnerStatus.DECLINED, answer_delay=1.0),
        check_delay=36.0,
    )
    _, p, _ = await settle_one(partner, "late-404")
    assert partner.double_payments == []
    assert partner.reached("late-404") == 1
    assert p.status is S.COMPLETED


# -- 4. Retry-After is capped -----------------------------------------------------------------


class _RetryAfterOnce(FakePartner):
    """A fake partner whose first submit and first check answer 429 with a huge Retry-After."""

    submit_429: bool = True
    check_429: bool = True

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        if self.submit_429:
            self.submit_429 = False
            return RateLimited(retry_after=31_536_000.0)  # a year
        return await super().submit(attempt)

    async def check(self, payout_id: str, partner_ref: str | None = None) -> CheckOutcome:
        if self.check_429:
            self.check_429 = False
            return RateLimited(retry_after=float("inf"))
        return await super().check(payout_id, partner_ref)


async def test_a_huge_retry_after_on_submit_is_capped() -> None:
    partner = _RetryAfterOnce(script=lambda _id, _n: Script(answer_delay=1.0))
    partner.check_429 = False
    client, p, took = await settle_one(partner, "slow-door")
    assert p.status is S.COMPLETED
    assert took <= POLICY.max_retry_after + 2 * POLICY.poll_interval + 1.0
    assert client.stats.retry_after_capped == 1


async def test_a_huge_retry_after_on_a_check_pauses_checks_only_up_to_the_cap() -> None:
    partner = _RetryAfterOnce(script=lambda _id, _n: Script(Fate.TIMEOUT_LAND, land_after=40.0))
    partner.submit_429 = False
    client, p, took = await settle_one(partner, "paused")
    assert p.status is S.COMPLETED
    assert p.resolved_by is not None
    # First check at ~35 s, paused for the cap, then checks resume.
    assert took <= 35 + POLICY.max_retry_after + 3 * POLICY.check_interval
    assert client.stats.retry_after_capped == 1


# -- 5. a 404 after "pending" is no proof of absence --------------------------------------------


async def test_a_404_for_an_acknowledged_transfer_never_fails_it() -> None:
    partner = scripted(
        Script(
            Fate.PENDING,
            PartnerStatus.COMPLETED,
            final_delay=400.0,
            webhook=False,
            flaky_404=True,
        )
    )
    conflicts: list[ConflictDetected] = []
    async with (
        partner,
        instances(partner, {"on_conflict": lambda _p, c: conflicts.append(c)}) as (client,),
    ):
        await client.submit({"id": "lagging", "amount": 5})
        p = await final(client, "lagging", within=3_000)
    assert p.status is S.COMPLETED
    assert partner.reached("lagging") == 1
    flagged = [a for a in p.audit if a.event == "not_found_after_pending"]
    assert len(flagged) == 1
    assert flagged[0].conflict
    assert len(conflicts) == 1
    assert conflicts[0].cause.value == "status_check"


# -- 6. a raising hook cannot kill the client ---------------------------------------------------


class _RacingPartner:
    """504 on every POST; every check takes 20 s and then reports ``declined``."""

    idempotency = None

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        return Uncertain("HTTP 504")

    async def check(self, payout_id: str, partner_ref: str | None = None) -> CheckOutcome:
        await anyio.sleep(20)
        return Found(PartnerStatus.DECLINED)


async def test_an_on_conflict_hook_that_raises_during_a_check_does_not_stop_the_client() -> None:
    def hook(_p: Payout, _c: ConflictDetected) -> None:
        raise RuntimeError("pager down")

    partner = _RacingPartner()
    async with instances(partner, {"on_conflict": hook}) as (client,):
        await client.submit({"id": "raced", "amount": 5})
        await anyio.sleep(POLICY.earliest_landing + POLICY.check_interval + 5)  # check in flight
        done = await client.handle_webhook({"id": "raced", "status": "completed"})
        assert done.status is S.COMPLETED
        await anyio.sleep(30)  # the check answers "declined": a conflict, and the hook raises
        assert client.stats.hook_errors == 1
        after = await client.get("raced")
        assert after.status is S.COMPLETED
        assert after.audit[-1].conflict
        # Still running: a new payout is taken and driven.
        await client.submit({"id": "next", "amount": 5})
        await anyio.sleep(POLICY.earliest_landing + POLICY.check_interval + 25)
        assert (await client.get("next")).status is S.DECLINED


# -- a partner adapter that raises --------------------------------------------------------------


class _RaisingPartner:
    idempotency = None

    def __init__(self) -> None:
        self.posts = 0

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        self.posts += 1
        raise RuntimeError("adapter bug after the request left")

    async def check(self, payout_id: str, partner_ref: str | None = None) -> CheckOutcome:
        raise RuntimeError("adapter bug")


async def test_a_partner_that_raises_is_uncertain_never_resent_blindly() -> None:
    partner = _RaisingPartner()
    async with instances(partner, {}) as (client,):
        await client.submit({"id": "buggy", "amount": 5})
        await anyio.sleep(POLICY.late_arrival_window - 1)
        p = await client.get("buggy")
        assert p.status is S.UNKNOWN
        assert partner.posts == 1
        assert client.stats.answers == {"uncertain": 1}


# -- the clock follows the wall clock, never backwards ------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_loop_clock_follows_a_wall_clock_step_and_never_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = LoopClock(resync_interval=0.0)
    first = clock.now()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 100.0)
    ahead = clock.now()
    assert ahead - first == pytest.approx(100.0, abs=1.0)
    monkeypatch.setattr(time, "time", lambda: real() - 50.0)
    assert clock.now() >= ahead  # holds still rather than running backwards


async def test_loop_clock_on_virtual_time_never_reanchors(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = LoopClock(resync_interval=0.0)
    start = clock.now()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 10_000.0)
    await anyio.sleep(60)
    assert clock.now() - start == pytest.approx(60.0)
