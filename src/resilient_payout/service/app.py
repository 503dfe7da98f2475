"""The whole service app, composed of the parts a host app can use alone: a
:class:`~._service.PayoutService` (router + lifespan), request metrics and problem handlers."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.types import Receive, Scope, Send

from .._version import __version__
from ..settings import ServiceSettings
from ..wiring import ClientFactory
from ._route import answered
from ._service import PayoutService
from .metrics import Metrics, RequestMetrics
from .problems import add_problem_handlers, use_problem_json
from .routes import HotPaths, PayoutRouter

__all__ = ["create_app"]

_PLAIN_WAIT: Final = re.compile(rb"wait=((?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,9})?)")
"""A ``?wait=`` FastAPI would accept as it is (longer or other forms take FastAPI's own path)."""

_Hot = Callable[[Request], Awaitable[Response]]


class _FastPaths:
    """The hot routes of one app, matched on the method and the path alone.

    A payout costs three requests here (the submit, the partner's webhook, often a status
    read), and FastAPI's stack (a dozen middleware layers, route matching, parameter solving,
    response validation) cost more CPU than the routes' own work. The handlers are the
    endpoints' own (:class:`~.routes.HotPaths`), so answers, errors and metrics are the same.
    """

    def __init__(self, app: FastAPI, hot: HotPaths, prefix: str, metrics: Metrics) -> None:
        self.app = app
        self.hot = hot
        self.metrics = metrics
        self.routes: dict[tuple[str, str], tuple[_Hot, str]] = {
            ("POST", prefix + hot.submit.path): (hot.handle_submit, _label(app, hot.submit)),
            ("POST", prefix + hot.webhook.path): (hot.handle_webhook, _label(app, hot.webhook)),
        }
        self.get_prefix = prefix + hot.get.path.removesuffix("{payout_id}")
        assert self.get_prefix + "{payout_id}" == prefix + hot.get.path
        self.get_label = _label(app, hot.get)
        self.handlers = dict(app.exception_handlers)
        """What the app answered errors with when this was made: another handler since (a host
        app's), and the app's own stack answers."""

    def eligible(self, scope: Scope) -> bool:
        """Whether nothing this skips would act on the request: no middleware, exception
        handler, dependency override, body limit, debug page or telemetry the app has gained
        since ``create_app`` (FastAPI builds its stack from these on the first request)."""
        app = self.app
        if scope.get("root_path") or app.root_path or app.debug or app.dependency_overrides:
            return False
        if len(app.user_middleware) != 1 or app.exception_handlers != self.handlers:
            return False
        if getattr(app, "max_body_size", None) is not None:
            return False
        telemetry = getattr(app, "_native_telemetry", None)
        return telemetry is None or not telemetry.enabled()

    def match(self, scope: Scope) -> tuple[Callable[[Request], Awaitable[Response]], str] | None:
        """The handler and the metrics route label, or None: the app's own stack answers."""
        method, path = scope["method"], scope["path"]
        found = self.routes.get((method, path))
        if found is not None:
            return found if self.eligible(scope) else None
        if method != "GET" or not path.startswith(self.get_prefix):
            return None
        payout_id = path[len(self.get_prefix) :]
        if not payout_id or "/" in payout_id:
            return None
        query: bytes = scope.get("query_string", b"")
        wait: float | None = None
        if query:
            plain = _PLAIN_WAIT.fullmatch(query)
            if plain is None:
                return None
            wait = float(plain[1])
            if wait > self.hot.max_wait:
                return None
        if not self.eligible(scope):
            return None
        handle_get = self.hot.handle_get

        async def handle(request: Request) -> Response:
            return await handle_get(request, payout_id, wait)

        return handle, self.get_label

    async def serve(self, handler: _Hot, label: str, scope: Scope, r: Receive, s: Send) -> None:
        """As ``ProblemRoute`` inside the app's stack: errors as problems, a bug as the app's
        500 handler answers it (then raised, for the server to log), and the request counted
        as :class:`~.metrics.RequestMetrics` counts it."""
        scope["app"] = self.app
        started = anyio.current_time()
        status = 500
        request = Request(scope, r, s)
        try:
            try:
                response = await answered(handler, request)
            except Exception as exc:
                await self._bug(request, exc, scope, r, s)
                raise
            status = response.status_code
            await response(scope, r, s)
        finally:
            self.metrics.observe_request(scope["method"], label, status, started)

    async def _bug(
        self, request: Request, exc: Exception, scope: Scope, r: Receive, s: Send
    ) -> None:
        # Starlette's ServerErrorMiddleware: the app's handler for Exception answers.
        on_error = self.handlers.get(Exception)
        if on_error is None:
            return
        answer = on_error(request, exc)
        if inspect.isawaitable(answer):
            answer = await answer
        await answer(scope, r, s)


def _label(app: FastAPI, route: APIRoute) -> str:
    """The metrics label the app's router would give ``route``: FastAPI versions that copy
    included routes give the copy's (prefixed) path, later ones the router's own."""
    for candidate in app.routes:
        if isinstance(candidate, APIRoute) and candidate.endpoint is route.endpoint:
            return candidate.path
    return route.path


class _ServiceApp(FastAPI):
    """FastAPI whose OpenAPI document gives error answers as ``application/problem+json``, and
    which answers the hot routes past its own stack (:class:`_FastPaths`)."""

    fast_paths: _FastPaths | None = None

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        return use_problem_json(super().openapi())  # cached by FastAPI: edited in place once

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.fast_paths
        if fast is not None and scope["type"] == "http":
            found = fast.match(scope)
            if found is not None:
                await fast.serve(found[0], found[1], scope, receive, send)
                return
        await super().__call__(scope, receive, send)


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
    router = service.router
    if isinstance(router, PayoutRouter) and router.hot_paths is not None:
        app.fast_paths = _FastPaths(app, router.hot_paths, settings.route_prefix, service.metrics)
    return app
