"""The service's routes, each a thin call into the client (paths are settings, shown with
their defaults):

=============================  ====================================================================
route                          what it does
=============================  ====================================================================
``POST /transaction``          submit ``{"id", ...}``; answers at once ``{"id", "status"}``;
                               ``Prefer: wait=N`` holds the answer up to N s for a final status;
                               503 ``overloaded`` while the process is behind, ``shutting-down``
                               while the client drains (both before the body is read)
``GET /transaction/{id}``      the payout's app-facing status; ``?wait=N`` long-polls
``POST /webhook``              the partner's webhook (never creates a payout)
``GET /healthz``               liveness: ``{"status": "ok"}``, 503 while the client is not running
``GET /readyz``                readiness: 200 only while the client runs, is not draining and
                               storage answers
``GET /metrics``               Prometheus text format
=============================  ====================================================================

The app sees ``pending`` for every non-final status, else ``completed``, ``declined`` or
``failed``. Every route is a :class:`~._route.ProblemRoute`: its errors are problem+json in
any app. The first three are also :class:`HotPaths`, which ``create_app`` serves without
FastAPI's stack in the plain case (same answers).
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime,
# and some of them are locals.
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import anyio
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._admission import AdmissionGate
from .._client import PayoutClient
from .._errors import (
    ClientNotRunning,
    InvalidRequest,
    InvalidWebhook,
    ShuttingDown,
    StorageError,
)
from .._model import PayoutRequest
from ..settings import ServiceSettings
from ._route import ProblemRoute
from .deps import client_dependency, parse_transaction, prefer_wait, read_capped
from .metrics import Metrics
from .problems import ProblemRaised, problem_docs
from .schemas import Health, PartnerWebhook, Readiness, TransactionStatus, view

__all__ = ["READY_TIMEOUT", "HotPaths", "PayoutRouter", "build_router"]

_UUID_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

READY_TIMEOUT: Final = 2.0
"""Seconds the readiness probe waits for storage to answer its one-row read."""
_PROBE_ID: Final = "readyz-probe"
"""The id the readiness probe reads: a primary-key lookup, the cheapest query of every backend
(whether such a payout exists does not matter)."""

GetClient = Callable[[], PayoutClient]
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class HotPaths:
    """The busiest routes as plain request handlers, the very code their FastAPI endpoints run:
    ``create_app`` calls them without FastAPI's routing, dependency solving and response
    validation when its request is the plain case (app.py). Errors are raised, as from an
    endpoint, for :func:`~.problems.problem_for`. Paths are the router's (no prefix)."""

    submit: APIRoute
    get: APIRoute
    webhook: APIRoute
    handle_submit: Handler
    handle_get: Callable[[Request, str, float | None], Awaitable[Response]]
    handle_webhook: Handler
    max_wait: float


class PayoutRouter(APIRouter):
    """An ``APIRouter`` that also carries its :class:`HotPaths`."""

    hot_paths: HotPaths | None = None


def build_router(
    settings: ServiceSettings, metrics: Metrics, get_client: GetClient
) -> PayoutRouter:
    """The routes at the paths and with the limits of ``settings`` (``route_prefix`` is left to
    whoever includes the router); ``get_client()`` is the running client or raises
    :class:`~resilient_payout.ClientNotRunning`; the metrics route renders ``metrics``."""
    router = PayoutRouter(route_class=ProblemRoute)
    client_dep = Depends(client_dependency(get_client))
    gate = AdmissionGate(settings.max_inflight_submits, max_lag=settings.max_loop_lag)
    metrics.registry.register(_GateCollector(gate))
    submit = _add_submit(router, settings, get_client, gate)
    get = _add_get(router, settings, get_client)
    webhook = _add_webhook(router, settings, get_client)
    router.hot_paths = HotPaths(
        submit=submit[0],
        get=get[0],
        webhook=webhook[0],
        handle_submit=submit[1],
        handle_get=get[1],
        handle_webhook=webhook[1],
        max_wait=settings.max_wait,
    )
    if settings.health_path:
        _add_health(router, settings.health_path, client_dep)
    if settings.ready_path:
        _add_ready(router, settings.ready_path, get_client)
    if settings.metrics_path:
        _add_metrics(router, settings.metrics_path, metrics)
    return router


def _format_seconds(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") or "0"


def _check_policy(body: PayoutRequest, settings: ServiceSettings) -> None:
    """The id format and unknown-fields policies (the model already enforces ``token``)."""
    if settings.id_format == "uuid" and not _UUID_ID.fullmatch(body.id):
        raise InvalidRequest("id: must be a lowercase canonical UUID (RP_ID_FORMAT=uuid)")
    if settings.extra_fields == "forbid" and body.model_extra:
        # Only a count: field names are input too, and input is never echoed.
        raise InvalidRequest(
            f"{len(body.model_extra)} unknown field(s); only 'id' is accepted "
            "(RP_EXTRA_FIELDS=forbid)"
        )


class _GateCollector(Collector):
    """The submit gate's figures, read at scrape time."""

    def __init__(self, gate: AdmissionGate) -> None:
        self.gate = gate

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily(
            "resilient_payout_submits_in_flight",
            "POST /transaction requests being handled now (RP_MAX_INFLIGHT_SUBMITS bounds it)",
        )
        in_flight.add_metric([], float(self.gate.in_flight))
        peak = GaugeMetricFamily(
            "resilient_payout_submits_in_flight_peak",
            "The most POST /transaction requests handled at once since the start",
        )
        peak.add_metric([], float(self.gate.peak))
        shed = CounterMetricFamily(
            "resilient_payout_submits_shed",
            "POST /transaction requests refused with 503 overloaded (nothing written), by the "
            "bound that refused them",
            labels=["bound"],
        )
        gate = self.gate
        shed.add_metric(["in_flight"], float(gate.shed - gate.shed_lag))
        shed.add_metric(["loop_lag"], float(gate.shed_lag))
        return (in_flight, peak, shed)


def _running_client(get_client: GetClient) -> PayoutClient | None:
    try:
        return get_client()
    except ClientNotRunning:
        return None


_JSON: Final = "application/json"
_to_json: Final = TransactionStatus.__pydantic_serializer__.to_json


def _answer(status: TransactionStatus) -> Response:
    """``status`` as FastAPI would render it for ``response_model=TransactionStatus,
    response_model_exclude_none=True``, byte for byte, without validating it once more."""
    return Response(_to_json(status, exclude_none=True), media_type=_JSON)


def _added_route(router: APIRouter) -> APIRoute:
    route = router.routes[-1]
    assert isinstance(route, APIRoute)
    return route


def _add_submit(
    router: APIRouter, settings: ServiceSettings, get_client: GetClient, gate: AdmissionGate
) -> tuple[APIRoute, Handler]:
    max_wait = settings.max_wait
    limit = settings.max_transaction_body

    async def handle(request: Request) -> Response:
        # The body is read here, not by a dependency, so that a refusal comes before it: a shed
        # or draining answer costs no read, no parse and no storage call. Replays are shed too:
        # telling one from a new submit takes the body and a read, the very work refused here,
        # and a shed replay retried later gets its answer as before.
        with gate.admit():
            running = _running_client(get_client)
            if running is not None and running.draining:
                raise ShuttingDown("this instance is shutting down; retry (another takes it)")
            body = parse_transaction(
                await read_capped(request, limit), request.headers.get("content-type")
            )
            _check_policy(body, settings)
            # After the body: a bad body is a 4xx even while the client is not running.
            client = get_client()
            payout = (await client.submit(body)).payout
        # Out of the gate: a client waiting for its outcome holds no slot.
        wait = prefer_wait(request.headers.getlist("prefer"))
        applied: float | None = None
        if wait is not None:
            applied = min(wait, max_wait)
            if not payout.is_final and applied > 0:
                payout = await client.wait_final(payout.id, applied)
        response = _answer(view(payout))
        if applied is not None:
            # After the content headers, where FastAPI put a header set on the response param.
            value = f"wait={_format_seconds(applied)}".encode("latin-1")
            response.headers.raw.append((b"preference-applied", value))
        return response

    @router.post(
        settings.transaction_path,
        response_model=TransactionStatus,
        response_model_exclude_none=True,
        operation_id="submitTransaction",
        summary="Submit a transfer (idempotent on its id)",
        responses={
            200: {
                "description": "The payout as it stands (a repeat gets the same transaction)",
                "headers": {
                    "Preference-Applied": {
                        "description": "`wait=N` when a `Prefer: wait` was honoured",
                        "schema": {"type": "string"},
                    }
                },
            },
            **problem_docs(400, 409, 413, 422, 500, 503),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PayoutRequest.model_json_schema()}},
            }
        },
    )
    async def submit_transaction(
        request: Request,
        prefer: str | None = Header(
            default=None,
            alias="Prefer",
            description=(
                "RFC 7240 `wait=N`: hold the answer up to N seconds (capped at "
                f"{_format_seconds(max_wait)}) for a final status. Without it the answer never "
                "waits on the partner."
            ),
            examples=["wait=5"],
        ),
    ) -> Response:
        del prefer  # declared for the OpenAPI document; every Prefer header is read instead
        return await handle(request)

    return _added_route(router), handle


def _add_get(
    router: APIRouter, settings: ServiceSettings, get_client: GetClient
) -> tuple[APIRoute, Callable[[Request, str, float | None], Awaitable[Response]]]:
    expose = settings.expose_partner_ref

    async def handle(request: Request, payout_id: str, wait: float | None) -> Response:
        # Not a dependency: FastAPI runs those before it validates `wait`, and a bad `wait` must
        # stay a 422 while the client is not running.
        client = get_client()
        if wait:
            return _answer(view(await client.wait_final(payout_id, wait), partner_ref=expose))
        return _answer(view(await client.get(payout_id), partner_ref=expose))

    @router.get(
        settings.transaction_path + "/{payout_id}",
        response_model=TransactionStatus,
        response_model_exclude_none=True,
        operation_id="getTransaction",
        summary="A payout's status, optionally waiting for a final one",
        responses={
            200: {"description": "The payout as it stands"},
            **problem_docs(404, 422, 500, 503),
        },
    )
    async def get_transaction(
        request: Request,
        payout_id: str = Path(description="the app's id of the transfer"),
        wait: float | None = Query(
            default=None,
            ge=0,
            le=settings.max_wait,
            allow_inf_nan=False,
            description="Seconds to wait for a final status (long poll); answers at once if final",
        ),
    ) -> Response:
        return await handle(request, payout_id, wait)

    return _added_route(router), handle


def _add_webhook(
    router: APIRouter, settings: ServiceSettings, get_client: GetClient
) -> tuple[APIRoute, Handler]:
    limit = settings.max_webhook_body

    async def handle(request: Request) -> Response:
        # Before the client: an oversized body is a 413 even while the client is not running.
        body = await read_capped(request, limit)
        client = get_client()
        try:
            # The client checks authenticity first, over the raw bytes and the headers, and
            # counts rejections: an unsigned sender learns nothing about the body it sent.
            payout = await client.handle_webhook(body, request.headers)
        except InvalidWebhook as exc:
            if isinstance(exc.__cause__, ValueError):  # parse_webhook: not JSON at all
                raise ProblemRaised(
                    400, "malformed-json", "Malformed JSON", "the webhook body is not valid JSON"
                ) from None
            raise
        return _answer(view(payout))

    @router.post(
        settings.webhook_path,
        response_model=TransactionStatus,
        response_model_exclude_none=True,
        operation_id="partnerWebhook",
        summary="The partner's webhook `{id, status}`",
        responses={
            200: {"description": "Applied (or a no-op repeat); the payout as the app sees it"},
            **problem_docs(400, 401, 404, 409, 413, 422, 500, 503),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PartnerWebhook.model_json_schema()}},
            }
        },
    )
    async def partner_webhook(request: Request) -> Response:
        # No dependencies: the body and the client are taken in `handle`, in that order.
        return await handle(request)

    return _added_route(router), handle


def _add_health(router: APIRouter, path: str, client_dep: Any) -> None:
    @router.get(
        path,
        response_model=Health,
        operation_id="healthz",
        summary="Liveness: the payout client is running",
        responses={200: {"description": "Running"}, **problem_docs(503)},
        dependencies=[client_dep],
    )
    async def healthz() -> Health:
        return Health()


def _add_ready(router: APIRouter, path: str, get_client: GetClient) -> None:
    @router.get(
        path,
        response_model=Readiness,
        operation_id="readyz",
        summary="Readiness: the payout client runs and its storage answers",
        responses={200: {"description": "Ready"}, **problem_docs(503)},
    )
    async def readyz() -> Readiness:
        try:
            client = get_client()
        except ClientNotRunning as exc:
            raise _not_ready(str(exc)) from None
        if client.draining:
            # Before the client stops: the load balancer moves away while requests still work.
            raise _not_ready("the payout client is draining (shutting down)")
        try:
            with anyio.fail_after(READY_TIMEOUT):
                await client.storage.get(_PROBE_ID)
        except TimeoutError:
            raise _not_ready(f"storage did not answer within {READY_TIMEOUT:g} s") from None
        except StorageError as exc:
            raise _not_ready(f"storage does not answer: {exc}") from None
        return Readiness()


def _not_ready(detail: str) -> ProblemRaised:
    return ProblemRaised(503, "not-ready", "Not ready", detail)


def _add_metrics(router: APIRouter, path: str, metrics: Metrics) -> None:
    @router.get(
        path,
        response_class=Response,
        operation_id="metrics",
        summary="Prometheus metrics",
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            },
            **problem_docs(500),
        },
    )
    async def scrape() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)
