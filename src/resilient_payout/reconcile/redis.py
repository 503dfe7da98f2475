"""A status-check budget shared by every process through Redis: :class:`RedisCheckBudget`.

Needs the ``[redis]`` extra; ``import resilient_payout.reconcile`` does not import this module.
Also importable as ``resilient_payout.storage.redis.RedisCheckBudget`` (its first home).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Final

import anyio

from .._closing import AsyncClosing
from .._errors import StorageUnavailable
from .._extras import needs_extra

with needs_extra("redis", "RedisCheckBudget (RP_BUDGET_URL)"):
    import redis.asyncio as aioredis

    from ..storage.redis import _UNAVAILABLE, _client, _translated

__all__ = ["RedisCheckBudget"]

# The logger it has always logged to (its outage warnings), whatever module it lives in.
log = logging.getLogger("resilient_payout.storage")

# GCRA on Redis's clock, in integer microseconds (exact in a double up to 2**53, i.e. for
# centuries of epoch time). KEYS: theoretical arrival time, pause flag. ARGV: emission interval
# and burst tolerance, in µs. Returns {µs to wait (0: granted), server time in µs}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return {paused * 1000, now} end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = math.ceil(tat + interval)
local wait = new_tat - now - tolerance
if wait > 0 then return {math.ceil(wait), now} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', string.format('%.0f', math.ceil((new_tat - now) / 1000) + 1))
return {0, now}
"""

_OUTAGE_BACKOFF_MIN: Final = 0.05
_OUTAGE_BACKOFF_MAX: Final = 2.0

# A pause only ever lengthens: a short Retry-After must not cut a longer penalty short.
_PAUSE = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return 0
"""


class RedisCheckBudget(AsyncClosing):
    """One status-check budget for every process: ``rate`` checks per second, bursts of
    ``burst``, so over any window of ``T`` seconds at most ``burst + rate * T`` checks go out,
    counted across all processes sharing ``key`` on one Redis server.

    The limiter is GCRA (a leaky bucket kept as one timestamp) in a Lua script that reads the
    time with Redis ``TIME``: every process uses the server's clock, so skewed machine clocks
    change nothing, and the check-and-count is one atomic step. :meth:`acquire` sleeps for the
    delay the script returns and tries again. :meth:`pause` sets ``<key>:pause`` with a TTL,
    which every ``acquire`` honours within the same script. Why not the ``limits`` library: its
    moving-window strategy only answers "allowed now?" (no delay to wait for, so a caller must
    poll), and it has no shared pause; GCRA's state is one key and its answer is the exact wait.

    Unlike :class:`~resilient_payout.LocalCheckBudget`, it does not start full: the state
    outlives restarts of any process, and an absent key means no check for ``burst / rate``
    seconds or more, which is a full bucket anyway. ``url_or_client``: a Redis URL (the budget
    then owns its client: close it with :meth:`aclose` or ``async with``) or a
    ``redis.asyncio.Redis`` client (left open).

    While Redis is unreachable, :meth:`acquire` keeps waiting (retrying with backoff, logging a
    warning): no check goes out uncounted. :meth:`pause` raises
    :class:`~resilient_payout.StorageUnavailable` then; other Redis errors (wrong password...)
    raise :class:`~resilient_payout.StorageError`.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        rate: float,
        burst: int,
        key: str = "rp:budget",
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        if isinstance(url_or_client, str):
            self._redis = _client(url_or_client, retries=3, socket_timeout=5.0, max_connections=8)
            self._owned = True
        else:
            self._redis = url_or_client
            self._owned = False
        self.rate = rate
        self.burst = burst
        self.key = key
        self._interval_us = 1_000_000 / rate
        self._gcra = self._redis.register_script(_GCRA)
        self._pause = self._redis.register_script(_PAUSE)
        self.sent = 0
        self.pauses = 0
        self.last_acquired_at: float | None = None
        """Redis server time (epoch seconds) at which the last :meth:`acquire` was granted."""

    async def acquire(self) -> None:
        keys = [self.key, self.key + ":pause"]
        args = [repr(self._interval_us), repr(self._interval_us * self.burst)]
        backoff = _OUTAGE_BACKOFF_MIN
        while True:
            try:
                with _translated():
                    wait_us, now_us = await self._gcra(keys=keys, args=args)
            except StorageUnavailable as exc:
                # No check may go out uncounted, and raising would stop the caller's check loop:
                # wait for Redis to come back.
                log.warning("check budget: %s; trying again in %.2fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, _OUTAGE_BACKOFF_MAX)
                continue
            backoff = _OUTAGE_BACKOFF_MIN
            if int(wait_us) <= 0:
                self.sent += 1
                self.last_acquired_at = int(now_us) / 1_000_000
                return
            await anyio.sleep(int(wait_us) / 1_000_000)

    async def pause(self, seconds: float) -> None:
        self.pauses += 1
        ms = math.ceil(seconds * 1000)
        if ms <= 0:
            return
        with _translated():
            await self._pause(keys=[self.key + ":pause"], args=[str(ms)])

    async def aclose(self) -> None:
        """Close the client if this budget created it."""
        if self._owned:
            with anyio.CancelScope(shield=True), contextlib.suppress(*_UNAVAILABLE):
                await self._redis.aclose()
