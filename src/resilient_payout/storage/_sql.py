"""SQL the two SQL backends share: the columns copied out of a payout's document so they can be
indexed, and the listing query built for a :class:`~.PayoutQuery`.

The statuses in partial indexes are literals (constants of our own enum), and queries repeat
them literally: a planner matches a partial index's predicate only against the same text, and a
parameter would hide it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .._model import Payout, PayoutStatus
from ._query import PayoutQuery, has_conflict

__all__ = ["FINAL_SQL", "Listing", "index_values", "listing_sql"]

FINAL_SQL: Final = ", ".join(f"'{s.value}'" for s in PayoutStatus if s.is_final)
"""The final statuses as SQL literals: ``'completed', 'declined', 'failed'``."""


def index_values(payout: Payout) -> tuple[Any, ...]:
    """``created_at, updated_at, attempt_started_at, has_conflict, partner_ref`` of a payout:
    the indexed columns beside its document, in this order."""
    return (
        payout.created_at,
        payout.updated_at,
        payout.attempt_started_at,
        has_conflict(payout),
        payout.partner_ref,
    )


@dataclass(frozen=True, slots=True)
class Listing:
    """How a backend spells its SQL: table names, placeholders, the conflict predicate (the
    same text as its partial index's), and how the outbox join is forced (SQLite's ``CROSS
    JOIN`` makes the outbox, whose undelivered entries are few, the outer loop)."""

    payouts: str
    outbox: str
    placeholder: Callable[[int], str]
    conflict: str
    outbox_join: str


def listing_sql(query: PayoutQuery, dialect: Listing) -> tuple[str, list[Any]]:
    """The statement listing one page (``limit + 1`` rows of ``version, doc, created_at, id``,
    in order) and its parameters.

    Several statuses without another filter that has its own index are one ``ORDER BY ...
    LIMIT`` per status, merged: each reads at most ``limit + 1`` entries of the ``(status,
    created_at, id)`` index, however many payouts the other statuses hold.
    """
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return dialect.placeholder(len(params))

    limit = query.limit + 1
    # Undelivered outcomes are listed from the outbox's index, in the order of the payouts'
    # creation time (a copy the outbox row keeps): a page reads a page of index entries.
    created, pid_column = ("p.created_at", "p.id")
    if query.undelivered_only:
        created, pid_column = ("o.payout_created_at", "o.payout_id")

    def select(status: PayoutStatus | None) -> str:
        where: list[str] = []
        source = f"{dialect.payouts} p"
        if query.undelivered_only:
            source = dialect.outbox_join
            where.append("o.delivered_at IS NULL")
        if status is not None:
            where.append(f"p.status = {param(status.value)}")
        elif query.statuses is not None:
            marks = ", ".join(param(s.value) for s in sorted(query.statuses))
            where.append(f"p.status IN ({marks})")
        if query.conflicts_only:
            where.append(dialect.conflict)
        for column, low, high in (
            (created, query.created_after, query.created_before),
            ("p.updated_at", query.updated_after, query.updated_before),
        ):
            if low is not None:
                where.append(f"{column} >= {param(low)}")
            if high is not None:
                where.append(f"{column} < {param(high)}")
        if query.after is not None:
            at, pid = query.after
            where.append(f"({created}, {pid_column}) > ({param(at)}, {param(pid)})")
        clause = " WHERE " + " AND ".join(where) if where else ""
        return (
            f"SELECT p.version, p.doc, {created}, {pid_column} FROM {source}{clause}"  # noqa: S608 -- placeholders only
            f" ORDER BY {created}, {pid_column} LIMIT {param(limit)}"
        )

    statuses = sorted(query.statuses) if query.statuses is not None else []
    if len(statuses) > 1 and not (query.undelivered_only or query.conflicts_only):
        parts = " UNION ALL ".join(
            f"SELECT * FROM ({select(s)}) AS s{n}"  # noqa: S608 -- built above
            for n, s in enumerate(statuses)
        )
        sql = f"SELECT * FROM ({parts}) AS u ORDER BY created_at, id LIMIT {param(limit)}"  # noqa: S608
        return sql, params
    return select(statuses[0] if len(statuses) == 1 else None), params
