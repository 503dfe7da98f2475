"""The partner seam: what an adapter is given, partner references, idempotent re-sends.

On virtual time against the scripted fake partner, which can honour idempotency keys and name
its own references.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio
import pytest

from resilient_payout import (
    Accepted,
    Cause,
    ConflictDetected,
    Found,
    IdempotencyKeys,
    NotSent,
    PartnerAnswered,
    PartnerStatus,
    Payout,
    PayoutRequest,
    PayoutStatus,
    Policy,
    ReferenceRefused,
    Refused,
    SendExpired,
    StatusChecked,
    SubmitAttempt,
    SubmitOutcome,
    Uncertain,
    UnknownPayout,
    WebhookReceived,
    WorkDue,
    decide,
)
from resilient_payout._lifecycle import may_resend
from resilient_payout._model import idempotency_key
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner, Fate, Script
from resilient_payout.webhooks import Webhook
from tests._harness import running, settled

pytestmark = pytest.mark.anyio
S = PayoutStatus
KEYS = IdempotencyKeys(retention=86_400.0)
POLICY = Policy()


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


class Recording(FakePartner):
    """Keeps every SubmitAttempt it was given and every reference it was asked about."""

    def __init__(self, *scripts: Script, **knobs: Any) -> None:
        super().__init__(script=lambda _id, n: scripts[min(n, len(scripts)) - 1], **knobs)
        self.attempts: list[SubmitAttempt] = []
        self.checked_refs: list[str | None] = []

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        self.attempts.append(attempt)
        return await super().submit(attempt)

    async def check(self, payout_id: str, partner_ref: str | None = None) -> Any:
        self.checked_refs.append(partner_ref)
        return await super().check(payout_id, partner_ref)


# -- what the adapter is given ------------------------------------------------------------------


async def test_the_adapter_gets_the_stored_request_and_a_stable_key() -> None:
    partner = Recording(Script(answer_delay=1.0))
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit(
            {"id": "a1", "amount": 100.50, "currency": "KES", "to": {"msisdn": "1"}}
        )
        await settled(client, "a1", within=100)
    [attempt] = partner.attempts
    assert attempt.payout_id == "a1"
    assert attempt.attempt == 1
    assert attempt.send == 1
    # As stored: exact numbers (a decimal string), the app's own fields untouched.
    assert dict(attempt.request) == {"id": "a1", "amount": "100.5", "currency": "KES",
                                     "to": {"msisdn": "1"}}  # fmt: skip
    assert attempt.webhook_url == "http://service/webhook"
    assert attempt.idempotency_key == idempotency_key("a1", 1)


def test_keys_are_derived_per_attempt_and_differ_between_attempts() -> None:
    assert idempotency_key("a1", 1) == idempotency_key("a1", 1)
    assert idempotency_key("a1", 1) != idempotency_key("a1", 2)
    assert idempotency_key("a1", 1) != idempotency_key("a2", 1)
    assert len(idempotency_key("a1", 1)) == 36  # a UUID: fits Wise's customerTransactionId


def test_an_idempotency_declaration_needs_exactly_one_carrier() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        IdempotencyKeys(header=None)
    with pytest.raises(ValueError, match="exactly one"):
        IdempotencyKeys(header="Idempotency-Key", body_field="customerTransactionId")
    with pytest.raises(ValueError, match="positive"):
        IdempotencyKeys(retention=0)


# -- idempotent re-sends -------------------------------------------------------------------------


async def test_a_504_that_lands_late_is_resent_with_the_same_key_and_settles_at_landing() -> None:
    late = Script(Fate.TIMEOUT_LAND, PartnerStatus.COMPLETED, land_after=70.0, webhook=False)
    partner = Recording(late, idempotency=KEYS)
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "k1"})
        p = await settled(client, "k1", within=1_000)
        took = p.audit[-1].at - p.created_at
    assert p.status is S.COMPLETED
    assert partner.double_payments == []
    assert {a.idempotency_key for a in partner.attempts} == {idempotency_key("k1", 1)}
    assert [a.send for a in partner.attempts] == list(range(1, len(partner.attempts) + 1))
    assert partner.key_replays >= 1  # answered from the held key, never a second transfer
    assert client.stats.resends == len(partner.attempts) - 1 >= 1
    # Settled within a re-send's backoff of the landing, not after the 150 s window.
    assert took < 70.0 + POLICY.resend_backoff_max + 5


async def test_a_504_that_never_lands_is_resent_and_answered_at_once() -> None:
    dropped = Script(Fate.TIMEOUT_DROP, webhook=False)
    answered = Script(Fate.ANSWER, PartnerStatus.DECLINED, answer_delay=1.0, webhook=False)
    partner = Recording(dropped, answered, idempotency=KEYS)
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "k2"})
        p = await settled(client, "k2", within=1_000)
    assert p.status is S.DECLINED
    assert partner.truth("k2") is PartnerStatus.DECLINED
    assert partner.double_payments == []
    assert [a.attempt for a in partner.attempts] == [1, 1]  # the same attempt, the same key
    assert p.audit[-1].at - p.created_at < 30.0 + POLICY.resend_backoff_initial + 5


async def test_without_keys_an_uncertain_post_is_never_resent_before_the_window() -> None:
    dropped = Script(Fate.TIMEOUT_DROP, webhook=False)
    answered = Script(Fate.ANSWER, PartnerStatus.COMPLETED, answer_delay=1.0, webhook=False)
    partner = Recording(dropped, answered)
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "k3"})
        await anyio.sleep(POLICY.late_arrival_window - 1)
        assert len(partner.attempts) == 1
        p = await settled(client, "k3", within=1_000)
    assert p.status is S.COMPLETED
    assert [a.attempt for a in partner.attempts] == [1, 2]
    assert client.stats.resends == 0


async def test_no_resend_once_the_partner_may_have_forgotten_the_key() -> None:
    # The partner keeps keys for 60 s only: the re-send at ~32 s is fine, none after ~35 s.
    short = IdempotencyKeys(retention=60.0)
    dropped = Script(Fate.TIMEOUT_DROP, webhook=False)
    partner = Recording(dropped, idempotency=short)
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "k4"})
        p = await settled(client, "k4", within=3_000)
    assert p.status is S.FAILED
    first = partner.attempts[0]
    resent_at = [a for a in partner.attempts if a.attempt == 1]
    assert len(resent_at) == 2  # one re-send inside the retention, then status checks
    assert first.idempotency_key == resent_at[1].idempotency_key
    assert partner.double_payments == []


def test_may_resend_leaves_room_for_a_late_send_and_a_fast_clock() -> None:
    policy = POLICY.replace(key_retention=100.0)
    p = Payout.new(PayoutRequest(id="x"), 0.0, next_check_at=0.0)
    p = replace(p, status=S.UNKNOWN, attempt=1, key_first_sent_at=0.0, attempt_started_at=0.0)
    edge = 100.0 - policy.max_send_delay - policy.max_clock_skew
    assert may_resend(p, edge - 0.01, policy)
    assert not may_resend(p, edge, policy)
    assert not may_resend(replace(p, resends=policy.max_resends), 1.0, policy)
    assert not may_resend(p, 1.0, POLICY)  # a partner without keys: never
    assert not may_resend(replace(p, status=S.AWAITING), 1.0, policy)


def test_a_due_unknown_payout_with_keys_is_resent_not_checked() -> None:
    policy = POLICY.replace(key_retention=86_400.0)
    p = Payout.new(PayoutRequest(id="x"), 0.0, next_check_at=0.0)
    p = replace(p, status=S.UNKNOWN, attempt=1, key_first_sent_at=0.0, attempt_started_at=0.0)
    d = decide(replace(p, next_check_at=5.0), WorkDue(), 5.0, policy)
    assert d.payout.status is S.SUBMITTING
    assert d.payout.resends == 1
    assert d.payout.attempt == 1
    assert d.payout.attempt_started_at == 5.0  # the window counts from the latest send
    assert d.payout.key_first_sent_at == 0.0  # the key's retention from its first use


# -- partner references ----------------------------------------------------------------------


async def test_the_partners_reference_is_kept_and_used_for_checks_and_webhooks() -> None:
    pending = Script(Fate.PENDING, PartnerStatus.COMPLETED, final_delay=100.0, webhook=False)
    partner = Recording(pending, partner_refs=True)
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "r1"})
        await anyio.sleep(POLICY.webhook_grace + POLICY.check_interval + 5)
        p = await client.get("r1")
        assert p.partner_ref == "ref-r1"
        assert partner.checked_refs
        assert set(partner.checked_refs) == {"ref-r1"}
        assert (await client.find_by_partner_ref("ref-r1")).id == "r1"
        with pytest.raises(UnknownPayout):
            await client.find_by_partner_ref("ref-nobody")


async def test_a_webhook_that_names_only_the_reference_settles_the_payout() -> None:
    def by_reference(body: Any, headers: Any) -> Webhook:
        return Webhook(None, PartnerStatus(body["state"]), partner_ref=body["ref"])

    pending = Script(Fate.PENDING, PartnerStatus.COMPLETED, final_delay=1_000.0, webhook=False)
    partner = Recording(pending, partner_refs=True)
    async with partner, running(MemoryStorage(), partner, webhook_parser=by_reference) as client:
        await client.submit({"id": "r2"})
        await anyio.sleep(5)
        done = await client.handle_webhook({"ref": "ref-r2", "state": "declined"})
        assert done.id == "r2"
        assert done.status is S.DECLINED
        with pytest.raises(UnknownPayout):
            await client.handle_webhook({"ref": "ref-unknown", "state": "completed"})
        assert client.stats.webhooks_unknown == 1


async def test_a_reference_claimed_by_a_second_payout_is_a_conflict_not_applied() -> None:
    storage = MemoryStorage()

    class SameRef(FakePartner):
        async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
            return Accepted(PartnerStatus.PENDING, "ref-shared")

    partner = SameRef()
    conflicts: list[ConflictDetected] = []
    async with (
        partner,
        running(storage, partner, on_conflict=lambda _p, c: conflicts.append(c)) as client,
    ):
        await client.submit({"id": "first"})
        await anyio.sleep(1)
        await client.submit({"id": "second"})
        await anyio.sleep(1)
        first, second = await client.get("first"), await client.get("second")
    assert first.partner_ref == "ref-shared"
    assert second.partner_ref is None
    assert second.status is S.AWAITING  # the news itself was applied, without the reference
    flagged = [a for a in second.audit if a.event == "reference_taken"]
    assert len(flagged) == 1
    assert flagged[0].conflict
    assert "first" in (flagged[0].detail or "")
    assert client.stats.partner_refs_refused == 1
    assert len(conflicts) == 1


def test_a_different_reference_later_is_a_conflict_and_the_first_stays() -> None:
    p = Payout.new(PayoutRequest(id="x"), 0.0, next_check_at=0.0)
    p = replace(p, status=S.AWAITING, attempt=1, partner_ref="A", attempt_started_at=0.0)
    d = decide(p, StatusChecked(1, Found(PartnerStatus.COMPLETED, "B"), 10.0), 10.0, POLICY)
    assert d.payout.status is S.COMPLETED  # the status is news; the reference is not applied
    assert d.payout.partner_ref == "A"
    assert any(a.event == "reference_conflict" and a.conflict for a in d.payout.audit)
    assert any(isinstance(e, ConflictDetected) for e in d.effects)


def test_the_first_reference_is_taken_from_an_answer_a_check_or_a_webhook() -> None:
    base = Payout.new(PayoutRequest(id="x"), 0.0, next_check_at=0.0)
    submitting = replace(base, status=S.SUBMITTING, attempt=1, attempt_started_at=0.0)
    answered = decide(
        submitting, PartnerAnswered(1, Accepted(PartnerStatus.PENDING, "R")), 1, POLICY
    )
    assert answered.payout.partner_ref == "R"
    hooked = decide(answered.payout, WebhookReceived(PartnerStatus.COMPLETED, "R"), 2, POLICY)
    assert hooked.payout.partner_ref == "R"
    assert not any(a.conflict for a in hooked.payout.audit)
    # An answer to an older attempt names no reference of this one.
    stale = decide(
        submitting, PartnerAnswered(0, Accepted(PartnerStatus.PENDING, "OLD")), 1, POLICY
    )
    assert stale.payout.partner_ref is None


def test_a_refused_reference_is_recorded_as_a_conflict() -> None:
    p = Payout.new(PayoutRequest(id="x"), 0.0, next_check_at=0.0)
    d = decide(p, ReferenceRefused("R", "other"), 3.0, POLICY)
    assert d.payout.status is p.status
    assert d.payout.audit[-1].event == "reference_taken"
    assert d.payout.audit[-1].cause is Cause.RECOVERY
    assert isinstance(d.effects[0], ConflictDetected)


async def test_a_409_in_progress_waits_its_retry_after() -> None:
    class Busy(FakePartner):
        calls = 0

        async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
            self.calls += 1
            if self.calls < 3:
                return Uncertain("HTTP 409: in progress", retry_after=20.0)
            return Accepted(PartnerStatus.COMPLETED)

    partner = Busy(idempotency=KEYS)
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "busy"})
        p = await settled(client, "busy", within=1_000)
    assert p.status is S.COMPLETED
    assert partner.calls == 3
    sends = [a.at for a in p.audit if a.event in ("submit", "resend")]
    assert sends[1] - sends[0] >= 20.0
    assert sends[2] - sends[1] >= 20.0


async def test_a_resend_that_is_not_sent_leaves_the_attempt_unknown_never_unreachable() -> None:
    # The first POST may have landed (504); every re-send fails to connect. Before, each
    # failed re-send counted as "not sent" and after max_send_retries the payout was failed as
    # unreachable while the partner had completed it.
    class LandedThenUnreachable(FakePartner):
        sends = 0

        async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
            self.sends += 1
            return Uncertain("HTTP 504") if self.sends == 1 else NotSent("connection refused")

        async def check(self, payout_id: str, partner_ref: str | None = None) -> Any:
            return Found(PartnerStatus.COMPLETED)

    partner = LandedThenUnreachable(idempotency=KEYS)
    async with partner, running(MemoryStorage(), partner) as client:
        await client.submit({"id": "flaky-net"})
        p = await settled(client, "flaky-net", within=3_000)
    assert p.status is S.COMPLETED
    assert p.resolved_by is Cause.STATUS_CHECK
    assert partner.sends == 1 + POLICY.max_resends
    assert not any(a.event == "unreachable" for a in p.audit)


def test_a_stale_resend_is_not_sent_and_stays_unknown() -> None:
    policy = POLICY.replace(key_retention=86_400.0)
    p = Payout.new(PayoutRequest(id="x"), 0.0, next_check_at=0.0)
    p = replace(p, status=S.SUBMITTING, attempt=1, resends=1, key_first_sent_at=0.0,
                attempt_started_at=100.0)  # fmt: skip
    d = decide(p, SendExpired(1), 100.0 + policy.max_send_delay, policy)
    assert d.payout.status is S.UNKNOWN
    assert d.payout.send_failures == 0


def test_a_refused_resend_is_no_proof_the_attempt_stays_unknown() -> None:
    policy = POLICY.replace(key_retention=86_400.0)
    p = Payout.new(PayoutRequest(id="x"), 0.0, next_check_at=0.0)
    p = replace(p, status=S.SUBMITTING, attempt=1, resends=1, key_first_sent_at=0.0,
                attempt_started_at=40.0)  # fmt: skip
    d = decide(p, PartnerAnswered(1, Refused(422, "key reused with another payload")), 41, policy)
    assert d.payout.status is S.UNKNOWN
    # A first send that is refused is final, as before.
    first = replace(p, resends=0)
    assert decide(first, PartnerAnswered(1, Refused(422, "bad")), 41, policy).payout.status is (
        S.FAILED
    )
