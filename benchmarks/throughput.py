"""Scenario 2: end-to-end throughput and CPU time per payout.

The mock partner's delays are scaled to near zero (``time_scale`` 0.001, no 504s); the service
runs on SQLite and on memory storage; a closed-loop load process (64 workers) submits N payouts,
each with ``Prefer: wait=10`` so that a worker moves on once its payout is final (at most 64
payouts open: capacity, not an ever-growing backlog), and the bare app (the app backend) records
each pushed outcome. Resolved/s counts from the first submit to the
last push. CPU time is the service process's utime+stime (all threads) per payout, compared with
the bare app's CPU time per request round trip at the same concurrency.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from . import _stack
from ._common import cpu_seconds, machine, percentile, run_loadgen, write_json
from ._stack import Stack, get_json, post, start_bare, start_partner, start_service

NAME = "throughput"
PARTNER_SCALE = 0.001
CONCURRENCY = 64


def _wait_pushes(sink_url: str, count: int, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = get_json(f"{sink_url}/_pushes")
        if got["count"] >= count or time.monotonic() > deadline:
            return dict(got["times"])
        time.sleep(0.2)


def run_storage(storage: str, n: int, work: Path) -> dict[str, Any]:
    """One storage backend: warm-up, then N payouts, then the bare round trips."""
    stack = Stack()
    try:
        sink = stack.add(start_bare(work))
        partner = stack.add(start_partner(work, PARTNER_SCALE, p_timeout=0.0))
        service = stack.add(start_service(work, partner, sink, storage))
        stack.procs.reverse()
        lg = work / "loadgen.json"
        log = work / "loadgen.log"
        tag = storage.split(":")[0]
        warm = max(100, n // 10)
        run_loadgen(
            [
                *("--port", str(service.port), "--count", str(warm), "--prefix", f"warm-{tag}"),
                *("--prefer-wait", "10"),
            ],
            lg,
            log,
        )
        _wait_pushes(sink.url, warm, 30)
        post(f"{sink.url}/_pushes/reset")
        cpu0 = cpu_seconds(service.pid)
        others0 = {p.name: cpu_seconds(p.pid) for p in (partner, sink)}
        t0 = time.time()
        load = run_loadgen(
            [
                *("--port", str(service.port), "--count", str(n)),
                *("--concurrency", str(CONCURRENCY), "--prefix", f"tp-{tag}", "--record-ids"),
                *("--prefer-wait", "10"),
            ],
            lg,
            log,
        )
        pushes = _wait_pushes(sink.url, n, 120)
        cpu1 = cpu_seconds(service.pid)
        others = {p.name: cpu_seconds(p.pid) - others0[p.name] for p in (partner, sink)}
        wall = time.time() - t0
        partner_stats = get_json(f"{partner.url}/_mock/stats")
        post(f"{sink.url}/_pushes/reset")
        bare_cpu0 = cpu_seconds(sink.pid)
        bare = run_loadgen(
            [
                *("--port", str(sink.port), "--count", str(n)),
                *("--concurrency", str(CONCURRENCY), "--prefix", f"bare-{tag}"),
            ],
            lg,
            log,
        )
        bare_cpu1 = cpu_seconds(sink.pid)
    finally:
        stack.stop_all()
    sent_at: dict[str, float] = load["sent_at"]
    finals = [pushes[k] - sent_at[k] for k in sent_at if k in pushes]
    resolved = [pushes[k] for k in sent_at if k in pushes]
    span = (max(resolved) - t0) if resolved else 0.0
    cpu_per = (cpu1 - cpu0) / n
    bare_per = (bare_cpu1 - bare_cpu0) / n
    return {
        "storage": tag,
        "payouts": n,
        "resolved": len(resolved),
        "errors": load["errors"],
        "statuses": load["statuses"],
        "resolved_per_s": len(resolved) / span if span else 0.0,
        "accepted_per_s": load["achieved_rate"],
        "answer_p50_ms": percentile(load["latencies_ms"], 0.5),
        "answer_p99_ms": percentile(load["latencies_ms"], 0.99),
        "time_to_final_p50_ms": 1000 * percentile(finals, 0.5),
        "time_to_final_p99_ms": 1000 * percentile(finals, 0.99),
        "time_to_final_ms": sorted(round(1000 * x, 2) for x in finals),
        "service_cpu_s": cpu1 - cpu0,
        "cpu_per_payout_ms": 1000 * cpu_per,
        "bare_cpu_per_request_ms": 1000 * bare_per,
        "cpu_ratio": cpu_per / bare_per if bare_per else None,
        "bare_requests_per_s": bare["achieved_rate"],
        "cpu_utilisation": {
            "service": (cpu1 - cpu0) / wall,
            **{name: cpu / wall for name, cpu in others.items()},
        },
        "partner": {k: partner_stats[k] for k in ("posts_total", "webhooks_sent", "answers")},
    }


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    """SQLite then memory; prints a line each and writes ``throughput.json``."""
    n = 400 if quick else 3000
    work = out / "work" / NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = []
    started = machine()
    for storage in (f"sqlite:///{work / 'tp.db'}", "memory://"):
        r = run_storage(storage, n, work)
        results.append(r)
        print(
            f"throughput {r['storage']:>6}: {r['resolved_per_s']:6.0f} payouts/s resolved "
            f"({r['resolved']}/{r['payouts']}), accepted {r['accepted_per_s']:.0f}/s, "
            f"final p50 {r['time_to_final_p50_ms']:.0f} ms | CPU {r['cpu_per_payout_ms']:.2f} ms"
            f"/payout vs bare {r['bare_cpu_per_request_ms']:.2f} ms/request "
            f"= {r['cpu_ratio']:.1f}x | cores busy: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_utilisation"].items()),
            flush=True,
        )
    data = {
        "scenario": NAME,
        "quick": quick,
        "machine": started,
        "partner_time_scale": PARTNER_SCALE,
        "concurrency": CONCURRENCY,
        "results": results,
    }
    write_json(out, NAME, data)
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.throughput [--quick] [--out DIR] [--whatif OPTIONS]``."""
    return _stack.scenario_main(__doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
