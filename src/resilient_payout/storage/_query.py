"""What operators ask storage: :class:`PayoutQuery` and :class:`PayoutPage` (listing with keyset
pagination), :class:`OpsSnapshot` (the figures alerts are made of), and the cursor codec the
backends share.

Listing is ordered by ``(created_at, id)``, oldest first. A payout's ``created_at`` and ``id``
never change, so a cursor naming the last ``(created_at, id)`` seen resumes exactly after it:
payouts created meanwhile (newer) come on later pages, and updates move no payout within the
order, so an existing payout that matches the query throughout is listed exactly once.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import InvalidRequest
from .._model import Payout, PayoutStatus

__all__ = [
    "MAX_PAGE",
    "OpsSnapshot",
    "PayoutPage",
    "PayoutQuery",
    "decode_cursor",
    "encode_cursor",
]

MAX_PAGE: Final = 500
"""The most payouts one page may hold."""


def _time(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
        raise InvalidRequest(f"{name} must be a finite number of epoch seconds")


@dataclass(frozen=True, slots=True)
class PayoutQuery:
    """Which payouts to list, and which page.

    Every filter given must hold (they combine with AND). Times are epoch seconds, half-open
    ranges: ``created_after <= created_at < created_before`` (and the same for ``updated_at``,
    the time of the last change). ``statuses`` None means every status. ``conflicts_only``:
    payouts whose audit trail records a conflicting report. ``undelivered_only``: payouts with
    an outbox entry not acknowledged by the app yet (dead-lettered or not). ``cursor`` is
    :attr:`PayoutPage.next_cursor` of the previous page (same filters), None for the first.

    Bad values raise :class:`~resilient_payout.InvalidRequest` (a ``ValueError``).
    """

    statuses: AbstractSet[PayoutStatus] | None = None
    created_before: float | None = None
    created_after: float | None = None
    updated_before: float | None = None
    updated_after: float | None = None
    conflicts_only: bool = False
    undelivered_only: bool = False
    limit: int = 50
    cursor: str | None = None
    after: tuple[float, str] | None = field(init=False, repr=False, compare=False)
    """The decoded cursor: list payouts whose ``(created_at, id)`` is after this."""

    def __post_init__(self) -> None:
        if self.statuses is not None:
            statuses = frozenset(PayoutStatus(s) for s in self.statuses)
            if not statuses:
                raise InvalidRequest("statuses must name at least one status (None: all)")
            object.__setattr__(self, "statuses", statuses)
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise InvalidRequest("limit must be an integer")
        if not 1 <= self.limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be within 1..{MAX_PAGE}, got {self.limit}")
        for name in ("created_before", "created_after", "updated_before", "updated_after"):
            _time(name, getattr(self, name))
        after = None if self.cursor is None else decode_cursor(self.cursor)
        object.__setattr__(self, "after", after)

    def matches(self, payout: Payout, *, undelivered: bool) -> bool:
        """Whether ``payout`` passes every filter (cursor aside); ``undelivered``: whether it has
        an outbox entry not delivered yet. Backends that filter in Python use this."""
        if self.statuses is not None and payout.status not in self.statuses:
            return False
        if self.conflicts_only and not has_conflict(payout):
            return False
        if self.undelivered_only and not undelivered:
            return False
        return _within(payout.created_at, self.created_after, self.created_before) and _within(
            payout.updated_at, self.updated_after, self.updated_before
        )


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value < high)


def has_conflict(payout: Payout) -> bool:
    """Whether the audit trail records a conflicting report (the indexed ``has_conflict``)."""
    return any(entry.conflict for entry in payout.audit)


@dataclass(frozen=True, slots=True)
class PayoutPage:
    """One page of a listing: ``items`` oldest first, and the cursor of the next page (None:
    this was the last). A page may hold fewer than ``limit`` items and still have a next one
    (a backend may bound the work of one call)."""

    items: list[Payout]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class OpsSnapshot:
    """The figures operators alert on, computed by storage at ``now`` (see docs/operations.md).

    ``oldest_open_age``: seconds since the oldest non-final payout was created (None: none is
    open). ``open_past_window``: non-final payouts whose current attempt started more than
    ``late_after`` seconds ago. ``conflicts``: payouts whose audit records a conflict.
    ``outbox_failing``: outbox entries neither delivered nor dead, with at least one failed
    round, created more than ``failing_after`` seconds ago. ``outbox_dead``: dead-lettered
    entries.
    """

    oldest_open_age: float | None
    open_past_window: int
    conflicts: int
    outbox_failing: int
    outbox_dead: int

    @classmethod
    def of(cls, now: float, oldest: Iterable[Any], *counts: Any) -> OpsSnapshot:
        """From a backend's raw figures: creation times of the oldest open payouts (None or
        missing where a status has none), then the four counts in field order."""
        first = min((float(t) for t in oldest if t is not None), default=None)
        late, conflicts, failing, dead = (int(c) for c in counts)
        return cls(None if first is None else now - first, late, conflicts, failing, dead)


def encode_cursor(created_at: float, payout_id: str) -> str:
    """The opaque cursor for "after ``(created_at, payout_id)``" (URL-safe)."""
    raw = json.dumps([repr(float(created_at)), payout_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The position a cursor names; :class:`InvalidRequest` if it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, payout_id = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        at = float(created)
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        raise InvalidRequest("not a cursor returned by a previous page") from None
    if not isinstance(payout_id, str) or not math.isfinite(at):
        raise InvalidRequest("not a cursor returned by a previous page")
    return at, payout_id


def page_of(rows: Iterable[Payout], limit: int) -> PayoutPage:
    """The page from up to ``limit + 1`` matching payouts in order: one more than the limit
    means there is a next page, after the last item shown."""
    items = list(rows)
    if len(items) <= limit:
        return PayoutPage(items, None)
    items = items[:limit]
    last = items[-1]
    return PayoutPage(items, encode_cursor(last.created_at, last.id))
