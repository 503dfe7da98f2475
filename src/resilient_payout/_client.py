"""PayoutClient: runs the lifecycle against storage, the partner and the app.

The client owns no payout rules. For every event it reads the record, asks :func:`decide`,
writes the result with a compare-and-set (a lost race re-reads and decides again), and only then
carries out the effects, so that across any number of processes exactly one acts on a decision.
Background work (resuming received payouts, recovering orphaned submits, status checks, pushing
outcomes to the app) is claimed from storage with a lease, so a restarted or second process picks
up whatever a dead one left.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Self

import anyio
from anyio.abc import TaskGroup

from ._clock import Clock, LoopClock
from ._errors import (
    ClientNotRunning,
    ConcurrencyError,
    IdempotencyConflict,
    InvalidRequest,
    PartnerReferenceTaken,
    PayoutAlreadyFinal,
    ShuttingDown,
    StorageError,
    UnknownPayout,
    WebhookRejected,
)
from ._faults import adapter_fault
from ._lifecycle import (
    CheckStatus,
    ConflictDetected,
    Decision,
    Event,
    Notify,
    OperatorResolved,
    OwnerGone,
    PartnerAnswered,
    ReferenceRefused,
    SendExpired,
    StatusChecked,
    SubmitNow,
    SubmitToPartner,
    WebhookReceived,
    decide,
    send_expired,
)
from ._model import (
    Accepted,
    Cause,
    Found,
    NotFound,
    NotSent,
    OutboxEntry,
    Payout,
    PayoutRequest,
    PayoutStatus,
    RateLimited,
    Refused,
    SubmitAttempt,
    Uncertain,
    idempotency_key,
)
from ._policy import Policy
from ._stats import ClientStats, bump
from ._workers import CheckScheduler, DueWork, Liveness, OutboxWork, owned_by
from .notify import Notifier
from .partner import Partner
from .reconcile import CheckBudget, LocalCheckBudget
from .storage import Storage
from .webhooks import (
    RejectReason,
    ReplayStore,
    WebhookAuthError,
    WebhookParser,
    WebhookVerifier,
    parse_webhook,
)

__all__ = ["ClientStats", "PayoutClient", "SubmitResult"]

log = logging.getLogger("resilient_payout")

_MAX_RACES: Final = 20
_EVENT_ID_TTL: Final = 7 * 86_400.0
"""How long a partner's webhook event id is remembered (with ``webhook_replays``)."""

ConflictHook = Callable[[Payout, ConflictDetected], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What :meth:`PayoutClient.submit` returns: the payout, and whether it already existed."""

    payout: Payout
    replayed: bool


class PayoutClient:
    """Take transfer requests, drive them through the partner, report one outcome each.

    Use it as an async context manager: entering opens storage, recovers what an earlier run
    under the same ``instance_id`` left open, and starts background work; leaving drains it
    (no new work, in-flight partner calls and pushes finish within ``policy.drain_timeout``,
    the rest is handed over: see :meth:`begin_drain`). Leaving by cancellation stops at once,
    as a crash would; the next process, or another instance watching, recovers it.

    Args:
        storage: where payouts live (e.g. ``storage_from_url("sqlite:///payouts.db")``).
        partner: the payment partner (e.g. :class:`~resilient_payout.HttpPartner`).
        webhook_url: the URL the partner should POST webhooks to (our endpoint).
        notifier: pushes final outcomes to the app; None keeps them in the outbox only.
        policy: every number; ``Policy().scaled(f)`` for time-scaled runs.
        budget: the status-check budget; by default a :class:`LocalCheckBudget` from policy.
        clock: epoch time source; by default the event loop's clock anchored to the wall clock.
        instance_id: names this process in leases and as the owner of its open submits;
            random by default. Keep it stable across restarts of one deployment slot (a pod's
            name) and unique among live processes: a client entered under a name recovers at
            once whatever that name held.
        on_conflict: called (sync or async) when a report disagrees with a final status.
        background: run background work (claims, checks, pushes); False for a process that
            only takes requests and webhooks.
        close_storage: close the storage on exit (False when several clients share it).
        webhook_verifier: checks each webhook's authenticity before it is parsed (e.g.
            :class:`~resilient_payout.webhooks.StandardWebhookVerifier`); None accepts unsigned
            webhooks, like :class:`~resilient_payout.webhooks.UnsignedWebhooks`.
        webhook_parser: reads the partner's webhook shape (by default the exercise's
            ``{id, status}``, :func:`~resilient_payout.webhooks.parse_webhook`).
        webhook_replays: remembers the partner's webhook event ids (when its parser returns
            them) so a replayed event is refused; None: no check beyond the verifier's.

    With a partner that declares :class:`~resilient_payout.IdempotencyKeys`, ``policy``'s
    ``key_retention`` is set from it; otherwise it is 0 and an uncertain POST is never re-sent.
    """

    def __init__(
        self,
        *,
        storage: Storage,
        partner: Partner,
        webhook_url: str,
        notifier: Notifier | None = None,
        policy: Policy | None = None,
        budget: CheckBudget | None = None,
        clock: Clock | None = None,
        instance_id: str | None = None,
        on_conflict: ConflictHook | None = None,
        background: bool = True,
        close_storage: bool = True,
        webhook_verifier: WebhookVerifier | None = None,
        webhook_parser: WebhookParser | None = None,
        webhook_replays: ReplayStore | None = None,
    ) -> None:
        self.storage = storage
        self.partner = partner
        self.webhook_url = webhook_url
        self.notifier = notifier
        keys = getattr(partner, "idempotency", None)  # a pre-0.2 adapter may lack it
        # The policy must say what the partner honours: decide() is pure and only sees it.
        self.policy = (policy or Policy()).replace(
            key_retention=keys.retention if keys is not None else 0.0
        )
        self.budget: CheckBudget = budget or LocalCheckBudget(
            self.policy.check_rate, self.policy.check_burst
        )
        self.clock: Clock = clock or LoopClock()
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.on_conflict = on_conflict
        self.background = background
        self.close_storage = close_storage
        self.webhook_verifier = webhook_verifier
        self.webhook_parser: WebhookParser = webhook_parser or parse_webhook
        self.webhook_replays = webhook_replays
        self.stats = ClientStats()
        self.limiter = anyio.CapacityLimiter(self.policy.max_concurrent_work)
        """Bounds this process's background tasks (submits, checks, pushes)."""
        self.due = DueWork(self)
        self.checks = CheckScheduler(self)
        self.outbox = OutboxWork(self, notifier) if notifier is not None else None
        self.liveness = Liveness(self)
        self._loops: anyio.CancelScope | None = None
        """The claim loops: cancelled first when draining, while in-flight work goes on."""
        self._busy = 0
        self._idle = anyio.Event()
        self._tg: TaskGroup | None = None
        self._waiters: dict[str, set[_Waiter]] = {}
        self._draining = False

    # -- lifecycle of the client itself ------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.storage.open()
        self._warn_local_budget()
        self._draining = False
        # Before any new work: whatever this name held was left by an earlier run of it.
        await self._recover_own()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._loops = anyio.CancelScope()
        self._tg.start_soon(self._run_loops, self._tg)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        """Drain, then stop: no new work; in-flight partner calls and pushes may finish for up
        to ``policy.drain_timeout``; what is left is handed over, so that the next process (or
        another instance) takes it at once instead of waiting out a lease.

        Left by cancellation (or KeyboardInterrupt, SystemExit) the client stops at once, as a
        crash would: the next process recovers what it held."""
        self.begin_drain()
        tg, self._tg = self._tg, None
        abrupt = exc_type is not None and not issubclass(exc_type, Exception)
        if tg is not None and abrupt:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        elif tg is not None:
            if self._loops is not None:
                self._loops.cancel()
            with anyio.move_on_after(self.policy.drain_timeout) as waited:
                while self._busy:
                    await self._idle.wait()
            if waited.cancelled_caught:
                self.stats.drains_cut_short += 1
                log.warning(
                    "drain: %d tasks still running after %.0fs; cancelling them and handing "
                    "their payouts over",
                    self._busy,
                    self.policy.drain_timeout,
                )
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.policy.check_timeout):
                await self._hand_over()
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()
        if self.close_storage:
            with anyio.CancelScope(shield=True):
                await self.storage.close()

    async def _run_loops(self, tg: TaskGroup) -> None:
        assert self._loops is not None
        # Every client beats (its submits are open work), also while it drains: a drain is
        # not a death, and others would take over its open POSTs (a status check each).
        tg.start_soon(self.liveness.run, self.background)
        if not self.background:
            return
        with self._loops:
            async with anyio.create_task_group() as loops:
                loops.start_soon(self.due.run, tg)
                loops.start_soon(self.checks.run, tg)
                if self.outbox is not None:
                    loops.start_soon(self.outbox.run, tg)

    def spawn(self, tg: TaskGroup, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start a task a drain waits for (a submit, a check, a push): counted from now, not
        from when it first runs, so a drain that begins in between still waits for it."""
        self._busy += 1

        async def counted() -> None:
            try:
                await fn(*args)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
                    self._idle = anyio.Event()

        tg.start_soon(counted)

    async def _recover_own(self) -> None:
        """An earlier run under this ``instance_id`` died holding these: recover them now."""
        held = await owned_by(self, self.instance_id)
        if held:
            log.warning(
                "instance %s restarted: recovering %d payouts it held",
                self.instance_id,
                len(held),
            )
        for p in held:
            with self.guard(p.id, "recovering it after a restart"):
                await self._apply(p, OwnerGone(self.instance_id))
                self.stats.takeovers += 1
        # Its claims too (checks, pushes): else they wait out their leases, up to `lease`.
        with self.guard(self.instance_id, "releasing the leases of an earlier run"):
            released = await self.storage.release_leases(self.instance_id, self.clock.now())
            self.stats.leases_released += released
            if released:
                log.warning("instance %s restarted: released %d leases", self.instance_id, released)

    async def _hand_over(self) -> None:
        """After a drain: POSTs it cut short become ``unknown`` and due now; claimed work and
        pushes are released; this instance leaves the liveness registry."""
        # Storage, not memory, says what this name holds: also payouts created and never POSTed.
        with self.guard(self.instance_id, "listing what it holds"):
            for p in await owned_by(self, self.instance_id):
                with self.guard(p.id, "handing it over"):
                    await self._apply(p, OwnerGone(self.instance_id))
                    self.stats.handed_over += 1
        # Claimed checks and pushes, cut short or not yet started: claimable by others now.
        with self.guard(self.instance_id, "releasing its leases"):
            self.stats.handed_over += await self.storage.release_leases(
                self.instance_id, self.clock.now()
            )
        with self.guard(self.instance_id, "leaving the liveness registry"):
            await self.storage.forget_instance(self.instance_id)

    @property
    def draining(self) -> bool:
        """True once :meth:`begin_drain` was called (or the client is leaving): no new work."""
        return self._draining

    def begin_drain(self) -> None:
        """Stop taking new work, at once (idempotent): :meth:`submit` raises
        :class:`~resilient_payout.ShuttingDown`, long-polls return, background loops claim
        nothing more. In-flight partner calls and pushes go on; leaving ``async with`` waits for
        them up to ``policy.drain_timeout``. Call it on SIGTERM before the server stops
        listening, so that readiness turns 503 first."""
        if self._draining:
            return
        self._draining = True
        log.info("draining: no new work is taken")
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()

    def _warn_local_budget(self) -> None:
        shared = type(self.storage).__module__.rsplit(".", 1)[-1] in ("postgres", "redis")
        if self.background and shared and isinstance(self.budget, LocalCheckBudget):
            # Each instance would spend the whole budget: N instances check N times too often,
            # and the partner blocks all of them.
            log.warning(
                "status-check budget is local to this process (%.3g/s) but the storage is "
                "shared: with several instances the partner sees that rate times the number of "
                "instances and may block us; give every instance one shared budget "
                "(RedisCheckBudget, RP_BUDGET_URL)",
                self.policy.check_rate,
            )

    def _group(self) -> TaskGroup:
        if self._tg is None:
            raise ClientNotRunning("use `async with PayoutClient(...)` first")
        return self._tg

    # -- the app's side ------------------------------------------------------------------------

    async def submit(self, request: PayoutRequest | dict[str, Any]) -> SubmitResult:
        """Accept a transfer request; returns at once, the partner is called in the background.

        The request's ``id`` is its idempotency key: a repeat with the same payload returns the
        stored payout (``replayed=True``); the same id with another payload raises
        :class:`~resilient_payout.IdempotencyConflict`; a malformed request raises
        :class:`~resilient_payout.InvalidRequest`.
        """
        tg = self._group()
        if self._draining:
            raise ShuttingDown("this instance is shutting down; retry (another instance takes it)")
        req = request if isinstance(request, PayoutRequest) else PayoutRequest.parse(request)
        now = self.clock.now()
        new = Payout.new(
            req,
            now,
            next_check_at=now + self.policy.claim_grace,
            owner=self.instance_id,
            nonce=secrets.token_hex(8),
        )
        # Created straight into ``submitting`` (one durable write, not two): this process POSTs
        # it at once. A crash before the POST leaves an uncertain attempt, recovered as any.
        decision = decide(new, SubmitNow(Cause.APP_REQUEST), now, self.policy, self.instance_id)
        stored, created = await self.storage.create_if_absent(decision.payout)
        if not created and stored.nonce == new.nonce:
            # Our own create: it committed, its reply was lost and the retried insert found it.
            self.stats.submits += 1
            if stored.version == 1:  # untouched since: nobody else may POST it
                self.spawn(tg, self._act_guarded, stored, decision)
            return SubmitResult(stored, replayed=False)
        if not created:
            if not req.matches(stored.fingerprint):
                self.stats.idempotency_conflicts += 1
                raise IdempotencyConflict(req.id)
            self.stats.replays += 1
            return SubmitResult(stored, replayed=True)
        self.stats.submits += 1
        self.spawn(tg, self._act_guarded, stored, decision)
        return SubmitResult(stored, replayed=False)

    async def get(self, payout_id: str) -> Payout:
        """The stored payout; raises :class:`~resilient_payout.UnknownPayout`."""
        p = await self.storage.get(payout_id)
        if p is None:
            raise UnknownPayout(payout_id)
        return p

    async def wait_final(self, payout_id: str, timeout: float) -> Payout:
        """The payout once final, or as it stands after ``timeout`` seconds.

        Wakes at once when this process finalizes it; a change made by another process is seen
        within ``policy.poll_interval``.
        """
        p = await self.get(payout_id)
        if p.is_final or timeout <= 0:
            return p
        waiter = _Waiter()
        waiters = self._waiters.setdefault(payout_id, set())
        waiters.add(waiter)
        try:
            with anyio.move_on_after(timeout):
                while True:
                    with anyio.move_on_after(self.policy.poll_interval):
                        await waiter.event.wait()
                    if waiter.final is not None:
                        # Finalized by this process: the record it wrote, without a read.
                        return waiter.final
                    p = await self.get(payout_id)
                    if p.is_final or self._tg is None or self._draining:
                        return p
            return await self.get(payout_id)
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._waiters.pop(payout_id, None)

    async def find_by_partner_ref(self, partner_ref: str) -> Payout:
        """The payout the partner knows by ``partner_ref``; raises
        :class:`~resilient_payout.UnknownPayout`."""
        p = await self.storage.get_by_partner_ref(partner_ref)
        if p is None:
            raise UnknownPayout(partner_ref)
        return p

    async def resolve(
        self, payout_id: str, status: PayoutStatus, note: str, *, operator: str | None = None
    ) -> Payout:
        """An operator settles an open payout by hand, saying why in ``note``; the audit entry
        names ``operator``, and the outcome goes to the outbox (pushed to the app) as any other.

        ``status`` must be final and ``note`` not blank (else
        :class:`~resilient_payout.InvalidRequest`). Goes through :func:`decide` and the same
        compare-and-set as every change: of a resolve and a report arriving at once exactly one
        wins. A payout final already (also one settled while this ran) raises
        :class:`~resilient_payout.PayoutAlreadyFinal`, and nothing is written.
        """
        if not isinstance(status, PayoutStatus) or not status.is_final:
            finals = ", ".join(s.value for s in PayoutStatus if s.is_final)
            raise InvalidRequest(f"status must be a final status ({finals}), not {status!r}")
        text, who = note.strip(), (operator or "").strip() or None
        if not text:
            raise InvalidRequest("a note saying why is required")
        if len(text) > 2000 or (who is not None and len(who) > 100):
            raise InvalidRequest("the note may have 2000 characters, the operator's name 100")

        def still_open(current: Payout) -> None:
            if current.is_final:
                # Never overrides a final status, nor records a conflict: an operator who lost
                # the race is told, and nothing is written.
                raise PayoutAlreadyFinal(current.id, current.status.value)

        event = OperatorResolved(status, text, who)
        stored = await self._apply(await self.get(payout_id), event, precondition=still_open)
        log.info("payout %s: resolved %s by operator %s", stored.id, status.value, who)
        return stored

    # -- the partner's side --------------------------------------------------------------------

    async def handle_webhook(
        self, body: bytes | str | dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> Payout:
        """Apply a partner webhook. Raises WebhookRejected (with a ``webhook_verifier``: checked
        first, over the raw body and ``headers``), InvalidWebhook, or UnknownPayout for an
        unknown id or reference (a webhook never creates a payout)."""
        headers = headers or {}
        if self.webhook_verifier is not None:
            await self._verify_webhook(body, headers)
        try:
            return await self._handle_verified(body, headers)
        except Exception:
            # Verified but not applied: the partner will retry with the same id, which must
            # not then be refused as a replay.
            await self._release_webhook(headers)
            raise

    async def _release_webhook(self, headers: Mapping[str, str]) -> None:
        release = getattr(self.webhook_verifier, "release", None)
        if release is None:
            return
        try:
            await release(headers)
        except Exception:
            log.warning("could not release a failed webhook's replay mark", exc_info=True)

    async def _handle_verified(
        self, body: bytes | str | dict[str, Any], headers: Mapping[str, str]
    ) -> Payout:
        hook = self.webhook_parser(body, headers)
        self.stats.webhooks += 1
        if hook.payout_id is not None:
            p = await self.storage.get(hook.payout_id)
        else:
            assert hook.partner_ref is not None  # Webhook refuses neither
            p = await self.storage.get_by_partner_ref(hook.partner_ref)
        if p is None:
            self.stats.webhooks_unknown += 1
            raise UnknownPayout(hook.payout_id or f"partner reference {hook.partner_ref}")
        event_key = None if hook.event_id is None else f"event:{hook.event_id}"
        if event_key is not None and self.webhook_replays is not None:
            now = self.clock.now()
            if not await self.webhook_replays.add(event_key, now + _EVENT_ID_TTL, now):
                bump(self.stats.webhooks_rejected, RejectReason.REPLAYED.value)
                raise WebhookAuthError(RejectReason.REPLAYED, "webhook event already handled")
        try:
            return await self._apply(p, WebhookReceived(hook.status, hook.partner_ref))
        except Exception:
            discard = getattr(self.webhook_replays, "discard", None)
            if event_key is not None and discard is not None:
                await discard(event_key)  # not applied: the partner's retry must get through
            raise

    async def _verify_webhook(
        self, body: bytes | str | dict[str, Any], headers: Mapping[str, str]
    ) -> None:
        assert self.webhook_verifier is not None
        try:
            if isinstance(body, dict):
                # A signature covers the exact bytes sent; re-encoding decoded JSON cannot match.
                raise WebhookAuthError(
                    RejectReason.MALFORMED, "a signed webhook must be given as its raw body"
                )
            raw = body.encode() if isinstance(body, str) else body
            await self.webhook_verifier.verify(headers, raw, self.clock.now())
        except WebhookRejected as exc:
            reason = exc.reason.value if isinstance(exc, WebhookAuthError) else "rejected"
            bump(self.stats.webhooks_rejected, reason)
            raise

    # -- the machinery -----------------------------------------------------------------------

    async def _apply(
        self,
        current: Payout,
        event: Event,
        *,
        precondition: Callable[[Payout], None] | None = None,
    ) -> Payout:
        """Decide, compare-and-set, then act; a lost race re-reads and decides again.

        ``precondition`` sees every record read (also after a lost race) before deciding, and
        may raise to write nothing.
        """
        for _ in range(_MAX_RACES):
            if precondition is not None:
                precondition(current)
            decision = decide(current, event, self.clock.now(), self.policy, self.instance_id)
            if decision.payout is current:
                await self._act(current, decision)
                return current
            outbox = self._outbox_for(decision)
            try:
                stored = await self.storage.compare_and_set(
                    decision.payout, expected_version=current.version, outbox=outbox
                )
            except PartnerReferenceTaken as exc:
                # Two payouts can never share a reference: record the claim, then apply the
                # news without it (storage wrote nothing).
                self.stats.partner_refs_refused += 1
                current = await self._apply(
                    current, ReferenceRefused(exc.partner_ref, exc.holder_id)
                )
                event = _without_ref(event)
                continue
            if stored is not None:
                self._written(current, stored, outbox is not None)
                await self._act(stored, decision)
                return stored
            self.stats.races_lost += 1
            fresh = await self.storage.get(current.id)
            if fresh is None:
                raise UnknownPayout(current.id)
            current = fresh
        raise ConcurrencyError(f"payout {current.id!r}: too many lost races")

    def _outbox_for(self, decision: Decision) -> OutboxEntry | None:
        for effect in decision.effects:
            if isinstance(effect, Notify):
                now = self.clock.now()
                return OutboxEntry(decision.payout.id, effect.status, now, next_attempt_at=now)
        return None

    def _written(self, before: Payout, stored: Payout, notified: bool) -> None:
        if stored.is_final and notified and stored.resolved_by is not None:
            bump(self.stats.resolved, stored.resolved_by.value)
        if stored.is_final:
            self.checks.drop(stored.id)
            for waiter in self._waiters.get(stored.id, ()):
                waiter.final = stored
                waiter.event.set()
        if notified and self.outbox is not None:
            self.outbox.wake()
        if stored.next_check_at is not None and stored.next_check_at <= self.clock.now():
            self.due.wake()
        if stored.status is PayoutStatus.FAILED and stored.resolved_by is Cause.STATUS_CHECK:
            self.stats.confirmed_absences += 1
        orphaned = (
            before.status is PayoutStatus.SUBMITTING and stored.status is PayoutStatus.UNKNOWN
        )
        if orphaned and stored.audit[-1].cause is Cause.RECOVERY:  # no answer: its caller died
            self.stats.recovered_orphans += 1

    async def _act(self, payout: Payout, decision: Decision) -> None:
        for effect in decision.effects:
            match effect:
                case SubmitToPartner(attempt=attempt):
                    if attempt > 1:
                        self.stats.resubmissions += 1
                        self.stats.confirmed_absences += 1
                    await self._submit(payout, attempt)
                case CheckStatus():
                    self.checks.offer(payout)
                case ConflictDetected():
                    await self._conflict(payout, effect)
                case Notify():
                    pass  # written to the outbox with the transition; the outbox loop pushes it

    async def _submit(self, payout: Payout, attempt: int) -> None:
        # Anything may have stalled this task since the decision (loop lag, GC, a frozen VM,
        # SIGSTOP): the late-arrival window only leaves room for max_send_delay.
        if send_expired(payout, self.clock.now(), self.policy):
            self.stats.sends_expired += 1
            log.warning("payout %s: attempt %d went stale before it was sent", payout.id, attempt)
            await self._apply(payout, SendExpired(attempt))
            return
        self.stats.posts += 1
        if payout.resends:
            self.stats.resends += 1
        request = SubmitAttempt(
            payout_id=payout.id,
            attempt=attempt,
            request=payout.request,
            webhook_url=self.webhook_url,
            idempotency_key=idempotency_key(payout.id, attempt),
            send=payout.resends + 1,
        )
        try:
            outcome = await self.partner.submit(request)
        except BaseException as exc:
            if not adapter_fault(exc):
                raise
            # A Partner must not raise, but one that does may have sent the request already.
            log.exception("payout %s: the partner's submit raised; outcome uncertain", payout.id)
            outcome = Uncertain(f"partner adapter raised {type(exc).__name__}")
        bump(self.stats.answers, _outcome_name(outcome))
        if isinstance(outcome, RateLimited):
            self.note_retry_after(payout.id, outcome.retry_after)
        await self._apply(payout, PartnerAnswered(attempt, outcome))

    def is_awaited(self, payout_id: str) -> bool:
        """Whether an app waits on this payout in this process (``wait_final``)."""
        return payout_id in self._waiters

    def note_retry_after(self, payout_id: str, retry_after: float | None) -> None:
        """Log and count a partner Retry-After that ``Policy.max_retry_after`` caps."""
        if retry_after is not None and not retry_after <= self.policy.max_retry_after:
            self.stats.retry_after_capped += 1
            log.warning(
                "payout %s: partner asked to wait %ss; capped at max_retry_after %.0fs",
                payout_id,
                retry_after,
                self.policy.max_retry_after,
            )

    async def _conflict(self, payout: Payout, conflict: ConflictDetected) -> None:
        self.stats.conflicts += 1
        log.error("payout %s: %s (kept %s)", payout.id, conflict.detail, payout.status.value)
        if self.on_conflict is None:
            return
        try:
            result = self.on_conflict(payout, conflict)
            if result is not None:
                await result
        except Exception:
            # The conflict is already recorded in the audit trail; a failing alert hook must
            # not stop the client, nor undo the write that found the conflict.
            self.stats.hook_errors += 1
            log.exception("payout %s: the on_conflict hook raised", payout.id)

    @contextlib.contextmanager
    def guard(self, payout_id: str, doing: str) -> Iterator[None]:
        """Background work never kills the client: a failure is logged, and the work is due
        again later (its lease runs out; ``next_check_at`` was not moved)."""
        try:
            yield
        except StorageError as exc:
            self.stats.work_errors += 1
            log.warning("payout %s: storage error %s, will retry: %s", payout_id, doing, exc)
        except Exception:
            self.stats.work_errors += 1
            log.exception("payout %s: unexpected error %s", payout_id, doing)

    async def _act_guarded(self, payout: Payout, decision: Decision) -> None:
        async with self.limiter:
            with self.guard(payout.id, "submitting it"):
                await self._act(payout, decision)

    async def _run_guarded(self, payout: Payout, event: Event) -> None:
        async with self.limiter:
            try:
                with self.guard(payout.id, "in background work"):
                    await self._apply(payout, event)
            finally:
                if payout.id not in self.checks:  # a queued check releases it when done
                    self.due.done(payout.id)


class _Waiter:
    """One ``wait_final`` call: woken with the final record when this process writes it."""

    __slots__ = ("event", "final")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.final: Payout | None = None


def _without_ref(event: Event) -> Event:
    """The same news without the partner reference storage refused."""
    match event:
        case PartnerAnswered(attempt=attempt, outcome=Accepted(status=status)):
            return PartnerAnswered(attempt, Accepted(status))
        case StatusChecked(attempt=attempt, outcome=Found(status=status), sent_at=sent_at):
            return StatusChecked(attempt, Found(status), sent_at)
        case WebhookReceived(status=status):
            return WebhookReceived(status)
    return event


def _outcome_name(outcome: object) -> str:
    match outcome:
        case Accepted(status=status):
            return f"accepted_{status.value}"
        case Refused():
            return "refused"
        case RateLimited():
            return "rate_limited"
        case NotSent():
            return "not_sent"
        case Uncertain():
            return "uncertain"
        case Found():
            return "found"
        case NotFound():
            return "not_found"
    return "other"
