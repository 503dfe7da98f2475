"""``resilient-payout serve``: the example service (FastAPI on uvicorn).

Settings come from :mod:`resilient_payout.settings` and the storage is opened once with
:func:`resilient_payout.wiring.open_storage` before uvicorn starts, so that bad settings, a
missing extra or a storage that cannot open are one line on stderr and exit status 2, never a
traceback from the lifespan.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

from .._errors import StorageError
from ..settings import ServiceSettings
from ..testing._server import listen
from ._common import (
    EXIT_NOT_OK,
    EXIT_OK,
    EXIT_SETUP,
    LOG_LEVELS,
    as_missing_extra,
    error,
    missing_extra,
    positive,
    tcp_port,
)
from ._procs import STOP_TIMEOUT_S, bind_problem, tune_gc

__all__ = ["SERVE_ENV", "add_parser", "run", "serve_settings", "storage_problem"]

SERVE_ENV = {
    "host": "RP_HOST",
    "port": "RP_PORT",
    "storage": "RP_STORAGE_URL",
    "partner_url": "RP_PARTNER_URL",
    "public_url": "RP_PUBLIC_URL",
    "client_url": "RP_CLIENT_URL",
    "push_body": "RP_PUSH_BODY",
    "time_scale": "RP_TIME_SCALE",
    "check_rate": "RP_CHECK_RATE",
    "check_burst": "RP_CHECK_BURST",
    "budget_url": "RP_BUDGET_URL",
    "max_wait": "RP_MAX_WAIT",
}
"""``serve`` flag (dest) -> the variable ``ServiceSettings.from_env()`` reads it from."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="run the example payout service (FastAPI + uvicorn)",
        description="Run the example service. Settings come from RP_* environment variables "
        "(ServiceSettings.from_env()); each flag given overrides its variable.",
    )
    add = p.add_argument
    add("--host", help="listen address (RP_HOST)")
    add("--port", type=tcp_port, help="listen port (RP_PORT)")
    add("--storage", metavar="URL", help="storage URL (RP_STORAGE_URL), e.g. sqlite:///payouts.db")
    add("--partner-url", metavar="URL", help="the partner's base URL (RP_PARTNER_URL)")
    add("--public-url", metavar="URL", help="our URL as the partner reaches it (RP_PUBLIC_URL)")
    add(
        "--client-url", metavar="URL", help="the app backend outcomes are pushed to (RP_CLIENT_URL)"
    )
    add("--push-body", choices=("flat", "nested"), help="push body shape (RP_PUSH_BODY)")
    add("--time-scale", type=positive, metavar="S", help="multiplies every duration")
    add("--check-rate", type=positive, metavar="R", help="status checks per second")
    add("--check-burst", type=int, metavar="N", help="status check burst")
    add(
        "--budget-url",
        metavar="URL",
        help="Redis URL of a status-check budget shared by every instance (RP_BUDGET_URL; "
        "key RP_BUDGET_KEY); default: one budget per process",
    )
    add("--max-wait", type=float, metavar="S", help="longest GET ?wait= honoured (RP_MAX_WAIT)")
    add("--log-level", choices=LOG_LEVELS, default="info")
    add("--access-log", action="store_true", help="log every request")
    p.set_defaults(handler=run)


def serve_settings(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServiceSettings:
    """The ``ServiceSettings`` for ``serve`` options: ``environ`` (default ``os.environ``) with
    each flag given replacing its variable. ``ValueError`` if invalid."""
    # Flags are read as their variables, so from_env() stays the one place that parses settings.
    env = dict(os.environ if environ is None else environ)
    for dest, var in SERVE_ENV.items():
        value = getattr(ns, dest)
        if value is not None:
            env[var] = str(value)
    return ServiceSettings.from_env(env)


def run(ns: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    try:
        import uvicorn

        from ..service import create_app
    except ImportError as exc:
        return missing_extra("serve", exc, ns, extra="server")
    try:
        settings = serve_settings(ns)
        app = create_app(settings)
    except ImportError as exc:  # a storage URL whose driver is not installed
        return missing_extra("serve", exc, ns, extra=None)
    except ValueError as exc:  # pydantic's ValidationError and MissingExtra included
        error(f"serve: {exc}")
        return EXIT_SETUP
    problem = storage_problem(settings.storage_url)
    if problem is not None:
        error(f"serve: {problem}")
        return EXIT_SETUP
    host, port = str(settings.host), int(settings.port)
    try:
        sock = listen(host, port)
    except OSError as exc:
        error(f"serve: {bind_problem(host, port, exc)}")
        return EXIT_SETUP
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            log_level=ns.log_level,
            log_config=_log_config(ns.log_level),
            access_log=ns.access_log,
            timeout_graceful_shutdown=STOP_TIMEOUT_S,
        )
    )
    tune_gc()
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        error("serve: the service failed to start (see the log above)")
        return EXIT_NOT_OK
    return EXIT_OK


def storage_problem(url: str) -> str | None:
    """Why the storage at ``url`` cannot open (one line, never a password), or None: opened
    and closed again, so that the service's lifespan finds it ready."""
    if url.lower().startswith("memory:"):
        return None
    import anyio

    from ..storage import storage_from_url
    from ..wiring import open_storage

    async def probe() -> None:
        storage = await open_storage(storage_from_url(url), url)
        await storage.close()

    try:
        anyio.run(probe)
    except StorageError as exc:
        return str(exc)
    except ImportError as exc:  # a storage driver that is not installed
        return str(as_missing_extra("serve", exc, None))
    return None


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config, with the library's loggers on uvicorn's handler and format."""
    import uvicorn.config

    base = uvicorn.config.LOGGING_CONFIG
    library = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {**base, "loggers": {**base["loggers"], "resilient_payout": library}}
