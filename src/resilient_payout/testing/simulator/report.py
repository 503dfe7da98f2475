"""The graded result of one run: :class:`SimulationReport` and its JSON file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["SimulationReport", "Verdict", "write_json"]

Verdict = Literal["correct", "wrong", "missing", "conflicting", "unverified", "unsettled"]
"""Each verdict but ``correct`` names a count and an ``*_ids`` list of the report."""


@dataclass
class SimulationReport:
    """The graded result of one run. Times come from the event-loop clock (virtual in tests).

    Latencies are real milliseconds; ``final_*_s`` are clock seconds (divide by ``time_scale`` for
    scenario seconds). Partner fields are ``None`` when the partner did not say.
    """

    n: int
    seed: int
    time_scale: float
    duration_s: float
    sent: int = 0
    requests_sent: int = 0
    repeats_sent: int = 0
    repeats_concurrent: int = 0
    repeats_late: int = 0
    post_retries: int = 0
    post_errors: int = 0
    bad_answers: int = 0
    correct: int = 0
    wrong: int = 0
    missing: int = 0
    conflicting: int = 0
    unverified: int = 0
    unsettled: int = 0
    wrong_ids: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)
    conflicting_ids: list[str] = field(default_factory=list)
    unverified_ids: list[str] = field(default_factory=list)
    unsettled_ids: list[str] = field(default_factory=list)
    non_correct: list[dict[str, Any]] = field(default_factory=list)
    """Details of the first ``max_listed`` non-correct ids, to start a diagnosis from."""
    first_answer_p50_ms: float | None = None
    first_answer_p99_ms: float | None = None
    final_p50_s: float | None = None
    final_p90_s: float | None = None
    final_max_s: float | None = None
    settle_wait_s: float | None = None
    """Clock seconds spent after the load waiting for the partner's truth to settle."""
    finals_by_channel: dict[str, int] = field(default_factory=dict)
    pushes_received: int = 0
    repeat_pushes: int = 0
    pushes_unknown: int = 0
    pushes_rejected: int = 0
    push_shapes: dict[str, int] = field(default_factory=dict)
    get_fallbacks: int = 0
    get_requests: int = 0
    get_errors: int = 0
    not_sent_to_partner: int | None = None
    partner_posts_total: int | None = None
    partner_posts_max_per_id: int | None = None
    double_payments: list[str] = field(default_factory=list)
    checks_total: int | None = None
    checks_per_payout: float | None = None
    checks_peak_per_second: float | None = None
    blocks: int | None = None
    rate_limited_checks: int | None = None
    webhooks_sent: int | None = None
    webhooks_failed: int | None = None
    partner_errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why the run is not ok; empty when it is."""
        found: list[str] = []
        for count, what in (
            (self.wrong, "wrong outcome(s)"),
            (self.missing, "missing outcome(s)"),
            (self.conflicting, "conflicting outcome(s)"),
            (self.unverified, "unverified outcome(s)"),
            (self.unsettled, "unsettled outcome(s)"),
            (len(self.double_payments), "double payment(s)"),
            (self.pushes_rejected, "rejected push(es)"),
        ):
            if count:
                found.append(f"{count} {what}")
        if self.blocks is None:
            found.append("partner blocks unknown")
        elif self.blocks:
            found.append(f"{self.blocks} partner block(s)")
        found.extend(f"partner: {error}" for error in self.partner_errors)
        return found

    @property
    def ok(self) -> bool:
        """Every outcome correct, no double payment, no block, nothing unknown."""
        return not self.problems()

    def exit_code(self) -> int:
        """0 if ok, else 1."""
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with ``ok`` and ``problems``."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["problems"] = self.problems()
        return data


def write_json(report: SimulationReport, path: str | Path) -> None:
    """Write ``report.to_dict()`` as indented JSON."""
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
