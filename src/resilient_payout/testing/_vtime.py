"""Virtual time for tests: an asyncio event loop whose clock jumps ahead whenever it is idle.

Built on ``looptime``: ``asyncio.sleep(120)`` returns at once in real time while ``loop.time()``
(and so :func:`anyio.current_time`, the check budget, tenacity's sleeps through anyio, and
:class:`~resilient_payout.LoopClock`) moves 120 s. Only in-process I/O is allowed under it (memory
storage, ``httpx.ASGITransport``), because waiting on real sockets or threads would let the
virtual clock run ahead of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from .._clock import VIRTUAL_LOOP_MARK

__all__ = ["VIRTUAL_TIME_BACKEND", "new_virtual_time_loop", "run_virtual"]

T = TypeVar("T")


def new_virtual_time_loop() -> asyncio.AbstractEventLoop:
    """A fresh asyncio loop on virtual time (starts at 0; idles fail after 1 virtual day)."""
    import looptime

    # Only in-process I/O runs on this loop, so the clock may jump as soon as every task waits:
    # a few no-op cycles (looptime's default is 42) make long simulations several times faster.
    loop: asyncio.AbstractEventLoop = looptime.new_event_loop(idle_timeout=86_400.0, noop_cycles=4)
    setattr(loop, VIRTUAL_LOOP_MARK, True)  # LoopClock must not re-anchor to the real wall clock
    return loop


VIRTUAL_TIME_BACKEND: tuple[str, dict[str, Any]] = (
    "asyncio",
    {"loop_factory": new_virtual_time_loop},
)
"""Return this from an ``anyio_backend`` pytest fixture to run a test on virtual time."""


def run_virtual(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)`` to completion on a fresh virtual-time loop."""
    backend, options = VIRTUAL_TIME_BACKEND
    return anyio.run(fn, *args, backend=backend, backend_options=options)
