"""Drive a PayoutClient against the in-process FakePartner (the tests using it run on virtual
time): shared by tests/unit/test_client.py, tests/unit/test_hostile_time.py and
tests/property/test_reconciliation_props.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from resilient_payout import CallbackNotifier, Payout, PayoutClient, PayoutStatus
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import FakePartner, Script

WEBHOOK_URL = "http://service/webhook"


def scripted(*scripts: Script, **knobs: Any) -> FakePartner:
    """The n-th POST that reaches the partner gets the n-th script (the last one repeats)."""
    return FakePartner(script=lambda _id, n: scripts[min(n, len(scripts)) - 1], **knobs)


@asynccontextmanager
async def running(
    storage: MemoryStorage,
    partner: FakePartner,
    push: Callable[[str, PayoutStatus], Awaitable[object]] | None = None,
    **kw: Any,
) -> AsyncIterator[PayoutClient]:
    """A running client whose pushes go to ``push`` and whose webhooks the partner sends it."""
    client = PayoutClient(
        storage=storage,
        partner=partner,
        webhook_url=WEBHOOK_URL,
        notifier=CallbackNotifier(push) if push is not None else None,
        **kw,
    )
    partner.webhook_sink = client.handle_webhook
    async with client:
        yield client


@asynccontextmanager
async def crashing(
    storage: MemoryStorage,
    partner: FakePartner,
    push: Callable[[str, PayoutStatus], Awaitable[object]] | None = None,
    **kw: Any,
) -> AsyncIterator[tuple[PayoutClient, anyio.CancelScope]]:
    """A running client that dies (cancelled: no drain, no cleanup writes, as a killed process)
    when the test cancels the scope it yields."""
    with anyio.CancelScope() as scope:
        async with running(storage, partner, push, **kw) as client:
            yield client, scope
            await anyio.sleep_forever()


async def settled(client: PayoutClient, payout_id: str, *, within: float) -> Payout:
    """The payout once final; fails the test unless it is final ``within`` seconds."""
    p = await client.wait_final(payout_id, within)
    assert p.is_final, (p.status, p.audit)
    return p
