"""Hostile input against the example service, in process on virtual time: every refusal is a
problem+json with the right status, and nothing is stored for a refused request."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from resilient_payout import CallbackNotifier, PayoutClient, PayoutStatus
from resilient_payout.service import PROBLEM_TYPE_PREFIX, ServiceSettings, create_app
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner
from resilient_payout.testing.mock_partner import MockPartnerConfig
from resilient_payout.webhooks import sign_webhook
from tests.integration.conftest import service_stack

pytestmark = pytest.mark.anyio

PROBLEM_JSON = "application/problem+json"
SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
JSON = {"content-type": "application/json"}


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


@dataclass
class Service:
    app: FastAPI
    http: httpx.AsyncClient
    storage: MemoryStorage
    client: PayoutClient

    async def stored(self) -> int:
        return sum((await self.storage.count_by_status()).values())

    async def webhook(self, payload: Any, *, secret: str = SECRET, **sign: Any) -> httpx.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        msg_id = sign.pop("msg_id", f"msg_{anyio.current_time()}_{hash(body)}")
        ts = sign.pop("ts", self.client.clock.now())
        hdrs = sign_webhook(secret, msg_id, ts, body) | JSON
        return await self.http.post("/webhook", content=body, headers=hdrs)

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.http.get("/metrics")).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0


@asynccontextmanager
async def running(**settings: Any) -> AsyncIterator[Service]:
    """The service with the settings' verifier, a fake partner that never answers finally."""
    cfg = ServiceSettings(storage_url="memory://", public_url="http://service", **settings)
    storage = MemoryStorage()
    partner = FakePartner()

    async def ignore(payout_id: str, status: PayoutStatus) -> None:
        return None

    client = PayoutClient(
        storage=storage,
        partner=partner,
        webhook_url=cfg.webhook_url,
        notifier=CallbackNotifier(ignore),
        policy=cfg.policy(),
        webhook_verifier=cfg.webhook_verifier(),
    )
    app = create_app(cfg, client_factory=lambda s: client)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")
    async with http, app.router.lifespan_context(app):
        await anyio.lowlevel.checkpoint()
        yield Service(app, http, storage, client)


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert (body["status"], body["type"]) == (status, PROBLEM_TYPE_PREFIX + slug)
    return dict(body)


TX_CASES = [
    ({"content": b'{"id": "a"', "headers": JSON}, 400, "malformed-json"),
    ({"content": b"\xff\xfe{}", "headers": JSON}, 400, "malformed-json"),
    ({"content": b"NaN", "headers": JSON}, 422, "invalid-request"),
    ({"json": {"amount": 5}}, 422, "invalid-request"),
    ({"json": {"id": None}}, 422, "invalid-request"),
    ({"json": {"id": ["x"]}}, 422, "invalid-request"),
    ({"json": {"id": True}}, 422, "invalid-request"),
    ({"json": {"id": ""}}, 422, "invalid-request"),
    ({"json": {"id": "a" * 129}}, 422, "invalid-request"),
    ({"json": {"id": "-starts-with-dash"}}, 422, "invalid-request"),
    ({"json": {"id": "has space"}}, 422, "invalid-request"),
    ({"json": {"id": "tx\n1"}}, 422, "invalid-request"),
    ({"json": {"id": "caf\u00e9"}}, 422, "invalid-request"),
    ({"json": "tx-1"}, 422, "invalid-request"),
    ({"content": b'{"id": "big", "pad": "' + b"x" * 20_000 + b'"}', "headers": JSON}, 413,
     "body-too-large"),
    ({"content": b'{"id": "a", "amount": NaN, ', "headers": JSON}, 400, "malformed-json"),
    ({"content": b'{"id": "a", "note": "\xff"}', "headers": JSON}, 400, "malformed-json"),
    ({"content": b'{"id": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": JSON}, 422,
     "invalid-request"),
    ({"content": b'{"id": "a", "x": ' + b"[" * 900 + b"]" * 900 + b"}", "headers": JSON}, 422,
     "invalid-request"),
    ({"content": b'{"id": "a", "x": ' + b"1" * 5000 + b"}", "headers": JSON}, 422,
     "invalid-request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "status", "slug"), TX_CASES, ids=[str(i) for i in range(len(TX_CASES))]
)
async def test_bad_transactions_are_problems_and_store_nothing(
    kwargs: dict[str, Any], status: int, slug: str
) -> None:
    async with running() as svc:
        response = await svc.http.post("/transaction", **kwargs)
        assert_problem(response, status, slug)
        assert await svc.stored() == 0
        assert svc.client.stats.submits == 0


async def test_chunked_oversized_body_is_a_413_too() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"id": "chunky", "pad": "'
        for _ in range(20):
            yield b"x" * 1024
        yield b'"}'

    async with running() as svc:
        response = await svc.http.post("/transaction", content=chunks(), headers=JSON)
        assert_problem(response, 413, "body-too-large")
        assert await svc.storage.get("chunky") is None


async def test_body_limit_is_a_setting_and_the_id_of_128_chars_is_accepted() -> None:
    async with running(max_transaction_body=256) as svc:
        ok = await svc.http.post("/transaction", json={"id": "a" * 128})
        big = await svc.http.post("/transaction", json={"id": "b", "pad": "x" * 300})
        assert ok.status_code == 200
        assert_problem(big, 413, "body-too-large")
        assert await svc.storage.get("b") is None


async def test_unknown_fields_are_kept_in_the_fingerprint_by_default() -> None:
    async with running() as svc:
        first = await svc.http.post("/transaction", json={"id": "tx-x", "amount": 1, "note": "a"})
        again = await svc.http.post("/transaction", json={"id": "tx-x", "amount": 1, "note": "b"})
        assert first.status_code == 200
        assert_problem(again, 409, "idempotency-conflict")
        stored = await svc.storage.get("tx-x")
        assert stored is not None
        assert stored.request == {"id": "tx-x", "amount": 1, "note": "a"}


async def test_unknown_fields_are_refused_with_extra_fields_forbid() -> None:
    async with running(extra_fields="forbid") as svc:
        refused = await svc.http.post("/transaction", json={"id": "tx-f", "s3cr3t-name": 1})
        plain = await svc.http.post("/transaction", json={"id": "tx-g"})
        body = assert_problem(refused, 422, "invalid-request")
        assert "s3cr3t" not in refused.text  # not even field names are echoed
        assert "1 unknown field" in body["detail"]
        assert await svc.storage.get("tx-f") is None
        assert plain.status_code == 200


async def test_uuid_id_format() -> None:
    uuid = "0b6f6c2e-3f9a-4c1e-9d1e-5b2a7c9e8f10"
    async with running(id_format="uuid") as svc:
        ok = await svc.http.post("/transaction", json={"id": uuid})
        upper = await svc.http.post("/transaction", json={"id": uuid.upper()})
        token = await svc.http.post("/transaction", json={"id": "order-1"})
        assert ok.status_code == 200
        assert_problem(upper, 422, "invalid-request")
        assert_problem(token, 422, "invalid-request")
        assert await svc.stored() == 1


async def test_repeated_id_with_another_payload_is_a_409_and_keeps_the_first() -> None:
    async with running() as svc:
        await svc.http.post("/transaction", json={"id": "tx-r", "amount": 10})
        response = await svc.http.post("/transaction", json={"id": "tx-r", "amount": 99})
        assert_problem(response, 409, "idempotency-conflict")
        stored = await svc.storage.get("tx-r")
        assert stored is not None
        assert stored.request["amount"] == 10


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"id": "tx-n", "amount": NaN}', ["body", "amount"]),
        (b'{"id": "tx-n", "amount": Infinity}', ["body", "amount"]),
        (b'{"id": "tx-n", "amount": -Infinity}', ["body", "amount"]),
        (b'{"id": "tx-n", "amount": 1e400}', ["body", "amount"]),
        (b'{"id": "tx-n", "amount": 1e-400}', ["body", "amount"]),
        (b'{"id": "tx-n", "legs": [1, {"amount": NaN}]}', ["body", "legs", 1, "amount"]),
    ],
)
async def test_non_finite_and_absurd_numbers_are_422_naming_the_field_and_store_nothing(
    body: bytes, where: list[str | int]
) -> None:
    async with running() as svc:
        response = await svc.http.post("/transaction", content=body, headers=JSON)
        problem = assert_problem(response, 422, "invalid-request")
        assert [e["loc"] for e in problem["errors"]] == [where]
        assert problem["detail"].startswith(".".join(map(str, where)) + ": must ")
        assert await svc.stored() == 0


async def test_an_integral_amount_written_as_100_0_is_a_replay_of_100() -> None:
    async with running() as svc:
        first = await svc.http.post("/transaction", content=b'{"id":"tx-i","amount":100}',
                                    headers=JSON)  # fmt: skip
        again = await svc.http.post("/transaction", content=b'{"amount":1.0e2,"id":"tx-i"}',
                                    headers=JSON)  # fmt: skip
        assert (first.status_code, again.status_code) == (200, 200)
        assert (svc.client.stats.submits, svc.client.stats.replays) == (1, 1)
        stored = await svc.storage.get("tx-i")
        assert stored is not None
        assert stored.request == {"id": "tx-i", "amount": 100}
        assert stored.fingerprint.startswith("v2:")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b"0.1", b"0.10000000000000000555"),
        (b"9007199254740992.0", b"9007199254740993.0"),
    ],
)
async def test_amounts_a_float_cannot_tell_apart_are_a_409(first: bytes, second: bytes) -> None:
    async with running() as svc:
        ok = await svc.http.post(
            "/transaction", content=b'{"id": "tx-p", "amount": ' + first + b"}", headers=JSON
        )
        clash = await svc.http.post(
            "/transaction", content=b'{"id": "tx-p", "amount": ' + second + b"}", headers=JSON
        )
        assert ok.status_code == 200
        assert_problem(clash, 409, "idempotency-conflict")
        stored = await svc.storage.get("tx-p")
        assert stored is not None
        assert str(stored.request["amount"]) == first.decode().removesuffix(".0")


async def test_a_decimal_amount_is_stored_as_its_canonical_decimal_string() -> None:
    async with running() as svc:
        await svc.http.post("/transaction", content=b'{"id":"tx-d","amount":100.50}', headers=JSON)
        again = await svc.http.post("/transaction", json={"id": "tx-d", "amount": "100.5"})
        stored = await svc.storage.get("tx-d")
        assert stored is not None
        assert stored.request == {"id": "tx-d", "amount": "100.5"}
        assert again.status_code == 200  # the number and its canonical string are one payload


async def test_signed_webhooks_settle_and_bad_ones_are_refused_before_parsing() -> None:
    async with running(webhook_secrets=(SECRET,)) as svc:
        await svc.http.post("/transaction", json={"id": "tx-w"})
        unknown = await svc.webhook({"id": "nobody", "status": "completed"})
        bad_status = await svc.webhook({"id": "tx-w", "status": "paid"})
        not_json = await svc.webhook(b"{nope")
        ok = await svc.webhook({"id": "tx-w", "status": "declined"})
        assert_problem(unknown, 404, "unknown-payout")
        assert_problem(bad_status, 422, "invalid-webhook")
        assert_problem(not_json, 400, "malformed-json")
        assert ok.json() == {"id": "tx-w", "status": "declined"}
        assert await svc.storage.get("nobody") is None


async def test_forged_stale_replayed_and_unsigned_webhooks_are_refused_and_counted() -> None:
    other = "whsec_" + base64.b64encode(b"o" * 32).decode()
    async with running(webhook_secrets=(SECRET,)) as svc:
        await svc.http.post("/transaction", json={"id": "tx-h"})
        hook = {"id": "tx-h", "status": "completed"}
        forged = await svc.webhook(hook, secret=other)
        stale = await svc.webhook(hook, ts=svc.client.clock.now() - 301)
        unsigned = await svc.http.post("/webhook", json=hook)
        first = await svc.webhook({"id": "tx-h", "status": "pending"}, msg_id="msg_once")
        replay = await svc.webhook({"id": "tx-h", "status": "pending"}, msg_id="msg_once")
        for response in (forged, stale, unsigned):
            body = assert_problem(response, 401, "webhook-rejected")
            assert "www-authenticate" in response.headers
            assert SECRET not in response.text
            assert body["detail"]
        assert first.status_code == 200
        assert_problem(replay, 409, "webhook-replayed")
        payout = await svc.storage.get("tx-h")
        assert payout is not None
        assert not payout.is_final  # nothing refused reached the payout
        assert svc.client.stats.webhooks_rejected == {
            "forged": 1,
            "stale": 1,
            "missing_headers": 1,
            "replayed": 1,
        }
        name = "resilient_payout_webhooks_rejected_total"
        assert await svc.metric(name, reason="forged") == 1
        assert await svc.metric(name, reason="replayed") == 1


async def test_without_secret_webhooks_are_refused_unless_unsigned_is_allowed() -> None:
    hook = {"id": "tx-u", "status": "completed"}
    async with running() as svc:
        await svc.http.post("/transaction", json={"id": "tx-u"})
        refused = await svc.http.post("/webhook", json=hook)
        assert_problem(refused, 401, "webhook-rejected")
        assert svc.client.stats.webhooks_rejected == {"not_configured": 1}
    async with running(allow_unsigned_webhooks=True) as svc:
        await svc.http.post("/transaction", json={"id": "tx-u"})
        accepted = await svc.http.post("/webhook", json=hook)
        assert accepted.json() == {"id": "tx-u", "status": "completed"}


async def test_oversized_webhook_is_a_413() -> None:
    async with running(webhook_secrets=(SECRET,), max_webhook_body=1024) as svc:
        response = await svc.webhook({"id": "x", "status": "completed", "pad": "p" * 2000})
        assert_problem(response, 413, "body-too-large")
        assert svc.client.stats.webhooks == 0


async def test_the_mock_partner_signs_and_the_service_verifies_end_to_end() -> None:
    settings = ServiceSettings(
        storage_url="memory://", public_url="http://service", webhook_secrets=(SECRET,)
    )
    config = MockPartnerConfig(
        seed=3, p_timeout=0.0, p_webhook=1.0, p_completed=1.0, webhook_secret=SECRET,
        answer_delay_min=60, answer_delay_max=60, webhook_delay_min=1, webhook_delay_max=1,
    )  # fmt: skip
    async with service_stack(settings, config, notify=False, verify_webhooks=True) as st:
        await st.http.post("/transaction", json={"id": "e2e-signed"})
        await anyio.sleep(5)  # the webhook (1 s) settles it long before the answer (60 s)
        settled = await st.http.get("/transaction/e2e-signed")
        assert settled.json() == {"id": "e2e-signed", "status": "completed"}
        assert st.client.stats.webhooks == 1
        assert st.client.stats.webhooks_rejected == {}
        assert st.partner.stats()["webhooks_failed"] == 0
