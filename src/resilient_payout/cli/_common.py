"""What every subcommand shares: exit codes, default ports, argument types, error output."""

from __future__ import annotations

import argparse
import sys

from .._errors import MissingExtra
from .._extras import explain_missing

EXIT_OK, EXIT_NOT_OK, EXIT_SETUP, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
"""Exit codes: success; the command ran but its result is not OK (e.g. a failed grade); bad
set-up (arguments, a missing extra); SIGINT; SIGTERM."""

DEFAULT_PARTNER_PORT = 3000
"""The mock partner's port (the scenario's)."""
DEFAULT_CLIENT_PORT = 3100
"""The simulated app backend's port, where final outcomes are pushed."""
DEFAULT_SERVICE_PORT = 3200
"""The payout service's port."""

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def tcp_port(text: str) -> int:
    """argparse type: a TCP port number."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"port must be within 1-65535, got {value}")
    return value


def positive(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def error(message: str) -> None:
    """Print ``resilient-payout: message`` to stderr."""
    print(f"resilient-payout: {message}", file=sys.stderr)


def missing_extra(
    command: str,
    exc: ImportError,
    ns: argparse.Namespace | None = None,
    extra: str | None = "example",
) -> int:
    """The handler of a command whose optional dependency is not installed: one line naming
    the ``pip install`` that adds it."""
    error(str(as_missing_extra(command, exc, extra)))
    return EXIT_SETUP


def as_missing_extra(command: str, exc: ImportError, extra: str | None = "example") -> ImportError:
    """``exc`` as a :class:`~resilient_payout.MissingExtra` of the subcommand ``command``
    (``extra``: the one to install; None: the missing module's own), or unchanged if it is not
    about an optional dependency."""
    if isinstance(exc, MissingExtra):
        return exc
    if isinstance(exc, ModuleNotFoundError):
        missing = explain_missing(exc, command, extra)
        if missing is not None:
            return missing
    return exc
