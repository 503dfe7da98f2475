"""Every 4xx/5xx answer as RFC 9457 ``application/problem+json``: the exception handlers, the
library's errors mapped to statuses and slugs, and how the OpenAPI document shows them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._admission import retry_after_header
from .._errors import (
    ClientNotRunning,
    ConcurrencyError,
    IdempotencyConflict,
    InvalidRequest,
    InvalidWebhook,
    Overloaded,
    PayoutAlreadyFinal,
    PayoutError,
    ShuttingDown,
    StorageError,
    StorageUnavailable,
    UnknownPayout,
    WebhookRejected,
)
from ..webhooks import RejectReason, WebhookAuthError
from .schemas import PROBLEM_TYPE_PREFIX, Problem, ProblemFieldError

__all__ = [
    "ProblemRaised",
    "add_problem_handlers",
    "problem_docs",
    "problem_for",
    "problem_response",
    "use_problem_json",
]

# Named as before the package split: logging configs refer to it.
log = logging.getLogger("resilient_payout.fastapi")


class ProblemRaised(Exception):
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
    (PayoutAlreadyFinal, 409, "payout-already-final", "Payout already final"),
    (InvalidWebhook, 422, "invalid-webhook", "Invalid webhook"),
    (WebhookRejected, 401, "webhook-rejected", "Webhook rejected"),
    (StorageUnavailable, 503, "storage-unavailable", "Storage unavailable"),
    (ConcurrencyError, 503, "busy", "Too much contention"),
    (StorageError, 503, "storage-error", "Storage error"),
    (Overloaded, 503, "overloaded", "Overloaded"),
    (ShuttingDown, 503, "shutting-down", "Shutting down"),
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
    503: (
        "Storage unavailable, service not running, shutting down or overloaded (see `Retry-After`)"
    ),
}

_WEBHOOK_CHALLENGE: Final = 'Signature realm="webhook", scheme="standard-webhooks-v1"'
"""RFC 9110 wants a challenge with every 401; this names the scheme the partner must use."""

_RETRY_AFTER: Final = "1"
_RETRY_AFTER_DOC: Final = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}


_PROBLEM_CONTENT: Final = {
    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
}


def problem_docs(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of these error statuses.

    ``model`` registers the ``Problem`` schema (FastAPI then also lists it as
    ``application/json``, which :func:`use_problem_json` folds away in our own app); the
    explicit ``application/problem+json`` entry documents it in any host app too.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {
            "model": Problem,
            "description": _DESCRIPTIONS[code],
            "content": dict(_PROBLEM_CONTENT),
        }
        if code == 503:
            out[code]["headers"] = _RETRY_AFTER_DOC
    return out


def problem_response(
    request: Request,
    status: int,
    *,
    slug: str | None,
    title: str | None,
    detail: str,
    headers: Mapping[str, str] | None = None,
    errors: list[ProblemFieldError] | None = None,
) -> JSONResponse:
    """The answer: ``slug`` None is a plain HTTP error (``about:blank``, the status phrase)."""
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
        return problem_response(
            request, 409, slug="webhook-replayed", title="Webhook replayed", detail=str(exc)
        )
    if isinstance(exc, WebhookRejected):
        return problem_response(
            request,
            401,
            slug="webhook-rejected",
            title="Webhook rejected",
            detail=str(exc),
            headers={"WWW-Authenticate": _WEBHOOK_CHALLENGE},
        )
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded | ShuttingDown):
        # Their own hint: a drain or a burst lasts about as long as they say.
        headers["Retry-After"] = retry_after_header(exc.retry_after)
    for cls, status, slug, title in _ERRORS:
        if isinstance(exc, cls):
            return problem_response(
                request, status, slug=slug, title=title, detail=str(exc), headers=headers
            )
    log.error("unmapped %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return problem_response(request, 500, slug=None, title=None, detail="internal error")


async def _on_raised(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemRaised)
    return problem_response(request, exc.status, slug=exc.slug, title=exc.title, detail=exc.detail)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if exc.detail and exc.detail != phrase else ""
    if not detail:
        detail = f"{request.method} {request.url.path}: {phrase.lower()}"
    return problem_response(
        request, exc.status_code, slug=None, title=None, detail=detail, headers=exc.headers
    )


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return problem_response(
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
    return problem_response(
        request, 422, slug="invalid-request", title="Invalid request", detail=detail, errors=fields
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return problem_response(request, 500, slug=None, title=None, detail="internal error")


async def problem_for(request: Request, exc: Exception) -> Response | None:
    """The problem answer to one of our errors, a route problem, an HTTP or validation error;
    None for anything else (a bug: the host app's own error handling must see it)."""
    if isinstance(exc, PayoutError):
        return await _on_payout_error(request, exc)
    if isinstance(exc, ProblemRaised):
        return await _on_raised(request, exc)
    if isinstance(exc, StarletteHTTPException):
        return await _on_http_error(request, exc)
    if isinstance(exc, RequestValidationError):
        return await _on_validation_error(request, exc)
    return None


def add_problem_handlers(app: FastAPI) -> None:
    """Answer library errors, route problems, HTTP errors, validation errors and bugs alike."""
    app.add_exception_handler(PayoutError, _on_payout_error)
    app.add_exception_handler(ProblemRaised, _on_raised)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected)


def use_problem_json(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` (an OpenAPI document), edited in place: error answers are problem+json."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if code[:1] in ("4", "5") and "application/json" in content:
                    content["application/problem+json"] = content.pop("application/json")
    return schema
