"""``resilient-payout demo``: the mock partner and the example service as subprocesses, the
simulated app in this process, a graded summary; everything started is stopped (docs/demo.md)."""

from __future__ import annotations

import argparse
import base64
import os
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .._urls import redact_url
from ._common import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_PARTNER_PORT,
    DEFAULT_SERVICE_PORT,
    EXIT_NOT_OK,
    EXIT_OK,
    EXIT_SETUP,
    error,
    positive,
    tcp_port,
)
from ._procs import (
    LOOPBACK,
    Child,
    environ,
    free_ports,
    no_proxy_for_loopback,
    port_free,
    prepare_logs,
    spawn,
    supervise,
    wait_ready,
)
from .serve import storage_problem

if TYPE_CHECKING:
    from rich.console import Console

    from ..testing.simulator import SimulationReport, SimulatorConfig

__all__ = ["DEADLINE", "add_parser", "fresh_sqlite", "run", "simulator_config"]

DEADLINE = 600.0
"""Scenario seconds the demo's app waits for a payout's outcome. The service's slowest correct
path is two POSTs that both time out, each followed by its late-arrival window and a confirming
check (about 2 x (150 + 2) s by the default policy), which the simulator's 300 s would cut short."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="mock partner + example service + simulated app; prints a graded summary",
        description="Start the mock partner and the example service as subprocesses, run the "
        "simulator against them, print the summary and stop everything. Exit 0 if every outcome "
        "is correct with no double payment and no block, 1 if not, 2 on a setup error "
        "(bad option, port in use, a process that did not start), 130 if interrupted.",
    )
    add = p.add_argument
    add(
        "--time-scale",
        type=positive,
        default=0.05,
        metavar="S",
        help="multiplies every duration of partner, service and app; 1 = real partner time "
        "(default: %(default)s)",
    )
    add("-n", "--count", dest="n", type=int, default=200, help="payouts (default: %(default)s)")
    add("--rate", type=positive, default=10.0, help="payouts per scenario second (default: 10)")
    add(
        "--storage",
        metavar="URL",
        help="the service's storage (default: a fresh SQLite file WORKDIR/demo.db)",
    )
    add("--seed", type=int, default=None, help="fixes partner outcomes and app repeats")
    add(
        "--deadline",
        type=positive,
        default=DEADLINE,
        metavar="S",
        help="scenario seconds to wait for each payout's outcome (default: %(default)g)",
    )
    add("--json", dest="json_path", type=Path, metavar="PATH", help="also write the report")
    add("--keep-logs", action="store_true", help="keep earlier logs (renamed) instead of replacing")
    add(
        "--push-body",
        choices=("flat", "nested"),
        default="flat",
        help="shape of the service's pushes, enforced by the app (default: %(default)s)",
    )
    add(
        "--partner",
        choices=("mock", "example-b"),
        default="mock",
        help="mock: the mock partner; example-b: examples/partner_b, another partner's fake and "
        "adapter (needs a checkout of the repository; default: %(default)s)",
    )
    _add_ports(p)
    add(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        metavar="DIR",
        help="logs and the default database (default: .demo)",
    )
    _add_instances(p)
    add("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(handler=run)


def _add_ports(p: argparse.ArgumentParser) -> None:
    for flag, default, what in (
        ("--partner-port", DEFAULT_PARTNER_PORT, "mock partner"),
        ("--service-port", DEFAULT_SERVICE_PORT, "example service"),
        ("--client-port", DEFAULT_CLIENT_PORT, "app backend (simulator)"),
    ):
        p.add_argument(
            flag,
            type=tcp_port,
            default=default,
            metavar="PORT",
            help=f"{what} (default: %(default)s)",
        )


def _add_instances(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        metavar="N",
        help="service processes; above 1 they share the storage and sit behind a router on "
        "--service-port that sends each request and webhook to a random one (default: 1)",
    )
    p.add_argument(
        "--budget-url",
        metavar="URL",
        help="with --instances above 1: Redis URL of one shared check budget (a fresh key per "
        "run); without it each instance gets 1/N of the check rate",
    )


# -- setup ----------------------------------------------------------------------------------


def simulator_config(ns: argparse.Namespace, seed: int) -> SimulatorConfig | str:
    """The simulator's config, or why the options are refused."""
    from ..testing.simulator import SimulatorConfig

    ports = {
        "--partner-port": ns.partner_port,
        "--service-port": ns.service_port,
        "--client-port": ns.client_port,
    }
    if len(set(ports.values())) < len(ports):
        return "--partner-port, --service-port and --client-port must differ"
    if not 1 <= ns.instances <= 16:
        return f"--instances must be within 1-16, got {ns.instances}"
    if ns.instances > 1 and ns.storage is not None and ns.storage.startswith("memory:"):
        return "--instances above 1 needs a shared storage, not memory://"
    if ns.storage is not None and "://" not in ns.storage:
        return f"--storage must be a URL such as sqlite:///path.db, got {ns.storage!r}"
    try:
        return SimulatorConfig(
            api_url=f"http://{LOOPBACK}:{ns.service_port}",
            partner_url=f"http://{LOOPBACK}:{ns.partner_port}",
            n=ns.n,
            rate=ns.rate,
            seed=seed,
            time_scale=ns.time_scale,
            listen_host=LOOPBACK,
            listen_port=ns.client_port,
            push_shape=ns.push_body,
            deadline=ns.deadline,
        )
    except ValueError as exc:
        return str(exc)


def _busy_ports(ns: argparse.Namespace) -> list[str]:
    return [
        f"port {port} ({what})"
        for what, port in (
            ("mock partner, --partner-port", ns.partner_port),
            ("example service, --service-port", ns.service_port),
            ("app backend, --client-port", ns.client_port),
        )
        if not port_free(LOOPBACK, port)
    ]


def fresh_sqlite(workdir: Path, name: str = "demo.db") -> str:
    """The URL of an empty SQLite file in ``workdir`` (the last run's file is deleted)."""
    db = workdir / name
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{db}"


@dataclass
class _Run:
    """What the demo's steps share."""

    ns: argparse.Namespace
    config: SimulatorConfig
    seed: int
    console: Console
    started: float
    """``time.monotonic()`` at the start."""
    partner_log: Path = Path()
    service_logs: list[Path] = field(default_factory=list)
    storage: str = ""


def _prepare(r: _Run) -> None:
    """Fresh logs (and SQLite file, unless --storage) in --workdir; ``OSError`` if not."""
    ns = r.ns
    workdir: Path = ns.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    names = ["service"] if ns.instances == 1 else [f"service-{i + 1}" for i in range(ns.instances)]
    r.partner_log, *r.service_logs = prepare_logs(workdir, ["partner", *names], ns.keep_logs)
    r.storage = ns.storage if ns.storage is not None else fresh_sqlite(workdir)


def _announce(r: _Run) -> None:
    config = r.config
    r.console.print(
        f"[bold]resilient-payout demo[/]: {config.n} payouts at {config.rate:g}/s, "
        f"time scale {config.time_scale:g}, seed {r.seed}\n"
        f"  mock partner     {config.partner_url}  log {r.partner_log}\n"
        f"  example service  {config.api_url}  log {r.service_logs[0]}"
        f"{_instances_note(r.ns, r.service_logs)}\n"
        f"                   storage {redact_url(r.storage)}\n"
        f"  app backend      http://{LOOPBACK}:{config.listen_port}  (the simulator, this process)"
    )


def _instances_note(ns: argparse.Namespace, logs: Sequence[Path]) -> str:
    if ns.instances == 1:
        return ""
    budget = "one shared check budget (Redis)" if ns.budget_url else "1/N of the check rate each"
    return (
        f"\n                   router to {ns.instances} instances ({budget}); "
        f"logs {logs[0].name} .. {logs[-1].name}"
    )


def _environment(r: _Run) -> dict[str, str]:
    """The children's environment."""
    # The storage URL goes by environment, not argv: it may hold a password, and argv is public.
    webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = {
        **os.environ,
        **no_proxy_for_loopback(),
        "PYTHONUNBUFFERED": "1",
        "RP_STORAGE_URL": r.storage,
        # A fresh secret per run: the partner signs its webhooks, the service verifies them.
        "RP_WEBHOOK_SECRETS": webhook_secret,
        "RP_PARTNER_WEBHOOK_SECRET": webhook_secret,
    }
    if r.ns.instances > 1 and r.ns.budget_url:
        env["RP_BUDGET_URL"] = r.ns.budget_url
        env["RP_BUDGET_KEY"] = f"rp-demo:{secrets.token_hex(6)}:budget"
    return env


def _commands(r: _Run, ports: Sequence[int]) -> list[tuple[str, list[str], Path, str]]:
    """(name, arguments, log, readiness URL) of the partner and of each service instance."""
    ns, partner_url, service_url = r.ns, r.config.partner_url, r.config.api_url
    scale = ["--time-scale", f"{r.config.time_scale:g}"]
    partner_args = ["--host", LOOPBACK, "--port", str(ns.partner_port), "--seed", str(r.seed)]
    service_args = [
        *("--partner-url", partner_url, "--public-url", service_url),
        *("--client-url", f"http://{LOOPBACK}:{ns.client_port}", "--push-body", ns.push_body),
        *_split_budget(ns),
    ]
    partner = ["mock-partner", *partner_args, *scale]
    commands = [("mock partner", partner, r.partner_log, f"{partner_url}/_mock/stats")]
    for i, (port, log) in enumerate(zip(ports, r.service_logs, strict=True)):
        name = "example service" + (f" {i + 1}" if ns.instances > 1 else "")
        listen = ["--host", LOOPBACK, "--port", str(port)]
        ready = f"http://{LOOPBACK}:{port}/healthz"
        commands.append((name, ["serve", *listen, *service_args, *scale], log, ready))
    return commands


def _split_budget(ns: argparse.Namespace) -> list[str]:
    """Without a shared budget, N instances each get 1/N of the default check rate and burst,
    so together they stay within what the partner allows."""
    if ns.instances == 1 or ns.budget_url:
        return []
    from .._policy import Policy

    base = Policy()
    rate = base.check_rate / ns.instances
    burst = max(1, base.check_burst // ns.instances)
    return ["--check-rate", f"{rate:g}", "--check-burst", str(burst)]


# -- run ------------------------------------------------------------------------------------


def run(ns: argparse.Namespace) -> int:
    """The demo's exit status (see the subcommand's description)."""
    from rich.console import Console

    if ns.partner == "example-b":
        return _example_b(ns)
    started = time.monotonic()
    console = Console(highlight=False)
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1_000_000)
    config = simulator_config(ns, seed)
    if isinstance(config, str):
        error(f"demo: {config}")
        return EXIT_SETUP
    busy = _busy_ports(ns)
    if busy:
        error(f"demo: already in use on {LOOPBACK}: {', '.join(busy)}")
        return EXIT_SETUP
    r = _Run(ns, config, seed, console, started)
    try:
        _prepare(r)
    except OSError as exc:
        error(f"demo: cannot prepare {ns.workdir}: {exc}")
        return EXIT_SETUP
    problem = storage_problem(r.storage)  # one line now, not a child's traceback later
    if problem is not None:
        error(f"demo: {problem}")
        return EXIT_SETUP
    _announce(r)
    return _supervise(r, _environment(r))


def _example_b(ns: argparse.Namespace) -> int:
    """The same flow with examples/partner_b's fake and adapter (its ``demo.run``); the examples
    are not installed, so they are imported from the checkout this package runs from."""
    import importlib
    import sys

    root = Path(__file__).resolve().parents[3]
    if not (root / "examples" / "partner_b" / "demo.py").is_file():
        error(f"demo: --partner example-b needs a checkout (no examples/partner_b in {root})")
        return EXIT_SETUP
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    code: int = importlib.import_module("examples.partner_b.demo").run(ns)
    return code


def _supervise(r: _Run, env: dict[str, str]) -> int:
    """Start the children, play the app, grade; stop the children whatever happens."""
    ns, console = r.ns, r.console

    def body(children: list[Child]) -> int:
        # One instance listens on --service-port; several listen on free ports behind the router.
        ports = [ns.service_port] if ns.instances == 1 else free_ports(ns.instances)
        for name, args, log, ready_url in _commands(r, ports):
            # Appended at once: from here on, supervise() stops the child whatever happens.
            children.append(spawn(name, args, log, ready_url, env))
        if not wait_ready(children, console):
            return EXIT_SETUP
        backends = [] if ns.instances == 1 else [f"http://{LOOPBACK}:{p}" for p in ports]
        with environ(no_proxy_for_loopback()):
            report = _simulate(
                r.config, progress=not ns.no_progress, console=console, router_to=backends
            )
        if report is None:
            return EXIT_SETUP
        return _finish(report, children, ns.json_path, r.started, console)

    return supervise(
        console, body, lambda: f"{r.partner_log}, {', '.join(map(str, r.service_logs))}"
    )


def _simulate(
    config: SimulatorConfig,
    *,
    progress: bool,
    console: Console,
    router_to: Sequence[str] = (),
) -> SimulationReport | None:
    import anyio

    from ..testing.simulator import Simulator
    from ._router import serve_router

    async def run() -> SimulationReport:
        if not router_to:
            return await Simulator(config).run(progress)
        port = int(urlsplit(config.api_url).port or DEFAULT_SERVICE_PORT)
        async with serve_router(router_to, LOOPBACK, port):
            return await Simulator(config).run(progress)

    try:
        return anyio.run(run)
    except OSError as exc:  # the receiver's (or router's) port was taken since we checked
        console.print(f"[red]demo: a port of this process: {exc.strerror or exc}[/]")
        return None


def _finish(
    report: SimulationReport,
    children: Sequence[Child],
    json_path: Path | None,
    started: float,
    console: Console,
) -> int:
    from ..testing.simulator import render_summary, write_json

    console.print(render_summary(report))
    if json_path is not None:
        try:
            write_json(report, json_path)
        except OSError as exc:
            console.print(f"[red]demo: cannot write the report: {exc}[/]")
        else:
            console.print(f"report: {json_path}")
    # A process that died during the run makes the demo fail even if the grades look fine.
    crashed = [c for c in children if c.proc.poll() is not None]
    for child in crashed:
        console.print(f"[red]{child.name} exited early with status {child.proc.returncode}[/]")
    ok = report.ok and not crashed
    verdict = "[bold green]OK[/]" if ok else "[bold red]NOT OK[/]"
    console.print(f"demo {verdict} in {time.monotonic() - started:.1f} s")
    return EXIT_OK if ok else EXIT_NOT_OK
