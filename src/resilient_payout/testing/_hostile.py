"""Hostile time for tests: stalls between deciding and sending, and instance clocks apart.

The client's money rules assume bounds (``Policy.max_send_delay``, ``Policy.max_clock_skew``);
these helpers let a test break the assumptions the client must survive anyway (an unbounded stall
after a write) and push the ones it claims to tolerate to their limit (a clock offset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from .._clock import Clock, LoopClock
from .._model import OutboxEntry, Payout, PayoutStatus

__all__ = ["SkewedClock", "StallingStorage"]


class SkewedClock:
    """A :class:`~resilient_payout.LoopClock` that runs ``offset`` seconds ahead (or behind)."""

    def __init__(self, offset: float, base: Clock | None = None) -> None:
        self.offset = offset
        self._base = base or LoopClock()

    def now(self) -> float:
        return self._base.now() + self.offset


class StallingStorage:
    """Wraps a storage; after a write that moved a payout into ``submitting``, the
    writer stalls for ``stall(payout)`` seconds before it gets the answer, as a process does when
    the loop lags, the GC runs or the VM freezes between committing and sending.

    Every other method is the wrapped storage's own.
    """

    def __init__(self, inner: Any, stall: Callable[[Payout], float]) -> None:
        self._inner = inner
        self._stall = stall
        self.stalls: list[tuple[str, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        # A new payout is created straight into ``submitting``: the same stall applies.
        stored, created = await self._inner.create_if_absent(payout)
        if created:
            await self._after_write(stored)
        return stored, created

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        stored: Payout | None = await self._inner.compare_and_set(
            payout, expected_version=expected_version, outbox=outbox
        )
        if stored is not None:
            await self._after_write(stored)
        return stored

    async def _after_write(self, stored: Payout) -> None:
        if stored.status is PayoutStatus.SUBMITTING:
            seconds = self._stall(stored)
            if seconds > 0:
                self.stalls.append((stored.id, seconds))
                await anyio.sleep(seconds)
