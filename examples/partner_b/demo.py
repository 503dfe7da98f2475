"""``resilient-payout demo --partner example-b``: the demo's flow with Partner B.

The fake Partner B (:mod:`.fake`) and the example service over the Partner B adapter
(:mod:`.service`) run as subprocesses; the simulator plays the app in this process and grades
every outcome against the fake's truth, as ``demo`` does with the mock partner. The demo's app
sends ids only, so each payout is of ``DEMO_AMOUNT`` KES. One service instance.

Also ``python -m examples.partner_b.demo [demo options]`` from a checkout.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from resilient_payout.cli import demo
from resilient_payout.cli._common import (
    EXIT_NOT_OK,
    EXIT_OK,
    EXIT_SETUP,
)
from resilient_payout.cli._procs import (
    LOOPBACK,
    Child,
    environ,
    no_proxy_for_loopback,
    port_free,
    prepare_logs,
    start,
    supervise,
    wait_ready,
)
from resilient_payout.cli.serve import storage_problem

if TYPE_CHECKING:
    from rich.console import Console

    from resilient_payout.testing.simulator import SimulatorConfig

__all__ = ["DEMO_AMOUNT", "main", "run"]

DEMO_AMOUNT = "10.50"
ROOT = Path(__file__).resolve().parents[2]
"""The checkout: children run ``python -m examples.partner_b...`` from here."""


def run(ns: argparse.Namespace) -> int:
    """The demo with Partner B (``ns``: the ``demo`` subcommand's options); its exit status."""
    from rich.console import Console

    console = Console(highlight=False)
    started = time.monotonic()
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1_000_000)
    config = demo.simulator_config(ns, seed)
    busy = [
        p for p in (ns.partner_port, ns.service_port, ns.client_port) if not port_free(LOOPBACK, p)
    ]
    if ns.instances != 1:
        config = "--partner example-b runs one service instance (no --instances)"
    elif busy and not isinstance(config, str):
        config = f"already in use on {LOOPBACK}: port {', '.join(map(str, busy))}"
    if isinstance(config, str):
        print(f"demo: {config}", file=sys.stderr)
        return EXIT_SETUP
    workdir: Path = ns.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    partner_log, service_log = prepare_logs(workdir, ["partner-b", "service-b"], ns.keep_logs)
    storage = ns.storage if ns.storage is not None else demo.fresh_sqlite(workdir, "demo-b.db")
    problem = storage_problem(storage)
    if problem is not None:
        print(f"demo: {problem}", file=sys.stderr)
        return EXIT_SETUP
    console.print(
        f"[bold]resilient-payout demo, Partner B[/]: {config.n} payouts of {DEMO_AMOUNT} KES at "
        f"{config.rate:g}/s, time scale {config.time_scale:g}, seed {seed}\n"
        f"  fake Partner B   {config.partner_url}  log {partner_log}\n"
        f"  example service  {config.api_url}  log {service_log}  (examples/partner_b adapter)\n"
        f"  app backend      http://{LOOPBACK}:{config.listen_port}  (the simulator, this process)"
    )
    scale = ["--time-scale", f"{config.time_scale:g}"]
    fake = ["examples.partner_b.fake", "--host", LOOPBACK, "--port", str(ns.partner_port),
            "--seed", str(seed), *scale]  # fmt: skip
    service = [
        *("examples.partner_b.service", "--host", LOOPBACK, "--port", str(ns.service_port)),
        *("--partner-url", config.partner_url, "--public-url", config.api_url),
        *("--client-url", f"http://{LOOPBACK}:{ns.client_port}", "--push-body", ns.push_body),
        *scale,
    ]
    env = {
        **os.environ,
        **no_proxy_for_loopback(),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "RP_STORAGE_URL": storage,
        # A fresh secret per run: the fake signs its webhooks with it, the service verifies.
        "PARTNER_B_SECRET": base64.b64encode(secrets.token_bytes(32)).decode(),
        "PARTNER_B_DEMO_AMOUNT": DEMO_AMOUNT,
    }

    def body(children: list[Child]) -> int:
        for name, args, log, ready in (
            ("fake Partner B", fake, partner_log, f"{config.partner_url}/_fake/stats"),
            ("example service", service, service_log, f"{config.api_url}/healthz"),
        ):
            children.append(_spawn(name, args, log, ready, env))
        if not wait_ready(children, console):
            return EXIT_SETUP
        return _simulate(ns, config, children, console, started)

    return supervise(console, body, lambda: f"{partner_log}, {service_log}")


def _spawn(name: str, args: list[str], log: Path, ready: str, env: dict[str, str]) -> Child:
    command = [sys.executable, "-m", *args]
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
    return Child(name, start(command, log, env), log, ready)


def _simulate(
    ns: argparse.Namespace,
    config: SimulatorConfig,
    children: list[Child],
    console: Console,
    started: float,
) -> int:
    import anyio

    from resilient_payout.testing.simulator import Simulator, render_summary, write_json

    with environ(no_proxy_for_loopback()):
        report = anyio.run(Simulator(config).run, not ns.no_progress)
    console.print(render_summary(report))
    if ns.json_path is not None:
        write_json(report, ns.json_path)
        console.print(f"report: {ns.json_path}")
    crashed = [c for c in children if c.proc.poll() is not None]
    for child in crashed:
        console.print(f"[red]{child.name} exited early with status {child.proc.returncode}[/]")
    ok = report.ok and not crashed
    verdict = "[bold green]OK[/]" if ok else "[bold red]NOT OK[/]"
    console.print(f"demo (Partner B) {verdict} in {time.monotonic() - started:.1f} s")
    return EXIT_OK if ok else EXIT_NOT_OK


def main() -> int:
    """``python -m examples.partner_b.demo [demo options]``."""
    from resilient_payout.cli import main as cli

    return cli(["demo", "--partner", "example-b", *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
