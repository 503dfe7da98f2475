"""Framework-neutral wiring: the running :class:`~resilient_payout.PayoutClient` built from
:class:`~resilient_payout.settings.ServiceSettings` (``RP_*``), for a web app, a worker or the CLI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from ._client import PayoutClient
from ._policy import Policy
from .notify import HttpNotifier
from .partner import HttpPartner
from .settings import ServiceSettings
from .storage import storage_from_url

__all__ = ["ClientFactory", "open_client"]

ClientFactory = Callable[[ServiceSettings], AbstractAsyncContextManager[PayoutClient]]
"""Builds the running client for an app; a bare ``PayoutClient`` (itself an async context
manager) will do, e.g. ``lambda s: PayoutClient(storage=MemoryStorage(), ...)``."""


def _budget(settings: ServiceSettings, policy: Policy) -> AbstractAsyncContextManager[Any]:
    """The shared Redis check budget (closed on exit), or None for the client's local one."""
    if not settings.budget_url:
        return nullcontext(None)
    from .reconcile.redis import RedisCheckBudget

    # The policy's rate is already scaled: every instance must agree on it, as on the key.
    return RedisCheckBudget(
        settings.budget_url,
        rate=policy.check_rate,
        burst=policy.check_burst,
        key=settings.budget_key,
    )


@asynccontextmanager
async def open_client(settings: ServiceSettings) -> AsyncIterator[PayoutClient]:
    """The default :data:`ClientFactory`: storage from the URL, the HTTP partner and notifier,
    and the shared Redis check budget when ``budget_url`` is set."""
    policy = settings.policy()
    async with (
        _budget(settings, policy) as budget,
        HttpPartner(settings.partner_url, policy=policy) as partner,
        HttpNotifier(
            settings.push_url, body=settings.push_body, timeout=policy.notify_timeout
        ) as notifier,
        PayoutClient(
            storage=storage_from_url(settings.storage_url),
            partner=partner,
            webhook_url=settings.webhook_url,
            notifier=notifier,
            webhook_verifier=settings.webhook_verifier(),
            policy=policy,
            budget=budget,
        ) as client,
    ):
        yield client
