"""Telling an adapter's own failure from a cancellation of ours."""

from __future__ import annotations

import asyncio

__all__ = ["adapter_fault"]


def adapter_fault(exc: BaseException) -> bool:
    """Whether an adapter's exception is its own failure, to be taken as an outcome: any
    Exception, and an ``asyncio.CancelledError`` that no cancellation of ours caused (a library
    leaking one must not stop the client). Real cancellation, KeyboardInterrupt and SystemExit
    propagate."""
    if isinstance(exc, Exception):
        return True
    if not isinstance(exc, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not on asyncio (trio): trio never raises a stray one
        return False
    return task is not None and task.cancelling() == 0
