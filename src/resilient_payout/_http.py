"""The default outbound HTTP/1.1 client (aiohttp) behind :class:`~resilient_payout.HttpPartner`
and :class:`~resilient_payout.HttpNotifier`.

Why not httpx here: with a thousand slow partner calls open, httpcore's pool bookkeeping (it
walks every connection on each request start and close) took most of the service's CPU, and
even at 4 concurrent calls httpx cost ~650 µs of CPU per request against ~100-140 µs for aiohttp
(docs/performance.md). httpx stays the injectable seam: pass an ``httpx.AsyncClient`` (any
transport: ASGI, mocks, proxies) and it is used instead.

Money rule: :class:`TransportError` says ``sent=False`` only when aiohttp failed while
*establishing* the connection (refused, DNS, TLS, connect or pool-wait timeout), i.e. before a
byte of the request left. Everything else, a reset, a disconnect, a read timeout, a malformed
answer, may come after the partner has the whole request.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from ._urls import redact_urls_in

MAX_BODY: Final = 64 * 1024
"""Answers we read are tiny; a bigger body is garbage and is not read further."""

# Raised by aiohttp's connector while opening a connection (ClientConnectorError covers DNS,
# refused, TLS handshake and proxy connect; ConnectionTimeoutError the connect and pool-wait
# timeouts), or before any connection for an unusable URL.
_NOT_SENT: Final = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
    aiohttp.InvalidURL,
    aiohttp.NonHttpUrlClientError,
)


class TransportError(Exception):
    """An exchange that produced no HTTP answer; ``sent`` is False only when provably unsent."""

    def __init__(self, reason: str, *, sent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent


@dataclass(frozen=True, slots=True)
class Answer:
    """Status, headers (case-insensitive lookup) and the body (None when over ``MAX_BODY``)."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes | None


class AiohttpClient:
    """One lazily created :class:`aiohttp.ClientSession` (it must be made inside the running
    loop, and a partner object is often built before it) with a bounded connection pool."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = 2.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._keepalive = keepalive_expiry
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _get(self) -> aiohttp.ClientSession:
        if self._closed:
            raise TransportError("client is closed", sent=False)
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                # Below common server idle timeouts (5 s in uvicorn and Node): reusing a
                # connection the server is closing makes a POST Uncertain for nothing.
                keepalive_timeout=self._keepalive,
                ssl=self._tls if self._tls is not None else True,
            )
            # No cookies, no environment proxies, no decompression surprises: a fixed peer.
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
                auto_decompress=True,
            )
            # aiohttp resends a GET or PUT once after a disconnect. A resent status check spends
            # partner quota behind the check budget's back; the outbox already retries pushes.
            # No public switch exists (aiohttp 3.10-3.14), hence the private attribute.
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
        return self._session

    @property
    def is_closed(self) -> bool:
        return self._closed

    async def request(
        self,
        method: str,
        url: str,
        payload: Any | None,
        *,
        connect_timeout: float,
        read_timeout: float,
        total_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        """One exchange (``payload`` sent as JSON, with extra ``headers``); raises
        :class:`TransportError` when there is no HTTP answer."""
        data = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        sent: dict[str, str] | None = None
        if data is not None or headers:
            sent = {"content-type": "application/json"} if data is not None else {}
            sent.update(headers or {})
        timeout = aiohttp.ClientTimeout(
            total=total_timeout,
            # "connect" includes the wait for a free pooled connection.
            connect=connect_timeout,
            sock_connect=connect_timeout,
            sock_read=read_timeout,
        )
        try:
            async with self._get().request(
                method, url, data=data, headers=sent, timeout=timeout, allow_redirects=False
            ) as response:
                body = await _read_capped(response)
                return Answer(response.status, response.headers, body)
        except _NOT_SENT as exc:
            raise TransportError(describe_error(exc), sent=False) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(describe_error(exc), sent=True) from exc

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


async def _read_capped(response: aiohttp.ClientResponse) -> bytes | None:
    buf = bytearray()
    while chunk := await response.content.readany():
        buf += chunk
        if len(buf) > MAX_BODY:
            # Releasing an unread response closes its connection instead of reusing it.
            return None
    return bytes(buf)


def clean_text(text: str) -> str:
    """One line without control characters: reasons end up in logs and the audit trail."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def describe_error(exc: BaseException) -> str:
    """``Name: message`` of a transport error, cleaned, with URL credentials redacted (some
    errors quote the request URL)."""
    text = redact_urls_in(clean_text(str(exc)))
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
