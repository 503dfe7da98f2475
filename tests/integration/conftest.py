"""The in-process service stack the integration tests share.

The service app and the mock partner talk through ``httpx.ASGITransport`` both ways (our POSTs
and checks to the partner, its webhooks to us); pushes to the app are recorded by a
CallbackNotifier. It runs on whatever time the test runs (virtual or real).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio.lowlevel
import httpx
from fastapi import FastAPI

from resilient_payout import CallbackNotifier, HttpPartner, PayoutClient, PayoutStatus
from resilient_payout.service import ServiceSettings, create_app
from resilient_payout.storage import Storage
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing.mock_partner import MockPartner, MockPartnerConfig

PartnerTransport = Callable[[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport]
"""Wraps the transport to the partner (to inject faults in front of it)."""


@dataclass
class ServiceStack:
    app: FastAPI
    http: httpx.AsyncClient
    """To the service."""
    partner: MockPartner
    partner_transport: httpx.AsyncBaseTransport
    """Our requests to the partner go through it."""
    pushes: list[tuple[str, str]] = field(default_factory=list)
    """(id, status) of every push the app backend acknowledged, in order."""
    push_down: bool = False
    """True: the app backend refuses every push."""
    push_failures: int = 0

    async def push(self, payout_id: str, status: PayoutStatus) -> None:
        if self.push_down:
            self.push_failures += 1
            raise ConnectionRefusedError("app backend down")
        self.pushes.append((payout_id, status.value))

    def pushed(self, payout_id: str) -> list[str]:
        """The statuses pushed for ``payout_id``, in order."""
        return [status for pid, status in self.pushes if pid == payout_id]

    @property
    def client(self) -> PayoutClient:
        client: PayoutClient = self.app.state.payout_client
        return client


@asynccontextmanager
async def service_stack(
    settings: ServiceSettings,
    config: MockPartnerConfig,
    *,
    storage: Callable[[], Storage] = MemoryStorage,
    notify: bool = True,
    verify_webhooks: bool = False,
    partner_transport: PartnerTransport | None = None,
    stack_type: type[ServiceStack] = ServiceStack,
) -> AsyncIterator[ServiceStack]:
    """The running stack: ``create_app(settings)`` over ``storage()``, its lifespan entered.

    ``notify`` False: no notifier; ``verify_webhooks`` False: the client's default (unsigned
    webhooks accepted), True: ``settings.webhook_verifier()``; ``stack_type``: a subclass that
    adds a test module's helpers.
    """

    def factory(s: ServiceSettings) -> PayoutClient:
        return PayoutClient(
            storage=storage(),
            partner=HttpPartner("http://partner", client=partner_http, policy=s.policy()),
            webhook_url=s.webhook_url,
            notifier=CallbackNotifier(st.push) if notify else None,
            policy=s.policy(),
            webhook_verifier=s.webhook_verifier() if verify_webhooks else None,
        )

    app = create_app(settings, client_factory=factory)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")
    partner = MockPartner(config, webhook_client=http)
    transport: httpx.AsyncBaseTransport = httpx.ASGITransport(app=partner.app)
    if partner_transport is not None:
        transport = partner_transport(transport)
    partner_http = httpx.AsyncClient(transport=transport, base_url="http://partner")
    st = stack_type(app, http, partner, transport)
    async with http, partner_http, partner, app.router.lifespan_context(app):
        # PayoutClient raises ClientNotRunning from its loops if left before they ever ran.
        await anyio.lowlevel.checkpoint()
        yield st
