"""The transition function, rule by rule (docs/concepts.md)."""

from __future__ import annotations

import dataclasses

import pytest

from resilient_payout import (
    Accepted,
    Cause,
    CheckFailed,
    CheckStatus,
    ConflictDetected,
    Found,
    NotFound,
    Notify,
    NotSent,
    OperatorResolved,
    PartnerAnswered,
    PartnerStatus,
    Payout,
    PayoutRequest,
    PayoutStatus,
    Policy,
    RateLimited,
    Refused,
    SendExpired,
    StatusChecked,
    SubmitNow,
    SubmitToPartner,
    Uncertain,
    WebhookReceived,
    WorkDue,
    decide,
    plan_next_check,
)

P = Policy()
S = PayoutStatus
T0 = 1_000_000.0


def new() -> Payout:
    return Payout.new(PayoutRequest(id="tx-1"), T0, next_check_at=T0 + P.claim_grace)


def submitting(at: float = T0) -> Payout:
    d = decide(new(), SubmitNow(), at, P)
    assert d.effects == (SubmitToPartner(1),)
    return d.payout


def unknown(at: float = T0) -> Payout:
    return decide(submitting(at), PartnerAnswered(1, Uncertain("504")), at + 30, P).payout


def final(status: PayoutStatus = S.COMPLETED) -> Payout:
    ps = PartnerStatus(status.value)
    return decide(submitting(), PartnerAnswered(1, Accepted(ps)), T0 + 2, P).payout


# -- submitting ---------------------------------------------------------------------------


def test_submit_moves_received_to_submitting_and_posts_once() -> None:
    p = submitting()
    assert p.status is S.SUBMITTING
    assert (p.attempt, p.posts, p.attempt_started_at) == (1, 1, T0)
    assert p.next_check_at == T0 + P.submit_deadline
    assert p.audit[-1].cause is Cause.APP_REQUEST
    assert p.audit[-1].to_status is S.SUBMITTING


def test_submit_again_while_submitting_is_a_no_op() -> None:
    p = submitting()
    d = decide(p, SubmitNow(), T0 + 1, P)
    assert d.payout is p
    assert d.effects == ()


@pytest.mark.parametrize("ps", [PartnerStatus.COMPLETED, PartnerStatus.DECLINED])
def test_final_answer_finalizes_and_notifies(ps: PartnerStatus) -> None:
    d = decide(submitting(), PartnerAnswered(1, Accepted(ps)), T0 + 3, P)
    assert d.payout.status is S(ps.value)
    assert d.effects == (Notify(S(ps.value)),)
    assert d.payout.next_check_at is None
    assert d.payout.resolved_by is Cause.PARTNER_ANSWER


def test_pending_answer_awaits_the_webhook_before_any_check() -> None:
    d = decide(submitting(), PartnerAnswered(1, Accepted(PartnerStatus.PENDING)), T0 + 3, P)
    assert d.payout.status is S.AWAITING
    assert d.payout.next_check_at == T0 + 3 + P.webhook_grace
    assert d.effects == ()


# -- rule 3: uncertain outcomes, refusals, 429 ---------------------------------------------


@pytest.mark.parametrize(
    "reason", ["HTTP 504", "read timeout", "connection reset", "HTTP 502", "garbage body"]
)
def test_uncertain_outcomes_lead_to_unknown_never_to_a_new_post(reason: str) -> None:
    d = decide(submitting(), PartnerAnswered(1, Uncertain(reason)), T0 + 30, P)
    assert d.payout.status is S.UNKNOWN
    assert d.effects == ()
    assert d.payout.audit[-1].detail == reason
    # Nothing can land before earliest_landing: no check is planned before it.
    assert d.payout.next_check_at == T0 + 30 + P.check_interval


@pytest.mark.parametrize("code", [400, 401, 403, 422])
def test_refusal_fails_with_the_reason(code: int) -> None:
    d = decide(submitting(), PartnerAnswered(1, Refused(code, "bad account")), T0 + 1, P)
    assert d.payout.status is S.FAILED
    assert d.effects == (Notify(S.FAILED),)
    assert d.payout.reason is not None
    assert str(code) in d.payout.reason
    assert "bad account" in d.payout.reason


def test_rate_limited_submit_is_retried_later_not_failed() -> None:
    d = decide(submitting(), PartnerAnswered(1, RateLimited(retry_after=7.0)), T0 + 1, P)
    assert d.payout.status is S.RECEIVED
    assert d.payout.send_failures == 1
    assert d.payout.next_check_at == T0 + 1 + 7.0
    assert d.effects == ()
    again = decide(d.payout, WorkDue(), T0 + 8, P)
    assert again.effects == (SubmitToPartner(1),)
    assert again.payout.posts == 2


def test_not_sent_backs_off_exponentially_then_fails() -> None:
    p = submitting()
    now = T0
    delays = []
    for _ in range(P.max_send_retries):
        d = decide(p, PartnerAnswered(1, NotSent("connection refused")), now, P)
        assert d.payout.status is S.RECEIVED
        assert d.payout.next_check_at is not None
        delays.append(d.payout.next_check_at - now)
        now = d.payout.next_check_at
        d = decide(d.payout, WorkDue(), now, P)
        assert d.effects == (SubmitToPartner(1),)
        p = d.payout
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    last = decide(p, PartnerAnswered(1, NotSent("connection refused")), now, P)
    assert last.payout.status is S.FAILED
    assert last.effects == (Notify(S.FAILED),)


def test_orphaned_submit_becomes_unknown_never_reposted() -> None:
    p = submitting()
    early = decide(p, WorkDue(), T0 + P.submit_deadline - 1, P)
    assert early.payout is p
    d = decide(p, WorkDue(), T0 + P.submit_deadline, P)
    assert d.payout.status is S.UNKNOWN
    assert d.effects == ()
    assert d.payout.audit[-1].cause is Cause.RECOVERY


def test_received_payout_found_due_is_submitted_by_recovery() -> None:
    d = decide(new(), WorkDue(), T0 + P.claim_grace, P)
    assert d.effects == (SubmitToPartner(1),)
    assert d.payout.audit[-1].cause is Cause.RECOVERY


# -- rule 2: resubmission only after confirmed absence ------------------------------------


def test_not_found_inside_the_window_keeps_checking() -> None:
    p = unknown()
    due = decide(p, WorkDue(), p.next_check_at or 0, P)
    assert due.effects == (CheckStatus(1),)
    d = decide(p, StatusChecked(1, NotFound()), T0 + 100, P)
    assert d.payout.status is S.UNKNOWN
    assert d.payout.checks == 1
    assert d.effects == ()
    assert d.payout.next_check_at == T0 + 100 + P.check_interval


def test_absence_confirmed_after_the_window_resubmits_then_fails() -> None:
    p = unknown()
    end = T0 + P.late_arrival_window
    d = decide(p, StatusChecked(1, NotFound()), end + 1, P)
    assert d.payout.status is S.SUBMITTING
    assert d.payout.attempt == 2
    assert d.effects == (SubmitToPartner(2),)
    assert d.payout.checks == 0
    p2 = decide(d.payout, PartnerAnswered(2, Uncertain("HTTP 504")), end + 31, P).payout
    d2 = decide(p2, StatusChecked(2, NotFound()), end + 1 + P.late_arrival_window, P)
    assert d2.payout.status is S.FAILED
    assert d2.effects == (Notify(S.FAILED),)
    assert d2.payout.posts == 2


def test_single_attempt_policy_fails_on_confirmed_absence() -> None:
    policy = P.replace(max_submit_attempts=1)
    p = decide(submitting(), PartnerAnswered(1, Uncertain("504")), T0 + 30, policy).payout
    d = decide(p, StatusChecked(1, NotFound()), T0 + policy.late_arrival_window, policy)
    assert d.payout.status is S.FAILED


def test_pending_record_moves_unknown_to_awaiting() -> None:
    d = decide(unknown(), StatusChecked(1, Found(PartnerStatus.PENDING)), T0 + 60, P)
    assert d.payout.status is S.AWAITING
    # The POST's own answer never came: checks go on soon, without the webhook's grace.
    assert d.payout.answered_at is None
    assert d.payout.next_check_at == T0 + 60 + P.check_interval


def test_awaiting_payout_that_vanishes_is_neither_failed_nor_resubmitted() -> None:
    # The partner acknowledged it (pending): a 404 now is no proof that it never happened.
    p = decide(submitting(), PartnerAnswered(1, Accepted(PartnerStatus.PENDING)), T0 + 1, P).payout
    d = decide(p, StatusChecked(1, NotFound()), T0 + P.late_arrival_window + 1, P)
    assert d.payout.status is S.AWAITING
    assert not any(isinstance(e, SubmitToPartner) for e in d.effects)


def test_check_failures_and_rate_limits_reschedule() -> None:
    p = unknown()
    d = decide(p, StatusChecked(1, CheckFailed("HTTP 500")), T0 + 60, P)
    assert (d.payout.status, d.payout.next_check_at) == (S.UNKNOWN, T0 + 60 + P.check_interval)
    d = decide(p, StatusChecked(1, RateLimited(retry_after=None)), T0 + 60, P)
    assert d.payout.next_check_at == T0 + 60 + P.block_pause


def test_events_of_a_stale_attempt_are_ignored() -> None:
    p = decide(unknown(), StatusChecked(1, NotFound()), T0 + 200, P).payout
    assert p.attempt == 2
    for ev in (
        StatusChecked(1, NotFound()),
        PartnerAnswered(1, Uncertain("504")),
        StatusChecked(1, Found(PartnerStatus.PENDING)),
    ):
        assert decide(p, ev, T0 + 201, P).payout is p


# -- rule 4: first final wins, repeats are no-ops -----------------------------------------


def test_webhook_before_the_answer_wins_and_the_answer_is_a_no_op() -> None:
    d = decide(submitting(), WebhookReceived(PartnerStatus.DECLINED), T0 + 1, P)
    assert d.payout.status is S.DECLINED
    assert d.payout.resolved_by is Cause.WEBHOOK
    later = decide(d.payout, PartnerAnswered(1, Accepted(PartnerStatus.DECLINED)), T0 + 2, P)
    assert later.payout is d.payout
    assert later.effects == ()


@pytest.mark.parametrize(
    "event",
    [
        WebhookReceived(PartnerStatus.COMPLETED),
        StatusChecked(1, Found(PartnerStatus.COMPLETED)),
        PartnerAnswered(1, Accepted(PartnerStatus.COMPLETED)),
    ],
)
def test_any_channel_finalizes_an_unknown_payout(event: object) -> None:
    d = decide(unknown(), event, T0 + 70, P)  # type: ignore[arg-type]
    assert d.payout.status is S.COMPLETED
    assert d.effects == (Notify(S.COMPLETED),)


def test_pending_webhook_does_not_change_a_submitting_payout() -> None:
    p = submitting()
    assert decide(p, WebhookReceived(PartnerStatus.PENDING), T0 + 1, P).payout is p


# -- rule 1: final states absorb ------------------------------------------------------------


def test_disagreeing_report_is_a_conflict_never_applied() -> None:
    p = final(S.COMPLETED)
    d = decide(p, WebhookReceived(PartnerStatus.DECLINED), T0 + 20, P)
    assert d.payout.status is S.COMPLETED
    assert d.payout.audit[-1].conflict
    assert d.payout.audit[-1].cause is Cause.WEBHOOK
    assert d.effects == (
        ConflictDetected(
            S.DECLINED, Cause.WEBHOOK, "webhook reported declined after final completed"
        ),
    )
    assert not any(isinstance(e, Notify) for e in d.effects)


def test_agreeing_repeat_after_final_writes_nothing() -> None:
    p = final(S.DECLINED)
    for ev in (
        WebhookReceived(PartnerStatus.DECLINED),
        StatusChecked(1, Found(PartnerStatus.DECLINED)),
        WorkDue(),
        SubmitNow(),
        StatusChecked(1, NotFound()),
    ):
        d = decide(p, ev, T0 + 50, P)
        assert d.payout is p
        assert d.effects == ()


def test_operator_resolution_is_audited_and_absorbing() -> None:
    d = decide(unknown(), OperatorResolved(S.DECLINED, "back office says declined"), T0 + 90, P)
    assert d.payout.status is S.DECLINED
    assert d.payout.resolved_by is Cause.OPERATOR
    assert d.payout.audit[-1].detail == "back office says declined"
    again = decide(d.payout, OperatorResolved(S.COMPLETED, "oops"), T0 + 91, P)
    assert again.payout.status is S.DECLINED
    assert isinstance(again.effects[0], ConflictDetected)


def test_operator_cannot_set_a_non_final_status() -> None:
    p = unknown()
    assert decide(p, OperatorResolved(S.AWAITING, "x"), T0 + 90, P).payout is p


# -- planning checks ---------------------------------------------------------------------


def test_plan_checks_unknown_only_while_it_can_land_then_confirms_absence() -> None:
    p = unknown()
    first = plan_next_check(p, T0 + 1, P)
    assert first == T0 + P.earliest_landing + P.check_interval
    assert plan_next_check(p, T0 + 60, P) == T0 + 60 + P.check_interval
    end = T0 + P.late_arrival_window
    # No routine check after the latest possible landing: next is the confirming check.
    assert plan_next_check(p, T0 + P.latest_landing - 1, P) == end + P.absence_check_delay
    assert plan_next_check(p, end + 10, P) == end + 10


def test_plan_for_awaiting_backs_off_to_the_cap() -> None:
    p = decide(submitting(), PartnerAnswered(1, Accepted(PartnerStatus.PENDING)), T0, P).payout
    late = dataclasses.replace(p, checks=50)
    now = T0 + 10_000
    assert plan_next_check(late, now, P) == now + P.max_check_interval


def test_policy_scaled_shrinks_durations_and_raises_rates() -> None:
    s = P.scaled(0.01)
    assert s.late_arrival_window == pytest.approx(1.5)
    assert s.check_rate == pytest.approx(200.0)
    assert s.max_submit_attempts == P.max_submit_attempts
    with pytest.raises(ValueError, match="submit_deadline"):
        Policy(submit_deadline=1.0)
    with pytest.raises(ValueError, match="factor"):
        P.scaled(0)


# -- hostile time (docs/concepts.md, "Timing assumptions") -----------------------------------


def _submitting(at: float = T0) -> Payout:
    p = Payout.new(PayoutRequest(id="t1"), at, next_check_at=at)
    return decide(p, SubmitNow(), at, P).payout


def test_an_attempt_older_than_the_send_limit_is_not_sent_but_decided_again() -> None:
    p = _submitting()
    limit = P.max_send_delay - P.connect_timeout
    assert decide(p, SendExpired(1), T0 + limit, P).payout is p  # still in time: no change
    late = decide(p, SendExpired(1), T0 + limit + 0.1, P)
    assert late.payout.status is S.RECEIVED
    assert late.payout.audit[-1].event == "send_expired"
    assert late.payout.send_failures == 1
    assert late.effects == ()
    assert decide(p, SendExpired(2), T0 + 100, P).payout is p  # another attempt's: ignored


def _unknown() -> Payout:
    p = _submitting()
    return decide(p, PartnerAnswered(1, Uncertain("HTTP 504")), T0 + 30, P).payout


def test_a_404_is_judged_by_when_its_get_was_sent() -> None:
    p = _unknown()
    end = T0 + P.late_arrival_window
    sent_before = decide(p, StatusChecked(1, NotFound(), sent_at=end - 1), end + 30, P)
    assert sent_before.payout.status is S.UNKNOWN
    assert sent_before.effects == ()
    sent_after = decide(p, StatusChecked(1, NotFound(), sent_at=end), end + 30, P)
    assert sent_after.payout.status is S.SUBMITTING  # absence confirmed: attempt 2
    assert sent_after.effects == (SubmitToPartner(2),)


def test_a_404_after_pending_is_flagged_once_and_never_fails_the_payout() -> None:
    p = decide(_submitting(), PartnerAnswered(1, Accepted(PartnerStatus.PENDING)), T0 + 5, P)
    awaiting = p.payout
    late = T0 + P.late_arrival_window + 100
    first = decide(awaiting, StatusChecked(1, NotFound(), sent_at=late), late, P)
    assert first.payout.status is S.AWAITING
    assert first.payout.audit[-1].event == "not_found_after_pending"
    assert first.payout.audit[-1].conflict
    assert [type(e) for e in first.effects] == [ConflictDetected]
    assert first.payout.next_check_at is not None
    second = decide(first.payout, StatusChecked(1, NotFound(), sent_at=late + 60), late + 60, P)
    assert second.payout.status is S.AWAITING
    assert len(second.payout.audit) == len(first.payout.audit)  # flagged once
    assert second.effects == ()


@pytest.mark.parametrize("retry_after", [31_536_000.0, float("inf"), float("nan")])
def test_retry_after_is_capped(retry_after: float) -> None:
    p = _submitting()
    d = decide(p, PartnerAnswered(1, RateLimited(retry_after)), T0 + 1, P)
    assert d.payout.status is S.RECEIVED
    assert d.payout.next_check_at is not None
    assert d.payout.next_check_at <= T0 + 1 + P.max_retry_after
    u = _unknown()
    c = decide(u, StatusChecked(1, RateLimited(retry_after)), T0 + 40, P)
    assert c.payout.next_check_at is not None
    assert c.payout.next_check_at <= T0 + 40 + P.max_retry_after
