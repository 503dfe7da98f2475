"""``resilient-payout soak``: the demo under load while the service is SIGKILLed and restarted
every few seconds; every transfer graded against the partner (docs/reliability.md)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import math
import os
import random
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._urls import redact_url
from ._common import (
    EXIT_INTERRUPTED,
    EXIT_NOT_OK,
    EXIT_OK,
    EXIT_SETUP,
    EXIT_TERMINATED,
    error,
    positive,
)
from ._procs import (
    LOOPBACK,
    Child,
    Terminated,
    environ,
    free_ports,
    install_stop_signals,
    no_proxy_for_loopback,
    prepare_logs,
    restore_signals,
    signal_group,
    spawn,
    stop,
    wait_ready,
)
from .demo import DEADLINE, fresh_sqlite

if TYPE_CHECKING:
    from rich.console import Console

    from ..testing.simulator import SimulationReport, SimulatorConfig

__all__ = ["SoakResult", "add_parser", "run", "run_soak"]

_MIN_RETRY_S = 0.05
"""The simulator spaces POST retries at least this far apart (its ``_MIN_POLL_S``)."""


def _kill_every(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        bounds = (float(low), float(high) if sep else float(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a range of seconds like 3-10: {text!r}") from None
    if not 0 < bounds[0] <= bounds[1] < float("inf"):
        raise argparse.ArgumentTypeError(f"need 0 < MIN <= MAX, got {text}")
    return bounds


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``soak`` subcommand."""
    p = sub.add_parser(
        "soak",
        help="demo under load with the service SIGKILLed and restarted every few seconds",
        description="Run the mock partner (time-scaled) and the example service as subprocesses, "
        "load the service with the simulator for --minutes while it is SIGKILLed every "
        "--kill-every seconds (random, seeded) and restarted on the same port, then grade every "
        "transfer against the partner. Exit 0 if nothing is wrong, missing, conflicting or paid "
        "twice and the partner never blocked us, 1 if not, 2 on a setup error.",
    )
    add = p.add_argument
    add("--minutes", type=positive, default=5.0, help="load duration (default: %(default)g)")
    # Not 0.05 as in the demo: a restarting process stalls its loop ~100 ms, which at 0.05 is two
    # scenario seconds in which budgeted checks bunch up at the partner (docs/reliability.md).
    add("--time-scale", type=positive, default=0.1, metavar="S", help="(default: %(default)g)")
    add(
        "--kill-every",
        type=_kill_every,
        default=(3.0, 10.0),
        metavar="MIN-MAX",
        help="clock seconds between kills, drawn uniformly (default: 3-10)",
    )
    add(
        "--rate",
        type=positive,
        default=1.0,
        help="payouts per scenario second (default: %(default)g, i.e. 10/s at scale 0.1)",
    )
    add("--storage", metavar="URL", help="default: a fresh SQLite file WORKDIR/soak.db")
    add("--seed", type=int, default=None, help="fixes kills, partner outcomes and app repeats")
    add("--json", dest="json_path", type=Path, metavar="PATH", help="also write the report")
    add("--workdir", type=Path, default=Path(".soak"), metavar="DIR", help="(default: .soak)")
    add("--progress", action="store_true", help="live progress bar")
    p.set_defaults(handler=run)


# -- result ---------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """A soak run: the simulator's graded report and what the killer did."""

    report: SimulationReport
    minutes: float
    kills: int
    restart_s: list[float]
    crashed: list[str]
    kills_at_s: list[float] = dataclasses.field(default_factory=list)
    """Scenario seconds since the partner started (about: to compare with the next field)."""
    busiest_check_seconds: dict[str, int] = dataclasses.field(default_factory=dict)
    """The partner's busiest scenario seconds for status checks (its ``checks_per_second``)."""

    @property
    def ok(self) -> bool:
        """Every transfer correct, none paid twice, no block, nothing died on its own."""
        return self.report.ok and not self.crashed

    def figures(self) -> dict[str, Any]:
        """The soak's headline figures (all but ``sent`` and ``final`` must be 0)."""
        r = self.report
        return {
            "sent": r.sent,
            "final": r.sent - r.missing,
            "wrong": r.wrong,
            "missing": r.missing,
            "double_payments": len(r.double_payments),
            "conflicting_notifications": r.conflicting + r.pushes_rejected,
            "blocks": r.blocks,
            "unsettled": r.unsettled,
            "unverified": r.unverified,
            "kills": self.kills,
            "restart_max_s": round(max(self.restart_s, default=0.0), 3),
            "crashed": self.crashed,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "minutes": self.minutes,
            "soak": self.figures(),
            "restart_s": [round(t, 3) for t in self.restart_s],
            "kills_at_s": [round(t, 1) for t in self.kills_at_s],
            "busiest_check_seconds": self.busiest_check_seconds,
            "report": self.report.to_dict(),
        }


# -- command --------------------------------------------------------------------------------


def run(ns: argparse.Namespace) -> int:
    """The soak's exit status (see the subcommand's description)."""
    from rich.console import Console

    console = Console(highlight=False)
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1_000_000)
    workdir: Path = ns.workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        logs = prepare_logs(workdir, ["partner", "service"], keep=False)
        storage = ns.storage if ns.storage is not None else fresh_sqlite(workdir, "soak.db")
    except OSError as exc:
        error(f"soak: cannot prepare {workdir}: {exc}")
        return EXIT_SETUP
    console.print(
        f"[bold]resilient-payout soak[/]: {ns.minutes:g} min, {ns.rate:g} payouts per scenario "
        f"second, time scale {ns.time_scale:g}, SIGKILL every {ns.kill_every[0]:g}-"
        f"{ns.kill_every[1]:g} s, seed {seed}, storage {redact_url(storage)}, logs in {workdir}"
    )
    previous = install_stop_signals()
    try:
        result = run_soak(
            minutes=ns.minutes,
            time_scale=ns.time_scale,
            kill_every=ns.kill_every,
            rate=ns.rate,
            storage=storage,
            seed=seed,
            partner_log=logs[0],
            service_log=logs[1],
            progress=ns.progress,
            console=console,
        )
    except Terminated:
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        restore_signals(previous)
    if result is None:
        return EXIT_SETUP
    return _report(result, ns.json_path, console)


def _report(result: SoakResult, json_path: Path | None, console: Console) -> int:
    from ..testing.simulator import render_summary

    console.print(render_summary(result.report))
    figures = result.figures()
    console.print("soak: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", "utf-8")
        except OSError as exc:
            console.print(f"[red]soak: cannot write the report: {exc}[/]")
    verdict = "[bold green]OK[/]" if result.ok else "[bold red]NOT OK[/]"
    console.print(f"soak {verdict}")
    return EXIT_OK if result.ok else EXIT_NOT_OK


# -- harness --------------------------------------------------------------------------------


def run_soak(
    *,
    minutes: float,
    time_scale: float,
    kill_every: tuple[float, float],
    rate: float,
    storage: str,
    seed: int,
    partner_log: Path,
    service_log: Path,
    progress: bool = False,
    console: Console | None = None,
) -> SoakResult | None:
    """Partner and service as subprocesses on free loopback ports, the simulator in this
    process, the service SIGKILLed every ``kill_every`` clock seconds for ``minutes`` and
    restarted on its port. None if a process did not start."""
    import anyio
    from rich.console import Console as _Console

    console = console if console is not None else _Console(stderr=True, highlight=False)
    partner_port, service_port, client_port = free_ports(3)
    partner_url = f"http://{LOOPBACK}:{partner_port}"
    service_url = f"http://{LOOPBACK}:{service_port}"
    n = max(1, round(minutes * 60 * rate / time_scale))
    config = _simulator_config(
        service_url, partner_url, client_port, n=n, rate=rate, seed=seed, time_scale=time_scale
    )
    env = _environment(storage)
    scale = f"{time_scale:g}"
    service_args = [
        *("serve", "--host", LOOPBACK, "--port", str(service_port), "--time-scale", scale),
        *("--partner-url", partner_url, "--public-url", service_url, "--log-level", "warning"),
        *("--client-url", f"http://{LOOPBACK}:{client_port}", "--push-body", "flat"),
    ]
    partner_args = [
        *("mock-partner", "--host", LOOPBACK, "--port", str(partner_port), "--seed", str(seed)),
        *("--time-scale", scale, "--log-level", "warning"),
    ]
    service_ready = f"{service_url}/healthz"
    children = [
        spawn("mock partner", partner_args, partner_log, f"{partner_url}/_mock/stats", env),
        spawn("example service", service_args, service_log, service_ready, env),
    ]
    killer = _Killer(
        children=children,
        respawn=lambda: spawn("example service", service_args, service_log, service_ready, env),
        kill_every=kill_every,
        rng=random.Random(seed),
        time_scale=time_scale,
        console=console,
    )
    try:
        if not wait_ready(children, console):
            return None
        killer.partner_t0 = time.monotonic()
        with environ(no_proxy_for_loopback()):
            return anyio.run(_load, config, killer, minutes, progress, partner_url)
    finally:
        stop(children, console)


def _simulator_config(
    service_url: str,
    partner_url: str,
    client_port: int,
    *,
    n: int,
    rate: float,
    seed: int,
    time_scale: float,
) -> SimulatorConfig:
    from ..testing.simulator import SimulatorConfig

    return SimulatorConfig(
        api_url=service_url,
        partner_url=partner_url,
        n=n,
        rate=rate,
        seed=seed,
        time_scale=time_scale,
        listen_host=LOOPBACK,
        listen_port=client_port,
        push_shape="flat",
        deadline=DEADLINE,
        # The app retries its first POST through a restart (a refused or reset connection); a
        # restart takes a second or two of clock time, so spread the retries over ~20 s.
        post_retries=max(3, math.ceil(20.0 / max(time_scale, _MIN_RETRY_S))),
    )


def _environment(storage: str) -> dict[str, str]:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    return {
        **os.environ,
        **no_proxy_for_loopback(),
        "PYTHONUNBUFFERED": "1",
        "RP_STORAGE_URL": storage,
        "RP_WEBHOOK_SECRETS": secret,
        "RP_PARTNER_WEBHOOK_SECRET": secret,
    }


@dataclass
class _Killer:
    """SIGKILLs the service (``children[1]``) every few seconds and restarts it on its port."""

    children: list[Child]
    respawn: Callable[[], Child]
    kill_every: tuple[float, float]
    rng: random.Random
    time_scale: float
    console: Console
    partner_t0: float = 0.0
    """``time.monotonic()`` when the partner was ready: its scenario time 0, about."""
    restarts: list[float] = dataclasses.field(default_factory=list)
    """Clock seconds each restart took, until the restarted service was ready."""
    failed: list[str] = dataclasses.field(default_factory=list)
    kills_at: list[float] = dataclasses.field(default_factory=list)

    async def run(self, until: float) -> None:
        """Kill and restart until the clock (monotonic) reaches ``until``."""
        import anyio

        while True:
            await anyio.sleep(self.rng.uniform(*self.kill_every))
            if time.monotonic() >= until:
                return
            victim = self.children[1]
            self.kills_at.append((time.monotonic() - self.partner_t0) / self.time_scale)
            signal_group(victim.proc, signal.SIGKILL)
            await anyio.to_thread.run_sync(victim.proc.wait)
            t0 = time.monotonic()
            self.children[1] = self.respawn()
            if not await anyio.to_thread.run_sync(wait_ready, [self.children[1]], self.console):
                # No more kills; the run goes on and grades what it can (missing outcomes).
                self.failed.append("example service (restart)")
                return
            self.restarts.append(time.monotonic() - t0)


async def _load(
    config: SimulatorConfig, killer: _Killer, minutes: float, progress: bool, partner_url: str
) -> SoakResult:
    """The simulator's run with the killer beside it, then what the partner saw."""
    import anyio

    from ..testing.simulator import Simulator

    simulator = Simulator(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(killer.run, time.monotonic() + minutes * 60)
        report = await simulator.run(progress)
        tg.cancel_scope.cancel()
    crashed = [c.name for c in killer.children if c.proc.poll() is not None] + killer.failed
    busiest = await _busiest_check_seconds(partner_url)
    restarts = killer.restarts
    return SoakResult(report, minutes, len(restarts), restarts, crashed, killer.kills_at, busiest)


async def _busiest_check_seconds(partner_url: str) -> dict[str, int]:
    """The partner's 8 busiest scenario seconds for status checks ({} if it does not say)."""
    import httpx

    busiest: dict[str, int] = {}
    with contextlib.suppress(Exception):  # diagnostics only; the report has the verdict
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            stats = (await http.get(f"{partner_url}/_mock/stats")).json()
        top = sorted(stats["checks_per_second"].items(), key=lambda kv: -kv[1])[:8]
        busiest = {str(k): int(v) for k, v in top}
    return busiest
