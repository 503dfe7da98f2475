"""Helpers shared by the scenarios: processes, ports, CPU time, percentiles, JSON, repeats
(medians over ``--repeat N`` runs), storage URLs and how busy the machine is."""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from resilient_payout.cli import _procs
from resilient_payout.testing._stats import percentile as percentile

LOOPBACK = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def spawn(args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``python <args>`` in its own session, output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    # Not tied to our death: scenarios start processes while their sampling threads run, where
    # the preexec_fn that would do it is unsafe.
    return _procs.start([sys.executable, *args], log, env, die_with_parent=False)


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; RuntimeError if the process dies or time runs out."""
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        if _procs.wait_url(proc, url, time.monotonic() + timeout, http):
            return
    if proc.returncode is not None:
        raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
    raise RuntimeError(f"{url} not ready after {timeout} s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``timeout``."""
    _procs.stop_procs([proc], timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def machine() -> dict[str, Any]:
    """The machine and its load average now (:class:`MachineWatch` records a whole run)."""
    return {
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0],
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(out: Path, name: str, data: dict[str, Any]) -> Path:
    """Write ``out/name.json`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def run_loadgen(args: Sequence[str], out_json: Path, log: Path) -> dict[str, Any]:
    """Run ``python -m benchmarks.loadgen`` to completion and return its JSON."""
    proc = spawn(["-m", "benchmarks.loadgen", *args, "--json", str(out_json)], log)
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen failed ({proc.returncode}); see {log}")
    data: dict[str, Any] = json.loads(out_json.read_text())
    out_json.unlink()
    return data


# -- repeats -------------------------------------------------------------------------------------


def add_repeat_options(ap: argparse.ArgumentParser) -> None:
    """``--repeat N``, ``--compare BASE.json`` and ``--threshold F`` on a scenario's parser."""
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="runs of each level; the median is reported with min/max (default 3, 1 with --quick)",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="BASE.json",
        help="then print new/old ratios against this earlier JSON of the same benchmark",
    )
    ap.add_argument(
        "--threshold",
        type=float,
        default=0.15,
        help="--compare flags a figure worse by more than this fraction (default 0.15)",
    )


def repeats(repeat: int | None, quick: bool) -> int:
    """``--repeat`` if given (at least 1), else 3, or 1 with ``--quick``."""
    if repeat is None:
        return 1 if quick else 3
    if repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    return repeat


_Key = tuple[str, ...]


def _leaves(d: dict[str, Any], prefix: _Key = ()) -> Iterator[tuple[_Key, float]]:
    for k, v in d.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, int | float):
            yield (*prefix, k), v
        elif isinstance(v, dict):
            yield from _leaves(v, (*prefix, k))


def _get(d: dict[str, Any], path: _Key) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _numbers_only(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _numbers_only(v)
        elif not isinstance(v, list):
            out[k] = v
    return out


def summarize(runs: Sequence[dict[str, Any]], primary: str) -> dict[str, Any]:
    """Several runs of one level as one: every number is the median over ``runs``.

    Lists (latency samples, for the plots) are those of the run whose ``primary`` figure (a
    dotted path) is the median, so a CDF is one real run's. Adds ``repeats``, ``spread``
    (``{"a.b": [min, median, max]}`` per figure) and ``runs`` (each run without its lists).
    """
    if not runs:
        raise ValueError("no runs")
    key = tuple(primary.split("."))
    ranked = sorted(runs, key=lambda r: float(_get(r, key) or 0.0))
    out = copy.deepcopy(ranked[(len(ranked) - 1) // 2])
    spread: dict[str, list[float]] = {}
    for path, _ in list(_leaves(out)):
        values = [v for r in runs if isinstance(v := _get(r, path), int | float)]
        med = statistics.median(values)
        if all(isinstance(v, int) for v in values) and med == int(med):
            med = int(med)
        target = out
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = med
        spread[".".join(path)] = [min(values), med, max(values)]
    out["repeats"] = len(runs)
    out["spread"] = spread
    out["runs"] = [_numbers_only(r) for r in runs]
    return out


def spread_text(d: dict[str, Any], path: str, spec: str = ".1f") -> str:
    """``d``'s figure at ``path`` as ``median (min-max)`` after :func:`summarize`, else alone."""
    value = _get(d, tuple(path.split(".")))
    if value is None:
        return "n/a"
    rng = d.get("spread", {}).get(path)
    if d.get("repeats", 1) > 1 and rng:
        return f"{value:{spec}} ({rng[0]:{spec}}-{rng[2]:{spec}})"
    return f"{value:{spec}}"


def refused(statuses: dict[str, float]) -> str:
    """`` | NOT ACCEPTED: 503 x 278`` if some answers were not 2xx (the figures then describe
    fewer payouts than offered), else ``""``."""
    bad = {k: v for k, v in statuses.items() if not k.startswith("2") and v}
    return " | NOT ACCEPTED: " + ", ".join(f"{k} x {v:g}" for k, v in bad.items()) if bad else ""


# -- storage -------------------------------------------------------------------------------------

PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def pg_url() -> str:
    """The PostgreSQL server the benchmarks use (``RP_TEST_POSTGRES_URL``, else the local one)."""
    return os.environ.get("RP_TEST_POSTGRES_URL") or PG_DEFAULT


def _drop_schema(schema: str) -> None:
    import anyio
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(pg_url(), timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    anyio.run(drop)


@contextmanager
def storage_url(name: str, db: Path) -> Iterator[str]:
    """A URL of an empty store for the service: ``sqlite`` (a fresh file ``db``), ``memory`` or
    ``postgres`` (a fresh schema on :func:`pg_url`, dropped on exit)."""
    if name == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        yield f"sqlite:///{db}"
    elif name == "memory":
        yield "memory://"
    elif name == "postgres":
        schema = f"rp_bench_{uuid.uuid4().hex[:10]}"
        url = pg_url()
        try:
            yield f"{url}{'&' if '?' in url else '?'}schema={schema}"
        finally:
            _drop_schema(schema)
    else:
        raise ValueError(f"unknown storage {name!r} (sqlite, memory, postgres)")


# -- how busy the machine is ---------------------------------------------------------------------

BUSY_LOAD_PER_CORE = 0.5
"""A 1-minute load average above this per core before a run makes it a busy machine's."""
BUSY_PROCESS_PCT = 5.0
"""Another process using more than this % of one core over a run makes it a busy machine's."""
SUITE_LOADAVG_ENV = "RP_BENCH_LOADAVG"
"""Set by ``python -m benchmarks`` before its first scenario: later scenarios judge the load the
suite found, not the load the earlier scenarios made."""
_SERVERS = {"postgres": "postgres (server)", "redis-server": "redis (server)"}
"""Shared servers: their processes are summed, and do not make a run busy when it uses them."""


@dataclass(slots=True)
class _Proc:
    name: str
    first: int
    last: int
    ours: bool


def _read_procs() -> dict[tuple[int, int], tuple[int, int, str, str]]:
    """``(pid, starttime) -> (ppid, utime + stime ticks, comm, command line)``."""
    out: dict[tuple[int, int], tuple[int, int, str, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry.name}/stat").read_text()
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        args = cmd.rstrip(b"\0").split(b"\0") if cmd else []
        line = (
            " ".join(
                [
                    Path(args[0].decode(errors="replace")).name,
                    *(a.decode(errors="replace") for a in args[1:]),
                ]
            )
            if args
            else f"[{comm}]"
        )
        key = (int(entry.name), int(fields[19]))
        out[key] = (
            int(fields[1]),
            int(fields[11]) + int(fields[12]),
            comm,
            " ".join(line.split())[:60],
        )
    return out


class _Sampler:
    """CPU ticks per process since the first sample, and which processes are the run's own:
    ``root``, its ancestors (the runner, make, pytest, the shell) and its descendants."""

    def __init__(self, root: int) -> None:
        self.procs: dict[tuple[int, int], _Proc] = {}
        self.ours = {root}
        self.ancestors: set[int] = set()
        procs = _read_procs()
        parents = {p: v[0] for (p, _), v in procs.items()}
        while root in parents and root > 1:
            root = parents[root]
            self.ancestors.add(root)
        self.sample(procs, at_start=True)

    def sample(
        self, procs: dict[tuple[int, int], tuple[int, int, str, str]], at_start: bool = False
    ) -> None:
        parents = {p: v[0] for (p, _), v in procs.items()}
        for key, (_, ticks, comm, line) in procs.items():
            seen = self.procs.get(key)
            if seen is not None:
                seen.last = ticks
                continue
            # An ancestor's other descendants (a sibling job of the same shell) are not ours.
            ours = self._descends(key[0], parents)
            if ours:
                self.ours.add(key[0])
            ours = ours or key[0] in self.ancestors
            # Born during the run: all its CPU time is the run's.
            self.procs[key] = _Proc(_SERVERS.get(comm, line), ticks if at_start else 0, ticks, ours)

    def _descends(self, pid: int, parents: dict[int, int]) -> bool:
        for _ in range(64):
            if pid in self.ours:
                return True
            if pid <= 1:
                return False
            pid = parents.get(pid, 0)
        return False

    def others(self) -> dict[str, float]:
        """CPU seconds per name of the processes that are not the run's."""
        by_name: dict[str, float] = {}
        for p in self.procs.values():
            if not p.ours and p.last > p.first:
                by_name[p.name] = by_name.get(p.name, 0.0) + (p.last - p.first) / _CLK_TCK
        return by_name


def _watch_main(root: int, interval: float) -> None:
    """The sampling process of :class:`MachineWatch`: samples until stdin closes, then prints
    ``{"wall_s": ..., "others": {name: cpu_s}}``."""
    import select

    sampler = _Sampler(root)
    t0 = time.monotonic()
    print("ready", flush=True)
    while not select.select([sys.stdin], [], [], interval)[0]:
        sampler.sample(_read_procs())
    sampler.sample(_read_procs())
    print(json.dumps({"wall_s": time.monotonic() - t0, "others": sampler.others()}), flush=True)


class MachineWatch:
    """Records how busy the machine is over a run: load average before and after, and the
    processes other than this one, its ancestors and its descendants that used CPU meanwhile.

    A separate process samples /proc every ``interval`` s (a process living shorter than that
    is missed), so that neither the GIL nor ``time.process_time()`` of an in-process benchmark
    sees it. ``uses``: shared servers the run itself uses (``"postgres"``, ``"redis-server"``):
    their CPU is listed but cannot be told apart from the run's, so it does not make it busy.
    """

    def __init__(self, uses: Sequence[str] = (), interval: float = 1.0) -> None:
        self.uses = set(uses)
        self.interval = interval
        self._proc: subprocess.Popen[str] | None = None
        self._before: dict[str, Any] = {}
        self.result: dict[str, Any] = {}

    def __enter__(self) -> MachineWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Take the load average, start the sampler and wait for its first sample."""
        self._before = machine()
        code = "from benchmarks._common import _watch_main as w; w({}, {!r})"
        code = code.format(os.getpid(), self.interval)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the machine watch did not start")

    def stop(self) -> dict[str, Any]:
        """Stop sampling; ``self.result`` (also returned) is the JSON's ``machine``."""
        if self._proc is None:
            return self.result
        out, _ = self._proc.communicate("stop\n", timeout=30)
        self._proc = None
        sampled = json.loads(out)
        self.result = _verdict(self._before, sampled["wall_s"], sampled["others"], self.uses)
        return self.result


def _verdict(
    before: dict[str, Any], wall: float, cpu_by_name: dict[str, float], uses: set[str]
) -> dict[str, Any]:
    """The ``machine`` record of a run: ``before`` (:func:`machine` at the start) plus the load
    after, the other processes over :data:`BUSY_PROCESS_PCT` and ``busy``, the reasons the
    figures are not a quiet machine's (empty if none)."""
    wall = max(wall, 1e-6)
    used = {_SERVERS[s] for s in uses if s in _SERVERS}
    others = [
        {
            "name": name,
            "cpu_pct": round(100 * cpu / wall, 1),
            "shared_server_of_this_run": name in used,
        }
        for name, cpu in sorted(cpu_by_name.items(), key=lambda kv: -kv[1])
        if 100 * cpu / wall > BUSY_PROCESS_PCT
    ]
    suite = os.environ.get(SUITE_LOADAVG_ENV)
    cpus = before["cpus"] or 1
    load = [float(x) for x in suite.split(",")] if suite else before["loadavg"]
    busy: list[str] = []
    if load[0] > BUSY_LOAD_PER_CORE * cpus:
        busy.append(
            f"load average {load[0]:.2f} before the {'suite' if suite else 'run'} "
            f"(> {BUSY_LOAD_PER_CORE} per core, {cpus} CPUs)"
        )
    loud = [o for o in others if not o["shared_server_of_this_run"]]
    if loud:
        busy.append(
            "other processes used CPU: "
            + ", ".join(f"{o['name']} {o['cpu_pct']:.0f}%" for o in loud[:6])
        )
    return {
        **before,
        "loadavg_before": before["loadavg"],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        **({"loadavg_suite_start": load} if suite else {}),
        "wall_s": round(wall, 1),
        "other_processes": others,
        "other_cpu_pct_total": round(100 * sum(cpu_by_name.values()) / wall, 1),
        "busy": busy,
    }


def machine_text(m: dict[str, Any]) -> str:
    """A :class:`MachineWatch` result as console lines, ``BUSY MACHINE: ...`` first if busy."""
    lines = []
    if m.get("busy"):
        lines.append("BUSY MACHINE: " + "; ".join(m["busy"]) + " - figures are not a quiet run's")
    la0 = " ".join(f"{x:.2f}" for x in m.get("loadavg_before", m["loadavg"]))
    la1 = " ".join(f"{x:.2f}" for x in m.get("loadavg_after", []))
    others = ", ".join(
        f"{o['name']} {o['cpu_pct']:.0f}%"
        + (" (this run uses it)" if o["shared_server_of_this_run"] else "")
        for o in m.get("other_processes", [])
    )
    lines.append(
        f"machine: {m['cpus']} CPUs, load average {la0} before, {la1 or '?'} after "
        f"({m.get('wall_s', '?')} s); other processes > {BUSY_PROCESS_PCT:g}% of a core: "
        f"{others or 'none'}"
    )
    return "\n".join(lines)
