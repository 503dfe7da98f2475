"""A small HTTP/1.1 load generator for ``POST /transaction`` on 127.0.0.1 (run as a subprocess).

Open loop (``--rate R --duration D``): request ``i`` is due at ``i / R`` seconds whatever the
answers do, and its latency counts from that due time, so a slow server cannot hide its queue
(no coordinated omission). Closed loop (``--count N --concurrency C``): C workers send N requests
back to back. Keep-alive connections over raw asyncio streams; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

_MAX_CONNECTIONS = 1500


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, host: str, path: str, body: bytes, extra: str) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("closed")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class _Pool:
    def __init__(self, host: str, port: int, limit: int, extra: str) -> None:
        self.host, self.port, self.extra = host, port, extra
        self.idle: list[_Conn] = []
        self.sem = asyncio.Semaphore(limit)
        self.opened = 0
        self.stale = 0

    async def request(self, path: str, body: bytes) -> int:
        async with self.sem:
            if self.idle:  # a kept-alive connection the server may have closed meanwhile
                conn = self.idle.pop()
                try:
                    return await self._on(conn, path, body)
                except (OSError, ConnectionError, asyncio.IncompleteReadError):
                    self.stale += 1  # retried once on a new connection (ids are idempotent)
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
            return await self._on(_Conn(reader, writer), path, body)

    async def _on(self, conn: _Conn, path: str, body: bytes) -> int:
        try:
            status, _ = await conn.post(f"{self.host}:{self.port}", path, body, self.extra)
        except BaseException:
            conn.close()
            raise
        self.idle.append(conn)
        return status


async def _run(ns: argparse.Namespace) -> dict[str, Any]:
    extra = f"Prefer: wait={ns.prefer_wait:g}\r\n" if ns.prefer_wait else ""
    pool = _Pool(ns.host, ns.port, ns.max_connections, extra)
    latencies: list[float] = []
    skipped = errors = 0
    statuses: dict[str, int] = {}
    sent_at: dict[str, float] = {}

    async def one(i: int, due: float) -> None:
        nonlocal errors, skipped
        pid = f"{ns.prefix}-{i:07d}"
        body = json.dumps({"id": pid, "amount": 100, "currency": "EUR"}).encode()
        if ns.record_ids:
            sent_at[pid] = time.time()
        try:
            status = await asyncio.wait_for(pool.request("/transaction", body), ns.timeout)
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            return
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if due - t0 < ns.skip:
            skipped += 1
        else:
            latencies.append(time.perf_counter() - due)

    t0 = time.perf_counter()
    if ns.count:
        counter = iter(range(ns.count))

        async def worker() -> None:
            for i in counter:
                await one(i, time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(ns.concurrency)))
        sent = ns.count
    else:
        total = int(ns.rate * ns.duration)
        tasks = []
        for i in range(total):
            due = t0 + i / ns.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        sent = total
    elapsed = time.perf_counter() - t0
    return {
        "mode": "closed" if ns.count else "open",
        "offered_rate": ns.rate if not ns.count else None,
        "concurrency": ns.concurrency if ns.count else None,
        "sent": sent,
        "measured": len(latencies),
        "warmup_skipped": skipped,
        "errors": errors,
        "statuses": statuses,
        "connections_opened": pool.opened,
        "stale_connections_retried": pool.stale,
        "elapsed_s": elapsed,
        "achieved_rate": sent / elapsed if elapsed else 0.0,
        "latencies_ms": [round(x * 1000, 3) for x in latencies],
        "sent_at": sent_at,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse options, run, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=100.0, help="open loop: requests per second")
    ap.add_argument("--duration", type=float, default=5.0, help="open loop: seconds (max 120)")
    ap.add_argument("--skip", type=float, default=0.0, help="seconds of warm-up not measured")
    ap.add_argument("--count", type=int, default=0, help="closed loop: requests (max 100000)")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--max-connections", type=int, default=_MAX_CONNECTIONS)
    ap.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    ap.add_argument("--prefer-wait", type=float, default=0.0, help="send Prefer: wait=S")
    ap.add_argument("--prefix", default="bench")
    ap.add_argument("--record-ids", action="store_true", help="keep each id's send time")
    ap.add_argument("--json", type=Path, required=True)
    ns = ap.parse_args(argv)
    ns.duration = min(ns.duration, 120.0)
    ns.count = min(ns.count, 100_000)
    ns.max_connections = min(ns.max_connections, _MAX_CONNECTIONS)
    result = asyncio.run(_run(ns))
    ns.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
