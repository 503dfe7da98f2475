"""In-process storage: plain dicts, for tests and single-process experiments.

Every operation makes its decision without awaiting in between, so on one event loop it is as
atomic as a database transaction (the contract suite checks this with concurrent callers). The
data lives as long as the object: ``close`` and ``open`` again keep it.
"""

from __future__ import annotations

import copy
import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from anyio.lowlevel import checkpoint

from .._model import OutboxEntry, Payout, PayoutStatus

__all__ = ["MemoryStorage"]

_Key = Callable[[str], float | None]


class _DueIndex:
    """A min-heap of ``(due_time, id)`` with lazy deletion.

    An entry is live while ``key_of(id)`` still equals its due time; stale entries are dropped
    when they surface, and the heap is rebuilt from ``live()`` once it holds more than twice as
    many entries as there are records.
    """

    __slots__ = ("_heap", "_key_of", "_live", "_size")

    def __init__(
        self,
        key_of: _Key,
        live: Callable[[], Iterable[tuple[float, str]]],
        size: Callable[[], int],
    ) -> None:
        self._heap: list[tuple[float, str]] = []
        self._key_of = key_of
        self._live = live
        self._size = size

    def push(self, key: float | None, item: str) -> None:
        if key is None:
            return
        heapq.heappush(self._heap, (key, item))
        if len(self._heap) > 2 * self._size() + 64:
            self._heap = list(self._live())
            heapq.heapify(self._heap)

    def earliest(self) -> float | None:
        heap = self._heap
        while heap:
            key, item = heap[0]
            if self._key_of(item) == key:
                return key
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float, limit: int, take: Callable[[str], bool]) -> None:
        """Remove live entries due by ``now``, earliest first, handing each id to ``take``,
        until ``limit`` of them were accepted. ``take`` must index its id again as it sees fit.
        """
        # No local alias of self._heap: take() may push, and a push may rebuild the heap.
        again: list[tuple[float, str]] = []
        seen: set[str] = set()
        taken = 0
        while self._heap and taken < limit and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if self._key_of(entry[1]) != entry[0]:
                continue
            if entry[1] in seen:  # a duplicate, or an entry that take() pushed: not ours
                again.append(entry)
                continue
            seen.add(entry[1])
            if take(entry[1]):
                taken += 1
        for entry in again:
            heapq.heappush(self._heap, entry)


def _copy(value: Any) -> Any:
    """A deep copy, fast for the JSON-like data that payout requests hold."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    return copy.deepcopy(value)


class MemoryStorage:
    """The :class:`~resilient_payout.storage.Storage` contract in memory (``memory://``).

    Records are frozen dataclasses, so only their ``request`` dict is copied in and out. Due work
    is found through heaps, so a claim costs O(claimed · log n) however many payouts are stored
    or leased.
    """

    def __init__(self) -> None:
        self._payouts: dict[str, Payout] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        """Claimed payouts: owner and lease end. Dropped by the next compare-and-set."""
        self._counts: Counter[PayoutStatus] = Counter()
        self._outbox: dict[str, OutboxEntry] = {}
        self._dead: set[str] = set()
        size = self._payouts.__len__
        # Three views of the due payouts: every one (for next_due_at), the claimable candidates
        # (a claim moves its payouts out), and the leased ones by lease end (an expired lease
        # moves its payout back among the candidates). Claims so never rescan in-flight work.
        self._scheduled = _DueIndex(self._due_key, self._live_due, size)
        self._ready = _DueIndex(self._due_key, self._live_due, size)
        self._leased = _DueIndex(self._lease_key, self._live_leases, size)
        self._outbox_due = _DueIndex(self._outbox_key, self._live_outbox, self._outbox.__len__)

    # -- index keys ---------------------------------------------------------------------------

    def _due_key(self, payout_id: str) -> float | None:
        p = self._payouts.get(payout_id)
        if p is None or p.status.is_final:
            return None
        return p.next_check_at

    def _live_due(self) -> Iterable[tuple[float, str]]:
        for pid, p in self._payouts.items():
            if p.next_check_at is not None and not p.status.is_final:
                yield p.next_check_at, pid

    def _lease_key(self, payout_id: str) -> float | None:
        lease = self._leases.get(payout_id)
        return None if lease is None else lease[1]

    def _live_leases(self) -> Iterable[tuple[float, str]]:
        for pid, (_, until) in self._leases.items():
            yield until, pid

    def _outbox_key(self, payout_id: str) -> float | None:
        e = self._outbox.get(payout_id)
        if e is None or e.delivered_at is not None or e.dead_at is not None:
            return None
        return e.next_attempt_at

    def _live_outbox(self) -> Iterable[tuple[float, str]]:
        for pid, e in self._outbox.items():
            if e.delivered_at is None and e.dead_at is None:
                yield e.next_attempt_at, pid

    @staticmethod
    def _out(payout: Payout) -> Payout:
        return replace(payout, request=_copy(payout.request))

    # -- the contract -------------------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to connect to."""
        await checkpoint()

    async def close(self) -> None:
        """Keeps the data: the object is the database."""
        await checkpoint()

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        await checkpoint()
        existing = self._payouts.get(payout.id)
        if existing is not None:
            return self._out(existing), False
        stored = replace(payout, version=1, request=_copy(payout.request))
        self._payouts[payout.id] = stored
        self._counts[stored.status] += 1
        key = self._due_key(payout.id)
        self._scheduled.push(key, payout.id)
        self._ready.push(key, payout.id)
        return self._out(stored), True

    async def get(self, payout_id: str) -> Payout | None:
        await checkpoint()
        p = self._payouts.get(payout_id)
        return None if p is None else self._out(p)

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        if outbox is not None and outbox.payout_id != payout.id:
            raise ValueError(f"outbox entry for {outbox.payout_id!r} given with {payout.id!r}")
        await checkpoint()
        current = self._payouts.get(payout.id)
        if current is None or current.version != expected_version:
            return None
        old_key = self._due_key(payout.id)
        stored = replace(payout, version=expected_version + 1, request=_copy(payout.request))
        self._payouts[payout.id] = stored
        was_leased = self._leases.pop(payout.id, None) is not None
        self._counts[current.status] -= 1
        self._counts[stored.status] += 1
        new_key = self._due_key(payout.id)
        if new_key != old_key:
            self._scheduled.push(new_key, payout.id)
        if new_key != old_key or was_leased:  # a claim took it out of the candidates
            self._ready.push(new_key, payout.id)
        if outbox is not None and outbox.payout_id not in self._outbox:
            self._outbox[outbox.payout_id] = outbox
            self._outbox_due.push(self._outbox_key(outbox.payout_id), outbox.payout_id)
            if outbox.dead_at is not None:
                self._dead.add(outbox.payout_id)
        return self._out(stored)

    async def claim_due(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Payout]:
        await checkpoint()
        until = now + lease_seconds
        claimed: list[Payout] = []

        def expire(payout_id: str) -> bool:
            self._ready.push(self._due_key(payout_id), payout_id)
            return True

        def claim(payout_id: str) -> bool:
            lease = self._leases.get(payout_id)
            if lease is not None and lease[1] > now:  # only if `now` went back in time
                self._leased.push(lease[1], payout_id)
                return False
            p = self._payouts[payout_id]
            p = replace(p, version=p.version + 1)
            self._payouts[payout_id] = p
            self._leases[payout_id] = (owner, until)
            self._leased.push(until, payout_id)
            claimed.append(p)
            return True

        self._leased.pop_due(now, len(self._leases), expire)
        self._ready.pop_due(now, limit, claim)
        return [self._out(p) for p in claimed]

    async def next_due_at(self) -> float | None:
        await checkpoint()
        return self._scheduled.earliest()

    async def claim_outbox(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[OutboxEntry]:
        await checkpoint()
        until = now + lease_seconds
        claimed: list[OutboxEntry] = []

        # The lease is the moved next_attempt_at itself: nothing else to record per entry.
        def claim(payout_id: str) -> bool:
            e = replace(self._outbox[payout_id], next_attempt_at=until)
            self._outbox[payout_id] = e
            self._outbox_due.push(until, payout_id)
            claimed.append(e)
            return True

        self._outbox_due.pop_due(now, limit, claim)
        return claimed

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is not None and e.delivered_at is None:
            self._outbox[payout_id] = replace(e, delivered_at=delivered_at, dead_at=None)
            self._dead.discard(payout_id)

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is None or e.delivered_at is not None or e.dead_at is not None:
            return
        self._outbox[payout_id] = replace(
            e, attempts=e.attempts + 1, next_attempt_at=next_attempt_at, last_error=error
        )
        self._outbox_due.push(next_attempt_at, payout_id)

    async def dead_letter_outbox(self, payout_id: str, *, at: float, error: str) -> None:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is None or e.delivered_at is not None or e.dead_at is not None:
            return
        # Its heap entry goes stale (the key is None now) and is dropped when it surfaces.
        self._outbox[payout_id] = replace(e, attempts=e.attempts + 1, last_error=error, dead_at=at)
        self._dead.add(payout_id)

    async def requeue_outbox(self, payout_id: str, *, next_attempt_at: float) -> bool:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is None:
            return False
        self._outbox[payout_id] = replace(
            e, next_attempt_at=next_attempt_at, delivered_at=None, dead_at=None
        )
        self._dead.discard(payout_id)
        self._outbox_due.push(next_attempt_at, payout_id)
        return True

    async def count_dead_outbox(self) -> int:
        await checkpoint()
        return len(self._dead)

    async def get_outbox(self, payout_id: str) -> OutboxEntry | None:
        await checkpoint()
        return self._outbox.get(payout_id)

    async def count_by_status(self) -> dict[PayoutStatus, int]:
        await checkpoint()
        return {s: self._counts[s] for s in PayoutStatus}
