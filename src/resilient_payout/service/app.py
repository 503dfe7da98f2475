"""The service app: settings, client wiring, middleware, problem handlers, metrics and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .._client import PayoutClient
from .._version import __version__
from ..settings import NoWebhookSecret, ServiceSettings
from ..webhooks import UnsignedWebhooks
from ..wiring import ClientFactory, open_client
from .metrics import Metrics, RequestMetrics
from .middleware import BodyLimit
from .problems import add_problem_handlers, use_problem_json
from .routes import build_router

__all__ = ["create_app"]

# Named as before the package split: logging configs refer to it.
log = logging.getLogger("resilient_payout.fastapi")


class _ServiceApp(FastAPI):
    """FastAPI whose OpenAPI document gives error answers as ``application/problem+json``."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        return use_problem_json(super().openapi())  # cached by FastAPI: edited in place once


def create_app(
    settings: ServiceSettings | None = None, *, client_factory: ClientFactory | None = None
) -> FastAPI:
    """The service app. ``settings`` defaults to :meth:`ServiceSettings.from_env`.

    The lifespan enters ``client_factory(settings)`` (by default :func:`open_client`) and leaves
    it on shutdown; while it runs, the client is ``app.state.payout_client``. Each app has its own
    Prometheus registry (``app.state.metrics_registry``).
    """
    settings = ServiceSettings.from_env() if settings is None else settings
    metrics = Metrics()
    app = _ServiceApp(
        title="resilient-payout service",
        version=__version__,
        description="The mobile app contract over a resilient_payout PayoutClient.",
        lifespan=_lifespan(settings, client_factory or open_client, metrics),
    )
    app.state.settings = settings
    app.state.payout_client = None
    app.state.metrics_registry = metrics.registry
    app.add_middleware(
        BodyLimit,
        limits={
            "/transaction": settings.max_transaction_body,
            "/webhook": settings.max_webhook_body,
        },
    )
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it times the 413s too
    add_problem_handlers(app)
    app.include_router(build_router(settings, metrics))
    return app


def _lifespan(
    settings: ServiceSettings, factory: ClientFactory, metrics: Metrics
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with factory(settings) as client:
            app.state.payout_client = metrics.client = client
            _log_start(settings, client)
            try:
                yield
            finally:
                app.state.payout_client = metrics.client = None

    return lifespan


def _log_start(settings: ServiceSettings, client: PayoutClient) -> None:
    if client.webhook_verifier is None or isinstance(client.webhook_verifier, UnsignedWebhooks):
        log.warning("webhooks are accepted UNSIGNED: anyone reaching %s can settle "
                    "payouts; set RP_WEBHOOK_SECRETS", settings.webhook_url)  # fmt: skip
    elif isinstance(client.webhook_verifier, NoWebhookSecret):
        log.warning("every webhook is rejected (no RP_WEBHOOK_SECRETS); payouts settle "
                    "by status checks only")  # fmt: skip
    log.info(
        "payout service up: partner %s, webhooks at %s, pushes to %s (%s), storage %s, "
        "time scale %g, check budget %s",
        settings.partner_url,
        settings.webhook_url,
        settings.push_url,
        settings.push_body,
        settings.storage_url.split(":", 1)[0],
        settings.time_scale,
        f"shared at {settings.budget_url.split(':', 1)[0]} key {settings.budget_key}"
        if settings.budget_url
        else "per process",
    )
