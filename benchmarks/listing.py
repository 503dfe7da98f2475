"""Operator queries at scale: ``list_payouts``, ``count_by_status`` and ``ops_snapshot`` over N
stored payouts, per backend (memory, SQLite, PostgreSQL, Redis).

Run: ``.venv/bin/python -m benchmarks.listing [--quick] [--n N] [--out bench-results]``
(``make bench`` runs it with the other scenarios). N is 1,000,000 by default, 20,000 with
``--quick``. The payouts are a plausible mix: 90 % completed, 5 % declined, 3 % failed, 1 %
unknown, 0.5 % awaiting, 0.5 % received; 0.1 % with a conflict in their audit trail, 0.2 % with
a push not acknowledged yet, created one per 0.01 s of one day. Only undelivered outbox entries
are stored (the queries never read delivered ones).

Seeding goes through each backend's own write path in bulk (the memory backend's
``create_if_absent``; one ``executemany`` on SQLite; ``COPY`` on PostgreSQL; the create script,
pipelined, on Redis): it is not what is measured. Each query then runs ``--repeat`` times
(default 20) and the median and the slowest are reported in milliseconds:

* ``first_page``: the 50 oldest payouts; ``deep_page``: 50 after a cursor 90 % of the way in;
* ``status_unknown``: the 50 oldest in ``unknown`` (1 %), ``status_unknown_deep`` its page 10;
* ``status_open``: the four non-final statuses at once (merged per status);
* ``status_completed_deep``: 50 of the 90 % completed, 90 % of the way in;
* ``conflicts``, ``undelivered``: the 50 oldest of each;
* ``count_by_status``, ``ops_snapshot``.

PostgreSQL and Redis run on ``RP_TEST_POSTGRES_URL`` / ``RP_TEST_REDIS_URL`` (defaults: local
servers) in a fresh schema / key prefix, dropped afterwards; an unreachable server is skipped
with the reason. Prints a table and writes ``OUT/listing.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from resilient_payout import AuditEntry, Cause, OutboxEntry, Payout, PayoutStatus
from resilient_payout.storage import PayoutPage, PayoutQuery, Storage
from resilient_payout.storage._codec import encode_payout, outbox_values
from resilient_payout.storage._query import encode_cursor
from resilient_payout.storage._sql import index_values
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.storage.sqlite import SQLiteStorage

from ._common import machine, write_json

BACKENDS = ("memory", "sqlite", "postgres", "redis")
T0 = 1_700_000_000.0
SPACING = 0.01
"""Seconds between two payouts' creation."""
_PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
_REDIS_DEFAULT = "redis://127.0.0.1:6379/0"
S = PayoutStatus

# Per 1,000 payouts: how many of each status (the rest completed).
_MIX = (
    (S.DECLINED, 50),
    (S.FAILED, 30),
    (S.UNKNOWN, 10),
    (S.AWAITING, 5),
    (S.RECEIVED, 5),
)


def status_of(i: int) -> PayoutStatus:
    slot = (i * 7919) % 1000  # spread evenly, not in runs
    for status, share in _MIX:
        if slot < share:
            return status
        slot -= share
    return S.COMPLETED


def payout_of(i: int) -> tuple[Payout, OutboxEntry | None]:
    status = status_of(i)
    at = T0 + i * SPACING
    audit = [AuditEntry(at, Cause.APP_REQUEST, "received", S.RECEIVED, S.RECEIVED)]
    if status is not S.RECEIVED:
        audit.append(AuditEntry(at + 0.2, Cause.PARTNER_ANSWER, "answer", S.SUBMITTING, status))
    if i % 1000 == 500:
        detail = "webhook reported declined after final completed"
        audit.append(AuditEntry(at + 30, Cause.WEBHOOK, "conflict", status, status, detail, True))
    final = status.is_final
    payout = Payout(
        id=f"p-{i:08}",
        fingerprint=f"v2:{i:064x}",
        status=status,
        created_at=at,
        updated_at=at + 0.2,
        request={"id": f"p-{i:08}", "amount": 100 + i % 900, "currency": "EUR"},
        version=1,
        attempt=0 if status is S.RECEIVED else 1,
        posts=0 if status is S.RECEIVED else 1,
        attempt_started_at=None if status is S.RECEIVED else at + 0.01,
        next_check_at=None if final else at + 60,
        resolved_by=Cause.PARTNER_ANSWER if final else None,
        partner_ref=None if status is S.RECEIVED else f"ref-{i:08}",
        audit=tuple(audit),
    )
    entry = None
    if final and i % 500 == 250:  # 0.2 % not acknowledged yet
        entry = OutboxEntry(payout.id, status, at + 0.2, at + 0.2, attempts=i % 3)
    return payout, entry


def batches(n: int, size: int = 5000) -> Iterator[list[tuple[Payout, OutboxEntry | None]]]:
    for start in range(0, n, size):
        yield [payout_of(i) for i in range(start, min(n, start + size))]


# -- seeding, per backend ------------------------------------------------------------------------


async def seed_memory(storage: Storage, n: int) -> None:
    for batch in batches(n):
        for payout, entry in batch:
            if entry is None:
                await storage.create_if_absent(payout)
            else:
                stored, _ = await storage.create_if_absent(replace(payout, status=S.RECEIVED))
                assert stored.version == 1
                await storage.compare_and_set(payout, expected_version=1, outbox=entry)


async def seed_sqlite(storage: SQLiteStorage, n: int) -> None:
    db = storage._conn()  # bulk seeding, not the measured path
    db.execute("BEGIN IMMEDIATE")
    for batch in batches(n):
        db.executemany(
            "INSERT INTO payouts (id, version, status, next_check_at, doc, created_at, updated_at,"
            " attempt_started_at, has_conflict, partner_ref) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (p.id, p.status.value, p.next_check_at, encode_payout(p), *index_values(p))
                for p, _ in batch
            ],
        )
        db.executemany(
            "INSERT INTO outbox (payout_id, status, created_at, next_attempt_at, attempts,"
            " delivered_at, last_error, dead_at, payout_created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(e.payout_id, *outbox_values(e), p.created_at) for p, e in batch if e is not None],
        )
    db.execute("COMMIT")
    db.execute("ANALYZE")


async def seed_postgres(url: str, schema: str, n: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for batch in batches(n, 20_000):
            await conn.copy_records_to_table(
                "payouts",
                schema_name=schema,
                columns=[
                    "id", "version", "status", "next_check_at", "doc", "created_at",
                    "updated_at", "attempt_started_at", "has_conflict", "partner_ref",
                ],
                records=[
                    (p.id, 1, p.status.value, p.next_check_at, encode_payout(p), *index_values(p))
                    for p, _ in batch
                ],
            )  # fmt: skip
            entries = [
                (e.payout_id, *outbox_values(e), p.created_at) for p, e in batch if e is not None
            ]
            if entries:
                await conn.copy_records_to_table(
                    "outbox",
                    schema_name=schema,
                    columns=[
                        "payout_id", "status", "created_at", "next_attempt_at", "attempts",
                        "delivered_at", "last_error", "dead_at", "payout_created_at",
                    ],
                    records=entries,
                )  # fmt: skip
        # As autovacuum would leave a table that has settled: statistics and a visibility map.
        await conn.execute(f'VACUUM (ANALYZE) "{schema}".payouts')
        await conn.execute(f'VACUUM (ANALYZE) "{schema}".outbox')
    finally:
        await conn.close()


async def seed_redis(storage: Any, n: int) -> None:
    """Through the storage's own scripts, pipelined: the indexes are the scripts' to keep."""
    for batch in batches(n, 2000):
        async with storage._conn().pipeline(transaction=False) as pipe:
            for payout, entry in batch:
                await _redis_write(storage, pipe, payout, entry)
            await pipe.execute()


async def _redis_write(storage: Any, pipe: Any, payout: Payout, entry: OutboxEntry | None) -> None:
    # The same arguments as RedisStorage.create_if_absent / compare_and_set, into a pipeline.
    from resilient_payout.storage.redis import _index_args, _num

    created = payout if entry is None else replace(payout, status=S.RECEIVED, next_check_at=None)
    nca = "" if created.next_check_at is None else _num(created.next_check_at)
    await storage._scripts["create"](
        keys=[storage._payout_key(created.id), storage._due, storage._ready, storage._counts],
        args=[created.id, created.status.value, nca, encode_payout(created),
              "1" if created.is_final else "0", storage.prefix, *_index_args(created)],
        client=pipe,
    )  # fmt: skip
    if entry is None:
        return
    args = [payout.id, 1, payout.status.value, "", encode_payout(payout), "1", "1",
            entry.status.value, _num(entry.created_at), _num(entry.next_attempt_at),
            entry.attempts, "", "", "", storage.prefix, *_index_args(payout)]  # fmt: skip
    keys = [storage._payout_key(payout.id), storage._due, storage._ready, storage._leased,
            storage._counts, storage._outbox_key(payout.id), storage._outbox_due,
            storage._outbox_dead]  # fmt: skip
    await storage._scripts["cas"](keys=keys, args=args, client=pipe)


# -- the backends --------------------------------------------------------------------------------


@asynccontextmanager
async def opened(name: str, n: int) -> AsyncIterator[Storage]:
    """The backend ``name``, opened and seeded with ``n`` payouts (dropped afterwards)."""
    if name == "memory":
        memory = MemoryStorage()
        await memory.open()
        await seed_memory(memory, n)
        yield memory
    elif name == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = SQLiteStorage(Path(tmp) / "listing.db", synchronous="normal")
            await sqlite.open()
            try:
                await seed_sqlite(sqlite, n)
                yield sqlite
            finally:
                await sqlite.close()
    elif name == "postgres":
        from resilient_payout.storage.postgres import PostgresStorage

        url = os.environ.get("RP_TEST_POSTGRES_URL") or _PG_DEFAULT
        schema = f"rp_bench_{uuid.uuid4().hex[:10]}"
        pg = PostgresStorage(url, schema=schema, command_timeout=600)
        await pg.open()
        try:
            await seed_postgres(url, schema, n)
            yield pg
        finally:
            await pg.close()
            await _drop_schema(url, schema)
    else:
        from resilient_payout.storage.redis import RedisStorage

        url = os.environ.get("RP_TEST_REDIS_URL") or _REDIS_DEFAULT
        prefix = f"rp-bench:{uuid.uuid4().hex[:10]}:"
        rs = RedisStorage(url, prefix=prefix, socket_timeout=60)
        await rs.open()
        try:
            await seed_redis(rs, n)
            yield rs
        finally:
            await rs.close()
            await _delete_prefix(url, prefix)


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _delete_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        batch = []
        async for key in client.scan_iter(match=prefix + "*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


async def probe(name: str) -> str | None:
    """None if the backend's server answers, else why not."""
    try:
        if name == "postgres":
            import asyncpg

            conn = await asyncpg.connect(os.environ.get("RP_TEST_POSTGRES_URL") or _PG_DEFAULT)
            await conn.close()
        elif name == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(os.environ.get("RP_TEST_REDIS_URL") or _REDIS_DEFAULT)
            try:
                await client.ping()
            finally:
                await client.aclose()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# -- the queries -------------------------------------------------------------------------------


def queries(storage: Storage, n: int) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Name -> one call; each listing must return a full page (checked once)."""
    deep = int(n * 0.9)

    def cursor_at(i: int) -> str:
        return encode_cursor(T0 + i * SPACING, f"p-{i:08}")

    unknown = [i for i in range(n) if status_of(i) is S.UNKNOWN]
    unknown_10th = unknown[min(450, len(unknown) - 60)]  # page 10, or as deep as N allows
    open_ = frozenset(s for s in S if not s.is_final)
    page = {
        "first_page": PayoutQuery(),
        "deep_page": PayoutQuery(cursor=cursor_at(deep)),
        "status_unknown": PayoutQuery(statuses={S.UNKNOWN}),
        "status_unknown_deep": PayoutQuery(statuses={S.UNKNOWN}, cursor=cursor_at(unknown_10th)),
        "status_open": PayoutQuery(statuses=open_),
        "status_completed_deep": PayoutQuery(statuses={S.COMPLETED}, cursor=cursor_at(deep)),
        "conflicts": PayoutQuery(conflicts_only=True),
        "undelivered": PayoutQuery(undelivered_only=True),
    }
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        name: (lambda q=q: storage.list_payouts(q)) for name, q in page.items()
    }
    now = T0 + n * SPACING + 3600
    calls["count_by_status"] = storage.count_by_status
    calls["ops_snapshot"] = lambda: storage.ops_snapshot(now, late_after=600, failing_after=600)
    return calls


async def measure(name: str, n: int, repeat: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with opened(name, n) as storage:
        seeded = time.perf_counter() - t0
        out: dict[str, Any] = {"seed_s": round(seeded, 1), "ms": {}}
        for query, call in queries(storage, n).items():
            first = await call()
            if isinstance(first, PayoutPage) and query not in ("conflicts", "undelivered"):
                assert len(first.items) == 50, (name, query, len(first.items))
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                await call()
                times.append((time.perf_counter() - started) * 1000)
            out["ms"][query] = {
                "median": round(statistics.median(times), 3),
                "max": round(max(times), 3),
            }
        return out


def _table(results: dict[str, Any]) -> str:
    names = [b for b in BACKENDS if "ms" in results.get(b, {})]
    if not names:
        return "no backend ran"
    queries_ = list(results[names[0]]["ms"])
    head = f"{'query (median ms)':<24}" + "".join(f"{b:>12}" for b in names)
    lines = [head, "-" * len(head)]
    lines += [
        f"{q:<24}" + "".join(f"{results[b]['ms'][q]['median']:>12.3f}" for b in names)
        for q in queries_
    ]
    lines.append(f"{'(seeding, s)':<24}" + "".join(f"{results[b]['seed_s']:>12.1f}" for b in names))
    return "\n".join(lines)


async def amain(ns: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in ns.backends.split(","):
        why = await probe(name)
        if why is not None:
            print(f"{name}: skipped ({why})", flush=True)
            results[name] = {"skipped": why}
            continue
        print(f"{name}: seeding {ns.n:,} payouts...", flush=True)
        results[name] = await measure(name, ns.n, ns.repeat)
        print(f"{name}: done ({results[name]['seed_s']} s seeding)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.listing", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20,000 payouts instead of 1,000,000")
    ap.add_argument("--n", type=int, help="payouts per backend")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ns = ap.parse_args(argv)
    ns.n = ns.n or (20_000 if ns.quick else 1_000_000)
    results = anyio.run(amain, ns)
    print(_table(results))
    data = {"n": ns.n, "repeat": ns.repeat, "machine": machine(), "backends": results}
    path = write_json(ns.out, "listing", data)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
