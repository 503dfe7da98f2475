"""Throughput of the payout client per storage backend: memory, SQLite, PostgreSQL, Redis.

Run: ``.venv/bin/python benchmarks/backends.py [--n N] [--json PATH]``. In-process, real time,
one event loop (so one core for the client; a server backend's own work runs elsewhere):

* **submits/s**: ``N`` concurrent ``client.submit`` (100 at a time) until all are accepted,
  against a partner that answers at once (the background POSTs compete with the submits, as in
  a service; background work is capped at ``MAX_WORK`` payouts at once).
* **payouts/s**: ``N`` payouts resolved end to end (submit -> partner answer -> outcome pushed
  through a ``CallbackNotifier``) with a :class:`~resilient_payout.testing.FakePartner` whose
  delays are scaled by ``--time-scale`` (answers 0.2-10 scenario s, webhooks 10-30 s), from the
  first submit to the last push.
* **CPU ms/payout**: ``time.process_time()`` of this process over the end-to-end run / ``N``
  (the database server's CPU is not included).

PostgreSQL and Redis run on ``RP_TEST_POSTGRES_URL`` / ``RP_TEST_REDIS_URL`` (defaults: local
servers) in a fresh schema / key prefix, dropped afterwards; an unreachable server is skipped,
with the reason. Writes JSON (default ``bench-results/backends.json``).

``--repeat N`` (default 3) runs both measurements N times per backend (interleaved, each on a
fresh store) and reports the medians with min/max; ``--compare BASE.json`` then prints new/old
ratios against an earlier ``backends.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from resilient_payout import (
    CallbackNotifier,
    PartnerStatus,
    PayoutClient,
    PayoutStatus,
    Policy,
    storage_from_url,
)
from resilient_payout.testing import FakePartner, Fate, Script

try:  # as ``python -m benchmarks.backends`` (or imported by the runner)
    from . import report
    from ._common import MachineWatch, add_repeat_options, machine_text, spread_text, summarize
except ImportError:  # as ``python benchmarks/backends.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import report
    from benchmarks._common import (
        MachineWatch,
        add_repeat_options,
        machine_text,
        spread_text,
        summarize,
    )

BACKENDS = ("memory", "sqlite", "postgres", "redis")
CONCURRENCY = 100
"""Submits in flight at once, as many app requests would be."""
MAX_WORK = 200
"""``Policy.max_concurrent_work``: the default (10,000) lets background work outgrow any
connection pool when the storage is slower than the submits."""
_PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
_REDIS_DEFAULT = "redis://127.0.0.1:6379/0"


# -- backends ------------------------------------------------------------------------------------


async def _probe(name: str) -> str | None:
    """None if the backend's server answers, else why not."""
    try:
        if name == "postgres":
            import asyncpg

            conn = await asyncpg.connect(_pg_url(), timeout=3)
            await conn.close()
        elif name == "redis":
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(_redis_url(), socket_connect_timeout=3)
            try:
                await client.ping()
            finally:
                await client.aclose()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _pg_url() -> str:
    return os.environ.get("RP_TEST_POSTGRES_URL") or _PG_DEFAULT


def _redis_url() -> str:
    return os.environ.get("RP_TEST_REDIS_URL") or _REDIS_DEFAULT


def _with_query(url: str, key: str, value: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{key}={value}"


@asynccontextmanager
async def _storage_url(name: str, tmp: Path) -> AsyncIterator[str]:
    """A URL of an empty store of this backend, emptied again on exit."""
    tag = uuid.uuid4().hex[:10]
    if name == "memory":
        yield "memory://"
    elif name == "sqlite":
        yield f"sqlite:///{tmp / f'bench-{tag}.db'}"
    elif name == "postgres":
        import asyncpg

        schema = f"rp_bench_{tag}"
        try:
            yield _with_query(_pg_url(), "schema", schema)
        finally:
            conn = await asyncpg.connect(_pg_url(), timeout=5)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
    else:
        import redis.asyncio as aioredis

        prefix = f"rp-bench:{tag}:"
        # redis-py's asyncio pool holds at most 100 connections and raises MaxConnectionsError
        # past that (surfacing as StorageUnavailable); 100 submits plus the background work
        # need more.
        url = _redis_url()
        try:
            yield _with_query(url, "prefix", prefix)
        finally:
            client = aioredis.Redis.from_url(_redis_url())
            try:
                keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
                for i in range(0, len(keys), 1000):
                    await client.unlink(*keys[i : i + 1000])
            finally:
                await client.aclose()


# -- the two measurements ------------------------------------------------------------------------


async def _submit_all(client: PayoutClient, ids: list[str]) -> None:
    limiter = anyio.CapacityLimiter(CONCURRENCY)

    async def one(payout_id: str) -> None:
        async with limiter:
            await client.submit({"id": payout_id, "amount": 100, "currency": "EUR"})

    async with anyio.create_task_group() as tg:
        for payout_id in ids:
            tg.start_soon(one, payout_id)


async def _submits_per_second(url: str, n: int) -> float:
    partner = FakePartner(script=lambda _id, _n: Script(answer_delay=0.0, webhook=False))
    async with (
        partner,
        PayoutClient(
            storage=storage_from_url(url),
            partner=partner,
            webhook_url="x",
            policy=Policy(max_concurrent_work=MAX_WORK),
        ) as client,
    ):
        ids = [f"s-{i}" for i in range(n)]
        started = time.perf_counter()
        await _submit_all(client, ids)
        return n / (time.perf_counter() - started)


def _scripted(scale: float, seed: int) -> Callable[[str, int], Script]:
    rng = random.Random(seed)

    def script(_payout_id: str, _post: int) -> Script:
        return Script(
            fate=Fate.ANSWER,
            status=PartnerStatus.COMPLETED if rng.random() < 2 / 3 else PartnerStatus.DECLINED,
            answer_delay=rng.uniform(0.2, 10.0) * scale,
            webhook=rng.random() < 0.8,
            webhook_delay=rng.uniform(10.0, 30.0) * scale,
        )

    return script


def _scaled_policy(scale: float) -> Policy:
    """The policy at ``scale``, but with the send-age bound in real seconds.

    The partner's delays shrink with the scale, the CPU does not: a burst of thousands of
    submits keeps the last ones waiting longer than a scaled 0.1 s before their POST, and the
    client (rightly) refuses such stale sends and decides them again. This benchmark measures
    throughput, not that guard, and its partner never answers 504, so the window it protects
    does not come into play.
    """
    policy = Policy(max_concurrent_work=MAX_WORK).scaled(scale)
    send = max(policy.max_send_delay, 15.0)
    window = max(policy.late_arrival_window, policy.latest_landing + send + policy.max_clock_skew)
    return policy.replace(max_send_delay=send, late_arrival_window=window)


async def _end_to_end(url: str, n: int, scale: float) -> dict[str, float]:
    pushed: dict[str, PayoutStatus] = {}
    done = anyio.Event()

    async def on_outcome(payout_id: str, status: PayoutStatus) -> None:
        pushed[payout_id] = status
        if len(pushed) == n:
            done.set()

    partner = FakePartner(script=_scripted(scale, 7), check_window=scale, timeout_after=30 * scale)
    client = PayoutClient(
        storage=storage_from_url(url),
        partner=partner,
        webhook_url="x",
        notifier=CallbackNotifier(on_outcome),
        policy=_scaled_policy(scale),
    )
    sink: Callable[[dict[str, Any]], Awaitable[object]] = client.handle_webhook
    partner.webhook_sink = sink
    async with partner, client:
        ids = [f"e-{i}" for i in range(n)]
        cpu, started = time.process_time(), time.perf_counter()
        await _submit_all(client, ids)
        with anyio.fail_after(120):
            await done.wait()
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
    if partner.double_payments:
        raise AssertionError(f"double payments: {partner.double_payments[:5]}")
    return {"payouts_per_s": n / wall, "cpu_ms_per_payout": 1000 * cpu / n, "wall_s": wall}


# -- running and reporting -----------------------------------------------------------------------


async def _bench(names: list[str], n: int, scale: float, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    runs: dict[str, list[dict[str, float]]] = {}
    for name in names:
        problem = await _probe(name)
        if problem is not None:
            print(f"{name}: skipped, server unreachable ({problem})", file=sys.stderr)
            results[name] = {"skipped": problem}
        else:
            runs[name] = []
    with tempfile.TemporaryDirectory(prefix="rp-bench-") as tmpdir:
        for i in range(repeat):
            for name in runs:
                async with _storage_url(name, Path(tmpdir)) as url:
                    submits = await _submits_per_second(url, n)
                async with _storage_url(name, Path(tmpdir)) as url:
                    e2e = await _end_to_end(url, n, scale)
                runs[name].append({"submits_per_s": submits, **e2e})
                print(f"{name} run {i + 1}/{repeat}: {_figures(runs[name][-1])}", file=sys.stderr)
    for name, rs in runs.items():
        results[name] = summarize(rs, "payouts_per_s")
        if repeat > 1:
            print(f"{name} median of {repeat}: {_figures(results[name])}", file=sys.stderr)
    return {name: results[name] for name in names}


def _figures(r: dict[str, Any]) -> str:
    return (
        f"{spread_text(r, 'submits_per_s', ',.0f')} submits/s, "
        f"{spread_text(r, 'payouts_per_s', ',.0f')} payouts/s, "
        f"{spread_text(r, 'cpu_ms_per_payout', '.2f')} CPU ms/payout"
    )


def _table(results: dict[str, Any]) -> str:
    lines = [
        "| backend | submits/s | payouts/s end to end | CPU ms/payout |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped | ({r['skipped'][:60]}) | |")
        else:
            lines.append(
                f"| {name} | {spread_text(r, 'submits_per_s', ',.0f')} "
                f"| {spread_text(r, 'payouts_per_s', ',.0f')} "
                f"| {spread_text(r, 'cpu_ms_per_payout', '.2f')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="payouts per measurement (2000)")
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.01,
        help="multiplies the partner's delays and the policy (default 0.01)",
    )
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, default=Path("bench-results/backends.json"))
    add_repeat_options(parser)
    ns = parser.parse_args(argv)
    names = [b for b in ns.backends.split(",") if b]
    unknown = set(names) - set(BACKENDS)
    repeat = 3 if ns.repeat is None else ns.repeat
    if unknown or ns.n < 1 or ns.time_scale <= 0 or repeat < 1:
        parser.error(f"bad --backends {sorted(unknown)}, --n, --time-scale or --repeat")
    started = time.perf_counter()
    servers = {"postgres": "postgres", "redis": "redis-server"}
    with MachineWatch(uses=[servers[b] for b in names if b in servers]) as watch:
        results = anyio.run(_bench, names, ns.n, ns.time_scale, repeat)
    print(_table(results))
    print(machine_text(watch.result))
    data = {
        "scenario": "backends",
        "n": ns.n,
        "repeat": repeat,
        "time_scale": ns.time_scale,
        "concurrency": CONCURRENCY,
        "max_concurrent_work": MAX_WORK,
        "machine": {**watch.result, "platform": platform.platform()},
        "wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    ns.json.parent.mkdir(parents=True, exist_ok=True)
    ns.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {ns.json} in {data['wall_s']} s")
    if ns.compare:
        report.print_compare(ns.compare, data, ns.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
