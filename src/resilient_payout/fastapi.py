"""The mobile app contract as a FastAPI app over a :class:`~resilient_payout.PayoutClient`.

Needs the ``[server]`` extra (fastapi, uvicorn, prometheus-client)::

    from resilient_payout.fastapi import ServiceSettings, create_app

    app = create_app(ServiceSettings.from_env())  # then: uvicorn module:app --port 3200

The web layer knows HTTP, not payout rules: every route is a thin call into the client.

=============================  ====================================================================
route                          what it does
=============================  ====================================================================
``POST /transaction``          submit ``{"id", ...}``; answers at once ``{"id", "status"}``;
                               ``Prefer: wait=N`` holds the answer up to N s for a final status
``GET /transaction/{id}``      the payout's app-facing status; ``?wait=N`` long-polls
``POST /webhook``              the partner's webhook (never creates a payout)
``GET /healthz``               ``{"status": "ok"}``, 503 while the client is not running
``GET /metrics``               Prometheus text format
=============================  ====================================================================

The app sees ``pending`` for every non-final status, else ``completed``, ``declined`` or
``failed``. Every 4xx/5xx answer is ``application/problem+json`` (RFC 9457).

Settings come from :meth:`ServiceSettings.from_env` (an unset or empty variable means the
default; an invalid value raises :class:`ValueError` naming the variable):

==================  ==========================  =================================================
variable            default                     meaning
==================  ==========================  =================================================
``RP_PARTNER_URL``  ``http://127.0.0.1:3000``   the partner's base URL
``RP_PUBLIC_URL``   ``http://127.0.0.1:3200``   our base URL as the partner reaches it;
                                                webhooks go to ``{public}/webhook``
``RP_CLIENT_URL``   ``http://127.0.0.1:3100``   the app's backend: ``PUT {client}/transaction``
``RP_PUSH_BODY``    ``flat``                    push body: ``flat`` ``{"id", "status"}`` or
                                                ``nested`` ``{"status": {"id", "status"}}``
``RP_STORAGE_URL``  ``sqlite:///payouts.db``    :func:`~resilient_payout.storage_from_url`
``RP_CHECK_RATE``   ``2.0``                     status checks per (scenario) second
``RP_CHECK_BURST``  ``2``                       status checks that may go out back to back
``RP_BUDGET_URL``   empty                       empty: a check budget per process
                                                (``LocalCheckBudget``); ``redis://...``: one
                                                ``RedisCheckBudget`` shared by every instance
                                                using the same Redis and key
``RP_BUDGET_KEY``   ``rp:budget``               the shared budget's Redis key
``RP_TIME_SCALE``   ``1.0``                     ``Policy().scaled(x)``: multiplies every
                                                duration, divides the check rate
``RP_HOST``         ``127.0.0.1``               address ``serve`` listens on
``RP_PORT``         ``3200``                    port ``serve`` listens on
``RP_MAX_WAIT``     ``30``                      cap of ``Prefer: wait`` and ``?wait=``, in real
                                                seconds (not scaled)
==================  ==========================  =================================================

Security settings (docs/security.md):

===============================  ==========  ==================================================
variable                         default     meaning
===============================  ==========  ==================================================
``RP_WEBHOOK_SECRETS``           empty       comma-separated Standard Webhooks secrets; set:
                                             webhooks must be signed by one of them
``RP_ALLOW_UNSIGNED_WEBHOOKS``   ``false``   with no secret: ``true`` accepts unsigned
                                             webhooks, ``false`` answers every webhook 401
                                             (payouts then settle by status checks)
``RP_WEBHOOK_TOLERANCE``         ``300``     seconds a webhook timestamp may be off, both ways
``RP_MAX_TRANSACTION_BODY``      ``16384``   bytes; a larger ``POST /transaction`` is a 413
``RP_MAX_WEBHOOK_BODY``          ``65536``   bytes; a larger ``POST /webhook`` is a 413
``RP_ID_FORMAT``                 ``token``   ``token``: 1-128 of ``[A-Za-z0-9._:-]``, starting
                                             alphanumeric; ``uuid``: a lowercase canonical UUID
``RP_EXTRA_FIELDS``              ``allow``   ``allow``: fields besides ``id`` are kept and part
                                             of the fingerprint; ``forbid``: they are a 422
===============================  ==========  ==================================================
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from decimal import Decimal
from http import HTTPStatus
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._client import PayoutClient
from ._errors import (
    ClientNotRunning,
    ConcurrencyError,
    IdempotencyConflict,
    InvalidRequest,
    InvalidWebhook,
    PayoutError,
    StorageError,
    StorageUnavailable,
    UnknownPayout,
    WebhookRejected,
)
from ._model import Payout, PayoutRequest, PayoutStatus
from ._policy import Policy
from ._urls import redact_url as _redact
from ._version import __version__
from .notify import HttpNotifier
from .partner import HttpPartner
from .storage import storage_from_url
from .webhooks import (
    RejectReason,
    StandardWebhookVerifier,
    UnsignedWebhooks,
    WebhookAuthError,
    WebhookVerifier,
)

__all__ = [
    "ENV_VARS",
    "PROBLEM_TYPE_PREFIX",
    "ClientFactory",
    "Health",
    "Problem",
    "ProblemFieldError",
    "ServiceSettings",
    "TransactionStatus",
    "create_app",
    "open_client",
]

log = logging.getLogger("resilient_payout.fastapi")

ENV_VARS: Final[Mapping[str, str]] = {
    "RP_PARTNER_URL": "partner_url",
    "RP_PUBLIC_URL": "public_url",
    "RP_CLIENT_URL": "client_url",
    "RP_PUSH_BODY": "push_body",
    "RP_STORAGE_URL": "storage_url",
    "RP_CHECK_RATE": "check_rate",
    "RP_CHECK_BURST": "check_burst",
    "RP_BUDGET_URL": "budget_url",
    "RP_BUDGET_KEY": "budget_key",
    "RP_TIME_SCALE": "time_scale",
    "RP_HOST": "host",
    "RP_PORT": "port",
    "RP_MAX_WAIT": "max_wait",
    "RP_WEBHOOK_SECRETS": "webhook_secrets",
    "RP_ALLOW_UNSIGNED_WEBHOOKS": "allow_unsigned_webhooks",
    "RP_WEBHOOK_TOLERANCE": "webhook_tolerance",
    "RP_MAX_TRANSACTION_BODY": "max_transaction_body",
    "RP_MAX_WEBHOOK_BODY": "max_webhook_body",
    "RP_ID_FORMAT": "id_format",
    "RP_EXTRA_FIELDS": "extra_fields",
}
"""Environment variable -> :class:`ServiceSettings` field."""

PROBLEM_TYPE_PREFIX: Final = "tag:resilient-payout,2025:problem:"
"""Our problem types are ``PROBLEM_TYPE_PREFIX + slug`` (tag URIs: names, not web pages)."""

_SECRET_FIELDS: Final = frozenset({"storage_url", "budget_url", "webhook_secrets"})
"""Never echoed in error messages or logs (a database URL may carry a password)."""
_MAX_WEBHOOK_BODY: Final = 64 * 1024
"""The most :func:`~resilient_payout.webhooks.parse_webhook` reads; caps ``max_webhook_body``."""
_UUID_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RETRY_AFTER: Final = "1"
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip

AppStatus = Literal["pending", "completed", "declined", "failed"]
_APP_STATUS: Final[Mapping[PayoutStatus, AppStatus]] = {
    PayoutStatus.RECEIVED: "pending",
    PayoutStatus.SUBMITTING: "pending",
    PayoutStatus.AWAITING: "pending",
    PayoutStatus.UNKNOWN: "pending",
    PayoutStatus.COMPLETED: "completed",
    PayoutStatus.DECLINED: "declined",
    PayoutStatus.FAILED: "failed",
}


# -- settings ------------------------------------------------------------------------------------


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host, like http://127.0.0.1:3000")
    if parts.query or parts.fragment:
        raise ValueError("must be a base URL, without a query or fragment")
    _ = parts.port  # raises ValueError for a port out of range
    return value.rstrip("/")


class ServiceSettings(BaseModel):
    """Everything the example service needs; see the module docstring for the variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partner_url: str = "http://127.0.0.1:3000"
    public_url: str = "http://127.0.0.1:3200"
    client_url: str = "http://127.0.0.1:3100"
    push_body: Literal["flat", "nested"] = "flat"
    storage_url: str = "sqlite:///payouts.db"
    check_rate: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    check_burst: int = Field(default=2, ge=1)
    budget_url: str = ""
    budget_key: str = Field(default="rp:budget", min_length=1)
    time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=3200, ge=0, le=65_535)
    max_wait: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    webhook_secrets: tuple[SecretStr, ...] = ()
    allow_unsigned_webhooks: bool = False
    webhook_tolerance: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    max_transaction_body: int = Field(default=16 * 1024, ge=64, le=1024 * 1024)
    max_webhook_body: int = Field(default=_MAX_WEBHOOK_BODY, ge=64, le=_MAX_WEBHOOK_BODY)
    id_format: Literal["token", "uuid"] = "token"
    extra_fields: Literal["allow", "forbid"] = "allow"

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: Any) -> Any:
        # RP_WEBHOOK_SECRETS is comma-separated: "new,old" while rotating.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _check_secrets(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # Built once to fail at startup; the message never contains the secret.
        if value:
            StandardWebhookVerifier([s.get_secret_value() for s in value])
        return value

    @field_validator("partner_url", "public_url", "client_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _base_url(value)

    @field_validator("storage_url")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        # Builds the (unopened) backend only to reject a bad URL at startup, not at first use.
        try:
            storage_from_url(value)
        except ValueError as exc:
            raise ValueError(str(exc).replace(value, _redact(value))) from None
        return value

    @field_validator("budget_url")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be empty or a Redis URL (redis://, rediss://, unix://)")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Settings from ``RP_*`` variables (``os.environ`` by default); ValueError if invalid."""
        env = os.environ if environ is None else environ
        data = {
            name: env[var].strip() for var, name in ENV_VARS.items() if env.get(var, "").strip()
        }
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(_explain(exc, data)) from None

    def replace(self, **changes: Any) -> ServiceSettings:
        """A validated copy with some fields changed (e.g. ``host``/``port`` from CLI flags)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def webhook_url(self) -> str:
        """Where the partner POSTs webhooks: ``{public_url}/webhook``."""
        return f"{self.public_url}/webhook"

    @property
    def push_url(self) -> str:
        """Where outcomes are pushed: ``PUT {client_url}/transaction``."""
        return f"{self.client_url}/transaction"

    def policy(self) -> Policy:
        """The policy: defaults with this check budget, scaled by ``time_scale``."""
        base = Policy(check_rate=self.check_rate, check_burst=self.check_burst)
        return base if self.time_scale == 1 else base.scaled(self.time_scale)

    def webhook_verifier(self) -> WebhookVerifier:
        """A :class:`StandardWebhookVerifier` with the secrets; with none, unsigned webhooks are
        accepted only if ``allow_unsigned_webhooks``, else every webhook is rejected (401)."""
        if self.webhook_secrets:
            return StandardWebhookVerifier(
                [s.get_secret_value() for s in self.webhook_secrets],
                tolerance=self.webhook_tolerance,
            )
        return UnsignedWebhooks() if self.allow_unsigned_webhooks else _NoWebhookSecret()


class _NoWebhookSecret:
    """Fail closed: no secret and unsigned webhooks not allowed."""

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        raise WebhookAuthError(
            RejectReason.NOT_CONFIGURED,
            "no webhook secret is configured and unsigned webhooks are not allowed",
        )


def _explain(exc: ValidationError, data: Mapping[str, str]) -> str:
    by_field = {name: var for var, name in ENV_VARS.items()}
    lines = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else ""
        var = by_field.get(name, name or "settings")
        shown = "" if name in _SECRET_FIELDS or name not in data else f"={data[name][:80]!r}"
        lines.append(f"  {var}{shown}: {str(err['msg']).removeprefix('Value error, ')}")
    return "invalid service settings:\n" + "\n".join(lines)


# -- wiring --------------------------------------------------------------------------------------

ClientFactory = Callable[[ServiceSettings], AbstractAsyncContextManager[PayoutClient]]
"""Builds the running client for an app; a bare ``PayoutClient`` (itself an async context
manager) will do, e.g. ``lambda s: PayoutClient(storage=MemoryStorage(), ...)``."""


def _budget(settings: ServiceSettings, policy: Policy) -> AbstractAsyncContextManager[Any]:
    """The shared Redis check budget (closed on exit), or None for the client's local one."""
    if not settings.budget_url:
        return nullcontext(None)
    from .storage.redis import RedisCheckBudget

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


# -- HTTP models ---------------------------------------------------------------------------------


class TransactionStatus(BaseModel):
    """A payout as the app sees it."""

    id: str
    status: AppStatus = Field(description="`pending` until final")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ProblemFieldError(BaseModel):
    """One validation error (the offending input is never echoed)."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem details object (``application/problem+json``)."""

    type: str = Field(
        default="about:blank",
        description=f"`about:blank` for plain HTTP errors, else `{PROBLEM_TYPE_PREFIX}<slug>`",
    )
    title: str
    status: int
    detail: str
    instance: str = Field(description="the request path")
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="validation errors (422 only)"
    )


class _PartnerWebhook(BaseModel):
    id: str
    status: Literal["pending", "completed", "declined"]


class _ProblemRaised(Exception):
    """An HTTP problem raised by a route (not a library error)."""

    def __init__(self, status: int, slug: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail


# (exception, status, slug, title); the first match in order wins, so subclasses come first.
_ERRORS: Final[tuple[tuple[type[PayoutError], int, str, str], ...]] = (
    (InvalidRequest, 422, "invalid-request", "Invalid request"),
    (IdempotencyConflict, 409, "idempotency-conflict", "Same id, different request"),
    (UnknownPayout, 404, "unknown-payout", "Unknown payout"),
    (InvalidWebhook, 422, "invalid-webhook", "Invalid webhook"),
    (WebhookRejected, 401, "webhook-rejected", "Webhook rejected"),
    (StorageUnavailable, 503, "storage-unavailable", "Storage unavailable"),
    (ConcurrencyError, 503, "busy", "Too much contention"),
    (StorageError, 503, "storage-error", "Storage error"),
    (ClientNotRunning, 503, "not-running", "Service not running"),
)

_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "Malformed JSON",
    401: "Webhook rejected: missing, malformed or forged signature, or stale timestamp",
    404: "Unknown payout",
    409: "The id is known with a different request (a webhook: its id was already received)",
    413: "Body too large",
    422: "Invalid request",
    500: "Internal error",
    503: "Storage unavailable or service not running (see `Retry-After`)",
}

_WEBHOOK_CHALLENGE: Final = 'Signature realm="webhook", scheme="standard-webhooks-v1"'
"""RFC 9110 wants a challenge with every 401; this names the scheme the partner must use."""

_RETRY_AFTER_DOC: Final = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": Problem, "description": _DESCRIPTIONS[code]}
        if code == 503:
            out[code]["headers"] = _RETRY_AFTER_DOC
    return out


def _problem_response(
    request: Request,
    status: int,
    *,
    slug: str | None,
    title: str | None,
    detail: str,
    headers: Mapping[str, str] | None = None,
    errors: list[ProblemFieldError] | None = None,
) -> JSONResponse:
    problem = Problem(
        type=PROBLEM_TYPE_PREFIX + slug if slug else "about:blank",
        title=title if slug and title else HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path,
        errors=errors,
    )
    hdrs = dict(headers or {})
    if status == 503:
        hdrs.setdefault("Retry-After", _RETRY_AFTER)
    level = logging.ERROR if status >= 500 and status != 503 else logging.INFO
    log.log(level, "%s %s -> %d %s", request.method, request.url.path, status, problem.type)
    return JSONResponse(
        problem.model_dump(exclude_none=True),
        status_code=status,
        headers=hdrs,
        media_type="application/problem+json",
    )


async def _on_payout_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, WebhookAuthError) and exc.reason is RejectReason.REPLAYED:
        # Not 401: the signature was valid; the message itself was already accepted once.
        return _problem_response(
            request, 409, slug="webhook-replayed", title="Webhook replayed", detail=str(exc)
        )
    if isinstance(exc, WebhookRejected):
        return _problem_response(
            request,
            401,
            slug="webhook-rejected",
            title="Webhook rejected",
            detail=str(exc),
            headers={"WWW-Authenticate": _WEBHOOK_CHALLENGE},
        )
    for cls, status, slug, title in _ERRORS:
        if isinstance(exc, cls):
            return _problem_response(request, status, slug=slug, title=title, detail=str(exc))
    log.error("unmapped %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return _problem_response(request, 500, slug=None, title=None, detail="internal error")


async def _on_raised(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _ProblemRaised)
    return _problem_response(request, exc.status, slug=exc.slug, title=exc.title, detail=exc.detail)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if exc.detail and exc.detail != phrase else ""
    if not detail:
        detail = f"{request.method} {request.url.path}: {phrase.lower()}"
    return _problem_response(
        request, exc.status_code, slug=None, title=None, detail=detail, headers=exc.headers
    )


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return _problem_response(
            request,
            400,
            slug="malformed-json",
            title="Malformed JSON",
            detail="the request body is not valid JSON",
        )
    # Only where and why, never the input: request bodies must not be echoed.
    fields = [
        ProblemFieldError(
            loc=[x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
            msg=str(e.get("msg", "")),
            type=str(e.get("type", "")),
        )
        for e in errors
    ]
    detail = "; ".join(f"{'.'.join(map(str, f.loc)) or 'request'}: {f.msg}" for f in fields)
    return _problem_response(
        request, 422, slug="invalid-request", title="Invalid request", detail=detail, errors=fields
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return _problem_response(request, 500, slug=None, title=None, detail="internal error")


# -- metrics -------------------------------------------------------------------------------------

_STATS_LABELS: Final[Mapping[str, str]] = {
    "answers": "outcome",
    "resolved": "cause",
    "webhooks_rejected": "reason",
}
_STATS_GAUGES: Final = frozenset({"checks_peak_per_second"})
"""Stats that are levels, not counts (anything else in ``ClientStats`` is a counter)."""
_STATS_HELP: Final[Mapping[str, str]] = {
    "submits": "New payouts accepted",
    "replays": "Repeated submits answered with the stored payout",
    "idempotency_conflicts": "Submits refused: same id, different request",
    "posts": "POSTs to the partner started",
    "answers": "Partner answers to POSTs, by outcome",
    "checks_sent": "Status checks sent to the partner",
    "checks_peak_per_second": "Most status checks sent within one second",
    "checks_rate_limited": "Status checks the partner answered with 429",
    "check_pauses": "Pauses of all status checks after a 429",
    "checks_skipped": "Status checks skipped because the payout was settled meanwhile",
    "webhooks": "Well-formed partner webhooks received",
    "webhooks_unknown": "Webhooks for an unknown id",
    "webhooks_rejected": "Webhooks that failed authenticity checks, by reason",
    "resolved": "Payouts that became final, by cause",
    "confirmed_absences": "Attempts confirmed absent at the partner after the window",
    "resubmissions": "Second attempts after confirmed absence",
    "recovered_orphans": "Submits orphaned by a crash, recovered as unknown",
    "conflicts": "Reports that disagreed with a final status (never applied)",
    "hook_errors": "on_conflict hooks that raised (logged; the client went on)",
    "sends_expired": "Attempts not sent because they went stale after the decision",
    "retry_after_capped": "Partner Retry-After values capped at max_retry_after",
    "notifications_delivered": "Outcomes acknowledged by the app",
    "notification_rounds_failed": "Push rounds that gave up (retried later)",
    "notifications_dead": "Outbox entries dead-lettered by this process after notify_max_rounds",
    "races_lost": "Compare-and-set races lost (re-read and decided again)",
    "work_errors": "Background work that failed (retried later)",
}


class _ClientCollector(Collector):
    """Client counters and payouts by status, read at scrape time."""

    def __init__(self) -> None:
        self.client: PayoutClient | None = None
        self.by_status: Mapping[PayoutStatus, int] | None = None
        self.dead_outbox: int | None = None

    def describe(self) -> Iterable[Metric]:
        return ()  # registering must not trigger a collect (the client may not exist yet)

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("resilient_payout_up", "1 while the payout client is running")
        up.add_metric([], 1.0 if self.client is not None else 0.0)
        yield up
        if self.client is None:
            return
        for name, value in self.client.stats.to_dict().items():
            help_text = _STATS_HELP.get(name, name.replace("_", " "))
            family: Metric
            if isinstance(value, dict):
                label = _STATS_LABELS.get(name, "key")
                family = CounterMetricFamily(f"resilient_payout_{name}", help_text, labels=[label])
                for key, count in sorted(value.items()):
                    family.add_metric([str(key)], float(count))
            elif isinstance(value, int | float):
                cls = GaugeMetricFamily if name in _STATS_GAUGES else CounterMetricFamily
                family = cls(f"resilient_payout_{name}", help_text)
                family.add_metric([], float(value))
            else:
                continue
            yield family
        if self.by_status is not None:
            payouts = GaugeMetricFamily(
                "resilient_payout_payouts", "Stored payouts by status", labels=["status"]
            )
            for status in PayoutStatus:
                payouts.add_metric([status.value], float(self.by_status.get(status, 0)))
            yield payouts
        if self.dead_outbox is not None:
            dead = GaugeMetricFamily(
                "resilient_payout_outbox_dead",
                "Outbox entries dead-lettered (pushes given up; an operator must re-queue them)",
            )
            dead.add_metric([], float(self.dead_outbox))
            yield dead


class _RequestMetrics:
    """Pure ASGI middleware: request counts and latency by route template (bounded labels)."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = anyio.current_time()
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            # The router stores the matched route in the scope; its template keeps labels few.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(anyio.current_time() - started)


# -- the app -------------------------------------------------------------------------------------


def _prefer_wait(values: list[str]) -> float | None:
    """The ``wait`` preference (RFC 7240) in seconds, or None; malformed ones are ignored."""
    for header in values:
        for pref in header.split(","):
            token, _, value = pref.split(";", 1)[0].partition("=")
            if token.strip().lower() != "wait":
                continue
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None
            return seconds if math.isfinite(seconds) and seconds >= 0 else None
    return None


def _fmt_seconds(seconds: float) -> str:
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


class _NonFiniteConstant(Exception):
    """``NaN``, ``Infinity`` or ``-Infinity`` in a body: Python's json accepts them, we do not."""


def _refuse_constant(name: str) -> Any:
    raise _NonFiniteConstant(name)


def _loads_exact(raw: bytes, parse_constant: Callable[[str], Any]) -> Any:
    # Fractions and exponents become Decimals from their literal text, never binary floats; an
    # integer literal too long for int() (4300 digits) too, for the model to refuse as too large.
    return json.loads(
        raw,
        parse_float=Decimal,
        parse_int=lambda text: int(text) if len(text) <= 64 else Decimal(text),
        parse_constant=parse_constant,
    )


def _transaction_body(raw: bytes, content_type: str | None) -> PayoutRequest:
    """The ``POST /transaction`` body, parsed exactly and canonicalized by :class:`PayoutRequest`.

    Answers as FastAPI's own body parsing did: no body or a non-JSON media type is a 422, bad
    JSON a 400 ``malformed-json``; ``NaN``/``Infinity`` and numbers the model refuses are a 422.
    """
    if not raw:
        errors: list[dict[str, Any]] = [
            {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        ]
        raise RequestValidationError(errors)
    data: Any = raw  # not JSON: refused by validation (not a dictionary), as before
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media.startswith("application/") and media.endswith(("/json", "+json")):
        try:
            try:
                data = _loads_exact(raw, _refuse_constant)
            except _NonFiniteConstant:
                # Refused either way: parsed again with the constant as a Decimal NaN/Infinity,
                # which the model refuses, only so that the answer names the field.
                data = _loads_exact(raw, Decimal)
        except RecursionError:  # valid JSON, nested far deeper than the model would allow
            errors = [{"type": "too_deep", "loc": ("body",), "msg": "nested too deeply"}]
            raise RequestValidationError(errors) from None
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8/16/32
            raise _ProblemRaised(
                400, "malformed-json", "Malformed JSON", "the request body is not valid JSON"
            ) from None
    try:
        return PayoutRequest.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _view(payout: Payout) -> TransactionStatus:
    return TransactionStatus(id=payout.id, status=_APP_STATUS.get(payout.status, "pending"))


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _ProblemRaised(413, "body-too-large", "Body too large", f"over {limit} bytes")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise _ProblemRaised(413, "body-too-large", "Body too large", f"over {limit} bytes")
    return bytes(buf)


class _BodyLimit:
    """Pure ASGI middleware: a POST body over its route's limit is a 413 before any parsing.

    The body is read here (it is small by construction) and replayed to the app, so FastAPI's
    own parsing, which would turn a failed read into a 400, never sees an oversized one.
    """

    def __init__(self, app: ASGIApp, limits: Mapping[str, int]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        too_large = declared.isdigit() and int(declared) > limit
        chunks: list[bytes] = []
        size = 0
        more = not too_large
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                too_large = True
                break
            chunks.append(chunk)
            more = message.get("more_body", False)
        if too_large:
            request = Request(scope)
            response = _problem_response(
                request, 413, slug="body-too-large", title="Body too large",
                detail=f"the body is over {limit} bytes",
            )  # fmt: skip
            await response(scope, receive, send)
            return
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _ServiceApp(FastAPI):
    """FastAPI whose OpenAPI document gives error answers as ``application/problem+json``."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema:
            return self.openapi_schema
        schema = super().openapi()  # cached by FastAPI: edited in place once
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if code[:1] in ("4", "5") and "application/json" in content:
                        content["application/problem+json"] = content.pop("application/json")
        return schema


def create_app(
    settings: ServiceSettings | None = None, *, client_factory: ClientFactory | None = None
) -> FastAPI:
    """The service app. ``settings`` defaults to :meth:`ServiceSettings.from_env`.

    The lifespan enters ``client_factory(settings)`` (by default :func:`open_client`) and leaves
    it on shutdown; while it runs, the client is ``app.state.payout_client``. Each app has its own
    Prometheus registry (``app.state.metrics_registry``).
    """
    settings = ServiceSettings.from_env() if settings is None else settings
    factory = client_factory or open_client
    registry = CollectorRegistry(auto_describe=False)
    collector = _ClientCollector()
    registry.register(collector)
    requests = Counter(
        "resilient_payout_http_requests",
        "HTTP requests served, by method, route template and status",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "resilient_payout_http_request_duration_seconds",
        "HTTP request latency (long polls included), by method and route template",
        ["method", "route"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with factory(settings) as client:
            app.state.payout_client = collector.client = client
            if client.webhook_verifier is None or isinstance(
                client.webhook_verifier, UnsignedWebhooks
            ):
                log.warning("webhooks are accepted UNSIGNED: anyone reaching %s can settle "
                            "payouts; set RP_WEBHOOK_SECRETS", settings.webhook_url)  # fmt: skip
            elif isinstance(client.webhook_verifier, _NoWebhookSecret):
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
            try:
                yield
            finally:
                app.state.payout_client = collector.client = None

    app = _ServiceApp(
        title="resilient-payout service",
        version=__version__,
        description="The mobile app contract over a resilient_payout PayoutClient.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.payout_client = None
    app.state.metrics_registry = registry
    app.add_middleware(
        _BodyLimit,
        limits={
            "/transaction": settings.max_transaction_body,
            "/webhook": settings.max_webhook_body,
        },
    )
    app.add_middleware(_RequestMetrics, requests=requests, latency=latency)
    app.add_exception_handler(PayoutError, _on_payout_error)
    app.add_exception_handler(_ProblemRaised, _on_raised)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)

    def running_client() -> PayoutClient:
        if collector.client is None:
            raise ClientNotRunning("the payout client is not running")
        return collector.client

    max_wait = settings.max_wait

    @app.post(
        "/transaction",
        response_model=TransactionStatus,
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
            **_problems(400, 409, 413, 422, 500, 503),
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
        response: Response,
        prefer: str | None = Header(
            default=None,
            alias="Prefer",
            description=(
                "RFC 7240 `wait=N`: hold the answer up to N seconds (capped at "
                f"{_fmt_seconds(max_wait)}) for a final status. Without it the answer never "
                "waits on the partner."
            ),
            examples=["wait=5"],
        ),
    ) -> TransactionStatus:
        raw = await _read_capped(request, settings.max_transaction_body)
        body = _transaction_body(raw, request.headers.get("content-type"))
        client = running_client()
        _check_policy(body, settings)
        payout = (await client.submit(body)).payout
        wait = _prefer_wait(request.headers.getlist("prefer"))
        if wait is not None:
            applied = min(wait, max_wait)
            response.headers["Preference-Applied"] = f"wait={_fmt_seconds(applied)}"
            if not payout.is_final and applied > 0:
                payout = await client.wait_final(payout.id, applied)
        return _view(payout)

    @app.get(
        "/transaction/{payout_id}",
        response_model=TransactionStatus,
        operation_id="getTransaction",
        summary="A payout's status, optionally waiting for a final one",
        responses={
            200: {"description": "The payout as it stands"},
            **_problems(404, 422, 500, 503),
        },
    )
    async def get_transaction(
        payout_id: str = Path(description="the app's id of the transfer"),
        wait: float | None = Query(
            default=None,
            ge=0,
            le=max_wait,
            allow_inf_nan=False,
            description="Seconds to wait for a final status (long poll); answers at once if final",
        ),
    ) -> TransactionStatus:
        client = running_client()
        if wait:
            return _view(await client.wait_final(payout_id, wait))
        return _view(await client.get(payout_id))

    @app.post(
        "/webhook",
        response_model=TransactionStatus,
        operation_id="partnerWebhook",
        summary="The partner's webhook `{id, status}`",
        responses={
            200: {"description": "Applied (or a no-op repeat); the payout as the app sees it"},
            **_problems(400, 401, 404, 409, 413, 422, 500, 503),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _PartnerWebhook.model_json_schema()}},
            }
        },
    )
    async def partner_webhook(request: Request) -> TransactionStatus:
        client = running_client()
        body = await _read_capped(request, settings.max_webhook_body)
        try:
            # The client checks authenticity first, over the raw bytes and the headers, and
            # counts rejections: an unsigned sender learns nothing about the body it sent.
            payout = await client.handle_webhook(body, request.headers)
        except InvalidWebhook as exc:
            if isinstance(exc.__cause__, ValueError):  # parse_webhook: not JSON at all
                raise _ProblemRaised(
                    400, "malformed-json", "Malformed JSON", "the webhook body is not valid JSON"
                ) from None
            raise
        return _view(payout)

    @app.get(
        "/healthz",
        response_model=Health,
        operation_id="healthz",
        summary="Liveness: the payout client is running",
        responses={200: {"description": "Running"}, **_problems(503)},
    )
    async def healthz() -> Health:
        running_client()
        return Health()

    @app.get(
        "/metrics",
        response_class=Response,
        operation_id="metrics",
        summary="Prometheus metrics",
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            },
            **_problems(500),
        },
    )
    async def metrics() -> Response:
        client = collector.client
        by_status: Mapping[PayoutStatus, int] | None = None
        dead: int | None = None
        if client is not None:
            try:
                by_status = await client.storage.count_by_status()
                dead = await client.storage.count_dead_outbox()
            except StorageError as exc:
                log.warning("metrics: counting payouts failed: %s", exc)
        # No await between setting and rendering: concurrent scrapes cannot mix their counts.
        collector.by_status = by_status
        collector.dead_outbox = dead
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
