"""The storage backends the contract suite runs on, and helpers for the server backends.

To test a new backend, write a factory (an async context manager that yields an opened, empty
storage) and add it to :data:`BACKENDS`; every test that takes the ``storage`` fixture, including
the whole :class:`~resilient_payout.testing.contract.StorageContract`, then runs on it too. A
backend that several processes share also goes into :data:`SHARED_BACKENDS` (a factory yielding
an ``open_instances`` function: objects on one database), which runs
:class:`~resilient_payout.testing.contract.MultiInstanceContract` on it.

PostgreSQL and Redis run on the servers named by ``RP_TEST_POSTGRES_URL`` and
``RP_TEST_REDIS_URL`` (defaults: a local server of each). A server that does not answer skips
its tests, with the reason, unless ``CI=true``: then they fail, because CI must run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

pytest.register_assert_rewrite("resilient_payout.testing.contract")

from resilient_payout.storage import Storage  # noqa: E402
from resilient_payout.storage.memory import MemoryStorage  # noqa: E402
from resilient_payout.storage.postgres import PostgresStorage  # noqa: E402
from resilient_payout.storage.redis import RedisStorage  # noqa: E402
from resilient_payout.storage.sqlite import SQLiteStorage  # noqa: E402
from resilient_payout.testing.contract import OpenInstances  # noqa: E402

BackendFactory = Callable[[Path], AbstractAsyncContextManager[Storage]]
"""Given a fresh temporary directory, an opened empty storage (closed on exit)."""

# -- servers -----------------------------------------------------------------------------------

Server = Literal["postgres", "redis"]

_SERVERS: dict[Server, tuple[str, str, str]] = {
    "postgres": ("PostgreSQL", "RP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "redis": ("Redis", "RP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}

_unreachable: dict[Server, str | None] = {}
"""Probe results, one per server and test session: None if it answered, else why not."""


async def _probe(server: Server, url: str) -> None:
    if server == "postgres":
        conn = await asyncpg.connect(url, timeout=3)
        await conn.close()
    else:
        client = aioredis.Redis.from_url(
            url, socket_connect_timeout=3, socket_timeout=3, retry=Retry(NoBackoff(), 0)
        )
        try:
            await client.ping()
        finally:
            await client.aclose()


async def server_url(server: Server) -> str:
    """The test server's URL; skips the test if it does not answer (fails it if ``CI=true``)."""
    name, variable, default = _SERVERS[server]
    url = os.environ.get(variable) or default
    if server not in _unreachable:
        try:
            await _probe(server, url)
            _unreachable[server] = None
        except Exception as exc:
            _unreachable[server] = (
                f"{name} not reachable at {url} ({type(exc).__name__}: {exc}); set {variable}"
            )
    reason = _unreachable[server]
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}. CI=true: tests needing {name} must run", pytrace=False)
        pytest.skip(reason)
    return url


@pytest.fixture
async def postgres_url() -> str:
    return await server_url("postgres")


@pytest.fixture
async def redis_url() -> str:
    return await server_url("redis")


def fresh_schema() -> str:
    return f"rp_test_{uuid.uuid4().hex[:12]}"


def fresh_prefix() -> str:
    return f"rp-test:{uuid.uuid4().hex[:12]}:"


async def drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


def with_port(url: str, port: int) -> str:
    """``url`` pointed at ``127.0.0.1:port`` (same user, password, path and query)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def closed_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class TcpProxy:
    """Forwards a local port to a server. :meth:`stop` drops every connection and refuses new
    ones, as a crashed server would; :meth:`start` again brings it back on the same port."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 0)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()


@pytest.fixture
async def proxy() -> AsyncIterator[Callable[[str], Awaitable[TcpProxy]]]:
    """Starts a :class:`TcpProxy` to a server URL's host and port; stops them all after."""
    started: list[TcpProxy] = []

    async def start(url: str) -> TcpProxy:
        p = TcpProxy(url)
        await p.start()
        started.append(p)
        return p

    yield start
    for p in started:
        await p.stop()


# -- backends ----------------------------------------------------------------------------------


@asynccontextmanager
async def memory_backend(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = MemoryStorage()
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


@asynccontextmanager
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = SQLiteStorage(tmp_path / "payouts.db")
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()


@asynccontextmanager
async def postgres_backend(tmp_path: Path) -> AsyncIterator[Storage]:
    """A schema of its own per test, dropped afterwards."""
    url = await server_url("postgres")
    schema = fresh_schema()
    storage = PostgresStorage(url, schema=schema, pool_max=10)
    try:
        await storage.open()
        yield storage
    finally:
        await storage.close()
        await drop_schema(url, schema)


@asynccontextmanager
async def redis_backend(tmp_path: Path) -> AsyncIterator[Storage]:
    """A key prefix of its own per test, deleted afterwards."""
    url = await server_url("redis")
    prefix = fresh_prefix()
    storage = RedisStorage(url, prefix=prefix)
    try:
        await storage.open()
        yield storage
    finally:
        await storage.close()
        await delete_prefix(url, prefix)


BACKENDS = [
    pytest.param(memory_backend, id="memory"),
    pytest.param(sqlite_backend, id="sqlite"),
    pytest.param(postgres_backend, id="postgres", marks=pytest.mark.postgres),
    pytest.param(redis_backend, id="redis", marks=pytest.mark.redis),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendFactory:
    factory: BackendFactory = request.param
    return factory


@pytest.fixture
async def storage(backend: BackendFactory, tmp_path: Path) -> AsyncIterator[Storage]:
    async with backend(tmp_path) as opened:
        yield opened


# -- several objects on one database -----------------------------------------------------------

SharedBackendFactory = Callable[[Path], AbstractAsyncContextManager[OpenInstances]]
"""Given a fresh temporary directory, ``open_instances`` on one new empty database; every object
it opened is closed on exit (and the database dropped)."""


@asynccontextmanager
async def _instances(make: Callable[[], Storage]) -> AsyncIterator[OpenInstances]:
    opened: list[Storage] = []

    async def open_instances(n: int) -> list[Storage]:
        batch = [make() for _ in range(n)]
        for storage in batch:
            await storage.open()
            opened.append(storage)
        return batch

    try:
        yield open_instances
    finally:
        for storage in opened:
            await storage.close()


@asynccontextmanager
async def sqlite_instances(tmp_path: Path) -> AsyncIterator[OpenInstances]:
    """Objects on one file, each with its own connection (as processes on one machine)."""
    path = tmp_path / "shared.db"
    async with _instances(lambda: SQLiteStorage(path)) as open_instances:
        yield open_instances


@asynccontextmanager
async def postgres_instances(tmp_path: Path) -> AsyncIterator[OpenInstances]:
    """Objects on one fresh schema, each with its own pool."""
    url = await server_url("postgres")
    schema = fresh_schema()
    try:
        async with _instances(
            lambda: PostgresStorage(url, schema=schema, pool_max=4)
        ) as open_instances:
            yield open_instances
    finally:
        await drop_schema(url, schema)


@asynccontextmanager
async def redis_instances(tmp_path: Path) -> AsyncIterator[OpenInstances]:
    """Objects on one fresh key prefix, each with its own client."""
    url = await server_url("redis")
    prefix = fresh_prefix()
    try:
        async with _instances(lambda: RedisStorage(url, prefix=prefix)) as open_instances:
            yield open_instances
    finally:
        await delete_prefix(url, prefix)


SHARED_BACKENDS = [
    pytest.param(sqlite_instances, id="sqlite"),
    pytest.param(postgres_instances, id="postgres", marks=pytest.mark.postgres),
    pytest.param(redis_instances, id="redis", marks=pytest.mark.redis),
]
"""No memory entry: a MemoryStorage object is a database of its own, nothing to share."""


@pytest.fixture(params=SHARED_BACKENDS)
async def open_instances(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenInstances]:
    factory: SharedBackendFactory = request.param
    async with factory(tmp_path) as opened:
        yield opened
