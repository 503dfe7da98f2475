"""The admin router (service/admin.py): bearer auth, the JSON API, and the ops page's session and
CSRF rules over plain HTTP (the browser drives it in test_ops_page.py), on virtual time."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import httpx
import pytest

from resilient_payout import AuditEntry, Cause, OutboxEntry, Payout, PayoutStatus
from resilient_payout.service import PROBLEM_TYPE_PREFIX, ServiceSettings
from resilient_payout.testing import VIRTUAL_TIME_BACKEND
from resilient_payout.testing.contract import make_payout
from resilient_payout.testing.mock_partner import MockPartnerConfig
from tests.integration.conftest import ServiceStack, service_stack

pytestmark = pytest.mark.anyio
S = PayoutStatus
TOKEN = "admin-token-0123456789-abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUIET = MockPartnerConfig(seed=1, p_timeout=0.0, p_webhook=0.0, p_completed=1.0)


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


@asynccontextmanager
async def admin_stack(token: str | None = TOKEN) -> AsyncIterator[ServiceStack]:
    settings = ServiceSettings(
        storage_url="memory://", public_url="http://service", admin_token=token
    )
    async with service_stack(settings, QUIET) as svc:
        await seed(svc)
        yield svc


async def seed(svc: ServiceStack) -> None:
    """``stuck`` in unknown for an hour, ``done`` completed with a delivered push."""
    storage, now = svc.client.storage, svc.client.clock.now()
    stuck, _ = await storage.create_if_absent(aged("stuck", now, 3600))
    await storage.compare_and_set(
        replace(stuck, status=S.UNKNOWN, partner_ref="ref-stuck"), expected_version=1
    )
    done, _ = await storage.create_if_absent(aged("done", now, 7200))
    conflict = AuditEntry(
        now - 60, Cause.WEBHOOK, "conflict", S.COMPLETED, S.COMPLETED,
        "webhook reported declined after final completed", conflict=True,
    )  # fmt: skip
    final = replace(done, status=S.COMPLETED, next_check_at=None, audit=(*done.audit, conflict))
    await storage.compare_and_set(
        final, expected_version=1, outbox=OutboxEntry("done", S.COMPLETED, now - 7000, now - 7000)
    )
    await storage.ack_outbox("done", delivered_at=now - 6999)


def aged(payout_id: str, now: float, age: float) -> Payout:
    """A received payout created ``age`` seconds before ``now``, with nothing due for days."""
    p = make_payout(payout_id, created_at=now - age, updated_at=now - age, next_check_at=now + 1e6)
    return replace(p, audit=(replace(p.audit[0], at=now - age),))


def service_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the service logged (the test's own HTTP client logs the URLs it requests)."""
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))


def assert_problem(response: httpx.Response, status: int, slug: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == (PROBLEM_TYPE_PREFIX + slug if slug else "about:blank")
    return body


async def test_without_a_token_setting_there_is_no_admin_route() -> None:
    async with admin_stack(token=None) as svc:
        for path in ("/admin/stats", "/admin/payouts", "/admin/ops", "/admin/ops/login"):
            assert (await svc.http.get(path, headers=AUTH)).status_code == 404
        spec = (await svc.http.get("/openapi.json")).json()
        assert not [p for p in spec["paths"] if p.startswith("/admin")]


async def test_a_token_setting_must_be_long() -> None:
    with pytest.raises(ValueError, match="at least 24"):
        ServiceSettings(admin_token="short")
    with pytest.raises(ValueError, match="RP_ADMIN_TOKEN") as raised:
        ServiceSettings.from_env({"RP_ADMIN_TOKEN": "tooshort-secret"})
    assert "tooshort-secret" not in str(raised.value)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ],
)
async def test_a_missing_or_wrong_token_is_401_and_changes_nothing(headers: dict[str, str]) -> None:
    async with admin_stack() as svc:
        before = await svc.client.get("stuck")
        for method, path, body in (
            ("GET", "/admin/stats", None),
            ("GET", "/admin/payouts/stuck", None),
            ("POST", "/admin/payouts/stuck/resolve",
             {"status": "failed", "note": "x", "operator": "mallory"}),
        ):  # fmt: skip
            answer = await svc.http.request(method, path, headers=headers, json=body)
            assert_problem(answer, 401, None)
            assert answer.headers["www-authenticate"] == 'Bearer realm="admin"'
        assert await svc.client.get("stuck") == before


@pytest.mark.parametrize(
    "query", [{"token": TOKEN}, {"access_token": "x"}, {"status": "unknown", "q": TOKEN}]
)
async def test_a_token_in_the_query_string_is_refused(
    query: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin_stack() as svc:
        answer = await svc.http.get("/admin/payouts", params=query, headers=AUTH)
        body = assert_problem(answer, 400, "credentials-in-query")
        assert "Authorization header" in body["detail"]
        answer = await svc.http.get("/admin/ops", params=query)
        assert answer.status_code == 400
    assert TOKEN not in service_log(caplog)


async def test_list_show_and_stats(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin_stack() as svc:
        page = (await svc.http.get("/admin/payouts", headers=AUTH)).json()
        assert [p["id"] for p in page["items"]] == ["done", "stuck"]
        unknown = await svc.http.get(
            "/admin/payouts", params={"status": "unknown", "older_than": "10m"}, headers=AUTH
        )
        assert [p["id"] for p in unknown.json()["items"]] == ["stuck"]
        conflicts = await svc.http.get("/admin/payouts?conflicts=true", headers=AUTH)
        assert [p["id"] for p in conflicts.json()["items"]] == ["done"]
        first = (await svc.http.get("/admin/payouts?limit=1", headers=AUTH)).json()
        rest = await svc.http.get(
            "/admin/payouts", params={"limit": 1, "cursor": first["next_cursor"]}, headers=AUTH
        )
        assert [p["id"] for p in rest.json()["items"]] == ["stuck"]
        shown = (await svc.http.get("/admin/payouts/stuck", headers=AUTH)).json()
        assert shown["payout"]["partner_ref"] == "ref-stuck"
        assert shown["outbox"] is None
        assert re.fullmatch(r"1h( \d+m)? ago", shown["timeline"][0]["ago"])
        done = (await svc.http.get("/admin/payouts/done", headers=AUTH)).json()
        assert done["outbox"]["state"] == "delivered"
        assert done["timeline"][-1]["conflict"] is True
        stats = (await svc.http.get("/admin/stats", headers=AUTH)).json()
        assert (stats["counts"]["unknown"], stats["counts"]["completed"]) == (1, 1)
        assert stats["conflicts"] == 1
        assert_problem(
            await svc.http.get("/admin/payouts/nope", headers=AUTH), 404, "unknown-payout"
        )
        bad = await svc.http.get("/admin/payouts?cursor=garbage", headers=AUTH)
        assert_problem(bad, 422, "invalid-request")
        bad = await svc.http.get("/admin/payouts?older_than=ten", headers=AUTH)
        assert_problem(bad, 422, "invalid-request")
    assert TOKEN not in service_log(caplog)


async def test_resolve_is_audited_pushed_and_refused_once_final(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin_stack() as svc:
        url = "/admin/payouts/stuck/resolve"
        for body, status in (
            ({"status": "awaiting", "note": "x", "operator": "alice"}, 422),
            ({"status": "failed", "note": "", "operator": "alice"}, 422),
            ({"status": "failed", "note": "   ", "operator": "alice"}, 422),
            ({"status": "failed", "note": "x"}, 422),
            ({"status": "failed", "note": "x", "operator": "alice", "extra": 1}, 422),
        ):
            assert_problem(
                await svc.http.post(url, json=body, headers=AUTH), status, "invalid-request"
            )
        huge = {"status": "failed", "note": "x" * 20_000, "operator": "alice"}
        assert_problem(await svc.http.post(url, json=huge, headers=AUTH), 413, "body-too-large")
        assert (await svc.client.get("stuck")).status is S.UNKNOWN
        body = {"status": "failed", "note": "back office: never arrived", "operator": "alice"}
        answer = await svc.http.post(url, json=body, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json()["audit"][-1]["detail"] == "back office: never arrived (by alice)"
        await anyio.sleep(5)
        assert svc.pushed("stuck") == ["failed"]
        again = await svc.http.post(url, json={**body, "status": "completed"}, headers=AUTH)
        assert_problem(again, 409, "payout-already-final")
        missing = await svc.http.post("/admin/payouts/nope/resolve", json=body, headers=AUTH)
        assert_problem(missing, 404, "unknown-payout")
        await anyio.sleep(5)
        assert svc.pushed("stuck") == ["failed"]
    assert TOKEN not in service_log(caplog)


async def test_redeliver_pushes_again_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with admin_stack() as svc:
        answer = await svc.http.post(
            "/admin/payouts/done/redeliver", json={"operator": "bob"}, headers=AUTH
        )
        assert answer.json() == {"payout_id": "done", "requeued": True}
        await anyio.sleep(5)
        assert svc.pushed("done") == ["completed"]
        assert "payout done push re-queued by bob (admin API)" in caplog.text
        open_ = await svc.http.post(
            "/admin/payouts/stuck/redeliver", json={"operator": "bob"}, headers=AUTH
        )
        assert_problem(open_, 409, "nothing-to-push")
        blank = await svc.http.post(
            "/admin/payouts/done/redeliver", json={"operator": ""}, headers=AUTH
        )
        assert_problem(blank, 422, "invalid-request")


async def test_openapi_lists_the_admin_api_under_its_own_tag() -> None:
    async with admin_stack() as svc:
        spec = (await svc.http.get("/openapi.json")).json()
    admin = {p: ops for p, ops in spec["paths"].items() if p.startswith("/admin")}
    assert set(admin) == {
        "/admin/payouts",
        "/admin/payouts/{payout_id}",
        "/admin/payouts/{payout_id}/resolve",
        "/admin/payouts/{payout_id}/redeliver",
        "/admin/stats",
    }
    for ops in admin.values():
        for op in ops.values():
            assert op["tags"] == ["admin"]
            assert "401" in op["responses"]
    resolve = admin["/admin/payouts/{payout_id}/resolve"]["post"]
    schema = resolve["requestBody"]["content"]["application/json"]["schema"]
    assert (schema["title"], sorted(schema["required"])) == (
        "AdminResolve",
        ["note", "operator", "status"],
    )
    for path, ops in spec["paths"].items():
        if not path.startswith("/admin"):
            assert all("admin" not in op.get("tags", ()) for op in ops.values()), path


# -- the ops page over plain HTTP ----------------------------------------------------------------


async def login(svc: ServiceStack, token: str = TOKEN, operator: str = "alice") -> httpx.Response:
    return await svc.http.post(
        "/admin/ops/login", data={"token": token, "operator": operator}, follow_redirects=False
    )


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None
    return found.group(1)


async def test_ops_page_needs_a_session() -> None:
    async with admin_stack() as svc:
        answer = await svc.http.get("/admin/ops", follow_redirects=False)
        assert (answer.status_code, answer.headers["location"]) == (303, "/admin/ops/login")
        # A bearer header is no session: the page is for browsers.
        assert (await svc.http.get("/admin/ops", headers=AUTH)).status_code == 303
        wrong = await login(svc, token="nope")
        assert wrong.status_code == 401
        assert "Wrong admin token" in wrong.text
        assert "set-cookie" not in wrong.headers
        svc.http.cookies.set("rp_ops_session", "YWxpY2U.9999999999.00", path="/admin/ops")
        answer = await svc.http.get("/admin/ops", follow_redirects=False)
        assert answer.status_code == 303


async def test_ops_page_session_cookie_and_csrf() -> None:
    async with admin_stack() as svc:
        answer = await login(svc)
        assert (answer.status_code, answer.headers["location"]) == (303, "/admin/ops")
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert "Path=/admin/ops" in cookie
        assert TOKEN not in cookie
        page = await svc.http.get("/admin/ops")
        assert page.status_code == 200
        assert "Stuck in unknown" in page.text
        assert 'href="/admin/ops/payouts/stuck"' in page.text
        assert "script" not in page.text.lower()
        assert page.headers["content-security-policy"].startswith("default-src 'none'")
        timeline = await svc.http.get("/admin/ops/payouts/stuck")
        assert "ref-stuck" in timeline.text
        # Without the form's CSRF token, nothing happens.
        bad = await svc.http.post(
            "/admin/ops/payouts/stuck/resolve", data={"status": "failed", "note": "x"}
        )
        assert bad.status_code == 403
        assert (await svc.client.get("stuck")).status is S.UNKNOWN
        csrf = csrf_of(timeline.text)
        empty = await svc.http.post(
            "/admin/ops/payouts/stuck/resolve", data={"status": "failed", "note": " ", "csrf": csrf}
        )
        assert empty.status_code == 422
        assert "note" in empty.text
        done = await svc.http.post(
            "/admin/ops/payouts/stuck/resolve",
            data={"status": "failed", "note": "back office <b>said</b> so", "csrf": csrf},
            follow_redirects=True,
        )
        assert done.status_code == 200  # followed the redirect
        assert "Resolved" in done.text
        assert "back office &lt;b&gt;said&lt;/b&gt; so (by alice)" in done.text
        again = await svc.http.post(
            "/admin/ops/payouts/stuck/resolve",
            data={"status": "completed", "note": "x", "csrf": csrf},
        )
        assert again.status_code == 409
        await anyio.sleep(5)
        assert svc.pushed("stuck") == ["failed"]
        out = await svc.http.post("/admin/ops/logout", data={"csrf": csrf}, follow_redirects=False)
        assert out.status_code == 303
        assert (await svc.http.get("/admin/ops", follow_redirects=False)).status_code == 303


async def test_metrics_expose_the_alert_figures() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with admin_stack() as svc:
        storage, now = svc.client.storage, svc.client.clock.now()
        late = await storage.get("stuck")
        assert late is not None
        await storage.compare_and_set(
            replace(late, attempt_started_at=now - 3000), expected_version=late.version
        )
        text = (await svc.http.get("/metrics")).text
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert values["resilient_payout_oldest_open_seconds"] == pytest.approx(3600, abs=5)
    assert values["resilient_payout_open_past_window"] == 1
    assert values["resilient_payout_conflicted_payouts"] == 1
    assert values["resilient_payout_outbox_failing"] == 0
    assert values["resilient_payout_outbox_dead"] == 0


async def test_create_app_serves_the_admin_router_only_with_a_token() -> None:
    async with admin_stack(token=None) as svc:
        off = await svc.http.get("/admin/stats", headers=AUTH)
    async with admin_stack() as svc:
        on = await svc.http.get("/admin/stats", headers=AUTH)
        paths = svc.app.openapi()["paths"]
    assert off.status_code == 404
    assert on.status_code == 200
    assert any(p.startswith("/admin/") for p in paths)
    assert not any(p.startswith("/admin/") and p.count("/admin") > 1 for p in paths)
