"""The mock partner reproduces the scenario's partner: distributions, determinism, rate limit,
double-payment detection, fault knobs and time scaling. Everything runs on virtual time, driven
in-process through ``httpx.ASGITransport``; one test serves it with uvicorn on a real socket."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from resilient_payout.testing import VIRTUAL_TIME_BACKEND
from resilient_payout.testing.mock_partner import (
    ConnectionDropped,
    MockPartner,
    MockPartnerConfig,
    serve_mock_partner,
)

pytestmark = pytest.mark.anyio

HOOK_URL = "http://hooks/webhook"
EPS = 1e-6


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


@dataclass
class Webhook:
    at: float
    id: str
    status: str
    record_status: str | None


class WebhookReceiver:
    """In-process webhook endpoint: records what arrived, when, and the partner's record then."""

    def __init__(self, status_code: int = 200) -> None:
        self.status_code = status_code
        self.received: list[Webhook] = []
        self.record_status: Callable[[str], str | None] = lambda _id: None

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Any],
        send: Callable[[MutableMapping[str, Any]], Any],
    ) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = json.loads(body)
        self.received.append(
            Webhook(
                anyio.current_time(),
                payload["id"],
                payload["status"],
                self.record_status(payload["id"]),
            )
        )
        await send({"type": "http.response.start", "status": self.status_code, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def for_id(self, payout_id: str) -> list[Webhook]:
        return [w for w in self.received if w.id == payout_id]


@dataclass
class Rig:
    partner: MockPartner
    http: httpx.AsyncClient
    hooks: WebhookReceiver


@asynccontextmanager
async def running(
    config: MockPartnerConfig, hooks: WebhookReceiver | None = None
) -> AsyncIterator[Rig]:
    hooks = hooks if hooks is not None else WebhookReceiver()
    hook_transport = httpx.ASGITransport(app=hooks)
    async with (
        httpx.AsyncClient(transport=hook_transport) as hook_client,
        MockPartner(config, webhook_client=hook_client) as partner,
    ):
        hooks.record_status = lambda pid: (partner.record(pid) or {}).get("status")
        transport = httpx.ASGITransport(app=partner.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://partner") as http:
            yield Rig(partner, http, hooks)


@dataclass
class Answer:
    id: str
    sent_at: float
    latency: float
    status_code: int
    status: str | None


async def post(http: httpx.AsyncClient, payout_id: str) -> Answer:
    start = anyio.current_time()
    response = await http.post("/transaction", json={"id": payout_id, "webhookUrl": HOOK_URL})
    status = response.json()["status"] if response.status_code == 200 else None
    return Answer(payout_id, start, anyio.current_time() - start, response.status_code, status)


async def post_all(http: httpx.AsyncClient, ids: list[str]) -> dict[str, Answer]:
    answers: dict[str, Answer] = {}

    async def one(payout_id: str) -> None:
        answers[payout_id] = await post(http, payout_id)

    async with anyio.create_task_group() as tg:
        for payout_id in ids:
            tg.start_soon(one, payout_id)
    return answers


def assert_binomial(count: int, n: int, p: float, sigmas: float = 4.0) -> None:
    expected, sd = n * p, math.sqrt(n * p * (1 - p))
    assert abs(count - expected) <= sigmas * sd, f"{count} of {n}, expected {expected:.0f}±{sd:.1f}"


def status_of(rig: Rig, payout_id: str) -> str | None:
    return rig.partner.truth()["transactions"][payout_id]["status"]


# -- default behaviour ---------------------------------------------------------------------------


async def test_default_distributions_match_the_published_behaviour() -> None:
    n = 1500
    ids = [f"tx-{i}" for i in range(n)]
    snapshots: dict[float, dict[str, str | None]] = {}

    async with running(MockPartnerConfig(seed=2024)) as rig:

        async def snapshot_at(at: float) -> None:
            await anyio.sleep_until(at)
            truth = rig.partner.truth()["transactions"]
            snapshots[at] = {pid: truth[pid]["status"] for pid in truth}

        async with anyio.create_task_group() as tg:
            for at in (29.999, 75.0):
                tg.start_soon(snapshot_at, at)
            answers = await post_all(rig.http, ids)
        await rig.partner.wait_idle()
        truth = rig.partner.truth()["transactions"]
        stats = rig.partner.stats()

    ok = [a for a in answers.values() if a.status_code == 200]
    timeouts = [a for a in answers.values() if a.status_code == 504]
    assert len(ok) + len(timeouts) == n
    assert_binomial(len(timeouts), n, 0.10)
    assert_binomial(sum(a.status == "completed" for a in ok), len(ok), 2 / 3)
    assert {a.status for a in ok} == {"completed", "declined"}

    assert all(0.2 - EPS <= a.latency <= 10 + EPS for a in ok)
    mean_latency = sum(a.latency for a in ok) / len(ok)
    assert abs(mean_latency - 5.1) <= 4 * (9.8 / math.sqrt(12)) / math.sqrt(len(ok))
    assert all(abs(a.latency - 30) <= EPS for a in timeouts)

    # Answered calls end with their answer as the record; a 504 leaves nothing until it lands.
    assert all(truth[a.id]["status"] == a.status for a in ok)
    assert all(snapshots[29.999][a.id] is None for a in timeouts)
    landed = [a for a in timeouts if truth[a.id]["status"] is not None]
    assert_binomial(len(landed), len(timeouts), 0.5)
    landed_by_75 = sum(snapshots[75.0][a.id] is not None for a in landed)
    assert_binomial(landed_by_75, len(landed), 0.5)  # uniform over 30-120 s: half by 75 s
    assert all(t["settled"] and not t["double_payment"] for t in truth.values())

    sent_at = {a.id: a.sent_at for a in answers.values()}
    timeout_ids = {a.id for a in timeouts}
    hooks = rig.hooks.received
    assert not [w for w in hooks if w.id in timeout_ids]
    assert len({w.id for w in hooks}) == len(hooks)
    assert_binomial(len(hooks), len(ok), 0.8)
    assert all(10 - EPS <= w.at - sent_at[w.id] <= 30 + EPS for w in hooks)
    assert all(w.status == answers[w.id].status for w in hooks)

    assert stats["posts_total"] == n
    assert stats["posts_max_per_id"] == 1
    assert stats["double_payments"] == []
    assert stats["webhooks_sent"] == len(hooks)
    assert stats["webhooks_failed"] == 0
    assert stats["answers"] == {
        "completed": sum(a.status == "completed" for a in ok),
        "declined": sum(a.status == "declined" for a in ok),
        "pending": 0,
        "timeout": len(timeouts),
        "error": 0,
    }


async def test_record_is_pending_until_the_answer_then_final() -> None:
    config = MockPartnerConfig(seed=3, p_timeout=0.0, answer_delay_min=5.0, answer_delay_max=5.0)
    async with running(config) as rig, anyio.create_task_group() as tg:
        tg.start_soon(post, rig.http, "a")
        await anyio.sleep(4.9)
        during = (await rig.http.get("/transaction/a")).json()
        await anyio.sleep(0.2)
        after = (await rig.http.get("/transaction/a")).json()

    assert during == {"id": "a", "status": "pending", "webhookUrl": HOOK_URL}
    assert after["status"] in ("completed", "declined")


async def test_admin_endpoints_return_the_in_process_views() -> None:
    async with running(MockPartnerConfig(seed=5)) as rig:
        await post_all(rig.http, [f"tx-{i}" for i in range(20)])
        await rig.http.get("/transaction/tx-0")
        await rig.partner.wait_idle()
        stats = (await rig.http.get("/_mock/stats")).json()
        truth = (await rig.http.get("/_mock/truth")).json()

        assert stats == rig.partner.stats()
        assert truth == rig.partner.truth()
        assert stats["checks_total"] == 1
        assert set(truth["transactions"]) == {f"tx-{i}" for i in range(20)}

        reset = await rig.http.post("/_mock/reset", json={"p_timeout": 0.5})
        assert reset.status_code == 200
        assert rig.partner.truth() == {"transactions": {}}
        assert rig.partner.stats()["posts_total"] == 0
        assert rig.partner.config.p_timeout == 0.5
        assert (await rig.http.post("/_mock/reset", json={"p_nope": 1})).status_code == 422


# -- determinism ---------------------------------------------------------------------------------


async def run_seeded(seed: int, ids: list[str]) -> dict[str, Any]:
    async with running(MockPartnerConfig(seed=seed)) as rig:
        await post_all(rig.http, ids)
        await rig.partner.wait_idle()
        return dict(rig.partner.truth()["transactions"])


async def test_same_seed_same_truth_whatever_the_order() -> None:
    ids = [f"tx-{i}" for i in range(100)]
    first = await run_seeded(11, ids)
    again = await run_seeded(11, list(reversed(ids)))
    other = await run_seeded(12, ids)

    assert first == again
    assert first != other
    assert sum(first[i]["status"] != other[i]["status"] for i in ids) > 10


# -- rate limit ----------------------------------------------------------------------------------


async def test_sixth_check_in_a_second_blocks_the_caller_for_the_penalty() -> None:
    async with running(MockPartnerConfig(seed=1)) as rig:
        first_five = [(await rig.http.get("/transaction/x")).status_code for _ in range(5)]
        sixth = await rig.http.get("/transaction/x")
        other = await rig.http.get("/transaction/x", headers={"X-Caller-Id": "other"})
        await anyio.sleep(59.5)
        still_blocked = await rig.http.get("/transaction/x")
        await anyio.sleep(0.6)
        released = await rig.http.get("/transaction/x")
        stats = rig.partner.stats()

    assert first_five == [404] * 5
    assert sixth.status_code == 429
    assert sixth.headers["retry-after"] == "60"
    assert other.status_code == 404
    assert still_blocked.status_code == 429
    assert still_blocked.headers["retry-after"] == "1"
    assert released.status_code == 404
    assert stats["blocks"] == 1
    assert stats["rate_limited_checks"] == 2
    assert stats["checks_total"] == 9
    assert stats["checks_per_second"] == {"0": 7, "59": 1, "60": 1}
    assert stats["checks_peak_per_second"] == 7


async def test_window_slides_and_an_even_five_per_second_is_never_blocked() -> None:
    async with running(MockPartnerConfig(seed=1)) as rig:
        burst = [(await rig.http.get("/transaction/x")).status_code for _ in range(5)]
        await anyio.sleep(1.0)
        next_burst = [(await rig.http.get("/transaction/x")).status_code for _ in range(5)]
        await anyio.sleep(1.0)
        steady = []
        for _ in range(50):
            await anyio.sleep(0.2)
            steady.append((await rig.http.get("/transaction/x")).status_code)
        stats = rig.partner.stats()

    assert burst == next_burst == [404] * 5
    assert steady == [404] * 50
    assert stats["blocks"] == 0


async def test_a_blocked_check_does_not_extend_the_block() -> None:
    async with running(MockPartnerConfig(seed=1)) as rig:
        for _ in range(6):
            await rig.http.get("/transaction/x")
        for _ in range(59):
            await anyio.sleep(1.0)
            assert (await rig.http.get("/transaction/x")).status_code == 429
        await anyio.sleep(1.0)
        assert (await rig.http.get("/transaction/x")).status_code == 404
        assert rig.partner.stats()["blocks"] == 1


# -- double payments -----------------------------------------------------------------------------


async def test_repost_overwrites_the_record_and_is_a_double_payment() -> None:
    config = MockPartnerConfig(seed=1, p_timeout=0.0, p_completed=1.0)
    async with running(config) as rig:
        first = await post(rig.http, "a")
        rig.partner.config = config.replace(p_completed=0.0)
        second = await post(rig.http, "a")
        await rig.partner.wait_idle()
        truth = rig.partner.truth()["transactions"]["a"]
        stats = rig.partner.stats()

    assert (first.status, second.status) == ("completed", "declined")
    assert truth == {"status": "declined", "posts": 2, "settled": True, "double_payment": True}
    assert stats["double_payments"] == ["a"]
    assert stats["posts_max_per_id"] == 2


async def test_concurrent_duplicate_posts_are_double_payments() -> None:
    async with running(MockPartnerConfig(seed=1, p_timeout=0.0)) as rig:
        async with anyio.create_task_group() as tg:
            tg.start_soon(post, rig.http, "a")
            tg.start_soon(post, rig.http, "a")
        assert rig.partner.truth()["transactions"]["a"]["double_payment"] is True


async def test_repost_after_a_confirmed_drop_past_the_window_is_not_flagged() -> None:
    config = MockPartnerConfig(seed=1, p_timeout=1.0, p_late_landing_given_timeout=0.0)
    async with running(config) as rig:
        first = await post(rig.http, "a")
        await anyio.sleep_until(first.sent_at + 120.01)
        before = rig.partner.truth()["transactions"]["a"]
        rig.partner.config = config.replace(p_timeout=0.0, p_completed=1.0)
        second = await post(rig.http, "a")
        after = rig.partner.truth()["transactions"]["a"]
        stats = rig.partner.stats()

    assert first.status_code == 504
    assert before == {"status": None, "posts": 1, "settled": True, "double_payment": False}
    assert second.status == "completed"
    assert after == {"status": "completed", "posts": 2, "settled": True, "double_payment": False}
    assert stats["double_payments"] == []


@pytest.mark.parametrize(
    ("lands", "repost_after"),
    [(False, 60.0), (True, 130.0)],
    ids=["within-window-no-landing", "after-window-but-landed"],
)
async def test_repost_after_a_504_is_flagged_while_it_may_land_or_once_landed(
    lands: bool, repost_after: float
) -> None:
    config = MockPartnerConfig(
        seed=1, p_timeout=1.0, p_late_landing_given_timeout=1.0 if lands else 0.0
    )
    async with running(config) as rig:
        first = await post(rig.http, "a")
        await anyio.sleep_until(first.sent_at + repost_after)
        rig.partner.config = config.replace(p_timeout=0.0)
        await post(rig.http, "a")
        stats = rig.partner.stats()

    assert stats["double_payments"] == ["a"]


# -- fault knobs ---------------------------------------------------------------------------------

IDS = [f"tx-{i}" for i in range(10)]
NO_TIMEOUT = {"p_timeout": 0.0}


@pytest.mark.parametrize("recorded", [True, False])
async def test_p_500_answers_500_and_the_transfer_follows_its_own_knob(recorded: bool) -> None:
    config = MockPartnerConfig(
        seed=1, p_timeout=0.0, p_webhook=0.0, p_500=1.0, p_500_after_recording=float(recorded)
    )
    async with running(config) as rig:
        answers = await post_all(rig.http, IDS)
        checks = [
            (await rig.http.get(f"/transaction/{i}", headers={"X-Caller-Id": i})).status_code
            for i in IDS
        ]
        truth = rig.partner.truth()["transactions"]
        stats = rig.partner.stats()

    assert {a.status_code for a in answers.values()} == {500}
    assert all(0.2 - EPS <= a.latency <= 10 + EPS for a in answers.values())
    assert checks == ([200] * 10 if recorded else [404] * 10)
    expected = {"completed", "declined"} if recorded else {None}
    assert {truth[i]["status"] for i in IDS} <= expected
    assert stats["answers"]["error"] == 10


async def test_p_garbage_answers_200_with_a_non_json_body_and_the_transfer_happens() -> None:
    async with running(MockPartnerConfig(seed=1, p_timeout=0.0, p_garbage=1.0)) as rig:
        response = await rig.http.post("/transaction", json={"id": "a", "webhookUrl": HOOK_URL})
        status = status_of(rig, "a")

    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)
    assert status in ("completed", "declined")


@pytest.mark.parametrize("recorded", [True, False])
async def test_p_drop_closes_without_an_answer(recorded: bool) -> None:
    config = MockPartnerConfig(
        seed=1, p_timeout=0.0, p_drop=1.0, p_drop_after_recording=float(recorded)
    )
    async with running(config) as rig:
        with pytest.raises(httpx.RemoteProtocolError) as raised:
            await rig.http.post("/transaction", json={"id": "a", "webhookUrl": HOOK_URL})
        status = status_of(rig, "a")
        stats = rig.partner.stats()

    assert isinstance(raised.value, ConnectionDropped)
    assert (status in ("completed", "declined")) if recorded else (status is None)
    assert stats["answers"]["error"] == 1


async def test_p_drop_without_raised_app_exceptions_looks_like_an_empty_200() -> None:
    config = MockPartnerConfig(seed=1, p_timeout=0.0, p_drop=1.0)
    async with MockPartner(config) as partner:
        transport = httpx.ASGITransport(app=partner.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://partner") as http:
            response = await http.post("/transaction", json={"id": "a", "webhookUrl": HOOK_URL})

    assert (response.status_code, response.content) == (200, b"")


async def test_p_pending_answer_answers_pending_and_finalises_later() -> None:
    config = MockPartnerConfig(
        seed=1, p_timeout=0.0, p_pending_answer=1.0, answer_delay_min=1.0, answer_delay_max=9.0
    )
    async with running(config) as rig:
        answer = await post(rig.http, "a")
        at_answer = rig.partner.truth()["transactions"]["a"]
        await rig.partner.wait_idle()
        final = rig.partner.truth()["transactions"]["a"]
        stats = rig.partner.stats()

    assert (answer.status_code, answer.status) == (200, "pending")
    assert abs(answer.latency - 1.0) <= EPS
    assert (at_answer["status"], at_answer["settled"]) == ("pending", False)
    assert final["status"] in ("completed", "declined")
    assert final["settled"] is True
    assert stats["answers"]["pending"] == 1


async def test_p_duplicate_webhook_sends_the_same_webhook_twice() -> None:
    config = MockPartnerConfig(seed=1, p_webhook=1.0, p_duplicate_webhook=1.0, **NO_TIMEOUT)
    async with running(config) as rig:
        answers = await post_all(rig.http, IDS)
        await rig.partner.wait_idle()
        stats = rig.partner.stats()

    for payout_id in IDS:
        first, second = rig.hooks.for_id(payout_id)
        assert first.status == second.status == answers[payout_id].status
        assert 0 <= second.at - first.at <= 5 + EPS
    assert stats["webhooks_sent"] == 20


async def test_p_out_of_order_webhook_sends_a_stale_pending_after_the_final_one() -> None:
    config = MockPartnerConfig(seed=1, p_webhook=1.0, p_out_of_order_webhook=1.0, **NO_TIMEOUT)
    async with running(config) as rig:
        answers = await post_all(rig.http, IDS)
        await rig.partner.wait_idle()

    for payout_id in IDS:
        statuses = [w.status for w in rig.hooks.for_id(payout_id)]
        assert statuses == [answers[payout_id].status, "pending"]


async def test_p_webhook_before_answer_finalises_and_notifies_before_answering() -> None:
    config = MockPartnerConfig(seed=1, p_webhook=1.0, p_webhook_before_answer=1.0, **NO_TIMEOUT)
    async with running(config) as rig:
        answers = await post_all(rig.http, IDS)
        await rig.partner.wait_idle()

    for payout_id in IDS:
        (hook,) = rig.hooks.for_id(payout_id)
        answer = answers[payout_id]
        assert hook.at < answer.sent_at + answer.latency
        assert hook.status == hook.record_status == answer.status


async def test_failed_webhook_is_counted_and_not_retried() -> None:
    config = MockPartnerConfig(seed=1, p_webhook=1.0, **NO_TIMEOUT)
    async with running(config, WebhookReceiver(status_code=503)) as rig:
        await post_all(rig.http, IDS)
        await rig.partner.wait_idle()
        stats = rig.partner.stats()

    assert len(rig.hooks.received) == 10
    assert (stats["webhooks_sent"], stats["webhooks_failed"]) == (10, 10)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status_code"),
    [
        (b"{not json", 400),
        (b"[1, 2]", 422),
        (json.dumps({"webhookUrl": HOOK_URL}).encode(), 422),
        (json.dumps({"id": 5, "webhookUrl": HOOK_URL}).encode(), 422),
        (json.dumps({"id": "", "webhookUrl": HOOK_URL}).encode(), 422),
        (json.dumps({"id": "a"}).encode(), 422),
        (json.dumps({"id": "a", "webhookUrl": "not a url"}).encode(), 422),
        (json.dumps({"id": "a", "webhookUrl": "ftp://host/x"}).encode(), 422),
    ],
)
async def test_malformed_post_is_refused_and_records_nothing(body: bytes, status_code: int) -> None:
    async with running(MockPartnerConfig(seed=1)) as rig:
        response = await rig.http.post("/transaction", content=body)
        stats = rig.partner.stats()

    assert response.status_code == status_code
    assert stats["posts_total"] == 0


@pytest.mark.parametrize(
    ("method", "path", "status_code"),
    [("GET", "/transaction", 405), ("PUT", "/transaction/a", 405), ("GET", "/nope", 404)],
)
async def test_unknown_routes_and_methods(method: str, path: str, status_code: int) -> None:
    async with running(MockPartnerConfig(seed=1)) as rig:
        response = await rig.http.request(method, path)
    assert response.status_code == status_code


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        MockPartnerConfig(p_timeout=1.5)
    with pytest.raises(ValueError):
        MockPartnerConfig(time_scale=0)
    with pytest.raises(ValueError):
        MockPartnerConfig(answer_delay_min=11.0)
    with pytest.raises(ValueError):
        MockPartnerConfig().replace(p_typo=0.1)


async def test_post_while_not_running_is_503() -> None:
    partner = MockPartner(MockPartnerConfig(seed=1))
    transport = httpx.ASGITransport(app=partner.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://partner") as http:
        response = await http.post("/transaction", json={"id": "a", "webhookUrl": HOOK_URL})
    assert response.status_code == 503


async def test_stop_answers_waiting_requests_with_503() -> None:
    partner = MockPartner(MockPartnerConfig(seed=1, p_timeout=1.0))
    transport = httpx.ASGITransport(app=partner.app)
    answers: list[Answer] = []

    async def one() -> None:
        answers.append(await post(http, "a"))

    async with (
        httpx.AsyncClient(transport=transport, base_url="http://partner") as http,
        anyio.create_task_group() as tg,
    ):
        await partner.start()
        tg.start_soon(one)
        await anyio.sleep(1.0)
        await partner.stop()

    assert [a.status_code for a in answers] == [503]
    assert partner.truth()["transactions"]["a"]["settled"] is False


# -- time scale ----------------------------------------------------------------------------------


async def test_time_scale_shrinks_every_duration() -> None:
    scale = 0.01
    config = MockPartnerConfig(seed=9, time_scale=scale, p_late_landing_given_timeout=1.0)
    async with running(config) as rig:
        answers = await post_all(rig.http, [f"tx-{i}" for i in range(300)])
        await rig.partner.wait_idle()
        idle_at = anyio.current_time()
        truth = rig.partner.truth()["transactions"]

        burst = [(await rig.http.get("/transaction/x")).status_code for _ in range(6)]
        blocked_at = anyio.current_time()
        await anyio.sleep(0.59)
        still_blocked = await rig.http.get("/transaction/x")
        await anyio.sleep(0.02)
        released = await rig.http.get("/transaction/x")
        per_second = rig.partner.stats()["checks_per_second"]

    ok = [a for a in answers.values() if a.status_code == 200]
    timeouts = [a for a in answers.values() if a.status_code == 504]
    assert ok
    assert timeouts
    assert all(0.2 * scale - EPS <= a.latency <= 10 * scale + EPS for a in ok)
    assert all(abs(a.latency - 30 * scale) <= EPS for a in timeouts)
    assert all(truth[a.id]["status"] is not None for a in timeouts)
    assert idle_at <= 120 * scale + EPS  # the last landing; webhooks end by 30 * scale
    assert all(10 * scale - EPS <= w.at <= 30 * scale + EPS for w in rig.hooks.received)

    assert burst == [404] * 5 + [429]
    assert still_blocked.status_code == 429
    assert released.status_code == 404
    # Counters are keyed by unscaled partner seconds: 0.6 s of real loop time is second 60+.
    elapsed = int((blocked_at + 0.59) / scale)
    assert per_second[str(elapsed)] == 1


# -- uvicorn -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # real sockets need real time
async def test_serve_mock_partner_with_uvicorn_drops_connections_for_real() -> None:
    port = free_port()
    config = MockPartnerConfig(seed=1, time_scale=0.001, p_timeout=0.0, p_webhook=0.0)
    async with (
        anyio.create_task_group() as tg,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        tg.start_soon(serve_mock_partner, config, "127.0.0.1", port)
        with anyio.fail_after(10):
            while True:
                try:
                    await http.get("/_mock/stats")
                    break
                except httpx.ConnectError:
                    await anyio.sleep(0.02)
        normal = await http.post("/transaction", json={"id": "a", "webhookUrl": HOOK_URL})
        await http.post("/_mock/reset", json={"p_drop": 1.0, "p_drop_after_recording": 1.0})
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/transaction", json={"id": "b", "webhookUrl": HOOK_URL})
        truth = (await http.get("/_mock/truth")).json()["transactions"]
        tg.cancel_scope.cancel()

    assert normal.status_code == 200
    assert normal.json()["status"] in ("completed", "declined")
    assert truth["b"]["status"] in ("completed", "declined")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # the server is gone: cancellation shut uvicorn down


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # real sockets need real time
async def test_serve_mock_partner_raises_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="failed to start"):
            await serve_mock_partner(MockPartnerConfig(), "127.0.0.1", port)


# -- idempotency keys (off by default, as the exercise's partner) -------------------------------


async def _post_keyed(http: httpx.AsyncClient, payout_id: str, key: str) -> httpx.Response:
    body = {"id": payout_id, "webhookUrl": HOOK_URL}
    return await http.post("/transaction", json=body, headers={"Idempotency-Key": key})


async def test_a_held_key_is_answered_409_then_with_the_first_record_never_a_second_transfer() -> (
    None
):
    config = MockPartnerConfig(
        seed=3, p_timeout=1.0, p_late_landing_given_timeout=1.0, honor_idempotency_key=True
    )
    async with running(config) as rig:
        first = await _post_keyed(rig.http, "keyed", "k-1")
        assert first.status_code == 504
        in_progress = await _post_keyed(rig.http, "keyed", "k-1")  # at ~30 s, before landing
        await anyio.sleep(config.late_landing_max)
        landed = await _post_keyed(rig.http, "keyed", "k-1")
        stats = rig.partner.stats()
    assert in_progress.status_code == 409
    assert landed.status_code == 200
    assert landed.json()["status"] == status_of(rig, "keyed")
    assert stats["posts_max_per_id"] == 1  # the replays never became POSTs of a transfer
    assert stats["double_payments"] == []


async def test_keys_are_ignored_unless_the_knob_is_on() -> None:
    config = MockPartnerConfig(seed=3, p_timeout=1.0, p_late_landing_given_timeout=1.0)
    async with running(config) as rig:
        await _post_keyed(rig.http, "plain", "k-1")
        await _post_keyed(rig.http, "plain", "k-1")
        stats = rig.partner.stats()
    assert stats["posts_max_per_id"] == 2
    assert stats["double_payments"] == ["plain"]


async def test_the_client_resends_with_the_same_key_to_a_partner_that_honours_it() -> None:
    from resilient_payout import HttpPartner, IdempotencyKeys, PayoutClient, Policy
    from resilient_payout.partner import ExerciseCodec
    from resilient_payout.storage.memory import MemoryStorage

    config = MockPartnerConfig(
        seed=5, p_timeout=1.0, p_late_landing_given_timeout=0.0, honor_idempotency_key=True
    )
    async with running(config) as rig:
        codec = ExerciseCodec(idempotency=IdempotencyKeys())
        policy = Policy(max_submit_attempts=1)
        partner = HttpPartner("http://partner", client=rig.http, codec=codec)
        client = PayoutClient(
            storage=MemoryStorage(), partner=partner, webhook_url=HOOK_URL, policy=policy
        )
        async with client:
            await client.submit({"id": "dropped"})
            p = await client.wait_final("dropped", 2_000)
        stats = rig.partner.stats()
    # Every POST times out and never lands: each re-send under the same key is a fresh request
    # (the partner held nothing), until the re-sends run out and absence is confirmed after
    # the window of the last one.
    assert p.status.value == "failed"
    assert client.stats.resends == Policy().max_resends
    assert stats["double_payments"] == []
