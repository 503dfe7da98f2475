"""What operators see, the same from the CLI (``payouts``), the admin API and the ops page:
durations, relative times, payouts and outbox entries as plain JSON-able data, the stuck lists,
and pushing one outcome now.

No web framework and no terminal library here: both front ends build on it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ._model import AuditEntry, OutboxEntry, Payout, PayoutStatus
from ._policy import Policy
from .notify import Notifier, deliver_with_retries
from .storage import OpsSnapshot, PayoutQuery, Storage

__all__ = [
    "OUTBOX_FAILING_AFTER",
    "Stuck",
    "ago",
    "format_duration",
    "outbox_state",
    "outbox_view",
    "parse_duration",
    "payout_view",
    "push_now",
    "snapshot_view",
    "stuck",
    "timeline",
]

OUTBOX_FAILING_AFTER: Final = 600.0
"""An outbox entry still undelivered this many seconds after it was written, with a failed
round behind it, counts as failing (``resilient_payout_outbox_failing``, ``payouts stats``)."""

_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``90`` (seconds), ``10m``, ``2h``, ``30d``, ``1h30m``, ``500ms``.
    ``ValueError`` (naming the accepted forms) for anything else."""
    raw = text.strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _PART.finditer(raw):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(raw) or not raw:
            raise ValueError(
                f"not a duration: {text!r} (use e.g. 90, 90s, 10m, 2h, 30d, 1h30m)"
            ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {text!r} (must be finite and not negative)")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` in at most two units: ``0.4s``, ``42s``, ``3m 12s``, ``2h 5m``, ``4d 3h``."""
    s = abs(seconds)
    if s < 10:
        return f"{s:.1f}s"
    whole = round(s)
    for unit, size, sub, sub_size in (("d", 86_400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            main, rest = divmod(whole, size)
            return f"{main}{unit} {rest // sub_size}{sub}" if rest // sub_size else f"{main}{unit}"
    if whole >= 60:
        main, rest = divmod(whole, 60)
        return f"{main}m {rest}s" if rest else f"{main}m"
    return f"{whole}s"


def ago(at: float | None, now: float) -> str:
    """``3m 12s ago`` (or ``in 5s`` for a time ahead); ``-`` for None."""
    if at is None:
        return "-"
    delta = now - at
    return f"in {format_duration(delta)}" if delta < 0 else f"{format_duration(delta)} ago"


def outbox_state(entry: OutboxEntry | None) -> str:
    """``none``, ``delivered``, ``dead`` (given up on), ``failing`` (a failed round behind it)
    or ``queued``."""
    if entry is None:
        return "none"
    if entry.delivered_at is not None:
        return "delivered"
    if entry.dead_at is not None:
        return "dead"
    return "failing" if entry.attempts > 0 else "queued"


def outbox_view(entry: OutboxEntry | None) -> dict[str, Any] | None:
    """An outbox entry as JSON-able data, with its :func:`outbox_state`."""
    if entry is None:
        return None
    return {"state": outbox_state(entry), **entry.to_dict()}


def payout_view(payout: Payout) -> dict[str, Any]:
    """A payout as JSON-able data: the stored record, plus whether its audit has a conflict."""
    return {**payout.to_dict(), "conflict": any(a.conflict for a in payout.audit)}


def timeline(payout: Payout, now: float) -> list[dict[str, Any]]:
    """The audit trail, oldest first, each line with its time relative to now and to the
    payout's creation."""
    return [_line(entry, payout.created_at, now) for entry in payout.audit]


def _line(entry: AuditEntry, created_at: float, now: float) -> dict[str, Any]:
    offset = entry.at - created_at
    return {
        **entry.to_dict(),
        "ago": ago(entry.at, now),
        "after_creation": ("+" if offset >= 0 else "-") + format_duration(offset),
        "conflict": entry.conflict,
    }


def snapshot_view(snap: OpsSnapshot, counts: dict[PayoutStatus, int]) -> dict[str, Any]:
    """Counts by status and the alert figures, JSON-able."""
    return {
        "counts": {status.value: counts.get(status, 0) for status in PayoutStatus},
        "oldest_open_age": snap.oldest_open_age,
        "open_past_window": snap.open_past_window,
        "conflicts": snap.conflicts,
        "outbox_failing": snap.outbox_failing,
        "outbox_dead": snap.outbox_dead,
    }


@dataclass(frozen=True, slots=True)
class Stuck:
    """What needs a human, each list oldest first: payouts in ``unknown``, payouts whose audit
    has a conflict, and payouts whose push is failing or dead (with their entries)."""

    unknown: list[Payout]
    conflicts: list[Payout]
    failing: list[tuple[Payout, OutboxEntry]]


async def stuck(storage: Storage, *, limit: int = 50) -> Stuck:
    """The :class:`Stuck` lists, at most ``limit`` each (from the listing indexes)."""
    unknown = await storage.list_payouts(PayoutQuery(statuses={PayoutStatus.UNKNOWN}, limit=limit))
    conflicts = await storage.list_payouts(PayoutQuery(conflicts_only=True, limit=limit))
    failing: list[tuple[Payout, OutboxEntry]] = []
    query: PayoutQuery | None = PayoutQuery(undelivered_only=True, limit=limit)
    # Undelivered entries are few (a healthy app acknowledges at once); those just queued are
    # skipped, a few pages at most.
    for _ in range(10):
        if query is None or len(failing) >= limit:
            break
        page = await storage.list_payouts(query)
        for payout in page.items:
            entry = await storage.get_outbox(payout.id)
            if entry is not None and outbox_state(entry) in ("failing", "dead"):
                failing.append((payout, entry))
        query = (
            None
            if page.next_cursor is None
            else PayoutQuery(undelivered_only=True, limit=limit, cursor=page.next_cursor)
        )
    return Stuck(unknown.items, conflicts.items, failing[:limit])


async def push_now(
    storage: Storage, notifier: Notifier, payout_id: str, policy: Policy, now: Callable[[], float]
) -> bool:
    """Push a payout's outbox entry once now (one delivery round) and mark it delivered if the
    app acknowledged; False if it did not (or there is no undelivered entry): the entry stays
    queued for the service's outbox loop. The app may get it twice if that loop pushes it at
    the same moment (delivery is at least once)."""
    entry = await storage.get_outbox(payout_id)
    if entry is None or entry.delivered_at is not None:
        return False
    if not await deliver_with_retries(notifier, payout_id, entry.status, policy):
        return False
    await storage.ack_outbox(payout_id, delivered_at=now())
    return True
