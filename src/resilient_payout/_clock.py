"""Time, taken from the event loop (like aiolimiter) so that a virtual-time loop drives it all.

Payout times are stored as epoch seconds because they must survive a restart and are compared by
every instance sharing the storage. A :class:`LoopClock` anchors the loop's monotonic clock to
the wall clock, and re-anchors every ``resync_interval`` so that it follows an NTP step (instances
must stay within ``Policy.max_clock_skew`` of each other); it never runs backwards. Under a
virtual-time loop (see :mod:`resilient_payout.testing`) it never re-anchors, so every stored time
is virtual too.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Final, Protocol, runtime_checkable

__all__ = ["Clock", "LoopClock"]

VIRTUAL_LOOP_MARK: Final = "_resilient_payout_virtual_time"
"""An attribute set on event loops whose time is virtual: the wall clock means nothing there."""


@runtime_checkable
class Clock(Protocol):
    """An epoch-seconds time source (``PayoutClient(clock=...)``); `LoopClock` by default."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...


class _Anchor:
    __slots__ = ("follow", "last", "offset", "synced_at")

    def __init__(self, offset: float, synced_at: float, follow: bool) -> None:
        self.offset = offset
        self.synced_at = synced_at
        self.follow = follow
        self.last = float("-inf")


class LoopClock:
    """Epoch time that advances with the running event loop's clock.

    Every LoopClock in one event loop shares one anchor, so two clients in one process (say, a
    crashed one and its replacement in a test) always agree on the time. With an explicit
    ``epoch`` (or on a virtual-time loop) the anchor is fixed; otherwise it follows the wall
    clock every ``resync_interval`` seconds, holding still rather than going back after a
    backward step.
    """

    _anchors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Anchor] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, epoch: float | None = None, *, resync_interval: float = 30.0) -> None:
        self._epoch = epoch
        self._resync = resync_interval

    def now(self) -> float:
        loop = asyncio.get_running_loop()
        loop_now = loop.time()
        anchor = self._anchors.get(loop)
        if anchor is None:
            start = self._epoch if self._epoch is not None else time.time()
            follow = self._epoch is None and not getattr(loop, VIRTUAL_LOOP_MARK, False)
            anchor = self._anchors[loop] = _Anchor(start - loop_now, loop_now, follow)
        elif anchor.follow and loop_now - anchor.synced_at >= self._resync:
            anchor.offset = time.time() - loop_now
            anchor.synced_at = loop_now
        value = max(anchor.offset + loop_now, anchor.last)
        anchor.last = value
        return value
