"""The ``simulate`` command line: options, their config, and one run with its summary.

:func:`add_arguments` and :func:`run_from_args` share one namespace (``json_path`` and
``no_progress`` are not config), so both live here; ``resilient-payout simulate`` embeds them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import anyio

from .config import PushShape, SimulatorConfig
from .driver import Simulator
from .render import render_summary
from .report import write_json

__all__ = ["add_arguments", "config_from_args", "run_cli", "run_from_args"]


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    d = SimulatorConfig()
    add = parser.add_argument
    add("--api", default=d.api_url, help="our service's base URL (default: %(default)s)")
    add("--partner", default=d.partner_url, help="mock partner's base URL (default: %(default)s)")
    add("-n", "--count", dest="n", type=int, default=d.n, help="payouts (default: %(default)s)")
    add("--rate", type=float, default=d.rate, help="payouts per second (default: %(default)s)")
    add(
        "--listen",
        type=_host_port,
        default=(d.listen_host, d.listen_port),
        metavar="HOST:PORT",
        help="push receiver address (default: 127.0.0.1:3100)",
    )
    add("--time-scale", type=float, default=d.time_scale, help="multiplies every duration")
    add("--seed", type=int, default=None, help="fixes repeats and delays (default: random)")
    add("--p-repeat-concurrent", type=float, default=d.p_repeat_concurrent, metavar="P")
    add("--p-repeat-late", type=float, default=d.p_repeat_late, metavar="P")
    add("--push-grace", type=float, default=d.push_grace, metavar="S", help="then GET ?wait=")
    add("--get-wait", type=float, default=d.get_wait, metavar="S")
    add("--deadline", type=float, default=d.deadline, metavar="S", help="per payout")
    add("--linger", type=float, default=d.linger, metavar="S", help="keep receiving pushes")
    add("--push-shape", choices=get_args(PushShape), default=d.push_shape)
    add("--prefer-wait", type=float, default=None, metavar="S", help="send Prefer: wait=S")
    add("--json", dest="json_path", type=Path, default=None, metavar="PATH", help="write report")
    add("--no-progress", action="store_true", help="no live progress bar")
    add(
        "--allow-remote",
        action="store_true",
        help="allow non-loopback URLs and listen address (e.g. between containers)",
    )


def config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """Build the config from parsed ``add_arguments`` options (ValueError if invalid)."""
    host, port = ns.listen
    return SimulatorConfig(
        api_url=ns.api,
        partner_url=ns.partner,
        n=ns.n,
        rate=ns.rate,
        p_repeat_concurrent=ns.p_repeat_concurrent,
        p_repeat_late=ns.p_repeat_late,
        push_grace=ns.push_grace,
        get_wait=ns.get_wait,
        deadline=ns.deadline,
        linger=ns.linger,
        seed=ns.seed,
        time_scale=ns.time_scale,
        listen_host=host,
        listen_port=port,
        push_shape=ns.push_shape,
        prefer_wait=ns.prefer_wait,
        allow_remote=ns.allow_remote,
    )


def run_from_args(ns: argparse.Namespace) -> int:
    """Run a simulation from ``add_arguments`` options and print the summary.

    Returns 0 if the run is ok, 1 if not, 2 on a setup error (bad option, busy port), 130 if
    interrupted.
    """
    from rich.console import Console

    console = Console()
    try:
        simulator = Simulator(config_from_args(ns))
    except ValueError as exc:
        console.print(f"[red]simulate: {exc}[/]")
        return 2
    try:
        report = anyio.run(simulator.run, not ns.no_progress)
    except OSError as exc:
        console.print(f"[red]simulate: {exc}[/]")
        return 2
    except KeyboardInterrupt:
        console.print("[red]simulate: interrupted[/]")
        return 130
    console.print(render_summary(report))
    if ns.json_path is not None:
        write_json(report, ns.json_path)
    return report.exit_code()


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="resilient-payout simulate",
        description="Play the mobile app against a payout service and grade every outcome.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
