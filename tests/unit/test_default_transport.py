"""The default (aiohttp) transport of HttpPartner and HttpNotifier, against real sockets.

A raw ``asyncio.start_server`` on 127.0.0.1 plays the partner (or the app): each test scripts
what it does with each request it reads (answer with given bytes, close, hang), and every request
it read is recorded so that the exact bytes the client sent can be checked. No respx, no mocks of
aiohttp: this is the code path that runs in production when no ``httpx.AsyncClient`` is injected.

The money rule checked here: a failure while establishing the connection is ``NotSent``; any
failure once the connection carried the request is ``Uncertain``. Real time is spent only on the
sub-second timeouts that some tests provoke.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from resilient_payout import _http
from resilient_payout._errors import NotificationFailed
from resilient_payout._http import MAX_BODY, AiohttpClient
from resilient_payout._model import (
    Accepted,
    CheckFailed,
    Found,
    NotFound,
    NotSent,
    PartnerStatus,
    PayoutStatus,
    RateLimited,
    Refused,
    Uncertain,
)
from resilient_payout._policy import Policy
from resilient_payout.notify import HttpNotifier
from resilient_payout.partner import HttpPartner, SubmitAttempt

pytestmark = pytest.mark.anyio

HOOK = "http://us.test/webhooks/partner"
# Timeouts short enough that provoking one costs a fraction of a second of real time.
SHORT = Policy(
    connect_timeout=0.2,
    read_timeout=0.2,
    check_timeout=0.2,
    submit_deadline=5.0,
    max_clock_skew=1.0,
)


@pytest.fixture
def anyio_backend() -> str:
    # aiohttp runs on asyncio only.
    return "asyncio"


# --- the raw server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One request as the server read it off the socket."""

    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    connection: int  # 1-based number of the connection it came on

    def json(self) -> Any:
        return json.loads(self.body)


# What the server does with one request it read: True keeps the connection for the next one.
Action = Callable[[asyncio.StreamWriter], Awaitable[bool]]


def http(
    status: int,
    body: bytes = b"",
    *,
    reason: str = "X",
    headers: Sequence[str] = (),
    length: int | None = None,
) -> bytes:
    """Raw bytes of an HTTP/1.1 answer (``length`` overrides the Content-Length header)."""
    size = len(body) if length is None else length
    head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {size}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def json_answer(status: int, data: Any, *, headers: Sequence[str] = ()) -> bytes:
    return http(
        status,
        json.dumps(data).encode(),
        headers=["Content-Type: application/json", *headers],
    )


def reply(raw: bytes, *, close: bool = False) -> Action:
    """Write ``raw`` and keep the connection (or close it right after)."""

    async def act(writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return not close

    return act


def close() -> Action:
    """Read the request, then close the connection without answering."""

    async def act(writer: asyncio.StreamWriter) -> bool:
        return False

    return act


class RawServer:
    """A scripted HTTP/1.1 server: ``script(*actions)`` is consumed one action per request read."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.connections = 0
        self.close_on_accept = False
        self._plan: list[Action] = []
        self._release = asyncio.Event()
        self._arrived = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *actions: Action) -> None:
        self._plan.extend(actions)

    def hang(self, first: bytes = b"") -> Action:
        """Write ``first`` (maybe nothing), then hold the connection until released; close it."""

        async def act(writer: asyncio.StreamWriter) -> bool:
            if first:
                writer.write(first)
                await writer.drain()
            await self._release.wait()
            return False

        return act

    def release(self) -> None:
        """Let every hanging action close its connection."""
        self._release.set()

    async def wait_for_requests(self, n: int) -> None:
        async with asyncio.timeout(2.0):
            while len(self.requests) < n:
                self._arrived.clear()
                await self._arrived.wait()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.release()
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        number = self.connections
        try:
            if self.close_on_accept:
                return
            while True:
                request = await _read_request(reader, number)
                if request is None:
                    return
                self.requests.append(request)
                self._arrived.set()
                action = self._plan.pop(0) if self._plan else reply(http(599, b"unscripted"))
                if not await action(writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader, connection: int) -> Received | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None  # the client closed the connection between requests
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    assert "chunked" not in headers.get("transfer-encoding", "")
    size = int(headers.get("content-length", "0"))
    body = await reader.readexactly(size) if size else b""
    return Received(method, target, version, headers, body, connection)


@pytest.fixture
async def server() -> AsyncIterator[RawServer]:
    srv = RawServer()
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def refused_base() -> Iterator[str]:
    """A 127.0.0.1 port that refuses connections: bound (so nobody else takes it), not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture
async def partner(server: RawServer) -> AsyncIterator[HttpPartner]:
    async with HttpPartner(server.base, policy=SHORT) as p:
        assert p._own is not None  # the default transport, not an injected httpx client
        yield p


def record(pid: str = "p1", status: str = "completed") -> dict[str, Any]:
    return {"id": pid, "status": status, "webhookUrl": HOOK}


# --- submit: answers -------------------------------------------------------------------------


async def test_submit_200_completed_is_accepted_and_sends_the_exact_request(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(reply(json_answer(200, record())))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Accepted(
        PartnerStatus.COMPLETED
    )

    [request] = server.requests
    assert (request.method, request.target, request.version) == ("POST", "/transaction", "HTTP/1.1")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert int(request.headers["content-length"]) == len(request.body)
    assert request.json() == {"id": "p1", "webhookUrl": HOOK}
    assert request.body == b'{"id":"p1","webhookUrl":"http://us.test/webhooks/partner"}'


async def test_submit_200_garbage_body_is_uncertain(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(reply(http(200, b"<html>oops</html>")))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Uncertain(
        "HTTP 200 with garbage body: not JSON"
    )


async def test_submit_200_oversized_body_is_uncertain_and_not_parsed(
    server: RawServer, partner: HttpPartner
) -> None:
    # A valid record padded past the cap: were it parsed, it would be Accepted.
    body = json.dumps({**record(), "pad": "x" * MAX_BODY}).encode()
    assert len(body) > MAX_BODY
    server.script(reply(http(200, body, headers=["Content-Type: application/json"])))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Uncertain(
        "HTTP 200 with garbage body: too large"
    )


async def test_submit_504_is_uncertain(server: RawServer, partner: HttpPartner) -> None:
    server.script(reply(http(504, b"Gateway Timeout")))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Uncertain("HTTP 504")


async def test_submit_400_is_refused_with_the_partner_reason(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(reply(json_answer(400, {"error": "bad id"})))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Refused(400, "bad id")


async def test_submit_429_is_rate_limited_with_retry_after(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(reply(json_answer(429, {"error": "slow down"}, headers=["Retry-After: 7"])))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == RateLimited(7.0)


async def test_redirect_is_not_followed(server: RawServer, partner: HttpPartner) -> None:
    server.script(reply(http(307, headers=[f"Location: {server.base}/elsewhere"])))

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Uncertain("HTTP 307")
    assert [r.target for r in server.requests] == ["/transaction"]


async def test_keep_alive_connection_is_reused_for_sequential_requests(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(
        reply(json_answer(200, record("p1"))),
        reply(json_answer(200, record("p2", "pending"))),
    )

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Accepted(
        PartnerStatus.COMPLETED
    )
    assert await partner.submit(SubmitAttempt.first("p2", HOOK)) == Accepted(PartnerStatus.PENDING)

    assert [r.json()["id"] for r in server.requests] == ["p1", "p2"]
    assert [r.connection for r in server.requests] == [1, 1]
    assert server.connections == 1


# --- submit: failures before the request left (NotSent) -------------------------------------


async def test_submit_to_refused_port_is_not_sent(refused_base: str) -> None:
    async with HttpPartner(refused_base, policy=SHORT) as partner:
        outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, NotSent)
    assert outcome.reason.startswith("ClientConnectorError: Cannot connect to host 127.0.0.1")


@pytest.mark.parametrize(
    ("base", "error"),
    [
        ("ftp://127.0.0.1:9", "NonHttpUrlClientError"),
        ("not-a-url", "InvalidUrlClientError"),
        ("http://", "InvalidUrlClientError"),
    ],
)
async def test_submit_to_unusable_url_is_not_sent(base: str, error: str) -> None:
    async with HttpPartner(base, policy=SHORT) as partner:
        outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, NotSent)
    assert outcome.reason.startswith(error)


async def test_pool_wait_timeout_is_not_sent_and_never_reaches_the_server(
    server: RawServer,
) -> None:
    policy = Policy(connect_timeout=0.2, read_timeout=2.0, submit_deadline=5.0, max_clock_skew=1.0)
    async with HttpPartner(server.base, policy=policy) as partner:
        partner._own = AiohttpClient(max_connections=1)  # the original was never opened
        server.script(server.hang())
        first = asyncio.create_task(partner.submit(SubmitAttempt.first("p1", HOOK)))
        await server.wait_for_requests(1)

        second = await partner.submit(SubmitAttempt.first("p2", HOOK))

        assert isinstance(second, NotSent)
        assert second.reason.startswith("ConnectionTimeoutError")
        server.release()  # the server closes the first connection without answering
        assert isinstance(await first, Uncertain)

    assert [r.json()["id"] for r in server.requests] == ["p1"]
    assert server.connections == 1


async def test_submit_after_aclose_is_not_sent(server: RawServer) -> None:
    server.script(reply(json_answer(200, record())))
    partner = HttpPartner(server.base, policy=SHORT)
    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == Accepted(
        PartnerStatus.COMPLETED
    )
    await partner.aclose()

    assert await partner.submit(SubmitAttempt.first("p2", HOOK)) == NotSent("client is closed")
    assert len(server.requests) == 1


async def test_submit_after_aclose_of_a_never_used_partner_is_not_sent(server: RawServer) -> None:
    partner = HttpPartner(server.base, policy=SHORT)
    await partner.aclose()

    assert await partner.submit(SubmitAttempt.first("p1", HOOK)) == NotSent("client is closed")
    assert server.connections == 0


# --- submit: failures after the request left (Uncertain) ------------------------------------


async def test_close_after_reading_the_request_is_uncertain_and_not_resent(
    server: RawServer, partner: HttpPartner
) -> None:
    # Were the POST re-sent (aiohttp does that for idempotent methods), the second would succeed.
    server.script(close(), reply(json_answer(200, record())))

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert outcome.reason.startswith("ServerDisconnectedError")
    assert [r.json() for r in server.requests] == [{"id": "p1", "webhookUrl": HOOK}]


async def test_close_right_after_accept_is_uncertain(
    server: RawServer, partner: HttpPartner
) -> None:
    # The client cannot tell this from a close after the request was read: it was written.
    server.close_on_accept = True

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert server.connections == 1


async def test_read_timeout_before_the_answer_is_uncertain(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(server.hang())

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert outcome.reason.startswith("SocketTimeoutError")
    assert len(server.requests) == 1


async def test_read_timeout_in_the_middle_of_the_body_is_uncertain(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(server.hang(first=http(200, b'{"id": "p1"', length=100)))

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert outcome.reason.startswith("SocketTimeoutError")


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    ],
    ids=["no-status-line", "non-numeric-status", "bad-content-length"],
)
async def test_malformed_answer_is_uncertain(
    server: RawServer, partner: HttpPartner, raw: bytes
) -> None:
    server.script(reply(raw, close=True))

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert not outcome.reason.startswith("HTTP ")  # a transport error, not a classified status
    assert len(server.requests) == 1


def test_a_reason_never_quotes_url_credentials() -> None:
    # aiohttp 3.14 already drops them from the URLs it quotes; this must hold whatever it does,
    # since reasons go to logs and the audit trail.
    exc = aiohttp.ClientConnectionError(
        "Connection timeout to host http://payouts:s3cret@partner.test/transaction"
    )
    assert _http.describe_error(exc) == (
        "ClientConnectionError: Connection timeout to host http://***@partner.test/transaction"
    )


async def test_partner_bytes_in_a_transport_reason_are_cleaned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise _http.TransportError(
            "ClientResponseError: bad \x1b[31mline\x07" + "x" * 300, sent=True
        )

    async with HttpPartner("http://partner.test") as p:
        monkeypatch.setattr(p._own, "request", failing)
        outcome = await p.submit(SubmitAttempt.first("p1", HOOK))
        check = await p.check("p1")

    assert isinstance(outcome, Uncertain)
    assert outcome.reason.isprintable()
    assert outcome.reason.startswith("ClientResponseError: bad [31mline")
    assert len(outcome.reason) == 200
    assert isinstance(check, CheckFailed)
    assert check.reason == outcome.reason


async def test_truncated_body_is_uncertain(server: RawServer, partner: HttpPartner) -> None:
    server.script(reply(http(200, b'{"id": "p1", "st', length=100), close=True))

    outcome = await partner.submit(SubmitAttempt.first("p1", HOOK))

    assert isinstance(outcome, Uncertain)
    assert outcome.reason.startswith("ClientPayloadError")


# --- check ------------------------------------------------------------------------------------


async def test_check_200_is_found_and_sends_a_bodyless_get(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(reply(json_answer(200, record("p1", "declined"))))

    assert await partner.check("p1") == Found(PartnerStatus.DECLINED)

    [request] = server.requests
    assert (request.method, request.target) == ("GET", "/transaction/p1")
    assert request.body == b""
    assert "content-type" not in request.headers


async def test_check_404_is_not_found(server: RawServer, partner: HttpPartner) -> None:
    server.script(reply(json_answer(404, {"error": "no such transaction"})))

    assert await partner.check("p1") == NotFound()


async def test_check_quotes_the_payout_id_in_the_path(
    server: RawServer, partner: HttpPartner
) -> None:
    server.script(reply(http(404)))

    assert await partner.check("a/b c?d#e") == NotFound()

    assert [r.target for r in server.requests] == ["/transaction/a%2Fb%20c%3Fd%23e"]


async def test_check_to_refused_port_is_check_failed(refused_base: str) -> None:
    async with HttpPartner(refused_base, policy=SHORT) as partner:
        outcome = await partner.check("p1")

    assert isinstance(outcome, CheckFailed)
    assert outcome.reason.startswith("ClientConnectorError")


async def test_check_close_after_reading_the_request_is_check_failed(
    server: RawServer, partner: HttpPartner
) -> None:
    # aiohttp would re-send an idempotent request once after a disconnect; that is switched off
    # because a resent check spends partner quota behind the budget's back. The second scripted
    # answer would make the check succeed if it were re-sent.
    server.script(close(), reply(json_answer(200, record("p1", "completed"))))

    outcome = await partner.check("p1")

    assert isinstance(outcome, CheckFailed)
    assert outcome.reason.startswith("ServerDisconnectedError")
    assert [r.target for r in server.requests] == ["/transaction/p1"]


async def test_check_read_timeout_is_check_failed(server: RawServer, partner: HttpPartner) -> None:
    server.script(server.hang())

    outcome = await partner.check("p1")

    assert isinstance(outcome, CheckFailed)
    assert outcome.reason.startswith("SocketTimeoutError")


# --- notifier -----------------------------------------------------------------------------------


async def test_notifier_204_acknowledges_a_flat_put(server: RawServer) -> None:
    server.script(reply(b"HTTP/1.1 204 No Content\r\n\r\n"))

    async with HttpNotifier(f"{server.base}/payouts/updates", timeout=2.0) as notifier:
        await notifier.deliver("p1", PayoutStatus.COMPLETED)

    [request] = server.requests
    assert (request.method, request.target) == ("PUT", "/payouts/updates")
    assert request.headers["content-type"] == "application/json"
    assert request.body == b'{"id":"p1","status":"completed"}'


async def test_notifier_nested_body_shape(server: RawServer) -> None:
    server.script(reply(http(200, b"ok")))

    async with HttpNotifier(server.base + "/hook", body="nested", timeout=2.0) as notifier:
        await notifier.deliver("p9", PayoutStatus.FAILED)

    [request] = server.requests
    assert request.method == "PUT"
    assert request.json() == {"status": {"id": "p9", "status": "failed"}}


async def test_notifier_500_raises(server: RawServer) -> None:
    server.script(reply(http(500, b"boom")))

    async with HttpNotifier(server.base + "/hook", timeout=2.0) as notifier:
        with pytest.raises(NotificationFailed, match="HTTP 500"):
            await notifier.deliver("p1", PayoutStatus.DECLINED)

    assert len(server.requests) == 1


async def test_notifier_refused_raises(refused_base: str) -> None:
    async with HttpNotifier(refused_base + "/hook", timeout=2.0) as notifier:
        with pytest.raises(NotificationFailed, match="ClientConnectorError"):
            await notifier.deliver("p1", PayoutStatus.COMPLETED)


async def test_notifier_close_after_reading_the_request_raises(server: RawServer) -> None:
    # Not re-sent by aiohttp: the outbox's retry rounds own retries (with backoff).
    server.script(close(), close())

    async with HttpNotifier(server.base + "/hook", timeout=2.0) as notifier:
        with pytest.raises(NotificationFailed, match="ServerDisconnectedError"):
            await notifier.deliver("p1", PayoutStatus.COMPLETED)

    assert [r.method for r in server.requests] == ["PUT"]


async def test_notifier_after_aclose_raises(server: RawServer) -> None:
    notifier = HttpNotifier(server.base + "/hook", timeout=2.0)
    await notifier.aclose()

    with pytest.raises(NotificationFailed, match="client is closed"):
        await notifier.deliver("p1", PayoutStatus.COMPLETED)
    assert server.connections == 0
