"""The mock partner's HTTP side: a small ASGI router, its handlers and JSON responses.

The handlers only translate HTTP: they reach the partner through its public methods plus
``_accept_post`` and ``_admit_check``, which the package keeps to itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import httpx

from ._plan import Answer

if TYPE_CHECKING:
    from ._state import Post
    from .config import MockPartnerConfig
    from .partner import MockPartner

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = b"application/json"


class ConnectionDropped(httpx.RemoteProtocolError):
    """Raised by the app to drop a connection after the response headers (``p_drop``).

    Under ``httpx.ASGITransport`` (default ``raise_app_exceptions=True``) it reaches the caller,
    which sees an ``httpx.RemoteProtocolError`` just as over a real socket. Under uvicorn the
    headers go out and the connection is closed, so the client also gets a
    ``RemoteProtocolError`` (incomplete body).
    """


async def route(partner: MockPartner, scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app: lifespan, the partner's two endpoints and the ``/_mock`` ones."""
    if scope["type"] == "lifespan":
        await _lifespan(partner, receive, send)
        return
    if scope["type"] != "http":
        return
    method: str = scope["method"]
    path: str = scope["path"]
    if path == "/transaction":
        if method != "POST":
            await _respond(send, 405, {"detail": "method not allowed"}, [(b"allow", b"POST")])
            return
        await _handle_post(partner, scope, receive, send)
    elif path.startswith("/transaction/") and "/" not in path[len("/transaction/") :]:
        if method != "GET":
            await _respond(send, 405, {"detail": "method not allowed"}, [(b"allow", b"GET")])
            return
        payout_id = path[len("/transaction/") :]
        await _handle_check(partner, scope, send, payout_id)
    elif path == "/_mock/stats" and method == "GET":
        await _respond(send, 200, partner.stats())
    elif path == "/_mock/truth" and method == "GET":
        await _respond(send, 200, partner.truth())
    elif path == "/_mock/reset" and method == "POST":
        await _handle_reset(partner, receive, send)
    else:
        await _respond(send, 404, {"detail": "not found"})


async def _lifespan(partner: MockPartner, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "lifespan.startup":
        return
    try:
        await partner.start()
    except Exception as exc:  # noqa: BLE001 - reported to the server, which then exits
        await send({"type": "lifespan.startup.failed", "message": repr(exc)})
        return
    try:
        await send({"type": "lifespan.startup.complete"})
        while (await receive())["type"] != "lifespan.shutdown":
            pass
    finally:
        await partner.stop()
    await send({"type": "lifespan.shutdown.complete"})


async def _handle_post(partner: MockPartner, scope: Scope, receive: Receive, send: Send) -> None:
    body = await _read_body(receive)
    if body is None:
        return
    try:
        data = json.loads(body)
    except ValueError:
        await _respond(send, 400, {"detail": "malformed JSON"})
        return
    problem = _validate_post(data)
    if problem is not None:
        await _respond(send, 422, {"detail": problem})
        return
    if not partner.running:
        await _respond(send, 503, {"detail": "mock partner is not running"})
        return
    key = _header(scope, b"idempotency-key") if partner.config.honor_idempotency_key else None
    if key is not None:
        held = partner._held_post(data["id"], key)
        if held is not None:
            await _answer_held(partner, send, held)
            return
    post = partner._accept_post(data["id"], data["webhookUrl"], _caller(scope), key)
    await post.answered.wait()
    await _answer(send, post)


async def _answer_held(partner: MockPartner, send: Send, post: Post) -> None:
    """A POST with a key the partner holds: the first request's record, never a new one."""
    partner._state.answers["idempotent_replay"] += 1
    record = partner.record(post.payout_id)
    if record is None:
        await _respond(send, 409, {"detail": "a request with this idempotency key is in progress"})
        return
    await _respond(send, 200, record)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _answer(send: Send, post: Post) -> None:
    if not post.answer_sent:
        await _respond(send, 503, {"detail": "mock partner stopped"})
        return
    plan = post.plan
    final = {"id": post.payout_id, "status": plan.status, "webhookUrl": post.webhook_url}
    match plan.answer:
        case Answer.FINAL:
            await _respond(send, 200, final)
        case Answer.PENDING:
            await _respond(send, 200, {**final, "status": "pending"})
        case Answer.TIMEOUT:
            await _respond(send, 504, {"detail": "gateway timeout"})
        case Answer.ERROR_500:
            await _respond(send, 500, {"detail": "internal server error"})
        case Answer.GARBAGE:
            body = json.dumps(final).encode()
            await _respond_raw(send, 200, body[: len(body) // 2])
        case Answer.DROP:
            body = json.dumps(final).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", _JSON),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            raise ConnectionDropped("mock partner dropped the connection (p_drop)")


async def _handle_check(partner: MockPartner, scope: Scope, send: Send, payout_id: str) -> None:
    blocked_for = partner._admit_check(_caller(scope))
    if blocked_for is not None:
        # Retry-After is whole seconds; rounding up keeps an obedient client out of the block.
        retry_after = str(max(1, math.ceil(blocked_for))).encode()
        await _respond(send, 429, {"detail": "too many requests"}, [(b"retry-after", retry_after)])
        return
    record = partner.record(payout_id)
    if record is None:
        await _respond(send, 404, {"detail": "not found"})
    else:
        await _respond(send, 200, record)


async def _handle_reset(partner: MockPartner, receive: Receive, send: Send) -> None:
    body = await _read_body(receive)
    if body is None:
        return
    try:
        config = _config_with_overrides(partner.config, body)
    except (ValueError, TypeError) as exc:
        await _respond(send, 422, {"detail": str(exc)})
        return
    partner.reset(config)
    await _respond(send, 200, {"reset": True})


def _config_with_overrides(config: MockPartnerConfig, body: bytes) -> MockPartnerConfig:
    if not body.strip():
        return config
    overrides = json.loads(body)
    if not isinstance(overrides, dict):
        raise TypeError("the body must be a JSON object of config overrides")
    return config.replace(**overrides)


def _caller(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-caller-id":
            return "id:" + bytes(value).decode("latin-1")
    client = scope.get("client")
    return f"ip:{client[0]}" if client else "ip:unknown"


def _validate_post(data: Any) -> str | None:
    if not isinstance(data, dict):
        return "the body must be a JSON object"
    payout_id = data.get("id")
    if not isinstance(payout_id, str) or not payout_id or "/" in payout_id:
        return "id must be a non-empty string without '/'"
    url = data.get("webhookUrl")
    if not isinstance(url, str):
        return "webhookUrl must be a string"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "webhookUrl is not a valid URL"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return "webhookUrl must be an absolute http(s) URL"
    return None


async def _read_body(receive: Receive) -> bytes | None:
    """The request body, or None if the client went away (nothing to answer then)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _respond_raw(send, status, json.dumps(payload).encode(), headers)


async def _respond_raw(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", _JSON),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
