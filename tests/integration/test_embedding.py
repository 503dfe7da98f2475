"""The service's parts in an app of your own: ``PayoutService.router`` included under a prefix,
``create_app`` mounted, the lifespan composed with the host's, problem+json without our handlers.

End-to-end cases run the real client (``open_client``) on SQLite against the mock partner, both
in process over ``httpx.ASGITransport`` and on a fast time scale (real time: SQLite works in
threads, which virtual time cannot account for)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from fastapi import FastAPI

from resilient_payout import (
    CallbackNotifier,
    ClientNotRunning,
    ConfigurationError,
    HttpPartner,
    PayoutClient,
    PayoutStatus,
    StorageUnavailable,
)
from resilient_payout.service import PROBLEM_TYPE_PREFIX, PayoutService, create_app
from resilient_payout.settings import ServiceSettings
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner, Script
from resilient_payout.testing.mock_partner import MockPartner, MockPartnerConfig
from resilient_payout.wiring import open_client

pytestmark = pytest.mark.anyio

PROBLEM_JSON = "application/problem+json"
SCALE = 0.01
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
# Timeouts, late landings and signed webhooks: the paths that need the webhook URL to be right.
PARTNER = MockPartnerConfig(seed=3, time_scale=SCALE, p_timeout=0.2, webhook_secret=SECRET)
IDS = [f"emb-{i}" for i in range(10)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Host:
    """A host app of our own with the payout routes in it, its partner and what was pushed."""

    app: FastAPI
    http: httpx.AsyncClient
    partner: MockPartner
    pushes: dict[str, PayoutStatus] = field(default_factory=dict)


def settings_for(tmp_path: Path, **changes: Any) -> ServiceSettings:
    return ServiceSettings(
        storage_url=f"sqlite:///{tmp_path / 'host.db'}",
        public_url="http://service",
        time_scale=SCALE,
        webhook_secrets=(SECRET,),  # type: ignore[arg-type]  # str -> SecretStr
        **changes,
    )


@asynccontextmanager
async def host_stack(
    make_app: Callable[[Callable[[ServiceSettings], Any]], FastAPI],
    config: MockPartnerConfig = PARTNER,
) -> AsyncIterator[Host]:
    """``make_app(factory)`` builds the host app; the factory is ``open_client`` with the mock
    partner reached in process and a callable notifier. The host's lifespan is entered."""
    pushes: dict[str, PayoutStatus] = {}

    async def record(payout_id: str, status: PayoutStatus) -> None:
        pushes.setdefault(payout_id, status)

    def factory(s: ServiceSettings) -> AbstractAsyncContextManager[PayoutClient]:
        partner = HttpPartner("http://partner", client=partner_http, policy=s.policy())
        return open_client(s, partner=partner, notifier=CallbackNotifier(record))

    app = make_app(factory)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")
    partner = MockPartner(config, webhook_client=http)
    partner_http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=partner.app), base_url="http://partner"
    )
    async with http, partner_http, partner, app.router.lifespan_context(app):
        await anyio.lowlevel.checkpoint()
        yield Host(app, http, partner, pushes)


async def settle_all(host: Host, prefix: str) -> dict[str, str]:
    """POST every id, then long-poll each until final; the app-facing statuses."""
    final: dict[str, str] = {}

    async def one(payout_id: str) -> None:
        answer = await host.http.post(f"{prefix}/transaction", json={"id": payout_id, "n": 5})
        assert answer.json() == {"id": payout_id, "status": "pending"}
        while payout_id not in final:
            got = (await host.http.get(f"{prefix}/transaction/{payout_id}?wait=5")).json()
            if got["status"] != "pending":
                final[payout_id] = got["status"]

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for payout_id in IDS:
                tg.start_soon(one, payout_id)
        while set(host.pushes) < set(IDS):  # noqa: ASYNC110 - pushes come from the outbox
            await anyio.sleep(0.01)
    return final


def assert_matches_the_partner(host: Host, final: dict[str, str]) -> None:
    truth = host.partner.truth()["transactions"]
    expected = {i: truth[i]["status"] or "failed" for i in IDS}
    assert final == expected
    assert {i: s.value for i, s in host.pushes.items()} == expected
    stats = host.partner.stats()
    assert stats["double_payments"] == []
    assert stats["answers"]["timeout"] > 0  # the seeded run takes the uncertain path too
    # Webhooks went to the prefixed URL: a wrong one would have been a 404 (a failed webhook).
    assert stats["webhooks_sent"] > 0
    assert stats["webhooks_failed"] == 0


# -- included under a prefix ------------------------------------------------------------------


def included_app(settings: ServiceSettings) -> Callable[[Callable[..., Any]], FastAPI]:
    def make(factory: Callable[..., Any]) -> FastAPI:
        service = PayoutService(settings, client_factory=factory, prefix="/payouts")

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            app.state.own_work = "started"  # the host's own startup, composed with ours
            async with service.lifespan(app):
                yield
            app.state.own_work = "stopped"

        app = FastAPI(title="host", lifespan=lifespan)  # none of our handlers or middleware

        @app.get("/hello")
        async def hello() -> dict[str, str]:
            return {"hello": "world"}

        app.include_router(service.router, prefix="/payouts")
        app.state.service = service
        return app

    return make


async def test_included_under_a_prefix_a_payout_goes_end_to_end_on_sqlite(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_transaction_body=256)
    async with host_stack(included_app(settings)) as host:
        service: PayoutService = host.app.state.service
        assert service.client.webhook_url == "http://service/payouts/webhook"
        assert host.app.state.own_work == "started"
        assert (await host.http.get("/hello")).json() == {"hello": "world"}
        ready = await host.http.get("/payouts/readyz")
        final = await settle_all(host, "/payouts")
        metrics = (await host.http.get("/payouts/metrics")).text
    assert ready.json() == {"status": "ready"}
    assert_matches_the_partner(host, final)
    assert "resilient_payout_up 1.0" in metrics
    assert host.app.state.own_work == "stopped"


def assert_problem(response: httpx.Response, status: int, slug: str, path: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert (body["type"], body["status"], body["instance"]) == (
        PROBLEM_TYPE_PREFIX + slug,
        status,
        path,
    )


async def test_body_limits_hold_under_a_prefix_and_store_nothing(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, max_transaction_body=256, max_webhook_body=1024)
    async with host_stack(included_app(settings)) as host:
        big_tx = await host.http.post(
            "/payouts/transaction", json={"id": "big", "pad": "x" * 2_000_000}
        )

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: streamed
            yield b'{"id": "chunky", "pad": "'
            for _ in range(10):
                yield b"x" * 100
            yield b'"}'

        chunked = await host.http.post(
            "/payouts/transaction", content=chunks(), headers={"content-type": "application/json"}
        )
        big_hook = await host.http.post("/payouts/webhook", content=b"[" * 5000)
        client = host.app.state.service.client
        stored = [await client.storage.get(i) for i in ("big", "chunky")]
    assert_problem(big_tx, 413, "body-too-large", "/payouts/transaction")
    assert_problem(chunked, 413, "body-too-large", "/payouts/transaction")
    assert_problem(big_hook, 413, "body-too-large", "/payouts/webhook")
    assert stored == [None, None]


async def test_problem_json_without_our_exception_handlers(tmp_path: Path) -> None:
    async with host_stack(included_app(settings_for(tmp_path))) as host:
        await host.http.post("/payouts/transaction", json={"id": "p-1", "amount": 1})
        conflict = await host.http.post("/payouts/transaction", json={"id": "p-1", "amount": 2})
        malformed = await host.http.post(
            "/payouts/transaction", content=b'{"id": ', headers={"content-type": "application/json"}
        )
        invalid = await host.http.post("/payouts/transaction", json={"id": 42})
        unknown = await host.http.get("/payouts/transaction/nobody")
        bad_wait = await host.http.get("/payouts/transaction/nobody?wait=-1")
        unsigned = await host.http.post("/payouts/webhook", json={"id": "p-1", "status": "paid"})
    assert_problem(conflict, 409, "idempotency-conflict", "/payouts/transaction")
    assert_problem(malformed, 400, "malformed-json", "/payouts/transaction")
    assert_problem(invalid, 422, "invalid-request", "/payouts/transaction")
    assert invalid.json()["errors"][0]["loc"] == ["body", "id"]
    assert_problem(unknown, 404, "unknown-payout", "/payouts/transaction/nobody")
    assert_problem(bad_wait, 422, "invalid-request", "/payouts/transaction/nobody")
    assert_problem(unsigned, 401, "webhook-rejected", "/payouts/webhook")
    assert "www-authenticate" in unsigned.headers


def test_the_routes_appear_in_the_host_apps_openapi(tmp_path: Path) -> None:
    app = included_app(settings_for(tmp_path))(lambda s: None)
    paths = app.openapi()["paths"]
    assert set(paths) == {
        "/hello",
        "/payouts/transaction",
        "/payouts/transaction/{payout_id}",
        "/payouts/webhook",
        "/payouts/healthz",
        "/payouts/readyz",
        "/payouts/metrics",
    }
    conflict = paths["/payouts/transaction"]["post"]["responses"]["409"]["content"]
    assert conflict[PROBLEM_JSON] == {"schema": {"$ref": "#/components/schemas/Problem"}}
    assert "Problem" in app.openapi()["components"]["schemas"]


async def test_a_router_included_elsewhere_than_the_prefix_refuses_to_start() -> None:
    service = PayoutService(ServiceSettings(storage_url="memory://"))  # prefix "" (the default)
    app = FastAPI(lifespan=service.lifespan)
    app.include_router(service.router, prefix="/payouts")
    with pytest.raises(ConfigurationError, match=r"webhook route is at /payouts/webhook"):
        async with app.router.lifespan_context(app):
            pass
    assert not service.running


def test_route_and_push_paths_are_settings() -> None:
    settings = ServiceSettings(
        storage_url="memory://",
        transaction_path="/transfers",
        webhook_path="/partners/a/hooks",
        health_path="",
        metrics_path="/internal/metrics",
        push_path="/outcomes",
        route_prefix="/pay",
    )
    paths = create_app(settings).openapi()["paths"]
    assert set(paths) == {
        "/pay/transfers",
        "/pay/transfers/{payout_id}",
        "/pay/partners/a/hooks",
        "/pay/readyz",
        "/pay/internal/metrics",
    }
    assert settings.webhook_url == "http://127.0.0.1:3200/pay/partners/a/hooks"
    assert settings.push_url == "http://127.0.0.1:3100/outcomes"


# -- mounted ----------------------------------------------------------------------------------


async def test_mounted_without_its_lifespan_every_route_says_to_enter_it(tmp_path: Path) -> None:
    host = FastAPI()
    host.mount("/payouts", create_app(settings_for(tmp_path, max_transaction_body=256)))
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
        health = await http.get("/payouts/healthz")
        ready = await http.get("/payouts/readyz")
        submit = await http.post("/payouts/transaction", json={"id": "early"})
        # The body limit holds under mount too (it used to match the unprefixed path only).
        big = await http.post("/payouts/transaction", json={"id": "big", "pad": "x" * 2_000_000})
    assert_problem(health, 503, "not-running", "/payouts/healthz")
    assert "lifespan" in health.json()["detail"]
    assert "app.mount()" in health.json()["detail"]
    assert health.headers["retry-after"] == "1"
    assert_problem(ready, 503, "not-ready", "/payouts/readyz")
    assert "lifespan" in ready.json()["detail"]
    assert_problem(submit, 503, "not-running", "/payouts/transaction")
    assert_problem(big, 413, "body-too-large", "/payouts/transaction")
    assert not (tmp_path / "host.db").exists()  # nothing was opened, nothing stored


def mounted_app(settings: ServiceSettings) -> Callable[[Callable[..., Any]], FastAPI]:
    def make(factory: Callable[..., Any]) -> FastAPI:
        payouts = create_app(settings, client_factory=factory)

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            async with payouts.router.lifespan_context(payouts):  # Starlette will not run it
                yield

        host = FastAPI(lifespan=lifespan)
        host.mount("/payouts", payouts)
        host.state.service = payouts.state.payout_service
        return host

    return make


async def test_mounted_with_the_hosts_lifespan_entering_it_works_end_to_end(
    tmp_path: Path,
) -> None:
    # Mounted: /payouts is part of the sub-app's public URL, not a prefix inside it.
    settings = settings_for(tmp_path).replace(public_url="http://service/payouts")
    async with host_stack(mounted_app(settings)) as host:
        assert host.app.state.service.client.webhook_url == "http://service/payouts/webhook"
        final = await settle_all(host, "/payouts")
    assert_matches_the_partner(host, final)


# -- readiness and the partner's reference (in memory, on virtual time) ------------------------


class HangingStorage(MemoryStorage):
    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error
        self.hang = False

    async def get(self, payout_id: str) -> Any:
        if self.error is not None:
            raise self.error
        if self.hang:
            await anyio.sleep_forever()
        return await super().get(payout_id)


@asynccontextmanager
async def in_memory(
    storage: MemoryStorage, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FakePartner]]:
    async with FakePartner(
        script=lambda _id, _n: Script(answer_delay=1, webhook=False), partner_refs=True
    ) as partner:
        service = PayoutService(
            ServiceSettings(storage_url="memory://", **settings),
            client_factory=lambda s: PayoutClient(
                storage=storage, partner=partner, webhook_url=s.webhook_url
            ),
        )
        app = FastAPI(lifespan=service.lifespan)
        app.include_router(service.router)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://s") as http,
        ):
            await anyio.lowlevel.checkpoint()
            yield http, partner


@pytest.mark.parametrize("anyio_backend", [VIRTUAL_TIME_BACKEND])
async def test_readyz_says_whether_storage_answers_and_healthz_does_not_ask() -> None:
    storage = HangingStorage()
    async with in_memory(storage) as (http, _):
        ready = await http.get("/readyz")
        storage.hang = True
        t0 = anyio.current_time()
        hung = await http.get("/readyz")
        waited = anyio.current_time() - t0
        alive = await http.get("/healthz")
        storage.hang, storage.error = False, StorageUnavailable("database is locked")
        down = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert_problem(hung, 503, "not-ready", "/readyz")
    assert hung.json()["detail"] == "storage did not answer within 2 s"
    assert waited == pytest.approx(2.0)
    assert alive.json() == {"status": "ok"}  # liveness: the client runs, storage not asked
    assert_problem(down, 503, "not-ready", "/readyz")
    assert down.json()["detail"] == "storage does not answer: database is locked"


@pytest.mark.parametrize("anyio_backend", [VIRTUAL_TIME_BACKEND])
@pytest.mark.parametrize("expose", [False, True])
async def test_the_partners_reference_is_shown_only_when_enabled(expose: bool) -> None:
    async with in_memory(MemoryStorage(), expose_partner_ref=expose) as (http, _):
        posted = await http.post("/transaction", json={"id": "r-1"})
        got = await http.get("/transaction/r-1?wait=10")
    assert posted.json() == {"id": "r-1", "status": "pending"}  # never on POST answers
    expected = {"id": "r-1", "status": "completed"}
    assert got.json() == ({**expected, "partner_ref": "ref-r-1"} if expose else expected)


async def test_the_not_running_message_follows_the_lifespan(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/missing/p.db"
    service = PayoutService(ServiceSettings(storage_url=url))
    with pytest.raises(StorageUnavailable, match=r"the directory .*/missing does not exist"):
        async with service.lifespan():
            pass
    with pytest.raises(ClientNotRunning, match="failed to start"):
        service.get_client()
    ok = PayoutService(ServiceSettings(storage_url="memory://"))
    async with ok.lifespan():
        assert ok.running
    with pytest.raises(ClientNotRunning, match="has stopped"):
        ok.get_client()
