"""The ops page in a real headless browser: Debian's chromium driven by Playwright.

A real service (uvicorn on a free port) with seeded stuck payouts; the browser signs in, finds
the oldest payout stuck in ``unknown``, opens its timeline, resolves it with a note, and the
app's backend receives the push. Screenshots go to ``bench-results/ops-page.png`` (the stuck
lists) and ``bench-results/ops-timeline.png`` (one payout's timeline).

Needs ``pip install playwright`` and ``/usr/bin/chromium`` (``apt-get install chromium``):
skipped with the reason when either is missing, failed instead when ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from resilient_payout import AuditEntry, Cause, OutboxEntry, Payout, PayoutStatus
from resilient_payout.service import ServiceSettings
from resilient_payout.testing._server import embedded_server, listen
from resilient_payout.testing.contract import make_payout
from resilient_payout.testing.mock_partner import MockPartnerConfig
from tests.integration.conftest import ServiceStack, service_stack

pytestmark = pytest.mark.anyio
S = PayoutStatus
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TOKEN = "ops-page-token-0123456789abcdef"
SHOTS = Path(__file__).resolve().parents[2] / "bench-results"
QUIET = MockPartnerConfig(seed=1, p_timeout=0.0, p_webhook=0.0, p_completed=1.0)


def _need_browser() -> None:
    reason = None
    if importlib.util.find_spec("playwright") is None:
        reason = "Playwright is not installed (pip install playwright)"
    elif not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true: the browser test must run", pytrace=False)
    pytest.skip(reason)


def aged(payout_id: str, now: float, age: float, **changes: Any) -> Payout:
    p = make_payout(payout_id, created_at=now - age, updated_at=now - age, next_check_at=now + 1e6)
    return replace(p, audit=(replace(p.audit[0], at=now - age),), **changes)


async def seed(svc: ServiceStack) -> None:
    """Three payouts stuck in unknown, one with a conflict, one whose push keeps failing."""
    storage, now = svc.client.storage, svc.client.clock.now()
    for pid, age in (("stuck-oldest", 5400), ("stuck-2", 1800), ("stuck-3", 700)):
        stored, _ = await storage.create_if_absent(aged(pid, now, age))
        uncertain = AuditEntry(
            now - age + 2, Cause.PARTNER_ANSWER, "uncertain", S.SUBMITTING, S.UNKNOWN,
            "HTTP 504 from the partner",
        )  # fmt: skip
        await storage.compare_and_set(
            replace(
                stored,
                status=S.UNKNOWN,
                attempt=1,
                posts=1,
                attempt_started_at=now - age + 1,
                partner_ref=f"ref-{pid}",
                audit=(*stored.audit, uncertain),
            ),
            expected_version=1,
        )
    for pid, age, conflicted, failing in (
        ("conflicted", 9000, True, False),
        ("app-down", 4000, False, True),
    ):
        stored, _ = await storage.create_if_absent(aged(pid, now, age))
        extra = ()
        if conflicted:
            extra = (
                AuditEntry(now - 300, Cause.WEBHOOK, "conflict", S.COMPLETED, S.COMPLETED,
                           "webhook reported declined after final completed", conflict=True),
            )  # fmt: skip
        entry = OutboxEntry(pid, S.COMPLETED, now - age + 5, now - age + 5)
        await storage.compare_and_set(
            replace(stored, status=S.COMPLETED, next_check_at=None, audit=(*stored.audit, *extra)),
            expected_version=1,
            outbox=entry,
        )
        if failing:
            await storage.retry_outbox(pid, next_attempt_at=now + 3600, error="HTTP 503 from app")
        else:
            await storage.ack_outbox(pid, delivered_at=now - age + 6)


@asynccontextmanager
async def served() -> AsyncIterator[tuple[ServiceStack, str]]:
    """The stack with the admin router, on a real socket; (stack, base URL)."""
    settings = ServiceSettings(
        storage_url="memory://", public_url="http://service", admin_token=TOKEN
    )
    async with service_stack(settings, QUIET) as svc:
        await seed(svc)
        sock = listen("127.0.0.1", 0)
        port = sock.getsockname()[1]
        async with embedded_server(svc.app, sock):
            yield svc, f"http://127.0.0.1:{port}"


async def test_find_a_stuck_payout_open_its_timeline_and_resolve_it() -> None:
    _need_browser()
    from playwright.async_api import async_playwright

    SHOTS.mkdir(exist_ok=True)
    async with served() as (svc, base), async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{base}/admin/ops")
            assert page.url == f"{base}/admin/ops/login"  # no session: the sign-in form
            await page.fill("#operator", "alice")
            await page.fill("#token", TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{base}/admin/ops")

            stuck = page.locator("#stuck-unknown + table tbody tr")
            assert await stuck.count() == 3
            first = stuck.first.locator("a")
            assert await first.inner_text() == "stuck-oldest"  # oldest unknown first
            conflicts = page.locator("#conflicts + table tbody tr")
            assert await conflicts.count() == 1
            assert "conflicted" in await conflicts.first.inner_text()
            failing = page.locator("#failing-pushes + table tbody tr")
            assert "app-down" in await failing.first.inner_text()
            await page.screenshot(path=str(SHOTS / "ops-page.png"), full_page=True)

            await first.click()
            await page.wait_for_url(f"{base}/admin/ops/payouts/stuck-oldest")
            timeline = page.locator("#timeline + table tbody tr")
            assert await timeline.count() == 2
            assert "HTTP 504" in await timeline.nth(1).inner_text()
            assert "1h 30m ago" in await timeline.first.inner_text()
            assert "ref-stuck-oldest" in await page.content()
            await page.screenshot(path=str(SHOTS / "ops-timeline.png"), full_page=True)

            await page.select_option("#status", "failed")
            await page.fill("#note", "partner back office: no such transfer")
            await page.click("#resolve button[type=submit]")
            await page.wait_for_url(f"{base}/admin/ops/payouts/stuck-oldest?done=resolved")
            assert "Resolved" in await page.locator(".msg.ok").inner_text()
            last = page.locator("#timeline + table tbody tr").last
            assert "partner back office: no such transfer (by alice)" in await last.inner_text()
            await page.screenshot(path=str(SHOTS / "ops-resolved.png"), full_page=True)
        finally:
            await browser.close()
        with anyio.fail_after(10):
            while svc.pushed("stuck-oldest") != ["failed"]:  # noqa: ASYNC110 - a list, no event
                await anyio.sleep(0.05)
        resolved = await svc.client.get("stuck-oldest")
        assert (resolved.status, resolved.resolved_by) == (S.FAILED, Cause.OPERATOR)
