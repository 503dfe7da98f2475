"""A mock of the unreliable payment partner, as an ASGI app with seeded, scalable behaviour.

It reproduces the partner described in the scenario (random outcome, slow answers, 504s that may
still land, webhooks, a rate-limited status check that blocks abusers) plus opt-in faults, and
keeps the ground truth a test compares the client's results with. See ``docs/mock-partner.md``.

Use it in-process (virtual time, ``httpx.ASGITransport``)::

    async with MockPartner(MockPartnerConfig(seed=1)) as partner:
        transport = httpx.ASGITransport(app=partner.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://partner") as http:
            ...
        await partner.wait_idle()
        assert partner.stats()["double_payments"] == []

or as a server with :func:`serve_mock_partner`. It deliberately imports nothing else from the
library, so it stays an independent referee of the client.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, TypedDict

import aiohttp
import anyio
import anyio.abc
import httpx

__all__ = [
    "AnswerCounts",
    "ConnectionDropped",
    "MockPartner",
    "MockPartnerConfig",
    "MockPartnerStats",
    "MockPartnerTruth",
    "TruthEntry",
    "serve_mock_partner",
]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FinalStatus = Literal["completed", "declined"]

_JSON = b"application/json"
# Favour the caller on float noise: checks exactly 1/limit s apart must never trip the limit.
_WINDOW_EPSILON = 1e-9


@dataclass(frozen=True, kw_only=True)
class MockPartnerConfig:
    """Everything the mock partner does, in unscaled seconds; ``time_scale`` multiplies them all.

    Probabilities of the answer faults are tried in order (timeout, 500, drop, garbage, pending
    answer); the first that hits decides the answer. Webhook faults apply to calls that send a
    webhook. ``p_500_after_recording`` and ``p_drop_after_recording`` say how often the transfer
    still happens behind a 500 or a dropped connection.
    """

    seed: int | str = 0
    time_scale: float = 1.0

    p_completed: float = 2 / 3
    answer_delay_min: float = 0.2
    answer_delay_max: float = 10.0

    p_timeout: float = 0.10
    timeout_after: float = 30.0
    p_late_landing_given_timeout: float = 0.5
    late_landing_min: float = 30.0
    late_landing_max: float = 120.0

    p_webhook: float = 0.8
    webhook_delay_min: float = 10.0
    webhook_delay_max: float = 30.0
    webhook_timeout: float = 5.0
    """Real seconds (not scaled) the default webhook client waits for the receiver."""

    rate_limit_checks: int = 5
    rate_limit_window: float = 1.0
    block_penalty: float = 60.0

    p_500: float = 0.0
    p_500_after_recording: float = 0.5
    p_drop: float = 0.0
    p_drop_after_recording: float = 0.5
    p_garbage: float = 0.0
    p_pending_answer: float = 0.0
    p_duplicate_webhook: float = 0.0
    p_out_of_order_webhook: float = 0.0
    p_webhook_before_answer: float = 0.0
    extra_webhook_lag_max: float = 5.0
    """A duplicate or stale webhook follows the real one after uniform(0, this) seconds."""
    webhook_secret: str | None = None
    """Set: every webhook carries Standard Webhooks signature headers made with this secret."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "webhook_secret":
                if value is not None:
                    _signing_key(value)  # ValueError now rather than at the first webhook
                continue
            if f.name == "seed":
                if not isinstance(value, int | str) or isinstance(value, bool):
                    raise TypeError("seed must be an int or a str")
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name} must be finite and >= 0, got {value!r}")
            if f.name.startswith("p_") and value > 1:
                raise ValueError(f"{f.name} is a probability, got {value!r}")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        if not isinstance(self.rate_limit_checks, int) or self.rate_limit_checks < 1:
            raise ValueError("rate_limit_checks must be an int >= 1")
        if self.rate_limit_window <= 0:
            raise ValueError("rate_limit_window must be > 0")
        for low, high in (
            ("answer_delay_min", "answer_delay_max"),
            ("late_landing_min", "late_landing_max"),
            ("webhook_delay_min", "webhook_delay_max"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} must not exceed {high}")

    def replace(self, **overrides: Any) -> MockPartnerConfig:
        """A copy with some fields changed (validated; unknown names raise ``ValueError``)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)


class ConnectionDropped(httpx.RemoteProtocolError):
    """Raised by the app to drop a connection after the response headers (``p_drop``).

    Under ``httpx.ASGITransport`` (default ``raise_app_exceptions=True``) it reaches the caller,
    which sees an ``httpx.RemoteProtocolError`` just as over a real socket. Under uvicorn the
    headers go out and the connection is closed, so the client also gets a
    ``RemoteProtocolError`` (incomplete body).
    """


class AnswerCounts(TypedDict):
    completed: int
    declined: int
    pending: int
    timeout: int
    error: int


class MockPartnerStats(TypedDict):
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
    status: str | None
    posts: int
    settled: bool
    double_payment: bool


class MockPartnerTruth(TypedDict):
    transactions: dict[str, TruthEntry]


class _Answer(Enum):
    FINAL = "final"
    PENDING = "pending"
    TIMEOUT = "timeout"
    ERROR_500 = "500"
    DROP = "drop"
    GARBAGE = "garbage"


class _Event(Enum):
    # The value orders events due at the same moment: the record changes before it is announced.
    FINAL = 0
    LAND = 1
    ANSWER = 2
    WEBHOOK = 3


@dataclass(frozen=True)
class _Plan:
    """One POST's fate, drawn up front; times are unscaled seconds after the request."""

    status: FinalStatus
    answer: _Answer
    answer_at: float
    record_at_once: bool
    final_at: float | None
    land_at: float | None
    webhooks: tuple[tuple[float, str], ...]

    def events(self) -> list[tuple[float, _Event, str]]:
        out: list[tuple[float, _Event, str]] = [(self.answer_at, _Event.ANSWER, "")]
        if self.final_at is not None:
            out.append((self.final_at, _Event.FINAL, self.status))
        if self.land_at is not None:
            out.append((self.land_at, _Event.LAND, self.status))
        out.extend((at, _Event.WEBHOOK, status) for at, status in self.webhooks)
        out.sort(key=lambda e: (e[0], e[1].value))
        return out

    def describe(self) -> str:
        """One log line's worth, in unscaled seconds."""
        answer = {
            _Answer.FINAL: f"200 {self.status}",
            _Answer.PENDING: "200 pending",
            _Answer.TIMEOUT: "504",
            _Answer.ERROR_500: "500",
            _Answer.DROP: "drop",
            _Answer.GARBAGE: "200 garbage",
        }[self.answer]
        if self.final_at is not None:
            record = f"final {self.status} at {self.final_at:.2f}s"
        elif self.land_at is not None:
            record = f"lands {self.status} at {self.land_at:.2f}s"
        else:
            record = "never recorded"
        hooks = ", ".join(f"{s} at {at:.2f}s" for at, s in self.webhooks) or "none"
        return f"answers {answer} at {self.answer_at:.2f}s; {record}; webhooks: {hooks}"


def _draw(config: MockPartnerConfig, payout_id: str, number: int) -> _Plan:
    rng = random.Random(f"{config.seed}:{payout_id}:{number}")
    # Every draw is made, in a fixed order, whatever the branch: changing one knob then leaves
    # the other draws of a seed alone (p_500=1 keeps the same completed/declined outcomes).
    u_timeout, u_completed = rng.random(), rng.random()
    answer_delay = rng.uniform(config.answer_delay_min, config.answer_delay_max)
    u_late = rng.random()
    late_at = rng.uniform(config.late_landing_min, config.late_landing_max)
    u_webhook = rng.random()
    webhook_at = rng.uniform(config.webhook_delay_min, config.webhook_delay_max)
    u_500, u_500_rec, u_drop, u_drop_rec = rng.random(), rng.random(), rng.random(), rng.random()
    u_garbage, u_pending = rng.random(), rng.random()
    u_dup, dup_lag = rng.random(), rng.random() * config.extra_webhook_lag_max
    u_stale, stale_lag = rng.random(), rng.random() * config.extra_webhook_lag_max
    u_early = rng.random()

    status: FinalStatus = "completed" if u_completed < config.p_completed else "declined"
    if u_timeout < config.p_timeout:
        lands = u_late < config.p_late_landing_given_timeout
        return _Plan(
            status=status,
            answer=_Answer.TIMEOUT,
            answer_at=config.timeout_after,
            record_at_once=False,
            final_at=None,
            land_at=late_at if lands else None,
            webhooks=(),
        )
    transfer = True
    if u_500 < config.p_500:
        answer, transfer = _Answer.ERROR_500, u_500_rec < config.p_500_after_recording
    elif u_drop < config.p_drop:
        answer, transfer = _Answer.DROP, u_drop_rec < config.p_drop_after_recording
    elif u_garbage < config.p_garbage:
        answer = _Answer.GARBAGE
    elif u_pending < config.p_pending_answer:
        answer = _Answer.PENDING
    else:
        answer = _Answer.FINAL
    answer_at = config.answer_delay_min if answer is _Answer.PENDING else answer_delay
    if not transfer:
        return _Plan(status, answer, answer_at, False, None, None, ())
    final_at = answer_delay
    webhooks: list[tuple[float, str]] = []
    if u_webhook < config.p_webhook:
        if u_early < config.p_webhook_before_answer:
            webhook_at = final_at = answer_delay / 2
        webhooks.append((webhook_at, status))
        if u_dup < config.p_duplicate_webhook:
            webhooks.append((webhook_at + dup_lag, status))
        if u_stale < config.p_out_of_order_webhook:
            webhooks.append((webhook_at + stale_lag, "pending"))
    return _Plan(status, answer, answer_at, True, final_at, None, tuple(webhooks))


@dataclass(eq=False)
class _Post:
    payout_id: str
    number: int
    webhook_url: str
    requested_at: float
    scale: float
    window_end: float
    plan: _Plan
    double_payment: bool
    answered: anyio.Event = field(default_factory=anyio.Event)
    answer_sent: bool = False
    recorded: bool = False
    settled: bool = False


@dataclass
class _Caller:
    window: deque[float] = field(default_factory=deque)
    blocked_until: float = -math.inf


@dataclass
class _State:
    started_at: float | None
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    posts: dict[str, list[_Post]] = field(default_factory=dict)
    double_payments: list[str] = field(default_factory=list)
    callers: dict[str, _Caller] = field(default_factory=dict)
    checks_per_second: Counter[int] = field(default_factory=Counter)
    checks_total: int = 0
    blocks: int = 0
    rate_limited_checks: int = 0
    webhooks_sent: int = 0
    webhooks_failed: int = 0
    answers: Counter[str] = field(default_factory=Counter)


def _signing_key(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[6:], validate=True)
    return secret.encode()


def _sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Standard Webhooks headers; a copy of ``resilient_payout.webhooks.sign_webhook`` so that
    the mock stays an independent referee (tests check the two agree)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_signing_key(secret), signed, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


def _loop_time_or_none() -> float | None:
    try:
        return anyio.current_time()
    except RuntimeError:  # no event loop running (reset() called from sync code)
        return None


class MockPartner:
    """The mock partner: ``app`` is its ASGI app; ``async with`` runs its background jobs.

    Answers are delayed inside the request; record updates, late landings and webhooks run as
    background jobs in a task group owned by the partner, so a client that gives up on a request
    does not stop the transfer. ``start()`` and ``stop()`` must be awaited from the same task.
    """

    def __init__(
        self,
        config: MockPartnerConfig | None = None,
        *,
        webhook_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._config = config if config is not None else MockPartnerConfig()
        self._webhook_client = webhook_client
        self._state = _State(started_at=None)
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._client: httpx.AsyncClient | aiohttp.ClientSession | None = None
        self._jobs = 0
        self._idle: anyio.Event | None = None
        self._waiting: set[_Post] = set()
        self._epoch_offset = 0.0

        # A plain coroutine function, not a bound method, so servers detect ASGI 3 on their own.
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await self._asgi(scope, receive, send)

        self.app: ASGIApp = app
        """The ASGI app (HTTP endpoints and, for servers, the lifespan that runs the partner)."""

    @property
    def config(self) -> MockPartnerConfig:
        """The behaviour; assigning a new one affects later POSTs and checks, keeping the state."""
        return self._config

    @config.setter
    def config(self, config: MockPartnerConfig) -> None:
        self._config = config

    @property
    def running(self) -> bool:
        return self._tg is not None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the task group for background jobs (and the default webhook client)."""
        if self._stack is not None:
            raise RuntimeError("MockPartner is already running")
        stack = AsyncExitStack()
        try:
            if self._webhook_client is None:
                # Not httpx: its pool bookkeeping made webhooks most of this process's CPU at a
                # few hundred payouts/s (docs/performance.md).
                timeout = self._config.webhook_timeout
                own = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=2.0),
                    timeout=aiohttp.ClientTimeout(total=timeout),
                    trust_env=False,
                )
                stack.push_async_callback(own.close)
                self._client = own
            else:
                self._client = self._webhook_client
            self._tg = await stack.enter_async_context(anyio.create_task_group())
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        if self._state.started_at is None:
            self._state.started_at = anyio.current_time()
        # Epoch time that advances with the loop (virtual in tests), anchored once, for
        # webhook timestamps: the receiver checks them against its own loop-anchored clock.
        self._epoch_offset = time.time() - anyio.current_time()

    async def stop(self) -> None:
        """Cancel pending background jobs; requests still waiting for an answer get a 503."""
        stack, tg = self._stack, self._tg
        if stack is None or tg is None:
            return
        self._stack = self._tg = None
        tg.cancel_scope.cancel()
        try:
            await stack.aclose()
        finally:
            self._client = None
            self._jobs = 0
            if self._idle is not None:
                self._idle.set()
            for post in self._waiting:
                post.answered.set()
            self._waiting.clear()

    async def __aenter__(self) -> MockPartner:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_idle(self) -> None:
        """Wait until every answer, landing and webhook due so far has happened.

        On a virtual-time loop this returns at once in real time, however long the partner's
        timeline is (up to ``late_landing_max`` plus webhook lags after the last POST).
        """
        while self._jobs and self._idle is not None:
            await self._idle.wait()

    def reset(self, config: MockPartnerConfig | None = None) -> None:
        """Forget all records, counters and callers (jobs still pending update nothing visible)."""
        if config is not None:
            self._config = config
        self._state = _State(started_at=_loop_time_or_none())

    # -- in-process views ----------------------------------------------------------------------

    def stats(self) -> MockPartnerStats:
        """Counters, exactly as ``GET /_mock/stats`` returns them."""
        s = self._state
        answers = s.answers
        return {
            "posts_total": sum(len(posts) for posts in s.posts.values()),
            "posts_max_per_id": max((len(posts) for posts in s.posts.values()), default=0),
            "double_payments": sorted(s.double_payments),
            "checks_total": s.checks_total,
            "checks_peak_per_second": max(s.checks_per_second.values(), default=0),
            "checks_per_second": {str(k): v for k, v in sorted(s.checks_per_second.items())},
            "blocks": s.blocks,
            "rate_limited_checks": s.rate_limited_checks,
            "webhooks_sent": s.webhooks_sent,
            "webhooks_failed": s.webhooks_failed,
            "answers": {
                "completed": answers["completed"],
                "declined": answers["declined"],
                "pending": answers["pending"],
                "timeout": answers["timeout"],
                "error": answers["error"],
            },
        }

    def record(self, payout_id: str) -> dict[str, str] | None:
        """The record ``GET /transaction/{id}`` would return now (without a rate-limit check)."""
        record = self._state.records.get(payout_id)
        return dict(record) if record is not None else None

    def truth(self) -> MockPartnerTruth:
        """The ground truth per id, exactly as ``GET /_mock/truth`` returns it."""
        s = self._state
        transactions: dict[str, TruthEntry] = {}
        for payout_id, posts in s.posts.items():
            record = s.records.get(payout_id)
            transactions[payout_id] = {
                "status": record["status"] if record is not None else None,
                "posts": len(posts),
                "settled": all(p.settled for p in posts),
                "double_payment": any(p.double_payment for p in posts),
            }
        return {"transactions": transactions}

    # -- background jobs -----------------------------------------------------------------------

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        tg = self._tg
        if tg is None:
            raise RuntimeError("MockPartner is not running")
        if self._jobs == 0:
            self._idle = anyio.Event()
        self._jobs += 1

        async def job() -> None:
            try:
                await fn(*args)
            finally:
                # stop() zeroes the count itself: cancelled jobs must not drive it negative.
                if self._tg is tg:
                    self._jobs -= 1
                    if self._jobs == 0 and self._idle is not None:
                        self._idle.set()

        tg.start_soon(job)

    async def _run_timeline(self, state: _State, post: _Post) -> None:
        events = post.plan.events()
        remaining = sum(1 for _, kind, _ in events if kind is not _Event.WEBHOOK)
        for at, kind, status in events:
            await anyio.sleep_until(post.requested_at + at * post.scale)
            if kind is _Event.WEBHOOK:
                payload = {"id": post.payout_id, "status": status}
                self._spawn(self._deliver_webhook, state, post.webhook_url, payload)
                continue
            if kind is _Event.ANSWER:
                state.answers[self._answer_key(post.plan)] += 1
                post.answer_sent = True
                self._waiting.discard(post)
                post.answered.set()
            else:
                self._write(state, post, status)
            remaining -= 1
            if remaining == 0:
                post.settled = True

    @staticmethod
    def _answer_key(plan: _Plan) -> str:
        match plan.answer:
            case _Answer.FINAL:
                return plan.status
            case _Answer.PENDING:
                return "pending"
            case _Answer.TIMEOUT:
                return "timeout"
            case _:
                return "error"

    @staticmethod
    def _write(state: _State, post: _Post, status: str) -> None:
        # Last write wins, like any store: an earlier POST's late update can overwrite a re-POST.
        state.records[post.payout_id] = {
            "id": post.payout_id,
            "status": status,
            "webhookUrl": post.webhook_url,
        }
        post.recorded = True

    async def _deliver_webhook(self, state: _State, url: str, payload: dict[str, str]) -> None:
        client = self._client
        if client is None:
            return
        state.webhooks_sent += 1
        body = json.dumps(payload).encode()
        headers = {"content-type": "application/json"}
        secret = self._config.webhook_secret
        if secret is not None:
            # Every delivery is a new message (own id): a duplicate webhook here models a
            # partner that sends the news twice, not a retry of one message.
            now = self._epoch_offset + anyio.current_time()
            headers |= _sign(secret, f"msg_{uuid.uuid4().hex}", int(now), body)
        try:
            if isinstance(client, aiohttp.ClientSession):
                async with client.post(url, data=body, headers=headers) as response:
                    code = response.status
                    await response.read()
            else:
                code = (await client.post(url, content=body, headers=headers)).status_code
        except Exception as exc:  # noqa: BLE001 - one attempt; an in-process receiver may raise anything
            state.webhooks_failed += 1
            logger.warning(
                "webhook %s for %s to %s failed: %r", payload["status"], payload["id"], url, exc
            )
            return
        if not 200 <= code < 300:
            state.webhooks_failed += 1
            logger.warning(
                "webhook %s for %s to %s answered %d",
                payload["status"],
                payload["id"],
                url,
                code,
            )

    # -- ASGI ----------------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        if path == "/transaction":
            if method != "POST":
                await _respond(send, 405, {"detail": "method not allowed"}, [(b"allow", b"POST")])
                return
            await self._handle_post(scope, receive, send)
        elif path.startswith("/transaction/") and "/" not in path[len("/transaction/") :]:
            if method != "GET":
                await _respond(send, 405, {"detail": "method not allowed"}, [(b"allow", b"GET")])
                return
            payout_id = path[len("/transaction/") :]
            await self._handle_check(scope, send, payout_id)
        elif path == "/_mock/stats" and method == "GET":
            await _respond(send, 200, self.stats())
        elif path == "/_mock/truth" and method == "GET":
            await _respond(send, 200, self.truth())
        elif path == "/_mock/reset" and method == "POST":
            await self._handle_reset(receive, send)
        else:
            await _respond(send, 404, {"detail": "not found"})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        try:
            await self.start()
        except Exception as exc:  # noqa: BLE001 - reported to the server, which then exits
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        try:
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
        finally:
            await self.stop()
        await send({"type": "lifespan.shutdown.complete"})

    async def _handle_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            data = json.loads(body)
        except ValueError:
            await _respond(send, 400, {"detail": "malformed JSON"})
            return
        problem = _validate_post(data)
        if problem is not None:
            await _respond(send, 422, {"detail": problem})
            return
        if self._tg is None:
            await _respond(send, 503, {"detail": "mock partner is not running"})
            return
        post = self._accept_post(data["id"], data["webhookUrl"], _caller(scope))
        await post.answered.wait()
        await self._answer(send, post)

    def _accept_post(self, payout_id: str, webhook_url: str, caller: str) -> _Post:
        config, state = self._config, self._state
        now = anyio.current_time()
        earlier = state.posts.setdefault(payout_id, [])
        number = len(earlier) + 1
        plan = _draw(config, payout_id, number)
        # A second transfer is possible when an earlier POST recorded anything, or could still
        # land as far as anyone outside the partner can tell (unanswered, or within its window).
        double = any(p.recorded or not p.answer_sent or now < p.window_end for p in earlier)
        post = _Post(
            payout_id=payout_id,
            number=number,
            webhook_url=webhook_url,
            requested_at=now,
            scale=config.time_scale,
            window_end=now + max(config.late_landing_max, config.timeout_after) * config.time_scale,
            plan=plan,
            double_payment=double,
        )
        earlier.append(post)
        if double and payout_id not in state.double_payments:
            state.double_payments.append(payout_id)
        if plan.record_at_once:
            self._write(state, post, "pending")
        self._waiting.add(post)
        self._spawn(self._run_timeline, state, post)
        logger.log(
            logging.WARNING if double else logging.INFO,
            "POST /transaction id=%s post=%d caller=%s%s: %s",
            payout_id,
            number,
            caller,
            " DOUBLE PAYMENT" if double else "",
            plan.describe(),
        )
        return post

    async def _answer(self, send: Send, post: _Post) -> None:
        if not post.answer_sent:
            await _respond(send, 503, {"detail": "mock partner stopped"})
            return
        plan = post.plan
        final = {"id": post.payout_id, "status": plan.status, "webhookUrl": post.webhook_url}
        match plan.answer:
            case _Answer.FINAL:
                await _respond(send, 200, final)
            case _Answer.PENDING:
                await _respond(send, 200, {**final, "status": "pending"})
            case _Answer.TIMEOUT:
                await _respond(send, 504, {"detail": "gateway timeout"})
            case _Answer.ERROR_500:
                await _respond(send, 500, {"detail": "internal server error"})
            case _Answer.GARBAGE:
                body = json.dumps(final).encode()
                await _respond_raw(send, 200, body[: len(body) // 2])
            case _Answer.DROP:
                body = json.dumps(final).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", _JSON),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                raise ConnectionDropped("mock partner dropped the connection (p_drop)")

    async def _handle_check(self, scope: Scope, send: Send, payout_id: str) -> None:
        config, state = self._config, self._state
        now = anyio.current_time()
        if state.started_at is None:
            state.started_at = now
        state.checks_total += 1
        state.checks_per_second[int((now - state.started_at) / config.time_scale)] += 1
        caller = state.callers.setdefault(_caller(scope), _Caller())
        if now < caller.blocked_until:
            await self._reject_check(send, caller.blocked_until - now)
            return
        window = caller.window
        horizon = now - config.rate_limit_window * config.time_scale + _WINDOW_EPSILON
        while window and window[0] <= horizon:
            window.popleft()
        if len(window) >= config.rate_limit_checks:
            window.clear()
            caller.blocked_until = now + config.block_penalty * config.time_scale
            state.blocks += 1
            logger.info("caller %s blocked: too many status checks", _caller(scope))
            await self._reject_check(send, caller.blocked_until - now)
            return
        window.append(now)
        record = state.records.get(payout_id)
        if record is None:
            await _respond(send, 404, {"detail": "not found"})
        else:
            await _respond(send, 200, record)

    async def _reject_check(self, send: Send, remaining: float) -> None:
        self._state.rate_limited_checks += 1
        # Retry-After is whole seconds; rounding up keeps an obedient client out of the block.
        retry_after = str(max(1, math.ceil(remaining))).encode()
        await _respond(send, 429, {"detail": "too many requests"}, [(b"retry-after", retry_after)])

    async def _handle_reset(self, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            config = _config_with_overrides(self._config, body)
        except (ValueError, TypeError) as exc:
            await _respond(send, 422, {"detail": str(exc)})
            return
        self.reset(config)
        await _respond(send, 200, {"reset": True})


def _config_with_overrides(config: MockPartnerConfig, body: bytes) -> MockPartnerConfig:
    if not body.strip():
        return config
    overrides = json.loads(body)
    if not isinstance(overrides, dict):
        raise TypeError("the body must be a JSON object of config overrides")
    return config.replace(**overrides)


def _caller(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-caller-id":
            return "id:" + bytes(value).decode("latin-1")
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "ip:unknown"


def _validate_post(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "the body must be a JSON object"
    payout_id = data.get("id")
    if not isinstance(payout_id, str) or not payout_id or "/" in payout_id:
        return "id must be a non-empty string without '/'"
    url = data.get("webhookUrl")
    if not isinstance(url, str):
        return "webhookUrl must be a string"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "webhookUrl is not a valid URL"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "webhookUrl must be an absolute http(s) URL"
    return None


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None if the client went away (nothing to answer then)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _respond_raw(send, status, json.dumps(payload).encode(), headers)


async def _respond_raw(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _JSON),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _HideDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every deliberate ``p_drop``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionDropped))


async def serve_mock_partner(
    config: MockPartnerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 3000,
    *,
    log_level: str = "info",
) -> None:
    """Serve the mock partner with uvicorn until cancelled (or SIGINT/SIGTERM).

    Logs one line per POST (no bodies) instead of uvicorn's access log. Needs ``uvicorn``
    (the ``server`` extra).
    """
    import uvicorn
    import uvicorn.config

    partner = MockPartner(config)
    log_config = dict(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"] = {
        **uvicorn.config.LOGGING_CONFIG["loggers"],
        __name__: {"handlers": ["default"], "level": log_level.upper(), "propagate": False},
    }
    server = uvicorn.Server(
        uvicorn.Config(
            partner.app,
            host=host,
            port=port,
            lifespan="on",
            access_log=False,
            log_level=log_level,
            log_config=log_config,
        )
    )
    hide_drops = _HideDrops()
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addFilter(hide_drops)
    try:
        await _serve_until_cancelled(server)
    finally:
        uvicorn_logger.removeFilter(hide_drops)


async def _serve_until_cancelled(server: Any) -> None:
    import asyncio

    async def serve() -> bool:
        # uvicorn calls sys.exit() when startup fails; a SystemExit escaping an asyncio task
        # would stop the whole event loop.
        try:
            await server.serve()
        except SystemExit:
            return False
        return True

    task = asyncio.ensure_future(serve())
    try:
        started = await asyncio.shield(task)
    except anyio.get_cancelled_exc_class():
        # Cancelling uvicorn mid-flight would skip its shutdown (open sockets, no lifespan end):
        # ask it to exit and wait for it instead.
        server.should_exit = True
        with anyio.CancelScope(shield=True):
            await task
        raise
    if not started:
        raise RuntimeError("the mock partner server failed to start (see uvicorn's log)")
