"""Storage failing in the middle of an atomic, money-deciding write, with the client running.

tests/integration/test_faults.py takes storage away between writes (a lock held, a proxy
stopped); here the fault lands inside one write:

- PostgreSQL: a trigger makes the write wait, inside its transaction and after its rows are
  written, on an advisory lock the test holds; a second connection then ends that backend with
  ``pg_terminate_backend``. Also the reply lost after the commit ("did it run?").
- Redis: a script runs whole or not at all, so the connection is killed (``CLIENT KILL`` from a
  second connection) just before the script is sent, or just after its reply was read (then
  the reply is lost: redis-py sends it again, which must be harmless).
- SQLite: the disk fills up (``PRAGMA max_page_count``) under the running client.

The client runs on real time against a :class:`~resilient_payout.testing.FakePartner` with
100x shorter durations (``SCALE``). Each test ends with :func:`settle_and_check`: every payout
final and equal to the partner's truth, no double payment, one pushed status per payout (its
final one), and the backend's own rows whole (:func:`pg_whole`, :func:`redis_whole`,
:func:`sqlite_whole`): no final payout without its outbox entry, no entry without its final
payout, no status column or hash field that disagrees with the document, no partner-reference
entry without its payout, counts that match.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex
from asyncpg.pool import PoolConnectionProxy

from resilient_payout import (
    CallbackNotifier,
    PartnerStatus,
    PayoutClient,
    PayoutStatus,
    Policy,
    StorageError,
    StorageUnavailable,
)
from resilient_payout._model import OutboxEntry, Payout
from resilient_payout.storage import Storage
from resilient_payout.storage.postgres import PostgresStorage
from resilient_payout.storage.redis import RedisStorage
from resilient_payout.storage.sqlite import SQLiteStorage
from resilient_payout.testing import FakePartner, Fate, Script
from tests._harness import WEBHOOK_URL, settled
from tests.contract.conftest import (
    delete_prefix,
    drop_schema,
    fresh_prefix,
    fresh_schema,
    server_url,
)

pytestmark = pytest.mark.anyio
S = PayoutStatus
SCALE = 0.01
POLICY = Policy().scaled(SCALE)
FINAL = frozenset(s.value for s in PayoutStatus if s.is_final)


# -- the partner, the client, the final check -------------------------------------------------


def script(kind: str) -> Callable[[str, int], Script]:
    """``answer``: 200 with the final status after 50 ms, webhook 50 ms later; ``pending``: 200
    pending, final 150 ms later, no webhook (a status check settles it). Odd ids are declined."""

    def fate(payout_id: str, _n: int) -> Script:
        status = PartnerStatus.DECLINED if int(payout_id[-1]) % 2 else PartnerStatus.COMPLETED
        if kind == "pending":
            return Script(Fate.PENDING, status, answer_delay=0.05, final_delay=0.15, webhook=False)
        return Script(Fate.ANSWER, status, answer_delay=0.05, webhook_delay=0.1)

    return fate


def partner(kind: str) -> FakePartner:
    """The fake partner on the client's time scale, naming its references (``ref-<id>``)."""
    return FakePartner(
        script=script(kind),
        timeout_after=30 * SCALE,
        read_timeout=40 * SCALE,
        max_landing=120 * SCALE,
        check_window=SCALE,
        block_penalty=60 * SCALE,
        partner_refs=True,
    )


@dataclass
class Run:
    client: PayoutClient
    partner: FakePartner
    storage: Storage
    whole: Callable[[], Awaitable[list[str]]]
    """The backend's own check of its rows: what is not whole (nothing: [])."""
    pushes: list[tuple[str, str]] = field(default_factory=list)

    async def submit(self, ids: list[str]) -> None:
        for payout_id in ids:
            result = await self.client.submit({"id": payout_id, "amount": 5})
            assert not result.replayed

    async def assert_whole(self) -> None:
        assert await self.whole() == []


@asynccontextmanager
async def run(
    storage: Storage, whole: Callable[[], Awaitable[list[str]]], kind: str = "answer"
) -> AsyncIterator[Run]:
    fake = partner(kind)
    pushes: list[tuple[str, str]] = []

    async def push(payout_id: str, status: PayoutStatus) -> None:
        pushes.append((payout_id, status.value))

    client = PayoutClient(
        storage=storage,
        partner=fake,
        webhook_url=WEBHOOK_URL,
        notifier=CallbackNotifier(push),
        policy=POLICY,
    )
    fake.webhook_sink = client.handle_webhook
    async with fake, client:
        yield Run(client, fake, storage, whole, pushes)


async def settle_and_check(r: Run, ids: list[str], within: float = 20.0) -> dict[str, S]:
    """Every payout final and equal to the partner's truth, each pushed once with that status
    (repeats allowed), nothing paid twice, every record whole. Returns id -> final status."""
    with anyio.fail_after(within):
        finals = {i: (await settled(r.client, i, within=within)).status for i in ids}
        while anyio.current_time() <= max(r.partner.settled_at(i) for i in ids):  # noqa: ASYNC110
            await anyio.sleep(0.02)
        while {i for i, _ in r.pushes} != set(ids):  # noqa: ASYNC110 - polled
            await anyio.sleep(0.01)
        await anyio.sleep(5 * POLICY.poll_interval)  # a late, disagreeing push would come now
    truth = {i: r.partner.truth(i) for i in ids}
    assert finals == {i: S.FAILED if t is None else S(t.value) for i, t in truth.items()}
    assert r.partner.double_payments == []
    assert {i: {s for p, s in r.pushes if p == i} for i in ids} == {
        i: {finals[i].value} for i in ids
    }
    assert r.client.stats.conflicts == 0
    for i in ids:
        entry = await r.storage.get_outbox(i)
        assert entry is not None
        assert (entry.status, entry.delivered_at is not None) == (finals[i], True)
        stored = await r.storage.get(i)
        assert stored is not None
        if stored.partner_ref is not None:
            assert stored.partner_ref == f"ref-{i}"
            holder = await r.storage.get_by_partner_ref(stored.partner_ref)
            assert holder is not None
            assert holder.id == i
    counts = await r.storage.count_by_status()
    assert {s: n for s, n in counts.items() if n} == Counter(finals.values())
    await r.assert_whole()
    return finals


def new_ids(n: int) -> list[str]:
    run_id = random.randbytes(3).hex()
    return [f"sf-{run_id}-{i}" for i in range(n)]


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    with anyio.fail_after(within):
        while not await condition():  # noqa: ASYNC110 - polled
            await anyio.sleep(0.005)


async def statuses(r: Run, ids: list[str]) -> set[S]:
    found = set()
    for i in ids:
        p = await r.storage.get(i)
        assert p is not None
        found.add(p.status)
    return found


async def no_outbox(r: Run, ids: list[str]) -> bool:
    return [await r.storage.get_outbox(i) for i in ids] == [None] * len(ids)


# -- PostgreSQL --------------------------------------------------------------------------------

# Where a write waits for the test's advisory lock, inside its transaction: after a create's
# INSERT, after a compare-and-set's outbox INSERT (its UPDATE is done by then: one statement),
# after a claim's UPDATE (a claim sets a lease; a compare-and-set clears it).
_SEAMS = {
    "create": "AFTER INSERT ON {s}.payouts FOR EACH ROW",
    "cas_outbox": "AFTER INSERT ON {s}.outbox FOR EACH ROW",
    "claim": "AFTER UPDATE ON {s}.payouts FOR EACH ROW WHEN (NEW.lease_owner IS NOT NULL)",
}

_BLOCKED = """
SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database
WHERE l.locktype = 'advisory' AND NOT l.granted AND l.classid = 0 AND l.objsubid = 1
  AND l.objid::bigint = $1 AND d.datname = current_database()
"""


@dataclass
class Killer:
    count: int = 0
    released: anyio.Event = field(default_factory=anyio.Event)

    async def reached(self, n: int, within: float = 5.0) -> None:
        with anyio.fail_after(within):
            while self.count < n:  # noqa: ASYNC110 - polled
                await anyio.sleep(0.005)


class PgFaults:
    """Triggers on the test's schema that make each seam's writes wait, inside their
    transaction, on an advisory lock of that seam (free unless :meth:`killing` holds it)."""

    def __init__(self, url: str, schema: str, admin: asyncpg.Connection[Any]) -> None:
        self.url = url
        self.schema = schema
        self.admin = admin
        self.keys = {seam: random.randrange(1, 2**31) for seam in _SEAMS}

    async def install(self) -> None:
        s = f'"{self.schema}"'
        await self.admin.execute(
            f"""CREATE FUNCTION {s}.rp_fault() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock_shared(TG_ARGV[0]::bigint); RETURN NULL; END $$"""
        )
        for seam, when in _SEAMS.items():
            await self.admin.execute(
                f"CREATE TRIGGER rp_fault_{seam} {when.format(s=s)} "
                f"EXECUTE FUNCTION {s}.rp_fault('{self.keys[seam]}')"
            )

    @asynccontextmanager
    async def killing(self, seam: str, *, kills: int | None = None) -> AsyncIterator[Killer]:
        """While inside, every write through ``seam`` waits inside its transaction and is
        terminated there (its rows rolled back). ``kills``: let writes through after that many."""
        conn = await asyncpg.connect(self.url)  # the lock's holder and the killer
        killer = Killer()
        key = self.keys[seam]
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", key)
            async with anyio.create_task_group() as tg:

                async def kill() -> None:
                    while kills is None or killer.count < kills:
                        for (pid,) in await conn.fetch(_BLOCKED, key):
                            await conn.execute("SELECT pg_terminate_backend($1)", pid)
                            killer.count += 1
                        await anyio.sleep(0.005)
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)
                    killer.released.set()

                tg.start_soon(kill)
                yield killer
                if kills is not None:
                    with anyio.fail_after(5):
                        await killer.released.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()  # also releases the lock

    async def whole(self) -> list[str]:
        return pg_whole(await self.admin.fetch(_PG_ROWS.format(s=f'"{self.schema}"')))


_PG_ROWS = """
SELECT p.id, p.status, p.doc->>'status' AS doc_status, p.partner_ref,
       p.doc->>'partner_ref' AS doc_ref, o.payout_id AS entry, o.status AS entry_status
FROM {s}.payouts p FULL JOIN {s}.outbox o ON o.payout_id = p.id
"""


def pg_whole(rows: list[Any]) -> list[str]:
    """What is not whole in the payouts and outbox rows of ``_PG_ROWS`` / ``_SQLITE_ROWS``."""
    problems = []
    for r in rows:
        pid, status, doc_status, ref, doc_ref, entry, entry_status = tuple(r)
        if pid is None:
            problems.append(f"outbox entry {entry} without its payout")
            continue
        if status != doc_status:
            problems.append(f"{pid}: status column {status}, document {doc_status}")
        if ref != doc_ref:
            problems.append(f"{pid}: partner_ref column {ref}, document {doc_ref}")
        if (status in FINAL) != (entry is not None):
            problems.append(f"{pid}: {status} with outbox entry {entry_status}")
        elif entry is not None and entry_status != status:
            problems.append(f"{pid}: {status} but its outbox entry says {entry_status}")
    return problems


@asynccontextmanager
async def postgres() -> AsyncIterator[tuple[PostgresStorage, PgFaults]]:
    url = await server_url("postgres")
    schema = fresh_schema()
    storage = PostgresStorage(url, schema=schema, pool_max=10)
    admin = await asyncpg.connect(url)
    try:
        await storage.open()
        faults = PgFaults(url, schema, admin)
        await faults.install()
        yield storage, faults
    finally:
        await storage.close()
        await admin.close()
        await drop_schema(url, schema)


@pytest.mark.postgres
async def test_postgres_create_killed_inside_its_transaction_is_refused_and_retried() -> None:
    async with postgres() as (storage, faults), run(storage, faults.whole) as r:
        ids = new_ids(6)
        refused: list[str] = []
        async with faults.killing("create", kills=4) as killer:
            for i in ids:
                try:
                    await r.submit([i])
                except StorageUnavailable:
                    refused.append(i)
        # Each create is tried twice (once more on a fresh connection), both killed.
        assert killer.count == 4
        assert refused == ids[:2]
        assert [await storage.get(i) for i in refused] == [None, None]
        await r.assert_whole()
        await r.submit(refused)  # the app retries
        await settle_and_check(r, ids)
    assert r.partner.posts.keys() == set(ids)
    assert all(len(posts) == 1 for posts in r.partner.posts.values())


@pytest.mark.postgres
async def test_postgres_final_write_killed_after_its_rows_before_its_commit() -> None:
    async with postgres() as (storage, faults), run(storage, faults.whole) as r:
        ids = new_ids(6)
        async with faults.killing("cas_outbox") as killer:
            await r.submit(ids)
            # The answers' and the webhooks' final writes, each killed twice (later ones too:
            # checks of payouts orphaned meanwhile).
            await killer.reached(4 * len(ids))
            assert not any(s.is_final for s in await statuses(r, ids))
            assert await no_outbox(r, ids)
            await r.assert_whole()
            failed = r.partner.webhooks_failed
            assert failed
            assert all("StorageUnavailable" in why for _, why in failed)
            assert r.client.stats.work_errors > 0
        # Orphaned after submit_deadline, checked, found: final, with the entry, now.
        finals = await settle_and_check(r, ids)
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    assert all(len(posts) == 1 for posts in r.partner.posts.values())


@pytest.mark.postgres
async def test_postgres_claim_killed_inside_its_transaction_leaves_no_lease_or_version() -> None:
    async with postgres() as (storage, faults), run(storage, faults.whole, "pending") as r:
        ids = new_ids(6)
        async with faults.killing("claim") as killer:
            await r.submit(ids)
            # Answered pending: awaiting a webhook that never comes, then due for a check.
            await killer.reached(1)
            versions = {i: (await storage.get(i)) for i in ids}
            await killer.reached(6)  # three claims, each tried twice
            assert {i: await storage.get(i) for i in ids} == versions  # no claim left a trace
            assert {p.status for p in versions.values() if p is not None} == {S.AWAITING}
            leased = await faults.admin.fetchval(
                f'SELECT count(*) FROM "{faults.schema}".payouts WHERE lease_owner IS NOT NULL'
            )
            assert leased == 0
            await r.assert_whole()
        await settle_and_check(r, ids)


@dataclass
class LostReplies:
    """Loses the reply of committed statements ``lose(query, args)`` picks: once it ran, its
    backend is terminated and the caller sees the connection die, as when the server or the
    network goes away between the commit and its answer."""

    admin: asyncpg.Connection[Any]
    lose: Callable[[str, tuple[Any, ...]], bool]
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = PoolConnectionProxy.fetch

        async def fetch(conn: Any, query: str, *args: Any, **kw: Any) -> Any:
            rows = await real(conn, query, *args, **kw)
            if not self.lose(query, args):
                return rows
            async with self.lock:  # one admin connection
                await self.admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            with anyio.fail_after(5):
                while conn._con is not None and not conn._con.is_closed():  # noqa: ASYNC110
                    await anyio.sleep(0.001)
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )

        monkeypatch.setattr(PoolConnectionProxy, "fetch", fetch)


@pytest.mark.postgres
async def test_postgres_reply_lost_after_commit_is_taken_for_a_lost_race_and_reread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with postgres() as (storage, faults):
        schema = f'"{faults.schema}"'
        final_once: set[str] = set()
        claims_lost: list[int] = []

        def lose(query: str, args: tuple[Any, ...]) -> bool:
            if f"INSERT INTO {schema}.outbox" in query and args[0] not in final_once:
                final_once.add(args[0])  # each payout's first final write
                return True
            claim = f"UPDATE {schema}.payouts" in query and "SKIP LOCKED" in query
            if claim and len(claims_lost) < 2:
                claims_lost.append(1)
                return True
            return False

        LostReplies(faults.admin, lose).install(monkeypatch)
        async with run(storage, faults.whole, "pending") as r:
            ids = new_ids(6)
            await r.submit(ids)
            finals = await settle_and_check(r, ids)
            # Each final write committed, its reply was lost, the retry found the version moved
            # on: a lost race, re-read, and found final already (with its entry).
            await eventually(lambda: _races_lost(r, len(ids)))
    assert final_once == set(ids)
    assert len(claims_lost) == 2
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    assert all(len(posts) == 1 for posts in r.partner.posts.values())


# -- Redis ---------------------------------------------------------------------------------------


@dataclass
class RedisFaults:
    """Kills the storage's own connection (``CLIENT KILL ADDR`` from a second one) around the
    scripts ``before(name, argv)`` / ``after(name, argv, result)`` pick: before, the script never
    runs; after, it ran and its reply is lost. redis-py then sends it again (``retries``)."""

    storage: RedisStorage
    admin: aioredis.Redis
    before: Callable[[str, list[Any]], bool] = lambda _name, _argv: False
    after: Callable[[str, list[Any], Any], bool] = lambda _name, _argv, _result: False
    kills: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real: Any = aioredis.Redis._send_command_parse_response
        names = {script.sha: name for name, script in self.storage._scripts.items()}

        async def send(redis: Any, conn: Any, command: str, *args: Any, **options: Any) -> Any:
            if redis is not self.storage._redis or command != "EVALSHA" or args[1] not in names:
                return await real(redis, conn, command, *args, **options)
            name, argv = names[args[1]], list(args[3 + int(args[2]) :])
            if self.before(name, argv):
                await self._kill(conn)
            result = await real(redis, conn, command, *args, **options)
            if self.after(name, argv, result):
                await self._kill(conn)
                raise rex.ConnectionError("Connection closed by server.")
            return result

        monkeypatch.setattr(aioredis.Redis, "_send_command_parse_response", send)

    async def _kill(self, conn: Any) -> None:
        if not conn.is_connected:
            await conn.connect()
        host, port = conn._writer.get_extra_info("sockname")[:2]
        assert await self.admin.client_kill_filter(addr=f"{host}:{port}") == 1
        self.kills += 1

    async def whole(self) -> list[str]:
        return await redis_whole(self.admin, self.storage.prefix)


# One script, so one consistent snapshot while the client writes. Payout ids come from the
# storage's own creation index (an unindexed payout would show in the counts); the last column
# is the reference entry of the name FakePartner would give it.
_REDIS_SNAPSHOT = """
local pre = ARGV[1]
local rows = {}
for _, id in ipairs(redis.call('ZRANGE', pre .. 'idx:created', 0, -1)) do
  local h = redis.call('HMGET', pre .. 'p:' .. id, 'v', 'status', 'doc', 'ref')
  local ref = h[4] or ''
  rows[#rows + 1] = {id, h[1] or '', h[2] or '', h[3] or '', ref,
                     redis.call('HGET', pre .. 'o:' .. id, 'status') or '',
                     ref ~= '' and (redis.call('GET', pre .. 'ref:' .. ref) or '') or '',
                     redis.call('GET', pre .. 'ref:ref-' .. id) or ''}
end
return {rows, redis.call('HGETALL', pre .. 'counts')}
"""


async def redis_whole(admin: aioredis.Redis, prefix: str) -> list[str]:
    """What is not whole under ``prefix``: a payout hash without its version or document, a
    status field that disagrees with the document, a final payout without its outbox entry (or
    the reverse), a reference entry and its payout that do not name each other, counts that do
    not match."""
    rows, flat = await admin.eval(_REDIS_SNAPSHOT, 0, prefix)
    problems = []
    counts: Counter[str] = Counter()
    for pid, version, status, doc, ref, entry, holder, named in rows:
        if named and (named != pid or ref != f"ref-{pid}"):
            problems.append(f"reference ref-{pid} -> {named!r}, held by {pid}: {ref!r}")
        if not version or not doc:
            problems.append(f"{pid}: half a record (version {version!r}, document {doc!r})")
            continue
        counts[status] += 1
        stored = json.loads(doc)
        if stored["status"] != status:
            problems.append(f"{pid}: status field {status}, document {stored['status']}")
        if (stored.get("partner_ref") or "") != ref:
            problems.append(f"{pid}: ref field {ref!r}, document {stored.get('partner_ref')!r}")
        if ref and holder != pid:
            problems.append(f"{pid}: its reference {ref} leads to {holder!r}")
        if (status in FINAL) != bool(entry) or entry not in ("", status):
            problems.append(f"{pid}: {status} with outbox entry {entry!r}")
    stored_counts = {k: int(n) for k, n in zip(flat[::2], flat[1::2], strict=True) if int(n)}
    if stored_counts != dict(counts):
        problems.append(f"counts {stored_counts}, records {dict(counts)}")
    return problems


@asynccontextmanager
async def redis(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[RedisStorage, RedisFaults]]:
    url = await server_url("redis")
    prefix = fresh_prefix()
    storage = RedisStorage(url, prefix=prefix, retries=1)  # two tries per command
    admin = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await storage.open()
        faults = RedisFaults(storage, admin)
        faults.install(monkeypatch)
        yield storage, faults
    finally:
        await storage.close()
        await admin.aclose()
        await delete_prefix(url, prefix)


def _with_outbox(name: str, argv: list[Any]) -> bool:
    return name == "cas" and argv[6] == "1"  # ARGV[7]: an outbox entry comes with it


@pytest.mark.redis
async def test_redis_final_write_cut_off_before_its_script_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with redis(monkeypatch) as (storage, faults), run(storage, faults.whole) as r:
        ids = new_ids(6)
        armed = True
        faults.before = lambda name, argv: armed and _with_outbox(name, argv)
        await r.submit(ids)
        # The answers' and webhooks' final writes, each cut off twice: all refused.
        await eventually(lambda: _at_least(faults, 4 * len(ids)))
        assert not any(s.is_final for s in await statuses(r, ids))
        assert await no_outbox(r, ids)
        await r.assert_whole()
        failed = r.partner.webhooks_failed
        assert failed
        assert all("StorageUnavailable" in why for _, why in failed)
        armed = False
        finals = await settle_and_check(r, ids)
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    assert all(len(posts) == 1 for posts in r.partner.posts.values())


async def _races_lost(r: Run, n: int) -> bool:
    return r.client.stats.races_lost >= n


async def _at_least(faults: RedisFaults, kills: int) -> bool:
    return faults.kills >= kills


@pytest.mark.redis
async def test_redis_reply_lost_after_a_script_ran_is_harmless_when_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with redis(monkeypatch) as (storage, faults), run(storage, faults.whole, "pending") as r:
        final_once: set[str] = set()
        claims_lost: list[int] = []

        def after(name: str, argv: list[Any], result: Any) -> bool:
            if _with_outbox(name, argv) and argv[0] not in final_once:
                final_once.add(argv[0])  # each payout's first final write
                return True
            if name == "claim_due" and result and len(claims_lost) < 2:
                claims_lost.append(len(result))  # a claim that took payouts
                return True
            return False

        faults.after = after
        ids = new_ids(6)
        await r.submit(ids)
        finals = await settle_and_check(r, ids)
        # Each final write ran, its reply was lost, and the script sent again (after redis-py's
        # backoff: maybe after the outcome was pushed) found the version moved on: a lost race,
        # re-read, and found final already (with its entry).
        await eventually(lambda: _races_lost(r, len(ids)))
    assert final_once == set(ids)
    assert len(claims_lost) == 2
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    assert all(len(posts) == 1 for posts in r.partner.posts.values())


# -- SQLite ---------------------------------------------------------------------------------------

_SQLITE_ROWS = """
SELECT p.id, p.status, json_extract(p.doc, '$.status'), p.partner_ref,
       json_extract(p.doc, '$.partner_ref'), o.payout_id, o.status
FROM payouts p FULL JOIN outbox o ON o.payout_id = p.id
"""


def sqlite_whole(path: Path) -> Callable[[], Awaitable[list[str]]]:
    async def whole() -> list[str]:
        # A connection of its own: one SELECT, one snapshot (WAL readers never wait).
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return pg_whole(db.execute(_SQLITE_ROWS).fetchall())

    return whole


class CountingSQLite(SQLiteStorage):
    """Counts the compare-and-sets with an outbox entry that storage refused."""

    refused_final_writes = 0

    async def compare_and_set(
        self, payout: Payout, *, expected_version: int, outbox: OutboxEntry | None = None
    ) -> Payout | None:
        try:
            return await super().compare_and_set(
                payout, expected_version=expected_version, outbox=outbox
            )
        except StorageError:
            if outbox is not None:
                self.refused_final_writes += 1
            raise

    def set_max_pages(self, pages: int | None) -> None:
        """``None``: no more than the database has now (the disk is full)."""
        db = self._conn()
        if pages is None:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")


async def test_sqlite_disk_full_mid_run_refuses_writes_whole_then_everything_completes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "full.db"
    # Small pages, so that most writes need a page more: the payout's document grows with each
    # audit entry, and an outbox page holds a few entries only.
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA page_size = 512")
        db.execute("VACUUM")
    storage = CountingSQLite(path)
    memo = "x" * 100
    async with run(storage, sqlite_whole(path)) as r:
        ids = new_ids(8)
        for i in ids:
            await r.client.submit({"id": i, "amount": 5, "memo": memo})
        storage.set_max_pages(None)  # the disk fills up as the answers come in
        later = new_ids(4)
        refused = []
        for i in later:
            with pytest.raises(StorageUnavailable, match="full"):
                await r.client.submit({"id": i, "amount": 5, "memo": memo})
            refused.append(i)
        # Answers and webhooks: final writes that need a page are refused, the client goes on.
        await eventually(lambda: _webhooks_done(r, len(ids)))
        assert storage.refused_final_writes >= len(ids)
        assert r.partner.webhooks_failed
        assert not any(s.is_final for s in await statuses(r, ids))
        assert await no_outbox(r, ids)
        assert [await storage.get(i) for i in later] == [None] * len(later)
        await r.assert_whole()
        storage.set_max_pages(1_000_000)  # space is back
        for i in refused:
            await r.client.submit({"id": i, "amount": 5, "memo": memo})
        finals = await settle_and_check(r, ids + later)
    assert set(finals.values()) == {S.COMPLETED, S.DECLINED}
    assert all(len(posts) == 1 for posts in r.partner.posts.values())


async def _webhooks_done(r: Run, n: int) -> bool:
    """All ``n`` webhooks were sent (and taken, or refused)."""
    return r.partner.webhooks_sent >= n


# -- a lost reply to a create --------------------------------------------------------------------


@pytest.mark.parametrize("server", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("redis", marks=pytest.mark.redis)])  # fmt: skip
async def test_a_create_whose_reply_was_lost_is_still_new(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = postgres() if server == "postgres" else redis(monkeypatch)
    async with backend as (storage, faults), run(storage, faults.whole) as r:
        ids = new_ids(1)
        lost: list[str] = []

        def once(hit: bool) -> bool:
            if hit and not lost:
                lost.append(ids[0])
                return True
            return False

        if isinstance(faults, PgFaults):
            create = f'INSERT INTO "{faults.schema}".payouts'
            LostReplies(faults.admin, lambda q, _a: once(create in q)).install(monkeypatch)
        else:
            faults.after = lambda name, _argv, _result: once(name == "create")
        result = await r.client.submit({"id": ids[0], "amount": 5})
        assert not result.replayed
        assert lost == ids
        await settle_and_check(r, ids)
        assert r.partner.reached(ids[0]) == 1
        final = await storage.get(ids[0])
        assert final is not None
        assert final.attempt == 1
