"""Admission control: refuse new work at once, before anything is written, when the process is
already behind.

Framework-neutral: :class:`AdmissionGate` is used by the service's ``POST /transaction``
(docs/service.md) and by any host that calls :meth:`~resilient_payout.PayoutClient.submit`
itself. It refuses on either of two signals (benchmarks/overload.py measures them):

- **event-loop lag** (:class:`LoopLag`): how late the loop runs a timer. This is the signal that
  tracks overload: when offered more than it can do, one event loop falls behind in batches
  (each pass serves what arrived during the last, and takes longer), and every request waits in
  that queue *before* any handler runs, so no count kept inside the handlers sees it.
- **requests in flight** inside the gate: a bound for storage that awaits (PostgreSQL, Redis),
  where handlers overlap while they wait on the database. With SQLite a handler never yields and
  this count stays at one, however overloaded the loop.

The client's background work in flight (partner calls) is no signal: it is the accepted rate
times the partner's latency, high when the partner is slow and we are idle.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from contextlib import contextmanager

from ._errors import Overloaded

__all__ = ["AdmissionGate", "LoopLag", "retry_after_header"]


class LoopLag:
    """How far behind the running asyncio event loop is, in seconds, sampled only while asked.

    Each :meth:`sample` arms a timer ``interval`` ahead (unless one is armed); when it runs, how
    late it ran goes into a moving average (weight ``alpha``), which :meth:`sample` answers.
    Averaged, because one slow callback (a garbage collection, a burst of fsyncs) is no
    overload, while an overloaded loop is late on every pass. Nothing runs while nobody asks;
    after such a pause the average starts again from 0. Without a running asyncio loop (trio)
    it answers 0.
    """

    __slots__ = ("_due", "_fired_at", "_handle", "alpha", "average", "interval")

    def __init__(self, interval: float = 0.005, *, alpha: float = 0.25) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.interval = interval
        self.alpha = alpha
        self.average = 0.0
        """The moving average of how late the probes ran, in seconds."""
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._fired_at = -math.inf

    def sample(self) -> float:
        """The lag (seconds), arming the next probe."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return 0.0
        if self._handle is None:
            now = loop.time()
            if now - self._fired_at > 4 * self.interval:
                self.average = 0.0  # nobody asked for a while: the loop had time to spare
            self._due = now + self.interval
            self._handle = loop.call_at(self._due, self._fire, loop)
        return self.average

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self.average += self.alpha * (max(0.0, now - self._due) - self.average)
        self._fired_at = now
        self._handle = None


class AdmissionGate:
    """Refuses a holder with :class:`~resilient_payout.Overloaded` (whose ``retry_after`` is
    ``retry_after``) while ``limit`` are already in, or while the event loop is more than
    ``max_lag`` seconds behind (:class:`LoopLag`).

    ``limit`` 0 and ``max_lag`` 0 turn the bounds off (the gate then only counts). For one event
    loop: entering and leaving never await, so no lock is needed.
    """

    __slots__ = (
        "admitted",
        "in_flight",
        "lag",
        "limit",
        "max_lag",
        "peak",
        "retry_after",
        "shed",
        "shed_lag",
    )

    def __init__(self, limit: int, *, max_lag: float = 0.0, retry_after: float = 1.0) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0 (0: no bound)")
        if not (max_lag >= 0 and math.isfinite(max_lag)):
            raise ValueError("max_lag must be >= 0 (0: no bound)")
        if not retry_after > 0:
            raise ValueError("retry_after must be > 0")
        self.limit = limit
        self.max_lag = max_lag
        self.lag = LoopLag(min(0.005, max_lag / 2) if max_lag else 0.005)
        self.retry_after = retry_after
        self.in_flight = 0
        """Holders right now."""
        self.peak = 0
        """The most holders seen at once."""
        self.admitted = 0
        """Holders admitted so far."""
        self.shed = 0
        """Requests refused so far (for either reason)."""
        self.shed_lag = 0
        """Of those, refused because the event loop was behind."""

    def enter(self) -> None:
        """Take a slot, or raise :class:`~resilient_payout.Overloaded` (nothing is held)."""
        if self.limit and self.in_flight >= self.limit:
            self.shed += 1
            raise Overloaded(
                f"{self.in_flight} requests already in flight (the bound is {self.limit}); "
                "nothing was written, retry later",
                retry_after=self.retry_after,
            )
        if self.max_lag:
            lag = self.lag.sample()
            if lag > self.max_lag:
                self.shed += 1
                self.shed_lag += 1
                raise Overloaded(
                    f"the event loop is {lag * 1000:.0f} ms behind on average (the bound is "
                    f"{self.max_lag * 1000:.0f} ms); nothing was written, retry later",
                    retry_after=self.retry_after,
                )
        self.in_flight += 1
        self.admitted += 1
        self.peak = max(self.peak, self.in_flight)

    def leave(self) -> None:
        """Give back a slot taken by :meth:`enter`."""
        if self.in_flight <= 0:
            raise RuntimeError("AdmissionGate.leave() without enter()")
        self.in_flight -= 1

    @contextmanager
    def admit(self) -> Iterator[None]:
        """``with gate.admit(): ...``: a slot for the block, or :class:`Overloaded` before it."""
        self.enter()
        try:
            yield
        finally:
            self.leave()


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` as RFC 9110 wants it: whole seconds, here at least 1 (0 would invite an
    immediate retry storm)."""
    if not math.isfinite(seconds):
        return "1"
    return str(max(1, math.ceil(seconds)))
