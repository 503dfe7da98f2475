"""HttpPartner: every row of the classification table, and the subtleties around it."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx

from resilient_payout._model import (
    Accepted,
    CheckFailed,
    Found,
    NotFound,
    NotSent,
    PartnerStatus,
    RateLimited,
    Refused,
    Uncertain,
)
from resilient_payout._policy import Policy
from resilient_payout.partner import (
    HttpPartner,
    IdempotencyKeys,
    Partner,
    PartnerRecord,
    PartnerRequest,
    StatusWords,
    SubmitAttempt,
)

pytestmark = pytest.mark.anyio

BASE = "http://partner.test"
SUBMIT_URL = f"{BASE}/transaction"
HOOK = "http://us.test/webhooks/partner"


def record(pid: str = "p1", status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"id": pid, "status": status, "webhookUrl": HOOK, **extra}


@pytest.fixture
async def partner() -> Any:
    # On an injected httpx client, which respx intercepts; the default (aiohttp) client is tested
    # against real sockets in test_default_transport.py.
    async with httpx.AsyncClient() as client:
        yield HttpPartner(BASE, client=client)


# --- submit: 200 ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(PartnerStatus))
async def test_submit_200_with_vocabulary_status_is_accepted(
    partner: HttpPartner, respx_mock: respx.MockRouter, status: PartnerStatus
) -> None:
    route = respx_mock.post(SUBMIT_URL).respond(200, json=record(status=status.value))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Accepted(status)
    request = route.calls.last.request
    assert request.method == "POST"
    assert json.loads(request.content) == {"id": "p1", "webhookUrl": HOOK}


async def test_partner_satisfies_protocol(partner: HttpPartner) -> None:
    assert isinstance(partner, Partner)


async def test_trailing_slash_in_base_url_is_ignored(respx_mock: respx.MockRouter) -> None:
    route = respx_mock.post(SUBMIT_URL).respond(200, json=record())
    async with httpx.AsyncClient() as client:
        p = HttpPartner(BASE + "/", client=client)
        assert await p.submit(SubmitAttempt.first("p1", HOOK)) == Accepted(PartnerStatus.COMPLETED)
    assert route.calls.last.request.url.path == "/transaction"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b"\xff\xfe garbage", "not JSON"),
        (b"", "not JSON"),
        (b'["p1", "completed"]', "not a JSON object"),
        (b'"completed"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b'{"status": "completed"}', "id does not match"),
        (b'{"id": 1, "status": "completed"}', "id does not match"),
        (b'{"id": "p1"}', "status missing"),
        (b'{"id": "p1", "status": 3}', "status missing"),
        (b'{"id": "p1", "status": "success"}', "outside the partner vocabulary"),
        (b'{"id": "p1", "status": "COMPLETED"}', "outside the partner vocabulary"),
    ],
)
async def test_submit_200_with_garbage_body_is_uncertain(
    partner: HttpPartner, respx_mock: respx.MockRouter, body: bytes, why: str
) -> None:
    respx_mock.post(SUBMIT_URL).respond(200, content=body)

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert "garbage body" in outcome.reason
    assert why in outcome.reason


async def test_submit_200_for_another_id_is_uncertain(
    partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    # The partner answered, but not about our transfer: we cannot tell what happened to ours.
    respx_mock.post(SUBMIT_URL).respond(200, json=record(pid="someone-else"))

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert outcome == Uncertain("HTTP 200 with garbage body: id does not match the request")


async def test_submit_200_with_oversized_body_is_uncertain(
    partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    big = record(padding="x" * 100_000)
    respx_mock.post(SUBMIT_URL).respond(200, json=big)

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Uncertain(
        "HTTP 200 with garbage body: too large"
    )


async def test_submit_answer_status_outside_vocabulary_is_truncated_in_reason(
    partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    respx_mock.post(SUBMIT_URL).respond(200, json=record(status="s" * 500))

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert len(outcome.reason) < 120


# --- submit: refused -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [400, 401, 403, 422])
async def test_submit_client_errors_are_refused_with_reason(
    partner: HttpPartner, respx_mock: respx.MockRouter, code: int
) -> None:
    respx_mock.post(SUBMIT_URL).respond(code, json={"error": "webhookUrl is invalid"})

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Refused(
        code, "webhookUrl is invalid"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"detail": "missing field id"}, "missing field id"),
        ({"message": "bad\nrequest\x00 here"}, "bad request here"),
        ({"other": 1}, '{"other":1}'),
        ("just a string", "just a string"),
    ],
)
async def test_refused_reason_is_taken_from_json_body(
    partner: HttpPartner, respx_mock: respx.MockRouter, body: Any, reason: str
) -> None:
    respx_mock.post(SUBMIT_URL).respond(
        400, content=json.dumps(body, separators=(",", ":")).encode()
    )

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Refused(400, reason)


async def test_refused_reason_from_text_body_is_truncated_to_200_chars(
    partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    respx_mock.post(SUBMIT_URL).respond(422, text="E" * 5000)

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert outcome == Refused(422, "E" * 200)


async def test_refused_with_empty_body_names_the_status(
    partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    respx_mock.post(SUBMIT_URL).respond(403)

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Refused(403, "HTTP 403")


# --- submit: 429 and Retry-After -------------------------------------------------------------


def http_date(dt: datetime) -> str:
    return format_datetime(dt, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": " 120 "}, 120.0),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "inf"}, None),
        (
            {
                "Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT",
                "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
            },
            30.0,
        ),
        (
            {
                "Retry-After": "Wed, 21 Oct 2015 07:27:00 GMT",
                "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
            },
            0.0,
        ),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # long past, no Date header
        ({"Retry-After": "Wed, 99 Foo 2015 07:28:00 GMT"}, None),
    ],
)
async def test_submit_429_is_rate_limited_with_retry_after(
    partner: HttpPartner,
    respx_mock: respx.MockRouter,
    headers: dict[str, str],
    expected: float | None,
) -> None:
    respx_mock.post(SUBMIT_URL).respond(429, headers=headers)

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == RateLimited(expected)


async def test_retry_after_http_date_without_date_header_uses_our_clock(
    partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    later = datetime.now(UTC) + timedelta(seconds=90)
    respx_mock.post(SUBMIT_URL).respond(429, headers={"Retry-After": http_date(later)})

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, RateLimited)
    assert outcome.retry_after is not None
    # HTTP-dates have 1 s resolution.
    assert 88.0 <= outcome.retry_after <= 90.0


# --- submit: transport errors, before or after the request was sent --------------------------


def raised(outcome: type, *excs: Exception) -> list[Any]:
    return [pytest.param(outcome, e, id=f"{outcome.__name__}-{type(e).__name__}") for e in excs]


@pytest.mark.parametrize(
    ("outcome", "exc"),
    [
        # Never sent: safe to send again.
        *raised(
            NotSent,
            httpx.ConnectError("[Errno 111] Connection refused"),
            httpx.ConnectError("[Errno -2] Name or service not known"),  # DNS failure
            httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
            httpx.ConnectTimeout("timed out"),
            httpx.PoolTimeout("no connection available"),
            httpx.UnsupportedProtocol("Request URL has an unsupported protocol 'ftp://'."),
        ),
        # After sending: the partner may have the request, so it may have landed.
        *raised(
            Uncertain,
            httpx.ReadTimeout("timed out"),
            httpx.WriteTimeout("timed out"),
            httpx.ReadError("[Errno 104] Connection reset by peer"),
            httpx.WriteError("[Errno 32] Broken pipe"),  # the partner may have the whole request
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            httpx.LocalProtocolError("can't send data"),
            httpx.ProxyError("proxy said no"),
            httpx.DecodingError("bad gzip"),
            httpx.CloseError("close failed"),
        ),
    ],
)
async def test_submit_errors_are_not_sent_before_sending_and_uncertain_after(
    partner: HttpPartner, respx_mock: respx.MockRouter, outcome: type, exc: Exception
) -> None:
    respx_mock.post(SUBMIT_URL).mock(side_effect=exc)

    result = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(result, outcome)
    assert result.reason.startswith(type(exc).__name__)


async def test_submit_to_a_closed_port_is_not_sent() -> None:
    # A real refused connection, not a mocked one.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with httpx.AsyncClient() as client:
        outcome = await HttpPartner(f"http://127.0.0.1:{port}", client=client).submit(
            SubmitAttempt.first("p1", HOOK)
        )
    assert isinstance(outcome, NotSent)
    assert outcome.reason.startswith("ConnectError")


# --- submit: uncertain ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [504, 500, 502, 503, 201, 202, 204, 302, 404, 409, 418])
async def test_submit_other_statuses_are_uncertain(
    partner: HttpPartner, respx_mock: respx.MockRouter, code: int
) -> None:
    respx_mock.post(SUBMIT_URL).respond(code, json=record())

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Uncertain(f"HTTP {code}")


async def test_submit_unexpected_exception_is_uncertain_and_logged(
    partner: HttpPartner, respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    respx_mock.post(SUBMIT_URL).mock(side_effect=RuntimeError("app blew up"))

    with caplog.at_level(logging.ERROR, logger="resilient_payout.partner"):
        outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert outcome == Uncertain("unexpected RuntimeError: app blew up")
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


async def test_logs_hold_status_and_short_reason_never_the_body(
    partner: HttpPartner, respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    respx_mock.post(SUBMIT_URL).respond(200, text="SECRET-BODY " * 50)

    with caplog.at_level(logging.DEBUG, logger="resilient_payout.partner"):
        await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert caplog.records
    assert "SECRET-BODY" not in caplog.text


# --- timeouts and the client -------------------------------------------------------------------


POLICY = Policy(connect_timeout=1.5, read_timeout=33.0, check_timeout=7.0, submit_deadline=60.0)


async def test_timeouts_are_passed_per_request_to_an_injected_client(
    respx_mock: respx.MockRouter,
) -> None:
    post = respx_mock.post(SUBMIT_URL).respond(200, json=record())
    get = respx_mock.get(f"{BASE}/transaction/p1").respond(200, json=record())
    async with httpx.AsyncClient(timeout=99.0) as client:
        p = HttpPartner(BASE, client=client, policy=POLICY)
        await p.submit(SubmitAttempt.first("p1", HOOK))
        await p.check("p1")

    assert post.calls.last.request.extensions["timeout"] == {
        "connect": 1.5,
        "read": 33.0,
        "write": 1.5,
        "pool": 1.5,
    }
    assert get.calls.last.request.extensions["timeout"] == {
        "connect": 1.5,
        "read": 7.0,
        "write": 1.5,
        "pool": 1.5,
    }


@pytest.mark.respx(assert_all_called=False)
async def test_a_redirect_is_never_followed_even_by_an_injected_client(
    respx_mock: respx.MockRouter,
) -> None:
    # Following a 307 would POST the transfer a second time, somewhere else.
    respx_mock.post(SUBMIT_URL).respond(307, headers={"Location": f"{BASE}/elsewhere"})
    elsewhere = respx_mock.post(f"{BASE}/elsewhere").respond(200, json=record())
    async with httpx.AsyncClient(follow_redirects=True) as client:
        p = HttpPartner(BASE, client=client)
        assert await p.submit(SubmitAttempt.first("p1", HOOK)) == Uncertain("HTTP 307")
    assert elsewhere.call_count == 0


async def test_owned_pool_is_aiohttp_opened_lazily_and_closed_by_aclose() -> None:
    p = HttpPartner(BASE, policy=POLICY)
    own = p._own
    assert own is not None
    assert own._session is None  # made on first use, inside the running loop
    assert own._max_connections >= 2000  # thousands of slow POSTs may be open at once

    await p.aclose()

    assert own.is_closed
    # A closed partner fails before sending anything: safe to retry elsewhere, never a raise.
    outcome = await p.submit(SubmitAttempt.first("p1", HOOK))
    assert isinstance(outcome, NotSent)
    assert "closed" in outcome.reason
    assert isinstance(await p.check("p1"), CheckFailed)


async def test_async_with_closes_the_owned_pool() -> None:
    async with HttpPartner(BASE) as p:
        own = p._own
    assert own is not None
    assert own.is_closed


async def test_injected_client_is_not_closed() -> None:
    async with httpx.AsyncClient() as client:
        async with HttpPartner(BASE, client=client):
            pass
        assert not client.is_closed


async def test_works_over_asgi_transport() -> None:
    seen: list[dict[str, Any]] = []

    async def app(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        message = await receive()
        seen.append(json.loads(message["body"]))
        body = json.dumps(record(status="pending")).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as client:
        p = HttpPartner("http://partner", client=client)
        assert await p.submit(SubmitAttempt.first("p1", HOOK)) == Accepted(PartnerStatus.PENDING)
    assert seen == [{"id": "p1", "webhookUrl": HOOK}]


# --- check -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", list(PartnerStatus))
async def test_check_200_is_found(
    partner: HttpPartner, respx_mock: respx.MockRouter, status: PartnerStatus
) -> None:
    route = respx_mock.get(f"{BASE}/transaction/p1").respond(200, json=record(status=status.value))

    assert await partner.check("p1") == Found(status)
    assert route.calls.last.request.method == "GET"


async def test_check_404_is_not_found(partner: HttpPartner, respx_mock: respx.MockRouter) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").respond(404, json={"error": "not found"})

    assert await partner.check("p1") == NotFound()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"<html><body><h1>404 Not Found</h1><hr>nginx</body></html>", "text/html"),
        (b"Not Found", "text/plain"),
    ],
)
async def test_check_404_page_of_a_gateway_is_no_proof_of_absence(
    partner: HttpPartner, respx_mock: respx.MockRouter, body: bytes, content_type: str
) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").respond(
        404, content=body, headers={"content-type": content_type}
    )

    outcome = await partner.check("p1")

    assert isinstance(outcome, CheckFailed)
    assert "404" in outcome.reason


async def test_check_404_with_an_empty_body_is_not_found(
    partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").respond(404)

    assert await partner.check("p1") == NotFound()


async def test_check_quotes_the_id(partner: HttpPartner, respx_mock: respx.MockRouter) -> None:
    route = respx_mock.route(method="GET").respond(404)

    await partner.check("a/b c?d")

    assert route.calls.last.request.url.raw_path == b"/transaction/a%2Fb%20c%3Fd"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({}, None), ({"Retry-After": "60"}, 60.0), ({"Retry-After": "x"}, None)],
)
async def test_check_429_is_rate_limited(
    partner: HttpPartner,
    respx_mock: respx.MockRouter,
    headers: dict[str, str],
    expected: float | None,
) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").respond(429, headers=headers)

    assert await partner.check("p1") == RateLimited(expected)


@pytest.mark.parametrize("code", [500, 502, 503, 504, 400, 401, 403, 422, 201, 302])
async def test_check_other_statuses_fail(
    partner: HttpPartner, respx_mock: respx.MockRouter, code: int
) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").respond(code)

    assert await partner.check("p1") == CheckFailed(f"HTTP {code}")


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"id": "p2", "status": "completed"}', b'{"id": "p1", "status": "ok"}'],
)
async def test_check_200_with_garbage_body_fails(
    partner: HttpPartner, respx_mock: respx.MockRouter, body: bytes
) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").respond(200, content=body)

    outcome = await partner.check("p1")

    assert isinstance(outcome, CheckFailed)
    assert "garbage body" in outcome.reason


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ConnectTimeout("timed out"),
        httpx.PoolTimeout("timed out"),
        httpx.ReadTimeout("timed out"),
        httpx.ReadError("reset"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_check_network_errors_fail(
    partner: HttpPartner, respx_mock: respx.MockRouter, exc: Exception
) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").mock(side_effect=exc)

    outcome = await partner.check("p1")

    assert isinstance(outcome, CheckFailed)
    assert outcome.reason.startswith(type(exc).__name__)


async def test_check_unexpected_exception_fails_and_is_logged(
    partner: HttpPartner, respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    respx_mock.get(f"{BASE}/transaction/p1").mock(side_effect=KeyError("boom"))

    with caplog.at_level(logging.ERROR, logger="resilient_payout.partner"):
        outcome = await partner.check("p1")

    assert outcome == CheckFailed("unexpected KeyError: 'boom'")
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


# --- codecs ---------------------------------------------------------------------------------


class _RefCodec:
    """A partner with its own reference, its own words, keys in a header and a checks path."""

    idempotency = IdempotencyKeys(retention=3600.0, header="Idempotency-Key")
    words = StatusWords(completed=frozenset({"SUCCESS"}), declined=frozenset({"FAILED"}))

    def submit_request(self, attempt: SubmitAttempt) -> PartnerRequest:
        if attempt.request.get("amount") == "boom":
            raise ValueError("cannot encode the amount")
        body = {"ref": attempt.payout_id, "amount": attempt.request.get("amount")}
        return PartnerRequest("POST", "/v1/pay", body, {"Idempotency-Key": attempt.idempotency_key})

    def check_request(self, payout_id: str, partner_ref: str | None) -> PartnerRequest:
        return PartnerRequest("GET", f"/v1/pay/{partner_ref}")

    def read_record(self, data: Any, payout_id: str, partner_ref: str | None) -> PartnerRecord:
        if not isinstance(data, dict) or "pid" not in data:
            raise ValueError("no pid in the answer")
        return PartnerRecord(self.words.read(data.get("state")), data["pid"])


@pytest.fixture
async def ref_partner() -> Any:
    async with httpx.AsyncClient() as client:
        yield HttpPartner(BASE, client=client, codec=_RefCodec())


async def test_a_codec_shapes_the_request_and_reads_words_and_reference(
    ref_partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    route = respx_mock.post(f"{BASE}/v1/pay").respond(200, json={"pid": "PB-1", "state": "SUCCESS"})
    attempt = SubmitAttempt.first("p1", HOOK, {"id": "p1", "amount": 1250})

    assert await ref_partner.submit(attempt) == Accepted(PartnerStatus.COMPLETED, "PB-1")
    sent = route.calls.last.request
    assert json.loads(sent.content) == {"ref": "p1", "amount": 1250}
    assert sent.headers["idempotency-key"] == attempt.idempotency_key
    assert ref_partner.idempotency == _RefCodec.idempotency


async def test_a_word_not_listed_as_final_is_pending(
    ref_partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    respx_mock.get(f"{BASE}/v1/pay/PB-1").respond(200, json={"pid": "PB-1", "state": "QUEUED"})
    assert await ref_partner.check("p1", "PB-1") == Found(PartnerStatus.PENDING, "PB-1")


async def test_an_answer_the_codec_cannot_read_is_garbage_never_a_status(
    ref_partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    respx_mock.post(f"{BASE}/v1/pay").respond(200, json={"state": "SUCCESS"})
    respx_mock.get(f"{BASE}/v1/pay/PB-1").respond(200, json={"pid": 7, "state": "SUCCESS"})
    outcome = await ref_partner.submit(SubmitAttempt.first("p1", HOOK))
    assert outcome == Uncertain("HTTP 200 with garbage body: no pid in the answer")
    check = await ref_partner.check("p1", "PB-1")
    assert check == CheckFailed(
        "HTTP 200 with garbage body: partner reference is not a string of 1-200 characters"
    )


async def test_a_409_from_a_partner_with_keys_is_in_progress_with_its_retry_after(
    ref_partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    respx_mock.post(f"{BASE}/v1/pay").respond(409, headers={"Retry-After": "7"})
    outcome = await ref_partner.submit(SubmitAttempt.first("p1", HOOK))
    assert isinstance(outcome, Uncertain)
    assert outcome.retry_after == 7.0
    assert "in progress" in outcome.reason


async def test_a_request_the_codec_refuses_to_encode_is_refused_and_never_sent(
    ref_partner: HttpPartner, respx_mock: respx.MockRouter
) -> None:
    route = respx_mock.post(f"{BASE}/v1/pay").respond(200, json={"pid": "PB-1", "state": "SUCCESS"})
    outcome = await ref_partner.submit(SubmitAttempt.first("p1", HOOK, {"amount": "boom"}))
    assert outcome == Refused(0, "request not encodable: ValueError: cannot encode the amount")
    assert not route.called


async def test_a_codec_that_crashes_otherwise_is_uncertain_and_logged(
    respx_mock: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(_RefCodec):
        def submit_request(self, attempt: SubmitAttempt) -> PartnerRequest:
            raise KeyError("amount")

    async with httpx.AsyncClient() as client:
        partner = HttpPartner(BASE, client=client, codec=Broken())
        with caplog.at_level(logging.ERROR, logger="resilient_payout.partner"):
            outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))
    # Conservative: an adapter bug must never lead to a new attempt.
    assert isinstance(outcome, Uncertain)
    assert "p1" in caplog.text


async def test_a_refusal_to_encode_a_resend_is_uncertain_an_earlier_send_may_have_landed(
    ref_partner: HttpPartner,
) -> None:
    first = SubmitAttempt.first("p1", HOOK, {"amount": "boom"})
    resend = SubmitAttempt("p1", 1, first.request, HOOK, first.idempotency_key, send=2)
    assert isinstance(await ref_partner.submit(resend), Uncertain)
