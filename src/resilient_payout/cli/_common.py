"""What every subcommand shares: exit codes, default ports, argument types, error output."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_NOT_OK, EXIT_SETUP, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

DEFAULT_PARTNER_PORT = 3000
DEFAULT_CLIENT_PORT = 3100
DEFAULT_SERVICE_PORT = 3200

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


def missing_extra(command: str, exc: ImportError, ns: argparse.Namespace) -> int:
    """The handler of a command whose optional dependency is not installed."""
    error(f"{command} needs an optional dependency ({exc}); install resilient-payout[example]")
    return EXIT_SETUP
