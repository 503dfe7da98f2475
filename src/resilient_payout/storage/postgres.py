"""PostgreSQL storage (``postgresql://...``): one database shared by any number of instances.

Built on asyncpg, because it is the fastest asyncio PostgreSQL driver, speaks the binary
protocol with native prepared statements (each statement is prepared once per connection and
cached, so a hot path costs one round trip), and is already this project's dev dependency.

Every decision is one SQL statement, so PostgreSQL's row locks decide every race:

- creation is ``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING``;
- a compare-and-set is ``UPDATE ... WHERE id = $1 AND version = $2 RETURNING``, with the outbox
  ``INSERT ... ON CONFLICT DO NOTHING`` in the same statement (a data-modifying ``WITH``), hence
  in the same transaction;
- a claim is ``WITH due AS MATERIALIZED (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED) UPDATE ...
  FROM due RETURNING``, so concurrent claimers step over each other's rows instead of queueing
  behind them.

Request-path statements (creation, reads by id or partner reference, compare-and-sets, outbox
acks, heartbeats: one row each) and background scans (claims, ``next_due_at``, counts, listings,
``ops_snapshot``, ``prune``) use two pools, so that scans, however many or slow, never make a
request wait for a connection (``bg_pool_max``; 0 shares one pool).

The schema is versioned: :data:`MIGRATIONS` is a list of SQL steps, recorded in a
``schema_migrations`` table and applied by :meth:`PostgresStorage.open` (or
:meth:`PostgresStorage.migrate`) under ``pg_advisory_xact_lock``, so instances starting together
migrate exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from typing import Any, Final, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

from .._errors import ConfigurationError, PartnerReferenceTaken, StorageError, StorageUnavailable
from .._extras import needs_extra
from .._model import OutboxEntry, Payout, PayoutStatus
from .._urls import redact_url as _redacted
from ._codec import decode_outbox, decode_payout, encode_payout, outbox_values, translated
from ._query import OpsSnapshot, PayoutPage, PayoutQuery, page_of
from ._sql import Listing, index_values, listing_sql

with needs_extra("postgres", "PostgreSQL storage (postgresql:// URLs)"):
    import asyncpg

__all__ = ["MIGRATIONS", "PostgresStorage"]

log = logging.getLogger("resilient_payout.storage")

_Conn: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Final statuses as SQL literals (constants of our own enum), so that the planner can match the
# partial index's predicate; a parameter would hide it.
_FINAL_SQL: Final = ", ".join(f"'{s.value}'" for s in PayoutStatus if s.is_final)

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: ids sort byte-wise (COLLATE "C") like Python strings, so ties in due time are broken
    # the same way on every backend. `doc` is `json`, not `jsonb`: it keeps the text exactly as
    # written (float spelling, \u0000), and cast to jsonb it is still queryable by hand.
    f"""
    CREATE TABLE {{s}}.payouts (
        id            text COLLATE "C" PRIMARY KEY,
        version       bigint NOT NULL,
        status        text NOT NULL,
        next_check_at double precision,
        lease_owner   text,
        lease_until   double precision,
        doc           json NOT NULL
    );
    CREATE INDEX payouts_due ON {{s}}.payouts (next_check_at, id)
        WHERE next_check_at IS NOT NULL AND status NOT IN ({_FINAL_SQL});
    CREATE INDEX payouts_status ON {{s}}.payouts (status);
    CREATE TABLE {{s}}.outbox (
        payout_id       text COLLATE "C" PRIMARY KEY,
        status          text NOT NULL,
        created_at      double precision NOT NULL,
        next_attempt_at double precision NOT NULL,
        attempts        integer NOT NULL DEFAULT 0,
        delivered_at    double precision,
        last_error      text,
        lease_owner     text,
        lease_until     double precision
    );
    CREATE INDEX outbox_due ON {{s}}.outbox (next_attempt_at, payout_id)
        WHERE delivered_at IS NULL;
    """,
    # 2: dead-lettered entries leave the claimable index; a small index counts them. Adding a
    # nullable column without a default rewrites nothing, so this is quick on a big table.
    """
    ALTER TABLE {s}.outbox ADD COLUMN dead_at double precision;
    DROP INDEX {s}.outbox_due;
    CREATE INDEX outbox_due ON {s}.outbox (next_attempt_at, payout_id)
        WHERE delivered_at IS NULL AND dead_at IS NULL;
    CREATE INDEX outbox_dead ON {s}.outbox (payout_id) WHERE dead_at IS NOT NULL;
    """,
    # 3: what operators query (listing, alert figures, retention) and partner references, as
    # columns beside the document, filled from it for the rows already there (one UPDATE of
    # every row: on a big table, run migrate() in a quiet hour).
    f"""
    ALTER TABLE {{s}}.payouts
        ADD COLUMN created_at double precision,
        ADD COLUMN updated_at double precision,
        ADD COLUMN attempt_started_at double precision,
        ADD COLUMN has_conflict boolean NOT NULL DEFAULT false,
        ADD COLUMN partner_ref text COLLATE "C";
    ALTER TABLE {{s}}.outbox ADD COLUMN payout_created_at double precision;
    UPDATE {{s}}.payouts SET
        created_at = (doc->>'created_at')::float8,
        updated_at = (doc->>'updated_at')::float8,
        attempt_started_at = (doc->>'attempt_started_at')::float8,
        partner_ref = doc->>'partner_ref',
        has_conflict = EXISTS (
            SELECT 1 FROM json_array_elements(doc->'audit') AS a
            WHERE (a->>'conflict')::boolean
        );
    UPDATE {{s}}.outbox o SET payout_created_at = p.created_at
        FROM {{s}}.payouts p WHERE p.id = o.payout_id;
    CREATE UNIQUE INDEX payouts_partner_ref ON {{s}}.payouts (partner_ref)
        WHERE partner_ref IS NOT NULL;
    DROP INDEX {{s}}.payouts_status;
    CREATE INDEX payouts_created ON {{s}}.payouts (created_at, id);
    CREATE INDEX payouts_status_created ON {{s}}.payouts (status, created_at, id);
    CREATE INDEX payouts_conflicts ON {{s}}.payouts (created_at, id) WHERE has_conflict;
    CREATE INDEX payouts_open_attempt ON {{s}}.payouts (attempt_started_at)
        WHERE status NOT IN ({_FINAL_SQL});
    CREATE INDEX payouts_final_updated ON {{s}}.payouts (updated_at)
        WHERE status IN ({_FINAL_SQL});
    CREATE INDEX outbox_undelivered ON {{s}}.outbox (payout_created_at, payout_id)
        WHERE delivered_at IS NULL;
    """,  # noqa: S608 -- DDL of constants
    # 4: the instance liveness registry (one row per running instance, its latest heartbeat).
    """
    CREATE TABLE {s}.instances (
        id   text COLLATE "C" PRIMARY KEY,
        mark double precision NOT NULL
    );
    """,
    # 5: the leases of one owner, for release_leases. Small indexes (only rows in flight are
    # leased), but each build reads its whole table, blocking writes to it meanwhile.
    """
    CREATE INDEX payouts_lease_owner ON {s}.payouts (lease_owner) WHERE lease_owner IS NOT NULL;
    CREATE INDEX outbox_lease_owner ON {s}.outbox (lease_owner) WHERE lease_owner IS NOT NULL;
    """,
)
"""The schema, step by step: step ``i`` (1-based) takes the schema from version ``i - 1`` to
``i``. Only ever append; ``{s}`` is the quoted schema name."""

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS {s}.schema_migrations (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

_HAS_MIGRATIONS_TABLE = """
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = $1 AND c.relname = 'schema_migrations'
)
"""

_CREATE = """
INSERT INTO {s}.payouts (id, version, status, next_check_at, doc,
                         created_at, updated_at, attempt_started_at, has_conflict, partner_ref)
VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO NOTHING
RETURNING version
"""

_GET = "SELECT version, doc FROM {s}.payouts WHERE id = $1"

_GET_BY_REF = "SELECT version, doc FROM {s}.payouts WHERE partner_ref = $1"

_REF_HOLDER = "SELECT id FROM {s}.payouts WHERE partner_ref = $1"

# A record without a partner reference keeps the one stored (references are never removed).
_CAS = """
UPDATE {s}.payouts
SET version = version + 1, status = $3, next_check_at = $4, doc = $5,
    created_at = $6, updated_at = $7, attempt_started_at = $8, has_conflict = $9,
    partner_ref = coalesce($10, partner_ref),
    lease_owner = NULL, lease_until = NULL
WHERE id = $1 AND version = $2
RETURNING version
"""

# One statement, so one transaction: the outbox row exists iff the update happened.
_CAS_WITH_OUTBOX = """
WITH changed AS (
    UPDATE {s}.payouts
    SET version = version + 1, status = $3, next_check_at = $4, doc = $5,
        created_at = $13, updated_at = $14, attempt_started_at = $15, has_conflict = $16,
        partner_ref = coalesce($17, partner_ref),
        lease_owner = NULL, lease_until = NULL
    WHERE id = $1 AND version = $2
    RETURNING id, version
), queued AS (
    INSERT INTO {s}.outbox
        (payout_id, status, created_at, next_attempt_at, attempts, delivered_at, last_error,
         dead_at, payout_created_at)
    SELECT id, $6::text, $7::float8, $8::float8, $9::integer, $10::float8, $11::text, $12::float8,
        $13::float8
    FROM changed
    ON CONFLICT (payout_id) DO NOTHING
)
SELECT version FROM changed
"""

# The candidates are a MATERIALIZED CTE so they are selected (and locked) exactly once; a
# subquery under IN may be re-run by some plans and then claim more than `limit` rows. Rows that
# another claimer changed after our snapshot are re-checked on locking and dropped.
_CLAIM_DUE = f"""
WITH due AS MATERIALIZED (
    SELECT id FROM {{s}}.payouts
    WHERE next_check_at <= $3 AND status NOT IN ({_FINAL_SQL})
      AND (lease_until IS NULL OR lease_until <= $3)
    ORDER BY next_check_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE {{s}}.payouts AS p
SET version = p.version + 1, lease_owner = $1, lease_until = $2
FROM due
WHERE p.id = due.id
RETURNING p.version, p.doc, p.next_check_at, p.id
"""  # noqa: S608 -- constants and placeholders only

_NEXT_DUE = f"""
SELECT min(next_check_at) FROM {{s}}.payouts
WHERE next_check_at IS NOT NULL AND status NOT IN ({_FINAL_SQL})
"""  # noqa: S608 -- constants and placeholders only

_OUTBOX_COLUMNS = (
    "payout_id, status, created_at, next_attempt_at, attempts, delivered_at, last_error, dead_at"
)
_OUTBOX_RETURNING = ", ".join(f"o.{c}" for c in _OUTBOX_COLUMNS.split(", "))

# The lease end doubles as the next attempt, so a dead claimer's entry comes back by itself.
_CLAIM_OUTBOX = f"""
WITH due AS MATERIALIZED (
    SELECT payout_id FROM {{s}}.outbox
    WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= $3
      AND (lease_until IS NULL OR lease_until <= $3)
    ORDER BY next_attempt_at, payout_id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE {{s}}.outbox AS o
SET lease_owner = $1, lease_until = $2, next_attempt_at = $2
FROM due
WHERE o.payout_id = due.payout_id
RETURNING {_OUTBOX_RETURNING}
"""  # noqa: S608 -- constants and placeholders only

_GET_OUTBOX = f"SELECT {_OUTBOX_COLUMNS} FROM {{s}}.outbox WHERE payout_id = $1"  # noqa: S608

# One statement, so one transaction. The running leases (counted) and those already run out
# are disjoint sets of rows, as the sub-statements of one WITH must be; `lease_owner = $1`
# implies IS NOT NULL, so the partial indexes serve all four. An entry's lease end doubled as
# its next attempt.
_RELEASE_PAYOUTS = """
WITH running AS (
    UPDATE {s}.payouts SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = $1 AND lease_until > $2
    RETURNING 1
), spent AS (
    UPDATE {s}.payouts SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = $1 AND lease_until <= $2
)"""

_RELEASE_PAYOUT_LEASES = _RELEASE_PAYOUTS + "\nSELECT count(*) FROM running\n"

_RELEASE_LEASES = (
    _RELEASE_PAYOUTS  # noqa: S608 -- constants and placeholders only
    + """, running_outbox AS (
    UPDATE {s}.outbox
    SET lease_owner = NULL, lease_until = NULL, next_attempt_at = least(next_attempt_at, $2)
    WHERE lease_owner = $1 AND lease_until > $2
    RETURNING 1
), spent_outbox AS (
    UPDATE {s}.outbox SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = $1 AND lease_until <= $2
)
SELECT (SELECT count(*) FROM running) + (SELECT count(*) FROM running_outbox)
"""
)

_ACK_OUTBOX = """
UPDATE {s}.outbox SET delivered_at = $2, dead_at = NULL, lease_owner = NULL, lease_until = NULL
WHERE payout_id = $1 AND delivered_at IS NULL
"""

_RETRY_OUTBOX = """
UPDATE {s}.outbox
SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3,
    lease_owner = NULL, lease_until = NULL
WHERE payout_id = $1 AND delivered_at IS NULL AND dead_at IS NULL
"""

_DEAD_LETTER_OUTBOX = """
UPDATE {s}.outbox
SET attempts = attempts + 1, dead_at = $2, last_error = $3, lease_owner = NULL, lease_until = NULL
WHERE payout_id = $1 AND delivered_at IS NULL AND dead_at IS NULL
"""

# A fresh schedule: the round counter starts again (last_error stays, as history).
_REQUEUE_OUTBOX = """
UPDATE {s}.outbox
SET next_attempt_at = $2, dead_at = NULL, delivered_at = NULL, attempts = 0,
    lease_owner = NULL, lease_until = NULL
WHERE payout_id = $1
RETURNING 1
"""

_COUNT_DEAD = "SELECT count(*) FROM {s}.outbox WHERE dead_at IS NOT NULL"

_COUNT = "SELECT status, count(*) FROM {s}.payouts GROUP BY status"

_OPEN: Final = tuple(s.value for s in PayoutStatus if not s.is_final)

# One statement: one snapshot. Each figure reads one index (a min per open status reads one
# entry of payouts_status_created).
_OPS = f"""
SELECT {
    ", ".join(f"(SELECT min(created_at) FROM {{s}}.payouts WHERE status = '{st}')" for st in _OPEN)
},
    (SELECT count(*) FROM {{s}}.payouts
     WHERE attempt_started_at < $1 AND status NOT IN ({_FINAL_SQL})),
    (SELECT count(*) FROM {{s}}.payouts WHERE has_conflict),
    (SELECT count(*) FROM {{s}}.outbox
     WHERE delivered_at IS NULL AND dead_at IS NULL AND attempts > 0 AND created_at < $2),
    (SELECT count(*) FROM {{s}}.outbox WHERE dead_at IS NOT NULL)
"""  # noqa: S608 -- constants and placeholders only

_PRUNABLE = f"""
SELECT p.id FROM {{s}}.payouts p
WHERE p.status IN ({_FINAL_SQL}) AND p.updated_at < $1
  AND NOT EXISTS (
      SELECT 1 FROM {{s}}.outbox o WHERE o.payout_id = p.id AND o.delivered_at IS NULL
  )
ORDER BY p.updated_at
LIMIT $2
"""  # noqa: S608 -- constants and placeholders only

_PRUNE_DRY = "SELECT count(*) FROM (" + _PRUNABLE + ") AS prunable"  # noqa: S608

# One statement. Rows are locked as they are chosen (rows a writer holds are skipped) and
# checked again as they are deleted; an outbox entry re-queued meanwhile is not deleted (it is
# still pushed, with the payout gone).
_PRUNE = f"""
WITH doomed AS MATERIALIZED ({_PRUNABLE} FOR UPDATE OF p SKIP LOCKED),
gone AS (
    DELETE FROM {{s}}.payouts p USING doomed
    WHERE p.id = doomed.id AND p.status IN ({_FINAL_SQL}) AND p.updated_at < $1
    RETURNING p.id
), outbox_gone AS (
    DELETE FROM {{s}}.outbox o USING gone
    WHERE o.payout_id = gone.id AND o.delivered_at IS NOT NULL
)
SELECT count(*) FROM gone
"""  # noqa: S608 -- constants and placeholders only

_BEAT = """
INSERT INTO {s}.instances (id, mark) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET mark = excluded.mark
"""

_INSTANCES = "SELECT id, mark FROM {s}.instances"

_FORGET_INSTANCE = "DELETE FROM {s}.instances WHERE id = $1"

_BACKGROUND: Final = frozenset(
    {
        "claim_due",
        "next_due",
        "claim_outbox",
        "release_leases",
        "release_payout_leases",
        "count",
        "count_dead",
        "ops",
        "prune",
        "prune_dry",
    }
)
"""Statements of background work: scans of many rows (and list_payouts, see _fetch_sql), run on
the background pool. Everything else reads or writes one row for a request, a worker's decision
or a heartbeat, and must never wait behind a scan."""

# Errors that mean "not now": the server is unreachable, restarting, overloaded, or dropped our
# connection, or the statement timed out. Anything else from PostgreSQL is a plain StorageError.
_UNAVAILABLE: Final = (
    OSError,  # includes TimeoutError and refused connections
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InternalClientError,
)

# The connection died under the statement; the pool replaces it. asyncpg raises
# InternalClientError for a pooled connection that read the server's goodbye (FATAL 57P01) but
# has not noticed the closed socket yet.
_CONNECTION_LOST: Final = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)


def _translated() -> contextlib.AbstractContextManager[None]:
    return translated("PostgreSQL", _UNAVAILABLE, (asyncpg.PostgresError, asyncpg.InterfaceError))


def _lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory-lock key for migrating ``schema``."""
    digest = hashlib.blake2b(f"resilient_payout:migrate:{schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset on release, instead of asyncpg's ``RESET ALL``, ``UNLISTEN *``,
    ``CLOSE ALL`` and ``pg_advisory_unlock_all()``: a round trip per statement, about 10% of
    the client's CPU on PostgreSQL (py-spy, ``benchmarks.backends``). Nothing here leaves
    session state: no ``SET``, ``LISTEN``, cursor or session advisory lock (the migration's is
    transaction-scoped), and asyncpg still rolls back a transaction left open."""


class PostgresStorage:
    """The :class:`~resilient_payout.storage.Storage` contract on a PostgreSQL schema.

    ``dsn`` is anything asyncpg accepts (``postgresql://user:pw@host:5432/db?sslmode=require``).
    All tables live in ``schema`` (created if missing), so several deployments can share a
    database. Each object keeps a pool of ``pool_min`` to ``pool_max`` connections for
    request-path statements and a second one of up to ``bg_pool_max`` for background scans (0:
    they share the first); concurrent operations of one object run on separate connections.
    ``pool_timeout`` bounds the wait for a free one (None: forever), ``connect_timeout`` each
    connection attempt and
    ``command_timeout`` each statement; any of them running out raises
    :class:`~resilient_payout.StorageUnavailable`, as does an unreachable or restarting server.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "resilient_payout",
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float | None = 30.0,
        pool_timeout: float | None = 10.0,
        bg_pool_max: int = 2,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(
                f"invalid PostgreSQL schema name {schema!r} (letters, digits, _; at most 63)"
            )
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ValueError("need 0 <= pool_min <= pool_max and pool_max >= 1")
        if bg_pool_max < 0:
            raise ValueError("need bg_pool_max >= 0 (0: background work shares the pool)")
        if pool_timeout is not None and not pool_timeout > 0:
            raise ConfigurationError("PostgreSQL pool_timeout must be a positive number of seconds")
        self._dsn = dsn
        self._schema = schema
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool_timeout = pool_timeout
        self._bg_pool_max = bg_pool_max
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._bg_pool: asyncpg.Pool[asyncpg.Record] | None = None
        """Background scans' own connections (None with ``bg_pool_max=0``, or not open)."""
        self._lock = anyio.Lock()
        q = f'"{schema}"'  # validated above: nothing to escape
        self._sql = {
            name: sql.format(s=q)
            for name, sql in {
                "create": _CREATE,
                "get": _GET,
                "cas": _CAS,
                "cas_outbox": _CAS_WITH_OUTBOX,
                "claim_due": _CLAIM_DUE,
                "next_due": _NEXT_DUE,
                "claim_outbox": _CLAIM_OUTBOX,
                "get_outbox": _GET_OUTBOX,
                "release_leases": _RELEASE_LEASES,
                "release_payout_leases": _RELEASE_PAYOUT_LEASES,
                "ack_outbox": _ACK_OUTBOX,
                "retry_outbox": _RETRY_OUTBOX,
                "dead_letter_outbox": _DEAD_LETTER_OUTBOX,
                "requeue_outbox": _REQUEUE_OUTBOX,
                "count_dead": _COUNT_DEAD,
                "count": _COUNT,
                "get_by_ref": _GET_BY_REF,
                "ref_holder": _REF_HOLDER,
                "ops": _OPS,
                "prune": _PRUNE,
                "prune_dry": _PRUNE_DRY,
                "migrations_table": _MIGRATIONS_TABLE,
                "beat": _BEAT,
                "instances": _INSTANCES,
                "forget_instance": _FORGET_INSTANCE,
            }.items()
        }
        self._migrations = [m.format(s=q) for m in MIGRATIONS]
        self._listing = Listing(
            payouts=f"{q}.payouts",
            outbox=f"{q}.outbox",
            placeholder=lambda n: f"${n}",
            conflict="p.has_conflict",
            outbox_join=f"{q}.outbox o JOIN {q}.payouts p ON p.id = o.payout_id",
        )

    @classmethod
    def from_url(cls, url: str) -> PostgresStorage:
        """``postgresql://`` or ``postgres://`` URLs; options ``?schema=``, ``?pool_min=``,
        ``?pool_max=``, ``?pool_timeout=SECONDS``, ``?bg_pool_max=``. Other query parameters go
        to asyncpg (``sslmode``, ``application_name``...)."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("postgresql", "postgres") or not parts.netloc:
            raise ValueError(
                f"not a PostgreSQL URL: {url!r} (use postgresql://user@host:5432/database)"
            )
        ours: dict[str, str] = {}
        passed: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in ("schema", "pool_min", "pool_max", "pool_timeout", "bg_pool_max"):
                ours[key] = value
            else:
                passed.append((key, value))
        dsn = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(passed)))
        try:
            pool_min = int(ours.get("pool_min", 1))
            pool_max = int(ours.get("pool_max", max(10, pool_min)))
            bg_pool_max = int(ours.get("bg_pool_max", 2))
        except ValueError:
            # The parameters only: the URL may carry a password.
            msg = "PostgreSQL URL options pool_min, pool_max and bg_pool_max must be integers"
            raise ValueError(msg) from None
        try:
            pool_timeout = float(ours.get("pool_timeout", 10.0))
        except ValueError:
            # The parameter only: the URL may carry a password.
            msg = "PostgreSQL URL option pool_timeout must be a number"
            raise ConfigurationError(msg) from None
        return cls(
            dsn,
            schema=ours.get("schema", "resilient_payout"),
            pool_min=pool_min,
            pool_max=pool_max,
            pool_timeout=pool_timeout,
            bg_pool_max=bg_pool_max,
        )

    @property
    def schema(self) -> str:
        return self._schema

    def __repr__(self) -> str:
        return f"PostgresStorage({_redacted(self._dsn)!r}, schema={self._schema!r})"

    # -- connection and schema ----------------------------------------------------------------

    async def open(self) -> None:
        """Connect, then bring the schema up to date (see :meth:`migrate`). Idempotent."""
        async with self._lock:
            if self._pool is not None:
                return
            with _translated():
                pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=self._pool_min,
                    max_size=self._pool_max,
                    timeout=self._connect_timeout,
                    command_timeout=self._command_timeout,
                    reset=_keep_session,
                )
            bg_pool: asyncpg.Pool[asyncpg.Record] | None = None
            try:
                with _translated():
                    conn = await self._acquire(pool)
                    try:
                        await self._migrate(conn)
                    finally:
                        await pool.release(conn)
                    if self._bg_pool_max:
                        bg_pool = await asyncpg.create_pool(
                            self._dsn,
                            min_size=0,  # opened on first use: scans are not urgent
                            max_size=self._bg_pool_max,
                            timeout=self._connect_timeout,
                            command_timeout=self._command_timeout,
                            reset=_keep_session,
                        )
            except BaseException:
                pool.terminate()
                raise
            self._pool, self._bg_pool = pool, bg_pool

    async def migrate(self) -> int:
        """Apply the missing :data:`MIGRATIONS` steps; how many it applied (0: up to date).

        Safe to run from any number of processes at once: they queue on a transaction-level
        advisory lock, and each re-reads the schema version once it holds the lock. Works with
        the storage open or not (e.g. from a deployment script).
        """
        async with self._lock:
            if self._pool is not None:
                with _translated():
                    conn = await self._acquire(self._pool)
                    try:
                        return await self._migrate(conn)
                    finally:
                        await self._pool.release(conn)
        with _translated():
            single = await asyncpg.connect(
                self._dsn, timeout=self._connect_timeout, command_timeout=self._command_timeout
            )
        try:
            return await self._migrate(single)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(*_UNAVAILABLE):
                await single.close()

    async def _version(self, conn: _Conn) -> int | None:
        """The schema's version, or None if it has no migrations table yet."""
        # A query on pg_class, not to_regclass(): that reads the session's catalog cache, which
        # an advisory lock does not refresh, so it can miss a table another instance just made.
        if not await conn.fetchval(_HAS_MIGRATIONS_TABLE, self._schema):
            return None
        table = f'"{self._schema}".schema_migrations'
        found = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")  # noqa: S608 -- a validated name
        return int(found)

    async def _migrate(self, conn: _Conn) -> int:
        latest = len(self._migrations)
        with _translated():
            # Without the lock first: an up-to-date schema needs no DDL rights and no waiting.
            if await self._version(conn) == latest:
                return 0
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(self._schema))
                current = await self._version(conn)
                if current is None:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                    await conn.execute(self._sql["migrations_table"])
                    current = 0
                if current > latest:
                    raise StorageError(
                        f"PostgreSQL schema {self._schema!r} is at version {current}, newer than "
                        f"this library's ({latest}); upgrade resilient-payout"
                    )
                for version in range(current + 1, latest + 1):
                    await conn.execute(self._migrations[version - 1])
                    await conn.execute(
                        f'INSERT INTO "{self._schema}".schema_migrations (version) VALUES ($1)',  # noqa: S608
                        version,
                    )
        if latest > current:
            log.info(
                "PostgreSQL schema %r: applied migrations %d..%d", self._schema, current + 1, latest
            )
        return latest - current

    async def close(self) -> None:
        """Close the pool, waiting up to 5 s for operations in flight. Idempotent."""
        async with self._lock:
            pools = [p for p in (self._pool, self._bg_pool) if p is not None]
            self._pool = self._bg_pool = None
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(5.0), contextlib.suppress(*_UNAVAILABLE):
                    for pool in pools:
                        await pool.close()
                    return
                for pool in pools:
                    pool.terminate()

    def _conn(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise StorageError("PostgresStorage is not open: call open() first")
        return self._pool

    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        """The statement named ``name`` (see :meth:`_fetch_sql`), on the background pool if it
        is one of :data:`_BACKGROUND`."""
        return await self._fetch_sql(self._sql[name], *args, background=name in _BACKGROUND)

    async def _fetch_sql(
        self, sql: str, *args: Any, background: bool = False
    ) -> list[asyncpg.Record]:
        """One statement, in its own implicit transaction; its rows. ``background``: a scan,
        run on the background pool (if there is one), never on a request's connections.

        A statement that finds its pooled connection dead (the server restarted, or an admin
        ended the session) is sent once more on a fresh connection, after marking every pooled
        connection for replacement. That is safe even if the
        first try ran: a repeated create finds the record (``created=False``, as for a repeated
        request), a repeated compare-and-set finds the version moved on (a lost race), a
        repeated claim leaves the first claim's rows leased until their lease ends.
        """
        pool = self._conn()
        if background and self._bg_pool is not None:
            pool = self._bg_pool
        for last_try in (False, True):
            try:
                with _translated():
                    conn = await self._acquire(pool)
                    try:
                        return await conn.fetch(sql, *args)
                    finally:
                        await pool.release(conn)
            except StorageUnavailable as exc:
                if last_try or not isinstance(exc.__cause__, _CONNECTION_LOST):
                    raise
                # One dead connection means the rest of the pool (and the other pool: the
                # same server) likely died with it.
                for each in (self._pool, self._bg_pool):
                    if each is not None:
                        await each.expire_connections()
        raise AssertionError("unreachable")

    async def _acquire(
        self, pool: asyncpg.Pool[asyncpg.Record]
    ) -> asyncpg.pool.PoolConnectionProxy[asyncpg.Record]:
        """A pooled connection, waiting at most ``pool_timeout`` for one to be free."""
        try:
            return await pool.acquire(timeout=self._pool_timeout)
        except TimeoutError as exc:
            # Say which wait ran out: the server may be fine while this process has more
            # operations in flight than pool_max (or holds connections too long).
            waited = f"pool_timeout={self._pool_timeout}s"
            size = pool.get_max_size()
            if pool.get_size() >= size and pool.get_idle_size() == 0:
                which = "background connection pool" if pool is self._bg_pool else "connection pool"
                why = f"all {size} connections stayed busy for {waited}"
                raise StorageUnavailable(f"PostgreSQL: {which} exhausted: {why}") from exc
            raise StorageUnavailable(
                f"PostgreSQL: no pooled connection within {waited} (opening one took too long)"
            ) from exc

    # -- the contract -------------------------------------------------------------------------

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        doc = encode_payout(payout)
        args = (payout.id, payout.status.value, payout.next_check_at, doc, *index_values(payout))
        for _ in range(3):
            if await self._write(payout, "create", *args):
                return decode_payout(1, doc), True
            # A separate statement, so it runs on a snapshot that includes the conflicting
            # insert (which had to commit before ours could see the conflict). Only prune
            # deletes rows: a row pruned in between is inserted again.
            rows = await self._fetch("get", payout.id)
            if rows:
                return decode_payout(*rows[0]), False
        raise StorageUnavailable(f"PostgreSQL: payout {payout.id!r} kept being pruned")

    async def _write(self, payout: Payout, name: str, *args: Any) -> list[asyncpg.Record]:
        """A write of ``payout``; the unique index's refusal as PartnerReferenceTaken."""
        try:
            return await self._fetch(name, *args)
        except StorageError as exc:
            cause = exc.__cause__
            if (
                payout.partner_ref is None
                or not isinstance(cause, asyncpg.UniqueViolationError)
                or "partner_ref" not in (cause.constraint_name or "")
            ):
                raise
        rows = await self._fetch("ref_holder", payout.partner_ref)
        raise PartnerReferenceTaken(payout.partner_ref, rows[0][0] if rows else None)

    async def get(self, payout_id: str) -> Payout | None:
        rows = await self._fetch("get", payout_id)
        return decode_payout(*rows[0]) if rows else None

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        if outbox is not None and outbox.payout_id != payout.id:
            raise ValueError(f"outbox entry for {outbox.payout_id!r} given with {payout.id!r}")
        doc = encode_payout(payout)
        cas = (payout.id, expected_version, payout.status.value, payout.next_check_at, doc)
        if outbox is None:
            rows = await self._write(payout, "cas", *cas, *index_values(payout))
        else:
            args = (*cas, *outbox_values(outbox), *index_values(payout))
            rows = await self._write(payout, "cas_outbox", *args)
        return decode_payout(rows[0][0], doc) if rows else None

    async def claim_due(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Payout]:
        if limit <= 0:
            return []
        rows = await self._fetch("claim_due", owner, now + lease_seconds, now, limit)
        rows.sort(key=lambda r: (r[2], r[3]))  # RETURNING does not keep the CTE's order
        return [decode_payout(r[0], r[1]) for r in rows]

    async def next_due_at(self) -> float | None:
        rows = await self._fetch("next_due")
        value = rows[0][0]
        return None if value is None else float(value)

    async def claim_outbox(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[OutboxEntry]:
        if limit <= 0:
            return []
        rows = await self._fetch("claim_outbox", owner, now + lease_seconds, now, limit)
        entries = [decode_outbox(*r) for r in rows]
        entries.sort(key=lambda e: e.payout_id)  # all share next_attempt_at == lease end
        return entries

    async def release_leases(self, owner: str, now: float, *, outbox: bool = True) -> int:
        # A repeat after a lost connection is harmless: it finds nothing left (and counts 0).
        statement = "release_leases" if outbox else "release_payout_leases"
        rows = await self._fetch(statement, owner, now)
        return int(rows[0][0])

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        await self._fetch("ack_outbox", payout_id, delivered_at)

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        await self._fetch("retry_outbox", payout_id, next_attempt_at, error)

    async def dead_letter_outbox(self, payout_id: str, *, at: float, error: str) -> None:
        await self._fetch("dead_letter_outbox", payout_id, at, error)

    async def requeue_outbox(self, payout_id: str, *, next_attempt_at: float) -> bool:
        return bool(await self._fetch("requeue_outbox", payout_id, next_attempt_at))

    async def count_dead_outbox(self) -> int:
        rows = await self._fetch("count_dead")
        return int(rows[0][0])

    async def get_outbox(self, payout_id: str) -> OutboxEntry | None:
        rows = await self._fetch("get_outbox", payout_id)
        return decode_outbox(*rows[0]) if rows else None

    async def count_by_status(self) -> dict[PayoutStatus, int]:
        counts = dict.fromkeys(PayoutStatus, 0)
        for status, n in await self._fetch("count"):
            counts[PayoutStatus(status)] = n
        return counts

    # -- operators -------------------------------------------------------------------------------

    async def get_by_partner_ref(self, partner_ref: str) -> Payout | None:
        rows = await self._fetch("get_by_ref", partner_ref)
        return decode_payout(*rows[0]) if rows else None

    async def list_payouts(self, query: PayoutQuery) -> PayoutPage:
        sql, params = listing_sql(query, self._listing)
        rows = await self._fetch_sql(sql, *params, background=True)
        return page_of((decode_payout(r[0], r[1]) for r in rows), query.limit)

    async def ops_snapshot(
        self, now: float, *, late_after: float, failing_after: float
    ) -> OpsSnapshot:
        ((*oldest, late, conflicts, failing, dead),) = await self._fetch(
            "ops", now - late_after, now - failing_after
        )
        return OpsSnapshot.of(now, oldest, late, conflicts, failing, dead)

    async def prune(self, before: float, *, dry_run: bool, limit: int) -> int:
        if limit <= 0:
            return 0
        rows = await self._fetch("prune_dry" if dry_run else "prune", before, limit)
        return int(rows[0][0])

    # -- instance liveness ----------------------------------------------------------------------

    async def beat(self, instance_id: str, mark: float) -> None:
        await self._fetch("beat", instance_id, mark)

    async def instances(self) -> dict[str, float]:
        return {str(r[0]): float(r[1]) for r in await self._fetch("instances")}

    async def forget_instance(self, instance_id: str) -> None:
        await self._fetch("forget_instance", instance_id)
