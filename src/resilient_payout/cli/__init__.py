"""The ``resilient-payout`` command: ``serve``, ``mock-partner``, ``simulate``, ``demo``,
``soak`` and ``simulate-reconciliation``, one module each.

``demo`` (what ``make demo`` runs) starts the mock partner and the example service as separate
processes, plays the mobile app against them with the simulator, prints the graded summary and
stops everything it started (docs/demo.md). ``soak`` does the same under load while SIGKILLing
the service every few seconds (docs/reliability.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .._errors import MissingExtra
from .._version import __version__
from . import demo, mock_partner, payouts, reconciliation, serve, simulate, soak
from ._common import (
    DEFAULT_CLIENT_PORT,
    DEFAULT_PARTNER_PORT,
    DEFAULT_SERVICE_PORT,
    EXIT_INTERRUPTED,
    EXIT_NOT_OK,
    EXIT_OK,
    EXIT_SETUP,
    EXIT_TERMINATED,
    as_missing_extra,
    error,
)
from ._procs import LOOPBACK
from .mock_partner import partner_config
from .serve import serve_settings
from .soak import SoakResult, run_soak

__all__ = [
    "DEFAULT_CLIENT_PORT",
    "DEFAULT_PARTNER_PORT",
    "DEFAULT_SERVICE_PORT",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_OK",
    "EXIT_OK",
    "EXIT_SETUP",
    "EXIT_TERMINATED",
    "LOOPBACK",
    "SoakResult",
    "build_parser",
    "main",
    "partner_config",
    "run_soak",
    "serve_settings",
]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand sets ``handler`` to the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="resilient-payout",
        description="Payouts through an unreliable partner: service, mock partner, simulator.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (serve, payouts, mock_partner, simulate, demo, reconciliation, soak):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_SETUP
    handler: Callable[[argparse.Namespace], int] = ns.handler
    try:
        return handler(ns)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:  # an optional dependency: one line, not a traceback
        missing = as_missing_extra(ns.command, exc)
        if missing is exc:
            raise
        error(str(missing))
        return EXIT_SETUP
    except MissingExtra as exc:
        error(str(exc))
        return EXIT_SETUP
