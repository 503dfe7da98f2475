"""SQLite storage (``sqlite:///file.db``): durable, safe for several processes on one file.

Every decision is made by SQLite itself: creation is ``INSERT ... ON CONFLICT DO NOTHING``, a
compare-and-set is ``UPDATE ... WHERE version = ?`` (with the outbox insert in the same
``BEGIN IMMEDIATE`` transaction), and a claim is one ``UPDATE ... RETURNING`` over the due rows.
The database runs in WAL mode, so readers never wait for the writer; writers wait up to
``busy_timeout`` for each other (asynchronously), then get
:class:`~resilient_payout.StorageUnavailable`. Only the standard library's ``sqlite3`` is used.

The ``version`` column is authoritative; the JSON document beside it holds the rest of the
record (without its version, which claims bump in SQL). The schema version is ``PRAGMA
user_version``; :meth:`SQLiteStorage.open` applies the missing ``_MIGRATIONS`` under the
write lock.

Durability (``?synchronous=``, docs/storage.md): by default (``submitting``) every write that
moves a payout into ``submitting`` commits with ``synchronous=FULL``, fsyncing the WAL (and so
every earlier commit) before the POST that follows it, because a payout rolled back by a power
loss from ``submitting`` to ``received`` would be POSTed to the partner again: a second payment.
Other commits use ``NORMAL`` and are made durable by the next such fsync or the checkpoint
thread; a power loss may roll those back, which repeats work but never a POST. ``full`` fsyncs
every commit (also the app's request itself); ``normal`` none: only for data you can lose.

Group commit (``?group_commit=on``, the default): the writes that concurrent callers make in one
tick of the event loop run in one ``BEGIN IMMEDIATE`` transaction, each in its own ``SAVEPOINT``
(its failure undoes only its statements), and commit together: one commit, and one fsync if any
of them needs FULL. Each caller gets its own result only after that commit returned.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.lowlevel
import anyio.to_thread

from .._errors import ConfigurationError, PartnerReferenceTaken, StorageError, StorageUnavailable
from .._model import OutboxEntry, Payout, PayoutStatus
from ._codec import decode_outbox, decode_payout, encode_payout, outbox_values
from ._query import OpsSnapshot, PayoutPage, PayoutQuery, page_of
from ._sql import FINAL_SQL, Listing, index_values, listing_sql

__all__ = ["SQLiteStorage"]

log = logging.getLogger("resilient_payout.storage")

# The schema, step by step: step ``i`` (1-based) takes a file from ``PRAGMA user_version``
# ``i - 1`` to ``i``. Only ever append. Statements run one by one inside one BEGIN IMMEDIATE
# transaction (executescript would commit it half-way).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the first release's schema (IF NOT EXISTS as it was then: it ran on every open).
    (
        """
        CREATE TABLE IF NOT EXISTS payouts (
            id            TEXT PRIMARY KEY,
            version       INTEGER NOT NULL,
            status        TEXT NOT NULL,
            next_check_at REAL,
            lease_owner   TEXT,
            lease_until   REAL,
            doc           TEXT NOT NULL
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS payouts_due ON payouts (next_check_at, id, status, lease_until)
            WHERE next_check_at IS NOT NULL
        """,
        "CREATE INDEX IF NOT EXISTS payouts_status ON payouts (status)",
        """
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
        )
        """,
        """
        CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, payout_id)
            WHERE delivered_at IS NULL
        """,
    ),
    # 2: dead-lettered entries leave the claimable index; a small index counts them.
    (
        "ALTER TABLE outbox ADD COLUMN dead_at REAL",
        "DROP INDEX outbox_due",
        """
        CREATE INDEX outbox_due ON outbox (next_attempt_at, payout_id)
            WHERE delivered_at IS NULL AND dead_at IS NULL
        """,
        "CREATE INDEX outbox_dead ON outbox (payout_id) WHERE dead_at IS NOT NULL",
    ),
    # 3: what operators query (listing, alert figures, retention) and partner references, as
    # columns beside the document, filled from it for the rows already there.
    (
        "ALTER TABLE payouts ADD COLUMN created_at REAL",
        "ALTER TABLE payouts ADD COLUMN updated_at REAL",
        "ALTER TABLE payouts ADD COLUMN attempt_started_at REAL",
        "ALTER TABLE payouts ADD COLUMN has_conflict INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE payouts ADD COLUMN partner_ref TEXT",
        "ALTER TABLE outbox ADD COLUMN payout_created_at REAL",
        """
        UPDATE payouts SET
            created_at = json_extract(doc, '$.created_at'),
            updated_at = json_extract(doc, '$.updated_at'),
            attempt_started_at = json_extract(doc, '$.attempt_started_at'),
            partner_ref = json_extract(doc, '$.partner_ref'),
            has_conflict = EXISTS (
                SELECT 1 FROM json_each(doc, '$.audit') WHERE json_extract(value, '$.conflict') = 1
            )
        """,
        """
        UPDATE outbox SET payout_created_at = (SELECT created_at FROM payouts WHERE id = payout_id)
        """,
        """
        CREATE UNIQUE INDEX payouts_partner_ref ON payouts (partner_ref)
            WHERE partner_ref IS NOT NULL
        """,
        "DROP INDEX payouts_status",  # the prefix of payouts_status_created
        "CREATE INDEX payouts_created ON payouts (created_at, id)",
        "CREATE INDEX payouts_status_created ON payouts (status, created_at, id)",
        "CREATE INDEX payouts_conflicts ON payouts (created_at, id) WHERE has_conflict = 1",
        f"""
        CREATE INDEX payouts_open_attempt ON payouts (attempt_started_at)
            WHERE status NOT IN ({FINAL_SQL})
        """,
        f"CREATE INDEX payouts_final_updated ON payouts (updated_at) WHERE status IN ({FINAL_SQL})",
        """
        CREATE INDEX outbox_undelivered ON outbox (payout_created_at, payout_id)
            WHERE delivered_at IS NULL
        """,
    ),
    # 4: the instance liveness registry (one row per running instance, its latest heartbeat).
    ("CREATE TABLE instances (id TEXT PRIMARY KEY, mark REAL NOT NULL)",),
    # 5: the leases of one owner, for release_leases (only rows in flight are leased: small).
    (
        "CREATE INDEX payouts_lease_owner ON payouts (lease_owner) WHERE lease_owner IS NOT NULL",
        "CREATE INDEX outbox_lease_owner ON outbox (lease_owner) WHERE lease_owner IS NOT NULL",
    ),
)

_SCHEMA_VERSION = len(_MIGRATIONS)

_SYNCHRONOUS = ("submitting", "full", "normal")

_SWITCHES = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}

_FINAL: tuple[str, ...] = tuple(s.value for s in PayoutStatus if s.is_final)
_NOT_FINAL = "status NOT IN (" + ", ".join("?" * len(_FINAL)) + ")"

_CREATE = """
INSERT INTO payouts (id, version, status, next_check_at, doc,
                     created_at, updated_at, attempt_started_at, has_conflict, partner_ref)
VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
RETURNING version
"""

_GET = "SELECT version, doc FROM payouts WHERE id = ?"

_GET_BY_REF = "SELECT version, doc FROM payouts WHERE partner_ref = ?"

_REF_HOLDER = "SELECT id FROM payouts WHERE partner_ref = ?"

# A record without a partner reference keeps the one stored (references are never removed).
_CAS = """
UPDATE payouts
SET version = version + 1, status = ?, next_check_at = ?, doc = ?,
    created_at = ?, updated_at = ?, attempt_started_at = ?, has_conflict = ?,
    partner_ref = coalesce(?, partner_ref),
    lease_owner = NULL, lease_until = NULL
WHERE id = ? AND version = ?
RETURNING version
"""

# payout_created_at: the payout's, so that undelivered outcomes list in payout order from
# the outbox's own index.
_INSERT_OUTBOX = """
INSERT INTO outbox
    (payout_id, status, created_at, next_attempt_at, attempts, delivered_at, last_error, dead_at,
     payout_created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    "payout_id, status, created_at, next_attempt_at, attempts, delivered_at, last_error, dead_at"
)

# The lease end doubles as the next attempt, so a dead claimer's entry comes back by itself.
_CLAIM_OUTBOX = f"""
UPDATE outbox
SET lease_owner = ?, lease_until = ?, next_attempt_at = ?
WHERE payout_id IN (
    SELECT payout_id FROM outbox
    WHERE delivered_at IS NULL AND dead_at IS NULL AND next_attempt_at <= ?
      AND (lease_until IS NULL OR lease_until <= ?)
    ORDER BY next_attempt_at, payout_id
    LIMIT ?
)
RETURNING {_OUTBOX_COLUMNS}
"""  # noqa: S608 -- a constant column list

_GET_OUTBOX = f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE payout_id = ?"  # noqa: S608

# Run in this order in one transaction: the running leases (counted), then the rest of the
# owner's, already run out. `lease_owner = ?` implies IS NOT NULL: the partial indexes serve it.
_RELEASE_RUNNING = (
    """
    UPDATE payouts SET lease_owner = NULL, lease_until = NULL
    WHERE lease_owner = ? AND lease_until > ?
    RETURNING 1
    """,
    # The lease end doubled as the next attempt.
    """
    UPDATE outbox
    SET lease_owner = NULL, lease_until = NULL, next_attempt_at = min(next_attempt_at, ?)
    WHERE lease_owner = ? AND lease_until > ?
    RETURNING 1
    """,
)
_RELEASE_SPENT = (
    "UPDATE payouts SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
    "UPDATE outbox SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
)

_ACK_OUTBOX = """
UPDATE outbox SET delivered_at = ?, dead_at = NULL, lease_owner = NULL, lease_until = NULL
WHERE payout_id = ? AND delivered_at IS NULL
"""

_RETRY_OUTBOX = """
UPDATE outbox
SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,
    lease_owner = NULL, lease_until = NULL
WHERE payout_id = ? AND delivered_at IS NULL AND dead_at IS NULL
"""

_DEAD_LETTER_OUTBOX = """
UPDATE outbox
SET attempts = attempts + 1, dead_at = ?, last_error = ?, lease_owner = NULL, lease_until = NULL
WHERE payout_id = ? AND delivered_at IS NULL AND dead_at IS NULL
"""

# A fresh schedule: the round counter starts again (last_error stays, as history).
_REQUEUE_OUTBOX = """
UPDATE outbox
SET next_attempt_at = ?, dead_at = NULL, delivered_at = NULL, attempts = 0,
    lease_owner = NULL, lease_until = NULL
WHERE payout_id = ?
RETURNING 1
"""

_COUNT_DEAD = "SELECT COUNT(*) FROM outbox WHERE dead_at IS NOT NULL"

_COUNT = "SELECT status, COUNT(*) FROM payouts GROUP BY status"

_OPEN: tuple[str, ...] = tuple(s.value for s in PayoutStatus if not s.is_final)

# One statement: one consistent snapshot. Each figure reads one index (min per status: one
# entry of payouts_status_created each).
_OPS = f"""
SELECT {", ".join(f"(SELECT min(created_at) FROM payouts WHERE status = '{s}')" for s in _OPEN)},
    (SELECT count(*) FROM payouts
     WHERE attempt_started_at < ? AND status NOT IN ({FINAL_SQL})),
    (SELECT count(*) FROM payouts WHERE has_conflict = 1),
    (SELECT count(*) FROM outbox
     WHERE delivered_at IS NULL AND dead_at IS NULL AND attempts > 0 AND created_at < ?),
    (SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL)
"""  # noqa: S608 -- constants and placeholders only

_PRUNABLE = f"""
SELECT p.id FROM payouts p
WHERE p.status IN ({FINAL_SQL}) AND p.updated_at < ?
  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.payout_id = p.id AND o.delivered_at IS NULL)
ORDER BY p.updated_at
LIMIT ?
"""  # noqa: S608 -- constants and placeholders only

_BEAT = """
INSERT INTO instances (id, mark) VALUES (?, ?)
ON CONFLICT (id) DO UPDATE SET mark = excluded.mark
"""

_INSTANCES = "SELECT id, mark FROM instances"

_FORGET_INSTANCE = "DELETE FROM instances WHERE id = ?"

_LISTING = Listing(
    payouts="payouts",
    outbox="outbox",
    placeholder=lambda _n: "?",
    conflict="p.has_conflict = 1",
    outbox_join="outbox o CROSS JOIN payouts p ON p.id = o.payout_id",  # the outbox first
)

# Primary result codes meaning "not now": another writer holds the lock, the file is
# unreachable, or the disk is full (the write is rolled back whole; it succeeds once space is
# freed, as PostgreSQL's disk_full is StorageUnavailable too). Anything else is a plain
# StorageError.
_UNAVAILABLE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_FULL,
    }
)


def _translated(exc: sqlite3.Error) -> StorageError:
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc).lower()
    if (code is not None and code & 0xFF in _UNAVAILABLE_CODES) or (
        code is None and ("locked" in text or "busy" in text)
    ):
        return StorageUnavailable(f"SQLite: {exc}")
    return StorageError(f"SQLite: {exc}")


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc).lower()


T = TypeVar("T")


def _raised(exc: BaseException) -> BaseException:
    """What a caller of a failed write gets: SQLite's errors translated, others as raised."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    translated = _translated(exc)
    translated.__cause__ = exc
    return translated


# Checkpoint the WAL into the database file every this many writes (a few MB of WAL at most).
_CHECKPOINT_EVERY = 500
_FIRST_BACKOFF = 0.001
_MAX_BACKOFF = 0.05
# At most this many writes per group commit: what bounds how long one commit holds the file's
# write lock (tens of microseconds per write), so other processes on the file never starve.
_GROUP_MAX = 32

Write = Callable[[sqlite3.Connection], T]


class _Backoff:
    """The waits between tries while another connection holds the write lock: doubling from
    ``_FIRST_BACKOFF`` to ``_MAX_BACKOFF``, for ``timeout`` seconds from the first refusal."""

    __slots__ = ("_deadline", "_delay", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._deadline: float | None = None
        self._delay = _FIRST_BACKOFF

    async def wait(self) -> bool:
        """Sleep before the next try; False (at once) once ``timeout`` has run out."""
        now = anyio.current_time()
        if self._deadline is None:
            self._deadline = now + self._timeout
        if now >= self._deadline:
            return False
        await anyio.sleep(min(self._delay, self._deadline - now))
        self._delay = min(self._delay * 2, _MAX_BACKOFF)
        return True


class _Pending:
    """A write waiting for the commit of its group; then its outcome."""

    __slots__ = ("_woken", "done", "error", "fn", "full", "value")

    def __init__(self, fn: Write[Any], full: bool) -> None:
        self.fn = fn
        self.full = full
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self._woken: anyio.Event | None = None

    def settle(self, value: Any, error: BaseException | None) -> None:
        self.value, self.error, self.done = value, error, True
        self.wake()

    def wake(self) -> None:
        if self._woken is not None:
            self._woken.set()

    async def wait(self) -> None:
        """Until settled, or until the lead is free (the caller then looks again)."""
        self._woken = anyio.Event()
        try:
            await self._woken.wait()
        finally:
            self._woken = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class _Checkpointer:
    """A thread that copies the WAL into the database file when poked (the database file's
    fsyncs happen here, never on the event loop; with ``synchronous=NORMAL`` these are the only
    fsyncs, with FULL each commit also fsyncs the WAL). PASSIVE: it neither waits for
    nor blocks readers and writers; what it cannot copy now is copied next time."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = False
        self.runs = 0
        """Checkpoints completed (read by tests)."""
        self._thread = threading.Thread(target=self._main, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _main(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                with contextlib.closing(sqlite3.connect(self._path, timeout=0)) as db:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self.runs += 1
            except sqlite3.Error:
                pass  # the next poke tries again; the WAL only grows meanwhile


class SQLiteStorage:
    """The :class:`~resilient_payout.storage.Storage` contract on one SQLite file.

    Statements run on the event loop's thread, one or one short transaction at a time, never
    across an ``await``: a statement takes tens of microseconds, less than handing it to a
    worker thread and back, which cost more CPU than the SQL itself (docs/performance.md).
    With ``group_commit`` (the default) the writes of one loop tick share that transaction (at
    most ``_GROUP_MAX`` of them), each caller answered once it is committed; reads run outside
    it and so see committed data only.
    Nothing here waits on the loop's thread: the connection's own busy timeout is 0, a write
    that finds another connection's lock backs off with ``anyio.sleep`` and tries again for up
    to ``busy_timeout`` seconds, then raises :class:`~resilient_payout.StorageUnavailable`; WAL
    checkpoints run in a worker thread. ``synchronous="submitting"`` (the default) fsyncs the
    WAL on the loop's thread for each write that precedes a POST, ``"full"`` for every commit,
    ``"normal"`` for none (see the module docstring). Any number of ``SQLiteStorage`` objects,
    in any number of processes, may share the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        synchronous: str = "submitting",
        group_commit: bool = True,
    ) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"SQLite option synchronous must be one of {', '.join(_SYNCHRONOUS)}, "
                f"not {synchronous!r}"
            )
        self._path = os.fspath(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._open_lock = anyio.Lock()  # open() and close() only; never around a statement
        self._writes = 0
        self._checkpointer: _Checkpointer | None = None
        self._group_commit = group_commit
        self._queue: deque[_Pending] = deque()  # writes not yet committed, in arrival order
        self._leading = False  # a caller is committing the queue (or waiting for the lock to)

    @classmethod
    def from_url(cls, url: str) -> SQLiteStorage:
        """``sqlite:///relative.db``, ``sqlite:////abs/path.db``; ``?busy_timeout=SECONDS``,
        ``?synchronous=normal`` (faster commits that a power loss may roll back),
        ``?group_commit=off`` (each write its own commit)."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite" or parts.netloc or len(parts.path) < 2:
            raise ValueError(
                f"not an SQLite URL: {url!r} (use sqlite:///relative.db or sqlite:////abs.db)"
            )
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"busy_timeout", "synchronous", "group_commit"}
        if unknown:
            raise ValueError(f"unknown SQLite URL option(s) {sorted(unknown)} in {url!r}")
        busy_timeout = float(options.get("busy_timeout", 5.0))
        synchronous = options.get("synchronous", "submitting").lower()
        group_commit = _SWITCHES.get(options.get("group_commit", "on").lower())
        if group_commit is None:
            raise ConfigurationError("SQLite option group_commit must be on or off")
        return cls(
            parts.path[1:],
            busy_timeout=busy_timeout,
            synchronous=synchronous,
            group_commit=group_commit,
        )

    @property
    def synchronous(self) -> str:
        """``full`` (the default) or ``normal``: see docs/storage.md, "Durability and money"."""
        return self._synchronous

    @property
    def group_commit(self) -> bool:
        """Whether concurrent writes share commits (``?group_commit=``, on by default)."""
        return self._group_commit

    @property
    def path(self) -> str:
        return self._path

    def __repr__(self) -> str:
        return f"SQLiteStorage({self._path!r})"

    # -- connection ---------------------------------------------------------------------------

    async def open(self) -> None:
        async with self._open_lock:
            if self._db is not None:
                return
            # Opening may wait for another process's lock (schema creation): a worker thread.
            self._db = await anyio.to_thread.run_sync(self._connect)
            self._checkpointer = _Checkpointer(self._path)

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,  # opened here, used on the loop's thread
            )
        except sqlite3.Error as exc:
            raise _translated(exc) from exc
        try:
            self._prepare(db)
        except BaseException:
            db.close()
            raise
        return db

    def _prepare(self, db: sqlite3.Connection) -> None:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit returns only once the WAL is on disk, so a power loss cannot roll a
            # decision back (e.g. `submitting` back to `received`, which would be POSTed again).
            mode = "NORMAL" if self._synchronous == "submitting" else self._synchronous.upper()
            db.execute(f"PRAGMA synchronous = {mode}")
            found = db.execute("PRAGMA user_version").fetchone()[0]
            if found < _SCHEMA_VERSION:
                found = self._migrate(db)
            # From here on no statement may block the loop: lock waits are async retries, and
            # checkpoints are ours, in a worker thread.
            db.execute("PRAGMA busy_timeout = 0")
            db.execute("PRAGMA wal_autocheckpoint = 0")
        except sqlite3.Error as exc:
            raise _translated(exc) from exc
        if found > _SCHEMA_VERSION:
            raise StorageError(
                f"{self._path}: schema version {found} is newer than this library's "
                f"({_SCHEMA_VERSION}); upgrade resilient-payout"
            )

    def _migrate(self, db: sqlite3.Connection) -> int:
        """Apply the missing :data:`_MIGRATIONS` steps; the version found under the lock."""
        # Waits up to busy_timeout (the connection's timeout until _prepare turns it off) for
        # other processes; then re-reads the version, since one of them may have migrated.
        db.execute("BEGIN IMMEDIATE")
        try:
            found: int = db.execute("PRAGMA user_version").fetchone()[0]
            for version in range(found + 1, _SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version - 1]:
                    db.execute(statement)
            if found < _SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if found < _SCHEMA_VERSION:
            log.info("SQLite %s: applied migrations %d..%d", self._path, found + 1, _SCHEMA_VERSION)
        return found

    async def close(self) -> None:
        async with self._open_lock:
            db, self._db = self._db, None
            checkpointer, self._checkpointer = self._checkpointer, None
            if checkpointer is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(checkpointer.stop)
            if db is not None:
                # Closing the last connection checkpoints the WAL (an fsync): not on the loop.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(db.close)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError("SQLiteStorage is not open: call open() first")
        return self._db

    async def _run(self, op: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        """``op(connection)`` on this thread, retried with backoff while another connection
        holds the write lock. ``op`` must leave no transaction open, whatever happens."""
        backoff = _Backoff(self._busy_timeout)
        while True:
            db = self._conn()
            try:
                result = op(db)
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if not _is_busy(exc) or not await backoff.wait():
                    raise _translated(exc) from exc
                continue
            if write:
                self._wrote(1)
            return result

    def _wrote(self, n: int) -> None:
        self._writes += n
        if self._writes >= _CHECKPOINT_EVERY and self._checkpointer is not None:
            self._writes = 0
            self._checkpointer.poke()

    async def _write(self, fn: Write[T], *, submits: bool = False, atomic: bool = False) -> T:
        """``fn(connection)``, a write, committed before this returns.

        ``submits``: a POST follows it (FULL under ``synchronous=submitting``). ``atomic``: it
        runs several statements, which must commit together. ``fn`` opens no transaction: the
        caller does, for ``fn`` alone or for its group (see :meth:`_commit_group`).
        """
        full = submits and self._synchronous == "submitting"
        if not self._group_commit:
            return await self._run(lambda db: self._solo(db, fn, full=full, atomic=atomic))
        item = _Pending(fn, full)
        self._queue.append(item)
        try:
            while not item.done:
                if self._leading:
                    await item.wait()
                    continue
                self._leading = True
                try:
                    await self._lead(item)
                finally:
                    self._leading = False
        finally:
            if not item.done:
                # Cancelled before its group ran (no transaction spans an await): nothing of
                # it was written.
                self._queue.remove(item)
            if not self._leading and self._queue:
                self._queue[0].wake()  # a waiting write takes the lead
        result: T = item.outcome()
        return result

    def _solo(self, db: sqlite3.Connection, fn: Write[T], *, full: bool, atomic: bool) -> T:
        """``fn`` as its own commit (``group_commit=off``): statements in autocommit mode
        unless ``atomic``."""

        def run(db: sqlite3.Connection) -> T:
            if not atomic:
                return fn(db)
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return self._fully_synced(db, run) if full else run(db)

    async def _lead(self, mine: _Pending) -> None:
        """Commit the queue, group by group, until ``mine`` is settled; back off while another
        connection holds the write lock, as :meth:`_run` does."""
        await anyio.lowlevel.checkpoint()  # the writes made in this tick of the loop join
        backoff = _Backoff(self._busy_timeout)
        while not mine.done:
            db = self._conn()
            group = list(itertools.islice(self._queue, _GROUP_MAX))
            try:
                outcomes = self._commit_group(db, group)
            except sqlite3.Error as exc:
                if _is_busy(exc) and await backoff.wait():
                    continue
                # Nothing of the group was written: each of its callers learns why.
                outcomes = [(None, _raised(exc)) for _ in group]
            else:
                self._wrote(len(group))
            backoff = _Backoff(self._busy_timeout)  # each group gets the whole busy_timeout
            for item, (value, error) in zip(group, outcomes, strict=True):
                self._queue.popleft()  # the group is the queue's head: nothing ran meanwhile
                item.settle(value, error)

    def _commit_group(
        self, db: sqlite3.Connection, group: list[_Pending]
    ) -> list[tuple[Any, BaseException | None]]:
        """Run ``group`` in one transaction, each write in its own savepoint, and commit it;
        each write's result or error. Raises (with nothing written) if the transaction could
        not begin or commit. No ``await``: no other statement of this connection runs while
        the transaction is open, so no read ever sees its writes before they are committed."""
        # A per-connection setting that cannot change inside a transaction: one level for the
        # group, FULL if any of its writes needs it (one fsync makes all of them durable).
        full = any(item.full for item in group)
        if full:
            db.execute("PRAGMA synchronous = FULL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                outcomes: list[tuple[Any, BaseException | None]] = []
                for item in group:
                    db.execute("SAVEPOINT w")
                    try:
                        value = item.fn(db)
                    except Exception as exc:  # noqa: BLE001 -- handed to its caller
                        # Its own failure: undo its statements only.
                        db.execute("ROLLBACK TO w")
                        db.execute("RELEASE w")
                        outcomes.append((None, _raised(exc)))
                    else:
                        db.execute("RELEASE w")
                        outcomes.append((value, None))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            if full:
                db.execute("PRAGMA synchronous = NORMAL")
        return outcomes

    # -- the contract -------------------------------------------------------------------------

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        doc = encode_payout(payout)
        params = (payout.id, payout.status.value, payout.next_check_at, doc, *index_values(payout))

        def op(db: sqlite3.Connection) -> tuple[Payout, bool]:
            # Rows are deleted only by prune: a conflicting row pruned before we read it is
            # gone, and the insert is tried again.
            for _ in range(3):
                with self._partner_ref(db, payout):
                    if db.execute(_CREATE, params).fetchall():
                        # What was written, without decoding the document just encoded.
                        return replace(payout, version=1), True
                rows = db.execute(_GET, (payout.id,)).fetchall()
                if rows:
                    return decode_payout(*rows[0]), False
            raise StorageUnavailable(f"SQLite: payout {payout.id!r} kept being pruned")

        # Created straight into submitting, a POST follows: fsync, as compare_and_set does.
        return await self._write(op, submits=payout.status is PayoutStatus.SUBMITTING)

    @staticmethod
    def _fully_synced(db: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> T:
        db.execute("PRAGMA synchronous = FULL")
        try:
            return op(db)
        finally:
            db.execute("PRAGMA synchronous = NORMAL")

    @contextlib.contextmanager
    def _partner_ref(self, db: sqlite3.Connection, payout: Payout) -> Iterator[None]:
        """Turn the unique index's refusal into PartnerReferenceTaken, with the holder.

        SQLite undid the refused statement alone; the caller's transaction (or savepoint),
        if any, is rolled back by whoever opened it. The holder is read inside it: a write
        of the same group that took the reference first is the holder once committed, and
        the caller hears of it only then."""
        try:
            yield
        except sqlite3.IntegrityError as exc:
            if payout.partner_ref is None or "partner_ref" not in str(exc):
                raise
            rows = db.execute(_REF_HOLDER, (payout.partner_ref,)).fetchall()
            raise PartnerReferenceTaken(payout.partner_ref, rows[0][0] if rows else None) from None

    async def get(self, payout_id: str) -> Payout | None:
        rows = await self._query(_GET, (payout_id,))
        return decode_payout(*rows[0]) if rows else None

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One reading statement in autocommit mode; its rows. Reads never join a group: they
        see committed data only (see :meth:`_commit_group`)."""
        return await self._run(lambda db: db.execute(sql, params).fetchall(), write=False)

    async def _execute(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """One writing statement (atomic by itself); its rows, once committed."""
        return await self._write(lambda db: db.execute(sql, params).fetchall())

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        if outbox is not None and outbox.payout_id != payout.id:
            raise ValueError(f"outbox entry for {outbox.payout_id!r} given with {payout.id!r}")
        doc = encode_payout(payout)
        cas = (
            payout.status.value,
            payout.next_check_at,
            doc,
            *index_values(payout),
            payout.id,
            expected_version,
        )

        def op(db: sqlite3.Connection) -> Payout | None:
            with self._partner_ref(db, payout):
                rows = db.execute(_CAS, cas).fetchall()
            if not rows:
                return None
            if outbox is not None:  # in the update's transaction (atomic=)
                values = (outbox.payout_id, *outbox_values(outbox), payout.created_at)
                db.execute(_INSERT_OUTBOX, values)
            return replace(payout, version=rows[0][0])

        # A POST follows a write into submitting: were it rolled back by a power loss, the
        # payout would be POSTed again. Its commit fsyncs the WAL (and every earlier commit).
        return await self._write(
            op, submits=payout.status is PayoutStatus.SUBMITTING, atomic=outbox is not None
        )

    async def claim_due(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[Payout]:
        if limit <= 0:
            return []
        params = (owner, now + lease_seconds, now, *_FINAL, now, limit)
        rows = await self._execute(_CLAIM_DUE, params)
        # RETURNING does not keep the subquery's order.
        rows.sort(key=lambda r: (r[2], r[3]))
        return [decode_payout(version, doc) for version, doc, _, _ in rows]

    async def next_due_at(self) -> float | None:
        rows = await self._query(_NEXT_DUE, _FINAL)
        return float(rows[0][0]) if rows else None

    async def claim_outbox(
        self, now: float, *, owner: str, lease_seconds: float, limit: int
    ) -> list[OutboxEntry]:
        if limit <= 0:
            return []
        until = now + lease_seconds
        params = (owner, until, until, now, now, limit)
        rows = await self._execute(_CLAIM_OUTBOX, params)
        entries = [decode_outbox(*r) for r in rows]
        entries.sort(key=lambda e: e.payout_id)  # all share next_attempt_at == until
        return entries

    async def release_leases(self, owner: str, now: float, *, outbox: bool = True) -> int:
        def op(db: sqlite3.Connection) -> int:
            payouts, entries = _RELEASE_RUNNING
            payouts_spent, entries_spent = _RELEASE_SPENT
            released = len(db.execute(payouts, (owner, now)).fetchall())
            db.execute(payouts_spent, (owner,))
            if outbox:
                released += len(db.execute(entries, (now, owner, now)).fetchall())
                db.execute(entries_spent, (owner,))
            return released

        return await self._write(op, atomic=True)

    async def ack_outbox(self, payout_id: str, *, delivered_at: float) -> None:
        await self._execute(_ACK_OUTBOX, (delivered_at, payout_id))

    async def retry_outbox(self, payout_id: str, *, next_attempt_at: float, error: str) -> None:
        await self._execute(_RETRY_OUTBOX, (next_attempt_at, error, payout_id))

    async def dead_letter_outbox(self, payout_id: str, *, at: float, error: str) -> None:
        await self._execute(_DEAD_LETTER_OUTBOX, (at, error, payout_id))

    async def requeue_outbox(self, payout_id: str, *, next_attempt_at: float) -> bool:
        return bool(await self._execute(_REQUEUE_OUTBOX, (next_attempt_at, payout_id)))

    async def count_dead_outbox(self) -> int:
        ((n,),) = await self._query(_COUNT_DEAD)
        return int(n)

    async def get_outbox(self, payout_id: str) -> OutboxEntry | None:
        rows = await self._query(_GET_OUTBOX, (payout_id,))
        return decode_outbox(*rows[0]) if rows else None

    async def count_by_status(self) -> dict[PayoutStatus, int]:
        counts = dict.fromkeys(PayoutStatus, 0)
        for status, n in await self._query(_COUNT):
            counts[PayoutStatus(status)] = n
        return counts

    # -- operators -------------------------------------------------------------------------------

    async def get_by_partner_ref(self, partner_ref: str) -> Payout | None:
        rows = await self._query(_GET_BY_REF, (partner_ref,))
        return decode_payout(*rows[0]) if rows else None

    async def list_payouts(self, query: PayoutQuery) -> PayoutPage:
        sql, params = listing_sql(query, _LISTING)
        rows = await self._query(sql, params)
        return page_of((decode_payout(version, doc) for version, doc, _, _ in rows), query.limit)

    async def ops_snapshot(
        self, now: float, *, late_after: float, failing_after: float
    ) -> OpsSnapshot:
        ((*oldest, late, conflicts, failing, dead),) = await self._query(
            _OPS, (now - late_after, now - failing_after)
        )
        return OpsSnapshot.of(now, oldest, late, conflicts, failing, dead)

    async def prune(self, before: float, *, dry_run: bool, limit: int) -> int:
        if limit <= 0:
            return 0

        if dry_run:
            return len(await self._query(_PRUNABLE, (before, limit)))

        def op(db: sqlite3.Connection) -> int:
            ids = db.execute(_PRUNABLE, (before, limit)).fetchall()  # chosen under the lock
            db.executemany("DELETE FROM outbox WHERE payout_id = ?", ids)
            db.executemany("DELETE FROM payouts WHERE id = ?", ids)
            return len(ids)

        return await self._write(op, atomic=True)

    # -- instance liveness ----------------------------------------------------------------------

    async def beat(self, instance_id: str, mark: float) -> None:
        await self._execute(_BEAT, (instance_id, mark))

    async def instances(self) -> dict[str, float]:
        return {str(i): float(m) for i, m in await self._query(_INSTANCES)}

    async def forget_instance(self, instance_id: str) -> None:
        await self._execute(_FORGET_INSTANCE, (instance_id,))
