"""SQLite storage (``sqlite:///file.db``): durable, safe for several processes on one file.

Every decision is made by SQLite itself: creation is ``INSERT ... ON CONFLICT DO NOTHING``, a
compare-and-set is ``UPDATE ... WHERE version = ?`` (with the outbox insert in the same
``BEGIN IMMEDIATE`` transaction), and a claim is one ``UPDATE ... RETURNING`` over the due rows.
The database runs in WAL mode, so readers never wait for the writer; writers wait up to
``busy_timeout`` for each other, then get :class:`~resilient_payout.StorageUnavailable`.

The ``version`` column is authoritative; the JSON document beside it holds the rest of the
record (without its version, which claims bump in SQL).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiosqlite
import anyio

from .._errors import StorageError, StorageUnavailable
from .._model import OutboxEntry, Payout, PayoutStatus

__all__ = ["SQLiteStorage"]

_SCHEMA_VERSION = 1

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS payouts (
    id            TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    status        TEXT NOT NULL,
    next_check_at REAL,
    lease_owner   TEXT,
    lease_until   REAL,
    doc           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS payouts_due ON payouts (next_check_at, id, status, lease_until)
    WHERE next_check_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS payouts_status ON payouts (status);
CREATE TABLE IF NOT EXISTS outbox (
    payout_id       TEXT PRIMARY KEY,
    status          TEXT NOT NULL,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    delivered_at    REAL,
    last_error      TEXT,
    lease_owner     TEXT,
    lease_until     REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, payout_id)
    WHERE delivered_at IS NULL;
PRAGMA user_version = {_SCHEMA_VERSION};
COMMIT;
"""

_FINAL: tuple[str, ...] = tuple(s.value for s in PayoutStatus if s.is_final)
_NOT_FINAL = "status NOT IN (" + ", ".join("?" * len(_FINAL)) + ")"

_CREATE = """
INSERT INTO payouts (id, version, status, next_check_at, doc) VALUES (?, 1, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
RETURNING version
"""

_GET = "SELECT version, doc FROM payouts WHERE id = ?"

_CAS = """
UPDATE payouts
SET version = version + 1, status = ?, next_check_at = ?, doc = ?,
    lease_owner = NULL, lease_until = NULL
WHERE id = ? AND version = ?
RETURNING version
"""

_INSERT_OUTBOX = """
INSERT INTO outbox
    (payout_id, status, created_at, next_attempt_at, attempts, delivered_at, last_error)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (payout_id) DO NOTHING
"""

_CLAIM_DUE = f"""
UPDATE payouts
SET version = version + 1, lease_owner = ?, lease_until = ?
WHERE id IN (
    SELECT id FROM payouts
    WHERE next_check_at IS NOT NULL AND next_check_at <= ? AND {_NOT_FINAL}
      AND (lease_until IS NULL OR lease_until <= ?)
    ORDER BY next_check_at, id
    LIMIT ?
)
RETURNING version, doc, next_check_at, id
"""  # noqa: S608 -- only placeholders are interpolated

_NEXT_DUE = f"""
SELECT next_check_at FROM payouts
WHERE next_check_at IS NOT NULL AND {_NOT_FINAL}
ORDER BY next_check_at
LIMIT 1
"""  # noqa: S608 -- only placeholders are interpolated

_OUTBOX_COLUMNS = (
    "payout_id, status, created_at, next_attempt_at, attempts, delivered_at, last_error"
)

# The lease end doubles as the next attempt, so a dead claimer's entry comes back by itself.
_CLAIM_OUTBOX = f"""
UPDATE outbox
SET lease_owner = ?, lease_until = ?, next_attempt_at = ?
WHERE payout_id IN (
    SELECT payout_id FROM outbox
    WHERE delivered_at IS NULL AND next_attempt_at <= ?
      AND (lease_until IS NULL OR lease_until <= ?)
    ORDER BY next_attempt_at, payout_id
    LIMIT ?
)
RETURNING {_OUTBOX_COLUMNS}
"""  # noqa: S608 -- a constant column list

_GET_OUTBOX = f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE payout_id = ?"  # noqa: S608

_ACK_OUTBOX = """
UPDATE outbox SET delivered_at = ?, lease_owner = NULL, lease_until = NULL
WHERE payout_id = ? AND delivered_at IS NULL
"""

_RETRY_OUTBOX = """
UPDATE outbox
SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,
    lease_owner = NULL, lease_until = NULL
WHERE payout_id = ? AND delivered_at IS NULL
"""

_COUNT = "SELECT status, COUNT(*) FROM payouts GROUP BY status"

# Primary result codes meaning "not now": another writer holds the lock, or the file is
# unreachable. Anything else is a plain StorageError.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_PROTOCOL,
    }
)


def _encode(payout: Payout) -> str:
    d = payout.to_dict()
    del d["version"]
    return json.dumps(d, separators=(",", ":"))


def _decode(version: int, doc: str) -> Payout:
    d = json.loads(doc)
    d["version"] = version
    return Payout.from_dict(d)


def _outbox_from_row(row: Sequence[Any]) -> OutboxEntry:
    payout_id, status, created_at, next_attempt_at, attempts, delivered_at, last_error = row
    return OutboxEntry(
        payout_id=payout_id,
        status=PayoutStatus(status),
        created_at=created_at,
        next_attempt_at=next_attempt_at,
        attempts=attempts,
        delivered_at=delivered_at,
        last_error=last_error,
    )


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        text = str(exc).lower()
        if (code is not None and code & 0xFF in _UNAVAILABLE_CODES) or (
            code is None and ("locked" in text or "busy" in text)
        ):
            raise StorageUnavailable(f"SQLite: {exc}") from exc
        raise StorageError(f"SQLite: {exc}") from exc


class SQLiteStorage:
    """The :class:`~resilient_payout.storage.Storage` contract on one SQLite file.

    ``busy_timeout`` is how long a write waits for another connection's write lock before
    raising :class:`~resilient_payout.StorageUnavailable`. Any number of ``SQLiteStorage``
    objects, in any number of processes, may share the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> None:
        self._path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        # One connection cannot carry two transactions at once: operations of this object take
        # turns on it. Atomicity between objects and processes comes from SQLite's own locks.
        self._lock = anyio.Lock()

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        """``sqlite:///relative.db``, ``sqlite:////abs/path.db``; ``?busy_timeout=SECONDS``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite" or parts.netloc or len(parts.path) < 2:
            raise ValueError(
                f"not an SQLite URL: {url!r} (use sqlite:///relative.db or sqlite:////abs.db)"
            )
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"busy_timeout"}
        if unknown:
            raise ValueError(f"unknown SQLite URL option(s) {sorted(unknown)} in {url!r}")
        busy_timeout = float(options.get("busy_timeout", 5.0))
        return cls(parts.path[1:], busy_timeout=busy_timeout)

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"SQLiteStorage({self._path!r})"

    # -- connection ---------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lock:
            if self._db is not None:
                return
            with _translated():
                db = await aiosqlite.connect(
                    self._path, timeout=self._busy_timeout, isolation_level=None
                )
                try:
                    await self._prepare(db)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await db.close()
                    raise
            self._db = db

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        await db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a power loss may drop the last commits, never corrupt the file.
        await db.execute("PRAGMA synchronous = NORMAL")
        rows = await db.execute_fetchall("PRAGMA user_version")
        found = next(iter(rows))[0]
        if found > _SCHEMA_VERSION:
            raise StorageError(
                f"{self._path}: schema version {found} is newer than this library's "
                f"({_SCHEMA_VERSION}); upgrade resilient-payout"
            )
        await db.executescript(_SCHEMA)

    async def close(self) -> None:
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                with anyio.CancelScope(shield=True), _translated():
                    await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("SQLiteStorage is not open: call open() first")
        return self._db

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement in autocommit mode (atomic by itself); its rows."""
        async with self._lock:
            with _translated():
                return list(await self._conn().execute_fetchall(sql, params))

    @staticmethod
    async def _rollback(db: aiosqlite.Connection) -> None:
        # Shielded: a cancelled operation must not leave its transaction open on the connection.
        with anyio.CancelScope(shield=True):
            # "no transaction is active" when BEGIN itself failed.
            with contextlib.suppress(sqlite3.OperationalError):
                await db.execute("ROLLBACK")

    # -- the contract -------------------------------------------------------------------------

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        doc = _encode(payout)
        params = (payout.id, payout.status.value, payout.next_check_at, doc)
        async with self._lock:
            with _translated():
                db = self._conn()
                if await db.execute_fetchall(_CREATE, params):
                    return _decode(1, doc), True
                # Rows are never deleted, so the conflicting row is still there.
                ((version, existing),) = await db.execute_fetchall(_GET, (payout.id,))
                return _decode(version, existing), False

    async def get(self, payout_id: str) -> Payout | None:
        rows = await self._query(_GET, (payout_id,))
        return _decode(*rows[0]) if rows else None

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        if outbox is not None and outbox.payout_id != payout.id:
            raise ValueError(f"outbox entry for {outbox.payout_id!r} given with {payout.id!r}")
        doc = _encode(payout)
        cas = (payout.status.value, payout.next_check_at, doc, payout.id, expected_version)
        async with self._lock:
            with _translated():
                db = self._conn()
                if outbox is None:
                    rows = list(await db.execute_fetchall(_CAS, cas))
                    return _decode(rows[0][0], doc) if rows else None
                try:
                    await db.execute("BEGIN IMMEDIATE")
                    rows = list(await db.execute_fetchall(_CAS, cas))
                    if not rows:
                        await db.execute("ROLLBACK")
                        return None
                    await db.execute(
                        _INSERT_OUTBOX,
                        (
                            outbox.payout_id,
                            outbox.status.value,
                            outbox.created_at,
                            outbox.next_attempt_at,
                            outbox.attempts,
                            outbox.delivered_at,
                            outbox.last_error,
                        ),
                    )
                    await db.execute("COMMIT")
                except BaseException:
                    await self._rollback(db)
                    raise
                return _decode(rows[0][0], doc)

    async def claim_due(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Payout]:
        if limit <= 0:
            return []
        rows = await self._query(_CLAIM_DUE, (owner, now + lease_seconds, now, *_FINAL, now, limit))
        # RETURNING does not keep the subquery's order.
        rows.sort(key=lambda r: (r[2], r[3]))
        return [_decode(version, doc) for version, doc, _, _ in rows]

    async def next_due_at(self) -> float | None:
        rows = await self._query(_NEXT_DUE, _FINAL)
        return float(rows[0][0]) if rows else None

    async def claim_outbox(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[OutboxEntry]:
        if limit <= 0:
            return []
        until = now + lease_seconds
        rows = await self._query(_CLAIM_OUTBOX, (owner, until, until, now, now, limit))
        entries = [_outbox_from_row(r) for r in rows]
        entries.sort(key=lambda e: e.payout_id)  # all share next_attempt_at == until
        return entries

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        await self._query(_ACK_OUTBOX, (delivered_at, payout_id))

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        await self._query(_RETRY_OUTBOX, (next_attempt_at, error, payout_id))

    async def get_outbox(self, payout_id: str) -> OutboxEntry | None:
        rows = await self._query(_GET_OUTBOX, (payout_id,))
        return _outbox_from_row(rows[0]) if rows else None

    async def count_by_status(self) -> dict[PayoutStatus, int]:
        counts = dict.fromkeys(PayoutStatus, 0)
        for status, n in await self._query(_COUNT):
            counts[PayoutStatus(status)] = n
        return counts
