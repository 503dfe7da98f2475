"""The whole service app, composed of the parts a host app can use alone: a
:class:`~._service.PayoutService` (router + lifespan), request metrics and problem handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .._version import __version__
from ..settings import ServiceSettings
from ..wiring import ClientFactory
from ._service import PayoutService
from .metrics import RequestMetrics
from .problems import add_problem_handlers, use_problem_json

__all__ = ["create_app"]


class _ServiceApp(FastAPI):
    """FastAPI whose OpenAPI document gives error answers as ``application/problem+json``."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        return use_problem_json(super().openapi())  # cached by FastAPI: edited in place once


def create_app(
    settings: ServiceSettings | None = None,
    *,
    client_factory: ClientFactory | None = None,
    service: PayoutService | None = None,
) -> FastAPI:
    """The service app. ``settings`` defaults to :meth:`ServiceSettings.from_env`.

    The lifespan enters ``client_factory(settings)`` (by default :func:`open_client`) and leaves
    it on shutdown; while it runs, the client is ``app.state.payout_client``. The routes sit
    under ``settings.route_prefix``. Each app has its own Prometheus registry
    (``app.state.metrics_registry``); ``app.state.payout_service`` is the
    :class:`PayoutService` it is made of (pass ``service`` to build the app around yours).
    With ``settings.admin_token`` (``RP_ADMIN_TOKEN``) the admin API and ops page are served
    under ``/admin`` (docs/operations.md).
    """
    if service is None:
        service = PayoutService(settings, client_factory=client_factory)
    elif settings is not None or client_factory is not None:
        raise TypeError("create_app: pass either service or settings/client_factory, not both")
    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.lifespan(app):
            app.state.payout_client = service.client
            try:
                yield
            finally:
                app.state.payout_client = None

    app = _ServiceApp(
        title="resilient-payout service",
        version=__version__,
        description="The mobile app contract over a resilient_payout PayoutClient.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.payout_service = service
    app.state.payout_client = None
    app.state.metrics_registry = service.metrics.registry
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outermost: it times 413s too
    add_problem_handlers(app)
    app.include_router(service.router, prefix=settings.route_prefix)
    if settings.admin_token is not None:
        # Its own paths (/admin/...), never under the app-facing routes; off without a token.
        from .admin import admin_router

        app.include_router(admin_router(service.get_client, settings))
    return app
