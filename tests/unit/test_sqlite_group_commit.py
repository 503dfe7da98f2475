"""SQLiteStorage's group commit: concurrent writes of one loop tick share one transaction.

Commits are counted from the connection's statement trace (``set_trace_callback``): a group is
``BEGIN IMMEDIATE``, one ``SAVEPOINT`` per write, ``COMMIT``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from resilient_payout import ConfigurationError, PartnerReferenceTaken
from resilient_payout._errors import StorageError, StorageUnavailable
from resilient_payout._model import Payout, PayoutStatus
from resilient_payout.storage.sqlite import _GROUP_MAX, SQLiteStorage
from resilient_payout.testing.contract import T0, make_outbox, make_payout

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def _storage(path: Path, **options: Any) -> AsyncIterator[SQLiteStorage]:
    storage = SQLiteStorage(path / "gc.db", **options)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


@contextlib.contextmanager
def _traced(storage: SQLiteStorage) -> Iterator[list[str]]:
    statements: list[str] = []
    storage._conn().set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        storage._conn().set_trace_callback(None)


def _commits(statements: list[str]) -> int:
    return statements.count("COMMIT")


async def _gather(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Start all the calls in one tick; each one's result, or the exception it raised."""
    results: list[Any] = [None] * len(calls)

    async def run(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    return results


def _committed_ids(path: Path) -> list[str]:
    """What another connection sees: committed rows only."""
    with contextlib.closing(sqlite3.connect(path / "gc.db")) as raw:
        return [r[0] for r in raw.execute("SELECT id FROM payouts ORDER BY id")]


async def test_concurrent_writes_share_one_commit(tmp_path: Path) -> None:
    async with _storage(tmp_path) as storage:
        with _traced(storage) as statements:
            results = await _gather(
                [partial(storage.create_if_absent, make_payout(f"p-{i}")) for i in range(10)]
            )
        assert [created for _, created in results] == [True] * 10
        assert _commits(statements) == 1
        assert statements.count("BEGIN IMMEDIATE") == 1
        assert statements.count("SAVEPOINT w") == 10
        assert _committed_ids(tmp_path) == sorted(f"p-{i}" for i in range(10))


async def test_without_group_commit_each_write_commits_alone(tmp_path: Path) -> None:
    async with _storage(tmp_path, group_commit=False) as storage:
        with _traced(storage) as statements:
            await _gather(
                [partial(storage.create_if_absent, make_payout(f"p-{i}")) for i in range(10)]
            )
        # Ten autocommit inserts: no explicit transaction at all.
        assert "BEGIN IMMEDIATE" not in statements
        assert sum(s.startswith("\nINSERT INTO payouts") for s in statements) == 10
        assert len(_committed_ids(tmp_path)) == 10


async def test_a_group_is_bounded(tmp_path: Path) -> None:
    n = 2 * _GROUP_MAX + 1
    async with _storage(tmp_path) as storage:
        with _traced(storage) as statements:
            await _gather(
                [partial(storage.create_if_absent, make_payout(f"p-{i:03}")) for i in range(n)]
            )
        assert _commits(statements) == 3
        assert len(_committed_ids(tmp_path)) == n


async def test_each_caller_of_a_group_gets_its_own_result(tmp_path: Path) -> None:
    async with _storage(tmp_path) as storage:
        a, _ = await storage.create_if_absent(make_payout("a"))
        b, _ = await storage.create_if_absent(make_payout("b", partner_ref="ref-b"))
        with _traced(storage) as statements:
            won, lost, again, taken, fresh = await _gather(
                [
                    lambda: storage.compare_and_set(
                        replace(a, status=PayoutStatus.AWAITING), expected_version=1
                    ),
                    lambda: storage.compare_and_set(  # the same version: a conflict
                        replace(a, status=PayoutStatus.UNKNOWN), expected_version=1
                    ),
                    lambda: storage.create_if_absent(make_payout("b")),  # exists
                    lambda: storage.create_if_absent(make_payout("c", partner_ref="ref-b")),
                    lambda: storage.create_if_absent(make_payout("d")),
                ]
            )
        assert _commits(statements) == 1
        assert isinstance(won, Payout)
        assert (won.version, won.status) == (2, PayoutStatus.AWAITING)
        assert lost is None
        assert again == (b, False)
        assert isinstance(taken, PartnerReferenceTaken)
        assert taken.holder_id == "b"
        assert fresh[1] is True
        assert await storage.get("a") == won
        assert _committed_ids(tmp_path) == ["a", "b", "d"]


async def test_a_failing_write_leaves_the_others_of_its_group_committed(tmp_path: Path) -> None:
    async with _storage(tmp_path) as storage:
        v1, _ = await storage.create_if_absent(make_payout("p-1"))
        with contextlib.closing(sqlite3.connect(tmp_path / "gc.db")) as raw:
            raw.execute(
                "CREATE TRIGGER fail_outbox BEFORE INSERT ON outbox "
                "BEGIN SELECT RAISE(ABORT, 'injected outbox failure'); END"
            )
            raw.commit()
        final = replace(v1, status=PayoutStatus.COMPLETED, next_check_at=None)
        with _traced(storage) as statements:
            before, failed, after = await _gather(
                [
                    lambda: storage.create_if_absent(make_payout("p-0")),
                    lambda: storage.compare_and_set(
                        final, expected_version=1, outbox=make_outbox("p-1")
                    ),
                    lambda: storage.create_if_absent(make_payout("p-2")),
                ]
            )
        assert _commits(statements) == 1
        assert statements.count("ROLLBACK TO w") == 1
        assert before[1] is True
        assert after[1] is True
        assert isinstance(failed, StorageError)
        assert "injected outbox failure" in str(failed)
        # The failed write's update was undone with its outbox insert; the others stand.
        assert await storage.get("p-1") == v1
        assert await storage.get_outbox("p-1") is None
        assert _committed_ids(tmp_path) == ["p-0", "p-1", "p-2"]


@contextlib.contextmanager
def _failing_commit(storage: SQLiteStorage, path: Path, payout_id: str) -> Iterator[None]:
    """Any transaction that creates ``payout_id`` fails at COMMIT (a deferred foreign key)."""
    with contextlib.closing(sqlite3.connect(path / "gc.db")) as raw:
        raw.executescript(
            f"""
            CREATE TABLE parent (id TEXT PRIMARY KEY);
            CREATE TABLE child (
                id TEXT REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED
            );
            CREATE TRIGGER poison AFTER INSERT ON payouts WHEN NEW.id = '{payout_id}'
            BEGIN INSERT INTO child VALUES ('missing'); END;
            """
        )
    storage._conn().execute("PRAGMA foreign_keys = ON")
    try:
        yield
    finally:
        storage._conn().execute("PRAGMA foreign_keys = OFF")


async def test_a_failed_commit_fails_every_caller_and_writes_nothing(tmp_path: Path) -> None:
    async with _storage(tmp_path) as storage:
        v1, _ = await storage.create_if_absent(make_payout("p-1"))
        with _failing_commit(storage, tmp_path, "poison"), _traced(storage) as statements:
            results = await _gather(
                [
                    lambda: storage.create_if_absent(make_payout("p-0")),
                    lambda: storage.create_if_absent(make_payout("poison")),
                    lambda: storage.compare_and_set(
                        replace(v1, status=PayoutStatus.AWAITING), expected_version=1
                    ),
                ]
            )
        assert statements.count("COMMIT") == 1
        assert statements[-1] == "ROLLBACK"
        for result in results:
            assert isinstance(result, StorageError)
            assert "FOREIGN KEY" in str(result)
        assert _committed_ids(tmp_path) == ["p-1"]
        assert await storage.get("p-1") == v1
        assert not storage._conn().in_transaction
        # The connection goes on: the next write commits.
        assert (await storage.create_if_absent(make_payout("p-0")))[1] is True


async def test_a_read_never_returns_a_write_before_its_commit(tmp_path: Path) -> None:
    async with _storage(tmp_path) as storage:
        with _failing_commit(storage, tmp_path, "poison"), _traced(storage) as statements:
            writes = [lambda: storage.create_if_absent(make_payout("poison"))]
            reads = [lambda: storage.get("poison") for _ in range(3)]
            # Reads started before, with and after the write in the same tick.
            results = await _gather([reads[0], writes[0], reads[1], reads[2]])
        assert isinstance(results[1], StorageError)
        assert results[0] is None
        assert results[2:] == [None, None]
        # Every read ran outside the group's transaction.
        begin, end = statements.index("BEGIN IMMEDIATE"), statements.index("ROLLBACK")
        inside = statements[begin:end]
        assert not any(s.startswith("SELECT version, doc") for s in inside)
        assert await storage.get("poison") is None


async def test_a_read_meanwhile_sees_only_committed_data(tmp_path: Path) -> None:
    """While a group waits for another connection's lock, reads see the state before it."""
    async with _storage(tmp_path, busy_timeout=10.0) as storage:
        v1, _ = await storage.create_if_absent(make_payout("p-1"))
        raw = sqlite3.connect(tmp_path / "gc.db", isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            async with anyio.create_task_group() as tg:
                done: list[Any] = []

                async def write() -> None:
                    awaiting = replace(v1, status=PayoutStatus.AWAITING)
                    done.append(await storage.compare_and_set(awaiting, expected_version=1))

                tg.start_soon(write)
                await anyio.wait_all_tasks_blocked()  # the group backs off
                assert await storage.get("p-1") == v1
                assert done == []
                raw.execute("ROLLBACK")
            assert done[0] is not None
            assert await storage.get("p-1") == done[0]
        finally:
            raw.close()


async def test_the_group_fsyncs_when_any_of_its_writes_needs_it(tmp_path: Path) -> None:
    async with _storage(tmp_path) as storage:
        with _traced(storage) as statements:
            await _gather(
                [
                    lambda: storage.create_if_absent(make_payout("received")),
                    lambda: storage.create_if_absent(
                        make_payout("submitting", status=PayoutStatus.SUBMITTING)
                    ),
                    lambda: storage.beat("instance-1", T0),
                ]
            )
        assert _commits(statements) == 1
        # FULL around the whole group, set before BEGIN (SQLite refuses it inside one).
        assert statements[0] == "PRAGMA synchronous = FULL"
        assert statements[1] == "BEGIN IMMEDIATE"
        assert statements[-2:] == ["COMMIT", "PRAGMA synchronous = NORMAL"]
        assert storage._conn().execute("PRAGMA synchronous").fetchone() == (1,)

        with _traced(storage) as statements:
            await _gather(
                [partial(storage.create_if_absent, make_payout(f"p-{i}")) for i in range(3)]
            )
        assert _commits(statements) == 1
        assert not any("synchronous" in s for s in statements)


async def test_a_cancelled_write_is_not_written_and_the_others_are(tmp_path: Path) -> None:
    async with _storage(tmp_path, busy_timeout=10.0) as storage:
        raw = sqlite3.connect(tmp_path / "gc.db", isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            results: dict[str, Any] = {}

            async def create(payout_id: str) -> None:
                results[payout_id] = await storage.create_if_absent(make_payout(payout_id))

            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as cancelled:
                    async with anyio.create_task_group() as inner:
                        inner.start_soon(create, "leader")  # the first: it leads the group
                        tg.start_soon(create, "follower")
                        await anyio.wait_all_tasks_blocked()
                        cancelled.cancel()
                await anyio.wait_all_tasks_blocked()
                raw.execute("ROLLBACK")
        finally:
            raw.close()
        assert "leader" not in results
        assert results["follower"][1] is True
        assert _committed_ids(tmp_path) == ["follower"]


async def test_a_group_that_never_gets_the_lock_fails_each_caller(tmp_path: Path) -> None:
    async with _storage(tmp_path, busy_timeout=0.01) as storage:
        raw = sqlite3.connect(tmp_path / "gc.db", isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            results = await _gather(
                [partial(storage.create_if_absent, make_payout(f"p-{i}")) for i in range(3)]
            )
            raw.execute("ROLLBACK")
        finally:
            raw.close()
        assert all(isinstance(r, StorageUnavailable) and "locked" in str(r) for r in results)
        assert len({id(r) for r in results}) == 3  # one exception object per caller
        assert _committed_ids(tmp_path) == []
        assert (await storage.create_if_absent(make_payout("p-0")))[1] is True


def test_group_commit_url_option() -> None:
    assert SQLiteStorage.from_url("sqlite:///x.db").group_commit is True
    assert SQLiteStorage.from_url("sqlite:///x.db?group_commit=off").group_commit is False
    assert SQLiteStorage.from_url("sqlite:///x.db?group_commit=ON").group_commit is True
    with pytest.raises(ConfigurationError, match="group_commit"):
        SQLiteStorage.from_url("sqlite:///x.db?group_commit=maybe")
