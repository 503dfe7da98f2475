"""An operator settling payouts by hand: PayoutClient.resolve, on virtual time."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from resilient_payout import (
    Cause,
    InvalidRequest,
    Payout,
    PayoutAlreadyFinal,
    PayoutStatus,
    UnknownPayout,
)
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, Script
from resilient_payout.testing.contract import make_payout
from tests._harness import running, scripted

pytestmark = pytest.mark.anyio
S = PayoutStatus


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


class Pushes:
    def __init__(self) -> None:
        self.got: list[tuple[str, PayoutStatus]] = []

    async def __call__(self, payout_id: str, status: PayoutStatus) -> None:
        self.got.append((payout_id, status))


async def _stuck(storage: MemoryStorage, payout_id: str) -> Payout:
    """An ``unknown`` payout, with no work due for a long time (so nothing but the test acts)."""
    stored, created = await storage.create_if_absent(
        make_payout(payout_id, status=S.UNKNOWN, next_check_at=1e12)
    )
    assert created
    return stored


async def test_resolve_settles_audits_the_operator_and_pushes_once() -> None:
    storage, pushes = MemoryStorage(), Pushes()
    async with scripted(Script(webhook=False)) as partner, running(storage, partner, pushes) as c:
        before = await _stuck(storage, "p-1")
        done = await c.resolve(
            "p-1", S.FAILED, "  partner back office: never arrived ", operator="alice"
        )
        await anyio.sleep(5)
    assert (done.status, done.resolved_by, done.version) == (S.FAILED, Cause.OPERATOR, 2)
    entry = done.audit[-1]
    assert (entry.cause, entry.event, entry.from_status, entry.to_status) == (
        Cause.OPERATOR,
        "operator",
        S.UNKNOWN,
        S.FAILED,
    )
    assert entry.detail == "partner back office: never arrived (by alice)"
    assert done.audit[:-1] == before.audit
    assert await storage.get("p-1") == done
    outbox = await storage.get_outbox("p-1")
    assert outbox is not None
    assert (outbox.status, outbox.delivered_at is not None) == (S.FAILED, True)
    assert pushes.got == [("p-1", S.FAILED)]


@pytest.mark.parametrize(
    ("status", "note", "message"),
    [
        (S.AWAITING, "x", "final status"),
        (S.UNKNOWN, "x", "final status"),
        ("failed", "x", "final status"),  # a string, not a PayoutStatus
        (S.FAILED, "", "note"),
        (S.FAILED, "   \n", "note"),
        (S.FAILED, "n" * 2001, "2000"),
    ],
)
async def test_bad_resolve_requests_change_nothing(status: Any, note: str, message: str) -> None:
    storage = MemoryStorage()
    async with scripted(Script(webhook=False)) as partner, running(storage, partner) as c:
        before = await _stuck(storage, "p-1")
        with pytest.raises(InvalidRequest, match=message):
            await c.resolve("p-1", status, note, operator="alice")
        assert await storage.get("p-1") == before
        assert await storage.get_outbox("p-1") is None


async def test_resolving_an_unknown_id_or_a_final_payout_changes_nothing() -> None:
    storage, pushes = MemoryStorage(), Pushes()
    async with scripted(Script(webhook=False)) as partner, running(storage, partner, pushes) as c:
        with pytest.raises(UnknownPayout):
            await c.resolve("nope", S.FAILED, "gone", operator="alice")
        await _stuck(storage, "p-1")
        first = await c.resolve("p-1", S.DECLINED, "back office: declined", operator="alice")
        await anyio.sleep(5)
        for status in (S.COMPLETED, S.DECLINED):  # disagreeing or not: nothing is written
            with pytest.raises(PayoutAlreadyFinal, match="final already") as raised:
                await c.resolve("p-1", status, "second opinion", operator="bob")
            assert (raised.value.payout_id, raised.value.status) == ("p-1", "declined")
        assert await storage.get("p-1") == first
        assert not any(a.conflict for a in first.audit)
        await anyio.sleep(5)
    assert pushes.got == [("p-1", S.DECLINED)]


async def test_a_resolve_racing_a_webhook_exactly_one_wins() -> None:
    """Resolve and a webhook for one payout, started together with random head starts: the
    compare-and-set picks one; the other either records a conflict (a webhook after the
    operator) or raises PayoutAlreadyFinal (an operator after the webhook), writing nothing."""
    rng = random.Random(13)
    storage, pushes = MemoryStorage(), Pushes()
    outcomes: dict[str, str] = {}
    rounds = 60

    async def after(yields: int) -> None:
        for _ in range(yields):
            await anyio.lowlevel.checkpoint()

    async with scripted(Script(webhook=False)) as partner, running(storage, partner, pushes) as c:

        async def resolve(pid: str, head: int) -> None:
            await after(head)
            try:
                await c.resolve(pid, S.FAILED, "back office: failed", operator="alice")
                outcomes[pid] = "resolve won"
            except PayoutAlreadyFinal:
                outcomes[pid] = "webhook won"

        async def webhook(pid: str, head: int) -> None:
            await after(head)
            await c.handle_webhook({"id": pid, "status": "completed"})

        for n in range(rounds):
            pid = f"p-{n:02}"
            await _stuck(storage, pid)
            async with anyio.create_task_group() as tg:
                tg.start_soon(resolve, pid, rng.randrange(4))
                tg.start_soon(webhook, pid, rng.randrange(4))
        await anyio.sleep(30)  # every outcome pushed
        stored = {pid: await storage.get(pid) for pid in outcomes}
        entries = {pid: await storage.get_outbox(pid) for pid in outcomes}

    assert len(outcomes) == rounds
    assert set(outcomes.values()) == {"resolve won", "webhook won"}  # both orders happened
    for pid, outcome in outcomes.items():
        p, entry = stored[pid], entries[pid]
        assert p is not None
        assert entry is not None
        operator_lines = [a for a in p.audit if a.cause is Cause.OPERATOR]
        conflicts = [a for a in p.audit if a.conflict]
        if outcome == "resolve won":
            assert (p.status, p.resolved_by) == (S.FAILED, Cause.OPERATOR), pid
            assert len(operator_lines) == 1, pid
            # The webhook lost: its report is kept as a conflict, never applied.
            assert [(a.cause, a.to_status) for a in conflicts] == [(Cause.WEBHOOK, S.FAILED)], pid
        else:
            assert (p.status, p.resolved_by) == (S.COMPLETED, Cause.WEBHOOK), pid
            assert operator_lines == [], pid  # the resolve wrote nothing
            assert conflicts == [], pid
        assert entry.status is p.status, pid
    # One push per payout, each the final status.
    finals = {pid: p.status for pid, p in stored.items() if p is not None}
    assert sorted(pushes.got) == sorted(finals.items())


async def test_resolve_goes_through_the_version_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that lands between resolve's read and its compare-and-set is seen: resolve
    re-reads and, the payout still open, settles the newer version."""
    storage = MemoryStorage()
    async with scripted(Script(webhook=False)) as partner, running(storage, partner) as c:
        v1 = await _stuck(storage, "p-1")
        real_get = storage.get
        bumped = False

        async def get_then_bump(payout_id: str) -> Payout | None:
            nonlocal bumped
            got = await real_get(payout_id)
            if not bumped and got is not None:
                bumped = True  # a status check counted meanwhile
                assert await storage.compare_and_set(replace(v1, checks=1), expected_version=1)
            return got

        monkeypatch.setattr(storage, "get", get_then_bump)
        done = await c.resolve("p-1", S.FAILED, "back office: failed", operator="alice")
    assert (done.version, done.checks, done.status) == (3, 1, S.FAILED)
    assert c.stats.races_lost == 1
