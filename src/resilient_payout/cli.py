"""The ``resilient-payout`` command: ``serve``, ``mock-partner``, ``simulate`` and ``demo``.

``demo`` (what ``make demo`` runs) starts the mock partner and the example service as separate
processes, plays the mobile app against them with the simulator, prints the graded summary and
stops everything it started. See ``docs/demo.md``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import errno
import functools
import gc
import json
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._urls import redact_url as _redact
from ._version import __version__

if TYPE_CHECKING:
    from rich.console import Console

    from .fastapi import ServiceSettings
    from .testing.mock_partner import MockPartnerConfig
    from .testing.simulator import SimulationReport, SimulatorConfig

__all__ = ["build_parser", "main", "partner_config", "serve_settings"]

LOOPBACK = "127.0.0.1"
DEFAULT_PARTNER_PORT = 3000
DEFAULT_CLIENT_PORT = 3100
DEFAULT_SERVICE_PORT = 3200

EXIT_OK, EXIT_NOT_OK, EXIT_SETUP, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143

_READY_TIMEOUT_S = 30.0
_DEMO_DEADLINE = 600.0
"""Scenario seconds the demo's app waits for a payout's outcome. The service's slowest correct
path is two POSTs that both time out, each followed by its late-arrival window and a confirming
check (about 2 x (150 + 2) s by the default policy), which the simulator's 300 s would cut short."""
_STOP_TIMEOUT_S = 5
_GC_FULL_EVERY = 1000  # gen-1 collections per full one (CPython: 10)
_LOG_TAIL_LINES = 15
_MIN_RETRY_S = 0.05
"""The simulator spaces POST retries at least this far apart (its ``_MIN_POLL_S``)."""
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

_SERVE_ENV = {
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


# -- argument types -------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"port must be within 1-65535, got {value}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _seed(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each subcommand sets ``handler`` to the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="resilient-payout",
        description="Payouts through an unreliable partner: service, mock partner, simulator.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_mock_partner(sub)
    _add_simulate(sub)
    _add_demo(sub)
    _add_simulate_reconciliation(sub)
    _add_soak(sub)
    return parser


def _kill_every(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        bounds = (float(low), float(high) if sep else float(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a range of seconds like 3-10: {text!r}") from None
    if not 0 < bounds[0] <= bounds[1] < float("inf"):
        raise argparse.ArgumentTypeError(f"need 0 < MIN <= MAX, got {text}")
    return bounds


def _add_soak(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "soak",
        help="demo under load with the service SIGKILLed and restarted every few seconds",
        description="Run the mock partner (time-scaled) and the example service as subprocesses, "
        "load the service with the simulator for --minutes while it is SIGKILLed every "
        "--kill-every seconds (random, seeded) and restarted on the same port, then grade every "
        "transfer against the partner. Exit 0 if nothing is wrong, missing, conflicting or paid "
        "twice and the partner never blocked us, 1 if not, 2 on a setup error.",
    )
    add = p.add_argument
    add("--minutes", type=_positive, default=5.0, help="load duration (default: %(default)g)")
    # Not 0.05 as in the demo: a restarting process stalls its loop ~100 ms, which at 0.05 is two
    # scenario seconds in which budgeted checks bunch up at the partner (docs/reliability.md).
    add("--time-scale", type=_positive, default=0.1, metavar="S", help="(default: %(default)g)")
    add(
        "--kill-every",
        type=_kill_every,
        default=(3.0, 10.0),
        metavar="MIN-MAX",
        help="clock seconds between kills, drawn uniformly (default: 3-10)",
    )
    add(
        "--rate",
        type=_positive,
        default=1.0,
        help="payouts per scenario second (default: %(default)g, i.e. 10/s at scale 0.1)",
    )
    add("--storage", metavar="URL", help="default: a fresh SQLite file WORKDIR/soak.db")
    add("--seed", type=int, default=None, help="fixes kills, partner outcomes and app repeats")
    add("--json", dest="json_path", type=Path, metavar="PATH", help="also write the report")
    add("--workdir", type=Path, default=Path(".soak"), metavar="DIR", help="(default: .soak)")
    add("--progress", action="store_true", help="live progress bar")
    p.set_defaults(handler=_cmd_soak)


def _add_simulate_reconciliation(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .testing.reconciliation import add_arguments, run_from_args

    p = sub.add_parser(
        "simulate-reconciliation",
        help="virtual-time simulation of status checks under a budget (docs/reconciliation.md)",
        description="Simulate the reconciliation scheduler against a rate-limited partner on "
        "virtual time; prints the figures and writes JSON.",
    )
    add_arguments(p)
    p.set_defaults(handler=run_from_args)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the example payout service (FastAPI + uvicorn)",
        description="Run the example service. Settings come from RP_* environment variables "
        "(ServiceSettings.from_env()); each flag given overrides its variable.",
    )
    add = p.add_argument
    add("--host", help="listen address (RP_HOST)")
    add("--port", type=_port, help="listen port (RP_PORT)")
    add("--storage", metavar="URL", help="storage URL (RP_STORAGE_URL), e.g. sqlite:///payouts.db")
    add("--partner-url", metavar="URL", help="the partner's base URL (RP_PARTNER_URL)")
    add("--public-url", metavar="URL", help="our URL as the partner reaches it (RP_PUBLIC_URL)")
    add(
        "--client-url", metavar="URL", help="the app backend outcomes are pushed to (RP_CLIENT_URL)"
    )
    add("--push-body", choices=("flat", "nested"), help="push body shape (RP_PUSH_BODY)")
    add("--time-scale", type=_positive, metavar="S", help="multiplies every duration")
    add("--check-rate", type=_positive, metavar="R", help="status checks per second")
    add("--check-burst", type=int, metavar="N", help="status check burst")
    add(
        "--budget-url",
        metavar="URL",
        help="Redis URL of a status-check budget shared by every instance (RP_BUDGET_URL; "
        "key RP_BUDGET_KEY); default: one budget per process",
    )
    add("--max-wait", type=float, metavar="S", help="longest GET ?wait= honoured (RP_MAX_WAIT)")
    add("--log-level", choices=_LOG_LEVELS, default="info")
    add("--access-log", action="store_true", help="log every request")
    p.set_defaults(handler=_cmd_serve)


def _partner_fields() -> list[dataclasses.Field[Any]]:
    from .testing.mock_partner import MockPartnerConfig

    return [
        f
        for f in dataclasses.fields(MockPartnerConfig)
        # The secret comes from RP_PARTNER_WEBHOOK_SECRET, never argv (which `ps` shows).
        if f.name not in ("seed", "time_scale", "webhook_secret")
    ]


def _add_mock_partner(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "mock-partner",
        help="run the mock payment partner",
        description="Serve the mock partner (docs/mock-partner.md) until Ctrl-C.",
    )
    add = p.add_argument
    add("--host", default=LOOPBACK, help="listen address (default: %(default)s)")
    add("--port", type=_port, default=DEFAULT_PARTNER_PORT, help="(default: %(default)s)")
    add("--seed", type=_seed, default=0, help="int or str; same seed, same outcomes")
    add("--time-scale", type=_positive, default=1.0, metavar="S", help="multiplies every duration")
    add("--log-level", choices=_LOG_LEVELS, default="info")
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
    p.set_defaults(handler=_cmd_mock_partner)


def _add_simulate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="play the mobile app against a running service and grade every outcome",
        description="Play the mobile app against a service and the mock partner "
        "(docs/simulator.md). Exit 0 if every outcome is correct, 1 if not, 2 on a setup error.",
    )
    try:
        from .testing.simulator import add_arguments
    except ImportError as exc:  # starlette comes with the 'testing' or 'server' extra
        p.set_defaults(handler=functools.partial(_missing_extra, "simulate", exc))
        return
    add_arguments(p)
    p.set_defaults(handler=_cmd_simulate)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="mock partner + example service + simulated app; prints a graded summary",
        description="Start the mock partner and the example service as subprocesses, run the "
        "simulator against them, print the summary and stop everything. Exit 0 if every outcome "
        "is correct with no double payment and no block, 1 if not, 2 on a setup error "
        "(bad option, port in use, a process that did not start), 130 if interrupted.",
    )
    add = p.add_argument
    add(
        "--time-scale",
        type=_positive,
        default=0.05,
        metavar="S",
        help="multiplies every duration of partner, service and app; 1 = real partner time "
        "(default: %(default)s)",
    )
    add("-n", "--count", dest="n", type=int, default=200, help="payouts (default: %(default)s)")
    add("--rate", type=_positive, default=10.0, help="payouts per scenario second (default: 10)")
    add(
        "--storage",
        metavar="URL",
        help="the service's storage (default: a fresh SQLite file WORKDIR/demo.db)",
    )
    add("--seed", type=int, default=None, help="fixes partner outcomes and app repeats")
    add(
        "--deadline",
        type=_positive,
        default=_DEMO_DEADLINE,
        metavar="S",
        help="scenario seconds to wait for each payout's outcome (default: %(default)g)",
    )
    add("--json", dest="json_path", type=Path, metavar="PATH", help="also write the report")
    add("--keep-logs", action="store_true", help="keep earlier logs (renamed) instead of replacing")
    add(
        "--push-body",
        choices=("flat", "nested"),
        default="flat",
        help="shape of the service's pushes, enforced by the app (default: %(default)s)",
    )
    add(
        "--partner-port",
        type=_port,
        default=DEFAULT_PARTNER_PORT,
        metavar="PORT",
        help="mock partner (default: %(default)s)",
    )
    add(
        "--service-port",
        type=_port,
        default=DEFAULT_SERVICE_PORT,
        metavar="PORT",
        help="example service (default: %(default)s)",
    )
    add(
        "--client-port",
        type=_port,
        default=DEFAULT_CLIENT_PORT,
        metavar="PORT",
        help="app backend (simulator) (default: %(default)s)",
    )
    add(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        metavar="DIR",
        help="logs and the default database (default: .demo)",
    )
    add(
        "--instances",
        type=int,
        default=1,
        metavar="N",
        help="service processes; above 1 they share the storage and sit behind a router on "
        "--service-port that sends each request and webhook to a random one (default: 1)",
    )
    add(
        "--budget-url",
        metavar="URL",
        help="with --instances above 1: Redis URL of one shared check budget (a fresh key per "
        "run); without it each instance gets 1/N of the check rate",
    )
    add("--no-progress", action="store_true", help="no live progress bar")
    p.set_defaults(handler=_cmd_demo)


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


def _error(message: str) -> None:
    print(f"resilient-payout: {message}", file=sys.stderr)


def _missing_extra(command: str, exc: ImportError, ns: argparse.Namespace) -> int:
    _error(f"{command} needs an optional dependency ({exc}); install resilient-payout[example]")
    return EXIT_SETUP


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a busy port is an ``OSError`` here, not a server's ``sys.exit``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    # create_server's socket does not say it is TCP, so asyncio would leave Nagle on for the
    # connections it accepts: ~40 ms added to every small response.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _port_free(host: str, port: int) -> bool:
    try:
        _listen(host, port).close()
    except OSError:
        return False
    return True


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host}"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


@contextlib.contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- serve ----------------------------------------------------------------------------------


def serve_settings(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServiceSettings:
    """The ``ServiceSettings`` for ``serve`` options: ``environ`` (default ``os.environ``) with
    each flag given replacing its variable. ``ValueError`` if invalid."""
    from .fastapi import ServiceSettings

    # Flags are read as their variables, so from_env() stays the one place that parses settings.
    env = dict(os.environ if environ is None else environ)
    for dest, var in _SERVE_ENV.items():
        value = getattr(ns, dest)
        if value is not None:
            env[var] = str(value)
    return ServiceSettings.from_env(env)


def _tune_gc() -> None:
    """Fewer, shorter full garbage collections for a long-running server process.

    With ~1,300 payouts in flight the heap holds ~250,000 tracked objects, and each full (gen-2)
    collection stopped the event loop for 100-190 ms, several times in 16 s: most of the POST
    p99 at 300/s (docs/performance.md). Objects made before serving (modules, the app, schemas)
    are moved out of the collector's way (``gc.freeze``), and a full collection waits for 100x
    more gen-1 collections than CPython's default (about every 7 million net allocations, a few
    thousand payouts); young collections are unchanged, so short-lived cycles go as before.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, _GC_FULL_EVERY)


def _cmd_serve(ns: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .fastapi import create_app
    except ImportError as exc:
        return _missing_extra("serve", exc, ns)
    try:
        settings = serve_settings(ns)
        app = create_app(settings)
    except ValueError as exc:  # pydantic's ValidationError included
        _error(f"serve: {exc}")
        return EXIT_SETUP
    host, port = str(settings.host), int(settings.port)
    try:
        sock = _listen(host, port)
    except OSError as exc:
        _error(f"serve: {_bind_problem(host, port, exc)}")
        return EXIT_SETUP
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            log_level=ns.log_level,
            log_config=_log_config(ns.log_level),
            access_log=ns.access_log,
            timeout_graceful_shutdown=_STOP_TIMEOUT_S,
        )
    )
    _tune_gc()
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        _error("serve: the service failed to start (see the log above)")
        return EXIT_NOT_OK
    return EXIT_OK


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging config, with the library's loggers on uvicorn's handler and format."""
    import uvicorn.config

    base = uvicorn.config.LOGGING_CONFIG
    library = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {**base, "loggers": {**base["loggers"], "resilient_payout": library}}


# -- mock-partner ---------------------------------------------------------------------------


def partner_config(ns: argparse.Namespace) -> MockPartnerConfig:
    """The ``MockPartnerConfig`` for ``mock-partner`` options (``ValueError``/``TypeError``)."""
    from .testing.mock_partner import MockPartnerConfig

    given = {f.name: getattr(ns, f.name) for f in _partner_fields()}
    knobs = {name: value for name, value in given.items() if value is not None}
    secret = os.environ.get("RP_PARTNER_WEBHOOK_SECRET", "").strip() or None
    return MockPartnerConfig(seed=ns.seed, time_scale=ns.time_scale, webhook_secret=secret, **knobs)


def _cmd_mock_partner(ns: argparse.Namespace) -> int:
    import anyio

    from .testing.mock_partner import serve_mock_partner

    try:
        config = partner_config(ns)
    except (TypeError, ValueError) as exc:
        _error(f"mock-partner: {exc}")
        return EXIT_SETUP
    try:
        _listen(ns.host, ns.port).close()
    except OSError as exc:  # uvicorn would only log it and exit
        _error(f"mock-partner: {_bind_problem(ns.host, ns.port, exc)}")
        return EXIT_SETUP
    serve = functools.partial(serve_mock_partner, config, ns.host, ns.port, log_level=ns.log_level)
    _tune_gc()
    try:
        anyio.run(serve)
    except RuntimeError as exc:
        _error(f"mock-partner: {exc}")
        return EXIT_SETUP
    return EXIT_OK


# -- simulate -------------------------------------------------------------------------------


def _cmd_simulate(ns: argparse.Namespace) -> int:
    from .testing.simulator import run_from_args

    return run_from_args(ns)


# -- demo -----------------------------------------------------------------------------------


class _Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP during a demo. A KeyboardInterrupt, because asyncio lets only that and
    SystemExit out of a running loop instead of logging them: the demo must reach its cleanup."""


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready_url: str


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send SIGTERM to the child when the demo dies.

    The demo stops its children itself, even on Ctrl-C or SIGTERM; this covers SIGKILL (a test
    timeout, an OOM kill), which no cleanup code survives. (A ``preexec_fn`` is unsafe with
    threads; the demo starts its children before it starts any.)
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the demo died before prctl: nobody would stop us
            os._exit(1)

    return hook


def _spawn(name: str, args: list[str], log: Path, ready_url: str, env: Mapping[str, str]) -> _Child:
    command = [sys.executable, "-m", "resilient_payout.cli", *args]
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            # Its own process group: Ctrl-C reaches only the demo, which then stops the children
            # itself, and a stop signal reaches everything the child may have started.
            start_new_session=True,
            preexec_fn=_die_with_parent_hook(),
        )
    return _Child(name, proc, log, ready_url)


def _signal_group(child: _Child, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, sig)


def _stop(children: Sequence[_Child], console: Console) -> None:
    """SIGTERM every child's process group, then SIGKILL those still running after a timeout."""
    running = [c for c in children if c.proc.poll() is None]
    for child in running:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for child in running:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{child.name} did not stop in {_STOP_TIMEOUT_S:g} s: killed[/]")
            _signal_group(child, signal.SIGKILL)
            child.proc.wait()


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _wait_ready(children: Sequence[_Child], console: Console) -> bool:
    """Poll each child's readiness URL (bounded); False, with its log's tail, if one fails."""
    import httpx

    deadline = time.monotonic() + _READY_TIMEOUT_S
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        for child in children:
            while True:
                code = child.proc.poll()
                if code is not None:
                    problem = f"{child.name} exited with status {code} while starting"
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(child.ready_url).status_code == 200:
                        problem = ""
                        break
                if time.monotonic() >= deadline:
                    problem = f"{child.name} not ready after {_READY_TIMEOUT_S:g} s"
                    break
                time.sleep(0.1)
            if problem:
                console.print(f"[red]demo: {problem}; the end of {child.log}:[/]", soft_wrap=True)
                console.print(_log_tail(child.log), markup=False, highlight=False, soft_wrap=True)
                return False
    return True


def _prepare_logs(workdir: Path, names: Sequence[str], keep: bool) -> list[Path]:
    logs = []
    for name in names:
        log = workdir / f"{name}.log"
        if keep and log.exists():
            stamp = datetime.fromtimestamp(log.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
            target, n = workdir / f"{name}.{stamp}.log", 1
            while target.exists():
                n += 1
                target = workdir / f"{name}.{stamp}-{n}.log"
            log.rename(target)
        log.write_bytes(b"")
        logs.append(log)
    return logs


def _fresh_sqlite(workdir: Path, name: str = "demo.db") -> str:
    """The URL of an empty SQLite file in ``workdir`` (the last run's file is deleted)."""
    db = workdir / name
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{db}"


def _demo_config(ns: argparse.Namespace, seed: int) -> SimulatorConfig | str:
    """The simulator's config, or why the options are refused."""
    from .testing.simulator import SimulatorConfig

    ports = {
        "--partner-port": ns.partner_port,
        "--service-port": ns.service_port,
        "--client-port": ns.client_port,
    }
    if len(set(ports.values())) < len(ports):
        return "--partner-port, --service-port and --client-port must differ"
    if not 1 <= ns.instances <= 16:
        return f"--instances must be within 1-16, got {ns.instances}"
    if ns.instances > 1 and ns.storage is not None and ns.storage.startswith("memory:"):
        return "--instances above 1 needs a shared storage, not memory://"
    if ns.storage is not None and "://" not in ns.storage:
        return f"--storage must be a URL such as sqlite:///path.db, got {ns.storage!r}"
    try:
        return SimulatorConfig(
            api_url=f"http://{LOOPBACK}:{ns.service_port}",
            partner_url=f"http://{LOOPBACK}:{ns.partner_port}",
            n=ns.n,
            rate=ns.rate,
            seed=seed,
            time_scale=ns.time_scale,
            listen_host=LOOPBACK,
            listen_port=ns.client_port,
            push_shape=ns.push_body,
            deadline=ns.deadline,
        )
    except ValueError as exc:
        return str(exc)


def _cmd_demo(ns: argparse.Namespace) -> int:
    from rich.console import Console

    started = time.monotonic()
    console = Console(highlight=False)
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1_000_000)
    config = _demo_config(ns, seed)
    if isinstance(config, str):
        _error(f"demo: {config}")
        return EXIT_SETUP
    busy = [
        f"port {port} ({what})"
        for what, port in (
            ("mock partner, --partner-port", ns.partner_port),
            ("example service, --service-port", ns.service_port),
            ("app backend, --client-port", ns.client_port),
        )
        if not _port_free(LOOPBACK, port)
    ]
    if busy:
        _error(f"demo: already in use on {LOOPBACK}: {', '.join(busy)}")
        return EXIT_SETUP
    workdir: Path = ns.workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        names = (
            ["service"] if ns.instances == 1 else [f"service-{i + 1}" for i in range(ns.instances)]
        )
        partner_log, *service_logs = _prepare_logs(workdir, ["partner", *names], ns.keep_logs)
        storage = ns.storage if ns.storage is not None else _fresh_sqlite(workdir)
    except OSError as exc:
        _error(f"demo: cannot prepare {workdir}: {exc}")
        return EXIT_SETUP
    partner_url, service_url = config.partner_url, config.api_url
    console.print(
        f"[bold]resilient-payout demo[/]: {config.n} payouts at {config.rate:g}/s, "
        f"time scale {config.time_scale:g}, seed {seed}\n"
        f"  mock partner     {partner_url}  log {partner_log}\n"
        f"  example service  {service_url}  log {service_logs[0]}"
        f"{_instances_note(ns, service_logs)}\n"
        f"                   storage {_redact(storage)}\n"
        f"  app backend      http://{LOOPBACK}:{config.listen_port}  (the simulator, this process)"
    )
    scale = f"{config.time_scale:g}"
    # The storage URL goes by environment, not argv: it may hold a password, and argv is public.
    webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = {
        **os.environ,
        **_no_proxy_for_loopback(),
        "PYTHONUNBUFFERED": "1",
        "RP_STORAGE_URL": storage,
        # A fresh secret per run: the partner signs its webhooks, the service verifies them.
        "RP_WEBHOOK_SECRETS": webhook_secret,
        "RP_PARTNER_WEBHOOK_SECRET": webhook_secret,
    }
    if ns.instances > 1 and ns.budget_url:
        env["RP_BUDGET_URL"] = ns.budget_url
        env["RP_BUDGET_KEY"] = f"rp-demo:{secrets.token_hex(6)}:budget"
    children: list[_Child] = []
    previous = _install_stop_signals()
    try:
        partner_ready = f"{partner_url}/_mock/stats"
        partner_args = ["--host", LOOPBACK, "--port", str(ns.partner_port), "--seed", str(seed)]
        service_args = [
            *("--partner-url", partner_url, "--public-url", service_url),
            *("--client-url", f"http://{LOOPBACK}:{ns.client_port}", "--push-body", ns.push_body),
            *_split_budget(ns),
        ]
        # One instance listens on --service-port; several listen on free ports behind the router.
        ports = [ns.service_port] if ns.instances == 1 else _free_ports(ns.instances)
        spawns = [("mock partner", ["mock-partner", *partner_args], partner_log, partner_ready)]
        for i, (port, log) in enumerate(zip(ports, service_logs, strict=True)):
            name = "example service" + (f" {i + 1}" if ns.instances > 1 else "")
            listen = ["--host", LOOPBACK, "--port", str(port)]
            ready = f"http://{LOOPBACK}:{port}/healthz"
            spawns.append((name, ["serve", *listen, *service_args], log, ready))
        for name, args, log, ready_url in spawns:
            # Appended at once: from here on, the finally below stops the child whatever happens.
            children.append(_spawn(name, [*args, "--time-scale", scale], log, ready_url, env))
        if not _wait_ready(children, console):
            return EXIT_SETUP
        backends = [] if ns.instances == 1 else [f"http://{LOOPBACK}:{p}" for p in ports]
        with _environ(_no_proxy_for_loopback()):
            report = _simulate(
                config, progress=not ns.no_progress, console=console, router_to=backends
            )
        if report is None:
            return EXIT_SETUP
        return _finish(report, children, ns.json_path, started, console)
    except _Terminated:
        console.print("[red]demo: terminated; stopping[/]")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        console.print("[red]demo: interrupted; stopping[/]")
        return EXIT_INTERRUPTED
    finally:
        # Stopping is bounded (terminate, then kill after a timeout): a second Ctrl-C must not
        # cut it short and leave the children running.
        _ignore_signals(previous)
        try:
            _stop(children, console)
        finally:
            _restore_signals(previous)
        console.print(f"logs: {partner_log}, {', '.join(map(str, service_logs))}")


def _simulate(
    config: SimulatorConfig,
    *,
    progress: bool,
    console: Console,
    router_to: Sequence[str] = (),
) -> SimulationReport | None:
    import anyio

    from .testing.simulator import Simulator

    async def run() -> SimulationReport:
        if not router_to:
            return await Simulator(config).run(progress)
        port = int(urlsplit(config.api_url).port or DEFAULT_SERVICE_PORT)
        async with _serve_router(router_to, LOOPBACK, port):
            return await Simulator(config).run(progress)

    try:
        return anyio.run(run)
    except OSError as exc:  # the receiver's (or router's) port was taken since we checked
        console.print(f"[red]demo: a port of this process: {exc.strerror or exc}[/]")
        return None


_HOP_BY_HOP = frozenset(
    {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"}
)


@contextlib.asynccontextmanager
async def _serve_router(backends: Sequence[str], host: str, port: int) -> AsyncIterator[None]:
    """A minimal load balancer for the demo: every HTTP request to ``host:port`` goes to a
    random backend, and to the others in turn while one refuses the connection."""
    import anyio
    import httpx
    import uvicorn

    class _Embedded(uvicorn.Server):
        # The demo owns SIGINT/SIGTERM; uvicorn would re-raise them only after its shutdown.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    # GET ?wait= long-polls up to RP_MAX_WAIT: no read timeout, and no pool limit, or parked
    # long polls would hold every connection and new requests would queue behind them.
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=2.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        trust_env=False,
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        for base in random.sample(list(backends), len(backends)):
            try:
                answer = await http.request(
                    scope["method"], base + target, content=bytes(body), headers=headers
                )
            except httpx.TransportError:
                continue
            out = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in answer.headers.items()
                if k.encode("latin-1") not in _HOP_BY_HOP and k.lower() != "content-encoding"
            ]
            out.append((b"content-length", str(len(answer.content)).encode()))
            await send(
                {"type": "http.response.start", "status": answer.status_code, "headers": out}
            )
            await send({"type": "http.response.body", "body": answer.content})
            return
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sock = _listen(host, port)
    server = _Embedded(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn has only a flag
                    await anyio.sleep(0.01)
            try:
                yield
            finally:
                server.should_exit = True
    finally:
        sock.close()
        await http.aclose()


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on the loopback now (the kernel's choice)."""
    socks = [_listen(LOOPBACK, 0) for _ in range(n)]
    try:
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _split_budget(ns: argparse.Namespace) -> list[str]:
    """Without a shared budget, N instances each get 1/N of the default check rate and burst,
    so together they stay within what the partner allows."""
    if ns.instances == 1 or ns.budget_url:
        return []
    from ._policy import Policy

    base = Policy()
    rate = base.check_rate / ns.instances
    burst = max(1, base.check_burst // ns.instances)
    return ["--check-rate", f"{rate:g}", "--check-burst", str(burst)]


def _instances_note(ns: argparse.Namespace, logs: Sequence[Path]) -> str:
    if ns.instances == 1:
        return ""
    budget = "one shared check budget (Redis)" if ns.budget_url else "1/N of the check rate each"
    return (
        f"\n                   router to {ns.instances} instances ({budget}); "
        f"logs {logs[0].name} .. {logs[-1].name}"
    )


def _finish(
    report: SimulationReport,
    children: Sequence[_Child],
    json_path: Path | None,
    started: float,
    console: Console,
) -> int:
    from .testing.simulator import render_summary, write_json

    console.print(render_summary(report))
    if json_path is not None:
        try:
            write_json(report, json_path)
        except OSError as exc:
            console.print(f"[red]demo: cannot write the report: {exc}[/]")
        else:
            console.print(f"report: {json_path}")
    # A process that died during the run makes the demo fail even if the grades look fine.
    crashed = [c for c in children if c.proc.poll() is not None]
    for child in crashed:
        console.print(f"[red]{child.name} exited early with status {child.proc.returncode}[/]")
    ok = report.ok and not crashed
    verdict = "[bold green]OK[/]" if ok else "[bold red]NOT OK[/]"
    console.print(f"demo {verdict} in {time.monotonic() - started:.1f} s")
    return EXIT_OK if ok else EXIT_NOT_OK


# -- soak -----------------------------------------------------------------------------------


@dataclass
class SoakResult:
    """A soak run: the simulator's graded report and what the killer did."""

    report: SimulationReport
    minutes: float
    kills: int
    restart_s: list[float]
    crashed: list[str]
    kills_at_s: list[float] = dataclasses.field(default_factory=list)
    """Scenario seconds since the partner started (about: to compare with the next field)."""
    busiest_check_seconds: dict[str, int] = dataclasses.field(default_factory=dict)
    """The partner's busiest scenario seconds for status checks (its ``checks_per_second``)."""

    @property
    def ok(self) -> bool:
        """Every transfer correct, none paid twice, no block, nothing died on its own."""
        return self.report.ok and not self.crashed

    def figures(self) -> dict[str, Any]:
        """The soak's headline figures (all but ``sent`` and ``final`` must be 0)."""
        r = self.report
        return {
            "sent": r.sent,
            "final": r.sent - r.missing,
            "wrong": r.wrong,
            "missing": r.missing,
            "double_payments": len(r.double_payments),
            "conflicting_notifications": r.conflicting + r.pushes_rejected,
            "blocks": r.blocks,
            "unsettled": r.unsettled,
            "unverified": r.unverified,
            "kills": self.kills,
            "restart_max_s": round(max(self.restart_s, default=0.0), 3),
            "crashed": self.crashed,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "minutes": self.minutes,
            "soak": self.figures(),
            "restart_s": [round(t, 3) for t in self.restart_s],
            "kills_at_s": [round(t, 1) for t in self.kills_at_s],
            "busiest_check_seconds": self.busiest_check_seconds,
            "report": self.report.to_dict(),
        }


def _cmd_soak(ns: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1_000_000)
    workdir: Path = ns.workdir
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        logs = _prepare_logs(workdir, ["partner", "service"], keep=False)
        storage = ns.storage if ns.storage is not None else _fresh_sqlite(workdir, "soak.db")
    except OSError as exc:
        _error(f"soak: cannot prepare {workdir}: {exc}")
        return EXIT_SETUP
    console.print(
        f"[bold]resilient-payout soak[/]: {ns.minutes:g} min, {ns.rate:g} payouts per scenario "
        f"second, time scale {ns.time_scale:g}, SIGKILL every {ns.kill_every[0]:g}-"
        f"{ns.kill_every[1]:g} s, seed {seed}, storage {_redact(storage)}, logs in {workdir}"
    )
    previous = _install_stop_signals()
    try:
        result = run_soak(
            minutes=ns.minutes,
            time_scale=ns.time_scale,
            kill_every=ns.kill_every,
            rate=ns.rate,
            storage=storage,
            seed=seed,
            partner_log=logs[0],
            service_log=logs[1],
            progress=ns.progress,
            console=console,
        )
    except _Terminated:
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        _restore_signals(previous)
    if result is None:
        return EXIT_SETUP
    from .testing.simulator import render_summary

    console.print(render_summary(result.report))
    figures = result.figures()
    console.print("soak: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    if ns.json_path is not None:
        try:
            ns.json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", "utf-8")
        except OSError as exc:
            console.print(f"[red]soak: cannot write the report: {exc}[/]")
    verdict = "[bold green]OK[/]" if result.ok else "[bold red]NOT OK[/]"
    console.print(f"soak {verdict}")
    return EXIT_OK if result.ok else EXIT_NOT_OK


def run_soak(
    *,
    minutes: float,
    time_scale: float,
    kill_every: tuple[float, float],
    rate: float,
    storage: str,
    seed: int,
    partner_log: Path,
    service_log: Path,
    progress: bool = False,
    console: Console | None = None,
) -> SoakResult | None:
    """Partner and service as subprocesses on free loopback ports, the simulator in this
    process, the service SIGKILLed every ``kill_every`` clock seconds for ``minutes`` and
    restarted on its port. None if a process did not start."""
    import anyio
    import httpx
    from rich.console import Console as _Console

    from .testing.simulator import Simulator, SimulatorConfig

    out = console if console is not None else _Console(stderr=True, highlight=False)
    partner_port, service_port, client_port = _free_ports(3)
    partner_url = f"http://{LOOPBACK}:{partner_port}"
    service_url = f"http://{LOOPBACK}:{service_port}"
    n = max(1, round(minutes * 60 * rate / time_scale))
    config = SimulatorConfig(
        api_url=service_url,
        partner_url=partner_url,
        n=n,
        rate=rate,
        seed=seed,
        time_scale=time_scale,
        listen_host=LOOPBACK,
        listen_port=client_port,
        push_shape="flat",
        deadline=_DEMO_DEADLINE,
        # The app retries its first POST through a restart (a refused or reset connection); a
        # restart takes a second or two of clock time, so spread the retries over ~20 s.
        post_retries=max(3, math.ceil(20.0 / max(time_scale, _MIN_RETRY_S))),
    )
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    env = {
        **os.environ,
        **_no_proxy_for_loopback(),
        "PYTHONUNBUFFERED": "1",
        "RP_STORAGE_URL": storage,
        "RP_WEBHOOK_SECRETS": secret,
        "RP_PARTNER_WEBHOOK_SECRET": secret,
    }
    scale = f"{time_scale:g}"
    service_args = [
        *("serve", "--host", LOOPBACK, "--port", str(service_port), "--time-scale", scale),
        *("--partner-url", partner_url, "--public-url", service_url, "--log-level", "warning"),
        *("--client-url", f"http://{LOOPBACK}:{client_port}", "--push-body", "flat"),
    ]
    partner_args = [
        *("mock-partner", "--host", LOOPBACK, "--port", str(partner_port), "--seed", str(seed)),
        *("--time-scale", scale, "--log-level", "warning"),
    ]
    service_ready = f"{service_url}/healthz"
    children = [
        _spawn("mock partner", partner_args, partner_log, f"{partner_url}/_mock/stats", env),
        _spawn("example service", service_args, service_log, service_ready, env),
    ]
    rng = random.Random(seed)
    restarts: list[float] = []
    failed_restarts: list[str] = []
    kills_at: list[float] = []
    partner_t0 = time.monotonic()

    async def killer(until: float) -> None:
        while True:
            await anyio.sleep(rng.uniform(*kill_every))
            if time.monotonic() >= until:
                return
            victim = children[1]
            kills_at.append((time.monotonic() - partner_t0) / time_scale)
            _signal_group(victim, signal.SIGKILL)
            await anyio.to_thread.run_sync(victim.proc.wait)
            t0 = time.monotonic()
            children[1] = _spawn("example service", service_args, service_log, service_ready, env)
            if not await anyio.to_thread.run_sync(_wait_ready, [children[1]], out):
                # No more kills; the run goes on and grades what it can (missing outcomes).
                failed_restarts.append("example service (restart)")
                return
            restarts.append(time.monotonic() - t0)

    async def run() -> SoakResult:
        simulator = Simulator(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer, time.monotonic() + minutes * 60)
            report = await simulator.run(progress)
            tg.cancel_scope.cancel()
        crashed = [c.name for c in children if c.proc.poll() is not None] + failed_restarts
        busiest: dict[str, int] = {}
        with contextlib.suppress(Exception):  # diagnostics only; the report has the verdict
            async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
                stats = (await http.get(f"{partner_url}/_mock/stats")).json()
            top = sorted(stats["checks_per_second"].items(), key=lambda kv: -kv[1])[:8]
            busiest = {str(k): int(v) for k, v in top}
        return SoakResult(report, minutes, len(restarts), restarts, crashed, kills_at, busiest)

    try:
        if not _wait_ready(children, out):
            return None
        partner_t0 = time.monotonic()
        with _environ(_no_proxy_for_loopback()):
            return anyio.run(run)
    finally:
        _stop(children, out)


_Handlers = dict[signal.Signals, Any]


def _install_stop_signals() -> _Handlers:
    """Make SIGTERM and SIGHUP raise :class:`_Terminated`; returns every handler to restore."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated

    previous: _Handlers = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # only the main thread may set handlers; its owner handles signals
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def _ignore_signals(previous: _Handlers) -> None:
    for sig in previous:
        signal.signal(sig, signal.SIG_IGN)


def _restore_signals(previous: _Handlers) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _no_proxy_for_loopback() -> dict[str, str]:
    """NO_PROXY with 127.0.0.1 added: the demo talks only to this machine, never via a proxy."""
    current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    value = ",".join(filter(None, [current, LOOPBACK, "localhost"]))
    return {"NO_PROXY": value, "no_proxy": value}


if __name__ == "__main__":
    sys.exit(main())
