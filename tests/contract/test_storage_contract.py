"""The storage contract on every backend (see conftest.py), the multi-instance contract on every
shared backend, plus backend-specific guarantees (SQLite's here; test_postgres.py, test_redis.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import anyio
import pytest

from resilient_payout._errors import StorageError, StorageUnavailable
from resilient_payout._model import AuditEntry, Cause, Payout, PayoutStatus
from resilient_payout.storage import PayoutQuery, Storage, storage_from_url
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.storage.sqlite import _MIGRATIONS as _SQLITE_MIGRATIONS
from resilient_payout.storage.sqlite import SQLiteStorage
from resilient_payout.testing.contract import (
    T0,
    MultiInstanceContract,
    StorageContract,
    make_outbox,
    make_payout,
)

pytestmark = pytest.mark.anyio


class TestStorageContract(StorageContract):
    """The whole suite, on each backend of ``BACKENDS``."""


class TestMultiInstanceContract(MultiInstanceContract):
    """Several objects on one database, on each backend of ``SHARED_BACKENDS``."""


# -- every backend against a reference model --------------------------------------------------


@dataclass
class _Ref:
    version: int
    final: bool
    next_check_at: float | None
    lease_until: float | None = None


async def test_random_operations_match_a_reference_model(storage: Storage) -> None:
    """Claims, reschedules, lease expiries and clock jumps (also backwards) in random order."""
    await run_reference_model(storage, seed=20240611, steps=400)


async def run_reference_model(storage: Storage, *, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    ids = [f"p-{i:02}" for i in range(25)]
    ref: dict[str, _Ref] = {}

    def due_time() -> float:
        return T0 + rng.randrange(-400, 400) / 8

    for step in range(steps):
        pid = rng.choice(ids)
        op = rng.random()
        if op < 0.2:
            nca = due_time()
            stored, created = await storage.create_if_absent(make_payout(pid, next_check_at=nca))
            assert created == (pid not in ref), step
            if created:
                ref[pid] = _Ref(1, False, nca)
            assert stored.version == ref[pid].version, step
        elif op < 0.5 and pid in ref:
            current = await storage.get(pid)
            assert current is not None
            assert current.version == ref[pid].version, step
            stale = rng.random() < 0.2
            final = rng.random() < 0.15
            new_nca = None if final else due_time()
            status = PayoutStatus.COMPLETED if final else PayoutStatus.AWAITING
            out = await storage.compare_and_set(
                replace(current, status=status, next_check_at=new_nca),
                expected_version=current.version - 1 if stale else current.version,
            )
            if stale:
                assert out is None, step
            else:
                assert out is not None, step
                ref[pid] = _Ref(current.version + 1, final, new_nca)
        elif op < 0.85:
            now = T0 + rng.randrange(-400, 600) / 8
            limit = rng.randint(1, 6)
            lease = rng.choice([0.5, 5.0, 30.0])
            eligible = sorted(
                (r.next_check_at, i)
                for i, r in ref.items()
                if not r.final
                and r.next_check_at is not None
                and r.next_check_at <= now
                and (r.lease_until is None or r.lease_until <= now)
            )[:limit]
            claimed = await storage.claim_due(
                now, owner=f"o{step}", lease_seconds=lease, limit=limit
            )
            assert [p.id for p in claimed] == [i for _, i in eligible], step
            for p in claimed:
                r = ref[p.id]
                r.version += 1
                r.lease_until = now + lease
                assert p.version == r.version, step
        else:
            pending = [
                r.next_check_at for r in ref.values() if not r.final and r.next_check_at is not None
            ]
            assert await storage.next_due_at() == (min(pending) if pending else None), step

    for pid, r in ref.items():
        final_state = await storage.get(pid)
        assert final_state is not None
        assert (final_state.version, final_state.next_check_at) == (r.version, r.next_check_at)
    counts = await storage.count_by_status()
    assert sum(counts.values()) == len(ref)


# -- MemoryStorage at scale --------------------------------------------------------------------


async def test_memory_claims_ten_thousand_payouts_in_due_order() -> None:
    storage = MemoryStorage()
    rng = random.Random(7)
    times = {f"p-{i:05}": T0 + rng.random() * 1000 for i in range(10_000)}
    for pid, nca in times.items():
        await storage.create_if_absent(make_payout(pid, next_check_at=nca))
    # Reschedule a fifth of them, each several times, to leave stale heap entries behind.
    for pid in list(times)[::5]:
        for _ in range(3):
            current = await storage.get(pid)
            assert current is not None
            times[pid] = T0 + rng.random() * 1000
            await storage.compare_and_set(
                replace(current, next_check_at=times[pid]), expected_version=current.version
            )
    claimed: list[str] = []
    for _ in range(30):
        batch = await storage.claim_due(T0 + 1000, owner="w", lease_seconds=60, limit=500)
        claimed += [p.id for p in batch]
    assert claimed == sorted(times, key=lambda pid: (times[pid], pid))
    assert await storage.next_due_at() == min(times.values())


async def test_memory_storage_from_url() -> None:
    assert isinstance(storage_from_url("memory://"), MemoryStorage)


# -- SQLiteStorage -----------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "payouts.db"


async def _opened(path: Path, busy_timeout: float = 5.0) -> SQLiteStorage:
    storage = SQLiteStorage(path, busy_timeout=busy_timeout)
    await storage.open()
    return storage


def test_sqlite_from_url(tmp_path: Path) -> None:
    relative = SQLiteStorage.from_url("sqlite:///data/payouts.db")
    assert relative.path == "data/payouts.db"
    absolute = SQLiteStorage.from_url(f"sqlite:///{tmp_path}/payouts.db")
    assert absolute.path == f"{tmp_path}/payouts.db"
    assert Path(absolute.path).is_absolute()
    from_factory = storage_from_url("sqlite:////var/lib/rp.db?busy_timeout=0.5")
    assert isinstance(from_factory, SQLiteStorage)
    assert from_factory.path == "/var/lib/rp.db"
    for bad in ["sqlite://", "sqlite:///", "sqlite://host/x.db", "sqlite:///x.db?nope=1"]:
        with pytest.raises(ValueError, match="SQLite"):
            SQLiteStorage.from_url(bad)


def test_sqlite_synchronous_defaults_to_durable_submits() -> None:
    assert SQLiteStorage.from_url("sqlite:///x.db").synchronous == "submitting"
    assert SQLiteStorage("x.db").synchronous == "submitting"
    assert SQLiteStorage.from_url("sqlite:///x.db?synchronous=normal").synchronous == "normal"
    assert SQLiteStorage.from_url("sqlite:///x.db?synchronous=NORMAL").synchronous == "normal"
    assert SQLiteStorage.from_url("sqlite:///x.db?synchronous=full").synchronous == "full"
    for bad in ["off", "extra", "2"]:
        with pytest.raises(ValueError, match="synchronous") as raised:
            SQLiteStorage.from_url(f"sqlite:////secret/dir/x.db?synchronous={bad}")
        assert "secret" not in str(raised.value)  # the parameter, never the whole URL
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStorage("x.db", synchronous="OFF")


@pytest.mark.parametrize(
    ("url_option", "pragma"), [("", 1), ("?synchronous=full", 2), ("?synchronous=normal", 1)]
)
async def test_sqlite_sets_the_synchronous_pragma_on_its_connection(
    db_path: Path, url_option: str, pragma: int
) -> None:
    storage = SQLiteStorage.from_url(f"sqlite:///{db_path}{url_option}")
    await storage.open()
    try:
        # The setting is per connection: only the storage's own connection can tell.
        assert storage._conn().execute("PRAGMA synchronous").fetchone() == (pragma,)
        await storage.create_if_absent(make_payout("p-1"))
        assert await storage.get("p-1") is not None
    finally:
        await storage.close()


@pytest.mark.parametrize(
    ("option", "pragmas"),
    [
        ("", ["PRAGMA synchronous = FULL", "PRAGMA synchronous = NORMAL"]),
        ("?synchronous=normal", []),
    ],
)
async def test_sqlite_commits_the_write_before_a_post_with_full_sync(
    db_path: Path, option: str, pragmas: list[str]
) -> None:
    """The ``submitting`` write (a POST follows it) commits under FULL; the next one does not."""
    storage = SQLiteStorage.from_url(f"sqlite:///{db_path}{option}")
    await storage.open()
    statements: list[str] = []
    try:
        created, _ = await storage.create_if_absent(make_payout("p-1"))
        storage._conn().set_trace_callback(statements.append)
        submitting = replace(created, status=PayoutStatus.SUBMITTING)
        stored = await storage.compare_and_set(submitting, expected_version=created.version)
        assert stored is not None
        unknown = replace(stored, status=PayoutStatus.UNKNOWN)
        assert await storage.compare_and_set(unknown, expected_version=stored.version)
    finally:
        storage._conn().set_trace_callback(None)
        await storage.close()
    # Once around the submitting write, and not at all around the next one.
    assert [s for s in statements if "synchronous" in s] == pragmas


async def test_sqlite_uses_wal_and_keeps_the_version_in_its_column(db_path: Path) -> None:
    storage = await _opened(db_path)
    try:
        await storage.create_if_absent(make_payout("p-1"))
        (claimed,) = await storage.claim_due(T0, owner="a", lease_seconds=30, limit=1)
    finally:
        await storage.close()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        row = raw.execute("SELECT version, lease_owner, lease_until FROM payouts").fetchone()
    assert row == (claimed.version, "a", T0 + 30)
    assert claimed.version == 2


async def test_sqlite_survives_close_and_reopen(db_path: Path) -> None:
    first = await _opened(db_path)
    stored, _ = await first.create_if_absent(make_payout("done"))
    final = replace(stored, status=PayoutStatus.COMPLETED, next_check_at=None)
    entry = make_outbox("done")
    done = await first.compare_and_set(final, expected_version=1, outbox=entry)
    await first.create_if_absent(make_payout("leased", next_check_at=T0 - 1))
    (leased,) = await first.claim_due(T0, owner="a", lease_seconds=30, limit=10)
    await first.close()

    second = await _opened(db_path)
    try:
        assert await second.get("done") == done
        assert await second.get_outbox("done") == entry
        assert await second.get("leased") == leased
        assert await second.next_due_at() == T0 - 1
        assert await second.claim_due(T0 + 1, owner="b", lease_seconds=30, limit=10) == []
        (taken,) = await second.claim_due(T0 + 31, owner="b", lease_seconds=30, limit=10)
        assert taken.version == leased.version + 1
        assert await second.count_by_status() == {
            **dict.fromkeys(PayoutStatus, 0),
            PayoutStatus.COMPLETED: 1,
            PayoutStatus.RECEIVED: 1,
        }
    finally:
        await second.close()


async def test_sqlite_locked_database_raises_storage_unavailable(db_path: Path) -> None:
    storage = await _opened(db_path, busy_timeout=0.01)
    stored, _ = await storage.create_if_absent(make_payout("p-1"))
    raw = sqlite3.connect(db_path, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StorageUnavailable, match="locked"):
            await storage.create_if_absent(make_payout("p-2"))
        with pytest.raises(StorageUnavailable):
            await storage.compare_and_set(stored, expected_version=1, outbox=make_outbox("p-1"))
        with pytest.raises(StorageUnavailable):
            await storage.claim_due(T0, owner="a", lease_seconds=30, limit=10)
        assert await storage.get("p-1") == stored  # WAL: reads go on
        raw.execute("ROLLBACK")
        # Nothing was left half-done on the storage's connection.
        assert await storage.compare_and_set(stored, expected_version=1) is not None
        assert await storage.get("p-2") is None
    finally:
        raw.close()
        await storage.close()


async def test_sqlite_cancelled_write_leaves_no_open_transaction(db_path: Path) -> None:
    storage = await _opened(db_path, busy_timeout=10.0)
    stored, _ = await storage.create_if_absent(make_payout("p-1"))
    raw = sqlite3.connect(db_path, isolation_level=None)
    try:
        raw.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: storage.compare_and_set(
                    stored, expected_version=1, outbox=make_outbox("p-1")
                )
            )
            await anyio.wait_all_tasks_blocked()  # the CAS waits for the write lock
            tg.cancel_scope.cancel()
            raw.execute("ROLLBACK")
        # The cancelled CAS rolled back and released the lock: another connection can write.
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("ROLLBACK")
        assert await storage.get("p-1") == stored
        assert await storage.get_outbox("p-1") is None
        assert await storage.compare_and_set(stored, expected_version=1) is not None
    finally:
        raw.close()
        await storage.close()


async def test_sqlite_waits_for_a_lock_without_blocking_the_loop(db_path: Path) -> None:
    # Statements run on the loop's thread with SQLite's own busy wait off: a write that finds
    # another connection's lock must back off asynchronously, and then go through.
    storage = await _opened(db_path, busy_timeout=10.0)
    raw = sqlite3.connect(db_path, isolation_level=None)
    ticks = 0
    try:
        raw.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            result: list[tuple[Payout, bool]] = []

            async def write() -> None:
                result.append(await storage.create_if_absent(make_payout("p-1")))

            async def ticker() -> None:
                nonlocal ticks
                while not result:
                    ticks += 1
                    await anyio.sleep(0.005)

            tg.start_soon(write)
            tg.start_soon(ticker)
            await anyio.sleep(0.1)
            assert not result  # still waiting for the lock...
            assert ticks >= 5  # ...while the loop went on
            raw.execute("ROLLBACK")
        assert result[0][1] is True
        assert await storage.get("p-1") == result[0][0]
    finally:
        raw.close()
        await storage.close()


async def test_sqlite_checkpoints_the_wal_in_its_own_thread(db_path: Path) -> None:
    storage = await _opened(db_path)
    try:
        for n in range(1200):
            await storage.create_if_absent(make_payout(f"p-{n}"))
        checkpointer = storage._checkpointer
        assert checkpointer is not None
        with anyio.fail_after(10):
            # A thread's counter: there is no event to await. One checkpoint per 500 writes.
            while checkpointer.runs < 2:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    finally:
        await storage.close()
    # After close, the database file alone holds everything.
    wal = anyio.Path(f"{db_path}-wal")
    assert not await wal.exists() or (await wal.stat()).st_size == 0
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM payouts").fetchone()[0] == 1200


async def test_sqlite_refuses_a_newer_schema_and_use_before_open(db_path: Path) -> None:
    storage = SQLiteStorage(db_path)
    with pytest.raises(StorageError, match="not open"):
        await storage.get("p-1")
    with sqlite3.connect(db_path) as raw:
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(StorageError, match="newer"):
        await storage.open()
    await storage.close()


# Exactly the schema the first release created (user_version 1), to test upgrades in place.
_V1_SCHEMA = """
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
PRAGMA user_version = 1;
COMMIT;
"""


def _v1_file(path: Path) -> None:
    """A database as the first release left it: a final payout with an undelivered entry."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        raw.execute("PRAGMA journal_mode = WAL")
        raw.executescript(_V1_SCHEMA)
        doc = make_payout("old", status=PayoutStatus.COMPLETED, next_check_at=None).to_dict()
        del doc["version"]
        raw.execute(
            "INSERT INTO payouts (id, version, status, doc) VALUES ('old', 2, 'completed', ?)",
            (json.dumps(doc),),
        )
        raw.execute(
            "INSERT INTO outbox (payout_id, status, created_at, next_attempt_at, attempts, "
            "last_error) VALUES ('old', 'completed', ?, ?, 3, 'HTTP 502')",
            (T0, T0),
        )


async def test_sqlite_upgrades_a_first_release_file_in_place(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _v1_file(db_path)
    caplog.set_level(logging.INFO, logger="resilient_payout.storage")
    # Several objects open it at once, as processes restarting together would: ALTER TABLE is
    # not idempotent, so a second application of the step would fail the open.
    storages = [SQLiteStorage(db_path) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for storage in storages:
            tg.start_soon(storage.open)
    try:
        applied = [r.getMessage() for r in caplog.records if "applied migrations" in r.message]
        latest = len(_SQLITE_MIGRATIONS)
        assert applied == [f"SQLite {db_path}: applied migrations 2..{latest}"]
        old = make_outbox("old", status=PayoutStatus.COMPLETED)
        assert await storages[1].get_outbox("old") == replace(
            old, attempts=3, last_error="HTTP 502"
        )
        stored = await storages[0].get("old")
        assert stored is not None
        assert (stored.version, stored.status) == (2, PayoutStatus.COMPLETED)
        await storages[2].dead_letter_outbox("old", at=T0 + 1, error="gave up")
        assert await storages[3].claim_outbox(T0 + 60, owner="a", lease_seconds=30, limit=9) == []
        assert await storages[0].count_dead_outbox() == 1
        # Step 3 gave the old entry its payout's creation time: it lists as undelivered.
        undelivered = await storages[1].list_payouts(PayoutQuery(undelivered_only=True))
        assert [p.id for p in undelivered.items] == ["old"]
        # Step 4 made the instance registry.
        await storages[2].beat("instance-a", T0)
        assert await storages[3].instances() == {"instance-a": T0}
    finally:
        for storage in storages:
            await storage.close()
    with contextlib.closing(sqlite3.connect(db_path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (latest,)
        (index_sql,) = raw.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'outbox_due'"
        ).fetchone()
        # Step 3 filled the indexed columns from the document of the row already there.
        columns = raw.execute(
            "SELECT created_at, updated_at, has_conflict, partner_ref FROM payouts"
        ).fetchone()
    assert "dead_at IS NULL" in index_sql  # dead entries left the claimable index
    assert columns == (T0 - 10, T0 - 10, 0, None)


async def test_sqlite_step_3_fills_the_operator_columns_from_the_documents(
    db_path: Path,
) -> None:
    """A file at schema 2 with a conflicted final payout holding a partner reference."""
    conflict = AuditEntry(
        T0 - 5, Cause.WEBHOOK, "conflict", PayoutStatus.COMPLETED, PayoutStatus.COMPLETED,
        "webhook reported declined after final completed", conflict=True,
    )  # fmt: skip
    done = make_payout("done", status=PayoutStatus.COMPLETED, next_check_at=None)
    done = replace(done, partner_ref="ref-1", audit=(*done.audit, conflict), updated_at=T0 - 1)
    late = make_payout("late", status=PayoutStatus.UNKNOWN, attempt_started_at=T0 - 900)
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as raw:
        raw.execute("BEGIN IMMEDIATE")
        for step in _SQLITE_MIGRATIONS[:2]:
            for statement in step:
                raw.execute(statement)
        for payout in (done, late):
            doc = payout.to_dict()
            del doc["version"]
            raw.execute(
                "INSERT INTO payouts (id, version, status, doc) VALUES (?, 1, ?, ?)",
                (payout.id, payout.status.value, json.dumps(doc)),
            )
        raw.execute("PRAGMA user_version = 2")
        raw.execute("COMMIT")
    storage = await _opened(db_path)
    try:
        conflicts = await storage.list_payouts(PayoutQuery(conflicts_only=True))
        assert conflicts.items == [replace(done, version=1)]
        assert await storage.get_by_partner_ref("ref-1") == replace(done, version=1)
        snap = await storage.ops_snapshot(T0, late_after=600, failing_after=60)
        assert (snap.oldest_open_age, snap.open_past_window, snap.conflicts) == (10.0, 1, 1)
        assert await storage.prune(T0, dry_run=True, limit=10) == 1
    finally:
        await storage.close()


async def test_sqlite_outbox_insert_fails_with_its_compare_and_set(db_path: Path) -> None:
    """A failure between the update and the outbox insert undoes the update: one transaction."""
    storage = await _opened(db_path)
    other = await _opened(db_path)  # reads through its own connection: only committed data
    try:
        v1, _ = await storage.create_if_absent(make_payout("p-1"))
        with contextlib.closing(sqlite3.connect(db_path)) as raw:
            raw.execute(
                "CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox "
                "BEGIN SELECT RAISE(ABORT, 'injected outbox failure'); END"
            )
            raw.commit()
        final = replace(v1, status=PayoutStatus.COMPLETED, next_check_at=None)
        with pytest.raises(StorageError, match="injected outbox failure"):
            await storage.compare_and_set(final, expected_version=1, outbox=make_outbox("p-1"))
        for reader in (storage, other):
            after = await reader.get("p-1")
            assert after is not None
            assert (after.version, after.status) == (1, PayoutStatus.RECEIVED)
            assert after == v1
            assert await reader.get_outbox("p-1") is None
        # Nothing was left open: the next write goes through (and is seen by the other object).
        assert await storage.compare_and_set(final, expected_version=1) is not None
        done = await other.get("p-1")
        assert done is not None
        assert done.version == 2
    finally:
        await storage.close()
        await other.close()
