"""examples/fastapi_service/app.py builds the service from RP_* variables and serves."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import anyio.lowlevel
import httpx
import pytest

from resilient_payout.service import ServiceSettings

MODULE = "examples.fastapi_service.app"
ENV = {
    "RP_STORAGE_URL": "memory://",
    "RP_PARTNER_URL": "http://partner.test:4000",
    "RP_PUBLIC_URL": "http://service.test:4200/",
    "RP_CLIENT_URL": "http://app.test:4100",
    "RP_PUSH_BODY": "nested",
    "RP_TIME_SCALE": "0.5",
    "RP_MAX_WAIT": "12.5",
}


def load(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> ModuleType:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return importlib.import_module(MODULE)


def test_the_example_reads_its_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = load(monkeypatch, ENV)
    settings: ServiceSettings = module.app.state.settings
    assert settings.webhook_url == "http://service.test:4200/webhook"
    assert settings.push_url == "http://app.test:4100/transaction"
    assert settings.push_body == "nested"
    assert settings.max_wait == 12.5
    assert settings.policy().late_arrival_window == pytest.approx(75.0)


def test_an_invalid_variable_fails_the_import_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"RP_PORT='http': Input should be a valid integer"):
        load(monkeypatch, {**ENV, "RP_PORT": "http"})


@pytest.mark.anyio
async def test_the_example_serves_health_and_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    app = load(monkeypatch, ENV).app
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://service.test") as http,
    ):
        await anyio.lowlevel.checkpoint()  # see test_service.running: lets the client's loops start
        health = await http.get("/healthz")
        metrics = await http.get("/metrics")
    assert health.json() == {"status": "ok"}
    assert "resilient_payout_up 1.0" in metrics.text


HOST = "examples.fastapi_service.host"


@pytest.mark.anyio
async def test_the_host_example_serves_the_payout_routes_under_payouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, HOST, raising=False)
    module = importlib.import_module(HOST)
    app = module.app
    assert module.service.settings.webhook_url == "http://service.test:4200/payouts/webhook"
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://service.test") as http,
    ):
        await anyio.lowlevel.checkpoint()
        hello = await http.get("/hello")
        ready = await http.get("/payouts/readyz")
        submitted = await http.post("/payouts/transaction", json={"id": "host-1"})
    assert hello.json() == {"hello": "world"}
    assert ready.json() == {"status": "ready"}
    assert submitted.json() == {"id": "host-1", "status": "pending"}
    assert "/payouts/transaction" in app.openapi()["paths"]
