"""``resilient-payout serve`` stopping: SIGTERM drains (readiness 503 during the shutdown delay,
partner calls in flight finish, exit 0), and ``--workers 2`` serve one port and stop together.

The mock partner runs at time scale 0.1 and answers every POST after 0.8-0.9 s: longer than the
shutdown delay, so the payouts are still at the partner when the server stops listening, and a
drain that did not wait would leave them ``unknown`` (handed over) instead of final.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from resilient_payout import PayoutStatus, Policy
from resilient_payout.cli import main
from resilient_payout.cli._procs import (
    LOOPBACK,
    Child,
    WorkerPool,
    free_ports,
    port_free,
    signal_group,
    spawn,
    stop_procs,
    wait_url,
)
from resilient_payout.storage import MAX_PAGE, PayoutQuery, storage_from_url

SCALE = 0.1
DELAY = 0.3
"""RP_SHUTDOWN_DELAY, real seconds."""
DRAIN_BOUND = DELAY + Policy().drain_timeout * SCALE + 3.0
"""Shutdown delay + the scaled drain timeout + a margin for uvicorn and the hand-over."""
OPEN = frozenset({PayoutStatus.RECEIVED, PayoutStatus.SUBMITTING})


@pytest.fixture(scope="module")
def partner_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_ports(1)[0]
    url = f"http://{LOOPBACK}:{port}"
    args = ["mock-partner", "--port", str(port), "--time-scale", str(SCALE)]
    args += ["--answer-delay-min", "8", "--answer-delay-max", "9", "--p-timeout", "0"]
    args += ["--p-webhook", "0", "--log-level", "warning"]
    log = tmp_path_factory.mktemp("partner") / "partner.log"
    child = spawn("mock partner", args, log, f"{url}/_mock/stats", _env())
    try:
        _wait_ready(child)
        yield url
    finally:
        stop_procs([child.proc], 5.0)


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
        "RP_ALLOW_UNSIGNED_WEBHOOKS": "true",
        **extra,
    }


def _serve(tmp_path: Path, partner_url: str, *flags: str, **env: str) -> tuple[Child, str, str]:
    """``serve`` on a free port over a fresh SQLite file: (child, its URL, the storage URL)."""
    port, sink = free_ports(2)
    url = f"http://{LOOPBACK}:{port}"
    storage = f"sqlite:///{tmp_path / 'payouts.db'}"
    args = ["serve", "--port", str(port), "--storage", storage, "--partner-url", partner_url]
    args += ["--public-url", url, "--client-url", f"http://{LOOPBACK}:{sink}"]
    args += ["--time-scale", str(SCALE), *flags]
    child = spawn("service", args, tmp_path / "service.log", f"{url}/readyz", _env(**env))
    _wait_ready(child)
    return child, url, storage


def _wait_ready(child: Child) -> None:
    with httpx.Client(timeout=1.0, trust_env=False) as http:
        ready = wait_url(child.proc, child.ready_url, time.monotonic() + 30, http)
    assert ready, child.log.read_text()


def _submit(http: httpx.Client, url: str, ids: list[str]) -> None:
    for pid in ids:
        answer = http.post(f"{url}/transaction", json={"id": pid, "amount": 100})
        assert answer.status_code == 200, answer.text


def _exit_within(child: Child, bound: float) -> int:
    try:
        return child.proc.wait(bound)
    except subprocess.TimeoutExpired:
        signal_group(child.proc, signal.SIGKILL)
        child.proc.wait()
        pytest.fail(f"serve did not exit within {bound:g} s:\n{child.log.read_text()}")


def _stored(storage: str) -> tuple[dict[str, PayoutStatus], dict[str, float]]:
    """Every payout's status, and the instances still in the liveness registry."""

    async def read() -> tuple[dict[str, PayoutStatus], dict[str, float]]:
        backend = storage_from_url(storage)
        await backend.open()
        try:
            page = await backend.list_payouts(PayoutQuery(limit=MAX_PAGE))
            return {p.id: p.status for p in page.items}, await backend.instances()
        finally:
            await backend.close()

    return anyio.run(read)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_sigterm_drains_in_flight_partner_calls_and_exits_0(
    tmp_path: Path, partner_url: str
) -> None:
    child, url, storage = _serve(
        tmp_path, partner_url, RP_SHUTDOWN_DELAY=str(DELAY), RP_INSTANCE_ID="drain-1"
    )
    ids = [f"drain-{i}" for i in range(5)]
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        _submit(http, url, ids)
        t0 = time.monotonic()
        signal_group(child.proc, signal.SIGTERM)
        # Within the shutdown delay: still listening, not ready, refusing new payouts.
        ready = http.get(f"{url}/readyz")
        late = http.post(f"{url}/transaction", json={"id": "too-late", "amount": 1})
        answered_in = time.monotonic() - t0
        code = _exit_within(child, DRAIN_BOUND)
    log = child.log.read_text()

    assert answered_in < DELAY, "the test was too slow to see the shutdown delay"
    assert ready.status_code == 503, ready.text
    assert late.status_code == 503
    assert late.json()["type"].endswith(":shutting-down")
    assert "Retry-After" in late.headers
    assert code == 0, log
    assert port_free(LOOPBACK, int(url.rsplit(":", 1)[1]))
    statuses, instances = _stored(storage)
    # The partner answered each POST after the listener had closed: the drain waited for them.
    assert set(statuses) == set(ids)
    assert all(s.is_final for s in statuses.values()), statuses
    assert instances == {}  # left the liveness registry: handed over, nothing to take over
    assert "still running after" not in log
    assert "SIGTERM: draining" in log


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_second_sigterm_exits_at_once_without_draining(tmp_path: Path, partner_url: str) -> None:
    child, url, storage = _serve(
        tmp_path, partner_url, RP_SHUTDOWN_DELAY="60", RP_INSTANCE_ID="impatient"
    )
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        _submit(http, url, ["impatient-1"])
        signal_group(child.proc, signal.SIGTERM)
        assert http.get(f"{url}/readyz").status_code == 503  # draining, in the 60 s delay
    signal_group(child.proc, signal.SIGTERM)
    code = _exit_within(child, 5.0)

    assert code == 128 + signal.SIGTERM
    assert "SIGTERM: exiting now, without draining" in child.log.read_text()
    statuses, instances = _stored(storage)
    # Left as a crash leaves it: the POST in flight, for a successor or another instance.
    assert statuses == {"impatient-1": PayoutStatus.SUBMITTING}
    assert set(instances) == {"impatient"}


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_two_workers_serve_one_port_restart_and_stop_together(
    tmp_path: Path, partner_url: str
) -> None:
    child, url, storage = _serve(tmp_path, partner_url, "--workers", "2", RP_INSTANCE_ID="w")
    try:
        deadline = time.monotonic() + 30
        while set(_stored(storage)[1]) != {"w-1", "w-2"}:  # both clients run and beat
            assert time.monotonic() < deadline, child.log.read_text()
            time.sleep(0.1)
        with httpx.Client(timeout=5.0, trust_env=False) as http:
            _submit(http, url, [f"w-{i}" for i in range(6)])
        log = child.log.read_text()
        assert "each checks at 1/s (RP_CHECK_RATE 2 / 2)" in log
        first = re.search(r"worker 1 \(pid (\d+)\) started as instance w-1", log)
        assert first is not None, log
        os.kill(int(first.group(1)), signal.SIGKILL)  # a worker dies: the pool restarts it
        deadline = time.monotonic() + 30
        while child.log.read_text().count("Application startup complete") < 3:
            assert time.monotonic() < deadline, child.log.read_text()
            time.sleep(0.1)
        started = re.findall(r"worker \d \(pid (\d+)\) started", child.log.read_text())
        workers = [int(pid) for pid in started]
        signal_group(child.proc, signal.SIGTERM)
        code = _exit_within(child, DRAIN_BOUND)
    finally:
        stop_procs([child.proc], 5.0)
    log = child.log.read_text()

    assert re.search(r"worker 1 \(pid \d+\) exited with status -9; restarting it", log), log
    assert code == 0, log
    assert len(workers) == 3
    assert log.count("SIGTERM: draining") == 2  # the two running workers, once each
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert port_free(LOOPBACK, int(url.rsplit(":", 1)[1]))
    statuses, instances = _stored(storage)
    assert len(statuses) == 6
    assert not any(s in OPEN for s in statuses.values()), statuses
    assert instances == {}


def test_memory_storage_is_refused_with_several_workers(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_ports(1)[0]
    code = main(["serve", "--storage", "memory://", "--workers", "2", "--port", str(port)])
    assert code == 2
    assert "memory:// storage cannot be shared by --workers" in capsys.readouterr().err


def test_workers_that_keep_dying_stop_the_pool_with_status_1() -> None:
    said: list[str] = []
    started: list[int] = []

    def start(i: int) -> subprocess.Popen[bytes]:
        started.append(i)
        command = [sys.executable, "-S", "-c", "raise SystemExit(3)"]
        return subprocess.Popen(command, start_new_session=True)

    pool = WorkerPool(start=start, size=2, log=said.append, restart_limit=3, backoff=0.01)
    assert pool.run() == 1
    assert sorted(started[:2]) == [1, 2]
    assert 3 <= len(started) <= 4  # the third exit gives up, whichever worker it was
    assert any(line.endswith("3 exits in 60 s: stopping the others") for line in said), said
    assert all(p is None or p.poll() is not None for p in pool.procs.values())
