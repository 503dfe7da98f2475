"""Helpers shared by the scenarios: processes, ports, CPU time, percentiles, JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from resilient_payout.cli import _procs
from resilient_payout.testing._stats import percentile as percentile

LOOPBACK = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def spawn(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python <args>`` in its own session, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    # Not tied to our death: scenarios start processes while their sampling threads run, where
    # the preexec_fn that would do it is unsafe.
    return _procs.start([sys.executable, *args], log, env, die_with_parent=False)


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; RuntimeError if the process dies or time runs out."""
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        if _procs.wait_url(proc, url, time.monotonic() + timeout, http):
            return
    if proc.returncode is not None:
        raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
    raise RuntimeError(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``timeout``."""
    _procs.stop_procs([proc], timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def machine() -> dict[str, Any]:
    """The machine and how busy it is (other jobs share it)."""
    return {
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    """Write ``out/name.json`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def run_loadgen(args: Sequence[str], out_json: Path, log: Path) -> dict[str, Any]:
    """Run ``python -m benchmarks.loadgen`` to completion and return its JSON."""
    proc = spawn(["-m", "benchmarks.loadgen", *args, "--json", str(out_json)], log)
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}); see {log}")
    data: dict[str, Any] = json.loads(out_json.read_text())
    out_json.unlink()
    return data
