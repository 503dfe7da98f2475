"""Time, taken from the event loop (like aiolimiter) so that a virtual-time loop drives it all.

Payout times are stored as epoch seconds because they must survive a restart; a
:class:`LoopClock` anchors the loop's monotonic clock to the wall clock once, so within a process
it never jumps with NTP, and under a virtual-time loop (see :mod:`resilient_payout.testing`)
every stored time is virtual too.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "LoopClock"]


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class LoopClock:
    """Epoch time that advances with the running event loop's clock.

    Every LoopClock in one event loop shares one anchor, so two clients in one process (say, a
    crashed one and its replacement in a test) always agree on the time.
    """

    _anchors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, float] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, epoch: float | None = None) -> None:
        self._epoch = epoch

    def now(self) -> float:
        loop = asyncio.get_running_loop()
        loop_now = loop.time()
        offset = self._anchors.get(loop)
        if offset is None:
            start = self._epoch if self._epoch is not None else time.time()
            offset = self._anchors[loop] = start - loop_now
        return offset + loop_now
