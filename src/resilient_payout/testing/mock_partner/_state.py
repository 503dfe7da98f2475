"""What the mock partner knows: records, every POST's fate and truth, callers and counters.

``reset()`` swaps in a fresh :class:`State`; jobs still holding the old one update nothing visible.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import anyio

from ._log import log
from ._plan import Plan, draw

if TYPE_CHECKING:
    from .config import MockPartnerConfig

# Favour the caller on float noise: checks exactly 1/limit s apart must never trip the limit.
_WINDOW_EPSILON = 1e-9


class AnswerCounts(TypedDict):
    """How the partner answered POSTs, by kind (``answers`` in ``GET /_mock/stats``)."""

    completed: int
    declined: int
    pending: int
    timeout: int
    error: int


class MockPartnerStats(TypedDict):
    """What ``GET /_mock/stats`` returns: POSTs, status checks, blocks, webhooks, answers."""

    posts_total: int
    posts_max_per_id: int
    double_payments: list[str]
    checks_total: int
    checks_peak_per_second: int
    checks_per_second: dict[str, int]
    blocks: int
    rate_limited_checks: int
    webhooks_sent: int
    webhooks_failed: int
    answers: AnswerCounts


class TruthEntry(TypedDict):
    """One id in ``GET /_mock/truth``: the partner's record's status (``None``: no record), its
    POSTs, whether they all settled and whether any paid twice."""

    status: str | None
    posts: int
    settled: bool
    double_payment: bool


class MockPartnerTruth(TypedDict):
    """What ``GET /_mock/truth`` returns: the partner's truth for every id it was sent."""

    transactions: dict[str, TruthEntry]


@dataclass(eq=False)
class Post:
    payout_id: str
    number: int
    webhook_url: str
    requested_at: float
    scale: float
    window_end: float
    plan: Plan
    double_payment: bool
    answered: anyio.Event = field(default_factory=anyio.Event)
    answer_sent: bool = False
    recorded: bool = False
    settled: bool = False
    key: str | None = None

    @property
    def reaches_ledger(self) -> bool:
        """Whether this POST records a transfer now or later (its key then stands for it)."""
        plan = self.plan
        return (
            self.recorded
            or plan.record_at_once
            or plan.final_at is not None
            or plan.land_at is not None
        )


@dataclass
class Caller:
    window: deque[float] = field(default_factory=deque)
    blocked_until: float = -math.inf


@dataclass
class State:
    started_at: float | None
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    posts: dict[str, list[Post]] = field(default_factory=dict)
    double_payments: list[str] = field(default_factory=list)
    callers: dict[str, Caller] = field(default_factory=dict)
    checks_per_second: Counter[int] = field(default_factory=Counter)
    checks_total: int = 0
    blocks: int = 0
    rate_limited_checks: int = 0
    webhooks_sent: int = 0
    webhooks_failed: int = 0
    answers: Counter[str] = field(default_factory=Counter)

    def held(self, config: MockPartnerConfig, payout_id: str, key: str, now: float) -> Post | None:
        """The earlier POST whose idempotency key this is, if the partner still holds it."""
        for post in self.posts.get(payout_id, ()):
            retained = now < post.requested_at + config.idempotency_retention * config.time_scale
            if post.key == key and post.reaches_ledger and retained:
                return post
        return None

    def add_post(
        self,
        config: MockPartnerConfig,
        payout_id: str,
        webhook_url: str,
        now: float,
        key: str | None = None,
    ) -> Post:
        """Draw the next POST of ``payout_id`` and note whether it can pay a second time."""
        earlier = self.posts.setdefault(payout_id, [])
        number = len(earlier) + 1
        plan = draw(config, payout_id, number)
        # A second transfer is possible when an earlier POST recorded anything, or could still
        # land as far as anyone outside the partner can tell (unanswered, or within its window);
        # under one honoured key the partner itself makes one transfer at most.
        double = any(
            (p.recorded or not p.answer_sent or now < p.window_end)
            and not (key is not None and p.key == key)
            for p in earlier
        )
        post = Post(
            payout_id=payout_id,
            number=number,
            webhook_url=webhook_url,
            requested_at=now,
            scale=config.time_scale,
            window_end=now + max(config.late_landing_max, config.timeout_after) * config.time_scale,
            plan=plan,
            double_payment=double,
            key=key,
        )
        earlier.append(post)
        if double and payout_id not in self.double_payments:
            self.double_payments.append(payout_id)
        if plan.record_at_once:
            self.write(post, "pending")
        return post

    def write(self, post: Post, status: str) -> None:
        # Last write wins, like any store: an earlier POST's late update can overwrite a re-POST.
        self.records[post.payout_id] = {
            "id": post.payout_id,
            "status": status,
            "webhookUrl": post.webhook_url,
        }
        post.recorded = True

    def admit_check(self, config: MockPartnerConfig, caller: str, now: float) -> float | None:
        """Count a status check: None if it may go on, else the seconds its caller stays blocked."""
        if self.started_at is None:
            self.started_at = now
        self.checks_total += 1
        self.checks_per_second[int((now - self.started_at) / config.time_scale)] += 1
        entry = self.callers.setdefault(caller, Caller())
        if now < entry.blocked_until:
            self.rate_limited_checks += 1
            return entry.blocked_until - now
        window = entry.window
        horizon = now - config.rate_limit_window * config.time_scale + _WINDOW_EPSILON
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) >= config.rate_limit_checks:
            window.clear()
            entry.blocked_until = now + config.block_penalty * config.time_scale
            self.blocks += 1
            log.info("caller %s blocked: too many status checks", caller)
            self.rate_limited_checks += 1
            return entry.blocked_until - now
        window.append(now)
        return None

    def stats(self) -> MockPartnerStats:
        answers = self.answers
        return {
            "posts_total": sum(len(posts) for posts in self.posts.values()),
            "posts_max_per_id": max((len(posts) for posts in self.posts.values()), default=0),
            "double_payments": sorted(self.double_payments),
            "checks_total": self.checks_total,
            "checks_peak_per_second": max(self.checks_per_second.values(), default=0),
            "checks_per_second": {str(k): v for k, v in sorted(self.checks_per_second.items())},
            "blocks": self.blocks,
            "rate_limited_checks": self.rate_limited_checks,
            "webhooks_sent": self.webhooks_sent,
            "webhooks_failed": self.webhooks_failed,
            "answers": {
                "completed": answers["completed"],
                "declined": answers["declined"],
                "pending": answers["pending"],
                "timeout": answers["timeout"],
                "error": answers["error"],
            },
        }

    def truth(self) -> MockPartnerTruth:
        transactions: dict[str, TruthEntry] = {}
        for payout_id, posts in self.posts.items():
            record = self.records.get(payout_id)
            transactions[payout_id] = {
                "status": record["status"] if record is not None else None,
                "posts": len(posts),
                "settled": all(p.settled for p in posts),
                "double_payment": any(p.double_payment for p in posts),
            }
        return {"transactions": transactions}
