"""``python -m benchmarks [--quick] [--scenarios a,b] [--out bench-results] [--repeat N]
[--compare BASE_DIR]`` (``make bench``).

Runs each scenario in its own process (so one's memory and threads do not colour another's
figures), then writes ``OUT/report.md`` with plots (:mod:`benchmarks.report`). ``--repeat`` goes
to the scenarios that repeat their levels (:data:`REPEATABLE`); ``--compare`` compares each
``OUT/<scenario>.json`` with ``BASE_DIR/<scenario>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from . import report
from ._common import SUITE_LOADAVG_ENV

SCENARIOS = ("reconciliation", "scale", "throughput", "latency", "listing", "overload")
OPTIONAL = ("backends",)  # a sibling's module, run if present
REPEATABLE = ("throughput", "latency", "scale", "backends")
"""Scenarios with ``--repeat N`` (median of N runs per level); the others measure once
(reconciliation is deterministic) or repeat in their own way (listing's ``--repeat``)."""


def _run(name: str, out: Path, quick: bool, repeat: int | None = None) -> int:
    flags = ["--out", str(out), *(["--quick"] if quick else [])]
    if repeat is None and quick and name == "backends":  # it has no --quick
        repeat = 1
    rep = ["--repeat", str(repeat)] if repeat is not None and name in REPEATABLE else []
    flags += rep
    if name == "backends":  # its own options: --n, --json
        argv_b = ["--json", str(out / "backends.json"), *(["--n", "200"] if quick else []), *rep]
        code = f"import sys; from benchmarks.{name} import main; sys.exit(main({argv_b!r}))"
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "-m", f"benchmarks.{name}", *flags]
    return subprocess.call(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, then the report; exit 1 if a scenario failed."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small and short (about 30 s each)")
    ap.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS + OPTIONAL),
        help="comma-separated subset of %(default)s",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--no-report", action="store_true", help="only the JSON files")
    ap.add_argument("--repeat", type=int, default=None, help="runs per level (default 3, quick 1)")
    ap.add_argument("--compare", type=Path, default=None, metavar="BASE_DIR")
    ap.add_argument("--threshold", type=float, default=0.15, help="--compare: flag beyond this")
    ns = ap.parse_args(argv)
    wanted = [s.strip() for s in ns.scenarios.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS + OPTIONAL]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    ns.out.mkdir(parents=True, exist_ok=True)
    # Read first: OUT may be BASE_DIR.
    bases = {
        name: report.load(ns.compare / f"{name}.json")
        for name in wanted
        if ns.compare and (ns.compare / f"{name}.json").exists()
    }
    # What the suite found, not what its first scenarios left in the load average.
    os.environ[SUITE_LOADAVG_ENV] = ",".join(f"{x:.2f}" for x in os.getloadavg())
    failed = []
    for name in wanted:
        if name in OPTIONAL and importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"== {name}: benchmarks/{name}.py not present, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        code = _run(name, ns.out, ns.quick, ns.repeat)
        print(f"== {name}: exit {code} in {time.perf_counter() - t0:.1f} s", flush=True)
        if code != 0:
            failed.append(name)
    for name, base in bases.items():
        new = ns.out / f"{name}.json"
        if new.exists():
            report.print_compare(base, report.load(new), ns.threshold, ns.compare / new.name)
    if not ns.no_report:
        path = report.write(ns.out)
        print(f"wrote {path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
