"""The storage backends the contract suite runs on.

To test a new backend, write a factory (an async context manager that yields an opened, empty
storage) and add it to :data:`BACKENDS`; every test that takes the ``storage`` fixture, including
the whole :class:`~resilient_payout.testing.contract.StorageContract`, then runs on it too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

pytest.register_assert_rewrite("resilient_payout.testing.contract")

from resilient_payout.storage import Storage  # noqa: E402
from resilient_payout.storage.memory import MemoryStorage  # noqa: E402
from resilient_payout.storage.sqlite import SQLiteStorage  # noqa: E402

BackendFactory = Callable[[Path], AbstractAsyncContextManager[Storage]]
"""Given a fresh temporary directory, an opened empty storage (closed on exit)."""


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


BACKENDS = [
    pytest.param(memory_backend, id="memory"),
    pytest.param(sqlite_backend, id="sqlite"),
    # Planned server backends go here, each skipped unless its server is configured, e.g.:
    #   pytest.param(postgres_backend, id="postgres", marks=[pytest.mark.postgres, pytest.mark.
    #       skipif(not os.environ.get("RP_TEST_POSTGRES_URL"), reason="no PostgreSQL")]),
    #   pytest.param(redis_backend, id="redis", marks=[pytest.mark.redis, ...RP_TEST_REDIS_URL]),
    # Their factories must hand out an empty database per test (a fresh schema or key prefix).
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> BackendFactory:
    factory: BackendFactory = request.param
    return factory


@pytest.fixture
async def storage(backend: BackendFactory, tmp_path: Path) -> AsyncIterator[Storage]:
    async with backend(tmp_path) as opened:
        yield opened
