"""The benchmark runner's quick mode runs and writes its JSON files, ``--repeat`` reports medians
and ``--compare`` ratios, and the machine record tells other processes from the run's own (no
timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from benchmarks import report
from benchmarks._common import SUITE_LOADAVG_ENV, _read_procs, _Sampler, _verdict, summarize

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str, timeout: float = 80) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_scale_and_reconciliation(tmp_path: Path) -> None:
    out, base = tmp_path / "bench", tmp_path / "base"
    base.mkdir()
    # An earlier run far better than any real one: every comparable figure regresses.
    (base / "scale.json").write_text(
        json.dumps({"scenario": "scale", "rss_per_payout_bytes": 1.0, "lag_hold": {"p99_ms": 1e-6}})
    )
    proc = _bench(
        "benchmarks",
        "--quick",
        "--scenarios",
        "scale,reconciliation",
        "--out",
        str(out),
        "--compare",
        str(base),
    )

    scale = json.loads((out / "scale.json").read_text())
    assert {"in_flight", "rss_per_payout_bytes", "lag_hold", "lag_ramp", "points"} <= set(scale)
    assert {"p50_ms", "p99_ms", "max_ms", "samples"} <= set(scale["lag_hold"])
    assert scale["in_flight"] > 0
    assert scale["repeat"] == 1
    assert len(scale["runs"]) == 1
    machine = scale["machine"]
    assert {"loadavg_before", "loadavg_after", "cpus", "other_processes", "busy"} <= set(machine)
    assert machine["loadavg_suite_start"]
    assert len(machine["loadavg_after"]) == 3
    assert "machine: " in proc.stdout

    assert "== scale compared with" in proc.stdout
    assert "2 figures in both; 2 worse by more than 15%" in proc.stdout
    assert "rss_per_payout_bytes" in proc.stdout
    assert "REGRESSION" in proc.stdout

    rec = json.loads((out / "reconciliation.json").read_text())
    assert {"report", "targets", "checks_per_second", "budget_rate"} <= set(rec)
    assert rec["report"]["payouts"] == rec["report"]["final"]
    assert sum(rec["checks_per_second"]) == rec["report"]["checks_total"]

    text = (out / "report.md").read_text()
    assert "## Figures" in text
    if importlib.util.find_spec("matplotlib") is not None:  # the plots need the bench extra
        assert (out / "checks_per_second.png").exists()
        assert (out / "memory_vs_in_flight.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_backends_repeat_and_compare(tmp_path: Path) -> None:
    first, second = tmp_path / "b1.json", tmp_path / "b2.json"
    common = ["--n", "20", "--backends", "memory,sqlite", "--time-scale", "0.002"]
    proc = _bench("benchmarks.backends", *common, "--repeat", "2", "--json", str(first))
    data = json.loads(first.read_text())
    assert data["repeat"] == 2
    for name in ("memory", "sqlite"):
        r = data["results"][name]
        assert r["repeats"] == 2
        assert len(r["runs"]) == 2
        low, median, high = r["spread"]["payouts_per_s"]
        assert low <= median == r["payouts_per_s"] <= high
        assert median == pytest.approx(sum(run["payouts_per_s"] for run in r["runs"]) / 2)
        assert f"{name} median of 2:" in proc.stderr

    again = ["--repeat", "1", "--json", str(second), "--compare", str(first)]
    proc = _bench("benchmarks.backends", *common, *again)
    assert f"== backends compared with {first}" in proc.stdout
    assert "results.sqlite.payouts_per_s" in proc.stdout
    assert "settings differ: repeat 2 -> 1" in proc.stdout
    assert json.loads(second.read_text())["results"]["memory"]["repeats"] == 1


def test_summarize_takes_medians_and_the_median_runs_samples() -> None:
    runs = [
        {"p99_ms": 9.0, "count": 3, "nested": {"x": 1.0}, "samples": [9]},
        {"p99_ms": 1.0, "count": 1, "nested": {"x": 5.0}, "samples": [1]},
        {"p99_ms": 4.0, "count": 2, "nested": {"x": 3.0}, "samples": [4], "ratio": None},
    ]
    s = summarize(runs, "p99_ms")
    assert (s["p99_ms"], s["count"], s["nested"]["x"]) == (4.0, 2, 3.0)
    assert s["samples"] == [4]  # the lists of the run with the median p99
    assert s["spread"]["nested.x"] == [1.0, 3.0, 5.0]
    assert s["repeats"] == 3
    assert all("samples" not in r for r in s["runs"])


def _level(rate: float, p99: float, per_s: float) -> dict[str, Any]:
    return {"rate": rate, "service": {"p99_ms": p99, "latencies_ms": [1.0]}, "per_s": per_s}


def test_compare_flags_regressions_in_the_worse_direction_only() -> None:
    old = {"repeat": 3, "levels": [_level(100.0, 10.0, 500.0), _level(300.0, 10.0, 500.0)]}
    new = {"repeat": 3, "levels": [_level(100.0, 20.0, 500.0), _level(300.0, 5.0, 300.0)]}
    new["machine"] = {"busy": ["load average 3.00 before the run"]}
    lines, regressed = report.compare(old, new, threshold=0.15)
    assert regressed == ["levels.rate=100.service.p99_ms", "levels.rate=300.per_s"]
    text = "\n".join(lines)
    assert "levels.rate=300.service.p99_ms" in text
    assert "better" in text
    assert "latencies_ms" not in text  # samples are not figures
    assert "BUSY MACHINE (new run): load average 3.00" in text
    assert report.better("results.sqlite.cpu_ms_per_payout") == -1
    assert report.better("results.sqlite.resolved_per_s") == 1
    assert report.better("results.sqlite.statuses.200") == 0


def test_verdict_says_busy_for_load_or_other_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUITE_LOADAVG_ENV, raising=False)
    quiet = {"cpus": 2, "loadavg": [0.2, 0.2, 0.2], "python": "3", "at": "now"}
    m = _verdict(quiet, 10.0, {"postgres (server)": 3.0, "other job": 0.2}, {"postgres"})
    assert m["busy"] == []
    assert m["other_processes"][0]["shared_server_of_this_run"]
    m = _verdict(quiet, 10.0, {"other job": 2.0}, set())
    assert m["busy"] == ["other processes used CPU: other job 20%"]
    monkeypatch.setenv(SUITE_LOADAVG_ENV, "1.50,1.00,0.50")
    m = _verdict(quiet, 10.0, {}, set())
    assert m["busy"] == ["load average 1.50 before the suite (> 0.5 per core, 2 CPUs)"]


def _spin(tag: str) -> str:
    return f"# {tag}\nimport time\nt = time.time()\nwhile time.time() - t < 0.4: pass"


def test_sampler_counts_others_not_the_runs_own_processes() -> None:
    # The run is ``root``; this test process is its parent, so an ancestor: a process the test
    # starts is another job (a sibling of the run), a process ``root`` starts is the run's own.
    starts_own = (
        "import subprocess, sys, time; time.sleep(0.1); "
        f"subprocess.run([sys.executable, '-c', {_spin('own')!r}])"
    )
    root = subprocess.Popen([sys.executable, "-c", starts_own])
    sampler = _Sampler(root.pid)
    other = subprocess.Popen([sys.executable, "-c", _spin("other")])
    try:
        time.sleep(0.3)
        sampler.sample(_read_procs())  # both spinning now
        time.sleep(0.3)
        sampler.sample(_read_procs())
    finally:
        for p in (root, other):
            p.wait(timeout=10)
    cpu = sampler.others()
    assert any(name.startswith("python -c # other") and s > 0 for name, s in cpu.items())
    assert not any("# own" in name for name in cpu)
    assert not any("import subprocess" in name for name in cpu)
