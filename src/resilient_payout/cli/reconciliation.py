"""``resilient-payout simulate-reconciliation``: status checks under a budget, virtual time."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``simulate-reconciliation`` subcommand (options and run: testing.reconciliation)."""
    from ..testing.reconciliation import add_arguments, run_from_args

    p = sub.add_parser(
        "simulate-reconciliation",
        help="virtual-time simulation of status checks under a budget (docs/reconciliation.md)",
        description="Simulate the reconciliation scheduler against a rate-limited partner on "
        "virtual time; prints the figures and writes JSON.",
    )
    add_arguments(p)
    p.set_defaults(handler=run_from_args)
