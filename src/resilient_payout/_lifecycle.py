"""The payout state machine: one pure function decides every transition.

``decide(payout, event, now, policy) -> Decision(payout, effects)`` does no I/O and reads no clock.
Every way news can arrive (the app, the partner's answer, a webhook, a status check, a timer, an
operator) is an *event*; the returned *effects* (POST to the partner, spend a status check, notify
the app, report a conflict) are carried out by the client only after storage accepted the new
record with a compare-and-set, so exactly one process acts on each decision.

States::

    received ──▶ submitting ──▶ completed | declined | failed
       ▲  │           │  └────▶ awaiting ──▶ completed | declined | failed
       └──┘(not sent) └───────▶ unknown ──▶ awaiting | completed | declined | failed
                                   └──(absence confirmed)──▶ submitting (attempt 2) | failed

Rules (docs/concepts.md explains each):

1. Final states absorb. A later report that disagrees is recorded as a conflict, never applied.
2. The POST is repeated only if it surely never reached the partner, or after a status check
   past the late-arrival window confirmed the partner has no record (``max_submit_attempts``).
3. 504, timeouts, resets, 5xx, garbage and crashes while submitting lead to ``unknown``;
   400/401/403/422 to ``failed``; 429 on submit means "not accepted, retry later".
4. A final status may come from the answer, a webhook or a check, in any order: the first wins.
5. Time is hostile: an attempt older than ``max_send_delay - connect_timeout`` is not sent but
   decided again (``SendExpired``); a 404 proves absence only if its GET was *sent* after the
   window closed; a 404 for a transfer the partner acknowledged (``pending``) proves nothing.
6. With a partner that honours idempotency keys (``Policy.key_retention > 0``) an uncertain or
   orphaned POST is re-sent with the *same* key (same attempt), at most ``max_resends`` times
   and only well inside the key's retention; then rule 2 applies, its window counted from the
   last send. A new key (a new attempt) still needs confirmed absence.
7. The partner's reference is taken from the first answer, check or webhook that names one; a
   different one later is a conflict, recorded and never applied.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from ._model import (
    Accepted,
    AuditEntry,
    Cause,
    CheckFailed,
    CheckOutcome,
    Found,
    NotFound,
    NotSent,
    PartnerStatus,
    Payout,
    PayoutStatus,
    RateLimited,
    Refused,
    SubmitOutcome,
    Uncertain,
)
from ._policy import Policy

__all__ = [
    "CheckStatus",
    "ConflictDetected",
    "Decision",
    "Effect",
    "Event",
    "Notify",
    "OperatorResolved",
    "OwnerGone",
    "PartnerAnswered",
    "ReferenceRefused",
    "SendExpired",
    "StatusChecked",
    "SubmitNow",
    "SubmitToPartner",
    "WebhookReceived",
    "WorkDue",
    "decide",
    "may_resend",
    "plan_next_check",
    "send_expired",
    "window_end",
]

S = PayoutStatus


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitNow:
    """The app asked for the transfer (or a process resumes a received payout)."""

    cause: Cause = Cause.APP_REQUEST


@dataclass(frozen=True, slots=True)
class WorkDue:
    """The payout's ``next_check_at`` has come: submit, recover or check, by status."""


@dataclass(frozen=True, slots=True)
class PartnerAnswered:
    """The partner POST of ``attempt`` ended with ``outcome``."""

    attempt: int
    outcome: SubmitOutcome


@dataclass(frozen=True, slots=True)
class SendExpired:
    """The POST of ``attempt`` was about to leave too long after it was decided: not sent."""

    attempt: int


@dataclass(frozen=True, slots=True)
class WebhookReceived:
    """The partner's webhook reported ``status`` (and its own reference, when it sent one)."""

    status: PartnerStatus
    partner_ref: str | None = None


@dataclass(frozen=True, slots=True)
class StatusChecked:
    """A status check made for ``attempt`` ended with ``outcome``.

    ``sent_at`` is when the GET left (before any wait for its answer); a 404 is judged by it,
    because a record that landed after the GET was answered cannot be in the answer.
    """

    attempt: int
    outcome: CheckOutcome
    sent_at: float | None = None


@dataclass(frozen=True, slots=True)
class OperatorResolved:
    """A human settled the payout (e.g. after reading the partner's back office); the audit
    entry gives the ``note`` and names the ``operator``."""

    status: PayoutStatus
    note: str
    operator: str | None = None


@dataclass(frozen=True, slots=True)
class OwnerGone:
    """Instance ``owner``, which held the payout's open work, stopped: it restarted under the
    same name, it stopped beating, or it is leaving and hands its leftovers over."""

    owner: str


@dataclass(frozen=True, slots=True)
class ReferenceRefused:
    """Storage refused to give this payout ``partner_ref``: payout ``holder_id`` holds it."""

    partner_ref: str
    holder_id: str | None


Event = (
    SubmitNow
    | WorkDue
    | PartnerAnswered
    | SendExpired
    | WebhookReceived
    | StatusChecked
    | OperatorResolved
    | OwnerGone
    | ReferenceRefused
)
"""Every input ``decide`` accepts: one of the event classes above."""


# --- effects ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitToPartner:
    """POST the payout to the partner as ``attempt`` (1 = first; a later one only after a
    confirmed absence)."""

    attempt: int


@dataclass(frozen=True, slots=True)
class CheckStatus:
    """Queue a status check of ``attempt`` with the check scheduler (rationed by the budget)."""

    attempt: int


@dataclass(frozen=True, slots=True)
class Notify:
    """Tell the app the final outcome; the client writes it to the outbox atomically."""

    status: PayoutStatus


@dataclass(frozen=True, slots=True)
class ConflictDetected:
    """A report disagreed with a final status; logged at ERROR and passed to a hook."""

    reported: PayoutStatus
    cause: Cause
    detail: str


Effect = SubmitToPartner | CheckStatus | Notify | ConflictDetected
"""What ``decide`` asks the client to do: one of the effect classes above."""


class Decision(NamedTuple):
    """What `decide` returns: the payout to store and the effects to run, in order."""

    payout: Payout
    """The new record, or the very same object when nothing changes (nothing to write)."""
    effects: tuple[Effect, ...] = ()


# --- the function -------------------------------------------------------------------------


def decide(
    p: Payout, event: Event, now: float, policy: Policy, actor: str | None = None
) -> Decision:
    """The next state of ``p`` after ``event`` at time ``now``, and what to do about it.

    ``actor`` names the client instance that will carry out the effects: a POST it is asked to
    make records it as the payout's :attr:`~resilient_payout.Payout.owner`.
    """
    if isinstance(event, ReferenceRefused):
        detail = f"partner reference {event.partner_ref!r} is held by payout {event.holder_id!r}"
        return _conflict(p, now, p.status, Cause.RECOVERY, "reference_taken", detail)
    decision = _after_final(p, event, now) if p.status.is_final else _decide(p, event, now, policy)
    decision = _owned(p, decision, actor)
    ref = _named_ref(p, event)
    if ref is None or ref == decision.payout.partner_ref:
        return decision
    return _take_ref(decision, ref, now)


def _owned(p: Payout, decision: Decision, actor: str | None) -> Decision:
    """Open work belongs to whoever does it: a POST to the actor; nothing once it is done."""
    new = decision.payout
    if new is p:
        return decision
    if any(isinstance(e, SubmitToPartner) for e in decision.effects):
        owner = actor
    elif new.status is S.SUBMITTING or (new.status is S.RECEIVED and p.status is S.RECEIVED):
        owner = new.owner
    else:
        owner = None
    if owner == new.owner:
        return decision
    return Decision(replace(new, owner=owner), decision.effects)


def _decide(p: Payout, event: Event, now: float, policy: Policy) -> Decision:
    match event:
        case SubmitNow(cause=cause):
            if p.status is S.RECEIVED:
                return _post(p, now, policy, cause, "submit")
            return Decision(p)
        case WorkDue():
            return _on_due(p, now, policy)
        case OwnerGone(owner=owner):
            return _on_owner_gone(p, owner, now, policy)
        case PartnerAnswered(attempt=attempt, outcome=outcome):
            if attempt != p.attempt:
                return Decision(p)
            return _on_answer(p, outcome, now, policy)
        case SendExpired(attempt=attempt):
            if (
                attempt != p.attempt
                or p.status is not S.SUBMITTING
                or not send_expired(p, now, policy)
            ):
                return Decision(p)
            assert p.attempt_started_at is not None  # send_expired() is False without it
            age = now - p.attempt_started_at
            reason = f"attempt {attempt} not sent: {age:.1f}s after it was decided"
            return _not_sent(
                p, now, policy, reason, None, cause=Cause.RECOVERY, event="send_expired"
            )
        case WebhookReceived(status=status):
            return _on_partner_status(p, status, now, policy, Cause.WEBHOOK, "webhook")
        case StatusChecked(attempt=attempt, outcome=outcome, sent_at=sent_at):
            if attempt != p.attempt:
                return Decision(p)
            return _on_check(p, outcome, now, policy, now if sent_at is None else sent_at)
        case OperatorResolved(status=status, note=note, operator=operator):
            if not status.is_final:
                return Decision(p)
            reason = note if operator is None else f"{note} (by {operator})"
            return _finalize(p, status, now, Cause.OPERATOR, "operator", reason=reason)
    raise TypeError(f"not an event: {event!r}")  # pragma: no cover - exhaustive match


def _named_ref(p: Payout, event: Event) -> str | None:
    """The partner's reference this event names for the current attempt, if any."""
    match event:
        case PartnerAnswered(attempt=attempt, outcome=Accepted(partner_ref=ref)):
            return ref if attempt == p.attempt else None
        case StatusChecked(attempt=attempt, outcome=Found(partner_ref=ref)):
            return ref if attempt == p.attempt else None
        case WebhookReceived(partner_ref=ref):
            return ref
    return None


def _take_ref(decision: Decision, ref: str, now: float) -> Decision:
    """Keep the first reference the partner names; a different one is a conflict (rule 7)."""
    new = decision.payout
    if new.partner_ref is None:
        return Decision(replace(new, partner_ref=ref, updated_at=now), decision.effects)
    detail = f"partner named reference {ref!r}, we hold {new.partner_ref!r}"
    flagged = _conflict(new, now, new.status, Cause.PARTNER_ANSWER, "reference_conflict", detail)
    return Decision(flagged.payout, decision.effects + flagged.effects)


def may_resend(p: Payout, now: float, policy: Policy) -> bool:
    """Whether an ``unknown`` attempt may be POSTed again now with its idempotency key (rule 6).

    Only while the partner surely still holds the key: the re-send must reach it (within
    ``max_send_delay``, judged by a clock up to ``max_clock_skew`` off) before ``key_retention``
    after the key's first use ends.
    """
    if policy.key_retention <= 0 or p.status is not S.UNKNOWN or p.key_first_sent_at is None:
        return False
    if p.resends >= policy.max_resends:
        return False
    latest_arrival = now + policy.max_send_delay + policy.max_clock_skew
    return latest_arrival < p.key_first_sent_at + policy.key_retention


def _resend_at(p: Payout, now: float, policy: Policy, retry_after: float | None) -> float:
    backoff = min(policy.resend_backoff_initial * 2.0**p.resends, policy.resend_backoff_max)
    return now + max(backoff, policy.retry_delay(retry_after, 0.0))


def _uncertain(
    moved: Payout, now: float, policy: Policy, retry_after: float | None = None
) -> Payout:
    """Schedule an ``unknown`` attempt: a re-send with its key if allowed, else checks."""
    if may_resend(moved, now, policy):
        return replace(moved, next_check_at=_resend_at(moved, now, policy, retry_after))
    return replace(moved, next_check_at=plan_next_check(moved, now, policy))


def window_end(p: Payout, policy: Policy) -> float | None:
    """When the current attempt's late-arrival window closes (None before any attempt)."""
    if p.attempt_started_at is None:
        return None
    return p.attempt_started_at + policy.late_arrival_window


def send_expired(p: Payout, now: float, policy: Policy) -> bool:
    """Whether the current attempt is too old to be sent now.

    The late-arrival window counts from the decision (``attempt_started_at``) and leaves room for
    ``max_send_delay`` until the request reaches the partner; the client checks this right
    before the POST, so only the connection setup (at most ``connect_timeout``) remains.
    """
    if p.attempt_started_at is None:
        return False
    return now - p.attempt_started_at > policy.max_send_delay - policy.connect_timeout


def plan_next_check(p: Payout, now: float, policy: Policy) -> float:
    """When an open (``unknown``/``awaiting``) payout is next *eligible* for a status check.

    ``unknown``: nothing lands before ``earliest_landing`` or after ``latest_landing``, so routine
    checks run between the two, at least ``check_interval`` apart, and one more just after the
    late-arrival window confirms absence. ``awaiting``: the webhook gets ``webhook_grace`` after
    the POST's answer first (no grace when only a check saw it pending: the answer is still to
    come), then checks back off from ``check_interval`` to ``max_check_interval``. Eligible is not
    sent: the client's scheduler spends the budget on eligible payouts most-overdue first, so
    under load the spacing stretches evenly (docs/reconciliation.md).
    """
    start = p.attempt_started_at if p.attempt_started_at is not None else now
    end = start + policy.late_arrival_window
    confirm = end + policy.absence_check_delay
    if p.status is S.UNKNOWN:
        if now >= end:
            return max(now, confirm)
        at = max(now, start + policy.earliest_landing) + policy.check_interval
        return at if at <= start + policy.latest_landing else confirm
    if p.answered_at is not None and now < p.answered_at + policy.webhook_grace:
        return p.answered_at + policy.webhook_grace
    backoff = policy.check_interval * 2.0 ** min(max(0, p.checks - 3), 32)
    at = now + min(backoff, policy.max_check_interval)
    # The confirming check right after the window must not be skipped by a long backoff.
    return min(at, confirm) if now < end else at


# --- helpers ------------------------------------------------------------------------------


def _move(
    p: Payout,
    status: PayoutStatus,
    now: float,
    cause: Cause,
    event: str,
    detail: str | None = None,
    **changes: object,
) -> Payout:
    entry = AuditEntry(now, cause, event, p.status, status, detail)
    return replace(
        p,
        status=status,
        updated_at=now,
        audit=(*p.audit, entry),
        **changes,  # type: ignore[arg-type]
    )


def _touch(p: Payout, now: float, **changes: object) -> Payout:
    """A write that changes bookkeeping (schedule, counters) but not the status: no audit line."""
    return replace(p, updated_at=now, **changes)  # type: ignore[arg-type]


def _post(p: Payout, now: float, policy: Policy, cause: Cause, event: str) -> Decision:
    attempt = max(p.attempt, 1)
    new = _move(
        p,
        S.SUBMITTING,
        now,
        cause,
        event,
        f"attempt {attempt}",
        attempt=attempt,
        posts=p.posts + 1,
        attempt_started_at=now,
        key_first_sent_at=now if p.key_first_sent_at is None else p.key_first_sent_at,
        answered_at=None,
        next_check_at=now + policy.submit_deadline,
    )
    return Decision(new, (SubmitToPartner(attempt),))


def _resend(p: Payout, now: float, policy: Policy) -> Decision:
    """POST the same attempt again with the same idempotency key (rule 6)."""
    new = _move(
        p,
        S.SUBMITTING,
        now,
        Cause.RECOVERY,
        "resend",
        f"attempt {p.attempt}, send {p.resends + 2}, same idempotency key",
        resends=p.resends + 1,
        posts=p.posts + 1,
        attempt_started_at=now,
        next_check_at=now + policy.submit_deadline,
    )
    return Decision(new, (SubmitToPartner(p.attempt),))


def _finalize(
    p: Payout,
    status: PayoutStatus,
    now: float,
    cause: Cause,
    event: str,
    *,
    partner_status: PartnerStatus | None = None,
    reason: str | None = None,
) -> Decision:
    new = _move(
        p,
        status,
        now,
        cause,
        event,
        reason,
        next_check_at=None,
        resolved_by=cause,
        reason=reason,
        partner_status=partner_status or p.partner_status,
    )
    return Decision(new, (Notify(status),))


def _after_final(p: Payout, event: Event, now: float) -> Decision:
    reported: PayoutStatus | None = None
    cause = Cause.RECOVERY
    match event:
        case PartnerAnswered(outcome=Accepted(status=ps)):
            reported, cause = ps.payout_status, Cause.PARTNER_ANSWER
        case WebhookReceived(status=ps):
            reported, cause = ps.payout_status, Cause.WEBHOOK
        case StatusChecked(outcome=Found(status=ps)):
            reported, cause = ps.payout_status, Cause.STATUS_CHECK
        case OperatorResolved(status=st):
            reported, cause = (st if st.is_final else None), Cause.OPERATOR
    if reported is None or reported is p.status:
        return Decision(p)  # a repeat, or no news: nothing to write
    detail = f"{cause.value} reported {reported.value} after final {p.status.value}"
    return _conflict(p, now, reported, cause, "conflict", detail)


def _conflict(
    p: Payout, now: float, reported: PayoutStatus, cause: Cause, event: str, detail: str
) -> Decision:
    """Record a report that contradicts what we hold (never applied) and raise it for a human."""
    entry = AuditEntry(now, cause, event, p.status, p.status, detail, conflict=True)
    new = replace(p, updated_at=now, audit=(*p.audit, entry))
    return Decision(new, (ConflictDetected(reported, cause, detail),))


def _on_owner_gone(p: Payout, owner: str, now: float, policy: Policy) -> Decision:
    """The instance holding this payout's open work stopped: recover it now, not by a timer."""
    if p.owner != owner:
        return Decision(p)  # someone else's, or already recovered
    if p.status is S.RECEIVED:
        # Never POSTed by its creator: anyone may POST it, at once.
        detail = f"instance {owner} stopped before sending; handed over"
        moved = _move(p, S.RECEIVED, now, Cause.RECOVERY, "owner_gone", detail, next_check_at=now)
        return Decision(replace(moved, owner=None))
    if p.status is not S.SUBMITTING:
        return Decision(p)
    # The POST may have landed: an uncertain outcome, checked at once (a final status settles
    # it, pending makes it awaiting, a 404 proves nothing before the window ends).
    detail = f"instance {owner} stopped before the partner answered"
    moved = _move(p, S.UNKNOWN, now, Cause.RECOVERY, "owner_gone", detail)
    if may_resend(moved, now, policy):
        return _resend(moved, now, policy)  # the same key: the partner dedupes it
    return Decision(replace(moved, next_check_at=now))


def _on_due(p: Payout, now: float, policy: Policy) -> Decision:
    if p.next_check_at is None or now < p.next_check_at:
        return Decision(p)
    if p.status is S.RECEIVED:
        return _post(p, now, policy, Cause.RECOVERY, "submit")
    if p.status is S.SUBMITTING:
        # Our POST has had more than its timeouts: its process died. The POST may have landed,
        # so this is an uncertain outcome, never a reason to POST again.
        moved = _move(
            p, S.UNKNOWN, now, Cause.RECOVERY, "submit_orphaned", "no answer within submit_deadline"
        )
        if may_resend(moved, now, policy):
            return _resend(moved, now, policy)  # the same key: the partner dedupes it
        return Decision(replace(moved, next_check_at=now))  # checked at once
    if may_resend(p, now, policy):
        return _resend(p, now, policy)
    return Decision(p, (CheckStatus(p.attempt),))


def _on_partner_status(
    p: Payout, ps: PartnerStatus, now: float, policy: Policy, cause: Cause, event: str
) -> Decision:
    final = ps.payout_status
    if final is not None:
        return _finalize(p, final, now, cause, event, partner_status=ps)
    if p.status is S.UNKNOWN:
        return _to_awaiting(p, now, policy, cause, event)
    return Decision(p)


def _to_awaiting(
    p: Payout, now: float, policy: Policy, cause: Cause, event: str, *, answered: bool = True
) -> Decision:
    """``answered=False``: a status check found the transfer pending, but the POST's own answer
    never reached us (its caller died, or it timed out): it comes within seconds, so checks
    start at once instead of after the webhook's grace."""
    moved = _move(
        p,
        S.AWAITING,
        now,
        cause,
        event,
        "partner has it (pending)",
        answered_at=now if answered else None,
        partner_status=PartnerStatus.PENDING,
    )
    return Decision(replace(moved, next_check_at=plan_next_check(moved, now, policy)))


def _on_answer(p: Payout, outcome: SubmitOutcome, now: float, policy: Policy) -> Decision:
    cause = Cause.PARTNER_ANSWER
    if isinstance(outcome, Accepted):
        if outcome.status is PartnerStatus.PENDING and p.status is S.SUBMITTING:
            return _to_awaiting(p, now, policy, cause, "answer")
        return _on_partner_status(p, outcome.status, now, policy, cause, "answer")
    if p.status is not S.SUBMITTING:
        # A late non-final answer to an attempt we already treat as uncertain adds nothing
        # that the status checks will not tell more safely.
        if isinstance(outcome, Refused) and p.status is S.UNKNOWN:
            return _finalize(p, S.FAILED, now, cause, "refused", reason=_refusal(outcome))
        return Decision(p)
    match outcome:
        case Refused() if p.resends > 0:
            # A partner holding the key answers with the first request's result; a refusal of
            # a re-send (a key it forgot, a payload it sees as different) proves nothing about
            # an earlier send that may have landed.
            moved = _move(p, S.UNKNOWN, now, cause, "uncertain", _refusal(outcome))
            return Decision(_uncertain(moved, now, policy))
        case Refused():
            return _finalize(p, S.FAILED, now, cause, "refused", reason=_refusal(outcome))
        case NotSent(reason=reason):
            return _not_sent(p, now, policy, reason, None)
        case RateLimited(retry_after=retry_after):
            return _not_sent(p, now, policy, "partner answered 429", retry_after)
        case Uncertain(reason=reason, retry_after=retry_after):
            moved = _move(p, S.UNKNOWN, now, cause, "uncertain", reason)
            return Decision(_uncertain(moved, now, policy, retry_after))
    raise TypeError(f"not a submit outcome: {outcome!r}")  # pragma: no cover


def _refusal(outcome: Refused) -> str:
    if outcome.http_status == 0:  # the adapter refused to build it: never sent
        return f"request refused before sending: {outcome.reason}"
    return f"partner refused the request (HTTP {outcome.http_status}): {outcome.reason}"


def _not_sent(
    p: Payout,
    now: float,
    policy: Policy,
    reason: str,
    retry_after: float | None,
    *,
    cause: Cause = Cause.PARTNER_ANSWER,
    event: str = "not_sent",
) -> Decision:
    if p.resends > 0:
        # This re-send never left, but an earlier send of the attempt may have landed: the
        # attempt stays unknown (re-sent again with its key, or checked), never "received",
        # whose retries can end in "unreachable".
        moved = _move(p, S.UNKNOWN, now, cause, event, reason)
        return Decision(_uncertain(moved, now, policy, retry_after))
    failures = p.send_failures + 1
    if failures > policy.max_send_retries:
        return _finalize(
            p,
            S.FAILED,
            now,
            cause,
            "unreachable",
            reason=f"partner not reached after {failures} tries: {reason}",
        )
    backoff = min(policy.send_backoff_initial * 2 ** (failures - 1), policy.send_backoff_max)
    delay = max(backoff, policy.retry_delay(retry_after, 0.0))
    moved = _move(
        p,
        S.RECEIVED,
        now,
        cause,
        event,
        reason,
        send_failures=failures,
        next_check_at=now + delay,
    )
    return Decision(moved)


def _on_check(
    p: Payout, outcome: CheckOutcome, now: float, policy: Policy, sent_at: float
) -> Decision:
    cause = Cause.STATUS_CHECK
    if p.status not in (S.UNKNOWN, S.AWAITING):
        # Checks are never scheduled for received/submitting payouts; only a final status
        # from a check that raced with a resubmission is still news worth taking.
        if isinstance(outcome, Found) and outcome.status.payout_status is not None:
            return _on_partner_status(p, outcome.status, now, policy, cause, "check")
        return Decision(p)
    counted = _touch(p, now, checks=p.checks + 1)
    match outcome:
        case Found(status=ps):
            if ps.payout_status is not None:
                return _on_partner_status(counted, ps, now, policy, cause, "check")
            if p.status is S.UNKNOWN:
                return _to_awaiting(counted, now, policy, cause, "check", answered=False)
            return Decision(replace(counted, next_check_at=plan_next_check(counted, now, policy)))
        case NotFound():
            if p.status is S.AWAITING:
                return _not_found_after_pending(counted, now, policy)
            end = window_end(p, policy)
            if end is not None and sent_at >= end:
                return _absent(counted, now, policy)
            return Decision(replace(counted, next_check_at=plan_next_check(counted, now, policy)))
        case RateLimited(retry_after=retry_after):
            wait = policy.retry_delay(retry_after, policy.block_pause)
            return Decision(replace(counted, next_check_at=now + wait))
        case CheckFailed():
            return Decision(replace(counted, next_check_at=now + policy.check_interval))
    raise TypeError(f"not a check outcome: {outcome!r}")  # pragma: no cover


_NOT_FOUND_AFTER_PENDING = "not_found_after_pending"


def _not_found_after_pending(p: Payout, now: float, policy: Policy) -> Decision:
    """The partner acknowledged this attempt (``pending``) and now answers 404.

    That is no proof of absence (a lagging replica, a gateway's 404, a misrouted GET): the
    payout stays ``awaiting`` and checks go on. The first such answer is flagged for an
    operator (a conflict line in the audit trail and a ``ConflictDetected`` effect).
    """
    scheduled = replace(p, next_check_at=plan_next_check(p, now, policy))
    if any(a.event == _NOT_FOUND_AFTER_PENDING for a in p.audit):
        return Decision(scheduled)
    detail = "partner answered 404 for a transfer it had acknowledged as pending"
    return _conflict(scheduled, now, S.FAILED, Cause.STATUS_CHECK, _NOT_FOUND_AFTER_PENDING, detail)


def _absent(p: Payout, now: float, policy: Policy) -> Decision:
    """A check after the late-arrival window found no record: the attempt can no longer land."""
    if p.status is S.UNKNOWN and p.attempt < policy.max_submit_attempts:
        nxt = p.attempt + 1
        new = _move(
            p,
            S.SUBMITTING,
            now,
            Cause.STATUS_CHECK,
            "resubmit",
            f"absence of attempt {p.attempt} confirmed; attempt {nxt}",
            attempt=nxt,
            posts=p.posts + 1,
            send_failures=0,
            checks=0,
            resends=0,
            attempt_started_at=now,
            key_first_sent_at=now,
            answered_at=None,
            next_check_at=now + policy.submit_deadline,
        )
        return Decision(new, (SubmitToPartner(nxt),))
    return _finalize(
        p,
        S.FAILED,
        now,
        Cause.STATUS_CHECK,
        "absent",
        reason=f"no record at the partner after the late-arrival window (attempt {p.attempt})",
    )
