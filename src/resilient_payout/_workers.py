"""The client's background loops, each a small class owning its own state.

* :class:`DueWork` claims payouts whose ``next_check_at`` has come (resume a received payout,
  recover an orphaned submit, make a check eligible) and runs each once.
* :class:`CheckScheduler` spends each status-check token on the best eligible payout at the
  moment the token is granted (docs/reconciliation.md).
* :class:`OutboxWork` claims undelivered outcomes and pushes them to the app.
* :class:`Liveness` marks this instance alive in storage and recovers, at once, the open submits
  of an instance whose mark stopped changing (docs/reliability.md, "Restarts").

Work is claimed from storage with a lease, so a restarted or second process picks up whatever a
dead one left; none of these loops changes a payout except through :meth:`PayoutClient._apply`.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Final

import anyio
from anyio.abc import TaskGroup

from ._errors import StorageError
from ._faults import adapter_fault
from ._lifecycle import OwnerGone, StatusChecked, WorkDue
from ._model import CheckFailed, OutboxEntry, Payout, PayoutStatus, RateLimited
from .notify import Notifier, deliver_with_retries, next_round_delay
from .storage import PayoutQuery

if TYPE_CHECKING:
    from ._client import PayoutClient

__all__ = ["CheckScheduler", "DueWork", "Liveness", "OutboxWork", "owned_by"]

log = logging.getLogger("resilient_payout")

CLAIM_BATCH: Final = 200
_MIN_WAIT: Final = 0.001
_OPEN: Final = (PayoutStatus.UNKNOWN, PayoutStatus.AWAITING)
_HELD: Final = frozenset({PayoutStatus.RECEIVED, PayoutStatus.SUBMITTING})
"""The statuses whose work belongs to one instance (``Payout.owner``)."""


class DueWork:
    """Claims due payouts and runs each (``WorkDue``) at most once at a time in this process."""

    def __init__(self, client: PayoutClient) -> None:
        self._client = client
        self._running: set[str] = set()
        self._wake = anyio.Event()

    def wake(self) -> None:
        self._wake.set()

    def done(self, payout_id: str) -> None:
        """The work on ``payout_id`` is over (it may be claimed again when due)."""
        self._running.discard(payout_id)

    async def run(self, tg: TaskGroup) -> None:
        client = self._client
        policy = client.policy
        while True:
            now = client.clock.now()
            try:
                batch = await client.storage.claim_due(
                    now, owner=client.instance_id, lease_seconds=policy.lease, limit=CLAIM_BATCH
                )
                nxt = await client.storage.next_due_at()
            except StorageError as exc:
                log.warning("claiming due work failed, retrying: %s", exc)
                batch, nxt = [], None
            for p in batch:
                if p.id not in self._running:
                    self._running.add(p.id)
                    client.spawn(tg, client._run_guarded, p, WorkDue())
            if len(batch) == CLAIM_BATCH:
                await anyio.lowlevel.checkpoint()
                continue
            delay = policy.poll_interval
            if nxt is not None and nxt > now:
                # A floor: epoch floats and the loop clock round differently, and a wait shorter
                # than the clock's resolution would never reach the due time.
                delay = max(min(delay, nxt - now), _MIN_WAIT)
            self._wake = anyio.Event()
            with anyio.move_on_after(delay):
                await self._wake.wait()


class CheckScheduler:
    """Eligible payouts wait here for a budget token; each token goes to the best one."""

    def __init__(self, client: PayoutClient) -> None:
        self._client = client
        self._queue: dict[str, Payout] = {}
        self._wake = anyio.Event()
        self._recent: deque[float] = deque()

    def offer(self, payout: Payout) -> None:
        self._queue[payout.id] = payout
        self._wake.set()

    def drop(self, payout_id: str) -> None:
        """Forget a payout that no longer needs a check (it became final)."""
        self._queue.pop(payout_id, None)

    def __contains__(self, payout_id: object) -> bool:
        return payout_id in self._queue

    def _priority(self, p: Payout) -> tuple[int, float]:
        """An app waiting on a long-poll first, then the most overdue payout, so that under load
        every payout's checks are spaced evenly."""
        return (0 if self._client.is_awaited(p.id) else 1, p.next_check_at or 0.0)

    async def run(self, tg: TaskGroup) -> None:
        client = self._client
        while True:
            while not self._queue:
                self._wake = anyio.Event()
                await self._wake.wait()
            try:
                await client.budget.acquire()
            except Exception:
                # A shared budget's backend may fail (Redis down, bad credentials): checks wait,
                # nothing else stops.
                client.stats.work_errors += 1
                log.exception(
                    "the check budget failed; retrying in %.1fs", client.policy.poll_interval
                )
                await anyio.sleep(client.policy.poll_interval)
                continue
            if not self._queue:
                continue  # settled by a webhook or answer while we waited: token unused
            best = min(self._queue.values(), key=self._priority)
            del self._queue[best.id]
            self._client.spawn(tg, self._check, best)

    async def _check(self, payout: Payout) -> None:
        client = self._client
        try:
            with client.guard(payout.id, "during a check"):
                await self._check_once(payout)
        finally:
            client.due.done(payout.id)

    async def _check_once(self, payout: Payout) -> None:
        client = self._client
        fresh = await client.storage.get(payout.id)
        if fresh is None or fresh.status not in _OPEN or fresh.attempt != payout.attempt:
            client.stats.checks_skipped += 1
            return
        self._count()
        sent_at = client.clock.now()  # before the GET: a 404 is judged by when it left
        try:
            outcome = await client.partner.check(fresh.id, fresh.partner_ref)
        except BaseException as exc:
            if not adapter_fault(exc):
                raise
            log.exception("payout %s: the partner's check raised", payout.id)
            outcome = CheckFailed(f"partner adapter raised {type(exc).__name__}")
        if isinstance(outcome, RateLimited):
            await self._pause(payout.id, outcome.retry_after)
        await client._apply(fresh, StatusChecked(fresh.attempt, outcome, sent_at=sent_at))

    async def _pause(self, payout_id: str, retry_after: float | None) -> None:
        client = self._client
        client.stats.checks_rate_limited += 1
        client.stats.check_pauses += 1
        client.note_retry_after(payout_id, retry_after)
        pause = client.policy.retry_delay(retry_after, client.policy.block_pause)
        log.warning("partner rate-limited a status check; pausing checks for %.1fs", pause)
        await client.budget.pause(pause)

    def _count(self) -> None:
        stats = self._client.stats
        now = anyio.current_time()
        stats.checks_sent += 1
        recent = self._recent
        recent.append(now)
        while recent[0] <= now - 1.0:
            recent.popleft()
        stats.checks_peak_per_second = max(stats.checks_peak_per_second, len(recent))


class OutboxWork:
    """Claims undelivered outcomes and pushes each through the notifier until acknowledged."""

    def __init__(self, client: PayoutClient, notifier: Notifier) -> None:
        self._client = client
        self._notifier = notifier
        self._wake = anyio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, tg: TaskGroup) -> None:
        client = self._client
        # A round may retry a few times with backoff; the lease must outlast it.
        policy = client.policy
        lease = policy.lease + policy.notify_attempts_per_round * (
            policy.notify_timeout + policy.notify_backoff_max
        )
        while True:
            try:
                entries = await client.storage.claim_outbox(
                    client.clock.now(),
                    owner=client.instance_id,
                    lease_seconds=lease,
                    limit=CLAIM_BATCH,
                )
            except StorageError as exc:
                log.warning("claiming outbox entries failed, retrying: %s", exc)
                entries = []
            for entry in entries:
                client.spawn(tg, self._deliver, entry)
            if len(entries) == CLAIM_BATCH:
                await anyio.lowlevel.checkpoint()
                continue
            self._wake = anyio.Event()
            with anyio.move_on_after(policy.poll_interval):
                await self._wake.wait()

    async def _deliver(self, entry: OutboxEntry) -> None:
        client = self._client
        # A failed round leaves the entry leased: it comes back when the lease runs out.
        async with client.limiter:
            with client.guard(entry.payout_id, "pushing its outcome"):
                ok = await deliver_with_retries(
                    self._notifier, entry.payout_id, entry.status, client.policy
                )
                if ok:
                    client.stats.notifications_delivered += 1
                    now = client.clock.now()
                    await client.storage.ack_outbox(entry.payout_id, delivered_at=now)
                else:
                    await self._refused(entry)

    async def _refused(self, entry: OutboxEntry) -> None:
        client = self._client
        client.stats.notification_rounds_failed += 1
        rounds = entry.attempts + 1
        now = client.clock.now()
        if rounds >= client.policy.notify_max_rounds:
            client.stats.notifications_dead += 1
            log.error(
                "outbox %s: push refused for %d rounds; dead-lettered for an operator",
                entry.payout_id,
                rounds,
            )
            await client.storage.dead_letter_outbox(
                entry.payout_id, at=now, error="push not acknowledged"
            )
            return
        delay = next_round_delay(rounds, client.policy)
        await client.storage.retry_outbox(
            entry.payout_id, next_attempt_at=now + delay, error="push not acknowledged"
        )


class Liveness:
    """Marks this instance alive in storage every ``heartbeat_interval``, and watches the others.

    An instance whose mark has not changed for ``takeover_after`` (measured on this process's own
    clock, so clocks of two machines apart do not matter) is presumed dead: each payout it held
    gets :class:`~resilient_payout._lifecycle.OwnerGone`, which makes an open POST ``unknown`` and
    checks it at once. A wrong guess (an instance alive but stalled) costs a status check, never a
    second POST: an uncertain attempt is re-sent only with the same idempotency key, or after its
    absence is confirmed.
    """

    def __init__(self, client: PayoutClient) -> None:
        self._client = client
        self._seen: dict[str, tuple[float, float]] = {}
        """instance -> (its mark, our loop time when we first saw that mark)."""
        self._taken: set[str] = set()
        """Silent instances whose payouts we took over; their pushes are released later."""

    async def run(self, watch: bool) -> None:
        client = self._client
        while True:
            try:
                await client.storage.beat(client.instance_id, client.clock.now())
                # Only background clients watch, and not while draining: no new work then.
                watching = watch and not client.draining
                marks = await client.storage.instances() if watching else {}
            except StorageError as exc:
                log.warning("heartbeat failed, retrying: %s", exc)
                watching, marks = False, {}
            if watching:
                await self._watch(marks)
            await anyio.sleep(client.policy.heartbeat_interval)

    async def _watch(self, marks: dict[str, float]) -> None:
        client = self._client
        here = anyio.current_time()
        policy = client.policy
        for instance in set(self._seen) - set(marks):
            del self._seen[instance]  # forgotten: it left cleanly, or was taken over
            self._taken.discard(instance)
        for instance, mark in marks.items():
            if instance == client.instance_id:
                continue
            seen = self._seen.get(instance)
            if seen is None or seen[0] != mark:
                self._seen[instance] = (mark, here)
                self._taken.discard(instance)  # alive after all: it beats again
                continue
            silent = here - seen[1]
            if silent >= policy.takeover_after + policy.notify_timeout:
                await self._release_pushes(instance)
            elif silent >= policy.takeover_after and instance not in self._taken:
                await self._take_over(instance)

    async def _take_over(self, instance: str) -> None:
        """Its payouts now: a payout's version guards every write, so a wrong guess costs a
        status check. Its claimed checks too, else they wait out ``lease``."""
        client = self._client
        with client.guard(instance, "taking over a silent instance"):
            held = await owned_by(client, instance)
            log.warning(
                "instance %s silent for %.1fs: recovering its %d open payouts",
                instance,
                client.policy.takeover_after,
                len(held),
            )
            for p in held:
                with client.guard(p.id, "recovering it from a silent instance"):
                    await client._apply(p, OwnerGone(instance))
                    client.stats.takeovers += 1
            now = client.clock.now()
            released = await client.storage.release_leases(instance, now, outbox=False)
            client.stats.leases_released += released
            self._taken.add(instance)

    async def _release_pushes(self, instance: str) -> None:
        """Its pushes, ``notify_timeout`` later: nothing guards a push but its lease, and an
        instance merely frozen may hold one open, which the app would then get twice. Waiting
        narrows that window to a freeze longer than a push may take; the lease's end (minutes:
        a whole round of retries) would be far too long a wait for a dead one."""
        client = self._client
        with client.guard(instance, "releasing a silent instance's pushes"):
            if instance not in self._taken:
                await self._take_over(instance)  # we first saw it late: both at once
            released = await client.storage.release_leases(instance, client.clock.now())
            client.stats.leases_released += released
            await client.storage.forget_instance(instance)
            self._seen.pop(instance, None)
            self._taken.discard(instance)


async def owned_by(client: PayoutClient, instance: str) -> list[Payout]:
    """The payouts whose open work ``instance`` holds (``received`` or ``submitting``)."""
    found: list[Payout] = []
    cursor: str | None = None
    while True:
        page = await client.storage.list_payouts(
            PayoutQuery(statuses=_HELD, limit=500, cursor=cursor)
        )
        found.extend(p for p in page.items if p.owner == instance)
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor
