"""``resilient-payout simulate``: the mobile app against a running service, graded."""

from __future__ import annotations

import argparse
import functools

from ._common import missing_extra

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``simulate`` subcommand: the simulator's own options."""
    p = sub.add_parser(
        "simulate",
        help="play the mobile app against a running service and grade every outcome",
        description="Play the mobile app against a service and the mock partner "
        "(docs/simulator.md). Exit 0 if every outcome is correct, 1 if not, 2 on a setup error.",
    )
    try:
        from ..testing.simulator import add_arguments
    except ImportError as exc:  # starlette comes with the 'testing' or 'server' extra
        p.set_defaults(handler=functools.partial(missing_extra, "simulate", exc))
        return
    add_arguments(p)
    p.set_defaults(handler=run)


def run(ns: argparse.Namespace) -> int:
    """Run the simulator; its exit status."""
    from ..testing.simulator import run_from_args

    return run_from_args(ns)
