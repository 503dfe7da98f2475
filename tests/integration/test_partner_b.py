"""examples/partner_b: the codec, the webhook parser and verifier, and the whole client against the
fake Partner B on loopback ports (real sockets, time-scaled)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from examples.partner_b.adapter import (
    WORDS,
    PartnerBCodec,
    PartnerBVerifier,
    parse_webhook,
    partner_b,
    to_minor,
)
from examples.partner_b.fake import FakeConfig, FakePartnerB
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from resilient_payout import (
    Accepted,
    Cause,
    InMemoryReplayStore,
    InvalidWebhook,
    PartnerStatus,
    PayoutClient,
    PayoutStatus,
    Policy,
    Refused,
    RejectReason,
    SubmitAttempt,
    UnknownPayout,
    WebhookAuthError,
    WebhookRejected,
)
from resilient_payout.cli._procs import free_ports
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing._server import embedded_server, listen

SECRET = "test-secret-for-partner-b-0123456789"
NOW = 1_700_000_000.0
LOOPBACK = "127.0.0.1"


def attempt(request: Mapping[str, Any]) -> SubmitAttempt:
    return SubmitAttempt.first("pay-1", "http://us.test/hook", {"id": "pay-1", **request})


def signed(body: bytes, ts: float = NOW, secret: str = SECRET) -> dict[str, str]:
    mac = hmac.new(secret.encode(), f"{int(ts)}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-PB-Signature": f"t={int(ts)},v1={mac}"}


# -- the codec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        (100, "KES", 10_000),
        ("12.5", "KES", 1_250),
        ("0.3", "KES", 30),
        ("1500", "UGX", 1_500),
        ("1.234", "BHD", 1_234),
        ("7.10", "XYZ", 710),  # an unknown currency has 2 decimals
        ("12345678901234567890123456789012.34", "KES", 1234567890123456789012345678901234),
    ],
)
def test_amounts_become_minor_units_exactly(amount: object, currency: str, minor: int) -> None:
    assert to_minor(amount, currency) == minor


def test_decimal_strings_add_up_where_floats_do_not() -> None:
    assert 0.1 + 0.2 != 0.3
    assert to_minor("0.1", "KES") + to_minor("0.2", "KES") == to_minor("0.3", "KES") == 30
    assert to_minor(str(Decimal("0.1") + Decimal("0.2")), "KES") == 30


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("0.001", "KES"),  # a tenth of a cent
        ("1500.5", "UGX"),  # UGX has no minor unit
        ("1.2345", "BHD"),
        ("0", "KES"),
        (-5, "KES"),
        ("1_000", "KES"),  # Decimal() would take these
        (" 5", "KES"),
        ("NaN", "KES"),
        ("1e3", "KES"),
        (True, "KES"),
        (12.5, "KES"),  # stored requests never hold floats; a float here is a bug upstream
        (None, "KES"),
    ],
)
def test_amounts_that_are_not_whole_minor_units_are_refused(amount: object, currency: str) -> None:
    with pytest.raises(ValueError, match=r"amount|minor units"):
        to_minor(amount, currency)


def test_the_submit_request_carries_minor_units_the_key_and_the_callback() -> None:
    a = attempt({"amount": "12.5", "currency": "KES", "beneficiary": {"msisdn": "254700000001"}})
    request = PartnerBCodec().submit_request(a)
    assert (request.method, request.path) == ("POST", "/v1/payouts")
    assert request.json == {
        "reference": "pay-1",
        "amount_minor": 1250,
        "currency": "KES",
        "beneficiary": {"msisdn": "254700000001"},
        "callback_url": "http://us.test/hook",
    }
    assert request.headers == {"Idempotency-Key": a.idempotency_key}
    assert PartnerBCodec().idempotency is not None
    assert PartnerBCodec().idempotency.retention == 86_400.0  # type: ignore[union-attr]


def test_a_request_without_an_amount_is_refused_unless_a_demo_amount_is_set() -> None:
    with pytest.raises(ValueError, match="amount"):
        PartnerBCodec().submit_request(attempt({}))
    request = PartnerBCodec(demo_amount="10").submit_request(attempt({}))
    assert request.json["amount_minor"] == 1000
    with pytest.raises(ValueError, match="currency"):
        PartnerBCodec().submit_request(attempt({"amount": 1, "currency": "kes"}))


def test_checks_go_by_its_reference_or_else_by_ours() -> None:
    codec = PartnerBCodec()
    assert codec.check_request("pay/1", "PB-AB12").path == "/v1/payouts/PB-AB12"
    assert codec.check_request("pay/1", None).path == "/v1/payouts?reference=pay%2F1"


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("SUCCESS", PartnerStatus.COMPLETED),
        ("FAILED", PartnerStatus.DECLINED),
        ("REJECTED", PartnerStatus.DECLINED),
        ("PROCESSING", PartnerStatus.PENDING),
        ("QUEUED", PartnerStatus.PENDING),
        ("ON_HOLD", PartnerStatus.PENDING),  # a word it starts sending tomorrow settles nothing
        ("success", PartnerStatus.PENDING),
    ],
)
def test_status_words(word: str, status: PartnerStatus) -> None:
    assert WORDS.read(word) is status


def test_reading_a_record_names_its_reference() -> None:
    codec = PartnerBCodec()
    record = codec.read_record({"payout_id": "PB-X1", "state": "SUCCESS"}, "pay-1", None)
    assert (record.status, record.partner_ref) == (PartnerStatus.COMPLETED, "PB-X1")
    same = {"payout_id": "PB-X1", "reference": "pay-1", "state": "QUEUED"}
    assert codec.read_record(same, "pay-1", "PB-X1").status is PartnerStatus.PENDING


@pytest.mark.parametrize(
    ("data", "partner_ref", "match"),
    [
        (["PB-X1"], None, "not a JSON object"),
        ({"state": "SUCCESS"}, None, "not a Partner B reference"),
        ({"payout_id": "X1", "state": "SUCCESS"}, None, "not a Partner B reference"),
        ({"payout_id": 7, "state": "SUCCESS"}, None, "not a Partner B reference"),
        ({"payout_id": "PB-X2", "state": "SUCCESS"}, "PB-X1", "another transfer"),
        ({"payout_id": "PB-X1", "reference": "pay-2", "state": "SUCCESS"}, None, "another"),
        ({"payout_id": "PB-X1"}, None, "status missing"),
        ({"payout_id": "PB-X1", "state": 3}, None, "status missing"),
    ],
)
def test_garbage_answers_are_refused(data: Any, partner_ref: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PartnerBCodec().read_record(data, "pay-1", partner_ref)


# -- what HttpPartner makes of a codec that raises --------------------------------------------


def _counting_client() -> tuple[httpx.AsyncClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"payout_id": "PB-1", "state": "SUCCESS"})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), seen


@pytest.mark.anyio
async def test_an_amount_that_cannot_be_sent_is_refused_unsent() -> None:
    # HttpPartner builds the request before anything can leave: the codec's ValueError is a
    # refusal (the payout fails at once), never an uncertain POST to re-send and check.
    http, seen = _counting_client()
    async with http:
        adapter = partner_b("http://pb.test", client=http)
        outcome = await adapter.submit(attempt({"amount": "0.001"}))
        assert isinstance(outcome, Refused)
        assert "0.001 KES is not a positive whole number of minor units" in outcome.reason
        good = await adapter.submit(attempt({"amount": "1"}))
        assert good == Accepted(PartnerStatus.COMPLETED, "PB-1")
    assert [r.method for r in seen] == ["POST"]  # only the good one left this process
    assert json.loads(seen[0].content)["amount_minor"] == 100


# -- webhooks -------------------------------------------------------------------------------


def test_the_webhook_names_only_its_reference() -> None:
    body = b'{"event_id": "evt_1", "payout_id": "PB-X1", "state": "SUCCESS"}'
    hook = parse_webhook(body, {})
    assert (hook.payout_id, hook.partner_ref, hook.event_id) == (None, "PB-X1", "evt_1")
    assert hook.status is PartnerStatus.COMPLETED


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'["PB-X1"]',
        b'{"event_id": "evt_1", "state": "SUCCESS"}',
        b'{"event_id": "evt_1", "payout_id": "pay-1", "state": "SUCCESS"}',
        b'{"payout_id": "PB-X1", "state": "SUCCESS"}',
        b'{"event_id": "", "payout_id": "PB-X1", "state": "SUCCESS"}',
        b'{"event_id": "evt_1", "payout_id": "PB-X1"}',
    ],
)
def test_malformed_webhooks_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidWebhook):
        parse_webhook(body, {})


async def _rejected(verifier: PartnerBVerifier, headers: dict[str, str], body: bytes) -> str:
    with pytest.raises(WebhookAuthError) as info:
        await verifier.verify(headers, body, NOW)
    return info.value.reason.value


@pytest.mark.anyio
async def test_the_verifier_accepts_a_valid_signature_once() -> None:
    verifier = PartnerBVerifier(SECRET, tolerance=300)
    body = b'{"event_id": "evt_1", "payout_id": "PB-X1", "state": "SUCCESS"}'
    await verifier.verify(signed(body, NOW - 299), body, NOW)
    await verifier.verify({"x-pb-signature": signed(body, NOW + 5)["X-PB-Signature"]}, body, NOW)
    assert await _rejected(verifier, signed(body, NOW - 299), body) == RejectReason.REPLAYED


@pytest.mark.anyio
async def test_the_verifier_rejects_forged_stale_missing_and_malformed() -> None:
    verifier = PartnerBVerifier(SECRET, tolerance=300)
    body = b'{"event_id": "evt_1", "payout_id": "PB-X1", "state": "SUCCESS"}'
    forged = b'{"event_id": "evt_1", "payout_id": "PB-X1", "state": "FAILED"}'
    assert await _rejected(verifier, signed(body), forged) == RejectReason.FORGED
    other = signed(body, secret="another-secret-0123456789")
    assert await _rejected(verifier, other, body) == RejectReason.FORGED
    assert await _rejected(verifier, signed(body, NOW - 301), body) == RejectReason.STALE
    assert await _rejected(verifier, signed(body, NOW + 301), body) == RejectReason.STALE
    assert await _rejected(verifier, {}, body) == RejectReason.MISSING_HEADERS
    sig = signed(body)["X-PB-Signature"]
    for bad in ("t=abc," + sig.split(",")[1], sig.split(",")[0], sig.upper(), "v1=00,t=1"):
        assert await _rejected(verifier, {"X-PB-Signature": bad}, body) == RejectReason.MALFORMED
    await verifier.verify(signed(body), body, NOW)  # none of those was remembered
    with pytest.raises(ValueError, match="16 bytes"):
        PartnerBVerifier("short")


@pytest.mark.anyio
async def test_a_webhook_for_an_unknown_reference_is_unknown_payout() -> None:
    client = PayoutClient(
        storage=MemoryStorage(),
        partner=partner_b("http://pb.test"),
        webhook_url="http://us.test/hook",
        webhook_parser=parse_webhook,
        webhook_verifier=PartnerBVerifier(SECRET),
        background=False,
    )
    async with client:
        body = b'{"event_id": "evt_9", "payout_id": "PB-NOBODY", "state": "SUCCESS"}'
        with pytest.raises(UnknownPayout, match="PB-NOBODY"):
            await client.handle_webhook(body, signed(body, client.clock.now()))
        with pytest.raises(WebhookRejected):
            await client.handle_webhook(body, signed(body, client.clock.now(), "x" * 20))
    assert client.stats.webhooks_unknown == 1


# -- end to end -----------------------------------------------------------------------------

SCALE = 0.03
"""1 scenario second = 30 ms: the fake's 504 comes after 0.3 s, its landings within 1.8 s."""
N = 40
AMOUNTS = [100, "12.5", "0.1", "0.2", "0.3", "2500.75", "1"]


@pytest.mark.anyio
async def test_the_client_pays_each_payout_once_through_partner_b() -> None:
    fake = FakePartnerB(FakeConfig(seed=11, time_scale=SCALE, secret=SECRET, p_504=0.3))
    policy = Policy().scaled(SCALE)
    holder: list[PayoutClient] = []

    async def hook(request: Request) -> Response:
        try:
            await holder[0].handle_webhook(await request.body(), request.headers)
        except UnknownPayout:
            return Response(status_code=404)  # its reference is not known to us yet
        except WebhookRejected:
            return Response(status_code=401)
        return Response(status_code=200)

    partner_sock, hook_sock = listen(LOOPBACK, 0), listen(LOOPBACK, 0)
    partner_url = f"http://{LOOPBACK}:{partner_sock.getsockname()[1]}"
    hook_url = f"http://{LOOPBACK}:{hook_sock.getsockname()[1]}/hook"
    hooks = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    ids = [f"pb-{i}" for i in range(N)]
    async with (
        fake,
        embedded_server(fake.app, partner_sock),
        embedded_server(hooks, hook_sock),
        partner_b(partner_url, policy=policy) as partner,
        PayoutClient(
            storage=MemoryStorage(),
            partner=partner,
            webhook_url=hook_url,
            policy=policy,
            webhook_parser=parse_webhook,
            webhook_verifier=PartnerBVerifier(SECRET),
            webhook_replays=InMemoryReplayStore(),
        ) as client,
    ):
        holder.append(client)
        for i, payout_id in enumerate(ids):
            amount = AMOUNTS[i % len(AMOUNTS)]
            await client.submit({"id": payout_id, "amount": amount, "beneficiary": {"n": i}})
        await client.submit({"id": "pb-tiny", "amount": "0.001", "currency": "KES"})
        with anyio.fail_after(12):
            payouts = [await client.wait_final(payout_id, timeout=12) for payout_id in ids]
            tiny = await client.wait_final("pb-tiny", timeout=1)
        truth, stats = fake.truth()["transactions"], fake.stats()

    assert [p.id for p in payouts if not p.is_final] == []
    for p in payouts:
        entry = truth[p.id]
        assert (p.status.value, p.partner_ref) == (entry["status"], entry["partner_ref"]), p.id
        assert (entry["settled"], entry["transfers"]) == (True, 1), p.id
    amounts = {t.body["reference"]: t.body["amount_minor"] for t in fake.transfers.values()}
    assert amounts["pb-0"] == 10_000
    assert amounts["pb-1"] == 1_250
    assert amounts["pb-5"] == 250_075
    assert amounts["pb-2"] + amounts["pb-3"] == amounts["pb-4"] == 30
    assert stats["double_payments"] == []
    assert stats["transfers_total"] == N
    # Some 504s, each settled by a re-send with the same key (409 while landing, then its record).
    assert stats["answers"]["504"] > 0
    assert stats["idempotent_replays"] > 0
    assert client.stats.resends > 0
    resent = [p for p in payouts if any(a.event == "resend" for a in p.audit)]
    assert resent
    assert all(p.posts > 1 and p.attempt == 1 for p in resent)
    # Webhooks name only Partner B's reference and still found their payouts.
    assert client.stats.webhooks > 0
    assert any(p.resolved_by is Cause.WEBHOOK for p in payouts)
    # The amount it cannot express was refused before anything was sent.
    assert tiny.status is PayoutStatus.FAILED
    assert tiny.posts == 1
    assert tiny.reason is not None
    assert "minor units" in tiny.reason
    assert "pb-tiny" not in truth


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_demo_runs_with_partner_b(tmp_path: Path) -> None:
    """``demo --partner example-b`` in a subprocess: the fake and the service as its children."""
    partner, service, app = free_ports(3)
    report_path = tmp_path / "report.json"
    argv = [
        *(sys.executable, "-m", "resilient_payout.cli", "demo", "--partner", "example-b"),
        *("-n", "20", "--rate", "20", "--time-scale", "0.02", "--seed", "5", "--no-progress"),
        *("--workdir", str(tmp_path), "--json", str(report_path)),
        *("--partner-port", str(partner), "--service-port", str(service)),
        *("--client-port", str(app)),
    ]
    demo = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.communicate()
    assert demo.returncode == 0, out
    assert re.search(r"demo \(Partner B\) OK in \d+\.\d s", out), out
    report = json.loads(report_path.read_text())
    assert (report["ok"], report["sent"], report["correct"], report["wrong"]) == (True, 20, 20, 0)
    assert (report["double_payments"], report["blocks"]) == ([], 0)
    assert "Application shutdown complete" in (tmp_path / "service-b.log").read_text()
