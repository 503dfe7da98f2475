"""Scenario 1: answer latency of ``POST /transaction`` under load, service vs a bare endpoint.

Per offered rate: a fresh mock partner whose answers take ``~1300 / rate`` seconds, so that about
1,300 payouts are in flight at the partner in steady state (below HttpPartner's 2,000-connection
pool), a fresh service on SQLite, an open-loop load process at the rate (warm-up until the
partner is full, then the measured window); then the bare FastAPI app at the same rate.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from . import _stack
from ._common import cpu_seconds, machine, percentile, run_loadgen, write_json
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


def run_level(rate: float, duration: float, target: int, work: Path, bare: Proc) -> dict[str, Any]:
    """One offered rate: service (warm-up + window) then the bare endpoint."""
    mean = target / rate
    warmup = 1.1 * mean + 1.0
    stack = Stack()
    db = work / f"latency-{rate:g}.db"
    db.unlink(missing_ok=True)
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
        service = stack.add(start_service(work, partner, bare, f"sqlite:///{db}"))
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


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    """Every rate; prints a line per rate and writes ``latency.json``."""
    rates = [100.0, 300.0] if quick else [100.0, 300.0, 1000.0]
    duration = 2.0 if quick else 10.0
    target = 150 if quick else IN_FLIGHT_TARGET
    work = out / "work" / NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    levels = []
    started = machine()
    bare_stack = Stack()
    try:
        bare = bare_stack.add(start_bare(work))
        for rate in rates:
            level = run_level(rate, duration if rate < 1000 else duration / 2, target, work, bare)
            levels.append(level)
            s, b = level["service"], level["bare"]
            print(
                f"latency {rate:>6g}/s  service p50 {s['p50_ms']:7.1f} ms p99 {s['p99_ms']:8.1f} ms"
                f" | bare p50 {b['p50_ms']:6.1f} ms p99 {b['p99_ms']:7.1f} ms"
                f" | ratio p50 {level['p50_ratio']:.2f} p99 {level['p99_ratio']:.2f}"
                f" | in flight {level['in_flight_at_partner']['mean']:.0f}"
                f" | errors {s['errors']}/{b['errors']}",
                flush=True,
            )
    finally:
        bare_stack.stop_all()
    data = {"scenario": NAME, "quick": quick, "machine": started, "levels": levels}
    write_json(out, NAME, data)
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.latency [--quick] [--out DIR] [--whatif OPTIONS]``."""
    return _stack.scenario_main(__doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
