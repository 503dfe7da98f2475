"""The demo's load balancer: each HTTP request to one port goes to a random service instance."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..testing._server import embedded_server, listen

if TYPE_CHECKING:
    import httpx

__all__ = ["serve_router"]

_HOP_BY_HOP = frozenset(
    {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"}
)

_App = Any  # an ASGI callable


@contextlib.asynccontextmanager
async def serve_router(backends: Sequence[str], host: str, port: int) -> AsyncIterator[None]:
    """A minimal load balancer for the demo: every HTTP request to ``host:port`` goes to a
    random backend, and to the others in turn while one refuses the connection."""
    import httpx

    # GET ?wait= long-polls up to RP_MAX_WAIT: no read timeout, and no pool limit, or parked
    # long polls would hold every connection and new requests would queue behind them.
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=2.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
        trust_env=False,
    )
    try:
        async with embedded_server(_proxy(http, backends), listen(host, port)):
            yield
    finally:
        await http.aclose()


def _proxy(http: httpx.AsyncClient, backends: Sequence[str]) -> _App:
    """The ASGI app that forwards each request, body and all, to a random live backend."""
    import httpx

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        for base in random.sample(list(backends), len(backends)):
            try:
                answer = await http.request(
                    scope["method"], base + target, content=bytes(body), headers=headers
                )
            except httpx.TransportError:
                continue
            out = [
                (k.encode("latin-1"), v.encode("latin-1"))
                for k, v in answer.headers.items()
                if k.encode("latin-1") not in _HOP_BY_HOP and k.lower() != "content-encoding"
            ]
            out.append((b"content-length", str(len(answer.content)).encode()))
            await send(
                {"type": "http.response.start", "status": answer.status_code, "headers": out}
            )
            await send({"type": "http.response.body", "body": answer.content})
            return
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app
