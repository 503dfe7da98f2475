"""Webhook replay stores every process shares: :class:`RedisReplayStore` and
:class:`PostgresReplayStore`, re-exported by :mod:`resilient_payout.webhooks`.

A mark holds its expiry on the caller's clock (the ``now`` the verifier judges staleness by), and
a mark is live while ``expires_at > now``, as in
:class:`~resilient_payout.webhooks.InMemoryReplayStore`. So a message stays refused exactly as
long as it is fresh on the clock of the instance it reaches; a server-side TTL alone (Redis ``SET
NX PX``) would end the mark early on an instance whose clock lags the one that set it. Each
:meth:`add` is one atomic step on the server (a Lua script; one ``INSERT ... ON CONFLICT``), never
a read then a write. The server also forgets a mark ``grace`` seconds after it expired (Redis
TTL; PostgreSQL pruning), so instances whose clocks lag by less than that still find it.

Every :meth:`add` writes a random token with its mark: a command re-sent after a dropped connection
(it may have run) finds its own mark and answers True again, not "replayed".

The drivers are the ``[redis]`` and ``[postgres]`` extras, imported on first use only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import secrets
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

from ._errors import StorageError, StorageUnavailable
from ._extras import needs_extra
from ._urls import redact_url

if TYPE_CHECKING:
    import asyncpg
    import redis.asyncio as aioredis

__all__ = ["PostgresReplayStore", "RedisReplayStore", "replay_store_for"]

log = logging.getLogger("resilient_payout.webhooks")

_GRACE: Final = 60.0

# KEYS[1]: the mark. ARGV: expires_at, token, now, TTL in ms. A live mark (expiry > now) wins
# unless it is this very call's (its token): a re-sent command must not refuse itself.
_ADD_SCRIPT = """
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, ' ', 1, true)
  if sep and tonumber(string.sub(v, 1, sep - 1)) > tonumber(ARGV[3]) then
    if string.sub(v, sep + 1) == ARGV[2] then return 1 end
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[4])
return 1
"""


def _token() -> str:
    return secrets.token_hex(8)


def _checked(expires_at: float, now: float) -> tuple[float, float]:
    if not (math.isfinite(expires_at) and math.isfinite(now)):
        raise ValueError("expires_at and now must be finite epoch seconds")
    return float(expires_at), float(now)


class _Opened:
    """``async with``: :meth:`open` on entry, :meth:`close` on exit."""

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _redis_module() -> ModuleType:
    with needs_extra("redis", "RedisReplayStore (redis:// storage URLs)"):
        from .storage import redis as module
    return module


def _postgres_module() -> ModuleType:
    with needs_extra("postgres", "PostgresReplayStore (postgresql:// storage URLs)"):
        from .storage import postgres as module
    return module


class RedisReplayStore(_Opened):
    """A :class:`~resilient_payout.webhooks.ReplayStore` on a Redis server, for every process
    that uses it.

    Each mark is one key ``<prefix><key>`` holding its expiry and token, written by a script
    that Redis runs as one atomic step, with a TTL of the time left plus ``grace`` seconds (so
    Redis frees it; keep ``maxmemory-policy noeviction``, as the storage needs anyway). ``url``
    is anything redis-py accepts; ``retries``, ``socket_timeout`` and ``max_connections`` as for
    :class:`~resilient_payout.storage.redis.RedisStorage`. Use ``open()``/``close()`` or
    ``async with``; an unreachable server is a :class:`~resilient_payout.StorageUnavailable`.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rp:replay:",
        grace: float = _GRACE,
        retries: int = 3,
        socket_timeout: float = 5.0,
        max_connections: int = 8,
    ) -> None:
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty")
        if not grace >= 0:
            raise ValueError("grace must be >= 0")
        self._url = url
        self.prefix = prefix
        self.grace = grace
        self._retries = retries
        self._socket_timeout = socket_timeout
        self._max_connections = max_connections
        self._redis: aioredis.Redis | None = None
        self._script: Any = None
        self._lock = anyio.Lock()

    @classmethod
    def from_url(cls, url: str) -> RedisReplayStore:
        """From a Redis storage URL (``RP_STORAGE_URL``): marks go under the storage's
        ``?prefix=`` (default ``rp:``) plus ``replay:``; other query parameters go to redis-py."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("redis", "rediss") or not parts.netloc:
            raise ValueError(f"not a Redis URL: {redact_url(url)!r} (use redis://host:6379/0)")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((v for k, v in reversed(query) if k == "prefix"), "rp:")
        rest = urlencode([(k, v) for k, v in query if k != "prefix"])
        return cls(urlunsplit(parts._replace(query=rest)), prefix=prefix + "replay:")

    def __repr__(self) -> str:
        return f"RedisReplayStore({redact_url(self._url)!r}, prefix={self.prefix!r})"

    async def open(self) -> None:
        """Connect and check the server answers. Idempotent."""
        async with self._lock:
            if self._redis is not None:
                return
            module = _redis_module()
            client = module._client(
                self._url,
                retries=self._retries,
                socket_timeout=self._socket_timeout,
                max_connections=self._max_connections,
            )
            try:
                with module._translated():
                    await client.ping()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await client.aclose()
                raise
            self._script = client.register_script(_ADD_SCRIPT)
            self._redis = client

    async def close(self) -> None:
        """Close the connections. Idempotent."""
        async with self._lock:
            client, self._redis = self._redis, None
            if client is not None:
                module = _redis_module()
                with anyio.CancelScope(shield=True), contextlib.suppress(*module._UNAVAILABLE):
                    await client.aclose()

    def _conn(self) -> aioredis.Redis:
        if self._redis is None:
            raise StorageError("RedisReplayStore is not open: call open() first")
        return self._redis

    async def add(self, key: str, expires_at: float, now: float) -> bool:
        """Remember ``key`` until ``expires_at`` (both epoch seconds on the caller's clock);
        False if a live mark exists."""
        self._conn()
        expires_at, now = _checked(expires_at, now)
        ttl_ms = max(1, math.ceil((expires_at - now) * 1000)) + math.ceil(self.grace * 1000)
        args = [repr(expires_at), _token(), repr(now), str(ttl_ms)]
        with _redis_module()._translated():
            won = await self._script(keys=[self.prefix + key], args=args)
        return bool(int(won))

    async def discard(self, key: str) -> None:
        """Forget ``key`` (its message failed after it was remembered; a retry may come)."""
        client = self._conn()
        with _redis_module()._translated():
            await client.delete(self.prefix + key)


_TABLE = "webhook_replays"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS {t} (
    key        text COLLATE "C" PRIMARY KEY,
    expires_at double precision NOT NULL,
    token      text NOT NULL
);
CREATE INDEX IF NOT EXISTS {table}_expires ON {t} (expires_at);
"""

# The row is ours if inserted, taken over from an expired mark, or already ours (the same
# token: this statement, re-sent after a dropped connection). A concurrent add of the same key
# waits for our row lock, then re-checks the WHERE on the row we wrote: it finds it live.
_ADD = """
INSERT INTO {t} AS r (key, expires_at, token) VALUES ($1, $2, $3)
ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at, token = EXCLUDED.token
    WHERE r.expires_at <= $4 OR r.token = EXCLUDED.token
RETURNING true
"""

_DISCARD = "DELETE FROM {t} WHERE key = $1"

# SKIP LOCKED: instances pruning at once split the rows instead of queueing on each other.
_PRUNE = """
DELETE FROM {t} WHERE key IN (
    SELECT key FROM {t} WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""

_MAX_KEY = 200
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _row_key(key: str) -> str:
    """``key`` as stored: a long one or one PostgreSQL text cannot hold (NUL) as its digest."""
    if len(key) > _MAX_KEY or "\x00" in key:
        return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key


class PostgresReplayStore(_Opened):
    """A :class:`~resilient_payout.webhooks.ReplayStore` in a PostgreSQL table, for every
    process that uses it.

    Marks are rows of ``<schema>.webhook_replays`` (key, expiry, token), created by :meth:`open`
    if missing (under the storage's migration lock, so instances starting together do not
    race). :meth:`add` is one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` the mark expired,
    ``RETURNING`` whether this call won. Rows expired more than ``grace`` seconds ago are
    deleted by :meth:`prune`, which :meth:`add` runs on its first call and then at most every
    ``prune_every`` seconds of its ``now`` (``prune_limit`` rows at a time). ``prefix`` starts
    every key, so deployments may share a table. The pool holds up to ``pool_max``
    connections; an unreachable server is a :class:`~resilient_payout.StorageUnavailable`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "resilient_payout",
        prefix: str = "",
        grace: float = _GRACE,
        prune_every: float = 60.0,
        prune_limit: int = 1000,
        pool_max: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 10.0,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):  # the storage's rule: nothing to quote
            raise ValueError(
                f"invalid PostgreSQL schema name {schema!r} (letters, digits, _; at most 63)"
            )
        if not grace >= 0 or not prune_every > 0 or prune_limit < 1 or pool_max < 1:
            raise ValueError("need grace >= 0, prune_every > 0, prune_limit >= 1, pool_max >= 1")
        self._dsn = dsn
        self.schema = schema
        self.prefix = prefix
        self.grace = grace
        self.prune_every = prune_every
        self.prune_limit = prune_limit
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._lock = anyio.Lock()
        self._next_prune: float | None = None
        """Caller's-clock time of the next in-line prune (None: at the next add)."""
        t = f'"{schema}".{_TABLE}'  # validated above: nothing to escape
        self._sql = {
            "create": _CREATE_TABLE.format(t=t, table=_TABLE),
            "add": _ADD.format(t=t),
            "discard": _DISCARD.format(t=t),
            "prune": _PRUNE.format(t=t),
        }

    @classmethod
    def from_url(cls, url: str) -> PostgresReplayStore:
        """From a PostgreSQL storage URL (``RP_STORAGE_URL``): the table goes into the storage's
        ``?schema=``; the storage's pool options are ignored (this store keeps a small pool of
        its own), other query parameters go to asyncpg."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres") or not parts.netloc:
            raise ValueError(
                f"not a PostgreSQL URL: {redact_url(url)!r} (use postgresql://user@host/db)"
            )
        storage_only = {"pool_min", "pool_max", "pool_timeout", "bg_pool_max"}
        schema = "resilient_payout"
        passed: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "schema":
                schema = value
            elif key not in storage_only:
                passed.append((key, value))
        dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(passed)))
        return cls(dsn, schema=schema)

    def __repr__(self) -> str:
        return f"PostgresReplayStore({redact_url(self._dsn)!r}, schema={self.schema!r})"

    async def open(self) -> None:
        """Connect and create the table if missing. Idempotent."""
        async with self._lock:
            if self._pool is not None:
                return
            pg = _postgres_module()
            with pg._translated():
                pool = await pg.asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=self._pool_max,
                    timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                )
            try:
                with pg._translated():
                    async with pool.acquire() as conn:
                        await self._create(conn, pg)
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool

    async def _create(self, conn: Any, pg: ModuleType) -> None:
        table = f'"{self.schema}".{_TABLE}'
        # Without the lock first: an existing table needs no DDL rights and no waiting.
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            return
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", pg._lock_key(self.schema))
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(self._sql["create"])

    async def close(self) -> None:
        """Close the pool, waiting up to 5 s for statements in flight. Idempotent."""
        async with self._lock:
            pool, self._pool = self._pool, None
            if pool is None:
                return
            pg = _postgres_module()
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(5.0), contextlib.suppress(*pg._UNAVAILABLE):
                    await pool.close()
                    return
                pool.terminate()

    async def _run(self, name: str, *args: Any) -> list[Any]:
        """One statement; sent once more on a fresh connection if the pooled one was dead
        (safe: every statement here is idempotent, an add by its token)."""
        if self._pool is None:
            raise StorageError("PostgresReplayStore is not open: call open() first")
        pool = self._pool
        pg = _postgres_module()
        for last_try in (False, True):
            try:
                with pg._translated():
                    async with pool.acquire(timeout=self._connect_timeout) as conn:
                        rows: list[Any] = await conn.fetch(self._sql[name], *args)
                        return rows
            except StorageUnavailable as exc:
                if last_try or not isinstance(exc.__cause__, pg._CONNECTION_LOST):
                    raise
                await pool.expire_connections()
        raise AssertionError("unreachable")

    async def add(self, key: str, expires_at: float, now: float) -> bool:
        """Remember ``key`` until ``expires_at`` (both epoch seconds on the caller's clock);
        False if a live mark exists."""
        expires_at, now = _checked(expires_at, now)
        rows = await self._run("add", _row_key(self.prefix + key), expires_at, _token(), now)
        if self._next_prune is None or now >= self._next_prune:
            self._next_prune = now + self.prune_every
            try:
                await self.prune(now)
            except StorageError as exc:  # housekeeping: never fails the webhook it rode on
                log.warning("could not prune expired webhook replay marks: %s", exc)
        return bool(rows)

    async def discard(self, key: str) -> None:
        """Forget ``key`` (its message failed after it was remembered; a retry may come)."""
        await self._run("discard", _row_key(self.prefix + key))

    async def prune(self, now: float) -> int:
        """Delete up to ``prune_limit`` marks expired ``grace`` seconds before ``now``; how
        many (of every prefix: an expired mark is nobody's)."""
        if self._pool is None:
            raise StorageError("PostgresReplayStore is not open: call open() first")
        pg = _postgres_module()
        with pg._translated():
            async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                status = await conn.execute(
                    self._sql["prune"], float(now - self.grace), self.prune_limit
                )
        return int(str(status).rsplit(" ", 1)[-1])


def replay_store_for(storage_url: str) -> RedisReplayStore | PostgresReplayStore | None:
    """The shared store for a storage URL, not yet opened: Redis's or PostgreSQL's next to the
    storage (same server, the storage's prefix or schema); None for any other scheme (one
    process's memory is the store then)."""
    scheme = storage_url.split(":", 1)[0].lower()
    if scheme in ("redis", "rediss"):
        return RedisReplayStore.from_url(storage_url)
    if scheme in ("postgresql", "postgres"):
        return PostgresReplayStore.from_url(storage_url)
    return None
