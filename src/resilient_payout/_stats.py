"""ClientStats: the counters one :class:`~resilient_payout.PayoutClient` keeps (``/metrics``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ClientStats", "bump"]


@dataclass(slots=True)
class ClientStats:
    """Counters of one client (see docs/reconciliation.md). ``to_dict()`` gives a snapshot."""

    submits: int = 0
    replays: int = 0
    idempotency_conflicts: int = 0
    posts: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    checks_sent: int = 0
    checks_peak_per_second: int = 0
    checks_rate_limited: int = 0
    check_pauses: int = 0
    checks_skipped: int = 0
    webhooks: int = 0
    webhooks_unknown: int = 0
    webhooks_rejected: dict[str, int] = field(default_factory=dict)
    resolved: dict[str, int] = field(default_factory=dict)
    confirmed_absences: int = 0
    resubmissions: int = 0
    resends: int = 0
    """POSTs re-sent with the same idempotency key (partners that honour one)."""
    partner_refs_refused: int = 0
    """Partner references storage refused because another payout holds them (conflicts)."""
    recovered_orphans: int = 0
    takeovers: int = 0
    """Payouts recovered at once from an instance that died (restarted under the same name, or
    silent past ``takeover_after``): ``owner_gone`` in their audit trail."""
    leases_released: int = 0
    """Leases of a gone instance (this one's earlier run under the same name, or a silent one)
    that this client ended at once instead of waiting them out (``Storage.release_leases``)."""
    handed_over: int = 0
    """Payouts and claims this client handed over when a drain ended (cut-short POSTs, leases)."""
    drains_cut_short: int = 0
    """Drains that reached ``drain_timeout`` with work still running."""
    conflicts: int = 0
    hook_errors: int = 0
    sends_expired: int = 0
    retry_after_capped: int = 0
    notifications_delivered: int = 0
    notification_rounds_failed: int = 0
    notifications_dead: int = 0
    races_lost: int = 0
    work_errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bump(counter: dict[str, int], key: str) -> None:
    """Count one more ``key`` in a labelled counter."""
    counter[key] = counter.get(key, 0) + 1
