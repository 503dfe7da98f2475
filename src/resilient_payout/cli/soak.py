"""``resilient-payout soak``: the demo under load while the service is SIGKILLed (or, with
``--signal TERM``, rolled: SIGTERMed and replaced) every few seconds; every transfer graded
against the partner, and how fast the service recovered (docs/reliability.md)."""

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
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._urls import redact_url
from ..testing._stats import percentile
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
    STOP_TIMEOUT_S,
    Child,
    Terminated,
    environ,
    free_ports,
    install_stop_signals,
    no_proxy_for_loopback,
    port_free,
    prepare_logs,
    restore_signals,
    signal_group,
    spawn,
    stop,
    wait_ready,
)
from .demo import DEADLINE, fresh_sqlite

if TYPE_CHECKING:
    import anyio.abc
    from rich.console import Console

    from .._model import Payout, PayoutStatus
    from ..testing.mock_partner import MockPartnerConfig
    from ..testing.simulator import SimulationReport, SimulatorConfig
    from ..testing.simulator._grading import Tx

__all__ = ["ProcessExit", "SoakResult", "add_parser", "run", "run_soak"]

_MIN_RETRY_S = 0.05
"""The simulator spaces POST retries at least this far apart (its ``_MIN_POLL_S``)."""
_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
_RECOVERY_EVENTS = frozenset({"submit_orphaned", "owner_gone"})
"""Audit events of a payout recovered from an instance that died (or left) holding its submit."""
_LISTENER_WAIT_S = 10.0
"""How long a SIGTERMed service may keep its listening socket before it is SIGKILLed."""
_DRAIN_MARGIN_S = 10.0


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
        help="demo under load with the service SIGKILLed (or rolled) every few seconds",
        description="Run the mock partner (time-scaled) and the example service as subprocesses, "
        "load the service with the simulator for --minutes while it is SIGKILLed every "
        "--kill-every seconds (random, seeded) and restarted on the same port (--signal TERM: a "
        "rolling restart, the old process draining beside its successor), then grade every "
        "transfer against the partner and report the push lag after the partner's answer and "
        "the orphans recovered. Exit 0 if nothing is wrong, missing, conflicting or paid twice, "
        "the partner never blocked us and no SIGTERMed process had to be killed, 1 if not, 2 on "
        "a setup error.",
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
        "--signal",
        choices=sorted(_SIGNALS),
        default="KILL",
        help="KILL: a crash, restarted under the same instance id; TERM: a rolling restart, "
        "a new instance id per process (default: %(default)s)",
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


@dataclass(frozen=True)
class ProcessExit:
    """How one service process ended."""

    instance: str
    """Its ``RP_INSTANCE_ID``."""
    signal: str
    """``KILL`` or ``TERM`` (the last process of a run is always SIGTERMed)."""
    exit_s: float
    """Clock seconds from the signal to its exit."""
    killed: bool
    """SIGTERMed but SIGKILLed after the bound (its listener or its drain took too long)."""
    left: int | None
    """Its payouts still ``received`` or ``submitting`` once it had exited (None: unread)."""
    listener_s: float | None = None
    """SIGTERM only: clock seconds until it had closed its listening socket (the successor's
    start)."""


@dataclass
class SoakResult:
    """A soak run: the simulator's graded report, what the killer did and the recovery."""

    report: SimulationReport
    minutes: float
    kills: int
    restart_s: list[float]
    crashed: list[str]
    kills_at_s: list[float] = dataclasses.field(default_factory=list)
    """Scenario seconds since the partner started (about: to compare with the next field)."""
    busiest_check_seconds: dict[str, int] = dataclasses.field(default_factory=dict)
    """The partner's busiest scenario seconds for status checks (its ``checks_per_second``)."""
    signal: str = "KILL"
    exits: list[ProcessExit] = dataclasses.field(default_factory=list)
    push_lags_s: list[float] = dataclasses.field(default_factory=list)
    """Per payout, clock seconds from the partner's answer (or landing) to the app's first push."""
    lag_skipped: int = 0
    """Payouts without a lag: no push, nothing recorded at the partner, or POSTs unmatched."""
    finals_s: list[float] = dataclasses.field(default_factory=list)
    """Per payout, clock seconds from the app's first POST to its first final outcome."""
    orphans_recovered: int | None = None
    """Payouts whose audit trail records a recovery of an orphaned submit (None: unread)."""

    @property
    def ok(self) -> bool:
        """Every transfer correct, none paid twice, no block, nothing died on its own, and every
        SIGTERMed process exited by itself."""
        return self.report.ok and not self.crashed and not any(e.killed for e in self.exits)

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
            "drain_killed": sum(1 for e in self.exits if e.killed),
        }

    def recovery(self) -> dict[str, Any]:
        """How fast the app heard, and what the restarts left behind; clock seconds."""
        drained = [e for e in self.exits if e.signal == "TERM"]
        lags, finals = self.push_lags_s, self.finals_s
        return {
            "signal": self.signal,
            "push_lag_p50_s": _rounded(percentile(lags, 0.50, default=None)),
            "push_lag_p99_s": _rounded(percentile(lags, 0.99, default=None)),
            "push_lag_max_s": _rounded(max(lags, default=None)),
            "push_lag_payouts": len(lags),
            "push_lag_skipped": self.lag_skipped,
            "final_p50_s": _rounded(percentile(finals, 0.50, default=None)),
            "final_p99_s": _rounded(percentile(finals, 0.99, default=None)),
            "orphans_recovered": self.orphans_recovered,
            # Target 0: a drained process hands over everything it held.
            "orphans_left": _total(e.left for e in drained),
            "orphans_left_by_kills": (
                _total(e.left for e in self.exits if e.signal == "KILL")
                if self.signal == "KILL"
                else None
            ),
            "drain_max_s": _rounded(max((e.exit_s for e in drained), default=None)),
            "listener_max_s": _rounded(
                max((e.listener_s for e in drained if e.listener_s is not None), default=None)
            ),
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: figures, recovery, per-restart detail and the simulator's report."""
        return {
            "ok": self.ok,
            "minutes": self.minutes,
            "soak": self.figures(),
            "recovery": self.recovery(),
            "exits": [dataclasses.asdict(e) for e in self.exits],
            "restart_s": [round(t, 3) for t in self.restart_s],
            "kills_at_s": [round(t, 1) for t in self.kills_at_s],
            "busiest_check_seconds": self.busiest_check_seconds,
            "report": self.report.to_dict(),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _total(counts: Iterable[int | None]) -> int | None:
    """The sum, None if any count is unknown."""
    total = 0
    for count in counts:
        if count is None:
            return None
        total += count
    return total


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
        f"second, time scale {ns.time_scale:g}, SIG{ns.signal} every {ns.kill_every[0]:g}-"
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
            signal_name=ns.signal,
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
    recovery = result.recovery()
    console.print("recovery: " + ", ".join(f"{k} {_shown(v)}" for k, v in recovery.items()))
    if json_path is not None:
        try:
            json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", "utf-8")
        except OSError as exc:
            console.print(f"[red]soak: cannot write the report: {exc}[/]")
    verdict = "[bold green]OK[/]" if result.ok else "[bold red]NOT OK[/]"
    console.print(f"soak {verdict}")
    return EXIT_OK if result.ok else EXIT_NOT_OK


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


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
    signal_name: str = "KILL",
) -> SoakResult | None:
    """Partner and service as subprocesses on free loopback ports, the simulator in this
    process, the service SIGKILLed (``signal_name="TERM"``: SIGTERMed) every ``kill_every``
    clock seconds for ``minutes`` and restarted on its port. None if a process did not start."""
    import anyio
    from rich.console import Console as _Console

    from .._policy import Policy

    if signal_name not in _SIGNALS:
        raise ValueError(f"signal must be one of {sorted(_SIGNALS)}, not {signal_name!r}")
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

    def service(instance: str) -> Child:
        named = {**env, "RP_INSTANCE_ID": instance}
        return spawn("example service", service_args, service_log, service_ready, named)

    killer = _Killer(
        children=[],
        respawn=service,
        kill_every=kill_every,
        rng=random.Random(seed),
        time_scale=time_scale,
        console=console,
        signal_name=signal_name,
        storage=storage,
        port=service_port,
        # uvicorn's graceful shutdown, then the client's drain (both bounded), then a margin.
        drain_bound=STOP_TIMEOUT_S + Policy().drain_timeout * time_scale + _DRAIN_MARGIN_S,
    )
    children = killer.children
    children.append(
        spawn("mock partner", partner_args, partner_log, f"{partner_url}/_mock/stats", env)
    )
    children.append(service(killer.instance))
    try:
        if not wait_ready(children, console):
            return None
        killer.partner_t0 = time.monotonic()
        with environ(no_proxy_for_loopback()):
            return anyio.run(_load, config, killer, minutes, progress, partner_url)
    finally:
        stop([*children, *killer.draining], console)


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
    """Signals the service (``children[1]``) every few seconds and restarts it on its port.

    KILL: a crash; the successor starts once the victim is gone, under the same instance id, so
    it knows at once that what that id held was orphaned. TERM: a rolling restart; the victim
    drains beside its successor (same storage), which gets a new instance id and starts as soon
    as the victim has closed its listener: ``serve`` binds without ``SO_REUSEPORT``, so two
    processes cannot listen on one port at once.
    """

    children: list[Child]
    respawn: Callable[[str], Child]
    kill_every: tuple[float, float]
    rng: random.Random
    time_scale: float
    console: Console
    signal_name: str
    storage: str
    port: int
    drain_bound: float
    """Clock seconds a SIGTERMed process may take to exit before it is SIGKILLed."""
    partner_t0: float = 0.0
    """``time.monotonic()`` when the partner was ready: its scenario time 0, about."""
    restarts: list[float] = dataclasses.field(default_factory=list)
    """Clock seconds from each signal until the successor was ready."""
    failed: list[str] = dataclasses.field(default_factory=list)
    kills_at: list[float] = dataclasses.field(default_factory=list)
    exits: list[ProcessExit] = dataclasses.field(default_factory=list)
    draining: list[Child] = dataclasses.field(default_factory=list)
    """SIGTERMed processes not reaped yet."""
    generation: int = 1

    @property
    def instance(self) -> str:
        """The running service's instance id."""
        return "soak-service" if self.signal_name == "KILL" else f"soak-{self.generation}"

    async def run(self, until: float, reapers: anyio.abc.TaskGroup) -> None:
        """Signal and restart until the clock (monotonic) reaches ``until``; SIGTERMed processes
        are waited for in ``reapers``."""
        import anyio

        while True:
            await anyio.sleep(self.rng.uniform(*self.kill_every))
            if time.monotonic() >= until:
                return
            victim, instance = self.children[1], self.instance
            self.kills_at.append((time.monotonic() - self.partner_t0) / self.time_scale)
            t0 = time.monotonic()
            signal_group(victim.proc, _SIGNALS[self.signal_name])
            if self.signal_name == "KILL":
                await anyio.to_thread.run_sync(victim.proc.wait)
                # Counted before the successor starts: under the same id it recovers them at once.
                left = await _left_by(self.storage, instance)
                self.exits.append(ProcessExit(instance, "KILL", time.monotonic() - t0, False, left))
            else:
                self.draining.append(victim)
                forced = not await self._listener_closed()
                listener_s = time.monotonic() - t0
                if forced:
                    signal_group(victim.proc, signal.SIGKILL)
                    await anyio.to_thread.run_sync(victim.proc.wait)
                reapers.start_soon(self.reap, victim, instance, t0, forced, listener_s)
            self.generation += 1
            self.children[1] = self.respawn(self.instance)
            if not await anyio.to_thread.run_sync(wait_ready, [self.children[1]], self.console):
                # No more kills; the run goes on and grades what it can (missing outcomes).
                self.failed.append("example service (restart)")
                return
            self.restarts.append(time.monotonic() - t0)

    async def retire(self) -> None:
        """SIGTERM the running service (the run is over) and wait for it."""
        victim = self.children[1]
        if victim.proc.poll() is not None:
            return
        self.draining.append(victim)
        t0 = time.monotonic()
        signal_group(victim.proc, signal.SIGTERM)
        await self.reap(victim, self.instance, t0, False, None)

    async def reap(
        self, victim: Child, instance: str, t0: float, forced: bool, listener_s: float | None
    ) -> None:
        """Wait (bounded) for a SIGTERMed process, then count what it left."""
        import anyio

        try:
            wait = max(0.0, t0 + self.drain_bound - time.monotonic())
            await anyio.to_thread.run_sync(victim.proc.wait, wait)
        except subprocess.TimeoutExpired:
            forced = True
            signal_group(victim.proc, signal.SIGKILL)
            await anyio.to_thread.run_sync(victim.proc.wait)
        exit_s = time.monotonic() - t0
        self.draining.remove(victim)
        if forced:
            self.console.print(f"[red]soak: {instance} did not exit after SIGTERM: killed[/]")
        left = await _left_by(self.storage, instance)
        self.exits.append(ProcessExit(instance, "TERM", exit_s, forced, left, listener_s))

    async def _listener_closed(self) -> bool:
        import anyio

        deadline = time.monotonic() + _LISTENER_WAIT_S
        while not port_free(LOOPBACK, self.port):
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(0.01)
        return True


async def _load(
    config: SimulatorConfig, killer: _Killer, minutes: float, progress: bool, partner_url: str
) -> SoakResult:
    """The simulator's run with the killer beside it, then what the partner and storage say."""
    import anyio

    from ..testing.simulator import Simulator

    simulator = Simulator(config)
    # Epoch seconds (the service's audit) minus this loop's clock (the simulator's times).
    epoch_offset = time.time() - anyio.current_time()
    async with anyio.create_task_group() as reapers, anyio.create_task_group() as tg:
        tg.start_soon(killer.run, time.monotonic() + minutes * 60, reapers)
        report = await simulator.run(progress)
        tg.cancel_scope.cancel()
    crashed = [c.name for c in killer.children if c.proc.poll() is not None] + killer.failed
    await killer.retire()
    busiest, truth = await _read_partner(partner_url)
    txs = simulator.transactions
    payouts = await _payouts(killer.storage, txs.keys())
    lags, skipped = _push_lags(txs, truth, payouts, _partner_config(config), epoch_offset)
    finals = [
        tx.final_at - tx.sent_at
        for tx in txs.values()
        if tx.final_at is not None and tx.sent_at is not None
    ]
    recovered = None
    if payouts is not None:
        recovered = sum(
            1 for p in payouts.values() if any(e.event in _RECOVERY_EVENTS for e in p.audit)
        )
    restarts = killer.restarts
    return SoakResult(
        report,
        minutes,
        len(restarts),
        restarts,
        crashed,
        killer.kills_at,
        busiest,
        signal=killer.signal_name,
        exits=killer.exits,
        push_lags_s=lags,
        lag_skipped=skipped,
        finals_s=finals,
        orphans_recovered=recovered,
    )


def _partner_config(config: SimulatorConfig) -> MockPartnerConfig:
    from ..testing.mock_partner import MockPartnerConfig

    # What `mock-partner --seed S --time-scale X` runs with (partner_args above; same seed).
    assert config.seed is not None
    return MockPartnerConfig(seed=config.seed, time_scale=config.time_scale)


def _push_lags(
    txs: Mapping[str, Tx],
    truth: Mapping[str, Any] | None,
    payouts: Mapping[str, Payout] | None,
    partner: MockPartnerConfig,
    epoch_offset: float,
) -> tuple[list[float], int]:
    """Per payout, clock seconds from the partner's answer to the app's first push; and how
    many payouts have none (no push, no transfer recorded, or POSTs that cannot be matched).

    The partner's answer is when its record turned final: the 200 with the final status, or
    the final after a ``pending`` answer or a 500, or the silent landing after a 504. The
    mock partner draws each POST's timeline from (seed, id, POST number) alone, so that moment
    is the POST's send time (the service's audit entry to ``submitting``; the request reaches
    the partner a few milliseconds later, so lags are that much long) plus the plan's delay.
    A payout the partner never recorded is ``failed`` by the late-arrival window, not by a
    recovery: it has no lag.
    """
    from .._model import PayoutStatus
    from ..testing.mock_partner._plan import draw

    lags: list[float] = []
    skipped = 0
    for tx in txs.values():
        entry = truth.get(tx.id) if truth is not None else None
        payout = payouts.get(tx.id) if payouts is not None else None
        posts = entry.get("posts") if isinstance(entry, dict) else None
        if tx.pushed_at is None or payout is None or not isinstance(posts, int):
            skipped += 1
            continue
        sends = [e.at for e in payout.audit if e.to_status is PayoutStatus.SUBMITTING]
        finals = []
        if len(sends) == posts:  # else a send never reached the partner: which one is unknown
            for number, sent_at in enumerate(sends, start=1):
                plan = draw(partner, tx.id, number)
                delay = plan.final_at if plan.final_at is not None else plan.land_at
                if delay is not None:
                    finals.append(sent_at + delay * partner.time_scale)
        if not finals:
            skipped += 1
            continue
        lags.append(tx.pushed_at + epoch_offset - min(finals))
    return lags, skipped


async def _left_by(url: str, instance: str) -> int | None:
    """Payouts ``instance`` holds open (``received`` or ``submitting``); None if unreadable."""
    from .._model import PayoutStatus

    held = frozenset({PayoutStatus.RECEIVED, PayoutStatus.SUBMITTING})
    found = await _list(url, held)
    return None if found is None else sum(1 for p in found if p.owner == instance)


async def _payouts(url: str, ids: Iterable[str]) -> dict[str, Payout] | None:
    """This run's payouts in storage, by id; None if unreadable."""
    wanted = set(ids)
    found = await _list(url, None)
    return None if found is None else {p.id: p for p in found if p.id in wanted}


async def _list(url: str, statuses: frozenset[PayoutStatus] | None) -> list[Payout] | None:
    from ..storage import MAX_PAGE, PayoutQuery, storage_from_url

    found: list[Payout] = []
    try:
        storage = storage_from_url(url)
        await storage.open()
        try:
            cursor: str | None = None
            while True:
                query = PayoutQuery(statuses=statuses, limit=MAX_PAGE, cursor=cursor)
                page = await storage.list_payouts(query)
                found.extend(page.items)
                if page.next_cursor is None:
                    return found
                cursor = page.next_cursor
        finally:
            await storage.close()
    except Exception:  # noqa: BLE001 - diagnostics only; the report has the verdict
        return None


async def _read_partner(partner_url: str) -> tuple[dict[str, int], dict[str, Any] | None]:
    """The partner's 8 busiest scenario seconds for status checks ({} if it does not say) and
    its truth per id (None if unreadable)."""
    import httpx

    busiest: dict[str, int] = {}
    truth: dict[str, Any] | None = None
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
        with contextlib.suppress(Exception):  # diagnostics only; the report has the verdict
            stats = (await http.get(f"{partner_url}/_mock/stats")).json()
            top = sorted(stats["checks_per_second"].items(), key=lambda kv: -kv[1])[:8]
            busiest = {str(k): int(v) for k, v in top}
        with contextlib.suppress(Exception):
            found = (await http.get(f"{partner_url}/_mock/truth")).json()["transactions"]
            truth = found if isinstance(found, dict) else None
    return busiest, truth
