"""``python -m benchmarks.report [--out DIR]``: ``DIR/report.md`` and PNG plots from the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGETS = {
    "p50_ratio": 1.3,
    "p99_ratio": 2.0,
    "resolved_per_s": 500.0,
    "cpu_ratio": 4.0,
    "rss_kib": 10.0,
    "lag_p99_ms": 20.0,
}


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _plots(out: Path, data: dict[str, dict[str, Any] | None]) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): report without plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    lat = data["latency"]
    if lat and lat["levels"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, level in enumerate(lat["levels"]):
            color = f"C{i}"
            for kind, style in (("service", "-"), ("bare", "--")):
                xs, ys = _cdf(level[kind]["latencies_ms"])
                if xs:
                    label = f"{kind} {level['rate']:g}/s"
                    ax.plot(xs, ys, style, color=color, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("POST /transaction latency (ms, from the scheduled send)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("Answer latency CDF: service (SQLite) vs bare endpoint")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.savefig(out / "latency_cdf.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append("latency_cdf.png")
    tp = data["throughput"]
    if tp and tp["results"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in tp["results"]:
            xs, ys = _cdf(r["time_to_final_ms"])
            if xs:
                ax.plot(xs, ys, label=f"{r['storage']} ({r['resolved_per_s']:.0f} payouts/s)")
        ax.set_xscale("log")
        ax.set_xlabel("time to final: first POST to the pushed outcome (ms)")
        ax.set_ylabel("fraction of payouts")
        ax.set_title(f"Time to final, partner time scale {tp['partner_time_scale']:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.savefig(out / "time_to_final_cdf.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append("time_to_final_cdf.png")
    rec = data["reconciliation"]
    if rec:
        series = rec["checks_per_second"]
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.step(range(len(series)), series, where="post", linewidth=0.7, label="checks sent")
        ax.axhline(rec["budget_rate"], color="C2", linestyle="--", label="budget rate")
        ax.axhline(rec["budget_burst_plus_rate"], color="C1", linestyle="--", label="burst + rate")
        ax.axhline(rec["partner_limit"], color="C3", linestyle=":", label="partner limit")
        ax.set_xlabel("simulated second")
        ax.set_ylabel("status checks")
        ax.set_title("Status checks per second (reconciliation simulation)")
        ax.legend(loc="upper right")
        fig.savefig(out / "checks_per_second.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append("checks_per_second.png")
    sc = data["scale"]
    if sc:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        xs = [p["in_flight"] for p in sc["points"]]
        ys = [p["rss_kib"] / 1024 for p in sc["points"]]
        ax1.plot(xs, ys, "o-")
        ax1.set_xlabel("payouts in flight")
        ax1.set_ylabel("RSS (MiB)")
        ax1.set_title(f"Memory: {sc['rss_per_payout_bytes'] / 1024:.2f} KiB per in-flight payout")
        ax1.grid(True, alpha=0.3)
        t = [p[0] for p in sc["lag_series"]]
        lag = [p[1] for p in sc["lag_series"]]
        ax2.plot(t, lag, linewidth=0.6)
        ax2.axhline(TARGETS["lag_p99_ms"], color="C3", linestyle=":", label="target p99")
        ax2.set_yscale("symlog", linthresh=1)
        ax2.set_ylim(bottom=0)
        ax2.set_xlabel("seconds since the ramp started")
        ax2.set_ylabel("10 ms sleep overshoot (ms)")
        ax2.set_title("Event-loop lag: ramp, hold, drain")
        ax2.legend()
        fig.savefig(out / "memory_vs_in_flight.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        made.append("memory_vs_in_flight.png")
    return made


def _figures(data: dict[str, dict[str, Any] | None]) -> list[str]:
    lines = ["| scenario | figure | measured | target | |", "| --- | --- | --- | --- | --- |"]
    lat = data["latency"]
    for level in lat["levels"] if lat else []:
        s, b, rate = level["service"], level["bare"], level["rate"]
        gated = rate == 300
        lines.append(
            f"| latency {rate:g}/s | POST p50 / p99 service vs bare (ms) | "
            f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} vs {b['p50_ms']:.1f} / {b['p99_ms']:.1f} "
            f"| | |"
        )
        ok50 = level["p50_ratio"] is not None and level["p50_ratio"] <= TARGETS["p50_ratio"]
        ok99 = level["p99_ratio"] is not None and level["p99_ratio"] <= TARGETS["p99_ratio"]
        lines.append(
            f"| latency {rate:g}/s | ratio p50 / p99 | {level['p50_ratio']:.2f} / "
            f"{level['p99_ratio']:.2f} | {'≤ 1.3 / ≤ 2' if gated else '—'} | "
            f"{(_mark(ok50) + ' / ' + _mark(ok99)) if gated else ''} |"
        )
        inf = level["in_flight_at_partner"]
        lines.append(
            f"| latency {rate:g}/s | in flight at partner (min/mean/max), errors | "
            f"{inf['min']}/{inf['mean']:.0f}/{inf['max']}, {s['errors']} (of {s['sent']}) | "
            f"> 1,000 | {_mark(inf['min'] > 1000)} |"
        )
    tp = data["throughput"]
    for r in tp["results"] if tp else []:
        sql = r["storage"] == "sqlite"
        ok = r["resolved_per_s"] >= TARGETS["resolved_per_s"]
        lines.append(
            f"| end-to-end {r['storage']} | payouts/s resolved ({r['resolved']}/{r['payouts']}) "
            f"| {r['resolved_per_s']:.0f} | {'≥ 500' if sql else '—'} | "
            f"{_mark(ok) if sql else ''} |"
        )
        lines.append(
            f"| end-to-end {r['storage']} | time to final p50 / p99 (ms) | "
            f"{r['time_to_final_p50_ms']:.0f} / {r['time_to_final_p99_ms']:.0f} | | |"
        )
        if "cpu_utilisation" in r:
            busy = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_utilisation"].items())
            lines.append(f"| end-to-end {r['storage']} | cores busy during the run | {busy} | | |")
        ok = r["cpu_ratio"] is not None and r["cpu_ratio"] <= TARGETS["cpu_ratio"]
        lines.append(
            f"| end-to-end {r['storage']} | CPU per payout vs bare round trip (ms) | "
            f"{r['cpu_per_payout_ms']:.2f} vs {r['bare_cpu_per_request_ms']:.3f} = "
            f"{r['cpu_ratio']:.1f}x | ≤ 4x | {_mark(ok)} |"
        )
    sc = data["scale"]
    if sc:
        kib = sc["rss_per_payout_bytes"] / 1024
        lines.append(
            f"| scale | RSS per in-flight payout ({sc['in_flight']} in flight) | {kib:.2f} KiB | "
            f"≤ 10 KB | {_mark(sc['rss_per_payout_bytes'] <= 10_000)} |"
        )
        for phase in ("hold", "ramp", "drain"):
            lag = sc[f"lag_{phase}"]
            gated = phase == "hold"
            lines.append(
                f"| scale | loop lag p50 / p99 / max, {phase} (ms) | {lag['p50_ms']:.2f} / "
                f"{lag['p99_ms']:.2f} / {lag['max_ms']:.1f} | {'p99 ≤ 20' if gated else '—'} | "
                f"{_mark(lag['p99_ms'] <= TARGETS['lag_p99_ms']) if gated else ''} |"
            )
    rec = data["reconciliation"]
    if rec:
        r = rec["report"]
        lines.append(
            f"| reconciliation | final / correct / double payments / blocks | "
            f"{r['final']}/{r['correct']} / {r['double_payments']} / {r['blocks']} | "
            f"all / 0 / 0 | {_mark(r['correct'] == r['payouts'] and not r['blocks'])} |"
        )
        lines.append(
            f"| reconciliation | most checks in any 1 s (budget) | {r['max_checks_in_any_1s']} "
            f"({r['budget_per_1s']:g}) | ≤ budget | "
            f"{_mark(r['max_checks_in_any_1s'] <= r['budget_per_1s'])} |"
        )
        lines.append(
            f"| reconciliation | detection p50 / bound | {r['detection_delay_p50']:.1f} s / "
            f"{r['bound_p50']:.2f} s = {r['p50_over_bound']:.2f} | ≤ 1.25 | "
            f"{_mark(r['p50_over_bound'] <= 1.25)} |"
        )
        lines.append(
            f"| reconciliation | resolved with zero checks | {r['zero_check_share']:.1%} | ≥ 95% "
            f"(capped at 1 - p_uncertain) | {_mark(r['zero_check_share'] >= 0.95)} |"
        )
    return lines


def write(out: Path) -> Path:
    """Write ``out/report.md`` (and the plots) from whatever JSON files are there."""
    names = ("latency", "throughput", "scale", "reconciliation")
    data = {name: _load(out, name) for name in names}
    lines = ["# Benchmark report", ""]
    for name, d in data.items():
        if d:
            m = d["machine"]
            lines.append(
                f"- {name}: {m['at']}, {m['cpus']} CPUs, load average {m['loadavg']} at start"
                f"{' (quick)' if d.get('quick') else ''}"
            )
    lines += ["", "Other jobs may share the machine: compare the load averages.", ""]
    lines += ["## Figures", "", *_figures(data), ""]
    backends = _load(out, "backends")
    if backends:
        lines += ["## Backends", "", "See `backends.json`.", ""]
    plots = _plots(out, data)
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots]
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report [--out DIR]``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ns = ap.parse_args(argv)
    print(f"wrote {write(ns.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
