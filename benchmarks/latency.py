"""Scenario 1: answer latency of ``POST /transaction`` under load, service vs a bare endpoint.

Per offered rate: a fresh mock partner whose answers take ``~1300 / rate`` seconds, so that about
1,300 payouts are in flight at the partner in steady state (below HttpPartner's 2,000-connection
pool), a fresh service on SQLite, an open-loop load process at the rate (warm-up until the
partner is full, then the measured window); then the bare FastAPI app at the same rate.

``--repeat N`` (default 3, 1 with ``--quick``) runs every rate N times (interleaved, each on a
fresh partner, service and store) and reports the medians with min/max; ``--rates`` and
``--storage sqlite|memory|postgres`` (a fresh schema of ``RP_TEST_POSTGRES_URL``) change what runs;
``--compare BASE.json`` then prints new/old ratios against an earlier ``latency.json``.
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from . import _stack, report
from ._common import (
    MachineWatch,
    add_repeat_options,
    cpu_seconds,
    machine_text,
    percentile,
    refused,
    repeats,
    run_loadgen,
    spread_text,
    storage_url,
    summarize,
    write_json,
)
from ._stack import Proc, Stack, get_json, start_bare, start_partner, start_service

NAME = "latency"
IN_FLIGHT_TARGET = 1300


def _summary(lat: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(lat, 0.50),
        "p90_ms": percentile(lat, 0.90),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": max(lat, default=0.0),
    }


def _poll_in_flight(partner: Proc, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    while not stop.wait(0.5):
        try:
            s = get_json(f"{partner.url}/_mock/stats")
        except Exception:
            continue
        samples.append((time.perf_counter(), s["posts_total"] - sum(s["answers"].values())))


def run_level(
    rate: float, duration: float, target: int, work: Path, bare: Proc, storage: str = "sqlite"
) -> dict[str, Any]:
    """One offered rate: service (warm-up + window) then the bare endpoint."""
    with storage_url(storage, work / f"latency-{rate:g}.db") as url:
        level = _run_level(rate, duration, target, work, bare, url)
    return {"storage": storage, **level}


def _run_level(
    rate: float, duration: float, target: int, work: Path, bare: Proc, url: str
) -> dict[str, Any]:
    mean = target / rate
    warmup = 1.1 * mean + 1.0
    stack = Stack()
    try:
        partner = stack.add(
            start_partner(
                work,
                1.0,
                answer_delay_min=0.9 * mean,
                answer_delay_max=1.1 * mean,
                p_timeout=0.0,
                p_webhook=0.0,
            )
        )
        service = stack.add(start_service(work, partner, bare, url))
        stack.procs.reverse()  # stop the service before the partner
        samples: list[tuple[float, int]] = []
        halt = threading.Event()
        poller = threading.Thread(target=_poll_in_flight, args=(partner, halt, samples))
        t0 = time.perf_counter()
        cpu0 = cpu_seconds(service.pid)
        poller.start()
        svc = run_loadgen(
            [
                *("--port", str(service.port), "--rate", str(rate)),
                *("--duration", str(warmup + duration), "--skip", str(warmup)),
                *("--prefix", f"lat{rate:g}"),
            ],
            work / "loadgen.json",
            work / "loadgen.log",
        )
        cpu1 = cpu_seconds(service.pid)
        halt.set()
        poller.join()
    finally:
        stack.stop_all()
    window = [n for t, n in samples if t - t0 >= warmup]
    cpu_b0 = cpu_seconds(bare.pid)
    bare_run = run_loadgen(
        [
            *("--port", str(bare.port), "--rate", str(rate)),
            *("--duration", str(duration + 1.0), "--skip", "1"),
            *("--prefix", f"bare{rate:g}"),
        ],
        work / "loadgen.json",
        work / "loadgen.log",
    )
    cpu_b1 = cpu_seconds(bare.pid)
    s, b = _summary(svc["latencies_ms"]), _summary(bare_run["latencies_ms"])
    return {
        "rate": rate,
        "partner_answer_delay_s": [0.9 * mean, 1.1 * mean],
        "warmup_s": warmup,
        "window_s": duration,
        "in_flight_at_partner": {
            "min": min(window, default=0),
            "mean": sum(window) / len(window) if window else 0,
            "max": max(window, default=0),
        },
        "service": {
            **s,
            **{k: svc[k] for k in ("sent", "measured", "errors", "statuses", "achieved_rate")},
            "cpu_s": cpu1 - cpu0,
            "latencies_ms": svc["latencies_ms"],
        },
        "bare": {
            **b,
            **{k: bare_run[k] for k in ("sent", "measured", "errors", "statuses")},
            "cpu_s": cpu_b1 - cpu_b0,
            "latencies_ms": bare_run["latencies_ms"],
        },
        "p50_ratio": s["p50_ms"] / b["p50_ms"] if b["p50_ms"] else None,
        "p99_ratio": s["p99_ms"] / b["p99_ms"] if b["p99_ms"] else None,
    }


def _line(level: dict[str, Any], label: str) -> str:
    def f(key: str, spec: str = ".1f") -> str:
        return spread_text(level, key, spec)

    s, b = level["service"], level["bare"]
    return (
        f"latency {level['rate']:>6g}/s {level['storage']} {label}: service p50 "
        f"{f('service.p50_ms')} ms p99 {f('service.p99_ms')} ms | bare p50 {f('bare.p50_ms')} ms "
        f"p99 {f('bare.p99_ms')} ms | ratio p50 {f('p50_ratio', '.2f')} p99 "
        f"{f('p99_ratio', '.2f')} | in flight {level['in_flight_at_partner']['mean']:.0f} "
        f"| errors {s['errors']}/{b['errors']}{refused(s['statuses'])}"
    )


def run(
    out: Path,
    quick: bool = False,
    repeat: int | None = None,
    storage: str = "sqlite",
    rates: list[float] | None = None,
) -> dict[str, Any]:
    """Every rate ``repeat`` times (interleaved); prints a line per run and the medians, writes
    ``latency.json``."""
    if rates is None:
        rates = [100.0, 300.0] if quick else [100.0, 300.0, 1000.0]
    duration = 2.0 if quick else 10.0
    target = 150 if quick else IN_FLIGHT_TARGET
    count = repeats(repeat, quick)
    work = out / "work" / NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs: dict[float, list[dict[str, Any]]] = {rate: [] for rate in rates}
    bare_stack = Stack()
    with MachineWatch(uses=("postgres",) if storage == "postgres" else ()) as watch:
        try:
            bare = bare_stack.add(start_bare(work))
            for i in range(count):
                for rate in rates:
                    window = duration if rate < 1000 else duration / 2
                    level = run_level(rate, window, target, work, bare, storage)
                    runs[rate].append(level)
                    print(_line(level, f"run {i + 1}/{count}"), flush=True)
        finally:
            bare_stack.stop_all()
    levels = [summarize(rs, "service.p99_ms") for rs in runs.values()]
    if count > 1:
        for level in levels:
            print(_line(level, f"median of {count}"), flush=True)
    print(machine_text(watch.result), flush=True)
    data = {
        "scenario": NAME,
        "quick": quick,
        "repeat": count,
        "storage": storage,
        "machine": watch.result,
        "levels": levels,
    }
    write_json(out, NAME, data)
    return data


def _options(ap: argparse.ArgumentParser) -> None:
    add_repeat_options(ap)
    ap.add_argument("--storage", default="sqlite", choices=["sqlite", "memory", "postgres"])
    ap.add_argument("--rates", default=None, help="comma-separated offered rates per second")


def _cli(out: Path, quick: bool, ns: argparse.Namespace) -> None:
    rates = [float(r) for r in ns.rates.split(",")] if ns.rates else None
    data = run(out, quick, ns.repeat, ns.storage, rates)
    if ns.compare:
        report.print_compare(ns.compare, data, ns.threshold)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.latency [--quick] [--repeat N] [--rates R,R] [--storage S]
    [--out DIR] [--compare BASE.json] [--whatif OPTIONS]``."""
    return _stack.scenario_main(__doc__, _cli, argv, _options)


if __name__ == "__main__":
    raise SystemExit(main())
