"""A partner adapter that raises in the middle of a submit or a status check.

The scripted :class:`~resilient_payout.testing.FakePartner` keeps the truth (what it recorded,
what it paid); :class:`Raising` puts an adapter in front of it that raises before the request
is sent, or after the partner took it (the transfer exists, the caller only sees an exception).
tests/unit/test_hostile_time.py covers an adapter that raises on every call and never reaches
the partner (the payout stays ``unknown``); here every payout must end final and equal to the
partner's truth, with no blind re-POST: a second attempt only once a status check after the
late-arrival window has confirmed the first one absent. All on virtual time, memory storage.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import anyio
import pytest

from resilient_payout import (
    Cause,
    CheckOutcome,
    IdempotencyKeys,
    PartnerStatus,
    PayoutClient,
    PayoutStatus,
    Policy,
    SubmitAttempt,
    SubmitOutcome,
)
from resilient_payout._model import idempotency_key
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner, Fate, Script
from tests._harness import running, settled

pytestmark = pytest.mark.anyio
S = PayoutStatus
POLICY = Policy()
KEYS = IdempotencyKeys(retention=86_400.0)

Fault = Literal["before", "after"] | None
"""Where the adapter raises: before the request left, after the partner took it, or not."""
FaultPlan = Callable[[str, int], Fault]
"""(payout id, n-th call for that id) -> fault."""


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


def never(_id: str, _n: int) -> Fault:
    return None


@dataclass(frozen=True)
class Call:
    at: float
    payout_id: str
    attempt: int
    send: int
    key: str
    fault: Fault


class Raising(FakePartner):
    """The fake partner behind an adapter that raises as ``on_submit`` / ``on_check`` say."""

    def __init__(
        self,
        on_submit: FaultPlan = never,
        on_check: FaultPlan = never,
        error: Callable[[str], BaseException] = RuntimeError,
        **knobs: Any,
    ) -> None:
        super().__init__(**knobs)
        self.on_submit = on_submit
        self.on_check = on_check
        self.error = error
        self.calls: list[Call] = []
        """Every submit call, as the adapter was given it."""
        self.check_calls: list[tuple[str, Fault]] = []

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        n = sum(c.payout_id == attempt.payout_id for c in self.calls) + 1
        fault = self.on_submit(attempt.payout_id, n)
        self.calls.append(
            Call(
                anyio.current_time(),
                attempt.payout_id,
                attempt.attempt,
                attempt.send,
                attempt.idempotency_key,
                fault,
            )
        )
        if fault == "before":
            raise self.error("adapter bug before the request left")
        outcome = await super().submit(attempt)
        if fault == "after":
            raise self.error("adapter bug after the partner took the request")
        return outcome

    async def check(self, payout_id: str, partner_ref: str | None = None) -> CheckOutcome:
        n = sum(pid == payout_id for pid, _ in self.check_calls) + 1
        fault = self.on_check(payout_id, n)
        self.check_calls.append((payout_id, fault))
        if fault == "before":
            raise self.error("adapter bug before the check left")
        outcome = await super().check(payout_id, partner_ref)
        if fault == "after":
            raise self.error("adapter bug after the partner answered the check")
        return outcome

    def calls_of(self, payout_id: str) -> list[Call]:
        return [c for c in self.calls if c.payout_id == payout_id]


def by_id(*scripts: Script) -> Callable[[str, int], Script]:
    """Ids ending in an even digit get ``completed``, odd ones ``declined``; the n-th POST of an
    id gets the n-th script (the last one repeats)."""

    def script(payout_id: str, n: int) -> Script:
        s = scripts[min(n, len(scripts)) - 1]
        return replace(s, status=PartnerStatus.DECLINED) if int(payout_id[-1]) % 2 else s

    return script


async def settle_and_check(
    client: PayoutClient,
    partner: Raising,
    ids: list[str],
    pushes: list[tuple[str, str]],
    *,
    keys: bool = False,
) -> dict[str, S]:
    """Wait until every payout is final, the partner has settled and every outcome is pushed;
    assert that all of it agrees and that nothing was re-POSTed blindly."""
    finals = {i: (await settled(client, i, within=3_000)).status for i in ids}
    while anyio.current_time() <= max(partner.settled_at(i) for i in ids):  # noqa: ASYNC110
        await anyio.sleep(5)
    while {i for i, _ in pushes} != set(ids):  # noqa: ASYNC110 - polled on virtual time
        await anyio.sleep(1)
    await anyio.sleep(10)  # any late, disagreeing push would arrive meanwhile
    truth = {i: partner.truth(i) for i in ids}
    expected = {i: S.FAILED if t is None else S(t.value) for i, t in truth.items()}
    assert finals == expected
    assert partner.double_payments == []
    assert {i: {s for p, s in pushes if p == i} for i in ids} == {i: {finals[i].value} for i in ids}
    assert client.stats.conflicts == 0
    for i in ids:
        entry = await client.storage.get_outbox(i)
        assert entry is not None
        assert (entry.status, entry.delivered_at is not None) == (finals[i], True)
        calls = partner.calls_of(i)
        attempts = sorted({c.attempt for c in calls})
        assert attempts == list(range(1, len(attempts) + 1)) <= [1, 2]
        for c in calls:
            # One key per attempt: a re-send of an attempt always carries its key.
            assert c.key == idempotency_key(i, c.attempt)
        if not keys:
            assert [c.send for c in calls] == [1] * len(calls)  # no re-send without keys
        if len(attempts) == 2:
            first = min(c.at for c in calls if c.attempt == 1)
            second = min(c.at for c in calls if c.attempt == 2)
            # A second attempt only after absence was confirmed past the window.
            assert second - first >= POLICY.late_arrival_window
    return finals


def new_ids(n: int) -> list[str]:
    return [f"pf-{i}" for i in range(n)]


# -- submit raises --------------------------------------------------------------------------


async def test_a_submit_that_raises_after_the_partner_took_it_is_found_never_reposted() -> None:
    # No webhooks: only a status check can tell what happened to the transfer.
    partner = Raising(on_submit=lambda _i, _n: "after", script=by_id(Script(webhook=False)))
    pushes: list[tuple[str, str]] = []
    ids = new_ids(6)

    async def push(i: str, status: S) -> None:
        pushes.append((i, status.value))

    async with partner, running(MemoryStorage(), partner, push) as client:
        for i in ids:
            await client.submit({"id": i, "amount": 5})
        finals = await settle_and_check(client, partner, ids, pushes)
        causes = {(await client.get(i)).resolved_by for i in ids}
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    assert all(len(partner.calls_of(i)) == 1 and partner.reached(i) == 1 for i in ids)
    assert causes == {Cause.STATUS_CHECK}
    assert client.stats.answers == {"uncertain": len(ids)}


async def test_a_submit_that_raises_before_sending_is_reposted_only_after_the_window() -> None:
    partner = Raising(
        on_submit=lambda _i, n: "before" if n == 1 else None,
        script=by_id(Script(answer_delay=2.0)),
    )
    pushes: list[tuple[str, str]] = []
    ids = new_ids(6)

    async def push(i: str, status: S) -> None:
        pushes.append((i, status.value))

    async with partner, running(MemoryStorage(), partner, push) as client:
        for i in ids:
            await client.submit({"id": i, "amount": 5})
        await anyio.sleep(POLICY.late_arrival_window - 1)
        # Nothing reached the partner, yet the raise may have come after sending: uncertain.
        assert {(await client.get(i)).status for i in ids} == {S.UNKNOWN}
        assert partner.posts == {}
        finals = await settle_and_check(client, partner, ids, pushes)
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    assert all([c.attempt for c in partner.calls_of(i)] == [1, 2] for i in ids)
    assert all(partner.reached(i) == 1 for i in ids)
    assert client.stats.resubmissions == len(ids)


async def test_a_resend_that_raises_after_sending_is_deduplicated_by_its_key() -> None:
    # A 504 that never lands, then the re-send (same key) reaches the partner and the adapter
    # raises: uncertain again, re-sent again with the same key, answered from the key.
    partner = Raising(
        on_submit=lambda _i, n: "after" if n == 2 else None,
        script=by_id(Script(Fate.TIMEOUT_DROP, webhook=False), Script(webhook=False)),
        idempotency=KEYS,
    )
    pushes: list[tuple[str, str]] = []
    ids = new_ids(4)

    async def push(i: str, status: S) -> None:
        pushes.append((i, status.value))

    async with partner, running(MemoryStorage(), partner, push) as client:
        for i in ids:
            await client.submit({"id": i, "amount": 5})
        finals = await settle_and_check(client, partner, ids, pushes, keys=True)
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    for i in ids:
        assert {c.attempt for c in partner.calls_of(i)} == {1}  # never a second attempt
        assert len(partner.calls_of(i)) >= 3
    assert partner.key_replays >= len(ids)


# -- check raises ---------------------------------------------------------------------------


async def test_checks_that_raise_before_or_after_asking_are_retried_until_one_answers() -> None:
    # Every POST is recorded and answered after our read timeout: only checks can settle it,
    # and the first three checks of each payout raise (before, after, before).
    plan: dict[int, Fault] = {1: "before", 2: "after", 3: "before"}
    partner = Raising(
        on_check=lambda _i, n: plan.get(n),
        script=by_id(Script(Fate.SLOW, answer_delay=5.0, webhook=False)),
    )
    pushes: list[tuple[str, str]] = []
    ids = new_ids(6)

    async def push(i: str, status: S) -> None:
        pushes.append((i, status.value))

    async with partner, running(MemoryStorage(), partner, push) as client:
        for i in ids:
            await client.submit({"id": i, "amount": 5})
        finals = await settle_and_check(client, partner, ids, pushes)
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    for i in ids:
        faults = [f for pid, f in partner.check_calls if pid == i]
        assert faults[:4] == ["before", "after", "before", None]
        assert len(partner.calls_of(i)) == 1
    befores = sum(f == "before" for _pid, f in partner.check_calls)
    assert len(partner.check_times) == len(partner.check_calls) - befores  # "after": it asked


# -- everything at once ---------------------------------------------------------------------


@pytest.mark.parametrize("keys", [None, KEYS], ids=["no-keys", "keys"])
async def test_random_adapter_faults_on_top_of_partner_faults(keys: IdempotencyKeys | None) -> None:
    rng = random.Random(f"adapter-faults:{keys is not None}")
    faults: list[Fault] = ["before", "after", None, None, None]
    partner = Raising(
        on_submit=lambda _i, _n: rng.choice(faults),
        on_check=lambda _i, _n: rng.choice(faults),
        seed=7,
        p_uncertain=0.4,
        p_webhook=0.5,
        idempotency=keys,
    )
    pushes: list[tuple[str, str]] = []
    ids = new_ids(30)

    async def push(i: str, status: S) -> None:
        pushes.append((i, status.value))

    async with partner, running(MemoryStorage(), partner, push) as client:
        for i in ids:
            await client.submit({"id": i, "amount": 5})
            await anyio.sleep(rng.uniform(0, 2))
        await settle_and_check(client, partner, ids, pushes, keys=keys is not None)
    raised = [c.fault for c in partner.calls if c.fault is not None]
    assert "before" in raised
    assert "after" in raised
    if keys is None:
        assert any(f is not None for _pid, f in partner.check_calls)
    else:  # uncertain POSTs are re-sent with their key rather than checked
        assert client.stats.resends > 0


# -- a raise the client does not survive ----------------------------------------------------


async def test_an_adapter_raising_a_stray_cancellation_does_not_stop_the_client() -> None:
    partner = Raising(
        on_submit=lambda _i, n: "after" if n == 1 else None,
        error=lambda _msg: asyncio.CancelledError(),
        script=by_id(Script(webhook=False)),
    )
    pushes: list[tuple[str, str]] = []
    ids = new_ids(2)

    async def push(i: str, status: S) -> None:
        pushes.append((i, status.value))

    try:
        async with partner, running(MemoryStorage(), partner, push) as client:
            for i in ids:
                await client.submit({"id": i, "amount": 5})
            await settle_and_check(client, partner, ids, pushes)
    except asyncio.CancelledError:
        pytest.fail("the client died of the adapter's CancelledError")
