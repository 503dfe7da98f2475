"""The storage contract as a pytest suite: run it against your own backend.

Every backend shipped with resilient-payout passes it, and so must yours. Subclass
:class:`StorageContract` in a test module (its name starts with ``Test`` so pytest collects it)
and give it a ``storage`` fixture that yields a fresh, opened, *empty* backend for each test::

    # tests/test_my_storage.py
    from collections.abc import AsyncIterator

    import pytest

    from resilient_payout.testing.contract import StorageContract
    from my_package import MyStorage


    class TestMyStorage(StorageContract):
        @pytest.fixture
        async def storage(self) -> AsyncIterator[MyStorage]:
            backend = MyStorage("...")
            await backend.open()
            yield backend
            await backend.close()

The tests are ``anyio`` tests: the ``anyio`` pytest plugin (installed with anyio) runs them, on
asyncio unless you override the ``anyio_backend`` fixture. For pytest's detailed assertion
messages, call ``pytest.register_assert_rewrite("resilient_payout.testing.contract")`` in your
``conftest.py`` before importing this module.

Times are explicit ``now`` values (storage never reads a clock), so the suite never sleeps.
Concurrent tests start many calls at once on one storage object. A backend shared by several
processes must also pass :class:`MultiInstanceContract`, which races several storage objects
opened on one database, as separate processes would::

    class TestMyStorageInstances(MultiInstanceContract):
        @pytest.fixture
        async def open_instances(self) -> AsyncIterator[OpenInstances]:
            opened: list[MyStorage] = []

            async def open_n(n: int) -> list[Storage]:
                batch = [MyStorage("...same database...") for _ in range(n)]
                for backend in batch:
                    await backend.open()
                    opened.append(backend)
                return list(batch)

            yield open_n
            for backend in opened:
                await backend.close()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import anyio
import pytest

from .._errors import InvalidRequest, PartnerReferenceTaken
from .._model import AuditEntry, Cause, OutboxEntry, PartnerStatus, Payout, PayoutStatus
from ..storage import OpsSnapshot, PayoutQuery, Storage

__all__ = [
    "T0",
    "MultiInstanceContract",
    "OpenInstances",
    "StorageContract",
    "make_outbox",
    "make_payout",
]

T = TypeVar("T")

T0 = 1_700_000_000.0
"""The suite's "now": a realistic epoch time, so backends storing floats get realistic values."""

LEASE = 30.0

OpenInstances = Callable[[int], Awaitable[list[Storage]]]
"""``await open_instances(n)``: ``n`` newly opened storage objects on one shared database."""


def make_payout(
    payout_id: str = "p-1",
    *,
    status: PayoutStatus = PayoutStatus.RECEIVED,
    next_check_at: float | None = T0,
    **changes: Any,
) -> Payout:
    """A plausible payout record, not yet stored."""
    base = Payout(
        id=payout_id,
        fingerprint=f"fp-{payout_id}",
        status=status,
        created_at=T0 - 10.0,
        updated_at=T0 - 10.0,
        request={"id": payout_id},
        next_check_at=next_check_at,
        audit=(
            AuditEntry(
                T0 - 10.0,
                Cause.APP_REQUEST,
                "received",
                PayoutStatus.RECEIVED,
                PayoutStatus.RECEIVED,
            ),
        ),
    )
    return replace(base, **changes)


def make_outbox(
    payout_id: str = "p-1",
    *,
    status: PayoutStatus = PayoutStatus.COMPLETED,
    at: float = T0,
) -> OutboxEntry:
    """A fresh outbox entry, due at ``at``."""
    return OutboxEntry(payout_id=payout_id, status=status, created_at=at, next_attempt_at=at)


def _final(payout: Payout, status: PayoutStatus = PayoutStatus.COMPLETED) -> Payout:
    return replace(payout, status=status, next_check_at=None, updated_at=T0)


async def _gather(calls: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the calls concurrently; their results in call order."""
    results: list[Any] = [None] * len(calls)

    async def run(i: int) -> None:
        results[i] = await calls[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    return results


class StorageContract:
    """Tests of every :class:`~resilient_payout.storage.Storage` operation.

    Needs a ``storage`` fixture: an opened, empty backend, new for each test.
    """

    pytestmark = pytest.mark.anyio

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    async def create(storage: Storage, payout_id: str = "p-1", **kwargs: Any) -> Payout:
        stored, created = await storage.create_if_absent(make_payout(payout_id, **kwargs))
        assert created
        return stored

    @staticmethod
    async def update(
        storage: Storage, current: Payout, outbox: OutboxEntry | None = None, **changes: Any
    ) -> Payout:
        """A compare-and-set that must succeed."""
        stored = await storage.compare_and_set(
            replace(current, **changes), expected_version=current.version, outbox=outbox
        )
        assert stored is not None
        return stored

    @staticmethod
    async def claim(
        storage: Storage, now: float = T0, owner: str = "a", limit: int = 100
    ) -> list[Payout]:
        return await storage.claim_due(now, owner=owner, lease_seconds=LEASE, limit=limit)

    @staticmethod
    async def claim_outbox(
        storage: Storage, now: float = T0, owner: str = "a", limit: int = 100
    ) -> list[OutboxEntry]:
        return await storage.claim_outbox(now, owner=owner, lease_seconds=LEASE, limit=limit)

    # -- open / close -------------------------------------------------------------------------

    async def test_implements_the_protocol(self, storage: Storage) -> None:
        assert isinstance(storage, Storage)

    async def test_open_is_idempotent(self, storage: Storage) -> None:
        await storage.open()
        await storage.open()
        stored = await self.create(storage)
        assert await storage.get("p-1") == stored

    async def test_close_is_idempotent_and_open_again_keeps_data(self, storage: Storage) -> None:
        stored = await self.create(storage)
        await storage.close()
        await storage.close()
        await storage.open()
        assert await storage.get("p-1") == stored

    # -- create_if_absent / get ---------------------------------------------------------------

    async def test_get_unknown_is_none(self, storage: Storage) -> None:
        assert await storage.get("nope") is None

    async def test_create_stores_version_1_and_returns_the_stored_record(
        self, storage: Storage
    ) -> None:
        payout = make_payout("p-1", version=7)
        stored, created = await storage.create_if_absent(payout)
        assert created is True
        assert stored == replace(payout, version=1)
        assert await storage.get("p-1") == stored

    async def test_create_existing_returns_it_and_never_overwrites(self, storage: Storage) -> None:
        first = await self.create(storage)
        other = make_payout("p-1", fingerprint="other", status=PayoutStatus.AWAITING)
        existing, created = await storage.create_if_absent(other)
        assert created is False
        assert existing == first
        assert await storage.get("p-1") == first

    async def test_create_existing_returns_its_current_version(self, storage: Storage) -> None:
        first = await self.create(storage)
        second = await self.update(storage, first, status=PayoutStatus.SUBMITTING)
        existing, created = await storage.create_if_absent(make_payout("p-1"))
        assert created is False
        assert existing == second
        assert existing.version == 2

    async def test_concurrent_creates_of_one_id_exactly_one_wins(self, storage: Storage) -> None:
        results = await _gather(
            [
                partial(storage.create_if_absent, make_payout("p-1", fingerprint=f"fp-{i}"))
                for i in range(50)
            ]
        )
        winners = [stored for stored, created in results if created]
        assert len(winners) == 1
        assert all(stored == winners[0] for stored, _ in results)
        assert await storage.get("p-1") == winners[0]
        assert winners[0].version == 1

    async def test_round_trip_keeps_every_field(self, storage: Storage) -> None:
        payout = make_payout(
            "p-full",
            status=PayoutStatus.AWAITING,
            next_check_at=T0 + 0.125,
            request={"id": "p-full", "amount": "12.50", "meta": {"tags": ["a", "b"], "n": 3}},
            attempt=2,
            posts=3,
            send_failures=1,
            checks=4,
            attempt_started_at=T0 - 5.5,
            answered_at=T0 - 4.25,
            partner_status=PartnerStatus.PENDING,
            reason="partner said pending",
            resolved_by=Cause.STATUS_CHECK,
            audit=(
                AuditEntry(
                    T0 - 9,
                    Cause.APP_REQUEST,
                    "received",
                    PayoutStatus.RECEIVED,
                    PayoutStatus.RECEIVED,
                ),
                AuditEntry(
                    T0 - 5,
                    Cause.WEBHOOK,
                    "late",
                    PayoutStatus.UNKNOWN,
                    PayoutStatus.AWAITING,
                    detail='x\u00e9\n"q"',
                    conflict=True,
                ),
            ),
        )
        stored, _ = await storage.create_if_absent(payout)
        assert stored == replace(payout, version=1)
        assert await storage.get("p-full") == stored

    async def test_stored_record_is_isolated_from_callers(self, storage: Storage) -> None:
        payout = make_payout("p-1", request={"id": "p-1", "meta": {"k": [1]}})
        stored, _ = await storage.create_if_absent(payout)
        payout.request["meta"]["k"].append(2)
        stored.request["id"] = "changed"
        fetched = await storage.get("p-1")
        assert fetched is not None
        assert fetched.request == {"id": "p-1", "meta": {"k": [1]}}
        fetched.request.clear()
        again = await storage.get("p-1")
        assert again is not None
        assert again.request == {"id": "p-1", "meta": {"k": [1]}}

    # -- compare_and_set ----------------------------------------------------------------------

    async def test_cas_stores_expected_plus_one_and_returns_the_stored_record(
        self, storage: Storage
    ) -> None:
        v1 = await self.create(storage)
        wanted = replace(v1, status=PayoutStatus.SUBMITTING, posts=1, version=99)
        v2 = await storage.compare_and_set(wanted, expected_version=1)
        assert v2 == replace(wanted, version=2)
        assert await storage.get("p-1") == v2
        assert v2 is not None
        v3 = await self.update(storage, v2, status=PayoutStatus.AWAITING)
        assert v3.version == 3
        assert await storage.get("p-1") == v3

    async def test_cas_with_a_stale_version_changes_nothing(self, storage: Storage) -> None:
        v1 = await self.create(storage)
        v2 = await self.update(storage, v1, status=PayoutStatus.SUBMITTING)
        lost = await storage.compare_and_set(
            _final(v1), expected_version=1, outbox=make_outbox("p-1")
        )
        assert lost is None
        assert await storage.get("p-1") == v2
        assert await storage.get_outbox("p-1") is None

    async def test_cas_with_a_future_version_fails(self, storage: Storage) -> None:
        v1 = await self.create(storage)
        assert await storage.compare_and_set(v1, expected_version=2) is None
        assert await storage.get("p-1") == v1

    async def test_cas_of_an_unknown_id_returns_none_and_creates_nothing(
        self, storage: Storage
    ) -> None:
        ghost = make_payout("ghost")
        assert await storage.compare_and_set(ghost, expected_version=0) is None
        assert await storage.compare_and_set(ghost, expected_version=1, outbox=None) is None
        out = await storage.compare_and_set(
            _final(ghost), expected_version=1, outbox=make_outbox("ghost")
        )
        assert out is None
        assert await storage.get("ghost") is None
        assert await storage.get_outbox("ghost") is None

    async def test_concurrent_cas_from_one_version_exactly_one_wins(self, storage: Storage) -> None:
        v1 = await self.create(storage)
        results = await _gather(
            [
                partial(storage.compare_and_set, replace(v1, reason=f"w-{i}"), expected_version=1)
                for i in range(50)
            ]
        )
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert winners[0].version == 2
        assert await storage.get("p-1") == winners[0]

    async def test_cas_inserts_the_outbox_entry(self, storage: Storage) -> None:
        v1 = await self.create(storage)
        entry = make_outbox("p-1", status=PayoutStatus.DECLINED)
        assert await storage.get_outbox("p-1") is None
        await self.update(storage, v1, entry, status=PayoutStatus.DECLINED, next_check_at=None)
        assert await storage.get_outbox("p-1") == entry

    async def test_outbox_entry_is_inserted_only_once(self, storage: Storage) -> None:
        v1 = await self.create(storage)
        first = make_outbox("p-1", status=PayoutStatus.COMPLETED, at=T0)
        v2 = await self.update(storage, v1, first, status=PayoutStatus.COMPLETED)
        second = make_outbox("p-1", status=PayoutStatus.DECLINED, at=T0 + 5)
        v3 = await self.update(storage, v2, second, reason="conflicting report")
        assert v3.version == 3
        assert await storage.get_outbox("p-1") == first

    async def test_concurrent_final_writes_leave_the_winners_outbox(self, storage: Storage) -> None:
        v1 = await self.create(storage)
        statuses = [PayoutStatus.COMPLETED, PayoutStatus.DECLINED, PayoutStatus.FAILED] * 10
        results = await _gather(
            [
                partial(
                    storage.compare_and_set,
                    _final(v1, s),
                    expected_version=1,
                    outbox=make_outbox("p-1", status=s),
                )
                for s in statuses
            ]
        )
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        entry = await storage.get_outbox("p-1")
        assert entry is not None
        assert entry.status == winners[0].status

    # -- claim_due ----------------------------------------------------------------------------

    async def test_claim_due_takes_due_non_final_payouts_earliest_first(
        self, storage: Storage
    ) -> None:
        await self.create(storage, "late", next_check_at=T0 - 1)
        await self.create(storage, "early", next_check_at=T0 - 30)
        await self.create(storage, "exactly-now", next_check_at=T0)
        await self.create(storage, "future", next_check_at=T0 + 0.001)
        await self.create(storage, "unscheduled", next_check_at=None)
        await self.create(storage, "final", status=PayoutStatus.DECLINED, next_check_at=None)
        # A final record that still carries a due time must not be claimed either.
        await self.create(storage, "final-due", status=PayoutStatus.FAILED, next_check_at=T0 - 50)
        claimed = await self.claim(storage)
        assert [p.id for p in claimed] == ["early", "late", "exactly-now"]

    async def test_claim_due_respects_limit(self, storage: Storage) -> None:
        for i in range(5):
            await self.create(storage, f"p-{i}", next_check_at=T0 - 10 + i)
        first = await self.claim(storage, limit=2)
        assert [p.id for p in first] == ["p-0", "p-1"]
        second = await self.claim(storage, owner="b", limit=2)
        assert [p.id for p in second] == ["p-2", "p-3"]
        assert await self.claim(storage, limit=0) == []

    async def test_claim_is_a_version_bump(self, storage: Storage) -> None:
        v1 = await self.create(storage)
        (claimed,) = await self.claim(storage)
        assert claimed == replace(v1, version=2)
        assert await storage.get("p-1") == claimed
        assert await storage.compare_and_set(_final(v1), expected_version=1) is None
        assert await storage.compare_and_set(_final(claimed), expected_version=2) is not None

    async def test_lease_hides_a_claimed_payout_until_it_expires(self, storage: Storage) -> None:
        await self.create(storage)
        assert len(await self.claim(storage, T0, owner="a")) == 1
        assert await self.claim(storage, T0, owner="b") == []
        assert await self.claim(storage, T0 + LEASE - 1, owner="b") == []
        # The holder itself does not get it twice: that would bump the version under its feet.
        assert await self.claim(storage, T0 + LEASE - 1, owner="a") == []
        (taken,) = await self.claim(storage, T0 + LEASE + 1, owner="b")
        assert taken.id == "p-1"

    async def test_after_expiry_the_new_owner_wins_and_the_stale_owner_loses(
        self, storage: Storage
    ) -> None:
        await self.create(storage)
        (stale,) = await self.claim(storage, T0, owner="a")
        (fresh,) = await self.claim(storage, T0 + LEASE + 1, owner="b")
        assert fresh.version == stale.version + 1
        lost = await storage.compare_and_set(
            _final(stale), expected_version=stale.version, outbox=make_outbox("p-1")
        )
        assert lost is None
        assert await storage.get_outbox("p-1") is None
        won = await storage.compare_and_set(
            replace(fresh, next_check_at=T0 + 100), expected_version=fresh.version
        )
        assert won is not None
        assert won.version == fresh.version + 1

    async def test_cas_releases_the_lease(self, storage: Storage) -> None:
        await self.create(storage)
        (claimed,) = await self.claim(storage, T0, owner="a")
        await self.update(storage, claimed, checks=1)  # still due at T0
        (again,) = await self.claim(storage, T0, owner="b")
        assert again.checks == 1
        assert again.version == claimed.version + 2

    async def test_a_non_owner_cas_wins_over_the_lease_holder(self, storage: Storage) -> None:
        await self.create(storage)
        (claimed,) = await self.claim(storage, T0, owner="a")
        # Say a webhook settles the payout while "a" is still checking its status.
        current = await storage.get("p-1")
        assert current is not None
        await self.update(storage, current, status=PayoutStatus.COMPLETED, next_check_at=None)
        assert await storage.compare_and_set(claimed, expected_version=claimed.version) is None
        assert await self.claim(storage, T0 + LEASE + 1, owner="a") == []

    async def test_rescheduled_payout_is_due_at_its_new_time_only(self, storage: Storage) -> None:
        await self.create(storage)
        (claimed,) = await self.claim(storage, T0)
        await self.update(storage, claimed, next_check_at=T0 + 5)
        assert await self.claim(storage, T0 + 4, owner="b") == []
        (again,) = await self.claim(storage, T0 + 5, owner="b")
        assert again.next_check_at == T0 + 5

    async def test_concurrent_claims_are_disjoint(self, storage: Storage) -> None:
        ids = {f"p-{i:02}" for i in range(30)}
        for i, pid in enumerate(sorted(ids)):
            await self.create(storage, pid, next_check_at=T0 - i)
        batches = await _gather(
            [partial(self.claim, storage, T0, owner=owner, limit=7) for owner in "abcdefgh"]
        )
        claimed = [p.id for batch in batches for p in batch]
        assert len(claimed) == len(set(claimed))
        assert set(claimed) == ids
        for pid in ids:
            fetched = await storage.get(pid)
            assert fetched is not None
            assert fetched.version == 2

    # -- next_due_at --------------------------------------------------------------------------

    async def test_next_due_at_of_an_empty_store_is_none(self, storage: Storage) -> None:
        assert await storage.next_due_at() is None

    async def test_next_due_at_is_the_earliest_non_final_due_time(self, storage: Storage) -> None:
        await self.create(storage, "final", status=PayoutStatus.FAILED, next_check_at=T0 - 100)
        await self.create(storage, "unscheduled", next_check_at=None)
        assert await storage.next_due_at() is None
        await self.create(storage, "later", next_check_at=T0 + 20)
        first = await self.create(storage, "first", next_check_at=T0 + 10)
        assert await storage.next_due_at() == T0 + 10
        # Leased payouts count: their claimer may die.
        (claimed,) = await self.claim(storage, T0 + 10)
        assert await storage.next_due_at() == T0 + 10
        await self.update(storage, claimed, status=PayoutStatus.COMPLETED, next_check_at=None)
        assert await storage.next_due_at() == T0 + 20
        assert first.id == claimed.id

    # -- outbox -------------------------------------------------------------------------------

    async def _with_outbox(self, storage: Storage, payout_id: str, at: float = T0) -> OutboxEntry:
        current = await self.create(storage, payout_id)
        entry = make_outbox(payout_id, at=at)
        await self.update(storage, current, entry, status=entry.status, next_check_at=None)
        return entry

    async def test_get_outbox_of_an_unknown_payout_is_none(self, storage: Storage) -> None:
        await self.create(storage)
        assert await storage.get_outbox("p-1") is None
        assert await storage.get_outbox("nope") is None

    async def test_claim_outbox_takes_due_entries_and_leases_them(self, storage: Storage) -> None:
        a = await self._with_outbox(storage, "a", at=T0 - 5)
        await self._with_outbox(storage, "b", at=T0)
        await self._with_outbox(storage, "c", at=T0 + 1)
        claimed = await self.claim_outbox(storage, T0)
        assert sorted(e.payout_id for e in claimed) == ["a", "b"]
        expected_a = replace(a, next_attempt_at=T0 + LEASE)
        assert next(e for e in claimed if e.payout_id == "a") == expected_a
        assert await storage.get_outbox("a") == expected_a
        assert await self.claim_outbox(storage, T0 + 1, owner="b") == [
            replace(make_outbox("c", at=T0 + 1), next_attempt_at=T0 + 1 + LEASE)
        ]

    async def test_claim_outbox_takes_the_earliest_up_to_limit(self, storage: Storage) -> None:
        for i, pid in enumerate(["e", "d", "c", "b", "a"]):
            await self._with_outbox(storage, pid, at=T0 - 10 + i)
        first = await self.claim_outbox(storage, limit=2)
        assert sorted(e.payout_id for e in first) == ["d", "e"]
        assert await self.claim_outbox(storage, limit=0) == []

    async def test_unacked_outbox_entry_comes_back_after_its_lease(self, storage: Storage) -> None:
        await self._with_outbox(storage, "p-1")
        assert len(await self.claim_outbox(storage, T0, owner="a")) == 1
        assert await self.claim_outbox(storage, T0 + LEASE - 1, owner="b") == []
        assert await self.claim_outbox(storage, T0 + LEASE - 1, owner="a") == []
        (again,) = await self.claim_outbox(storage, T0 + LEASE + 1, owner="b")
        assert again.payout_id == "p-1"
        assert again.attempts == 0  # only retry_outbox counts attempts

    async def test_acked_entry_never_comes_back(self, storage: Storage) -> None:
        entry = await self._with_outbox(storage, "p-1")
        await self.claim_outbox(storage, T0)
        await storage.ack_outbox("p-1", delivered_at=T0 + 1)
        assert await self.claim_outbox(storage, T0 + 10 * LEASE, owner="b") == []
        stored = await storage.get_outbox("p-1")
        assert stored is not None
        assert stored.delivered_at == T0 + 1
        assert (stored.payout_id, stored.status, stored.created_at) == (
            entry.payout_id,
            entry.status,
            entry.created_at,
        )

    async def test_ack_is_idempotent(self, storage: Storage) -> None:
        await self._with_outbox(storage, "p-1")
        await storage.ack_outbox("p-1", delivered_at=T0 + 1)
        first = await storage.get_outbox("p-1")
        await storage.ack_outbox("p-1", delivered_at=T0 + 2)
        assert await storage.get_outbox("p-1") == first
        await storage.ack_outbox("nope", delivered_at=T0)
        assert await storage.get_outbox("nope") is None

    async def test_retry_counts_attempts_and_schedules(self, storage: Storage) -> None:
        entry = await self._with_outbox(storage, "p-1")
        await self.claim_outbox(storage, T0)
        await storage.retry_outbox("p-1", next_attempt_at=T0 + 3, error="HTTP 503")
        assert await storage.get_outbox("p-1") == replace(
            entry, attempts=1, next_attempt_at=T0 + 3, last_error="HTTP 503"
        )
        # The retry released the lease: due again at T0 + 3, long before the lease's end.
        assert await self.claim_outbox(storage, T0 + 2, owner="b") == []
        (again,) = await self.claim_outbox(storage, T0 + 3, owner="b")
        assert again.attempts == 1
        await storage.retry_outbox("p-1", next_attempt_at=T0 + 9, error="timeout")
        stored = await storage.get_outbox("p-1")
        assert stored is not None
        assert (stored.attempts, stored.next_attempt_at, stored.last_error) == (
            2,
            T0 + 9,
            "timeout",
        )

    async def test_retry_of_a_delivered_or_unknown_entry_changes_nothing(
        self, storage: Storage
    ) -> None:
        await self._with_outbox(storage, "p-1")
        await storage.ack_outbox("p-1", delivered_at=T0)
        delivered = await storage.get_outbox("p-1")
        await storage.retry_outbox("p-1", next_attempt_at=T0 + 1, error="late failure report")
        assert await storage.get_outbox("p-1") == delivered
        assert await self.claim_outbox(storage, T0 + 10) == []
        await storage.retry_outbox("nope", next_attempt_at=T0, error="x")
        assert await storage.get_outbox("nope") is None

    async def test_concurrent_outbox_claims_are_disjoint(self, storage: Storage) -> None:
        ids = {f"p-{i:02}" for i in range(20)}
        for pid in sorted(ids):
            await self._with_outbox(storage, pid)
        batches = await _gather(
            [partial(self.claim_outbox, storage, T0, owner=owner, limit=6) for owner in "abcdef"]
        )
        claimed = [e.payout_id for batch in batches for e in batch]
        assert len(claimed) == len(set(claimed))
        assert set(claimed) == ids

    # -- dead-lettered outbox entries -----------------------------------------------------------

    async def test_dead_letter_counts_the_round_and_is_never_claimed(
        self, storage: Storage
    ) -> None:
        entry = await self._with_outbox(storage, "p-1")
        await self.claim_outbox(storage, T0)
        await storage.dead_letter_outbox("p-1", at=T0 + 1, error="HTTP 500, 10th round")
        dead = await storage.get_outbox("p-1")
        assert dead is not None
        assert (dead.payout_id, dead.status, dead.created_at) == (
            entry.payout_id,
            entry.status,
            entry.created_at,
        )
        assert (dead.attempts, dead.last_error, dead.dead_at, dead.delivered_at) == (
            1,
            "HTTP 500, 10th round",
            T0 + 1,
            None,
        )
        # Not even once its lease (released anyway) would have ended.
        assert await self.claim_outbox(storage, T0 + 100 * LEASE, owner="b") == []
        assert await storage.count_dead_outbox() == 1

    async def test_dead_letter_of_a_delivered_dead_or_unknown_entry_changes_nothing(
        self, storage: Storage
    ) -> None:
        await self._with_outbox(storage, "delivered")
        await storage.ack_outbox("delivered", delivered_at=T0)
        delivered = await storage.get_outbox("delivered")
        await storage.dead_letter_outbox("delivered", at=T0 + 1, error="late")
        assert await storage.get_outbox("delivered") == delivered
        await self._with_outbox(storage, "dead")
        await storage.dead_letter_outbox("dead", at=T0 + 1, error="first")
        dead = await storage.get_outbox("dead")
        await storage.dead_letter_outbox("dead", at=T0 + 2, error="second")
        assert await storage.get_outbox("dead") == dead
        await storage.dead_letter_outbox("nope", at=T0, error="x")
        assert await storage.get_outbox("nope") is None
        assert await storage.count_dead_outbox() == 1

    async def test_retry_of_a_dead_entry_keeps_it_dead(self, storage: Storage) -> None:
        await self._with_outbox(storage, "p-1")
        await storage.dead_letter_outbox("p-1", at=T0, error="gave up")
        dead = await storage.get_outbox("p-1")
        await storage.retry_outbox("p-1", next_attempt_at=T0 + 1, error="a stale claimer's retry")
        assert await storage.get_outbox("p-1") == dead
        assert await self.claim_outbox(storage, T0 + 1) == []

    async def test_count_dead_outbox(self, storage: Storage) -> None:
        assert await storage.count_dead_outbox() == 0
        for pid in ("a", "b", "c", "d"):
            await self._with_outbox(storage, pid)
        for pid in ("a", "b", "c"):
            await storage.dead_letter_outbox(pid, at=T0, error="gave up")
        assert await storage.count_dead_outbox() == 3
        assert await storage.requeue_outbox("a", next_attempt_at=T0) is True
        assert await storage.count_dead_outbox() == 2
        assert sorted(e.payout_id for e in await self.claim_outbox(storage, T0)) == ["a", "d"]

    async def test_requeue_makes_a_dead_entry_claimable_and_ack_works(
        self, storage: Storage
    ) -> None:
        entry = await self._with_outbox(storage, "p-1")
        await self.claim_outbox(storage, T0)
        await storage.dead_letter_outbox("p-1", at=T0 + 1, error="HTTP 503")
        assert await storage.requeue_outbox("p-1", next_attempt_at=T0 + 50) is True
        # A fresh delivery schedule (the round counter starts again); the last error stays, as
        # history for the operator.
        requeued = replace(entry, attempts=0, last_error="HTTP 503", next_attempt_at=T0 + 50)
        assert await storage.get_outbox("p-1") == requeued
        assert await storage.count_dead_outbox() == 0
        assert await self.claim_outbox(storage, T0 + 49, owner="b") == []
        (again,) = await self.claim_outbox(storage, T0 + 50, owner="b")
        assert again == replace(requeued, next_attempt_at=T0 + 50 + LEASE)
        await storage.ack_outbox("p-1", delivered_at=T0 + 51)
        delivered = await storage.get_outbox("p-1")
        assert delivered is not None
        assert (delivered.delivered_at, delivered.dead_at) == (T0 + 51, None)
        assert await self.claim_outbox(storage, T0 + 100 * LEASE, owner="c") == []

    async def test_requeue_releases_the_lease(self, storage: Storage) -> None:
        await self._with_outbox(storage, "p-1")
        assert len(await self.claim_outbox(storage, T0, owner="a")) == 1
        assert await storage.requeue_outbox("p-1", next_attempt_at=T0 + 1) is True
        (again,) = await self.claim_outbox(storage, T0 + 1, owner="b")
        assert again.next_attempt_at == T0 + 1 + LEASE

    async def test_requeue_of_a_delivered_entry_pushes_it_again(self, storage: Storage) -> None:
        await self._with_outbox(storage, "p-1")
        await storage.ack_outbox("p-1", delivered_at=T0)
        assert await storage.requeue_outbox("p-1", next_attempt_at=T0 + 5) is True
        stored = await storage.get_outbox("p-1")
        assert stored is not None
        assert (stored.delivered_at, stored.dead_at, stored.next_attempt_at) == (None, None, T0 + 5)
        assert [e.payout_id for e in await self.claim_outbox(storage, T0 + 5)] == ["p-1"]

    async def test_requeue_of_an_unknown_entry_is_false_and_creates_nothing(
        self, storage: Storage
    ) -> None:
        await self.create(storage, "no-entry")
        assert await storage.requeue_outbox("no-entry", next_attempt_at=T0) is False
        assert await storage.requeue_outbox("nope", next_attempt_at=T0) is False
        assert await storage.get_outbox("no-entry") is None
        assert await storage.get_outbox("nope") is None
        assert await self.claim_outbox(storage, T0 + 10) == []
        assert await storage.count_dead_outbox() == 0

    async def test_ack_of_a_dead_entry_marks_it_delivered(self, storage: Storage) -> None:
        # A push that was slow to answer succeeded after all, after another round gave up.
        await self._with_outbox(storage, "p-1")
        await storage.dead_letter_outbox("p-1", at=T0, error="timeout")
        await storage.ack_outbox("p-1", delivered_at=T0 + 2)
        stored = await storage.get_outbox("p-1")
        assert stored is not None
        assert (stored.delivered_at, stored.dead_at) == (T0 + 2, None)
        assert await storage.count_dead_outbox() == 0

    async def test_cas_inserts_an_outbox_entry_with_every_field(self, storage: Storage) -> None:
        current = await self.create(storage)
        entry = replace(
            make_outbox("p-1"), attempts=2, last_error="", dead_at=T0 + 0.5, next_attempt_at=T0 + 1
        )
        await self.update(storage, current, entry, status=entry.status, next_check_at=None)
        assert await storage.get_outbox("p-1") == entry
        assert await storage.count_dead_outbox() == 1
        assert await self.claim_outbox(storage, T0 + 10) == []

    async def test_requeue_gives_a_dead_entry_a_fresh_round_count(self, storage: Storage) -> None:
        await self._with_outbox(storage, "p-1")
        for n in range(3):
            await storage.retry_outbox("p-1", next_attempt_at=T0 + n, error=f"round {n}")
        await storage.dead_letter_outbox("p-1", at=T0 + 5, error="round 3")
        dead = await storage.get_outbox("p-1")
        assert dead is not None
        assert dead.attempts == 4
        assert await storage.requeue_outbox("p-1", next_attempt_at=T0 + 6) is True
        again = await storage.get_outbox("p-1")
        assert again is not None
        assert (again.attempts, again.last_error, again.dead_at) == (0, "round 3", None)
        await storage.retry_outbox("p-1", next_attempt_at=T0 + 7, error="round 1 again")
        retried = await storage.get_outbox("p-1")
        assert retried is not None
        assert retried.attempts == 1

    # -- release_leases -----------------------------------------------------------------------

    async def test_release_leases_makes_the_owners_payouts_claimable_at_once(
        self, storage: Storage
    ) -> None:
        await self.create(storage, "p-1")
        await self.create(storage, "p-2", next_check_at=T0 - 1)
        claimed = await self.claim(storage, T0, owner="a")
        assert len(claimed) == 2
        assert await self.claim(storage, T0 + 1, owner="b") == []
        assert await storage.release_leases("a", T0 + 1) == 2
        for payout in claimed:  # released, not rewritten: version and due time kept
            assert await storage.get(payout.id) == payout
        taken = await self.claim(storage, T0 + 1, owner="b")
        assert [(p.id, p.version) for p in taken] == [("p-2", 3), ("p-1", 3)]
        assert await self.claim(storage, T0 + 2, owner="c") == []  # b's leases hold

    async def test_release_leases_brings_the_owners_outbox_entries_back_now(
        self, storage: Storage
    ) -> None:
        entry = await self._with_outbox(storage, "p-1")
        await self.claim_outbox(storage, T0, owner="a")
        assert await self.claim_outbox(storage, T0 + 1, owner="b") == []
        assert await storage.release_leases("a", T0 + 1) == 1
        # The lease's end was the next attempt: it is now.
        assert await storage.get_outbox("p-1") == replace(entry, next_attempt_at=T0 + 1)
        (again,) = await self.claim_outbox(storage, T0 + 1, owner="b")
        assert again == replace(entry, next_attempt_at=T0 + 1 + LEASE)
        # Outbox calls carry no owner: the old owner's late ack still counts (it did deliver),
        # and the new claimer's report then changes nothing, as after an expired lease.
        await storage.ack_outbox("p-1", delivered_at=T0 + 2)
        await storage.retry_outbox("p-1", next_attempt_at=T0 + 3, error="late")
        assert await storage.get_outbox("p-1") == replace(again, delivered_at=T0 + 2)

    async def test_release_leases_leaves_other_owners_leases_alone(self, storage: Storage) -> None:
        await self.create(storage, "mine")
        await self.create(storage, "theirs")
        await self._with_outbox(storage, "o-mine")
        await self._with_outbox(storage, "o-theirs")
        (mine,) = await self.claim(storage, T0, owner="a", limit=1)
        (theirs,) = await self.claim(storage, T0, owner="b", limit=1)
        assert (mine.id, theirs.id) == ("mine", "theirs")
        (o_mine,) = await self.claim_outbox(storage, T0, owner="a", limit=1)
        (o_theirs,) = await self.claim_outbox(storage, T0, owner="b", limit=1)
        assert (o_mine.payout_id, o_theirs.payout_id) == ("o-mine", "o-theirs")
        assert await storage.release_leases("a", T0 + 1) == 2
        assert [p.id for p in await self.claim(storage, T0 + 1, owner="c")] == ["mine"]
        assert [e.payout_id for e in await self.claim_outbox(storage, T0 + 1, owner="c")] == [
            "o-mine"
        ]
        assert await storage.get("theirs") == theirs
        assert await storage.get_outbox("o-theirs") == o_theirs
        assert await self.claim(storage, T0 + LEASE - 1, owner="c") == []
        assert await self.claim_outbox(storage, T0 + LEASE - 1, owner="c") == []
        done = await storage.compare_and_set(_final(theirs), expected_version=theirs.version)
        assert done is not None

    async def test_after_a_release_the_old_owner_still_wins_until_someone_claims(
        self, storage: Storage
    ) -> None:
        """A release bumps no version: with no claim since, the old owner's compare-and-set
        succeeds, exactly as after its lease ran out."""
        await self.create(storage)
        (claimed,) = await self.claim(storage, T0, owner="a")
        assert await storage.release_leases("a", T0 + 1) == 1
        won = await storage.compare_and_set(
            _final(claimed), expected_version=claimed.version, outbox=make_outbox()
        )
        assert won is not None
        assert won.version == claimed.version + 1
        assert await self.claim(storage, T0 + 1, owner="b") == []

    async def test_after_a_release_and_a_new_claim_the_old_owner_loses(
        self, storage: Storage
    ) -> None:
        """The new claim bumps the version, so the released owner can never write over the
        new claimer's work; releasing the old owner again leaves the new lease alone."""
        await self.create(storage)
        (stale,) = await self.claim(storage, T0, owner="a")
        assert await storage.release_leases("a", T0 + 1) == 1
        (fresh,) = await self.claim(storage, T0 + 1, owner="b")
        assert fresh.version == stale.version + 1
        lost = await storage.compare_and_set(
            _final(stale), expected_version=stale.version, outbox=make_outbox()
        )
        assert lost is None
        assert await storage.get_outbox("p-1") is None
        assert await storage.release_leases("a", T0 + 2) == 0
        assert await self.claim(storage, T0 + 2, owner="c") == []
        won = await storage.compare_and_set(_final(fresh), expected_version=fresh.version)
        assert won is not None

    async def test_release_leases_ignores_leases_already_ended(self, storage: Storage) -> None:
        await self._with_outbox(storage, "retried")
        await self._with_outbox(storage, "acked")
        assert len(await self.claim_outbox(storage, T0, owner="a")) == 2
        await storage.retry_outbox("retried", next_attempt_at=T0 + 50, error="HTTP 503")
        await storage.ack_outbox("acked", delivered_at=T0 + 1)
        await self.create(storage, "rescheduled")
        (claimed,) = await self.claim(storage, T0, owner="a")
        await self.update(storage, claimed, next_check_at=T0 + 60)

        async def state() -> list[Any]:
            return [
                await storage.get_outbox("retried"),
                await storage.get_outbox("acked"),
                await storage.get("rescheduled"),
            ]

        before = await state()
        assert await storage.release_leases("a", T0 + 2) == 0
        assert await state() == before
        assert await self.claim_outbox(storage, T0 + 2, owner="b") == []
        assert await self.claim(storage, T0 + 2, owner="b") == []

    async def test_release_leases_clears_run_out_leases_without_counting_them(
        self, storage: Storage
    ) -> None:
        await self.create(storage)
        entry = await self._with_outbox(storage, "o-1")
        await self.claim(storage, T0, owner="a")
        await self.claim_outbox(storage, T0, owner="a")
        later = T0 + LEASE + 1
        assert await storage.release_leases("a", later) == 0
        assert await storage.get_outbox("o-1") == replace(entry, next_attempt_at=T0 + LEASE)
        assert [p.id for p in await self.claim(storage, later, owner="b")] == ["p-1"]
        assert [e.payout_id for e in await self.claim_outbox(storage, later, owner="b")] == ["o-1"]

    async def test_release_leases_is_idempotent(self, storage: Storage) -> None:
        await self.create(storage)
        await self._with_outbox(storage, "o-1")
        (claimed,) = await self.claim(storage, T0, owner="a")
        await self.claim_outbox(storage, T0, owner="a")
        assert await storage.release_leases("a", T0 + 1) == 2
        released = (await storage.get("p-1"), await storage.get_outbox("o-1"))
        assert await storage.release_leases("a", T0 + 1) == 0
        assert await storage.release_leases("a", T0 + 3) == 0
        assert await storage.release_leases("never-claimed", T0 + 1) == 0
        assert (await storage.get("p-1"), await storage.get_outbox("o-1")) == released
        # The owner may claim again, and that new lease is released like any other.
        (again,) = await self.claim(storage, T0 + 3, owner="a")
        assert again.version == claimed.version + 1
        assert await storage.release_leases("a", T0 + 4) == 1
        assert [p.id for p in await self.claim(storage, T0 + 4, owner="b")] == ["p-1"]

    async def test_release_leases_without_outbox_keeps_the_owners_pushes_leased(
        self, storage: Storage
    ) -> None:
        """``outbox=False`` (an owner only presumed gone): its payouts come back, its pushes
        stay leased until their leases run out, and a later full release still finds them."""
        await self.create(storage)
        await self._with_outbox(storage, "o-1")
        await self.claim(storage, T0, owner="a")
        (held,) = await self.claim_outbox(storage, T0, owner="a")
        assert await storage.release_leases("a", T0 + 1, outbox=False) == 1
        assert [p.id for p in await self.claim(storage, T0 + 1, owner="b")] == ["p-1"]
        assert await self.claim_outbox(storage, T0 + 1, owner="b") == []
        assert await storage.get_outbox("o-1") == held
        assert await storage.release_leases("a", T0 + 2, outbox=False) == 0
        assert await storage.release_leases("a", T0 + 2) == 1
        assert [e.payout_id for e in await self.claim_outbox(storage, T0 + 2, owner="b")] == ["o-1"]

    # -- partner references -------------------------------------------------------------------

    async def test_partner_ref_is_found_by_lookup(self, storage: Storage) -> None:
        created = await self.create(storage, "a", partner_ref="ref-a")
        assert await storage.get_by_partner_ref("ref-a") == created
        assert await storage.get_by_partner_ref("ref-b") is None
        b = await self.create(storage, "b")
        set_later = await self.update(storage, b, partner_ref="ref-b")
        assert await storage.get_by_partner_ref("ref-b") == set_later

    async def test_create_with_a_taken_partner_ref_raises_and_stores_nothing(
        self, storage: Storage
    ) -> None:
        await self.create(storage, "a", partner_ref="ref-1")
        with pytest.raises(PartnerReferenceTaken) as raised:
            await storage.create_if_absent(make_payout("b", partner_ref="ref-1"))
        assert (raised.value.partner_ref, raised.value.holder_id) == ("ref-1", "a")
        assert await storage.get("b") is None
        assert sum((await storage.count_by_status()).values()) == 1
        assert [p.id for p in (await storage.list_payouts(PayoutQuery())).items] == ["a"]
        # An existing id is returned as ever, whatever reference the new record carries.
        existing, created = await storage.create_if_absent(make_payout("a", partner_ref="ref-9"))
        assert (existing.id, existing.partner_ref, created) == ("a", "ref-1", False)

    async def test_cas_with_a_taken_partner_ref_raises_and_writes_nothing(
        self, storage: Storage
    ) -> None:
        a = await self.create(storage, "a", partner_ref="ref-1")
        b = await self.create(storage, "b")
        with pytest.raises(PartnerReferenceTaken) as raised:
            await storage.compare_and_set(
                _final(replace(b, partner_ref="ref-1")),
                expected_version=b.version,
                outbox=make_outbox("b"),
            )
        assert (raised.value.partner_ref, raised.value.holder_id) == ("ref-1", "a")
        assert await storage.get("b") == b
        assert await storage.get_outbox("b") is None
        assert await storage.get_by_partner_ref("ref-1") == a
        assert await storage.count_by_status() == {
            **dict.fromkeys(PayoutStatus, 0),
            PayoutStatus.RECEIVED: 2,
        }
        assert (await storage.list_payouts(PayoutQuery(undelivered_only=True))).items == []
        # Without the reference the same write goes through.
        assert await storage.compare_and_set(_final(b), expected_version=b.version) is not None

    async def test_a_payout_keeps_its_partner_ref(self, storage: Storage) -> None:
        a = await self.create(storage, "a")
        a = await self.update(storage, a, partner_ref="ref-1")
        a = await self.update(storage, a, partner_ref="ref-1", checks=1)  # the same again: fine
        a = await self.update(storage, a, partner_ref=None, checks=2)  # kept for "a"
        found = await storage.get_by_partner_ref("ref-1")
        assert found is not None
        assert (found.id, found.version) == ("a", a.version)
        b = await self.create(storage, "b")
        with pytest.raises(PartnerReferenceTaken):
            await storage.compare_and_set(replace(b, partner_ref="ref-1"), expected_version=1)

    async def test_concurrent_claims_of_one_partner_ref_exactly_one_wins(
        self, storage: Storage
    ) -> None:
        current = [await self.create(storage, f"p-{i}") for i in range(10)]

        async def claim(p: Payout) -> Payout | str | None:
            try:
                return await storage.compare_and_set(
                    replace(p, partner_ref="shared"), expected_version=p.version
                )
            except PartnerReferenceTaken as exc:
                return f"taken by {exc.holder_id}"

        results = await _gather([partial(claim, p) for p in current])
        winners = [r for r in results if isinstance(r, Payout)]
        assert len(winners) == 1
        assert results.count(f"taken by {winners[0].id}") == 9
        assert await storage.get_by_partner_ref("shared") == winners[0]

    # -- listing --------------------------------------------------------------------------------

    @staticmethod
    async def list_all(storage: Storage, query: PayoutQuery) -> list[Payout]:
        """Every page of ``query``, following cursors (bounded, so a broken backend fails)."""
        found: list[Payout] = []
        for _ in range(1000):
            page = await storage.list_payouts(query)
            assert len(page.items) <= query.limit
            found.extend(page.items)
            if page.next_cursor is None:
                return found
            query = replace(query, cursor=page.next_cursor)
        raise AssertionError("the listing never ended")

    async def test_list_is_oldest_first_by_created_at_then_id(self, storage: Storage) -> None:
        created = {"c": T0 - 5, "a": T0 - 5, "b": T0 - 9, "e": T0 - 1, "d": T0 - 5.5}
        for pid, at in created.items():
            await self.create(storage, pid, created_at=at)
        page = await storage.list_payouts(PayoutQuery())
        assert [p.id for p in page.items] == ["b", "d", "a", "c", "e"]
        assert page.next_cursor is None
        assert page.items[0] == await storage.get("b")

    async def test_list_pages_by_cursor(self, storage: Storage) -> None:
        ids = [f"p-{i:02}" for i in range(11)]
        for i, pid in enumerate(ids):
            await self.create(storage, pid, created_at=T0 - 100 + i // 2)  # pairs share a time
        first = await storage.list_payouts(PayoutQuery(limit=4))
        assert [p.id for p in first.items] == ids[:4]
        assert first.next_cursor is not None
        rest = await self.list_all(storage, PayoutQuery(limit=4, cursor=first.next_cursor))
        assert [p.id for p in rest] == ids[4:]
        exact = await storage.list_payouts(PayoutQuery(limit=11))
        assert (len(exact.items), exact.next_cursor) == (11, None)

    async def test_list_filters(self, storage: Storage) -> None:
        conflict = AuditEntry(
            T0 - 1, Cause.WEBHOOK, "conflict", PayoutStatus.COMPLETED, PayoutStatus.COMPLETED,
            "webhook reported declined after final completed", conflict=True,
        )  # fmt: skip
        unknown = await self.create(storage, "unknown", created_at=T0 - 50)
        await self.update(storage, unknown, status=PayoutStatus.UNKNOWN, updated_at=T0 - 40)
        await self.create(storage, "received", created_at=T0 - 45, updated_at=T0 - 45)
        awaiting = await self.create(storage, "awaiting", created_at=T0 - 30)
        await self.update(storage, awaiting, status=PayoutStatus.AWAITING, updated_at=T0 - 2)
        for pid, at, outcome in (
            ("pushed", T0 - 60, "ack"),
            ("pending-push", T0 - 20, None),
            ("dead-push", T0 - 10, "dead"),
        ):
            current = await self.create(storage, pid, created_at=at)
            await self.update(
                storage,
                current,
                make_outbox(pid),
                status=PayoutStatus.COMPLETED,
                next_check_at=None,
                updated_at=at + 1,
                audit=(*current.audit, conflict) if pid != "pending-push" else current.audit,
            )
            if outcome == "ack":
                await storage.ack_outbox(pid, delivered_at=T0)
            elif outcome == "dead":
                await storage.dead_letter_outbox(pid, at=T0, error="gave up")

        async def ids(**filters: Any) -> list[str]:
            return [p.id for p in await self.list_all(storage, PayoutQuery(limit=2, **filters))]

        everything = ["pushed", "unknown", "received", "awaiting", "pending-push", "dead-push"]
        assert await ids() == everything
        assert await ids(statuses={PayoutStatus.UNKNOWN}) == ["unknown"]
        open_ = {PayoutStatus.UNKNOWN, PayoutStatus.AWAITING, PayoutStatus.RECEIVED}
        assert await ids(statuses=open_) == ["unknown", "received", "awaiting"]
        assert await ids(statuses={PayoutStatus.DECLINED}) == []
        assert await ids(created_before=T0 - 30) == ["pushed", "unknown", "received"]
        assert await ids(created_after=T0 - 30) == ["awaiting", "pending-push", "dead-push"]
        assert await ids(created_after=T0 - 50, created_before=T0 - 20) == [
            "unknown",
            "received",
            "awaiting",
        ]
        assert await ids(updated_before=T0 - 40) == ["pushed", "received"]
        assert await ids(updated_after=T0 - 20) == ["awaiting", "pending-push", "dead-push"]
        assert await ids(conflicts_only=True) == ["pushed", "dead-push"]
        assert await ids(undelivered_only=True) == ["pending-push", "dead-push"]
        assert await ids(undelivered_only=True, conflicts_only=True) == ["dead-push"]
        assert await ids(conflicts_only=True, statuses={PayoutStatus.UNKNOWN}) == []
        assert await ids(statuses=open_, updated_after=T0 - 41, created_before=T0 - 35) == [
            "unknown"
        ]
        # Re-queued, a delivered entry is undelivered again.
        assert await storage.requeue_outbox("pushed", next_attempt_at=T0 + 1) is True
        assert await ids(undelivered_only=True) == ["pushed", "pending-push", "dead-push"]

    async def test_list_pages_never_skip_or_repeat_under_concurrent_writes(
        self, storage: Storage
    ) -> None:
        existing = [f"p-{i:02}" for i in range(20)]
        for i, pid in enumerate(existing):
            await self.create(storage, pid, created_at=T0 - 100 + i)
        query = PayoutQuery(limit=3)
        seen: list[str] = []
        n = 0
        while True:
            page = await storage.list_payouts(query)
            seen.extend(p.id for p in page.items)
            # Between pages: new payouts arrive, and listed and unlisted ones change.
            await self.create(storage, f"new-{n}", created_at=T0 + n)
            for pid in (existing[n % 20], existing[(7 * n + 5) % 20]):
                current = await storage.get(pid)
                assert current is not None
                await self.update(
                    storage, current, status=PayoutStatus.AWAITING, updated_at=T0 + n, checks=n
                )
            n += 1
            if page.next_cursor is None or n > 100:
                break
            query = replace(query, cursor=page.next_cursor)
        assert seen[:20] == existing
        assert len(seen) == len(set(seen))

    async def test_list_of_one_status_follows_status_changes(self, storage: Storage) -> None:
        for i in range(6):
            await self.create(storage, f"p-{i}", created_at=T0 - 10 + i)
        for pid in ("p-1", "p-4"):
            current = await storage.get(pid)
            assert current is not None
            await self.update(storage, current, status=PayoutStatus.UNKNOWN)
        unknown = PayoutQuery(statuses={PayoutStatus.UNKNOWN})
        assert [p.id for p in (await storage.list_payouts(unknown)).items] == ["p-1", "p-4"]
        current = await storage.get("p-1")
        assert current is not None
        await self.update(storage, current, status=PayoutStatus.FAILED, next_check_at=None)
        assert [p.id for p in (await storage.list_payouts(unknown)).items] == ["p-4"]
        failed = PayoutQuery(statuses={PayoutStatus.FAILED})
        assert [p.id for p in (await storage.list_payouts(failed)).items] == ["p-1"]
        received = PayoutQuery(statuses={PayoutStatus.RECEIVED})
        assert [p.id for p in (await storage.list_payouts(received)).items] == [
            "p-0",
            "p-2",
            "p-3",
            "p-5",
        ]

    async def test_list_refuses_a_foreign_cursor(self, storage: Storage) -> None:
        with pytest.raises(InvalidRequest, match="cursor"):
            await storage.list_payouts(PayoutQuery(cursor="not-a-cursor"))

    # -- ops_snapshot ---------------------------------------------------------------------------

    async def test_ops_snapshot_of_an_empty_store(self, storage: Storage) -> None:
        snap = await storage.ops_snapshot(T0, late_after=60, failing_after=600)
        assert snap == OpsSnapshot(None, 0, 0, 0, 0)

    async def test_ops_snapshot(self, storage: Storage) -> None:
        conflict = AuditEntry(
            T0 - 1, Cause.WEBHOOK, "conflict", PayoutStatus.COMPLETED, PayoutStatus.COMPLETED,
            "webhook reported declined after final completed", conflict=True,
        )  # fmt: skip
        now = T0 + 3600
        # Open: the oldest created at T0 - 500; two attempts past a 600 s window, one not.
        for pid, created, started in (
            ("old-unknown", T0 - 500, now - 700),
            ("awaiting", T0 - 100, now - 601),
            ("fresh", T0, now - 10),
            ("received", T0 - 50, None),
        ):
            current = await self.create(storage, pid, created_at=created)
            status = PayoutStatus.RECEIVED if started is None else PayoutStatus.UNKNOWN
            await self.update(storage, current, status=status, attempt_started_at=started)
        # Final, created earlier still: not open. Outbox entries in every state.
        for pid, outcome in (
            ("failing", "retried"),
            ("retrying-fresh", "retried"),
            ("first-round", None),
            ("dead", "dead"),
            ("delivered", "ack"),
        ):
            current = await self.create(storage, pid, created_at=T0 - 1000)
            entry_at = now - 60 if pid == "retrying-fresh" else now - 1200
            await self.update(
                storage,
                current,
                make_outbox(pid, at=entry_at),
                status=PayoutStatus.COMPLETED,
                next_check_at=None,
                audit=(*current.audit, conflict) if pid in ("dead", "delivered") else current.audit,
            )
            if outcome == "retried":
                await storage.retry_outbox(pid, next_attempt_at=now + 5, error="HTTP 503")
            elif outcome == "dead":
                await storage.dead_letter_outbox(pid, at=now - 5, error="gave up")
            elif outcome == "ack":
                await storage.ack_outbox(pid, delivered_at=now - 1)
        snap = await storage.ops_snapshot(now, late_after=600, failing_after=600)
        assert snap == OpsSnapshot(
            oldest_open_age=now - (T0 - 500),
            open_past_window=2,
            conflicts=2,
            outbox_failing=1,
            outbox_dead=1,
        )
        # Settled, a payout is no longer open; re-queued, a failing push starts afresh.
        settled = await storage.get("old-unknown")
        assert settled is not None
        await self.update(storage, settled, status=PayoutStatus.FAILED, next_check_at=None)
        await storage.requeue_outbox("failing", next_attempt_at=now)
        snap = await storage.ops_snapshot(now, late_after=600, failing_after=600)
        assert (snap.oldest_open_age, snap.open_past_window, snap.outbox_failing) == (
            now - (T0 - 100),
            1,
            0,
        )

    # -- prune ----------------------------------------------------------------------------------

    async def test_prune_deletes_old_settled_payouts_only(self, storage: Storage) -> None:
        before = T0 - 100
        for pid, updated, outcome in (
            ("old-delivered", before - 1, "ack"),
            ("old-no-entry", before - 2, "none"),
            ("old-undelivered", before - 3, "pending"),
            ("old-dead", before - 4, "dead"),
            ("recent", before + 1, "ack"),
        ):
            current = await self.create(storage, pid, partner_ref=f"ref-{pid}")
            entry = None if outcome == "none" else make_outbox(pid)
            await self.update(
                storage,
                current,
                entry,
                status=PayoutStatus.DECLINED,
                next_check_at=None,
                updated_at=updated,
            )
            if outcome == "ack":
                await storage.ack_outbox(pid, delivered_at=updated)
            elif outcome == "dead":
                await storage.dead_letter_outbox(pid, at=updated, error="gave up")
        await self.create(storage, "open", status=PayoutStatus.UNKNOWN, updated_at=before - 50)
        assert await storage.prune(before, dry_run=True, limit=100) == 2
        assert await storage.prune(before, dry_run=True, limit=1) == 1
        assert len((await storage.list_payouts(PayoutQuery())).items) == 6  # dry: nothing gone
        assert await storage.prune(before, dry_run=False, limit=1) == 1
        assert await storage.prune(before, dry_run=False, limit=100) == 1
        assert await storage.prune(before, dry_run=False, limit=100) == 0
        for pid in ("old-delivered", "old-no-entry"):
            assert await storage.get(pid) is None
            assert await storage.get_outbox(pid) is None
            assert await storage.get_by_partner_ref(f"ref-{pid}") is None
        left = [p.id for p in (await storage.list_payouts(PayoutQuery())).items]
        assert sorted(left) == ["old-dead", "old-undelivered", "open", "recent"]
        assert (await storage.count_by_status())[PayoutStatus.DECLINED] == 3
        final = PayoutQuery(statuses={PayoutStatus.DECLINED}, limit=10)
        assert len((await storage.list_payouts(final)).items) == 3
        assert await storage.claim_outbox(T0, owner="a", lease_seconds=LEASE, limit=10) != []
        # A pruned id is forgotten: submitted again, it is a new payout.
        again, created = await storage.create_if_absent(make_payout("old-delivered"))
        assert (created, again.version) == (True, 1)
        assert await storage.prune(before, dry_run=False, limit=0) == 0

    # -- count_by_status ----------------------------------------------------------------------

    async def test_count_by_status(self, storage: Storage) -> None:
        def nonzero(counts: dict[PayoutStatus, int]) -> dict[PayoutStatus, int]:
            assert all(isinstance(k, PayoutStatus) for k in counts)
            return {k: v for k, v in counts.items() if v}

        assert nonzero(await storage.count_by_status()) == {}
        for i in range(3):
            await self.create(storage, f"r-{i}")
        a = await self.create(storage, "a")
        b = await self.create(storage, "b")
        await self.update(storage, a, status=PayoutStatus.AWAITING)
        await self.update(storage, b, status=PayoutStatus.DECLINED, next_check_at=None)
        await self.claim(storage)  # claims change no status
        assert nonzero(await storage.count_by_status()) == {
            PayoutStatus.RECEIVED: 3,
            PayoutStatus.AWAITING: 1,
            PayoutStatus.DECLINED: 1,
        }

    # -- instance liveness --------------------------------------------------------------------

    async def test_beat_then_instances_shows_the_mark(self, storage: Storage) -> None:
        assert await storage.instances() == {}
        await storage.beat("instance-a", T0 + 0.1)
        await storage.beat("instance-b", 12.5)  # a monotonic clock's mark: any float
        assert await storage.instances() == {"instance-a": T0 + 0.1, "instance-b": 12.5}
        assert sum((await storage.count_by_status()).values()) == 0  # no payout involved

    async def test_a_second_beat_replaces_the_mark(self, storage: Storage) -> None:
        await storage.beat("instance-a", T0)
        await storage.beat("instance-b", T0)
        await storage.beat("instance-a", T0 + 1.25)
        assert await storage.instances() == {"instance-a": T0 + 1.25, "instance-b": T0}
        await storage.beat("instance-a", T0 - 3.0)  # only change counts, not direction
        assert (await storage.instances())["instance-a"] == T0 - 3.0

    async def test_forget_instance_removes_it_and_is_idempotent(self, storage: Storage) -> None:
        await storage.beat("instance-a", T0)
        await storage.beat("instance-b", T0 + 1)
        await storage.forget_instance("instance-a")
        assert await storage.instances() == {"instance-b": T0 + 1}
        await storage.forget_instance("instance-a")
        await storage.forget_instance("never-beat")
        assert await storage.instances() == {"instance-b": T0 + 1}
        await storage.beat("instance-a", T0 + 2)  # a restart under the same name
        assert await storage.instances() == {"instance-a": T0 + 2, "instance-b": T0 + 1}

    async def test_instances_survive_close_and_open(self, storage: Storage) -> None:
        await storage.beat("instance-a", T0)
        await storage.close()
        await storage.open()
        assert await storage.instances() == {"instance-a": T0}

    async def test_fifty_concurrent_beats_of_different_ids_are_all_visible(
        self, storage: Storage
    ) -> None:
        await _gather([partial(storage.beat, f"instance-{i:02}", T0 + i) for i in range(50)])
        assert await storage.instances() == {f"instance-{i:02}": T0 + i for i in range(50)}

    # -- the client on this backend ------------------------------------------------------

    async def test_fifty_concurrent_submits_across_clients_make_one_payout_and_one_post(
        self, storage: Storage
    ) -> None:
        from contextlib import AsyncExitStack

        from .._client import PayoutClient
        from ._fake_partner import FakePartner, Script

        partner = FakePartner(script=lambda _id, _n: Script(answer_delay=0.0, webhook=False))
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(partner)
            clients = [
                await stack.enter_async_context(
                    PayoutClient(
                        storage=storage,
                        partner=partner,
                        webhook_url="http://service/webhook",
                        background=False,
                        close_storage=False,
                        instance_id=f"instance-{i}",
                    )
                )
                for i in range(5)
            ]
            replayed: list[bool] = []

            async def submit(n: int) -> None:
                result = await clients[n % 5].submit({"id": "same", "amount": 42})
                replayed.append(result.replayed)

            async with anyio.create_task_group() as tg:
                for n in range(50):
                    tg.start_soon(submit, n)
            final = await clients[0].wait_final("same", 10)
        assert sorted(replayed) == [False] + [True] * 49
        assert partner.reached("same") == 1
        assert final.status is PayoutStatus.COMPLETED
        assert final.request == {"id": "same", "amount": 42}


class MultiInstanceContract:
    """The decisions of :class:`StorageContract` raced across several storage objects on one
    database (one file, schema or key prefix), each with its own connections, as separate
    processes would be: atomicity must come from the database, not from one object.

    Needs an ``open_instances`` fixture (an :data:`OpenInstances`): ``await open_instances(n)``
    returns ``n`` newly opened objects on one fresh, empty database, closed after the test.
    MemoryStorage cannot run it: each of its objects is a database of its own.
    """

    pytestmark = pytest.mark.anyio

    INSTANCES = 4
    ROUNDS = 20

    async def test_instances_race_create_and_exactly_one_wins(
        self, open_instances: OpenInstances
    ) -> None:
        stores = await open_instances(self.INSTANCES)
        n = len(stores)
        for r in range(self.ROUNDS):
            pid = f"p-{r:02}"
            results = await _gather(
                [
                    partial(stores[i % n].create_if_absent, make_payout(pid, fingerprint=f"{i}"))
                    for i in range(3 * n)
                ]
            )
            winners = [stored for stored, created in results if created]
            assert len(winners) == 1, f"round {r}: {len(winners)} creations"
            assert winners[0].version == 1
            assert all(stored == winners[0] for stored, _ in results), f"round {r}"
            for store in stores:
                assert await store.get(pid) == winners[0], f"round {r}"
        for store in stores:
            counts = await store.count_by_status()
            assert counts[PayoutStatus.RECEIVED] == self.ROUNDS
            assert sum(counts.values()) == self.ROUNDS

    async def test_instances_race_compare_and_set_and_exactly_one_wins(
        self, open_instances: OpenInstances
    ) -> None:
        stores = await open_instances(self.INSTANCES)
        n = len(stores)
        statuses = [PayoutStatus.COMPLETED, PayoutStatus.DECLINED, PayoutStatus.FAILED]
        won: list[Payout] = []
        for r in range(self.ROUNDS // 2):
            v1 = await StorageContract.create(stores[r % n], f"p-{r:02}")
            results = await _gather(
                [
                    partial(
                        stores[i % n].compare_and_set,
                        _final(v1, statuses[i % 3]),
                        expected_version=1,
                        outbox=make_outbox(v1.id, status=statuses[i % 3], at=T0 + i),
                    )
                    for i in range(3 * n)
                ]
            )
            winners = [p for p in results if p is not None]
            assert len(winners) == 1, f"round {r}: {len(winners)} winners"
            assert winners[0].version == 2
            for store in stores:
                assert await store.get(v1.id) == winners[0], f"round {r}"
                entry = await store.get_outbox(v1.id)
                assert entry is not None
                assert entry.status == winners[0].status, f"round {r}: outbox of a loser"
            won.append(winners[0])
        expected = {s: sum(1 for p in won if p.status is s) for s in PayoutStatus}
        for store in stores:
            assert await store.count_by_status() == expected

    async def test_claims_across_instances_are_disjoint(
        self, open_instances: OpenInstances
    ) -> None:
        stores = await open_instances(3)
        ids = [f"p-{i:03}" for i in range(60)]
        for i, pid in enumerate(ids):
            stored = await StorageContract.create(stores[i % 3], pid, next_check_at=T0 - i)
            if i % 2:  # half of them final, with an outbox entry instead
                await StorageContract.update(
                    stores[(i + 1) % 3],
                    stored,
                    make_outbox(pid, at=T0 - i),
                    status=PayoutStatus.COMPLETED,
                    next_check_at=None,
                )
        claimed: list[str] = []
        pushed: list[str] = []

        async def drain(store: Storage, owner: str) -> None:
            for _ in range(len(ids)):  # bounded: a broken backend fails instead of hanging
                batch = await store.claim_due(T0, owner=owner, lease_seconds=LEASE, limit=4)
                entries = await store.claim_outbox(T0, owner=owner, lease_seconds=LEASE, limit=3)
                if not batch and not entries:
                    return
                claimed.extend(p.id for p in batch)
                pushed.extend(e.payout_id for e in entries)

        async with anyio.create_task_group() as tg:
            for n, store in enumerate(stores):
                tg.start_soon(drain, store, f"w{n}a")
                tg.start_soon(drain, store, f"w{n}b")
        assert len(claimed) == len(set(claimed)), "a payout was claimed twice"
        assert set(claimed) == set(ids[0::2])
        assert len(pushed) == len(set(pushed)), "an outbox entry was claimed twice"
        assert set(pushed) == set(ids[1::2])
        for pid in ids[0::2]:
            fetched = await stores[2].get(pid)
            assert fetched is not None
            assert fetched.version == 2

    async def test_stale_owner_loses_after_another_instance_takes_over_its_lease(
        self, open_instances: OpenInstances
    ) -> None:
        a, b = await open_instances(2)
        await StorageContract.create(a, "p-1")
        (stale,) = await StorageContract.claim(a, T0, owner="a")
        assert await StorageContract.claim(b, T0 + LEASE - 1, owner="b") == []
        (fresh,) = await StorageContract.claim(b, T0 + LEASE + 1, owner="b")
        assert fresh.version == stale.version + 1 == 3
        lost = await a.compare_and_set(
            _final(stale), expected_version=stale.version, outbox=make_outbox()
        )
        assert lost is None
        assert await b.get_outbox("p-1") is None
        won = await StorageContract.update(
            b,
            fresh,
            make_outbox(status=PayoutStatus.DECLINED),
            status=PayoutStatus.DECLINED,
            next_check_at=None,
        )
        assert await a.get("p-1") == won
        assert await a.get_outbox("p-1") == make_outbox(status=PayoutStatus.DECLINED)

    async def test_a_release_through_other_instances_frees_what_one_instance_claimed(
        self, open_instances: OpenInstances
    ) -> None:
        a, b, c = await open_instances(3)
        for i in range(6):
            await StorageContract.create(a, f"p-{i}", next_check_at=T0 - i)
        for i in range(4):
            current = await StorageContract.create(a, f"o-{i}")
            await StorageContract.update(
                a, current, make_outbox(f"o-{i}"), status=PayoutStatus.COMPLETED, next_check_at=None
            )
        await StorageContract.create(b, "alive", next_check_at=T0 - 10)
        (alive,) = await StorageContract.claim(b, T0, owner="alive", limit=1)
        stale = await StorageContract.claim(a, T0, owner="gone")
        assert len(stale) == 6
        assert len(await StorageContract.claim_outbox(a, T0, owner="gone")) == 4
        # Two instances release the same owner at once: every lease is released once.
        counts = await _gather(
            [partial(b.release_leases, "gone", T0 + 1), partial(c.release_leases, "gone", T0 + 1)]
        )
        assert sum(counts) == 10, counts
        taken = await StorageContract.claim(c, T0 + 1, owner="c")
        assert [p.id for p in taken] == [p.id for p in stale]
        entries = await StorageContract.claim_outbox(c, T0 + 1, owner="c")
        assert sorted(e.payout_id for e in entries) == [f"o-{i}" for i in range(4)]
        lost = await a.compare_and_set(_final(stale[0]), expected_version=stale[0].version)
        assert lost is None
        assert await a.get("alive") == alive  # another owner's lease: untouched
        assert await b.compare_and_set(_final(alive), expected_version=alive.version) is not None

    async def test_a_dead_letter_holds_for_every_instance(
        self, open_instances: OpenInstances
    ) -> None:
        a, b = await open_instances(2)
        current = await StorageContract.create(a, "p-1")
        await StorageContract.update(
            a, current, make_outbox(), status=PayoutStatus.COMPLETED, next_check_at=None
        )
        assert len(await StorageContract.claim_outbox(a, T0, owner="a")) == 1
        await a.dead_letter_outbox("p-1", at=T0 + 1, error="gave up")
        assert await StorageContract.claim_outbox(b, T0 + 100 * LEASE, owner="b") == []
        assert await b.count_dead_outbox() == 1
        assert await b.requeue_outbox("p-1", next_attempt_at=T0 + 2) is True
        (again,) = await StorageContract.claim_outbox(a, T0 + 2, owner="a")
        assert again.payout_id == "p-1"
        assert await a.count_dead_outbox() == 0

    async def test_instances_see_each_others_beats(self, open_instances: OpenInstances) -> None:
        a, b = await open_instances(2)
        await a.beat("instance-a", T0)
        assert await b.instances() == {"instance-a": T0}
        await b.beat("instance-b", T0 + 5)
        await b.beat("instance-a", T0 + 1)  # one instance's beat written through another
        assert await a.instances() == {"instance-a": T0 + 1, "instance-b": T0 + 5}
        await a.forget_instance("instance-b")  # its leftovers were taken over
        assert await b.instances() == {"instance-a": T0 + 1}

    async def test_concurrent_beats_across_instances_are_all_visible(
        self, open_instances: OpenInstances
    ) -> None:
        stores = await open_instances(self.INSTANCES)
        n = len(stores)
        await _gather(
            [partial(stores[i % n].beat, f"instance-{i:02}", T0 + i / 8) for i in range(50)]
        )
        expected = {f"instance-{i:02}": T0 + i / 8 for i in range(50)}
        for store in stores:
            assert await store.instances() == expected
