"""examples/worker: a plain asyncio worker (no web framework) against the mock partner, served on
a local port at a fast time scale; every outcome must equal the partner's truth."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from examples.worker import worker

from resilient_payout.settings import ServiceSettings
from resilient_payout.testing._server import embedded_server, listen
from resilient_payout.testing.mock_partner import MockPartner, MockPartnerConfig

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]

SCALE = 0.01
# Timeouts and late landings included; no webhooks (the worker has no endpoint for them).
CONFIG = MockPartnerConfig(seed=5, time_scale=SCALE, p_timeout=0.3, p_webhook=0.0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # real sockets: the partner is a real HTTP server, time is only scaled


@asynccontextmanager
async def mock_partner() -> AsyncIterator[tuple[MockPartner, str]]:
    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with MockPartner(CONFIG) as partner, embedded_server(partner.app, sock):
        yield partner, url


async def test_the_worker_gets_every_outcome_right(tmp_path: Path) -> None:
    ids = [f"w-{i}" for i in range(12)]
    async with mock_partner() as (partner, url):
        settings = ServiceSettings(
            partner_url=url, storage_url=f"sqlite:///{tmp_path / 'w.db'}", time_scale=SCALE
        )
        got = await worker.run([{"id": i, "amount": 100} for i in ids], settings)
        truth = partner.truth()["transactions"]
        stats = partner.stats()
    assert {i: s.value for i, s in got.items()} == {i: truth[i]["status"] or "failed" for i in ids}
    assert stats["double_payments"] == []
    assert stats["answers"]["timeout"] > 0  # the seeded run takes the uncertain path too


async def test_the_worker_reads_rp_settings(tmp_path: Path) -> None:
    async with mock_partner() as (partner, url):
        env = {
            "RP_PARTNER_URL": url,
            "RP_STORAGE_URL": f"sqlite:///{tmp_path / 'env.db'}",
            "RP_TIME_SCALE": str(SCALE),
        }
        with anyio.fail_after(60):  # the partner runs on this loop: never block it
            done = await anyio.run_process(
                [sys.executable, "-m", "examples.worker.worker", "env-1", "env-2"],
                cwd=ROOT,
                env={**env, "PATH": ""},
                check=False,
            )
        truth = partner.truth()["transactions"]
    assert done.returncode == 0, done.stderr.decode()
    printed = dict(line.split() for line in done.stdout.decode().splitlines())
    assert printed == {i: truth[i]["status"] or "failed" for i in ("env-1", "env-2")}
