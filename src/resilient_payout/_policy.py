"""Every number the library uses, in one typed, time-scalable object.

Defaults follow the partner's published behaviour (``shared/scenario.md``); nothing else in the
library hard-codes a duration. ``Policy().scaled(0.01)`` makes every duration 100x shorter (and
every rate 100x higher), which is how tests and demos run the real logic against a time-scaled
mock partner.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Policy"]


def _seconds(default: float, doc: str) -> Any:
    return field(default=default, metadata={"unit": "seconds", "doc": doc})


def _rate(default: float, doc: str) -> Any:
    return field(default=default, metadata={"unit": "per_second", "doc": doc})


@dataclass(frozen=True, slots=True)
class Policy:
    """Timeouts, windows, caps and the status-check budget. Immutable; see :meth:`scaled`."""

    # -- the partner POST --------------------------------------------------------------------
    connect_timeout: float = _seconds(5.0, "TCP/TLS connect timeout for partner calls")
    read_timeout: float = _seconds(
        40.0, "Read timeout of the POST; above the partner's ~30 s 504 so that we see the 504"
    )
    check_timeout: float = _seconds(10.0, "Read timeout of one status check")
    submit_deadline: float = _seconds(
        60.0,
        "A payout still 'submitting' this long after its POST started is presumed orphaned by a "
        "crash and becomes 'unknown'. Must exceed connect_timeout + read_timeout.",
    )
    claim_grace: float = _seconds(
        20.0,
        "A new payout belongs to the process that created it for this long before others "
        "may pick it up (it is submitted at once by its creator; this only covers a crash).",
    )
    max_send_delay: float = _seconds(
        15.0,
        "Longest time from deciding to POST to the request reaching the partner. The client "
        "refuses to send an attempt older than max_send_delay - connect_timeout (a stall after "
        "the decision: loop lag, GC, a frozen VM) and decides again; the late-arrival window "
        "must leave room for it.",
    )
    max_clock_skew: float = _seconds(
        10.0,
        "Largest difference between the clocks of instances sharing one storage (keep them on "
        "NTP). Windows, deadlines and leases written by one instance are judged by another's "
        "clock, so every one of them leaves this much room.",
    )
    max_send_retries: int = 5
    """POSTs that surely never reached the partner (or got 429) before giving up as failed."""
    send_backoff_initial: float = _seconds(1.0, "First backoff after a POST that was not sent")
    send_backoff_max: float = _seconds(30.0, "Cap of that backoff")

    # -- uncertain outcomes and the late-arrival window --------------------------------------
    earliest_landing: float = _seconds(
        30.0, "After an uncertain POST, no transfer can land before this (partner: 30 s)"
    )
    latest_landing: float = _seconds(
        120.0, "After an uncertain POST, a transfer that lands does so by then (partner: 120 s)"
    )
    late_arrival_window: float = _seconds(
        150.0,
        "After the attempt started, a transfer that has not landed by then never will (partner: "
        "120 s, plus slack). A status check after it that finds no record confirms absence.",
    )
    absence_check_delay: float = _seconds(
        2.0, "How long after the window closes the confirming status check is made"
    )
    max_submit_attempts: int = 2
    """Partner attempts per payout; a second one only after confirmed absence of the first."""

    # -- partners that honour an idempotency key ---------------------------------------------
    max_resends: int = 8
    """Re-sends of an uncertain POST with the same idempotency key before falling back to status
    checks and the late-arrival window. Used only when the partner declares
    :class:`~resilient_payout.IdempotencyKeys` (the client sets ``key_retention`` from it);
    with a partner that does not, an uncertain POST is never re-sent."""
    resend_backoff_initial: float = _seconds(2.0, "First wait before re-sending with the same key")
    resend_backoff_max: float = _seconds(30.0, "Cap of that wait")
    key_retention: float = _seconds(
        0.0,
        "How long the partner keeps an idempotency key (0: it honours none). Set by the client "
        "from the partner's IdempotencyKeys; a re-send is made only well inside it.",
    )

    # -- awaiting a final status ---------------------------------------------------------------
    webhook_grace: float = _seconds(
        35.0, "After the partner acknowledged a POST as pending, wait this long for the webhook"
    )
    check_interval: float = _seconds(
        5.0,
        "Shortest spacing of two checks of one payout; when the budget is short the scheduler "
        "spreads them further (round-robin, see docs/reconciliation.md)",
    )
    max_check_interval: float = _seconds(300.0, "Cap of that spacing once it backs off")

    # -- the status-check budget ---------------------------------------------------------------
    check_rate: float = _rate(2.0, "Status checks per second, process-wide (or cluster-wide)")
    check_burst: int = 2
    """Checks that may go out back to back."""
    block_pause: float = _seconds(
        60.0, "Pause of all checks after the partner says 'too many' (429) without Retry-After"
    )
    max_retry_after: float = _seconds(
        300.0,
        "Longest wait a partner's Retry-After may impose (on a submit or on all checks); a "
        "longer one is capped and logged, so one bad header cannot park payouts for a year",
    )

    # -- background work -------------------------------------------------------------------------
    lease: float = _seconds(30.0, "How long a claimed piece of work belongs to its claimer")
    poll_interval: float = _seconds(1.0, "How often storage is scanned for due work")
    max_concurrent_work: int = 10_000
    """Background tasks (submits, checks) in flight at once in one process."""
    drain_timeout: float = _seconds(
        50.0,
        "On leaving the client (SIGTERM, a deploy): how long in-flight partner calls and pushes "
        "may still finish. Long enough for a partner answer: connect + read timeout + margin.",
    )
    heartbeat_interval: float = _seconds(
        1.0, "How often a running client marks itself alive in storage, and reads the others' marks"
    )
    takeover_after: float = _seconds(
        5.0,
        "An instance whose mark has not changed for this long (by the watcher's own clock) is "
        "presumed dead: its open submits are checked at once (never re-POSTed blindly)",
    )

    # -- notifications -----------------------------------------------------------------------
    notify_timeout: float = _seconds(10.0, "Timeout of one push to the app's backend")
    notify_backoff_initial: float = _seconds(0.5, "First retry delay of a failed push")
    notify_backoff_max: float = _seconds(60.0, "Cap of the push retry delay")
    notify_attempts_per_round: int = 4
    """Pushes tried in one round before the entry is put back in the outbox for later."""
    notify_max_rounds: int = 200
    """Refused rounds after which an outbox entry is dead-lettered: no longer pushed by itself,
    counted in ``/metrics``, left for an operator to re-queue (at the default backoff, hours)."""

    def scaled(self, factor: float) -> Policy:
        """Every duration multiplied by ``factor``, every rate divided by it."""
        if factor <= 0:
            raise ValueError("factor must be > 0")
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            unit = f.metadata.get("unit")
            if unit == "seconds":
                changes[f.name] = getattr(self, f.name) * factor
            elif unit == "per_second":
                changes[f.name] = getattr(self, f.name) / factor
        return dataclasses.replace(self, **changes)

    def retry_delay(self, retry_after: float | None, default: float) -> float:
        """The wait a 429 imposes: the partner's Retry-After (capped), else ``default``."""
        if retry_after is None or retry_after != retry_after:  # None or NaN
            return default
        return min(max(retry_after, 0.0), self.max_retry_after)

    def replace(self, **changes: Any) -> Policy:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        # Every relation below is a money rule (docs/concepts.md, "Timing assumptions").
        if self.max_send_delay <= self.connect_timeout:
            raise ValueError("max_send_delay must exceed connect_timeout")
        if self.submit_deadline <= self.connect_timeout + self.read_timeout + self.max_clock_skew:
            # Another instance must not presume a POST orphaned while it can still be answered.
            raise ValueError(
                "submit_deadline must exceed connect_timeout + read_timeout + max_clock_skew"
            )
        if not self.earliest_landing < self.latest_landing:
            raise ValueError("need earliest_landing < latest_landing")
        slack = self.latest_landing + self.max_send_delay + self.max_clock_skew
        if self.late_arrival_window < slack:
            # A window without room for a late send and a fast clock confirms absence while
            # the first attempt can still land: a second payment.
            raise ValueError(
                "late_arrival_window must be at least latest_landing + max_send_delay + "
                f"max_clock_skew ({slack:g} s)"
            )
        if self.lease <= self.check_timeout + self.max_clock_skew:
            raise ValueError("lease must exceed check_timeout + max_clock_skew")
        if self.claim_grace <= self.max_clock_skew:
            # A fast clock elsewhere would take a new payout from the process submitting it.
            raise ValueError("claim_grace must exceed max_clock_skew")
        if self.max_retry_after <= 0 or self.notify_max_rounds < 1:
            raise ValueError("max_retry_after and notify_max_rounds must be positive")
        if self.max_resends < 0 or self.key_retention < 0:
            raise ValueError("max_resends and key_retention must not be negative")
        if self.max_submit_attempts < 1 or self.check_burst < 1 or self.check_rate <= 0:
            raise ValueError("max_submit_attempts, check_burst and check_rate must be positive")
