"""Scenario: overload shedding of ``POST /transaction`` (``RP_MAX_LOOP_LAG``,
``RP_MAX_INFLIGHT_SUBMITS``; docs/service.md "Overload and shutdown").

1. **Capacity**, shedding off: per offered rate (:data:`RATES`) a fresh mock partner (answers in
   0.9-1.1 s, no 504s, no webhooks) and a fresh ``resilient-payout serve`` on SQLite (or a fresh
   PostgreSQL schema, ``--storage``), an open-loop load (the connection pool of
   :mod:`benchmarks.loadgen`; latency from each request's due time) for a warm-up and a measured
   window. Capacity = the highest rate whose POST p99 is <= 50 ms (a miss is run once more).
   Each run records the candidate overload signals: requests outstanding (due, not answered;
   sampled every 50 ms by the load process), the most requests inside the service's submit gate
   (``/metrics``) and payouts in flight at the partner (the client's background work).
2. **2x capacity**, shedding off (before), then with each ``--bounds`` pair (default: the
   settings' defaults; after): accepted (200), shed (503 ``overloaded``), lost (accepted, not
   final :data:`SETTLE_S` after the load), left behind (stored without a 200: must be 0),
   accepted POST p50/p99, shed answer p50/p99.

``python -m benchmarks.overload [--quick] [--out DIR] [--capacity R] [--storage URL]
[--bounds N:S,...]`` prints a line per run and writes ``OUT/overload.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from resilient_payout.settings import ServiceSettings

from ._common import machine, percentile, spawn, write_json
from ._stack import Proc, Stack, get_json, start_bare, start_partner, start_service
from .loadgen import _Conn, _Pool

NAME = "overload"
P99_TARGET_MS = 50.0
SHED_TARGET_MS = 5.0
WARMUP_S = 2.5
"""Not measured: until the partner's first answers (1 s) and pushes come back, a payout costs
the service less than in steady state."""
RATES = [50.0, 75.0, 100.0, 125.0, 150.0, 200.0, 250.0, 300.0, 400.0, 500.0, 600.0, 800.0, 1000.0]
_FINAL = ("completed", "declined", "failed")
_OVERLOADED = b"problem:overloaded"


# -- the load process ---------------------------------------------------------------------------


class _BodyPool(_Pool):
    """The load generator's keep-alive pool, answering the status and whether it was a shed."""

    async def shed_or_not(self, path: str, body: bytes) -> tuple[int, bool]:
        async with self.sem:
            if self.idle:
                conn = self.idle.pop()
                try:
                    return await self._full(conn, path, body)
                except (OSError, ConnectionError, asyncio.IncompleteReadError):
                    self.stale += 1  # retried once on a new connection (ids are idempotent)
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
            return await self._full(_Conn(reader, writer), path, body)

    async def _full(self, conn: _Conn, path: str, body: bytes) -> tuple[int, bool]:
        try:
            status, answer = await conn.post(f"{self.host}:{self.port}", path, body, self.extra)
        except BaseException:
            conn.close()
            raise
        self.idle.append(conn)
        return status, status == 503 and _OVERLOADED in answer


async def _offer(ns: argparse.Namespace) -> dict[str, Any]:
    """Open loop at ``ns.rate`` for ``ns.duration`` s; latencies by kind after ``ns.skip`` s."""
    pool = _BodyPool(ns.host, ns.port, 1500, "")
    # Per kind: (seconds from the start the request was due, latency ms).
    lat: dict[str, list[tuple[float, float]]] = {"accepted": [], "shed": [], "other": []}
    counts = {"accepted": 0, "shed": 0, "other": 0, "errors": 0}
    statuses: dict[str, int] = {}
    outstanding = 0
    samples: list[tuple[float, int]] = []

    async def one(i: int, due: float) -> None:
        nonlocal outstanding
        body = json.dumps({"id": f"{ns.prefix}-{i:07d}", "amount": 100}).encode()
        outstanding += 1
        try:
            status, shed = await asyncio.wait_for(
                pool.shed_or_not("/transaction", body), ns.timeout
            )
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            counts["errors"] += 1
            return
        finally:
            outstanding -= 1
        kind = "accepted" if status == 200 else "shed" if shed else "other"
        counts[kind] += 1
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if due - t0 >= ns.skip:
            took = (time.perf_counter() - due) * 1000
            lat[kind].append((round(due - t0, 3), round(took, 3)))

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.05)
            samples.append((round(time.perf_counter() - t0, 3), outstanding))

    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample())
    tasks = []
    for i in range(int(ns.rate * ns.duration)):
        due = t0 + i / ns.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    sampler.cancel()
    return {
        "sent": len(tasks),
        **counts,
        "statuses": statuses,
        "latencies_ms": lat,
        "outstanding": samples,
        "elapsed_s": time.perf_counter() - t0,
    }


def _offer_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overload offer")
    ap.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--skip", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--json", type=Path, required=True)
    ns = ap.parse_args(argv)
    ns.duration = min(ns.duration, 60.0)
    ns.json.write_text(json.dumps(asyncio.run(_offer(ns))))
    return 0


# -- the scenario -------------------------------------------------------------------------------


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(values, 0.50),
        "p99_ms": percentile(values, 0.99),
        "max_ms": max(values, default=0.0),
        "n": len(values),
    }


def _poll_partner(partner: Proc, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    t0 = time.perf_counter()
    while not stop.wait(0.25):
        try:
            s = get_json(f"{partner.url}/_mock/stats")
        except Exception:
            continue
        in_flight = s["posts_total"] - sum(s["answers"].values())
        samples.append((round(time.perf_counter() - t0, 3), in_flight))


def _scrape(service: Proc) -> tuple[dict[str, int], dict[str, float]]:
    """Payouts stored by status, and the submit gate's figures, from ``/metrics``."""
    import httpx

    with httpx.Client(timeout=30.0, trust_env=False) as http:
        text = http.get(f"{service.url}/metrics").text
    stored: dict[str, int] = {}
    gate: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == "resilient_payout_payouts":
                stored[s.labels["status"]] = int(s.value)
            elif family.name.startswith("resilient_payout_submits_"):
                label = "".join(f"_{v}" for v in s.labels.values())
                gate[s.name.removeprefix("resilient_payout_submits_") + label] = s.value
    return stored, gate


def _settle(service: Proc, timeout: float) -> tuple[dict[str, int], dict[str, float]]:
    """Wait until no stored payout is open (or ``timeout``): :func:`_scrape` then."""
    deadline = time.monotonic() + timeout
    while True:
        stored, gate = _scrape(service)
        open_ = sum(n for status, n in stored.items() if status not in _FINAL)
        if not open_ or time.monotonic() > deadline:
            return stored, gate
        time.sleep(0.5)


def _by_second(pairs: list[list[float]], skip: float) -> list[float]:
    """The p99 of each second of the window (where in time a tail comes from)."""
    buckets: dict[int, list[float]] = {}
    for due, ms in pairs:
        buckets.setdefault(int(due - skip), []).append(ms)
    return [round(percentile(buckets[k], 0.99), 1) for k in sorted(buckets)]


def _mean(samples: list[tuple[float, int]], after: float) -> float:
    window = [n for t, n in samples if t >= after]
    return sum(window) / len(window) if window else 0.0


STORAGE: list[str] = []
"""``--storage``: a PostgreSQL URL (each run in a schema of its own, dropped after it); empty:
a fresh SQLite file per run."""
SETTLE_S = 120.0
"""How long after the load every accepted payout has to become final (else it counts lost)."""


def _storage_url(db: Path, tag: str) -> str:
    if not STORAGE:
        return f"sqlite:///{db}"
    schema = "bench_overload_" + re.sub(r"[^a-z0-9]", "_", tag.lower())
    return f"{STORAGE[0]}{'&' if '?' in STORAGE[0] else '?'}schema={schema}"


def _drop(url: str) -> None:
    """Drop a PostgreSQL run's schema (nothing for SQLite)."""
    if not url.startswith(("postgres://", "postgresql://")):
        return
    import asyncpg

    base, _, query = url.partition("?")
    params = dict(kv.split("=", 1) for kv in query.split("&") if "=" in kv)
    schema = params.pop("schema")
    dsn = base + ("?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else "")

    async def drop() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


Bounds = tuple[int, float]
"""(``RP_MAX_INFLIGHT_SUBMITS``, ``RP_MAX_LOOP_LAG``); (0, 0): no shedding."""
OFF: Bounds = (0, 0.0)


def run_level(
    work: Path, bare: Proc, rate: float, duration: float, skip: float, bounds: Bounds, tag: str
) -> dict[str, Any]:
    """One run: fresh partner and service (shedding with ``bounds``), the load, the settle, the
    figures."""
    stack = Stack()
    db = work / f"{tag}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = _storage_url(db, tag)
    # spawn() passes our environment on to the service.
    os.environ["RP_MAX_INFLIGHT_SUBMITS"], os.environ["RP_MAX_LOOP_LAG"] = map(str, bounds)
    try:
        partner = stack.add(
            start_partner(
                work,
                1.0,
                answer_delay_min=0.9,
                answer_delay_max=1.1,
                p_timeout=0.0,
                p_webhook=0.0,
            )
        )
        service = stack.add(start_service(work, partner, bare, url))
        stack.procs.reverse()  # stop the service before the partner
        samples: list[tuple[float, int]] = []
        halt = threading.Event()
        poller = threading.Thread(target=_poll_partner, args=(partner, halt, samples))
        poller.start()
        try:
            out_json = work / "offer.json"
            proc = spawn(
                [
                    *("-m", "benchmarks.overload", "offer", "--port", str(service.port)),
                    *("--rate", str(rate), "--duration", str(skip + duration)),
                    *("--skip", str(skip), "--prefix", tag, "--json", str(out_json)),
                ],
                work / "offer.log",
            )
            proc.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"load process failed ({proc.returncode}); see {work}/offer.log")
            load: dict[str, Any] = json.loads(out_json.read_text())
        finally:
            halt.set()
            poller.join()
        stored, gate = _settle(service, SETTLE_S)
    finally:
        stack.stop_all()
        _drop(url)
        for var in ("RP_MAX_INFLIGHT_SUBMITS", "RP_MAX_LOOP_LAG"):
            os.environ.pop(var, None)
    total = sum(stored.values())
    open_ = total - sum(stored.get(s, 0) for s in _FINAL)
    lat = {kind: [ms for _, ms in pairs] for kind, pairs in load["latencies_ms"].items()}
    return {
        "rate": rate,
        "max_inflight_submits": bounds[0],
        "max_loop_lag_s": bounds[1],
        "window_s": duration,
        "warmup_s": skip,
        "sent": load["sent"],
        "accepted": load["accepted"],
        "shed": load["shed"],
        "other": load["other"],
        "errors": load["errors"],
        "statuses": load["statuses"],
        "stored": total,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "gate": gate,
        # Accepted (a 200 was seen) yet not final once the partner answered everything.
        "lost": min(open_, load["accepted"]),
        "open_after_settle": open_,
        # Stored without a 200: a shed or failed request that still wrote something. An error
        # (no answer within the load's timeout) may have been stored, so it counts apart.
        "left_behind": max(0, total - load["accepted"] - load["errors"]),
        "accepted_ms": _summary(lat["accepted"]),
        "shed_ms": _summary(lat["shed"]),
        "signals": {
            "outstanding_requests_mean": _mean([tuple(x) for x in load["outstanding"]], skip),
            "outstanding_requests_max": max((n for _, n in load["outstanding"]), default=0),
            "partner_in_flight_mean": _mean(samples, skip),
        },
        "accepted_p99_by_second": _by_second(load["latencies_ms"]["accepted"], skip),
        "accepted_latencies_ms": lat["accepted"],
        "shed_latencies_ms": lat["shed"],
    }


def _line(label: str, r: dict[str, Any]) -> str:
    a, s, g = r["accepted_ms"], r["shed_ms"], r["signals"]
    return (
        f"{label:<12} {r['rate']:>5g}/s bounds {r['max_inflight_submits']:>3}"
        f" {r['max_loop_lag_s'] * 1000:>3g}ms accepted {r['accepted']:>6}"
        f" shed {r['shed']:>6} other {r['other']:>4} errors {r['errors']:>4} lost {r['lost']:>3}"
        f" left {r['left_behind']:>3} | accepted p50 {a['p50_ms']:7.1f} p99 {a['p99_ms']:8.1f} ms"
        f" | shed p50 {s['p50_ms']:6.1f} p99 {s['p99_ms']:6.1f} ms"
        f" | peak in gate {r['gate'].get('in_flight_peak', 0):3.0f}"
        f" | outstanding {g['outstanding_requests_mean']:7.1f}"
        f" partner {g['partner_in_flight_mean']:6.0f} | load {r['loadavg_1m']:.1f}"
    )


def find_capacity(
    work: Path, bare: Proc, rates: list[float], duration: float, levels: list[dict[str, Any]]
) -> float:
    """The highest rate of ``rates`` (ascending) with p99 <= target, shedding off; stops at the
    first that misses it twice in a row (other jobs on the machine make single runs noisy)."""
    capacity = 0.0
    for rate in rates:
        ok = False
        for attempt in range(2):
            r = run_level(work, bare, rate, duration, WARMUP_S, OFF, f"cap{rate:g}-{attempt}")
            levels.append(r)
            ok = r["accepted_ms"]["p99_ms"] <= P99_TARGET_MS and not r["errors"] and not r["other"]
            print(_line("capacity" + (" ok" if ok else " MISS"), r), flush=True)
            if ok:
                break
        if not ok:
            break
        capacity = rate
    return capacity


def run(
    out: Path,
    quick: bool = False,
    capacity: float | None = None,
    bounds: list[Bounds] | None = None,
) -> dict[str, Any]:
    """Capacity, then 2x capacity before/after; prints a line per run, writes overload.json."""
    work = out / "work" / NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    defaults = ServiceSettings()
    default: Bounds = (defaults.max_inflight_submits, defaults.max_loop_lag)
    tried = bounds or [default]
    duration = 3.0 if quick else 8.0
    started = machine()
    bare_stack = Stack()
    levels: list[dict[str, Any]] = []
    overload: list[dict[str, Any]] = []
    try:
        bare = bare_stack.add(start_bare(work))
        if capacity is None:
            rates = [50.0, 100.0] if quick else RATES
            capacity = find_capacity(work, bare, rates, duration, levels)
        if capacity <= 0:
            write_json(out, NAME, {"scenario": NAME, "machine": started, "capacity_levels": levels})
            raise RuntimeError("no rate met the p99 target; see the capacity lines")
        offered = 2 * capacity
        before = run_level(work, bare, offered, duration, WARMUP_S, OFF, "before")
        overload.append(before)
        print(_line("2x, off", before), flush=True)
        for i, b in enumerate(tried):
            after = run_level(work, bare, offered, duration, WARMUP_S, b, f"after{i}")
            overload.append(after)
            print(_line("2x, on", after), flush=True)
    finally:
        bare_stack.stop_all()
    chosen = overload[1 + (tried.index(default) if default in tried else 0)]
    targets = {
        "bounds": [chosen["max_inflight_submits"], chosen["max_loop_lag_s"]],
        "lost_zero": chosen["lost"] == 0 and chosen["left_behind"] == 0,
        "accepted_p99_ms": chosen["accepted_ms"]["p99_ms"],
        "accepted_p99_met": chosen["accepted_ms"]["p99_ms"] <= P99_TARGET_MS,
        "shed_p99_ms": chosen["shed_ms"]["p99_ms"],
        # None: nothing was shed, so there is no shed answer to judge.
        "shed_p99_met": chosen["shed_ms"]["p99_ms"] <= SHED_TARGET_MS if chosen["shed"] else None,
    }
    print(f"overload: capacity {capacity:g}/s, offered {offered:g}/s: {targets}", flush=True)
    data = {
        "scenario": NAME,
        "quick": quick,
        "machine": started,
        "p99_target_ms": P99_TARGET_MS,
        "shed_target_ms": SHED_TARGET_MS,
        "storage": "postgresql (a schema per run)" if STORAGE else "sqlite (a file per run)",
        "capacity_per_s": capacity,
        "offered_per_s": offered,
        "default_bounds": list(default),
        "capacity_levels": levels,
        "overload_runs": overload,
        "targets": targets,
    }
    write_json(out, NAME, data)
    return data


def _bounds(text: str) -> list[Bounds]:
    out: list[Bounds] = []
    for item in text.split(","):
        if item.strip():
            n, _, lag = item.partition(":")
            out.append((int(n), float(lag or 0)))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.overload [--quick] [--out DIR] [--capacity R] [--bounds N:S,...]``."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["offer"]:
        return _offer_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--capacity", type=float, default=None, help="skip the search: this rate")
    ap.add_argument("--storage", default="", help="a postgresql:// URL (default: SQLite files)")
    ap.add_argument(
        "--bounds",
        default="",
        help="comma-separated MAX_INFLIGHT:MAX_LAG_S pairs to try at 2x (default: the defaults)",
    )
    ns = ap.parse_args(argv)
    STORAGE[:] = [ns.storage] if ns.storage else []
    run(ns.out, ns.quick, ns.capacity, _bounds(ns.bounds) or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
