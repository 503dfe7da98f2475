"""Shared fixtures. Async tests use anyio's pytest plugin on asyncio (real time by default;
override ``anyio_backend`` with ``resilient_payout.testing.VIRTUAL_TIME_BACKEND`` for virtual)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def anyio_backend() -> Any:
    return "asyncio"
