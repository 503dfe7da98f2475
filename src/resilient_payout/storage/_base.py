"""The storage contract every backend implements (see docs/storage.md).

Storage decides every race: creation is create-if-absent, every change is a compare-and-set on
the version the writer read, and background work is claimed with a lease. Nothing here may be
emulated with a Python lock around separate reads and writes, because several processes share
one database. Storage never reads a clock: callers pass ``now``.

Versions belong to storage: a created payout has version 1, and each successful compare-and-set
stores version ``expected_version + 1`` and returns the record as stored.

Partner references are unique: a write that would give a payout a ``partner_ref`` another
payout holds raises :class:`~resilient_payout.PartnerReferenceTaken` and writes nothing.

Instances sharing the storage also keep a liveness registry in it (``beat``, ``instances``,
``forget_instance``): one small record per instance, so that the others notice one that stopped.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._model import OutboxEntry, Payout, PayoutStatus
from ._query import OpsSnapshot, PayoutPage, PayoutQuery

__all__ = ["Storage"]


@runtime_checkable
class Storage(Protocol):
    """Async, atomic persistence of payouts and their notification outbox."""

    async def open(self) -> None:
        """Connect and create the schema if needed. Idempotent."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        """Store ``payout`` unless its id exists. Returns (the stored record, created?).

        Atomic: of any number of concurrent calls with one id, exactly one returns created=True.
        A new payout carrying a ``partner_ref`` another payout holds raises
        :class:`~resilient_payout.PartnerReferenceTaken` and is not stored.
        """
        ...

    async def get(self, payout_id: str) -> Payout | None:
        """The stored record, or None."""
        ...

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        """Replace the record if its stored version is still ``expected_version``.

        On success stores ``payout`` with version ``expected_version + 1``, releases any lease on
        it, inserts ``outbox`` (if given and no entry for this payout exists yet) in the same
        atomic step, and returns the stored record. Returns None if the version moved on (a lost
        race: re-read and decide again) or the payout does not exist.

        If ``payout.partner_ref`` is held by a *different* payout, raises
        :class:`~resilient_payout.PartnerReferenceTaken` and changes nothing (no record, no
        outbox entry). A record without a ``partner_ref`` keeps the reference stored for it:
        a reference is never removed (pruning aside).
        """
        ...

    async def claim_due(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Payout]:
        """Claim up to ``limit`` non-final payouts with ``next_check_at <= now``.

        Skips payouts leased to someone else until their lease expires. A claim is a write: it
        bumps the version (so a stale former owner's compare-and-set fails) and sets the lease to
        ``owner`` until ``now + lease_seconds``. Earliest ``next_check_at`` first.
        """
        ...

    async def next_due_at(self) -> float | None:
        """The earliest ``next_check_at`` of any non-final payout (leased or not), or None."""
        ...

    async def claim_outbox(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[OutboxEntry]:
        """Claim up to ``limit`` undelivered, not dead entries with ``next_attempt_at <= now``,
        leased as in :meth:`claim_due` (a claimed entry's ``next_attempt_at`` moves to the
        lease's end, so a dead claimer's entry comes back by itself)."""
        ...

    async def release_leases(self, owner: str, now: float, *, outbox: bool = True) -> int:
        """End every lease ``owner`` holds, on payouts and (unless ``outbox`` is false) outbox
        entries, so that they are claimable at ``now`` (for an owner known to be gone: it need
        not wait out its leases). ``outbox=False`` is for an owner only presumed gone: a push it
        may still have open would be sent twice, while a payout's version guards its writes.

        The result is what those leases running out at ``now`` would leave: a payout keeps its
        version and ``next_check_at``; an outbox entry's ``next_attempt_at`` (which was the
        lease's end) becomes ``now`` if it was later. Versions are not bumped, because the next
        claim bumps them: the old owner's compare-and-set on the version it claimed still
        succeeds while nobody has claimed the payout again (as after an expiry), and fails
        once someone has. Leases of other owners, and leases already ended (by a
        compare-and-set, an ack, a retry), are untouched. Returns how many leases were still
        running (``lease_until > now``); leases of ``owner`` that had already run out are
        cleared too, uncounted. Idempotent; atomic per call.
        """
        ...

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        """Mark the entry delivered, also a dead one (the app has it). Idempotent."""
        ...

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        """Count a failed delivery round and schedule the next one; releases the lease.

        Does nothing to a delivered, dead or unknown entry."""
        ...

    async def dead_letter_outbox(self, payout_id: str, *, at: float, error: str) -> None:
        """Count a failed delivery round as :meth:`retry_outbox` does, then give up: sets
        ``dead_at`` and releases the lease. A dead entry is never claimed again until
        :meth:`requeue_outbox`. Does nothing to a delivered, dead or unknown entry."""
        ...

    async def requeue_outbox(self, payout_id: str, *, next_attempt_at: float) -> bool:
        """Make the entry claimable again at ``next_attempt_at`` (an operator's decision): clears
        ``dead_at`` and ``delivered_at``, releases the lease and gives it a fresh delivery
        schedule (``attempts``, the round counter dead-lettering counts, back to 0), so it gets
        ``notify_max_rounds`` rounds again; ``last_error`` stays as history. False if the
        payout has no entry."""
        ...

    async def count_dead_outbox(self) -> int:
        """How many entries are dead-lettered (for metrics and alerts)."""
        ...

    async def get_outbox(self, payout_id: str) -> OutboxEntry | None:
        """The entry for a payout, delivered or not (for inspection and tests)."""
        ...

    async def count_by_status(self) -> dict[PayoutStatus, int]:
        """How many payouts are in each status (for metrics)."""
        ...

    async def get_by_partner_ref(self, partner_ref: str) -> Payout | None:
        """The payout holding this partner reference, or None."""
        ...

    async def list_payouts(self, query: PayoutQuery) -> PayoutPage:
        """One page of the payouts matching ``query``, oldest ``(created_at, id)`` first, after
        its cursor. Served from indexes: a page costs about ``limit`` index entries (plus those
        a filter not served by the chosen index skips), however many payouts are stored."""
        ...

    async def ops_snapshot(
        self, now: float, *, late_after: float, failing_after: float
    ) -> OpsSnapshot:
        """The figures of :class:`~resilient_payout.storage.OpsSnapshot` at ``now``, from
        indexes (cheap enough for every metrics scrape)."""
        ...

    async def prune(self, before: float, *, dry_run: bool, limit: int) -> int:
        """Delete up to ``limit`` final payouts last updated before ``before`` whose outbox entry
        is delivered (or that have none), with their entries and partner references; how many
        were deleted (``dry_run``: would be, deleting nothing). Each call is atomic.

        A pruned id is forgotten: the same id submitted again is a new payout (idempotency no
        longer covers it)."""
        ...

    # -- instance liveness ------------------------------------------------------------------

    async def beat(self, instance_id: str, mark: float) -> None:
        """Record that ``instance_id`` is alive: its latest mark is ``mark`` (any value that
        changes with every beat; the client passes its own clock, which other instances never
        compare with theirs - they only watch whether it changes). Upsert, atomic."""
        ...

    async def instances(self) -> dict[str, float]:
        """Every instance that beat and was not forgotten -> its latest mark."""
        ...

    async def forget_instance(self, instance_id: str) -> None:
        """Remove it (a clean exit, or its leftovers were taken over). Idempotent."""
        ...
