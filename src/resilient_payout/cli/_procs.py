"""Child processes for ``demo``, ``soak``, the tests and the benchmarks: start, wait until
ready, stop; ports and logs; stop signals; ``serve --workers``'s pool; the server processes'
garbage collector."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..testing._server import listen

if TYPE_CHECKING:
    import httpx
    from rich.console import Console

__all__ = [
    "LOOPBACK",
    "READY_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "Child",
    "Handlers",
    "Terminated",
    "WorkerPool",
    "bind_problem",
    "die_with_parent_hook",
    "environ",
    "free_ports",
    "ignore_signals",
    "install_stop_signals",
    "log_tail",
    "no_proxy_for_loopback",
    "port_free",
    "prepare_logs",
    "restore_signals",
    "signal_group",
    "spawn",
    "start",
    "stop",
    "stop_procs",
    "supervise",
    "tune_gc",
    "wait_ready",
    "wait_url",
]

LOOPBACK = "127.0.0.1"
"""Where the commands' child processes listen by default: this machine only."""
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5
LOG_TAIL_LINES = 15
GC_FULL_EVERY = 1000  # gen-1 collections per full one (CPython: 10)

Handlers = dict[signal.Signals, Any]
Proc = subprocess.Popen[bytes]


# -- start ----------------------------------------------------------------------------------


@dataclass
class Child:
    """A ``resilient-payout`` subprocess: its output goes to ``log``, and it is ready once
    ``ready_url`` answers 200."""

    name: str
    proc: Proc
    log: Path
    ready_url: str


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send SIGTERM to the child when its parent dies.

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
        if os.getppid() != parent:  # the parent died before prctl: nobody would stop us
            os._exit(1)

    return hook


def start(
    command: Sequence[str], log: Path, env: Mapping[str, str], *, die_with_parent: bool = True
) -> Proc:
    """Run ``command`` in a new session, stdin closed, stdout and stderr appended to ``log``.

    ``die_with_parent`` (Linux): SIGTERM it when this process dies; leave it off when other
    threads may be running.
    """
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - argv from our callers, no shell
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            # Its own process group: Ctrl-C reaches only the parent, which then stops the
            # children itself, and a stop signal reaches everything the child may have started.
            start_new_session=True,
            preexec_fn=die_with_parent_hook() if die_with_parent else None,
        )


def spawn(name: str, args: list[str], log: Path, ready_url: str, env: Mapping[str, str]) -> Child:
    """Start ``python -m resilient_payout.cli ARGS``, its command line first in ``log``."""
    command = [sys.executable, "-m", "resilient_payout.cli", *args]
    with log.open("ab") as out:
        out.write(f"$ {' '.join(command)}\n".encode())
    return Child(name, start(command, log, env), log, ready_url)


# -- wait -----------------------------------------------------------------------------------


def wait_url(proc: Proc, url: str, deadline: float, http: httpx.Client) -> bool:
    """Poll ``url`` until it answers 200 (True), or ``proc`` exits or ``deadline`` (monotonic)
    passes (False; ``proc.returncode`` tells which)."""
    import httpx

    while True:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if http.get(url).status_code == 200:
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def log_tail(path: Path) -> str:
    """The last lines of a log ("" if it cannot be read)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def wait_ready(children: Sequence[Child], console: Console) -> bool:
    """Wait for each child's readiness URL (bounded); False, with its log's tail, if one fails."""
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        for child in children:
            if wait_url(child.proc, child.ready_url, deadline, http):
                continue
            code = child.proc.returncode
            if code is not None:
                problem = f"{child.name} exited with status {code} while starting"
            else:
                problem = f"{child.name} not ready after {READY_TIMEOUT_S:g} s"
            console.print(f"[red]demo: {problem}; the end of {child.log}:[/]", soft_wrap=True)
            console.print(log_tail(child.log), markup=False, highlight=False, soft_wrap=True)
            return False
    return True


# -- stop -----------------------------------------------------------------------------------


def signal_group(proc: Proc, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``proc`` leads (gone already: nothing)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_procs(
    procs: Sequence[Proc], timeout: float, on_kill: Callable[[Proc], None] | None = None
) -> None:
    """SIGTERM every running process's group, then SIGKILL those still running after
    ``timeout`` seconds (``on_kill`` is told first)."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(proc)
            signal_group(proc, signal.SIGKILL)
            proc.wait()


def stop(children: Sequence[Child], console: Console, timeout: float | None = None) -> None:
    """:func:`stop_procs` for children (default timeout :data:`STOP_TIMEOUT_S`), naming each
    one killed on ``console``."""
    limit = STOP_TIMEOUT_S if timeout is None else timeout
    names = {id(c.proc): c.name for c in children}

    def killed(proc: Proc) -> None:
        console.print(f"[yellow]{names[id(proc)]} did not stop in {limit:g} s: killed[/]")

    stop_procs([c.proc for c in children], limit, killed)


# -- ports, logs, environment ---------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on the loopback now (the kernel's choice)."""
    socks = [listen(LOOPBACK, 0) for _ in range(n)]
    try:
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be listened on now."""
    try:
        listen(host, port).close()
    except OSError:
        return False
    return True


def bind_problem(host: str, port: int, exc: OSError) -> str:
    """Why :func:`listen` failed, for a person."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host}"
    return f"cannot listen on {host}:{port}: {exc.strerror or exc}"


def prepare_logs(workdir: Path, names: Sequence[str], keep: bool) -> list[Path]:
    """Empty ``workdir/NAME.log`` files; ``keep`` renames earlier ones (by date) first."""
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


@contextlib.contextmanager
def environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``overrides`` inside the block, as it was after it."""
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


def no_proxy_for_loopback() -> dict[str, str]:
    """NO_PROXY with 127.0.0.1 added: the demo talks only to this machine, never via a proxy."""
    current = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    value = ",".join(filter(None, [current, LOOPBACK, "localhost"]))
    return {"NO_PROXY": value, "no_proxy": value}


# -- signals --------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP during a demo. A KeyboardInterrupt, because asyncio lets only that and
    SystemExit out of a running loop instead of logging them: the demo must reach its cleanup."""


def install_stop_signals() -> Handlers:
    """Make SIGTERM and SIGHUP raise :class:`Terminated`; returns every handler to restore."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous: Handlers = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # only the main thread may set handlers; its owner handles signals
    previous[signal.SIGINT] = signal.getsignal(signal.SIGINT)
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    return previous


def ignore_signals(previous: Handlers) -> None:
    """Ignore every signal of ``previous`` (while a cleanup must not be cut short)."""
    for sig in previous:
        signal.signal(sig, signal.SIG_IGN)


def restore_signals(previous: Handlers) -> None:
    """Put back the handlers :func:`install_stop_signals` returned."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def supervise(console: Console, body: Callable[[list[Child]], int], logs: Callable[[], str]) -> int:
    """``body(children)`` with SIGTERM/SIGHUP raising :class:`Terminated`; whatever happens,
    every child ``body`` appended is stopped and ``logs()`` says where their logs are.

    Stopping is bounded (terminate, then kill after a timeout) and runs with the signals
    ignored: a second Ctrl-C must not cut it short and leave the children running.
    """
    from ._common import EXIT_INTERRUPTED, EXIT_TERMINATED

    children: list[Child] = []
    previous = install_stop_signals()
    try:
        return body(children)
    except Terminated:
        console.print("[red]demo: terminated; stopping[/]")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        console.print("[red]demo: interrupted; stopping[/]")
        return EXIT_INTERRUPTED
    finally:
        ignore_signals(previous)
        try:
            stop(children, console)
        finally:
            restore_signals(previous)
        console.print(f"logs: {logs()}")


# -- serve --workers ------------------------------------------------------------------------


@dataclass
class WorkerPool:
    """``size`` worker processes, numbered from 1, kept running until a stop signal.

    The first SIGTERM or SIGINT calls ``on_stop`` (e.g. close the listening socket the workers
    share), sends SIGTERM to every worker and waits for all of them, however long they drain;
    the next one sends ``force_signal`` (they exit at once). A worker that exits on its own is
    restarted under its number after a backoff; ``restart_limit`` such exits within
    ``restart_window`` seconds stop the others and make :meth:`run` return 1.
    """

    start: Callable[[int], Proc]
    """Starts worker ``i``; it must not share this process's group (signals are forwarded)."""
    size: int
    log: Callable[[str], None]
    on_stop: Callable[[], None] = lambda: None
    force_signal: signal.Signals = signal.SIGQUIT
    restart_limit: int = 5
    restart_window: float = 60.0
    backoff: float = 0.5
    """Seconds before the first restart; doubled for each exit within the window (max 10 s)."""
    poll: float = 0.1
    procs: dict[int, Proc | None] = field(default_factory=dict)
    """The running worker of each number (None while it waits for its restart)."""
    _signals: list[int] = field(default_factory=list)

    def run(self) -> int:
        """Start the workers, supervise them, stop them: 0 if every worker exited 0 (or by the
        SIGTERM, while starting) after the stop signal, 1 if one did not or they kept dying.
        Main thread only (signals)."""
        from ._common import EXIT_NOT_OK, EXIT_OK

        def handler(signum: int, frame: FrameType | None) -> None:
            self._signals.append(signum)  # acted on by the loop: a handler must not block

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(1, self.size + 1):
                self.procs[i] = self.start(i)
            gave_up = self._supervise()
            self.on_stop()
            codes = self._stop()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        # -SIGTERM: a worker stopped before it had set its handlers, so before it served.
        clean = all(code in (0, -signal.SIGTERM) for code in codes)
        return EXIT_OK if clean and not gave_up else EXIT_NOT_OK

    def _supervise(self) -> bool:
        """Restart exited workers until a stop signal (False) or too many exits (True)."""
        exits: deque[float] = deque()
        due: dict[int, float] = {}
        while not self._signals:
            now = time.monotonic()
            for i, proc in self.procs.items():
                if proc is None or proc.poll() is None:
                    continue
                exits.append(now)
                while exits[0] < now - self.restart_window:
                    exits.popleft()
                if len(exits) >= self.restart_limit:
                    self.log(
                        f"worker {i} (pid {proc.pid}) exited with status {proc.returncode}; "
                        f"{len(exits)} exits in {self.restart_window:g} s: stopping the others"
                    )
                    return True
                wait = min(self.backoff * 2 ** (len(exits) - 1), 10.0)
                self.log(
                    f"worker {i} (pid {proc.pid}) exited with status {proc.returncode}; "
                    f"restarting it in {wait:g} s"
                )
                self.procs[i] = None
                due[i] = now + wait
            for i, at in list(due.items()):
                if now >= at:
                    del due[i]
                    self.procs[i] = self.start(i)
            time.sleep(self.poll)
        return False

    def _stop(self) -> list[int]:
        """Forward the stop signal(s) and wait for every worker: their exit statuses."""
        running = [p for p in self.procs.values() if p is not None]
        sent = 0
        while True:
            alive = [p for p in running if p.poll() is None]
            if not alive:
                return [p.returncode for p in running]
            while sent < max(1, len(self._signals)):
                sig = signal.SIGTERM if sent == 0 else self.force_signal
                if sent == 0:
                    self.log(f"stopping {len(alive)} workers (SIGTERM: they drain)")
                else:
                    self.log(f"signal again: {sig.name} to {len(alive)} workers (exit now)")
                for proc in alive:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                sent += 1
            time.sleep(self.poll)


# -- server processes -----------------------------------------------------------------------


def tune_gc() -> None:
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
    gc.set_threshold(gen0, gen1, GC_FULL_EVERY)
