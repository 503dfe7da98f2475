"""``resilient-payout serve``: the example service (FastAPI on uvicorn).

Settings come from :mod:`resilient_payout.settings` and the storage is opened once with
:func:`resilient_payout.wiring.open_storage` before uvicorn starts, so that bad settings, a
missing extra or a storage that cannot open are one line on stderr and exit status 2, never a
traceback from the lifespan.

Stopping (docs/deploying.md): the first SIGTERM or SIGINT starts the client's drain at once
(``/readyz`` turns 503, new submits are 503 ``shutting-down``), ``RP_SHUTDOWN_DELAY`` seconds
later uvicorn stops listening and waits for open requests, then the lifespan leaves the client,
which waits for its partner calls and pushes (``Policy.drain_timeout``) and hands the rest over;
exit status 0. A second signal, or SIGQUIT, exits at once, as a crash would.

``--workers N`` (``RP_WORKERS``): this process binds the socket and supervises N copies of
itself that inherit it (:class:`~._procs.WorkerPool`), each with its own client on the same
storage, named ``<RP_INSTANCE_ID or host name>-<i>``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

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
from ._procs import STOP_TIMEOUT_S, WorkerPool, bind_problem, die_with_parent_hook, tune_gc

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

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
    "workers": "RP_WORKERS",
    "shutdown_delay": "RP_SHUTDOWN_DELAY",
}
"""``serve`` flag (dest) -> the variable ``ServiceSettings.from_env()`` reads it from."""

LOOPS = ("auto", "asyncio", "uvloop")
HTTP_IMPLEMENTATIONS = ("auto", "h11", "httptools")
_SOCKET_FD_VAR = "_RP_SERVE_SOCKET_FD"
"""Set by the supervisor in a worker's environment: the inherited listening socket."""

log = logging.getLogger("resilient_payout.serve")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        help="run the example payout service (FastAPI + uvicorn)",
        description="Run the example service. Settings come from RP_* environment variables "
        "(ServiceSettings.from_env()); each flag given overrides its variable. SIGTERM drains "
        "(readiness 503 at once, the listener closes after the shutdown delay); a second "
        "signal exits at once.",
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
    add(
        "--workers",
        type=int,
        metavar="N",
        help="processes sharing the listening socket, each its own client (RP_WORKERS; 1)",
    )
    add(
        "--shutdown-delay",
        type=float,
        metavar="S",
        help="seconds from SIGTERM (readiness 503) until the listener closes (RP_SHUTDOWN_DELAY)",
    )
    add(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop; auto: uvloop if installed (default)",
    )
    add(
        "--http",
        choices=HTTP_IMPLEMENTATIONS,
        default="auto",
        help="HTTP parser; auto: httptools if installed (default)",
    )
    add("--log-level", choices=LOG_LEVELS, default="info")
    add("--access-log", action="store_true", help="log every request")
    p.set_defaults(handler=run)


def serve_settings(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServiceSettings:
    """The ``ServiceSettings`` for ``serve`` options: ``environ`` (default ``os.environ``) with
    each flag given replacing its variable. ``ValueError`` if invalid."""
    return ServiceSettings.from_env(_serve_environ(ns, environ))


def _serve_environ(ns: argparse.Namespace, environ: Mapping[str, str] | None) -> dict[str, str]:
    # Flags are read as their variables, so from_env() stays the one place that parses settings.
    env = dict(os.environ if environ is None else environ)
    for dest, var in SERVE_ENV.items():
        value = getattr(ns, dest, None)
        if value is not None:
            env[var] = str(value)
    return env


def run(ns: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (drained: exit status 0)."""
    try:
        import uvicorn  # noqa: F401 - the [server] extra, checked before anything starts

        from ..service import create_app
    except ImportError as exc:
        return missing_extra("serve", exc, ns, extra="server")
    inherited = os.environ.pop(_SOCKET_FD_VAR, None)
    try:
        settings = serve_settings(ns)
        app = create_app(settings)
    except ImportError as exc:  # a storage URL whose driver is not installed
        return missing_extra("serve", exc, ns, extra=None)
    except ValueError as exc:  # pydantic's ValidationError and MissingExtra included
        error(f"serve: {exc}")
        return EXIT_SETUP
    problem = _implementation_problem(ns.loop, ns.http)
    if (
        problem is None
        and settings.workers > 1
        and settings.storage_url.lower().startswith("memory:")
    ):
        problem = (
            "memory:// storage cannot be shared by --workers: each worker would keep its own "
            "payouts; use sqlite:///FILE or postgresql://"
        )
    if problem is None and inherited is None:  # a worker: its supervisor has checked
        problem = storage_problem(settings.storage_url)
    if problem is not None:
        error(f"serve: {problem}")
        return EXIT_SETUP
    if inherited is not None:
        return _serve(ns, settings, app, socket.socket(fileno=int(inherited)), worker=True)
    host, port = str(settings.host), int(settings.port)
    try:
        sock = listen(host, port)
    except OSError as exc:
        error(f"serve: {bind_problem(host, port, exc)}")
        return EXIT_SETUP
    if settings.workers > 1:
        with sock:
            return _supervise(ns, settings, sock)
    return _serve(ns, settings, app, sock)


def _serve(
    ns: argparse.Namespace,
    settings: ServiceSettings,
    app: FastAPI,
    sock: socket.socket,
    worker: bool = False,
) -> int:
    """One server process on ``sock`` until it is stopped (``worker``: a supervisor's)."""
    import uvicorn

    loop, http = _resolve(ns.loop, "uvloop"), _resolve(ns.http, "httptools")
    drain_timeout = settings.policy().drain_timeout
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level=ns.log_level,
        log_config=_log_config(ns.log_level),
        access_log=ns.access_log,
        loop=loop,
        http=http,
        # Open requests get as long as the whole drain could take (long-polls return at once
        # when it begins); the uvicorn wait is bounded, never the reason a process hangs.
        timeout_graceful_shutdown=max(
            STOP_TIMEOUT_S, math.ceil(settings.shutdown_delay + drain_timeout)
        ),
    )
    server = _draining_server()(config, app, settings.shutdown_delay, worker)
    tune_gc()
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        error("serve: the service failed to start (see the log above)")
        return EXIT_NOT_OK
    return EXIT_OK


@functools.cache
def _draining_server() -> Callable[[uvicorn.Config, FastAPI, float, bool], uvicorn.Server]:
    """uvicorn's server class, stopped the payout way (defined on first use: uvicorn is an
    extra)."""
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """Drain first, stop listening ``shutdown_delay`` seconds later.

        uvicorn's own ``handle_exit`` stops listening at once, and re-raises the signal once
        shut down (status 143, not 0); a load balancer would send requests to a process that
        no longer listens until it notices readiness is gone, which is what the delay is for.
        """

        def __init__(
            self, config: uvicorn.Config, app: FastAPI, shutdown_delay: float, worker: bool
        ) -> None:
            super().__init__(config)
            self.app = app
            self.delay = shutdown_delay
            self.worker = worker
            self.signals = 0
            self.loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            log.info("event loop %s, HTTP %s", self.config.loop, self.config.http)
            if threading.current_thread() is not threading.main_thread():
                await super().serve(sockets=sockets)  # uvicorn sets no handlers there either
                return
            previous = signal.signal(signal.SIGQUIT, self.exit_now)
            try:
                await super().serve(sockets=sockets)
            finally:
                signal.signal(signal.SIGQUIT, previous)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            self.signals += 1
            if self.signals > 1:
                # A worker's supervisor forwards every stop signal, and a service manager may
                # signal the whole group too: a worker is forced out by SIGQUIT only.
                if not self.worker:
                    self.exit_now(sig, frame)
                return
            if self.loop is None:
                self.should_exit = True
                return
            try:
                # Out of the signal handler onto the loop: begin_drain sets the loop's events.
                self.loop.call_soon_threadsafe(self.drain, signal.Signals(sig).name)
            except RuntimeError:  # the loop has closed: nothing left to drain
                self.should_exit = True

        def drain(self, signame: str) -> None:
            client = getattr(self.app.state, "payout_client", None)
            if client is not None:
                client.begin_drain()
            log.info(
                "%s: draining (readiness 503, new submits refused); closing the listener in %g s",
                signame,
                self.delay,
            )
            assert self.loop is not None
            self.loop.call_later(self.delay, self.stop)

        def stop(self) -> None:
            self.should_exit = True

        def exit_now(self, sig: int, frame: FrameType | None) -> None:
            # Like a crash: what this process held is recovered by its successor (same
            # RP_INSTANCE_ID) or taken over by another instance (docs/reliability.md).
            log.warning("%s: exiting now, without draining", signal.Signals(sig).name)
            os._exit(128 + sig)

    return DrainingServer


def _supervise(ns: argparse.Namespace, settings: ServiceSettings, sock: socket.socket) -> int:
    """``settings.workers`` copies of this command on ``sock``, supervised until stopped."""
    import logging.config

    logging.config.dictConfig(_log_config(ns.log_level))
    n = settings.workers
    base = settings.instance_id or socket.gethostname()
    env = _serve_environ(ns, None)
    env.update({"RP_WORKERS": "1", _SOCKET_FD_VAR: str(sock.fileno())})
    if not settings.budget_url:
        # Each worker has a budget of its own: together they must not check N times too often.
        env["RP_CHECK_RATE"] = repr(settings.check_rate / n)
        log.info(
            "%d workers without RP_BUDGET_URL: each checks at %g/s (RP_CHECK_RATE %g / %d); "
            "set RP_BUDGET_URL to share one budget",
            n,
            settings.check_rate / n,
            settings.check_rate,
            n,
        )
    command = [sys.executable, "-m", "resilient_payout.cli", "serve", "--log-level", ns.log_level]
    command += ["--loop", ns.loop, "--http", ns.http]
    if ns.access_log:
        command.append("--access-log")

    def start(i: int) -> subprocess.Popen[bytes]:
        named = {**env, "RP_INSTANCE_ID": f"{base}-{i}"}
        proc = subprocess.Popen(  # noqa: S603 - our own command line
            command,
            stdin=subprocess.DEVNULL,
            env=named,
            pass_fds=(sock.fileno(),),
            # Out of our group: a Ctrl-C reaches only us, and we forward it once.
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),  # safe: this process runs no threads
        )
        log.info("worker %d (pid %d) started as instance %s-%d", i, proc.pid, base, i)
        return proc

    log.info("serving on %s:%d: %d workers (pid %d)", settings.host, settings.port, n, os.getpid())
    pool = WorkerPool(start=start, size=n, log=log.info, on_stop=sock.close)
    return pool.run()


def _implementation_problem(loop: str, http: str) -> str | None:
    """Why an explicitly chosen ``--loop``/``--http`` cannot be used, or None."""
    for flag, value in (("--loop", loop), ("--http", http)):
        if value in ("uvloop", "httptools") and importlib.util.find_spec(value) is None:
            return f"{flag} {value}: {value} is not installed (pip install {value})"
    return None


def _resolve(choice: str, fast: str) -> str:
    """``auto`` -> ``fast`` if it is installed, else the standard library's choice."""
    if choice != "auto":
        return choice
    if importlib.util.find_spec(fast) is not None:
        return fast
    return "asyncio" if fast == "uvloop" else "h11"


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
