"""``python -m benchmarks.report [--out DIR]``: ``DIR/report.md`` and PNG plots from the JSON.

``python -m benchmarks.report --compare BASE.json NEW.json [--threshold F]``: new/old ratios of
every figure in both files of one benchmark, regressions beyond the threshold flagged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._common import spread_text as _r

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
        s, rate = level["service"], level["rate"]
        gated = rate == 300
        lines.append(
            f"| latency {rate:g}/s | POST p50 / p99 service vs bare (ms) | "
            f"{_r(level, 'service.p50_ms')} / {_r(level, 'service.p99_ms')} vs "
            f"{_r(level, 'bare.p50_ms')} / {_r(level, 'bare.p99_ms')} | | |"
        )
        ok50 = level["p50_ratio"] is not None and level["p50_ratio"] <= TARGETS["p50_ratio"]
        ok99 = level["p99_ratio"] is not None and level["p99_ratio"] <= TARGETS["p99_ratio"]
        lines.append(
            f"| latency {rate:g}/s | ratio p50 / p99 | {_r(level, 'p50_ratio', '.2f')} / "
            f"{_r(level, 'p99_ratio', '.2f')} | {'≤ 1.3 / ≤ 2' if gated else '—'} | "
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
            f"| {_r(r, 'resolved_per_s', '.0f')} | {'≥ 500' if sql else '—'} | "
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
            f"{_r(r, 'cpu_per_payout_ms', '.2f')} vs {_r(r, 'bare_cpu_per_request_ms', '.3f')} "
            f"= {_r(r, 'cpu_ratio')}x | ≤ 4x | {_mark(ok)} |"
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
    backends = _load(out, "backends")
    lines = ["# Benchmark report", ""]
    for name, d in {**data, "backends": backends}.items():
        if d:
            m = d["machine"]
            after = f", {m['loadavg_after']} after" if "loadavg_after" in m else ""
            n = d.get("repeat", 1)
            lines.append(
                f"- {name}: {m.get('at', '?')}, {m['cpus']} CPUs, load average "
                f"{m.get('loadavg', '?')} at start{after}{' (quick)' if d.get('quick') else ''}"
                + (f", median of {n} runs per level" if n > 1 else "")
            )
            if m.get("busy"):
                lines.append(f"  - **BUSY MACHINE**: {'; '.join(m['busy'])}")
    lines += [
        "",
        "Other jobs may share the machine: compare the load averages. With repeats, a figure is"
        " the median (min-max) of the runs.",
        "",
    ]
    lines += ["## Figures", "", *_figures(data), ""]
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


# -- before/after --------------------------------------------------------------------------------

_NOT_FIGURES = frozenset(
    {"machine", "spread", "runs", "repeats", "quick", "scenario", "lag_series", "points"}
)
"""Keys whose numbers are not results: the machine, the per-run detail, plot series."""
_SETTINGS = frozenset(
    {
        "rate", "payouts", "concurrency", "partner_time_scale", "window_s", "warmup_s", "n",
        "time_scale", "max_concurrent_work", "repeat", "hold_s", "in_flight_target", "sent",
        "measured", "samples", "budget_rate", "budget_burst_plus_rate", "partner_limit",
    }
)  # fmt: skip
"""What the run was asked to do: the same in both runs unless the settings changed."""
_IDENTITY = ("storage", "rate", "name", "backend", "label")
"""The field that names an element of a list of results (a level, a storage), in this order."""


def figures(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every result figure of a benchmark's JSON as ``(dotted path, value)``; a list of results
    is keyed by each element's identity (``levels.rate=300.service.p99_ms``), lists of numbers
    (samples) are left out."""
    for k, v in data.items():
        if k in _NOT_FIGURES or k in _SETTINGS:
            continue
        path = f"{prefix}{k}"
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int | float):
            yield path, float(v)
        elif isinstance(v, dict):
            yield from figures(v, path + ".")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, item in enumerate(v):
                ident = next(
                    (
                        f"{f}={item[f]:g}" if isinstance(item[f], float) else f"{f}={item[f]}"
                        for f in _IDENTITY
                        if f in item
                    ),
                    str(i),
                )
                yield from figures(item, f"{path}.{ident}.")


def better(path: str) -> int:
    """+1 if a larger value of this figure is better, -1 if smaller is, 0 if neither."""
    leaf = path.rsplit(".", 1)[-1].lower()
    if "cpu_utilisation" in path or leaf.isdigit():  # cores busy, status counts: neither
        return 0
    if "per_s" in leaf or leaf in ("achieved_rate", "resolved", "correct", "final"):
        return 1
    if leaf.endswith("share"):
        return 1
    lower = ("_ms", "_s", "cpu", "ratio", "rss", "errors", "lag", "bytes", "double", "blocks")
    if leaf.endswith(lower[:2]) or any(w in leaf for w in lower[2:]):
        return -1
    return 0


def compare(
    old: dict[str, Any], new: dict[str, Any], threshold: float = 0.15
) -> tuple[list[str], list[str]]:
    """Console lines comparing two JSONs of one benchmark, and the regressed figures' paths.

    A figure regressed if it moved in its worse direction (:func:`better`) by more than
    ``threshold`` (a fraction of the old value), or from 0 to more for a smaller-is-better one.
    """
    before = dict(figures(old))
    after = dict(figures(new))
    common = [k for k in after if k in before]
    width = max((len(k) for k in common), default=10)
    lines = [f"{'figure':<{width}}  {'old':>10}  {'new':>10}  new/old"]
    regressed = []
    for key in common:
        o, n = before[key], after[key]
        ratio = n / o if o else None
        sign = better(key)
        worse = sign != 0 and (
            (ratio is not None and (ratio - 1) * sign < -threshold)
            or (ratio is None and sign < 0 and n > o)
        )
        improved = sign != 0 and ratio is not None and (ratio - 1) * sign > threshold
        flag = "  REGRESSION" if worse else ("  better" if improved else "")
        text = f"{ratio:7.2f}" if ratio is not None else ("    n/a" if n != o else "   1.00")
        lines.append(f"{key:<{width}}  {o:>10.4g}  {n:>10.4g}  {text}{flag}")
        if worse:
            regressed.append(key)
    changed = [
        f"{k} {old[k]} -> {new[k]}"
        for k in sorted(_SETTINGS | {"quick", "repeat", "storage"})
        if k in old and k in new and old[k] != new[k] and not isinstance(old[k], dict | list)
    ]
    if changed:
        lines.append("settings differ: " + ", ".join(changed))
    for label, d in (("old", old), ("new", new)):
        busy = d.get("machine", {}).get("busy")
        if busy:
            lines.append(f"BUSY MACHINE ({label} run): " + "; ".join(busy))
    lines.append(
        f"{len(common)} figures in both; "
        + (
            f"{len(regressed)} worse by more than {threshold:.0%}: {', '.join(regressed)}"
            if regressed
            else f"none worse by more than {threshold:.0%}"
        )
    )
    return lines, regressed


def load(path: Path) -> dict[str, Any]:
    """A benchmark's JSON file."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def print_compare(
    base: Path | dict[str, Any], new: dict[str, Any], threshold: float, label: object = None
) -> list[str]:
    """Print :func:`compare` of ``base`` (a JSON file or its data) against ``new``; returns the
    regressed figures."""
    lines, regressed = compare(load(base) if isinstance(base, Path) else base, new, threshold)
    print(f"== {new.get('scenario', 'new')} compared with {label or base}")
    print("\n".join(lines), flush=True)
    return regressed


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report [--out DIR]`` or ``--compare BASE.json NEW.json``."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument(
        "--compare", nargs=2, type=Path, metavar=("BASE.json", "NEW.json"), default=None
    )
    ap.add_argument("--threshold", type=float, default=0.15)
    ns = ap.parse_args(argv)
    if ns.compare:
        base, new = ns.compare
        print_compare(base, load(new), ns.threshold)
        return 0
    print(f"wrote {write(ns.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
