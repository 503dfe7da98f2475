"""``python -m benchmarks [--quick] [--scenarios a,b] [--out bench-results]`` (``make bench``).

Runs each scenario in its own process (so one's memory and threads do not colour another's
figures), then writes ``OUT/report.md`` with plots (:mod:`benchmarks.report`).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

from . import report

SCENARIOS = ("reconciliation", "scale", "throughput", "latency", "listing")
OPTIONAL = ("backends",)  # a sibling's module, run if present


def _run(name: str, out: Path, quick: bool) -> int:
    flags = ["--out", str(out), *(["--quick"] if quick else [])]
    if name == "backends":  # its own options: --n, --json
        argv_b = ["--json", str(out / "backends.json"), *(["--n", "200"] if quick else [])]
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
    ns = ap.parse_args(argv)
    wanted = [s.strip() for s in ns.scenarios.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS + OPTIONAL]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    ns.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in wanted:
        if name in OPTIONAL and importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"== {name}: benchmarks/{name}.py not present, skipped", flush=True)
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        code = _run(name, ns.out, ns.quick)
        print(f"== {name}: exit {code} in {time.perf_counter() - t0:.1f} s", flush=True)
        if code != 0:
            failed.append(name)
    if not ns.no_report:
        path = report.write(ns.out)
        print(f"wrote {path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
