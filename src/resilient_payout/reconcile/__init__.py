"""Status checks are the scarce resource: every one goes through a :class:`CheckBudget`.

The partner blocks callers that check too often, so the whole process (and, with a shared budget,
the whole cluster) spends checks from one budget of ``check_rate`` per second with bursts of
``check_burst``: over any window of ``T`` seconds at most ``check_burst + check_rate * T`` checks
go out. A 429 from the partner pauses every check for the penalty (or ``Retry-After``).

When checks are due is decided by the lifecycle (:func:`~resilient_payout.plan_next_check`);
this module only rations them. One budget for every process sharing a Redis server:
:class:`~resilient_payout.reconcile.redis.RedisCheckBudget` (the ``[redis]`` extra).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import anyio

__all__ = ["CheckBudget", "LocalCheckBudget"]

# Waits are never shorter: a clock with finite resolution (every virtual clock) may not move for
# a shorter sleep, and the waiter would spin.
_MIN_WAIT = 0.001
# Float noise allowance when comparing times (a nanosecond early is not a violation worth a spin).
_EPS = 1e-9


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
    """An in-process budget: GCRA (the leaky bucket as a meter) on the event loop's clock.

    A check is allowed once the clock reaches the bucket's theoretical arrival time minus the
    burst tolerance, so over any window of ``T`` seconds at most ``burst + rate * T`` checks go out.
    The bucket starts *full*: the first check waits ``1 / rate``, because checks a previous process
    sent just before a restart may still count in the partner's window.

    Why not aiolimiter (which we used first): its waiter re-arms a timer at ``last_check +
    needed / rate``; float residue can make that "now", and on a clock that advances only when
    the loop is idle (the virtual-time loop every test here runs on) it re-arms forever.
    """

    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._tat: float | None = None
        self._paused_until = float("-inf")
        self.sent = 0
        self.pauses = 0

    async def acquire(self) -> None:
        while True:
            now = anyio.current_time()
            if self._tat is None:
                self._tat = now + self.burst * self._interval
            allowed_at = max(self._tat - self._tolerance, self._paused_until)
            if now >= allowed_at - _EPS:
                # No await between the test and the update: atomic within the event loop.
                self._tat = max(self._tat, now) + self._interval
                self.sent += 1
                return
            await anyio.sleep(max(allowed_at - now, _MIN_WAIT))

    async def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, anyio.current_time() + seconds)
        self.pauses += 1
