"""The service as parts for your own app: :class:`PayoutService` carries the router and the
lifespan of one :class:`~resilient_payout.PayoutClient` (docs/embedding.md)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

from fastapi import APIRouter
from fastapi.routing import APIRoute

from .._client import PayoutClient
from .._errors import ClientNotRunning, ConfigurationError
from ..settings import NoWebhookSecret, ServiceSettings
from ..webhooks import UnsignedWebhooks
from ..wiring import ClientFactory, describe_storage, open_client
from .metrics import Metrics
from .routes import build_router

__all__ = ["PayoutService"]

# Named as before the package split: logging configs refer to it.
log = logging.getLogger("resilient_payout.fastapi")

_State = Literal["new", "starting", "running", "stopped", "failed"]
_NOT_RUNNING: Final[dict[_State, str]] = {
    "new": (
        "the payout client is not running: its lifespan was never entered. Pass "
        "lifespan=service.lifespan to your FastAPI app, or enter `async with "
        "service.lifespan(app):` in your app's own lifespan; a sub-app added with app.mount() "
        "never gets its lifespan run by Starlette, so enter it from the host app's lifespan "
        "(PayoutService.lifespan, docs/embedding.md)"
    ),
    "starting": "the payout client is starting",
    "running": "the payout client is running",
    "stopped": "the payout client has stopped (the app is shutting down)",
    "failed": "the payout client failed to start (see the log); restart the app",
}


class PayoutService:
    """The app-facing routes of one payout client and the lifespan that runs it.

    ::

        service = PayoutService(ServiceSettings.from_env(), prefix="/payouts")
        app = FastAPI(lifespan=service.lifespan)
        app.include_router(service.router, prefix=service.prefix)

    Args:
        settings: defaults to :meth:`ServiceSettings.from_env`.
        client_factory: turns the settings into an async context manager yielding the running
            client; by default :func:`~resilient_payout.wiring.open_client`.
        prefix: where you include :attr:`router` (default: ``settings.route_prefix``,
            ``RP_ROUTE_PREFIX``); it is part of the webhook URL given to the partner, and the
            lifespan refuses to start if the router sits elsewhere in the app it is given.
        name: with several services in one app (one per partner), prefixes the OpenAPI
            operation ids (``{name}_submitTransaction``...) so that they stay unique.

    Attributes:
        settings: the settings, with ``route_prefix`` set to ``prefix``.
        router: an ``APIRouter`` of the routes at the settings' paths (without the prefix);
            its errors are problem+json whatever app includes it.
        metrics: this service's Prometheus registry and collectors (``metrics.registry``).
    """

    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        client_factory: ClientFactory | None = None,
        prefix: str | None = None,
        name: str | None = None,
    ) -> None:
        settings = ServiceSettings.from_env() if settings is None else settings
        if prefix is not None and prefix != settings.route_prefix:
            settings = settings.replace(route_prefix=prefix)
        self.settings = settings
        self.metrics = Metrics()
        self._factory: ClientFactory = client_factory or open_client
        self._client: PayoutClient | None = None
        self._state: _State = "new"
        self.router: APIRouter = build_router(settings, self.metrics, self.get_client)
        if name:
            for route in self.router.routes:
                if isinstance(route, APIRoute) and route.operation_id:
                    route.operation_id = f"{name}_{route.operation_id}"
        self._webhook_endpoint = _endpoint_of(self.router, settings.webhook_path)

    @property
    def prefix(self) -> str:
        """Where :attr:`router` is meant to be included (``settings.route_prefix``)."""
        return self.settings.route_prefix

    @property
    def running(self) -> bool:
        """Whether the client is running (inside :meth:`lifespan`)."""
        return self._client is not None

    @property
    def client(self) -> PayoutClient:
        """The running client; :class:`~resilient_payout.ClientNotRunning` outside the lifespan
        (its message says what to do)."""
        return self.get_client()

    def get_client(self) -> PayoutClient:
        """:attr:`client` as a callable, for routers of your own (e.g. the admin router)."""
        client = self._client
        if client is None:
            raise ClientNotRunning(_NOT_RUNNING[self._state])
        return client

    @asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Run the client: ``FastAPI(lifespan=service.lifespan)``, or inside your own lifespan
        ``async with service.lifespan(app): ... yield``. ``app`` (optional) is checked: if it
        holds :attr:`router`'s webhook route at another path than ``prefix`` says, this raises
        :class:`~resilient_payout.ConfigurationError` before anything starts."""
        if self._state in ("starting", "running"):
            raise ConfigurationError("PayoutService.lifespan is already running; enter it once")
        if app is not None:
            self._check_prefix(app)
        self._state = "starting"
        try:
            async with self._factory(self.settings) as client:
                self._client = self.metrics.client = client
                self._state = "running"
                _log_start(self.settings, client)
                try:
                    yield
                finally:
                    self._client = self.metrics.client = None
        finally:
            self._state = "stopped" if self._state == "running" else "failed"

    def _check_prefix(self, app: Any) -> None:
        expected = self.settings.route_prefix + self.settings.webhook_path
        for path in self._webhook_paths_in(app):
            if path != expected:
                raise ConfigurationError(
                    f"the webhook route is at {path} in this app, but the partner would be "
                    f"told {expected}: build PayoutService(prefix=...) with the prefix you "
                    "include its router under (RP_ROUTE_PREFIX)"
                )

    def _webhook_paths_in(self, app: Any) -> list[str]:
        """Where ``app`` serves our webhook route (its own routes only, not mounted apps')."""
        found = []
        for route in getattr(app, "routes", ()):
            if getattr(route, "endpoint", None) is self._webhook_endpoint:
                found.append(str(route.path))  # FastAPI copies included routes, prefixed
            elif getattr(route, "original_router", None) is self.router:
                # Newer FastAPI keeps an included router whole, with its include prefix.
                prefix = getattr(getattr(route, "include_context", None), "prefix", None)
                if isinstance(prefix, str):
                    found.append(prefix + self.settings.webhook_path)
        return found


def _endpoint_of(router: APIRouter, path: str) -> object:
    return next(
        getattr(r, "endpoint", None) for r in router.routes if getattr(r, "path", 0) == path
    )


def _log_start(settings: ServiceSettings, client: PayoutClient) -> None:
    if client.webhook_verifier is None or isinstance(client.webhook_verifier, UnsignedWebhooks):
        log.warning("webhooks are accepted UNSIGNED: anyone reaching %s can settle "
                    "payouts; set RP_WEBHOOK_SECRETS", client.webhook_url)  # fmt: skip
    elif isinstance(client.webhook_verifier, NoWebhookSecret):
        log.warning("every webhook is rejected (no RP_WEBHOOK_SECRETS); payouts settle "
                    "by status checks only")  # fmt: skip
    log.info(
        "payout service up: partner %s, webhooks at %s, pushes to %s (%s), storage %s, "
        "time scale %g, check budget %s",
        settings.partner_url,
        client.webhook_url,
        settings.push_url,
        settings.push_body,
        describe_storage(settings.storage_url),
        settings.time_scale,
        f"shared at {settings.budget_url.split(':', 1)[0]} key {settings.budget_key}"
        if settings.budget_url
        else "per process",
    )
