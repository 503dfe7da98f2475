"""Framework-neutral wiring: settings and ``open_client`` import no web framework, the new route
and push path settings, and a storage that cannot open is one sentence naming what it is."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from resilient_payout import CallbackNotifier, PayoutStatus, StorageUnavailable
from resilient_payout.cli import main
from resilient_payout.settings import ServiceSettings
from resilient_payout.storage import storage_from_url
from resilient_payout.testing import FakePartner, Script
from resilient_payout.wiring import describe_storage, open_client, open_storage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_settings_and_wiring_import_no_web_framework() -> None:
    code = (
        "import sys\n"
        "import resilient_payout.settings, resilient_payout.wiring\n"
        "web = ('fastapi', 'starlette', 'uvicorn', 'prometheus_client')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in web))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_paths_prefix_and_push_path_make_the_urls() -> None:
    s = ServiceSettings.from_env(
        {
            "RP_PUBLIC_URL": "https://api.example.com/v1",
            "RP_ROUTE_PREFIX": "/payouts",
            "RP_WEBHOOK_PATH": "/partner-a/hooks",
            "RP_CLIENT_URL": "http://app:3100",
            "RP_PUSH_PATH": "/payout-outcomes",
            "RP_METRICS_PATH": "off",
            "RP_EXPOSE_PARTNER_REF": "true",
        }
    )
    assert s.webhook_url == "https://api.example.com/v1/payouts/partner-a/hooks"
    assert s.push_url == "http://app:3100/payout-outcomes"
    assert (s.metrics_path, s.expose_partner_ref) == ("", True)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RP_ROUTE_PREFIX": "payouts"}, "RP_ROUTE_PREFIX='payouts': must be empty or a path"),
        ({"RP_ROUTE_PREFIX": "/payouts/"}, "RP_ROUTE_PREFIX='/payouts/': must be empty or a path"),
        ({"RP_WEBHOOK_PATH": "/hooks/{id}"}, "RP_WEBHOOK_PATH='/hooks/{id}': must be a path"),
        ({"RP_PUSH_PATH": "/x?y=1"}, "RP_PUSH_PATH='/x?y=1': must be a path"),
        ({"RP_READY_PATH": "/healthz"}, "must differ"),
        ({"RP_EXPOSE_PARTNER_REF": "maybe"}, "RP_EXPOSE_PARTNER_REF='maybe'"),
    ],
)
def test_garbage_in_the_new_settings_is_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match="invalid service settings") as caught:
        ServiceSettings.from_env(env)
    assert message in str(caught.value)


def test_describe_storage_never_shows_a_user_or_password() -> None:
    assert describe_storage("postgresql://pay:s3cret@db.internal:5432/payouts?schema=a") == (
        "postgresql://db.internal:5432/payouts"
    )
    assert describe_storage("redis://:s3cret@127.0.0.1:6379/0?prefix=rp:") == (
        "redis://127.0.0.1:6379/0"
    )
    assert describe_storage("sqlite:////var/lib/payouts.db") == "SQLite file /var/lib/payouts.db"


def _refusing_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again: connections are refused


@pytest.mark.parametrize(
    ("make_url", "shown"),
    [
        (lambda tmp: f"sqlite:///{tmp}/missing/dir/p.db",
         "the directory {tmp}/missing/dir does not exist"),
        (lambda tmp: f"sqlite:///{tmp}/a-file/p.db", "{tmp}/a-file is not a directory"),
        (lambda tmp: f"postgresql://pay:s3cret@127.0.0.1:{_refusing_port()}/x",
         "postgresql://127.0.0.1:"),
        (lambda tmp: f"redis://:s3cret@127.0.0.1:{_refusing_port()}/0", "redis://127.0.0.1:"),
    ],
    ids=["missing-dir", "not-a-dir", "postgres-refused", "redis-refused"],
)  # fmt: skip
async def test_storage_that_cannot_open_is_one_sentence_naming_it(
    tmp_path: Path, make_url: object, shown: str
) -> None:
    (tmp_path / "a-file").write_text("")
    url = make_url(tmp_path)  # type: ignore[operator]
    if url.startswith(("postgresql", "redis")):
        pytest.importorskip("asyncpg" if url.startswith("postgresql") else "redis")
    with pytest.raises(StorageUnavailable) as caught:
        await open_storage(storage_from_url(url), url)
    message = str(caught.value)
    assert message.startswith("cannot open the storage (")
    assert shown.format(tmp=tmp_path) in message
    assert "s3cret" not in message
    assert "\n" not in message


def test_serve_prints_an_unopenable_storage_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path}/nowhere/p.db"
    assert main(["serve", "--storage", url, "--port", str(_refusing_port())]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"resilient-payout: serve: cannot open the storage (SQLite file {tmp_path}/nowhere/p.db): "
        f"the directory {tmp_path}/nowhere does not exist\n"
    )


async def test_open_client_takes_your_partner_notifier_and_the_prefix(tmp_path: Path) -> None:
    pushed: list[tuple[str, PayoutStatus]] = []
    arrived = anyio.Event()

    async def record(payout_id: str, status: PayoutStatus) -> None:
        pushed.append((payout_id, status))
        arrived.set()

    settings = ServiceSettings(
        storage_url=f"sqlite:///{tmp_path / 'w.db'}", route_prefix="/payouts", time_scale=0.01
    )
    async with (
        FakePartner(script=lambda _id, _n: Script(answer_delay=0.01, webhook=False)) as partner,
        open_client(settings, partner=partner, notifier=CallbackNotifier(record)) as client,
    ):
        assert client.webhook_url == "http://127.0.0.1:3200/payouts/webhook"
        await client.submit({"id": "o-1", "amount": 100})
        final = await client.wait_final("o-1", timeout=5)
        with anyio.fail_after(5):
            await arrived.wait()  # the outbox push
    assert final.status is PayoutStatus.COMPLETED
    assert pushed == [("o-1", PayoutStatus.COMPLETED)]
    assert (tmp_path / "w.db").exists()
