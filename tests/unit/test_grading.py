"""The simulator's pure grading: what the app was told of each payout, judged against the
partner's truth, without a service, a partner or an event loop."""

from __future__ import annotations

from typing import Any

from resilient_payout.testing.simulator import SimulationReport, SimulatorConfig
from resilient_payout.testing.simulator._grading import Counters, Tx, grade

SETTLED_COMPLETED = {"status": "completed", "settled": True, "posts": 1}
STATS = {"blocks": 0, "checks_total": 4, "double_payments": []}


def told(tx_id: str, *finals: str) -> Tx:
    """A payout sent at 0 s, answered ``pending`` after 10 ms, then told ``finals`` by push."""
    return Tx(
        tx_id,
        sent_at=0.0,
        first_answer_at=0.01,
        first_answer_status="pending",
        final_at=2.0 if finals else None,
        final_via="push" if finals else None,
        finals=list(finals),
        pushes=list(finals),
        requests=1,
    )


def graded(
    truth: dict[str, Any] | None, *txs: Tx, stats: dict[str, Any] | None = STATS
) -> SimulationReport:
    return grade(
        SimulatorConfig(n=len(txs), max_listed=1),
        {tx.id: tx for tx in txs},
        truth,
        stats,
        seed=1,
        count=Counters(),
        errors=[],
        duration=3.0,
        settle_wait=0.5,
    )


def test_the_partners_outcome_is_correct() -> None:
    report = graded({"a": SETTLED_COMPLETED}, told("a", "completed"))

    assert (report.sent, report.correct) == (1, 1)
    assert report.non_correct == []
    assert report.first_answer_p50_ms == 10.0
    assert (report.final_p50_s, report.final_max_s) == (2.0, 2.0)
    assert report.finals_by_channel == {"push": 1}
    assert report.checks_per_payout == 4.0
    assert report.ok


def test_failed_is_correct_for_an_id_the_partner_never_got() -> None:
    report = graded({}, told("a", "failed"))

    assert report.correct == 1
    assert report.not_sent_to_partner == 1
    assert report.ok


def test_another_outcome_is_wrong() -> None:
    report = graded({"a": SETTLED_COMPLETED}, told("a", "failed"))

    assert (report.correct, report.wrong, report.wrong_ids) == (0, 1, ["a"])
    assert report.non_correct[0]["expected"] == "completed"
    assert report.non_correct[0]["reported"] == ["failed"]
    assert report.problems() == ["1 wrong outcome(s)"]


def test_a_final_while_the_partner_is_pending_is_wrong() -> None:
    report = graded({"a": {"status": "pending", "settled": True}}, told("a", "completed"))

    assert report.wrong_ids == ["a"]
    assert report.non_correct[0]["expected"] is None


def test_no_final_is_missing() -> None:
    report = graded({"a": SETTLED_COMPLETED}, told("a"))

    assert (report.missing, report.missing_ids) == (1, ["a"])
    assert report.final_p50_s is None
    assert report.problems() == ["1 missing outcome(s)"]


def test_two_finals_are_conflicting_even_if_one_is_right() -> None:
    report = graded({"a": SETTLED_COMPLETED}, told("a", "completed", "declined"))

    assert (report.conflicting, report.conflicting_ids) == (1, ["a"])
    assert report.non_correct[0]["reported"] == ["completed", "declined"]
    assert report.non_correct[0]["expected"] is None


def test_a_record_that_may_still_change_is_unsettled() -> None:
    entry = {"status": None, "settled": False}
    report = graded({"a": entry}, told("a", "failed"))

    assert (report.unsettled, report.unsettled_ids, report.wrong) == (1, ["a"], 0)
    assert report.non_correct[0]["partner"] == entry
    assert report.problems() == ["1 unsettled outcome(s)"]


def test_unreadable_partner_leaves_outcomes_unverified() -> None:
    report = graded(None, told("a", "completed"), stats=None)

    assert (report.unverified, report.unverified_ids) == (1, ["a"])
    assert report.problems() == ["1 unverified outcome(s)", "partner blocks unknown"]


def test_unsent_payouts_are_not_graded_and_lists_are_capped() -> None:
    truth = {"a": SETTLED_COMPLETED, "b": SETTLED_COMPLETED}
    report = graded(truth, told("a", "failed"), told("b", "failed"), Tx("c"))

    assert (report.sent, report.wrong, report.missing) == (2, 2, 0)
    assert report.wrong_ids == ["a"]
    assert [d["id"] for d in report.non_correct] == ["a"]


def test_double_payments_count_only_this_runs_ids() -> None:
    truth = {"a": {**SETTLED_COMPLETED, "posts": 2, "double_payment": True}}
    stats = {**STATS, "double_payments": ["a", "from-another-run"]}
    report = graded(truth, told("a", "completed"), stats=stats)

    assert report.correct == 1
    assert report.double_payments == ["a"]
    assert (report.partner_posts_total, report.partner_posts_max_per_id) == (2, 2)
    assert report.problems() == ["1 double payment(s)"]
