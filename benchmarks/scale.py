"""Scenario 3: 10,000 payouts in flight at once in one process, on real time.

A real :class:`~resilient_payout.PayoutClient` with :class:`MemoryStorage` submits to a partner
that holds every POST open (as a partner answering after minutes would), so every payout stays
in flight. The partner adds no task or timer of its own: each held POST is the client's own
submit task waiting on one shared event, so the memory measured is the library's. Resident memory
(VmRSS) is read as the count grows; a probe task sleeping 10 ms records how late it wakes
(event-loop lag), while the count grows and while 10,000 are held.

``--repeat N`` (default 3, 1 with ``--quick``) runs it N times, each in a fresh process, and
reports the medians with min/max; ``--compare BASE.json`` then prints new/old ratios against an
earlier ``scale.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from resilient_payout import (
    Accepted,
    CallbackNotifier,
    NotFound,
    PartnerStatus,
    PayoutClient,
    PayoutStatus,
    SubmitAttempt,
)
from resilient_payout.storage.memory import MemoryStorage

from . import report
from ._common import (
    MachineWatch,
    add_repeat_options,
    machine_text,
    percentile,
    repeats,
    rss_kib,
    spread_text,
    summarize,
    write_json,
)

NAME = "scale"
PROBE_S = 0.010


class _HoldingPartner:
    """Answers nothing until released; then every held POST gets ``completed``."""

    idempotency = None

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.held = 0

    async def submit(self, attempt: SubmitAttempt) -> Accepted:
        self.held += 1
        await self.release.wait()
        return Accepted(PartnerStatus.COMPLETED)

    async def check(self, payout_id: str, partner_ref: str | None = None) -> NotFound:
        return NotFound()


async def _probe(samples: list[tuple[float, float]]) -> None:
    while True:
        t = time.perf_counter()
        await anyio.sleep(PROBE_S)
        now = time.perf_counter()
        samples.append((now, (now - t - PROBE_S) * 1000))


def _lag(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    lags = [lag for t, lag in samples if start <= t < end]
    return {
        "samples": len(lags),
        "p50_ms": percentile(lags, 0.5),
        "p99_ms": percentile(lags, 0.99),
        "max_ms": max(lags, default=0.0),
    }


async def _scenario(total: int, step: int, hold: float) -> dict[str, Any]:
    partner = _HoldingPartner()

    pushed = [0]
    drained = anyio.Event()

    async def push(payout_id: str, status: PayoutStatus) -> None:
        pushed[0] += 1
        if pushed[0] >= partner.held and partner.release.is_set():
            drained.set()

    samples: list[tuple[float, float]] = []
    points: list[dict[str, float]] = []
    async with (
        PayoutClient(
            storage=MemoryStorage(),
            partner=partner,
            webhook_url="http://127.0.0.1:1/webhook",
            notifier=CallbackNotifier(push),
        ) as client,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(_probe, samples)
        warm = 200
        for i in range(warm):
            await client.submit({"id": f"warm-{i}", "amount": 100})
        await anyio.sleep(0.5)
        gc.collect()
        base_rss, base_count = rss_kib(), partner.held
        points.append({"in_flight": base_count, "rss_kib": base_rss})
        ramp0 = time.perf_counter()
        n = 0
        while n < total - warm:
            for _ in range(min(step, total - warm - n)):
                await client.submit({"id": f"p-{n:06d}", "amount": 100, "currency": "EUR"})
                n += 1
            await anyio.sleep(0.3)
            points.append({"in_flight": partner.held, "rss_kib": rss_kib()})
        ramp1 = time.perf_counter()
        await anyio.sleep(hold)
        hold1 = time.perf_counter()
        final_rss, held = rss_kib(), partner.held
        points.append({"in_flight": held, "rss_kib": final_rss})
        drain0 = time.perf_counter()
        partner.release.set()
        with anyio.move_on_after(60):
            await drained.wait()
        drain1 = time.perf_counter()
        tg.cancel_scope.cancel()
    per_payout = (final_rss - base_rss) * 1024 / max(1, held - base_count)
    return {
        "in_flight": held,
        "rss_base_kib": base_rss,
        "rss_final_kib": final_rss,
        "rss_per_payout_bytes": per_payout,
        "points": points,
        "lag_ramp": _lag(samples, ramp0, ramp1),
        "lag_hold": _lag(samples, ramp1, hold1),
        "lag_drain": _lag(samples, drain0, drain1),
        "hold_s": hold,
        "ramp_s": ramp1 - ramp0,
        "drain_s": drain1 - drain0,
        "lag_series": [(round(t - ramp0, 3), round(lag, 3)) for t, lag in samples],
    }


def _sizes(quick: bool) -> tuple[int, int, float]:
    return (2000, 500, 2.0) if quick else (10_000, 1000, 15.0)


def _one(quick: bool, path: Path) -> dict[str, Any]:
    """One run in a fresh process (no heap left over from an earlier run)."""
    argv = [sys.executable, "-m", "benchmarks.scale", "--one", str(path)]
    subprocess.run([*argv, *(["--quick"] if quick else [])], check=True, timeout=600)
    result: dict[str, Any] = json.loads(path.read_text())
    path.unlink()
    return result


def _line(r: dict[str, Any], label: str) -> str:
    def f(key: str, spec: str = ".2f") -> str:
        return spread_text(r, key, spec)

    return (
        f"scale {label}: {r['in_flight']} in flight, RSS {r['rss_base_kib'] / 1024:.1f} -> "
        f"{r['rss_final_kib'] / 1024:.1f} MiB = {f('rss_per_payout_bytes', '.0f')} bytes "
        f"({r['rss_per_payout_bytes'] / 1024:.2f} KiB) per payout | loop lag p99 "
        f"{f('lag_hold.p99_ms')} ms holding (max {f('lag_hold.max_ms', '.1f')}), "
        f"{f('lag_ramp.p99_ms')} ms ramping, "
        f"{f('lag_drain.p99_ms')} ms draining"
    )


def run(out: Path, quick: bool = False, repeat: int | None = None) -> dict[str, Any]:
    """Prints the figures (per run, then the medians) and writes ``scale.json``."""
    count = repeats(repeat, quick)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    with MachineWatch() as watch:
        for i in range(count):
            runs.append(_one(quick, out / f"scale-run-{i}.json"))
            print(_line(runs[-1], f"run {i + 1}/{count}"), flush=True)
    result = summarize(runs, "lag_hold.p99_ms")
    if count > 1:
        print(_line(result, f"median of {count}"), flush=True)
    print(machine_text(watch.result), flush=True)
    data = {"scenario": NAME, "quick": quick, "repeat": count, "machine": watch.result, **result}
    write_json(out, NAME, data)
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.scale [--quick] [--repeat N] [--out DIR] [--compare BASE.json]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    add_repeat_options(ap)
    ap.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.one:  # one run, for run(): its result as JSON
        ns.one.write_text(json.dumps(anyio.run(_scenario, *_sizes(ns.quick))))
        return 0
    data = run(ns.out, ns.quick, ns.repeat)
    if ns.compare:
        report.print_compare(ns.compare, data, ns.threshold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
