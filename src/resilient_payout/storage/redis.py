"""Redis storage (``redis://...``). The status-check budget shared through Redis,
:class:`~resilient_payout.reconcile.redis.RedisCheckBudget`, is still importable from here.

:class:`RedisStorage` makes every decision in one Lua script (create-if-absent, compare-and-set
with its outbox entry, each claim, ack, retry), and Redis runs a script as one atomic step, so
any number of instances may share a server. Plain reads are single commands. Needs Redis 6.2
or newer (``ZRANGE ... BYSCORE``).

Keys, all under ``prefix``: a hash per payout (``p:<id>``: version, JSON document, status,
lease) and per outbox entry (``o:<id>``), sorted sets of due payouts (``idx:due``; split into
``idx:ready`` and ``idx:leased`` so a claim never rescans payouts in flight), of undelivered
entries (``idx:outbox``) and dead-lettered ones (``idx:dead``), and a hash of counts per status
(``counts``). Keys written before dead-lettering existed need no change: an entry without a
``dead_at`` field is alive, and a missing ``idx:dead`` counts zero. Scripts also touch keys
they compute from the prefix; on Redis Cluster put a hash tag in it (``{rp}:``) so every key
lands in one slot.

redis-py retries a command after a dropped connection. That is safe here even if the first try
did run: a repeated create finds the record (``created=False``, as for a repeat request), a
repeated compare-and-set finds the version moved on (a lost race: the caller re-reads), and a
repeated claim leaves the first claim's payouts leased until their lease ends.

Durability is Redis's: with ``appendonly yes`` and the default ``appendfsync everysec``, a
crash of the server can lose the last second of decisions, and a lost decision can mean a
second payment (see docs/storage.md, "Durability and money"). :meth:`RedisStorage.open` checks
the server's settings and logs a warning unless they are ``appendonly yes`` and ``appendfsync
always``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .._errors import StorageError
from .._model import OutboxEntry, Payout, PayoutStatus
from .._urls import redact_url as _redacted
from ._codec import decode_outbox, decode_payout, encode_payout, translated

if TYPE_CHECKING:
    from ..reconcile.redis import RedisCheckBudget as RedisCheckBudget

__all__ = ["RedisCheckBudget", "RedisStorage"]

log = logging.getLogger("resilient_payout.storage")

# "Not now": unreachable, loading, read-only after a failover, out of memory, cluster trouble.
_UNAVAILABLE: Final = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.TryAgainError,
    rex.ClusterDownError,
    OSError,
)

_CREATE = """
local found = redis.call('HMGET', KEYS[1], 'v', 'doc')
if found[1] then return {0, found[1], found[2]} end
redis.call('HSET', KEYS[1], 'v', '1', 'doc', ARGV[4], 'status', ARGV[2])
if ARGV[3] ~= '' and ARGV[5] == '0' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
return {1}
"""

_CAS = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v or tonumber(v) ~= tonumber(ARGV[2]) then return false end
local old = redis.call('HGET', KEYS[1], 'status')
local nv = redis.call('HINCRBY', KEYS[1], 'v', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'doc', ARGV[5])
redis.call('HDEL', KEYS[1], 'lo', 'lu')
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[4] ~= '' and ARGV[6] == '0' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if old ~= ARGV[3] then
  redis.call('HINCRBY', KEYS[5], old, -1)
  redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
end
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[6]) == 0 then
  redis.call('HSET', KEYS[6], 'status', ARGV[8], 'created_at', ARGV[9], 'at', ARGV[10],
             'attempts', ARGV[11])
  if ARGV[12] ~= '' then
    redis.call('HSET', KEYS[6], 'delivered_at', ARGV[12])
  elseif ARGV[14] ~= '' then
    redis.call('HSET', KEYS[6], 'dead_at', ARGV[14])
    redis.call('ZADD', KEYS[8], ARGV[14], ARGV[1])
  else
    redis.call('ZADD', KEYS[7], ARGV[10], ARGV[1])
  end
  if ARGV[13] ~= '' then redis.call('HSET', KEYS[6], 'error', string.sub(ARGV[13], 2)) end
end
return nv
"""

# Expired leases first go back among the candidates (idx:ready); a candidate whose lease is
# still running (only if `now` went back in time) goes back to idx:leased. Numbers are passed
# on as the strings they came in: Lua would print them with 14 digits only.
_CLAIM_DUE = """
local now = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE')) do
  redis.call('ZREM', KEYS[2], id)
  local nca = redis.call('ZSCORE', KEYS[3], id)
  if nca then redis.call('ZADD', KEYS[1], nca, id) end
end
local limit = tonumber(ARGV[4])
local out = {}
while #out < limit do
  local batch = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE',
                           'LIMIT', 0, limit - #out)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    local key = ARGV[5] .. id
    redis.call('ZREM', KEYS[1], id)
    local lu = redis.call('HGET', key, 'lu')
    if lu and tonumber(lu) > now then
      redis.call('ZADD', KEYS[2], lu, id)
    else
      local v = redis.call('HINCRBY', key, 'v', 1)
      redis.call('HSET', key, 'lo', ARGV[2], 'lu', ARGV[3])
      redis.call('ZADD', KEYS[2], ARGV[3], id)
      out[#out + 1] = {v, redis.call('HGET', key, 'doc')}
    end
  end
end
return out
"""

# The lease end becomes the next attempt, so a dead claimer's entry comes back by itself.
_CLAIM_OUTBOX = """
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE',
                               'LIMIT', 0, ARGV[4])) do
  local key = ARGV[5] .. id
  redis.call('HSET', key, 'at', ARGV[3], 'lo', ARGV[2], 'lu', ARGV[3])
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  local e = redis.call('HMGET', key, 'status', 'created_at', 'at', 'attempts',
                       'delivered_at', 'error', 'dead_at')
  out[#out + 1] = {id, e[1], e[2], e[3], e[4], e[5], e[6], e[7]}
end
return out
"""

_ACK_OUTBOX = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'delivered_at') == 1
then return 0 end
redis.call('HSET', KEYS[1], 'delivered_at', ARGV[2])
redis.call('HDEL', KEYS[1], 'lo', 'lu', 'dead_at')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# Delivered or dead entries are left alone by a retry and by a dead-lettering.
_LIVE_OUTBOX_ONLY = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'delivered_at') == 1
   or redis.call('HEXISTS', KEYS[1], 'dead_at') == 1
then return 0 end
"""

_RETRY_OUTBOX = (
    _LIVE_OUTBOX_ONLY
    + """
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'at', ARGV[2], 'error', ARGV[3])
redis.call('HDEL', KEYS[1], 'lo', 'lu')
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""
)

# Out of idx:outbox (never claimed again), into idx:dead (counted).
_DEAD_LETTER_OUTBOX = (
    _LIVE_OUTBOX_ONLY
    + """
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'dead_at', ARGV[2], 'error', ARGV[3])
redis.call('HDEL', KEYS[1], 'lo', 'lu')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return 1
"""
)

_REQUEUE_OUTBOX = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'dead_at', 'delivered_at', 'lo', 'lu')
redis.call('HSET', KEYS[1], 'at', ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

_OUTBOX_FIELDS: Final = (
    "status",
    "created_at",
    "at",
    "attempts",
    "delivered_at",
    "error",
    "dead_at",
)


def _num(value: float) -> str:
    """A float as the exact decimal string Redis and Lua parse back to the same double."""
    return repr(float(value))


def _translated() -> contextlib.AbstractContextManager[None]:
    # Wrong credentials are a configuration error (redis-py files them under connection
    # errors): retrying won't help.
    return translated(
        "Redis",
        _UNAVAILABLE,
        (rex.RedisError,),
        fatal=(rex.AuthenticationError, rex.AuthorizationError),
    )


def _client(
    url: str, *, retries: int, socket_timeout: float, max_connections: int
) -> aioredis.Redis:
    # A *blocking* pool: a burst of background work waits for a free connection (up to
    # socket_timeout) instead of failing with MaxConnectionsError, which would surface as
    # StorageUnavailable (503) under load.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        client_name="resilient_payout",
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries),
    )
    return aioredis.Redis(connection_pool=pool)


class RedisStorage:
    """The :class:`~resilient_payout.storage.Storage` contract on a Redis server.

    ``url`` is anything redis-py accepts (``redis://:pw@host:6379/0``, ``rediss://`` for TLS).
    Every key starts with ``prefix``, so deployments can share a database. A dropped connection
    is retried ``retries`` times (with backoff) before
    :class:`~resilient_payout.StorageUnavailable`; ``socket_timeout`` bounds each command and the
    wait for one of the ``max_connections`` pooled connections.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rp:",
        retries: int = 3,
        socket_timeout: float = 5.0,
        max_connections: int = 50,
    ) -> None:
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty")
        self._url = url
        self._prefix = prefix
        self._retries = retries
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._lock = anyio.Lock()
        self._due = prefix + "idx:due"
        self._ready = prefix + "idx:ready"
        self._leased = prefix + "idx:leased"
        self._outbox_due = prefix + "idx:outbox"
        self._outbox_dead = prefix + "idx:dead"
        self._counts = prefix + "counts"

    @classmethod
    def from_url(cls, url: str) -> RedisStorage:
        """``redis://`` or ``rediss://`` URLs; option ``?prefix=`` (default ``rp:``). Other
        query parameters go to redis-py (``socket_timeout``, ``db``...)."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss") or not parts.netloc:
            raise ValueError(f"not a Redis URL: {url!r} (use redis://host:6379/0)")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((v for k, v in reversed(query) if k == "prefix"), "rp:")
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        return cls(urlunsplit(parts._replace(query=rest)), prefix=prefix)

    @property
    def prefix(self) -> str:
        return self._prefix

    def __repr__(self) -> str:
        return f"RedisStorage({_redacted(self._url)!r}, prefix={self._prefix!r})"

    def _payout_key(self, payout_id: str) -> str:
        return f"{self._prefix}p:{payout_id}"

    def _outbox_key(self, payout_id: str) -> str:
        return f"{self._prefix}o:{payout_id}"

    # -- connection ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check the server answers. Idempotent; there is no schema to create."""
        async with self._lock:
            if self._redis is not None:
                return
            client = _client(
                self._url,
                retries=self._retries,
                socket_timeout=self._socket_timeout,
                max_connections=self._max_connections,
            )
            try:
                with _translated():
                    await client.ping()
                    await self._check_durability(client)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await client.aclose()
                raise
            self._scripts = {
                name: client.register_script(source)
                for name, source in {
                    "create": _CREATE,
                    "cas": _CAS,
                    "claim_due": _CLAIM_DUE,
                    "claim_outbox": _CLAIM_OUTBOX,
                    "ack_outbox": _ACK_OUTBOX,
                    "retry_outbox": _RETRY_OUTBOX,
                    "dead_letter_outbox": _DEAD_LETTER_OUTBOX,
                    "requeue_outbox": _REQUEUE_OUTBOX,
                }.items()
            }
            self._redis = client

    async def _check_durability(self, client: aioredis.Redis) -> None:
        """Log (once per open) whether the server keeps every acknowledged write on disk."""
        try:
            found = await client.config_get("append*")  # one pattern: Redis 6.2 takes only one
        except rex.ResponseError as exc:  # CONFIG renamed or refused (managed Redis, ACLs)
            found, reason = {}, f"CONFIG GET refused: {exc}"
        else:
            reason = "CONFIG GET did not return appendonly and appendfsync"
        appendonly, appendfsync = found.get("appendonly"), found.get("appendfsync")
        if appendonly is None or appendfsync is None:
            log.info(
                "Redis %s: durability could not be verified (%s); make sure it runs with "
                "appendonly yes and appendfsync always",
                _redacted(self._url),
                reason,
            )
            return
        if (appendonly.lower(), appendfsync.lower()) != ("yes", "always"):
            log.warning(
                "Redis %s runs with appendonly %s, appendfsync %s: a restart or failover can roll "
                "recent decisions back, so a payout already being submitted can return to "
                "'received' and be POSTed to the partner again (a second payment), and a "
                "delivered outcome can return to undelivered and be pushed to the app again. "
                "Use appendonly yes and appendfsync always (docs/storage.md, Durability and "
                "money)",
                _redacted(self._url),
                appendonly,
                appendfsync,
            )

    async def close(self) -> None:
        async with self._lock:
            client, self._redis = self._redis, None
            if client is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(*_UNAVAILABLE):
                    await client.aclose()

    def _conn(self) -> aioredis.Redis:
        if self._redis is None:
            raise StorageError("RedisStorage is not open: call open() first")
        return self._redis

    async def _run(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        self._conn()
        with _translated():
            return await self._scripts[script](keys=keys, args=args)

    # -- the contract -------------------------------------------------------------------------

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        doc = encode_payout(payout)
        nca = "" if payout.next_check_at is None else _num(payout.next_check_at)
        result = await self._run(
            "create",
            [self._payout_key(payout.id), self._due, self._ready, self._counts],
            [payout.id, payout.status.value, nca, doc, "1" if payout.is_final else "0"],
        )
        if result[0] == 1:
            return decode_payout(1, doc), True
        return decode_payout(result[1], result[2]), False

    async def get(self, payout_id: str) -> Payout | None:
        client = self._conn()
        with _translated():
            version, doc = await client.hmget(self._payout_key(payout_id), ["v", "doc"])
        return None if version is None or doc is None else decode_payout(version, doc)

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        if outbox is not None and outbox.payout_id != payout.id:
            raise ValueError(f"outbox entry for {outbox.payout_id!r} given with {payout.id!r}")
        doc = encode_payout(payout)
        nca = "" if payout.next_check_at is None else _num(payout.next_check_at)
        args: list[str | int] = [
            payout.id,
            expected_version,
            payout.status.value,
            nca,
            doc,
            "1" if payout.is_final else "0",
        ]
        if outbox is None:
            args += ["0", "", "", "", 0, "", "", ""]
        else:
            args += [
                "1",
                outbox.status.value,
                _num(outbox.created_at),
                _num(outbox.next_attempt_at),
                outbox.attempts,
                "" if outbox.delivered_at is None else _num(outbox.delivered_at),
                # A leading "=" tells an empty error from no error.
                "" if outbox.last_error is None else "=" + outbox.last_error,
                "" if outbox.dead_at is None else _num(outbox.dead_at),
            ]
        keys = [
            self._payout_key(payout.id),
            self._due,
            self._ready,
            self._leased,
            self._counts,
            self._outbox_key(payout.id),
            self._outbox_due,
            self._outbox_dead,
        ]
        version = await self._run("cas", keys, args)
        return None if version is None or doc is None else decode_payout(version, doc)

    async def claim_due(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Payout]:
        if limit <= 0:
            return []
        rows = await self._run(
            "claim_due",
            [self._ready, self._leased, self._due],
            [_num(now), owner, _num(now + lease_seconds), limit, self._prefix + "p:"],
        )
        return [decode_payout(version, doc) for version, doc in rows]  # already earliest first

    async def next_due_at(self) -> float | None:
        client = self._conn()
        with _translated():
            first = await client.zrange(self._due, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def claim_outbox(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[OutboxEntry]:
        if limit <= 0:
            return []
        rows = await self._run(
            "claim_outbox",
            [self._outbox_due],
            [_num(now), owner, _num(now + lease_seconds), limit, self._prefix + "o:"],
        )
        entries = [decode_outbox(*row) for row in rows]
        entries.sort(key=lambda e: e.payout_id)  # all share next_attempt_at == lease end
        return entries

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        await self._run(
            "ack_outbox",
            [self._outbox_key(payout_id), self._outbox_due, self._outbox_dead],
            [payout_id, _num(delivered_at)],
        )

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        await self._run(
            "retry_outbox",
            [self._outbox_key(payout_id), self._outbox_due],
            [payout_id, _num(next_attempt_at), error],
        )

    async def dead_letter_outbox(self, payout_id: str, *, at: float, error: str) -> None:
        await self._run(
            "dead_letter_outbox",
            [self._outbox_key(payout_id), self._outbox_due, self._outbox_dead],
            [payout_id, _num(at), error],
        )

    async def requeue_outbox(self, payout_id: str, *, next_attempt_at: float) -> bool:
        done = await self._run(
            "requeue_outbox",
            [self._outbox_key(payout_id), self._outbox_due, self._outbox_dead],
            [payout_id, _num(next_attempt_at)],
        )
        return bool(done)

    async def count_dead_outbox(self) -> int:
        client = self._conn()
        with _translated():
            n = await client.zcard(self._outbox_dead)
        return int(n)

    async def get_outbox(self, payout_id: str) -> OutboxEntry | None:
        client = self._conn()
        with _translated():
            fields = await client.hmget(self._outbox_key(payout_id), list(_OUTBOX_FIELDS))
        return None if fields[0] is None else decode_outbox(payout_id, *fields)

    async def count_by_status(self) -> dict[PayoutStatus, int]:
        client = self._conn()
        with _translated():
            stored = await client.hgetall(self._counts)
        counts = dict.fromkeys(PayoutStatus, 0)
        for status, n in stored.items():
            counts[PayoutStatus(str(status))] = int(n)
        return counts


def __getattr__(name: str) -> Any:
    # RedisCheckBudget moved to reconcile.redis, which imports this module's client and error
    # translation: resolved on first use, so neither module needs the other half-imported.
    if name == "RedisCheckBudget":
        from ..reconcile.redis import RedisCheckBudget

        return RedisCheckBudget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
