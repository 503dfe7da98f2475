"""An in-process, scripted partner for client tests on virtual time.

Unlike the HTTP mock partner (:mod:`resilient_payout.testing.mock_partner`) this one implements the
:class:`~resilient_payout.Partner` protocol directly, and each POST's fate is chosen by a
:class:`Script`, so property tests can steer every branch. It keeps the truth (the partner's
final record per id), counts POSTs and flags double payments: a POST that reached the partner
while an earlier one for the same id was recorded or could still land.

Time can be made hostile: ``send_delay`` holds each POST in transit before the partner sees it,
``check_delay`` returns each status check's answer that long after the partner looked, and a
script's ``flaky_404`` makes the partner answer 404 for up to ``replica_lag`` seconds after its
record was written as ``pending`` (a lagging read replica). A lag that outlasts the late-arrival
window is beyond what any client can tell from absence (docs/concepts.md, "Timing assumptions").

With ``idempotency`` set, the partner honours :attr:`SubmitAttempt.idempotency_key` as Stripe or
Adyen do: a POST with a key it holds never makes a second transfer; it answers the first
request's result once there is one, and a 409 ("in progress") while that request may still land.
A key of a request that never reached its ledger (dropped, not sent, 429) is free again.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

import anyio
from anyio.abc import TaskGroup

from .._model import (
    Accepted,
    CheckOutcome,
    Found,
    IdempotencyKeys,
    NotFound,
    NotSent,
    PartnerStatus,
    RateLimited,
    Refused,
    SubmitAttempt,
    SubmitOutcome,
    Uncertain,
)

__all__ = ["FakePartner", "Fate", "Script"]

WebhookSink = Callable[[dict[str, Any]], Awaitable[object]]


class Fate(StrEnum):
    """What happens to one POST."""

    ANSWER = "answer"  # 200 with the final status after answer_delay
    PENDING = "pending"  # 200 "pending" after answer_delay; final record at final_delay
    TIMEOUT_LAND = "timeout_land"  # 504 at timeout_after; the record lands at land_after, silently
    TIMEOUT_DROP = "timeout_drop"  # 504 at timeout_after; nothing is ever recorded
    SLOW = "slow"  # recorded at once, answered after our read timeout: we see Uncertain
    RESET = "reset"  # recorded at once, connection reset after sending: we see Uncertain
    NOT_SENT = "not_sent"  # connection refused: never reached the partner
    REFUSED = "refused"  # 422
    RATE_LIMITED = "rate_limited"  # 429 on submit, not accepted


@dataclass(frozen=True, slots=True)
class Script:
    """How the partner treats one POST: its ``fate``, the final ``status``, and when (clock
    seconds) it answers, calls back, lands or settles."""

    fate: Fate = Fate.ANSWER
    status: PartnerStatus = PartnerStatus.COMPLETED
    answer_delay: float = 1.0
    webhook: bool = True
    webhook_delay: float = 15.0
    duplicate_webhook: bool = False
    land_after: float = 60.0
    final_delay: float = 20.0
    flaky_404: bool = False  # GET answers 404 while the record is young and pending (a replica lag)


@dataclass
class _Post:
    at: float
    script: Script
    may_land_until: float  # the POST can still change the record until then (inf if recorded)
    key: str = ""

    @property
    def reached_ledger(self) -> bool:
        """Whether the partner took this POST on (its key then stands for its transfer)."""
        return self.script.fate not in _NO_LEDGER


_NO_LEDGER = frozenset({"not_sent", "rate_limited", "timeout_drop"})


@dataclass
class FakePartner:
    """Scripted partner. ``script(id, post_number)`` decides each POST (default: random, seeded).

    ``webhook_sink`` receives ``{"id", "status"}`` dicts; point it at ``client.handle_webhook``
    (and re-point it after a simulated restart).
    """

    script: Callable[[str, int], Script] | None = None
    seed: int = 0
    p_uncertain: float = 0.10
    p_land_given_uncertain: float = 0.5
    p_webhook: float = 0.8
    p_completed: float = 2 / 3
    timeout_after: float = 30.0
    read_timeout: float = 40.0
    max_landing: float = 120.0
    check_limit: int = 5
    check_window: float = 1.0
    block_penalty: float = 60.0
    send_delay: float = 0.0
    check_delay: float = 0.0
    replica_lag: float = 60.0
    written_at: dict[str, float] = field(default_factory=dict)
    idempotency: IdempotencyKeys | None = None
    partner_refs: bool = False
    """Answers and checks name the partner's own reference (``ref-{id}``)."""
    webhook_sink: WebhookSink | None = None
    records: dict[str, PartnerStatus] = field(default_factory=dict)
    posts: dict[str, list[_Post]] = field(default_factory=lambda: defaultdict(list))
    double_payments: list[str] = field(default_factory=list)
    check_times: list[float] = field(default_factory=list)
    blocks: int = 0
    block_times: list[float] = field(default_factory=list)
    last_event: dict[str, float] = field(default_factory=dict)
    webhooks_sent: int = 0
    key_replays: int = 0
    """POSTs answered from a held idempotency key (no new transfer)."""
    landed_at: dict[str, float] = field(default_factory=dict)
    webhooks_failed: list[tuple[str, str]] = field(default_factory=list)
    _recent_checks: deque[float] = field(default_factory=deque)
    _blocked_until: float = -1.0
    _tg: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            self._tg = None

    # -- what tests read -----------------------------------------------------------------------

    def truth(self, payout_id: str) -> PartnerStatus | None:
        """The final record (None: nothing recorded, or still pending)."""
        status = self.records.get(payout_id)
        return None if status is PartnerStatus.PENDING else status

    def reached(self, payout_id: str) -> int:
        """POSTs for this id that the partner took on (not refused at the door: 429, not sent)."""
        door = (Fate.NOT_SENT, Fate.RATE_LIMITED)
        return sum(1 for p in self.posts.get(payout_id, ()) if p.script.fate not in door)

    def settled_at(self, payout_id: str) -> float:
        """When nothing more can happen at the partner for this id (its last event)."""
        return self.last_event.get(payout_id, 0.0)

    # -- the Partner protocol ------------------------------------------------------------------

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        if self.send_delay > 0:
            await anyio.sleep(self.send_delay)  # in transit: the partner has not seen it yet
        payout_id, key = attempt.payout_id, attempt.idempotency_key
        now = anyio.current_time()
        if self.idempotency is not None:
            held = self._held(payout_id, key, now)
            if held is not None:
                self.key_replays += 1
                return held
        n = len(self.posts[payout_id]) + 1
        script = self._script(payout_id, n)
        self._touch(payout_id)
        if script.fate is Fate.NOT_SENT:
            self.posts[payout_id].append(_Post(now, script, now, key))
            return NotSent("connection refused")
        # Under one key the partner makes one transfer at most: only another key can double.
        same_key_safe = self.idempotency is not None
        if any(
            p.may_land_until > now and not (same_key_safe and p.key == key)
            for p in self.posts[payout_id]
        ):
            self.double_payments.append(payout_id)
        post = _Post(now, script, float("inf"), key)
        self.posts[payout_id].append(post)
        self._touch(payout_id)
        match script.fate:
            case Fate.REFUSED:
                post.may_land_until = now
                return Refused(422, "invalid account")
            case Fate.RATE_LIMITED:
                post.may_land_until = now
                return RateLimited(retry_after=1.0)
            case Fate.ANSWER:
                self._pending(payout_id)
                # The partner's timeline must not depend on the caller: a caller that dies
                # mid-request does not stop the transfer.
                self._later(script.answer_delay, self._set, payout_id, script.status)
                self._later(script.webhook_delay, self._webhook, payout_id, script)
                await anyio.sleep(script.answer_delay)
                return Accepted(script.status, self._ref(payout_id))
            case Fate.PENDING:
                self._pending(payout_id)
                self._later(script.final_delay, self._set, payout_id, script.status)
                self._later(
                    script.final_delay + script.webhook_delay, self._webhook, payout_id, script
                )
                await anyio.sleep(script.answer_delay)
                self._touch(payout_id)
                return Accepted(PartnerStatus.PENDING, self._ref(payout_id))
            case Fate.TIMEOUT_LAND:
                self._later(script.land_after, self._land, payout_id, script.status)
                await anyio.sleep(self.timeout_after)
                self._touch(payout_id)
                return Uncertain("HTTP 504")
            case Fate.TIMEOUT_DROP:
                post.may_land_until = now + self.max_landing
                self.last_event[payout_id] = now + self.max_landing
                await anyio.sleep(self.timeout_after)
                return Uncertain("HTTP 504")
            case Fate.SLOW | Fate.RESET:
                self._pending(payout_id)
                self._later(script.answer_delay, self._set, payout_id, script.status)
                self._later(script.webhook_delay, self._webhook, payout_id, script)
                wait = self.read_timeout if script.fate is Fate.SLOW else script.answer_delay / 2
                await anyio.sleep(wait)
                return Uncertain("read timeout" if script.fate is Fate.SLOW else "connection reset")
        raise AssertionError(script)  # pragma: no cover

    def _held(self, payout_id: str, key: str, now: float) -> SubmitOutcome | None:
        """The answer to a POST whose key the partner holds (None: the key is free)."""
        assert self.idempotency is not None
        for post in self.posts.get(payout_id, ()):
            if post.key != key or not post.reached_ledger:
                continue
            if now >= post.at + self.idempotency.retention:
                return None  # forgotten: a second transfer, caught by the double-pay check
            if post.script.fate is Fate.REFUSED:
                return Refused(422, "invalid account")
            status = self.records.get(payout_id)
            if status is None:
                return Uncertain("HTTP 409: a request with this key is in progress")
            return Accepted(status, self._ref(payout_id))
        return None

    def _ref(self, payout_id: str) -> str | None:
        return f"ref-{payout_id}" if self.partner_refs else None

    async def check(self, payout_id: str, partner_ref: str | None = None) -> CheckOutcome:
        now = anyio.current_time()
        self.check_times.append(now)
        if now < self._blocked_until:
            return RateLimited(retry_after=self._blocked_until - now)
        while self._recent_checks and self._recent_checks[0] <= now - self.check_window:
            self._recent_checks.popleft()
        self._recent_checks.append(now)
        if len(self._recent_checks) > self.check_limit:
            self.blocks += 1
            self.block_times.append(now)
            self._blocked_until = now + self.block_penalty
            return RateLimited(retry_after=self.block_penalty)
        status = self.records.get(payout_id)
        outcome: CheckOutcome = (
            NotFound() if status is None else Found(status, self._ref(payout_id))
        )
        if status is PartnerStatus.PENDING and self._flaky(payout_id):
            outcome = NotFound()
        if self.check_delay > 0:
            await anyio.sleep(self.check_delay)  # the answer reflects the record at arrival
        return outcome

    def _flaky(self, payout_id: str) -> bool:
        posts = self.posts.get(payout_id)
        if not posts or not posts[-1].script.flaky_404:
            return False
        written = self.written_at.get(payout_id)
        return written is not None and anyio.current_time() - written < self.replica_lag

    # -- internals -------------------------------------------------------------------------

    def _script(self, payout_id: str, n: int) -> Script:
        if self.script is not None:
            return self.script(payout_id, n)
        rng = random.Random(f"{self.seed}:{payout_id}:{n}")
        roll = rng.random()
        status = (
            PartnerStatus.COMPLETED if rng.random() < self.p_completed else PartnerStatus.DECLINED
        )
        if roll < self.p_uncertain * self.p_land_given_uncertain:
            fate = Fate.TIMEOUT_LAND
        elif roll < self.p_uncertain:
            fate = Fate.TIMEOUT_DROP
        else:
            fate = Fate.ANSWER
        return Script(
            fate=fate,
            status=status,
            answer_delay=rng.uniform(0.2, 10.0),
            webhook=rng.random() < self.p_webhook,
            webhook_delay=rng.uniform(10.0, 30.0),
            land_after=rng.uniform(30.0, self.max_landing),
        )

    def _touch(self, payout_id: str) -> None:
        self.last_event[payout_id] = max(self.last_event.get(payout_id, 0.0), anyio.current_time())

    def _pending(self, payout_id: str) -> None:
        self.records[payout_id] = PartnerStatus.PENDING
        self.written_at[payout_id] = anyio.current_time()

    def _set(self, payout_id: str, status: PartnerStatus) -> None:
        self.records[payout_id] = status
        self._touch(payout_id)

    def _land(self, payout_id: str, status: PartnerStatus) -> None:
        self.landed_at[payout_id] = anyio.current_time()
        self._set(payout_id, status)

    def _later(self, delay: float, fn: Callable[..., object], *args: Any) -> None:
        async def run() -> None:
            await anyio.sleep(delay)
            result = fn(*args)
            if isinstance(result, Awaitable):
                await result

        assert self._tg is not None, "use `async with FakePartner(...)`"
        self._tg.start_soon(run)

    async def _webhook(self, payout_id: str, script: Script) -> None:
        if not script.webhook or self.webhook_sink is None:
            return
        status = self.records.get(payout_id)
        if status is None or status is PartnerStatus.PENDING:
            return
        for _ in range(2 if script.duplicate_webhook else 1):
            self.webhooks_sent += 1
            self._touch(payout_id)
            try:
                await self.webhook_sink({"id": payout_id, "status": status.value})
            except Exception as exc:  # noqa: BLE001 - a real partner only logs a failed delivery
                self.webhooks_failed.append((payout_id, repr(exc)))
