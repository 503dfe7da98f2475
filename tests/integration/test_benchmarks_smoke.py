"""The benchmark runner's quick mode runs and writes its JSON files (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_scale_and_reconciliation(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--scenarios",
            "scale,reconciliation",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    scale = json.loads((out / "scale.json").read_text())
    assert {"in_flight", "rss_per_payout_bytes", "lag_hold", "lag_ramp", "points"} <= set(scale)
    assert {"p50_ms", "p99_ms", "max_ms", "samples"} <= set(scale["lag_hold"])
    assert scale["in_flight"] > 0

    rec = json.loads((out / "reconciliation.json").read_text())
    assert {"report", "targets", "checks_per_second", "budget_rate"} <= set(rec)
    assert rec["report"]["payouts"] == rec["report"]["final"]
    assert sum(rec["checks_per_second"]) == rec["report"]["checks_total"]

    report = (out / "report.md").read_text()
    assert "## Figures" in report
    if importlib.util.find_spec("matplotlib") is not None:  # the plots need the bench extra
        assert (out / "checks_per_second.png").exists()
        assert (out / "memory_vs_in_flight.png").exists()
