"""Pure grading (internal API): what the app was told of each payout + partner truth -> report.

No I/O: the driver records into :class:`Tx` and :class:`Counters`, :func:`grade` judges them, so
every verdict can be unit-tested without a service, a partner or an event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .._stats import percentile
from .config import SimulatorConfig
from .report import SimulationReport, Verdict

__all__ = ["Channel", "Counters", "Tx", "expected_outcome", "grade", "is_settled", "judge"]

Channel = Literal["answer", "push", "get"]


@dataclass
class Tx:
    """One payout of the run: how the app sends it and what it was told."""

    id: str
    concurrent: bool = False
    late_delay: float | None = None
    sent_at: float | None = None
    first_answer_at: float | None = None
    first_answer_status: str | None = None
    final_at: float | None = None
    final_via: Channel | None = None
    finals: list[str] = field(default_factory=list)
    """Every distinct final status, in the order first told."""
    pushes: list[str] = field(default_factory=list)
    pushed_at: float | None = None
    """When the first push for it arrived (loop clock)."""
    gets: int = 0
    get_404s: int = 0
    requests: int = 0


@dataclass
class Counters:
    """Run-wide tallies of the driver, copied into the report."""

    requests: int = 0
    repeats_concurrent: int = 0
    repeats_late: int = 0
    post_retries: int = 0
    post_errors: int = 0
    bad_answers: int = 0
    pushes_received: int = 0
    repeat_pushes: int = 0
    pushes_unknown: int = 0
    pushes_rejected: int = 0
    push_shapes: dict[str, int] = field(default_factory=dict)
    get_fallbacks: int = 0
    get_requests: int = 0
    get_errors: int = 0


def is_settled(entry: object) -> bool:
    """Whether a partner truth entry can no longer change.

    No entry (the partner never got a POST) is settled; an entry without a boolean ``settled``
    comes from a partner that does not tell, and is taken as final.
    """
    return not (isinstance(entry, dict) and entry.get("settled") is False)


def expected_outcome(entry: object) -> str | None:
    """The outcome the app should have got, from one settled partner truth entry; None = none yet.

    An id the partner never heard of moved no money, so ``failed`` is right for it, as it is for
    a settled entry with nothing recorded.
    """
    if entry is None:
        return "failed"
    if not isinstance(entry, dict):
        return None
    status = entry.get("status")
    if status is None:
        return "failed"
    if status in ("completed", "declined"):
        return str(status)
    return None


def judge(tx: Tx, truth: Mapping[str, Any] | None) -> tuple[Verdict, str | None]:
    """The verdict on one payout and the outcome expected (None when none can be)."""
    if len(tx.finals) > 1:
        return "conflicting", None
    if not tx.finals:
        return "missing", None
    if truth is None:
        return "unverified", None
    entry = truth.get(tx.id)
    if not is_settled(entry):
        return "unsettled", None
    expected = expected_outcome(entry)
    return ("correct" if tx.finals[0] == expected else "wrong"), expected


def grade(
    config: SimulatorConfig,
    txs: Mapping[str, Tx],
    truth: Mapping[str, Any] | None,
    stats: Mapping[str, Any] | None,
    *,
    seed: int,
    count: Counters,
    errors: list[str],
    duration: float,
    settle_wait: float | None,
) -> SimulationReport:
    """Grade every sent payout of ``txs`` against ``truth`` and add the partner's ``stats``.

    ``truth`` and ``stats`` are None when the partner could not be read (``errors`` says why).
    """
    report = _tallied(config, seed, count, errors, duration, settle_wait)
    latencies: list[float] = []
    finals: list[float] = []
    by_channel: dict[str, int] = {}
    for tx in txs.values():
        if tx.sent_at is None:
            continue
        report.sent += 1
        if tx.first_answer_at is not None:
            latencies.append((tx.first_answer_at - tx.sent_at) * 1000.0)
        if tx.final_at is not None and tx.final_via is not None:
            finals.append(tx.final_at - tx.sent_at)
            by_channel[tx.final_via] = by_channel.get(tx.final_via, 0) + 1
        _add_verdict(report, tx, truth, config.max_listed)
    report.first_answer_p50_ms = percentile(latencies, 0.50, default=None)
    report.first_answer_p99_ms = percentile(latencies, 0.99, default=None)
    report.final_p50_s = percentile(finals, 0.50, default=None)
    report.final_p90_s = percentile(finals, 0.90, default=None)
    report.final_max_s = max(finals, default=None)
    report.finals_by_channel = dict(sorted(by_channel.items()))
    _add_partner(report, txs, truth, stats)
    return report


def _tallied(
    config: SimulatorConfig,
    seed: int,
    count: Counters,
    errors: list[str],
    duration: float,
    settle_wait: float | None,
) -> SimulationReport:
    return SimulationReport(
        n=config.n,
        seed=seed,
        time_scale=config.time_scale,
        duration_s=duration,
        settle_wait_s=settle_wait,
        requests_sent=count.requests,
        repeats_concurrent=count.repeats_concurrent,
        repeats_late=count.repeats_late,
        repeats_sent=count.repeats_concurrent + count.repeats_late,
        post_retries=count.post_retries,
        post_errors=count.post_errors,
        bad_answers=count.bad_answers,
        pushes_received=count.pushes_received,
        repeat_pushes=count.repeat_pushes,
        pushes_unknown=count.pushes_unknown,
        pushes_rejected=count.pushes_rejected,
        push_shapes=dict(sorted(count.push_shapes.items())),
        get_fallbacks=count.get_fallbacks,
        get_requests=count.get_requests,
        get_errors=count.get_errors,
        partner_errors=errors,
    )


def _add_verdict(
    report: SimulationReport, tx: Tx, truth: Mapping[str, Any] | None, max_listed: int
) -> None:
    verdict, expected = judge(tx, truth)
    if verdict == "correct":
        report.correct += 1
        return
    setattr(report, verdict, getattr(report, verdict) + 1)
    listed: list[str] = getattr(report, f"{verdict}_ids")
    if len(listed) < max_listed:
        listed.append(tx.id)
    if len(report.non_correct) < max_listed:
        report.non_correct.append(_details(tx, verdict, expected, truth))


def _details(
    tx: Tx, verdict: Verdict, expected: str | None, truth: Mapping[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": tx.id,
        "verdict": verdict,
        "expected": expected,
        "reported": list(tx.finals),
        "first_answer": tx.first_answer_status,
        "final_via": tx.final_via,
        "pushes": list(tx.pushes),
        "gets": tx.gets,
        "get_404s": tx.get_404s,
        "requests": tx.requests,
        "partner": truth.get(tx.id) if truth is not None else None,
    }


def _add_partner(
    report: SimulationReport,
    txs: Mapping[str, Tx],
    truth: Mapping[str, Any] | None,
    stats: Mapping[str, Any] | None,
) -> None:
    ours = txs.keys()
    doubles: set[str] = set()
    if truth is not None:
        entries = [truth.get(tx_id) for tx_id in ours]
        posts = [_int_or_none(e.get("posts")) or 0 for e in entries if isinstance(e, dict)]
        report.not_sent_to_partner = sum(1 for e in entries if not isinstance(e, dict))
        report.partner_posts_total = sum(posts)
        report.partner_posts_max_per_id = max(posts, default=0)
        doubles.update(
            tx_id
            for tx_id, e in zip(ours, entries, strict=True)
            if isinstance(e, dict) and e.get("double_payment") is True
        )
    if stats is not None:
        listed = stats.get("double_payments")
        if isinstance(listed, list):
            doubles.update(tx_id for tx_id in listed if tx_id in txs)
        if report.partner_posts_max_per_id is None:
            report.partner_posts_max_per_id = _int_or_none(stats.get("posts_max_per_id"))
        report.checks_total = _int_or_none(stats.get("checks_total"))
        if report.checks_total is not None and report.sent:
            report.checks_per_payout = report.checks_total / report.sent
        report.checks_peak_per_second = _number_or_none(stats.get("checks_peak_per_second"))
        report.blocks = _int_or_none(stats.get("blocks"))
        report.rate_limited_checks = _int_or_none(stats.get("rate_limited_checks"))
        report.webhooks_sent = _int_or_none(stats.get("webhooks_sent"))
        report.webhooks_failed = _int_or_none(stats.get("webhooks_failed"))
    report.double_payments = sorted(doubles)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number_or_none(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None
