"""What routes take from a request: the running client (a dependency), size-capped bodies, the
exact ``POST /transaction`` body and the ``Prefer: wait`` preference.

Body limits live here, used by each route (the webhook's dependency; ``POST /transaction`` calls
:func:`read_capped` itself, after its overload and drain checks, so that a refusal reads no
body), not in a middleware matching paths: they hold wherever the router is included or
mounted, and no parser ever sees an oversized body (the routes declare no body FastAPI would
read itself)."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .._client import PayoutClient
from .._model import PayoutRequest
from .problems import ProblemRaised

__all__ = [
    "capped_body",
    "client_dependency",
    "parse_transaction",
    "prefer_wait",
    "read_capped",
    "transaction_body",
]


def client_dependency(
    get_client: Callable[[], PayoutClient],
) -> Callable[[], Awaitable[PayoutClient]]:
    """A dependency: ``get_client()``, which raises
    :class:`~resilient_payout.ClientNotRunning` (a 503) while the client is not running."""

    async def running_client() -> PayoutClient:  # async: FastAPI runs sync ones in a thread
        return get_client()

    return running_client


def capped_body(limit: int) -> Callable[[Request], Awaitable[bytes]]:
    """A dependency: the raw body, or a 413 once it is over ``limit`` bytes."""

    async def body(request: Request) -> bytes:
        return await read_capped(request, limit)

    return body


def transaction_body(limit: int) -> Callable[[Request], Awaitable[PayoutRequest]]:
    """A dependency: the ``POST /transaction`` body, capped at ``limit`` bytes and parsed."""

    async def body(request: Request) -> PayoutRequest:
        raw = await read_capped(request, limit)
        return parse_transaction(raw, request.headers.get("content-type"))

    return body


async def read_capped(request: Request, limit: int) -> bytes:
    """The body, or a 413 once it is over ``limit`` bytes (declared or streamed: reading stops
    at the first byte over, so an oversized body is never held in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise _too_large(limit)
    return bytes(buf)


def _too_large(limit: int) -> ProblemRaised:
    return ProblemRaised(413, "body-too-large", "Body too large", f"the body is over {limit} bytes")


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


def parse_transaction(raw: bytes, content_type: str | None) -> PayoutRequest:
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
            raise ProblemRaised(
                400, "malformed-json", "Malformed JSON", "the request body is not valid JSON"
            ) from None
    try:
        return PayoutRequest.model_validate(data)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def prefer_wait(values: list[str]) -> float | None:
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
