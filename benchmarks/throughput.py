"""Scenario 2: end-to-end throughput and CPU time per payout.

The mock partner's delays are scaled to near zero (``time_scale`` 0.001, no 504s); the service
runs on SQLite and on memory storage; a closed-loop load process (64 workers) submits N payouts,
each with ``Prefer: wait=10`` so that a worker moves on once its payout is final (at most 64
payouts open: capacity, not an ever-growing backlog), and the bare app (the app backend) records
each pushed outcome. Resolved/s counts from the first submit to the
last push. CPU time is the service process's utime+stime (all threads) per payout, compared with
the bare app's CPU time per request round trip at the same concurrency.

``--repeat N`` (default 3, 1 with ``--quick``) runs each storage N times, interleaved, each on a
fresh stack and store, and reports the medians with min/max; ``--storages`` picks the backends
(``sqlite,memory`` by default; ``postgres`` runs in a fresh schema of ``RP_TEST_POSTGRES_URL``).
``--compare BASE.json`` then prints new/old ratios against an earlier ``throughput.json``.
"""

from __future__ import annotations

import argparse
import shutil
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


def _accepted(load: dict[str, Any]) -> int:
    return sum(v for k, v in load["statuses"].items() if k.startswith("2"))


def run_storage(storage: str, n: int, work: Path) -> dict[str, Any]:
    """One run on a storage URL: warm-up, then N payouts, then the bare round trips."""
    stack = Stack()
    try:
        sink = stack.add(start_bare(work))
        partner = stack.add(start_partner(work, PARTNER_SCALE, p_timeout=0.0))
        service = stack.add(start_service(work, partner, sink, storage))
        stack.procs.reverse()
        lg = work / "loadgen.json"
        log = work / "loadgen.log"
        tag = "postgres" if storage.startswith("postgres") else storage.split(":")[0]
        warm = max(100, n // 10)
        warm_load = run_loadgen(
            [
                *("--port", str(service.port), "--count", str(warm), "--prefix", f"warm-{tag}"),
                *("--prefer-wait", "10"),
            ],
            lg,
            log,
        )
        _wait_pushes(sink.url, _accepted(warm_load), 30)
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
        # Only accepted payouts are pushed: a refused one (503 overloaded) would hold this for
        # the whole timeout.
        pushes = _wait_pushes(sink.url, _accepted(load), 120)
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
        "payouts_per_s_per_core": len(resolved) / (cpu1 - cpu0) if cpu1 > cpu0 else 0.0,
        "bare_cpu_per_request_ms": 1000 * bare_per,
        "cpu_ratio": cpu_per / bare_per if bare_per else None,
        "bare_requests_per_s": bare["achieved_rate"],
        "cpu_utilisation": {
            "service": (cpu1 - cpu0) / wall,
            **{name: cpu / wall for name, cpu in others.items()},
        },
        "partner": {k: partner_stats[k] for k in ("posts_total", "webhooks_sent", "answers")},
    }


def _line(r: dict[str, Any], label: str) -> str:
    def f(key: str, spec: str) -> str:
        return spread_text(r, key, spec)

    busy = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_utilisation"].items())
    return (
        f"throughput {r['storage']:>8} {label}: {f('resolved_per_s', '.0f')} payouts/s resolved "
        f"({r['resolved']}/{r['payouts']}), accepted {r['accepted_per_s']:.0f}/s, "
        f"final p50 {r['time_to_final_p50_ms']:.0f} ms | CPU {f('cpu_per_payout_ms', '.2f')} "
        f"ms/payout = {f('payouts_per_s_per_core', '.0f')} payouts/s per core | bare "
        f"{f('bare_cpu_per_request_ms', '.3f')} ms/request, ratio {f('cpu_ratio', '.1f')}x "
        f"| cores busy: {busy}{refused(r['statuses'])}"
    )


def run(
    out: Path,
    quick: bool = False,
    repeat: int | None = None,
    storages: tuple[str, ...] = ("sqlite", "memory"),
) -> dict[str, Any]:
    """Each storage ``repeat`` times (interleaved); prints a line per run and the medians, writes
    ``throughput.json``."""
    n = 400 if quick else 3000
    count = repeats(repeat, quick)
    work = out / "work" / NAME
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in storages}
    with MachineWatch(uses=("postgres",) if "postgres" in storages else ()) as watch:
        for i in range(count):
            for name in storages:
                with storage_url(name, work / f"tp-{i}.db") as url:
                    r = run_storage(url, n, work)
                runs[name].append(r)
                print(_line(r, f"run {i + 1}/{count}"), flush=True)
    results = [summarize(rs, "resolved_per_s") for rs in runs.values()]
    if count > 1:
        for r in results:
            print(_line(r, f"median of {count}"), flush=True)
    print(machine_text(watch.result), flush=True)
    data = {
        "scenario": NAME,
        "quick": quick,
        "repeat": count,
        "machine": watch.result,
        "partner_time_scale": PARTNER_SCALE,
        "concurrency": CONCURRENCY,
        "results": results,
    }
    write_json(out, NAME, data)
    return data


def _options(ap: argparse.ArgumentParser) -> None:
    add_repeat_options(ap)
    ap.add_argument("--storages", default="sqlite,memory", help="of sqlite, memory, postgres")


def _cli(out: Path, quick: bool, ns: argparse.Namespace) -> None:
    names = tuple(s.strip() for s in ns.storages.split(",") if s.strip())
    data = run(out, quick, ns.repeat, names)
    if ns.compare:
        report.print_compare(ns.compare, data, ns.threshold)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.throughput [--quick] [--repeat N] [--storages a,b] [--out DIR]
    [--compare BASE.json] [--whatif OPTIONS]``."""
    return _stack.scenario_main(__doc__, _cli, argv, _options)


if __name__ == "__main__":
    raise SystemExit(main())
