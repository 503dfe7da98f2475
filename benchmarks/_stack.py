"""The example service, the mock partner and the bare app as real processes on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ._common import LOOPBACK, free_port, spawn, stop, wait_ready


@dataclass
class Proc:
    """One server process."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_bare(logs: Path) -> Proc:
    """The bare FastAPI app (and push sink)."""
    port = free_port()
    proc = spawn(["-m", "benchmarks.bare_app", "--port", str(port)], logs / "bare.log")
    p = Proc("bare", port, proc)
    wait_ready(proc, f"{p.url}/healthz")
    return p


def start_partner(logs: Path, time_scale: float, **knobs: float) -> Proc:
    """The mock partner (``serve_mock_partner``) with MockPartnerConfig knobs (unscaled s)."""
    port = free_port()
    config = json.dumps({"seed": 1, "time_scale": time_scale, **knobs})
    proc = spawn(["-m", "benchmarks._partner", str(port), config], logs / "partner.log")
    p = Proc("partner", port, proc)
    wait_ready(proc, f"{p.url}/_mock/stats")
    return p


WHATIF: list[str] = []
"""Options of :mod:`benchmarks.whatif_service`; when set, it replaces ``resilient-payout serve``."""


def start_service(
    logs: Path, partner: Proc, sink: Proc, storage: str, time_scale: float = 1.0
) -> Proc:
    """``resilient-payout serve`` against ``partner``, pushing to ``sink``.

    Overload shedding is off unless the environment sets its bounds (benchmarks/overload.py
    does): a closed-loop benchmark measures capacity, and would otherwise count refusals."""
    os.environ.setdefault("RP_MAX_LOOP_LAG", "0")
    os.environ.setdefault("RP_MAX_INFLIGHT_SUBMITS", "0")
    port = free_port()
    if WHATIF:
        args = ["-m", "benchmarks.whatif_service", "--port", str(port), "--storage", storage]
        args += ["--partner", partner.url, "--client", sink.url, *WHATIF]
    else:
        args = ["-m", "resilient_payout.cli", "serve", "--port", str(port), "--storage", storage]
        args += ["--partner-url", partner.url, "--public-url", f"http://{LOOPBACK}:{port}"]
        args += ["--client-url", sink.url, "--time-scale", str(time_scale)]
        args += ["--log-level", "warning"]
    proc = spawn(args, logs / "service.log")
    p = Proc("service", port, proc)
    wait_ready(proc, f"{p.url}/healthz")
    return p


@dataclass
class Stack:
    """Processes to stop at the end, in order."""

    procs: list[Proc] = field(default_factory=list)

    def add(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            stop(p.proc)
        self.procs.clear()


def get_json(url: str) -> Any:
    """GET a JSON document from one of our processes."""
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        return http.get(url).json()


def post(url: str) -> None:
    """POST with an empty body."""
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        http.post(url)


def scenario_main(
    doc: str | None,
    run: Callable[[Path, bool, argparse.Namespace], Any],
    argv: list[str] | None,
    options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line of a scenario that starts the service: ``[--quick] [--out DIR]
    [--whatif OPTIONS]`` and the scenario's own ``options``, then ``run(out, quick, ns)``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    if options is not None:
        options(ap)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument(
        "--whatif",
        default="",
        help="run benchmarks.whatif_service with these options instead of the stock service, "
        "e.g. '--httpx' (docs/performance.md)",
    )
    ns = ap.parse_args(argv)
    WHATIF[:] = ns.whatif.split()
    run(ns.out, ns.quick, ns)
    return 0
