"""The example service's HTTP contract, in process on virtual time (the stack: conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import resilient_payout.fastapi
import resilient_payout.service
from resilient_payout import PayoutClient, StorageUnavailable
from resilient_payout.service import PROBLEM_TYPE_PREFIX, ServiceSettings, create_app
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner
from resilient_payout.testing.mock_partner import MockPartnerConfig
from tests.integration.conftest import ServiceStack, service_stack

pytestmark = pytest.mark.anyio

PROBLEM_JSON = "application/problem+json"
# Every answer is known quickly and no webhook muddles timings, unless a test says otherwise.
QUIET = MockPartnerConfig(seed=1, p_timeout=0.0, p_webhook=0.0, p_completed=1.0)


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


@asynccontextmanager
async def running(
    config: MockPartnerConfig = QUIET, **settings: Any
) -> AsyncIterator[ServiceStack]:
    cfg = ServiceSettings(storage_url="memory://", public_url="http://service", **settings)
    async with service_stack(cfg, config) as svc:
        yield svc


def assert_problem(response: httpx.Response, status: int, slug: str | None, path: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["status"] == status
    assert body["instance"] == path
    assert body["type"] == (PROBLEM_TYPE_PREFIX + slug if slug else "about:blank")
    assert body["title"]
    assert body["detail"]


async def post_preferring(
    svc: ServiceStack, payout_id: str, prefer: str
) -> tuple[httpx.Response, float]:
    """POST /transaction with a ``Prefer`` header: the answer and the virtual seconds it took."""
    t0 = anyio.current_time()
    response = await svc.http.post(
        "/transaction", json={"id": payout_id}, headers={"Prefer": prefer}
    )
    return response, anyio.current_time() - t0


async def test_submit_answers_at_once_and_a_repeat_gets_the_same_body() -> None:
    async with running(QUIET.replace(answer_delay_min=5, answer_delay_max=5)) as svc:
        t0 = anyio.current_time()
        first = await svc.http.post("/transaction", json={"id": "tx-1", "amount": 10})
        assert anyio.current_time() == t0  # never waits on the partner
        again = await svc.http.post("/transaction", json={"amount": 10, "id": "tx-1"})
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json() == {"id": "tx-1", "status": "pending"}
        assert "preference-applied" not in first.headers
        settled = await svc.http.get("/transaction/tx-1?wait=10")
    assert settled.json() == {"id": "tx-1", "status": "completed"}
    assert svc.partner.stats()["posts_total"] == 1


async def test_same_id_with_other_contents_is_a_409_problem() -> None:
    async with running() as svc:
        await svc.http.post("/transaction", json={"id": "tx-2", "amount": 10})
        response = await svc.http.post("/transaction", json={"id": "tx-2", "amount": 11})
    assert_problem(response, 409, "idempotency-conflict", "/transaction")
    assert "tx-2" in response.json()["detail"]


JSON = {"content-type": "application/json"}
ERROR_CASES = [
    ("POST", "/transaction", {"content": b'{"id": ', "headers": JSON}, 400, "malformed-json"),
    ("POST", "/transaction", {"json": {"amount": 1}}, 422, "invalid-request"),
    ("POST", "/transaction", {"json": {"id": 42}}, 422, "invalid-request"),
    ("POST", "/transaction", {"json": {"id": "../etc"}}, 422, "invalid-request"),
    ("POST", "/transaction", {"json": ["id"]}, 422, "invalid-request"),
    ("GET", "/nowhere", {}, 404, None),
    ("DELETE", "/transaction", {}, 405, None),
    ("GET", "/transaction/nobody", {}, 404, "unknown-payout"),
    ("GET", "/transaction/nobody?wait=-1", {}, 422, "invalid-request"),
    ("GET", "/transaction/nobody?wait=31", {}, 422, "invalid-request"),
    ("GET", "/transaction/nobody?wait=soon", {}, 422, "invalid-request"),
    ("POST", "/webhook", {"content": b"not json"}, 400, "malformed-json"),
    ("POST", "/webhook", {"json": {"id": "nobody", "status": "completed"}}, 404, "unknown-payout"),
    ("POST", "/webhook", {"json": {"id": "nobody", "status": "paid"}}, 422, "invalid-webhook"),
    ("POST", "/webhook", {"json": {"status": "completed"}}, 422, "invalid-webhook"),
    ("POST", "/webhook", {"content": b"[" * 70_000}, 413, "body-too-large"),
]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "slug"),
    ERROR_CASES,
    ids=[f"{c[0]} {c[1][:24]} {c[3]}" for c in ERROR_CASES],
)
async def test_every_error_is_a_problem_with_the_right_status(
    method: str, url: str, kwargs: dict[str, Any], status: int, slug: str | None
) -> None:
    async with running() as svc:
        response = await svc.http.request(method, url, **kwargs)
    assert_problem(response, status, slug, url.split("?")[0])
    if status == 405:
        assert response.headers["allow"] == "POST"


async def test_validation_problems_list_the_fields_without_echoing_input() -> None:
    async with running() as svc:
        response = await svc.http.post("/transaction", json={"id": 42, "secret": "s3cr3t"})
    body = response.json()
    assert body["errors"] == [
        {"loc": ["body", "id"], "msg": "Input should be a valid string", "type": "string_type"}
    ]
    assert "s3cr3t" not in response.text


async def test_prefer_wait_returns_the_final_status_when_the_partner_answers_in_time() -> None:
    async with running(QUIET.replace(answer_delay_min=2, answer_delay_max=2)) as svc:
        response, took = await post_preferring(svc, "tx-3", "respond-async, wait=5")
        assert took == pytest.approx(2.0)
    assert response.json() == {"id": "tx-3", "status": "completed"}
    assert response.headers["preference-applied"] == "wait=5"


async def test_prefer_wait_gives_pending_after_no_more_than_n_seconds() -> None:
    async with running(QUIET.replace(answer_delay_min=8, answer_delay_max=8)) as svc:
        response, took = await post_preferring(svc, "tx-4", "wait=2.5")
        assert took == pytest.approx(2.5)
        # A repeat of a payout that became final meanwhile gets it at once.
        await anyio.sleep(10)
        late, took = await post_preferring(svc, "tx-4", "wait=5")
        assert took == 0
    assert response.json() == {"id": "tx-4", "status": "pending"}
    assert response.headers["preference-applied"] == "wait=2.5"
    assert late.json() == {"id": "tx-4", "status": "completed"}


async def test_prefer_wait_is_capped_by_max_wait_and_bad_preferences_are_ignored() -> None:
    async with running(QUIET.replace(answer_delay_min=8, answer_delay_max=8), max_wait=3) as svc:
        capped, took = await post_preferring(svc, "tx-5", "wait=100")
        assert took == pytest.approx(3.0)
        ignored, took = await post_preferring(svc, "tx-6", "wait=later")
        assert took == 0
    assert capped.json()["status"] == "pending"
    assert capped.headers["preference-applied"] == "wait=3"
    assert ignored.json()["status"] == "pending"
    assert "preference-applied" not in ignored.headers


async def test_get_long_polls_until_final_and_answers_at_once_without_wait() -> None:
    async with running(QUIET.replace(answer_delay_min=7, answer_delay_max=7)) as svc:
        await svc.http.post("/transaction", json={"id": "tx-7"})
        t0 = anyio.current_time()
        now = await svc.http.get("/transaction/tx-7")
        assert anyio.current_time() == t0
        polled = await svc.http.get("/transaction/tx-7", params={"wait": "20"})
        assert anyio.current_time() - t0 == pytest.approx(7.0)
        t1 = anyio.current_time()
        short = await svc.http.get("/transaction/tx-7", params={"wait": "0.5"})
        assert anyio.current_time() == t1  # already final: no waiting
    assert now.json() == {"id": "tx-7", "status": "pending"}
    assert polled.json() == {"id": "tx-7", "status": "completed"}
    assert short.json() == polled.json()


async def test_get_wait_ends_with_pending_after_the_wait() -> None:
    async with running(QUIET.replace(answer_delay_min=9, answer_delay_max=9)) as svc:
        await svc.http.post("/transaction", json={"id": "tx-8"})
        t0 = anyio.current_time()
        response = await svc.http.get("/transaction/tx-8?wait=1.5")
        assert anyio.current_time() - t0 == pytest.approx(1.5)
    assert response.json() == {"id": "tx-8", "status": "pending"}


async def test_webhook_settles_a_payout_and_answers_its_app_status() -> None:
    config = QUIET.replace(answer_delay_min=9, answer_delay_max=9)
    async with running(config) as svc:
        await svc.http.post("/transaction", json={"id": "tx-9"})
        await anyio.sleep(1)
        pending = await svc.http.post("/webhook", json={"id": "tx-9", "status": "pending"})
        done = await svc.http.post("/webhook", json={"id": "tx-9", "status": "completed"})
        again = await svc.http.post("/webhook", json={"id": "tx-9", "status": "completed"})
        got = await svc.http.get("/transaction/tx-9")
        await svc.partner.wait_idle()
        await anyio.sleep(5)
    assert pending.json() == {"id": "tx-9", "status": "pending"}
    assert done.status_code == again.status_code == 200
    assert done.json() == again.json() == got.json() == {"id": "tx-9", "status": "completed"}
    assert svc.pushes == [("tx-9", "completed")]


async def test_healthz_is_ok_while_running_and_503_otherwise() -> None:
    async with running() as svc:
        ok = await svc.http.get("/healthz")
    assert ok.status_code == 200
    assert ok.json() == {"status": "ok"}
    app = create_app(ServiceSettings(storage_url="memory://"))  # lifespan never entered
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        stopped = await c.get("/healthz")
        submit = await c.post("/transaction", json={"id": "early"})
        metrics = await c.get("/metrics")
    assert_problem(stopped, 503, "not-running", "/healthz")
    assert stopped.headers["retry-after"] == "1"
    assert_problem(submit, 503, "not-running", "/transaction")
    assert samples(metrics.text)[("resilient_payout_up", ())] == 0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_expose_client_counters_payouts_by_status_and_requests() -> None:
    async with running(QUIET.replace(answer_delay_min=3, answer_delay_max=3)) as svc:
        await svc.http.post("/transaction", json={"id": "m-1"})
        await svc.http.post("/transaction", json={"id": "m-1"})
        await svc.http.post("/transaction", json={"id": "m-2"}, headers={"Prefer": "wait=10"})
        await svc.http.get("/nowhere")
        response = await svc.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    assert got[("resilient_payout_up", ())] == 1
    assert got[("resilient_payout_submits_total", ())] == 2
    assert got[("resilient_payout_replays_total", ())] == 1
    assert got[("resilient_payout_posts_total", ())] == 2
    # Both settled while the Prefer: wait held the third request (the partner answers in 3 s).
    assert got[("resilient_payout_payouts", (("status", "completed"),))] == 2
    assert got[("resilient_payout_payouts", (("status", "received"),))] == 0
    post_ok = (("method", "POST"), ("route", "/transaction"), ("status", "200"))
    assert got[("resilient_payout_http_requests_total", post_ok)] == 3
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert got[("resilient_payout_http_requests_total", unmatched)] == 1
    latency = (("method", "POST"), ("route", "/transaction"))
    assert got[("resilient_payout_http_request_duration_seconds_count", latency)] == 3
    assert got[("resilient_payout_http_request_duration_seconds_sum", latency)] == pytest.approx(3)


def test_several_apps_in_one_process_have_their_own_metrics() -> None:
    settings = ServiceSettings(storage_url="memory://")
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics_registry is not second.state.metrics_registry


def test_openapi_lists_every_route_with_its_problem_responses() -> None:
    schema = create_app(ServiceSettings(storage_url="memory://", max_wait=12)).openapi()
    paths = schema["paths"]
    expected = {
        ("/transaction", "post"): {"200", "400", "409", "413", "422", "500", "503"},
        ("/transaction/{payout_id}", "get"): {"200", "404", "422", "500", "503"},
        ("/webhook", "post"): {"200", "400", "401", "404", "409", "413", "422", "500", "503"},
        ("/healthz", "get"): {"200", "503"},
        ("/readyz", "get"): {"200", "503"},  # new in 0.2 (readiness)
        ("/metrics", "get"): {"200", "500"},
    }
    assert {(p, m) for p, item in paths.items() for m in item} == set(expected)
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for (path, method), codes in expected.items():
        responses = paths[path][method]["responses"]
        assert set(responses) == codes, path
        for code, response in responses.items():
            if code != "200":
                assert response["content"] == {PROBLEM_JSON: {"schema": problem_ref}}, (path, code)
    assert {"type", "title", "status", "detail", "instance"} <= set(
        schema["components"]["schemas"]["Problem"]["properties"]
    )
    submit = paths["/transaction"]["post"]
    assert [(p["name"], p["in"]) for p in submit["parameters"]] == [("Prefer", "header")]
    assert "Preference-Applied" in submit["responses"]["200"]["headers"]
    assert "Retry-After" in submit["responses"]["503"]["headers"]
    wait = next(
        p for p in paths["/transaction/{payout_id}"]["get"]["parameters"] if p["in"] == "query"
    )
    assert wait["name"] == "wait"
    assert wait["schema"]["anyOf"][0]["maximum"] == 12
    webhook_body = paths["/webhook"]["post"]["requestBody"]["content"]["application/json"]
    assert webhook_body["schema"]["required"] == ["id", "status"]


async def test_fifty_transfers_end_to_end_match_the_partners_truth() -> None:
    ids = [f"e2e-{i:02d}" for i in range(50)]
    answers: dict[str, dict[str, str]] = {}
    final: dict[str, str] = {}
    async with running(MockPartnerConfig(seed=11)) as svc:

        async def one(payout_id: str) -> None:
            t0 = anyio.current_time()
            response = await svc.http.post("/transaction", json={"id": payout_id, "amount": 5})
            assert anyio.current_time() == t0
            answers[payout_id] = response.json()
            for _ in range(40):
                got = (await svc.http.get(f"/transaction/{payout_id}?wait=30")).json()
                if got["status"] != "pending":
                    final[payout_id] = got["status"]
                    return

        async with anyio.create_task_group() as tg:
            for payout_id in ids:
                tg.start_soon(one, payout_id)
                await anyio.sleep(0.1)
        await svc.partner.wait_idle()
        await anyio.sleep(60)  # let the last pushes go out
        truth = svc.partner.truth()["transactions"]
        stats = svc.partner.stats()
    assert all(a == {"id": i, "status": "pending"} for i, a in answers.items())
    expected = {i: truth[i]["status"] or "failed" for i in ids}
    assert final == expected
    assert sorted(svc.pushes) == sorted(expected.items())  # one push each, the right one
    assert stats["double_payments"] == []
    assert stats["blocks"] == 0
    # The seeded run must exercise the hard paths, not only quick answers.
    assert stats["answers"]["timeout"] > 0
    assert {"completed", "declined"} <= set(expected.values())


class BrokenStorage(MemoryStorage):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def get(self, payout_id: str) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "slug"),
    [
        (StorageUnavailable("database is locked"), 503, "storage-unavailable"),
        (RuntimeError("a bug with a secret inside"), 500, None),
    ],
)
async def test_storage_trouble_is_503_with_retry_after_and_a_bug_is_a_bare_500(
    error: Exception, status: int, slug: str | None
) -> None:
    async with FakePartner() as partner:
        client = PayoutClient(
            storage=BrokenStorage(error), partner=partner, webhook_url="http://service/webhook"
        )
        app = create_app(ServiceSettings(storage_url="memory://"), client_factory=lambda s: client)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://service") as http,
        ):
            await anyio.lowlevel.checkpoint()
            response = await http.get("/transaction/any")
    assert_problem(response, status, slug, "/transaction/any")
    assert "secret" not in response.text
    assert ("retry-after" in response.headers) == (status == 503)


def test_the_former_module_reexports_the_service() -> None:
    old, new = resilient_payout.fastapi, resilient_payout.service
    assert old.__all__ == new.__all__
    assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)
