"""In-process storage: plain dicts, for tests and single-process experiments.

Every operation makes its decision without awaiting in between, so on one event loop it is as
atomic as a database transaction (the contract suite checks this with concurrent callers). The
data lives as long as the object: ``close`` and ``open`` again keep it.
"""

from __future__ import annotations

import copy
import heapq
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any, Final

from anyio.lowlevel import checkpoint

from .._errors import PartnerReferenceTaken
from .._model import OutboxEntry, Payout, PayoutStatus
from ._query import OpsSnapshot, PayoutPage, PayoutQuery, has_conflict, page_of

__all__ = ["MemoryStorage"]

_Key = Callable[[str], float | None]
_Pos = tuple[float, str]
"""A payout's place in listings: ``(created_at, id)``."""
_LOAD: Final = 512


class _SortedKeys:
    """A sorted set of positions kept as sublists of at most ``2 * _LOAD`` items, so adding or
    removing one costs O(log n + _LOAD) however many there are (one flat sorted list would
    move n pointers per insert in the middle)."""

    __slots__ = ("_lists", "_maxes", "_size")

    def __init__(self) -> None:
        self._lists: list[list[_Pos]] = []
        self._maxes: list[_Pos] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, key: _Pos) -> None:
        if not self._lists:
            self._lists, self._maxes, self._size = [[key]], [key], 1
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):  # after everything: the common case, ids arrive in time order
            i -= 1
            self._lists[i].append(key)
            self._maxes[i] = key
        else:
            sub = self._lists[i]
            j = bisect_left(sub, key)
            if j < len(sub) and sub[j] == key:
                return
            sub.insert(j, key)
        self._size += 1
        sub = self._lists[i]
        if len(sub) > 2 * _LOAD:
            self._lists[i : i + 1] = [sub[:_LOAD], sub[_LOAD:]]
            self._maxes[i : i + 1] = [sub[_LOAD - 1], sub[-1]]

    def discard(self, key: _Pos) -> None:
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return
        sub = self._lists[i]
        j = bisect_left(sub, key)
        if j == len(sub) or sub[j] != key:
            return
        del sub[j]
        self._size -= 1
        if not sub:
            del self._lists[i]
            del self._maxes[i]
        elif j == len(sub):
            self._maxes[i] = sub[-1]

    def first(self) -> _Pos | None:
        return self._lists[0][0] if self._lists else None

    def count_before(self, key: _Pos) -> int:
        """How many positions sort before ``key``: O(n / _LOAD + log n)."""
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            return self._size
        return sum(len(sub) for sub in self._lists[:i]) + bisect_left(self._lists[i], key)

    def after(self, key: _Pos | None) -> Iterator[_Pos]:
        """The positions after ``key`` (all of them for None), in order. No change may be made
        while iterating."""
        i, j = 0, 0
        if key is not None:
            i = bisect_right(self._maxes, key)
            if i == len(self._maxes):
                return
            j = bisect_right(self._lists[i], key)
        for sub in self._lists[i:]:
            for n in range(j, len(sub)):
                yield sub[n]
            j = 0


def _pos(payout: Payout) -> _Pos:
    return payout.created_at, payout.id


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
        self._owned: dict[str, set[str]] = {}
        """Owner -> the payouts of ``_leases`` it holds (for ``release_leases``)."""
        self._outbox_leases: dict[str, tuple[str, float]] = {}
        """Claimed outbox entries: owner and lease end (claims go by ``next_attempt_at``; this
        is for ``release_leases``). Dropped by an ack, retry, dead-lettering or re-queue."""
        self._outbox_owned: dict[str, set[str]] = {}
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
        # Listing indexes by (created_at, id), maintained with every write.
        self._by_created = _SortedKeys()
        self._by_status = {s: _SortedKeys() for s in PayoutStatus}
        self._conflicts = _SortedKeys()
        self._undelivered = _SortedKeys()
        """Payouts whose outbox entry is not delivered (dead or not)."""
        self._attempts = _SortedKeys()
        """Open payouts by ``(attempt_started_at, id)``."""
        self._refs: dict[str, str] = {}
        """Partner reference -> the id of the payout holding it."""
        self._ref_of: dict[str, str] = {}
        """Payout id -> the partner reference stored for it."""
        self._marks: dict[str, float] = {}
        """Instance id -> its latest heartbeat mark."""

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

    def _check_ref(self, payout: Payout) -> None:
        ref = payout.partner_ref
        if ref is not None:
            holder = self._refs.get(ref)
            if holder is not None and holder != payout.id:
                raise PartnerReferenceTaken(ref, holder)

    def _index(self, old: Payout | None, new: Payout | None) -> None:
        """Move a payout's listing index entries from ``old`` to ``new`` (None: absent)."""
        if old is not None and old.attempt_started_at is not None:
            self._attempts.discard((old.attempt_started_at, old.id))
        if new is not None and new.attempt_started_at is not None and not new.is_final:
            self._attempts.add((new.attempt_started_at, new.id))
        if old is not None and (new is None or _pos(old) != _pos(new)):
            key = _pos(old)
            for index in (self._by_created, self._by_status[old.status]):
                index.discard(key)
            self._conflicts.discard(key)
            self._undelivered.discard(key)
            old = None
        if new is None:
            return
        key = _pos(new)
        if old is None:
            self._by_created.add(key)
            self._by_status[new.status].add(key)
        elif old.status is not new.status:
            self._by_status[old.status].discard(key)
            self._by_status[new.status].add(key)
        if has_conflict(new):
            self._conflicts.add(key)  # the audit only grows: never removed but with the payout
        if self._undelivered_entry(new.id):
            self._undelivered.add(key)
        ref = new.partner_ref
        if ref is not None and self._ref_of.get(new.id) != ref:
            # The stored reference follows the record; a record without one keeps it.
            previous = self._ref_of.get(new.id)
            if previous is not None:
                self._refs.pop(previous, None)
            self._refs[ref] = new.id
            self._ref_of[new.id] = ref

    def _undelivered_entry(self, payout_id: str) -> bool:
        e = self._outbox.get(payout_id)
        return e is not None and e.delivered_at is None

    @staticmethod
    def _lease(
        leases: dict[str, tuple[str, float]],
        owned: dict[str, set[str]],
        item: str,
        lease: tuple[str, float] | None,
    ) -> tuple[str, float] | None:
        """Give ``item`` the lease ``lease`` (None: none) in ``leases``, keeping the per-owner
        sets ``owned`` in step; the lease it had, if any."""
        old = leases.pop(item, None)
        if old is not None:
            held = owned[old[0]]
            held.discard(item)
            if not held:
                del owned[old[0]]
        if lease is not None:
            leases[item] = lease
            owned.setdefault(lease[0], set()).add(item)
        return old

    def _lease_payout(self, payout_id: str, lease: tuple[str, float] | None) -> bool:
        """Set or drop a payout's lease; whether it had one."""
        return self._lease(self._leases, self._owned, payout_id, lease) is not None

    def _lease_entry(self, payout_id: str, lease: tuple[str, float] | None) -> None:
        self._lease(self._outbox_leases, self._outbox_owned, payout_id, lease)

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
        self._check_ref(payout)
        stored = replace(payout, version=1, request=_copy(payout.request))
        self._payouts[payout.id] = stored
        self._counts[stored.status] += 1
        self._index(None, stored)
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
        self._check_ref(payout)
        old_key = self._due_key(payout.id)
        stored = replace(payout, version=expected_version + 1, request=_copy(payout.request))
        self._payouts[payout.id] = stored
        was_leased = self._lease_payout(payout.id, None)
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
        self._index(current, stored)
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
            self._lease_payout(payout_id, (owner, until))
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
            self._lease_entry(payout_id, (owner, until))
            self._outbox_due.push(until, payout_id)
            claimed.append(e)
            return True

        self._outbox_due.pop_due(now, limit, claim)
        return claimed

    async def release_leases(self, owner: str, now: float, *, outbox: bool = True) -> int:
        await checkpoint()
        released = 0
        for pid in self._owned.pop(owner, set()):
            _, until = self._leases.pop(pid)
            released += until > now
            # Back among the candidates; its _leased heap entry goes stale. Also for a lease
            # already run out: the next claim would have moved it back by that heap entry.
            self._ready.push(self._due_key(pid), pid)
        for pid in self._outbox_owned.pop(owner, set()) if outbox else ():
            _, until = self._outbox_leases.pop(pid)
            released += until > now
            e = self._outbox[pid]
            if e.next_attempt_at > now:
                self._outbox[pid] = replace(e, next_attempt_at=now)
                self._outbox_due.push(now, pid)
        return released

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is not None and e.delivered_at is None:
            self._outbox[payout_id] = replace(e, delivered_at=delivered_at, dead_at=None)
            self._lease_entry(payout_id, None)
            self._dead.discard(payout_id)
            p = self._payouts.get(payout_id)
            if p is not None:
                self._undelivered.discard(_pos(p))

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is None or e.delivered_at is not None or e.dead_at is not None:
            return
        self._outbox[payout_id] = replace(
            e, attempts=e.attempts + 1, next_attempt_at=next_attempt_at, last_error=error
        )
        self._lease_entry(payout_id, None)
        self._outbox_due.push(next_attempt_at, payout_id)

    async def dead_letter_outbox(self, payout_id: str, *, at: float, error: str) -> None:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is None or e.delivered_at is not None or e.dead_at is not None:
            return
        # Its heap entry goes stale (the key is None now) and is dropped when it surfaces.
        self._outbox[payout_id] = replace(e, attempts=e.attempts + 1, last_error=error, dead_at=at)
        self._lease_entry(payout_id, None)
        self._dead.add(payout_id)

    async def requeue_outbox(self, payout_id: str, *, next_attempt_at: float) -> bool:
        await checkpoint()
        e = self._outbox.get(payout_id)
        if e is None:
            return False
        self._outbox[payout_id] = replace(
            e, next_attempt_at=next_attempt_at, delivered_at=None, dead_at=None, attempts=0
        )
        self._lease_entry(payout_id, None)
        self._dead.discard(payout_id)
        self._outbox_due.push(next_attempt_at, payout_id)
        p = self._payouts.get(payout_id)
        if p is not None:
            self._undelivered.add(_pos(p))
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

    # -- operators -------------------------------------------------------------------------------

    async def get_by_partner_ref(self, partner_ref: str) -> Payout | None:
        await checkpoint()
        pid = self._refs.get(partner_ref)
        p = None if pid is None else self._payouts.get(pid)
        return None if p is None else self._out(p)

    async def list_payouts(self, query: PayoutQuery) -> PayoutPage:
        await checkpoint()
        start: _Pos | None = query.after
        if query.created_after is not None and (start is None or start[0] < query.created_after):
            start = (query.created_after, "")  # "" sorts before every id: created_after included
        index: Iterator[_Pos]
        if query.undelivered_only:
            index = self._undelivered.after(start)
        elif query.conflicts_only:
            index = self._conflicts.after(start)
        elif query.statuses is not None:
            index = heapq.merge(*(self._by_status[s].after(start) for s in query.statuses))
        else:
            index = self._by_created.after(start)
        found: list[Payout] = []
        for created_at, pid in index:
            if query.created_before is not None and created_at >= query.created_before:
                break
            p = self._payouts[pid]
            if query.matches(p, undelivered=self._undelivered_entry(pid)):
                found.append(self._out(p))
                if len(found) > query.limit:
                    break
        return page_of(found, query.limit)

    async def ops_snapshot(
        self, now: float, *, late_after: float, failing_after: float
    ) -> OpsSnapshot:
        await checkpoint()
        open_ = [s for s in PayoutStatus if not s.is_final]
        firsts = [k for k in (self._by_status[s].first() for s in open_) if k is not None]
        oldest = min(firsts)[0] if firsts else None
        late = self._attempts.count_before((now - late_after, ""))
        failing = 0
        for _, pid in self._undelivered.after(None):
            e = self._outbox[pid]
            failing += e.dead_at is None and e.attempts > 0 and e.created_at < now - failing_after
        return OpsSnapshot(
            oldest_open_age=None if oldest is None else now - oldest,
            open_past_window=late,
            conflicts=len(self._conflicts),
            outbox_failing=failing,
            outbox_dead=len(self._dead),
        )

    async def prune(self, before: float, *, dry_run: bool, limit: int) -> int:
        await checkpoint()
        doomed: list[str] = []
        for s in PayoutStatus:
            if not s.is_final:
                continue
            for _, pid in self._by_status[s].after(None):
                if len(doomed) >= limit:
                    break
                p = self._payouts[pid]
                if p.updated_at < before and not self._undelivered_entry(pid):
                    doomed.append(pid)
        if dry_run:
            return len(doomed)
        for pid in doomed:
            p = self._payouts.pop(pid)
            self._index(p, None)
            self._counts[p.status] -= 1
            self._lease_payout(pid, None)
            self._lease_entry(pid, None)
            self._outbox.pop(pid, None)
            self._dead.discard(pid)
            ref = self._ref_of.pop(pid, None)
            if ref is not None:
                self._refs.pop(ref, None)
        return len(doomed)

    # -- instance liveness ----------------------------------------------------------------------

    async def beat(self, instance_id: str, mark: float) -> None:
        await checkpoint()
        self._marks[instance_id] = mark

    async def instances(self) -> dict[str, float]:
        await checkpoint()
        return dict(self._marks)

    async def forget_instance(self, instance_id: str) -> None:
        await checkpoint()
        self._marks.pop(instance_id, None)
