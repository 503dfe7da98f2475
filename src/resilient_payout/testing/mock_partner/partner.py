"""``MockPartner``: ties the plan, the state and the endpoints together and runs each POST's
timeline (answer, record updates, late landing, webhooks) as background jobs."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import anyio
import anyio.abc
import httpx

from ._endpoints import ASGIApp, Receive, Scope, Send, route
from ._log import log
from ._plan import Event
from ._signing import sign
from ._state import MockPartnerStats, MockPartnerTruth, Post, State
from .config import MockPartnerConfig

__all__ = ["MockPartner"]


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
        self._state = State(started_at=None)
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._client: httpx.AsyncClient | aiohttp.ClientSession | None = None
        self._jobs = 0
        self._idle: anyio.Event | None = None
        self._waiting: set[Post] = set()
        self._epoch_offset = 0.0

        # A plain coroutine function, not a bound method, so servers detect ASGI 3 on their own.
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await route(self, scope, receive, send)

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
        self._state = State(started_at=_loop_time_or_none())

    # -- in-process views ----------------------------------------------------------------------

    def stats(self) -> MockPartnerStats:
        """Counters, exactly as ``GET /_mock/stats`` returns them."""
        return self._state.stats()

    def record(self, payout_id: str) -> dict[str, str] | None:
        """The record ``GET /transaction/{id}`` would return now (without a rate-limit check)."""
        record = self._state.records.get(payout_id)
        return dict(record) if record is not None else None

    def truth(self) -> MockPartnerTruth:
        """The ground truth per id, exactly as ``GET /_mock/truth`` returns it."""
        return self._state.truth()

    # -- for the endpoints ---------------------------------------------------------------------

    def _held_post(self, payout_id: str, key: str) -> Post | None:
        return self._state.held(self._config, payout_id, key, anyio.current_time())

    def _accept_post(
        self, payout_id: str, webhook_url: str, caller: str, key: str | None = None
    ) -> Post:
        state = self._state
        post = state.add_post(self._config, payout_id, webhook_url, anyio.current_time(), key)
        self._waiting.add(post)
        self._start_job(self._run_timeline, state, post)
        log.log(
            logging.WARNING if post.double_payment else logging.INFO,
            "POST /transaction id=%s post=%d caller=%s%s: %s",
            payout_id,
            post.number,
            caller,
            " DOUBLE PAYMENT" if post.double_payment else "",
            post.plan.describe(),
        )
        return post

    def _admit_check(self, caller: str) -> float | None:
        return self._state.admit_check(self._config, caller, anyio.current_time())

    # -- background jobs -----------------------------------------------------------------------

    def _start_job(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
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

    async def _run_timeline(self, state: State, post: Post) -> None:
        events = post.plan.events()
        remaining = sum(1 for _, kind, _ in events if kind is not Event.WEBHOOK)
        for at, kind, status in events:
            await anyio.sleep_until(post.requested_at + at * post.scale)
            if kind is Event.WEBHOOK:
                payload = {"id": post.payout_id, "status": status}
                self._start_job(self._deliver_webhook, state, post.webhook_url, payload)
                continue
            if kind is Event.ANSWER:
                state.answers[post.plan.answer_key()] += 1
                post.answer_sent = True
                self._waiting.discard(post)
                post.answered.set()
            else:
                state.write(post, status)
            remaining -= 1
            if remaining == 0:
                post.settled = True

    async def _deliver_webhook(self, state: State, url: str, payload: dict[str, str]) -> None:
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
            headers |= sign(secret, f"msg_{uuid.uuid4().hex}", int(now), body)
        try:
            if isinstance(client, aiohttp.ClientSession):
                async with client.post(url, data=body, headers=headers) as response:
                    code = response.status
                    await response.read()
            else:
                code = (await client.post(url, content=body, headers=headers)).status_code
        except Exception as exc:  # noqa: BLE001 - one attempt; an in-process receiver may raise anything
            state.webhooks_failed += 1
            log.warning(
                "webhook %s for %s to %s failed: %r", payload["status"], payload["id"], url, exc
            )
            return
        if not 200 <= code < 300:
            state.webhooks_failed += 1
            log.warning(
                "webhook %s for %s to %s answered %d",
                payload["status"],
                payload["id"],
                url,
                code,
            )
