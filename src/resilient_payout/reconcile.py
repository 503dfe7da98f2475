"""Status checks are the scarce resource: every one goes through a :class:`CheckBudget`.

The partner blocks callers that check too often, so the whole process (and, with a shared budget,
the whole cluster) spends checks from one budget of ``check_rate`` per second with bursts of
``check_burst``: over any window of ``T`` seconds at most ``check_burst + check_rate * T`` checks
go out. A 429 from the partner pauses every check for the penalty (or ``Retry-After``).

When checks are due is decided by the lifecycle (:func:`~resilient_payout.plan_next_check`);
this module only rations them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import anyio
from aiolimiter import AsyncLimiter

__all__ = ["CheckBudget", "LocalCheckBudget"]


@runtime_checkable
class CheckBudget(Protocol):
    """A rate limit on status checks, shared by everything that checks."""

    async def acquire(self) -> None:
        """Wait until one more check may be sent, and count it as sent."""
        ...

    async def pause(self, seconds: float) -> None:
        """Send no check for ``seconds`` (the partner said "too many")."""
        ...


class LocalCheckBudget:
    """An in-process budget: aiolimiter's leaky bucket plus a pause.

    It starts *full*: nothing goes out during the first ``burst / rate`` seconds, because checks
    sent just before a restart may still count in the partner's window.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._limiter = AsyncLimiter(max_rate=burst, time_period=burst / rate)
        self._paused_until: float | None = None
        self.sent = 0
        self.pauses = 0

    async def acquire(self) -> None:
        if self._paused_until is None:
            self._paused_until = anyio.current_time() + self.burst / self.rate
        while True:
            wait = self._paused_until - anyio.current_time()
            if wait > 0:
                await anyio.sleep(wait)
                continue
            await self._limiter.acquire()
            # A pause may have begun while we queued for a token: honour it.
            if anyio.current_time() >= self._paused_until:
                self.sent += 1
                return

    async def pause(self, seconds: float) -> None:
        until = anyio.current_time() + seconds
        if self._paused_until is None or until > self._paused_until:
            self._paused_until = until
        self.pauses += 1
