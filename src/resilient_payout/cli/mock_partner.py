"""``resilient-payout mock-partner``: the mock payment partner, every knob a flag."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import TYPE_CHECKING, Any

from ..testing._server import listen
from ._common import (
    DEFAULT_PARTNER_PORT,
    EXIT_OK,
    EXIT_SETUP,
    LOG_LEVELS,
    error,
    positive,
    tcp_port,
)
from ._procs import LOOPBACK, bind_problem, tune_gc

if TYPE_CHECKING:
    from ..testing.mock_partner import MockPartnerConfig

__all__ = ["add_parser", "partner_config", "run"]


def _seed(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _partner_fields() -> list[dataclasses.Field[Any]]:
    from ..testing.mock_partner import MockPartnerConfig

    return [
        f
        for f in dataclasses.fields(MockPartnerConfig)
        # The secret comes from RP_PARTNER_WEBHOOK_SECRET, never argv (which `ps` shows).
        if f.name not in ("seed", "time_scale", "webhook_secret", "honor_idempotency_key")
    ]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``mock-partner`` subcommand, with a flag per ``MockPartnerConfig`` field."""
    p = sub.add_parser(
        "mock-partner",
        help="run the mock payment partner",
        description="Serve the mock partner (docs/mock-partner.md) until Ctrl-C.",
    )
    add = p.add_argument
    add("--host", default=LOOPBACK, help="listen address (default: %(default)s)")
    add("--port", type=tcp_port, default=DEFAULT_PARTNER_PORT, help="(default: %(default)s)")
    add("--seed", type=_seed, default=0, help="int or str; same seed, same outcomes")
    add("--time-scale", type=positive, default=1.0, metavar="S", help="multiplies every duration")
    add("--log-level", choices=LOG_LEVELS, default="info")
    add(
        "--honor-idempotency-key",
        action="store_true",
        help="honour a POST's Idempotency-Key (the exercise's partner does not)",
    )
    behaviour = p.add_argument_group(
        "behaviour", "MockPartnerConfig fields; durations in unscaled seconds"
    )
    for f in _partner_fields():
        is_int = isinstance(f.default, int) and not isinstance(f.default, bool)
        behaviour.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=int if is_int else float,
            default=None,
            metavar="P" if f.name.startswith("p_") else "N" if is_int else "S",
            help=f"default: {f.default:.4g}",
        )
    p.set_defaults(handler=run)


def partner_config(ns: argparse.Namespace) -> MockPartnerConfig:
    """The ``MockPartnerConfig`` for ``mock-partner`` options (``ValueError``/``TypeError``)."""
    from ..testing.mock_partner import MockPartnerConfig

    given = {f.name: getattr(ns, f.name) for f in _partner_fields()}
    knobs = {name: value for name, value in given.items() if value is not None}
    secret = os.environ.get("RP_PARTNER_WEBHOOK_SECRET", "").strip() or None
    return MockPartnerConfig(
        seed=ns.seed,
        time_scale=ns.time_scale,
        webhook_secret=secret,
        honor_idempotency_key=ns.honor_idempotency_key,
        **knobs,
    )


def run(ns: argparse.Namespace) -> int:
    """Serve the mock partner until SIGINT/SIGTERM."""
    import anyio

    from ..testing.mock_partner import serve_mock_partner

    try:
        config = partner_config(ns)
    except (TypeError, ValueError) as exc:
        error(f"mock-partner: {exc}")
        return EXIT_SETUP
    try:
        listen(ns.host, ns.port).close()
    except OSError as exc:  # uvicorn would only log it and exit
        error(f"mock-partner: {bind_problem(ns.host, ns.port, exc)}")
        return EXIT_SETUP
    serve = functools.partial(serve_mock_partner, config, ns.host, ns.port, log_level=ns.log_level)
    tune_gc()
    try:
        anyio.run(serve)
    except RuntimeError as exc:
        error(f"mock-partner: {exc}")
        return EXIT_SETUP
    return EXIT_OK
