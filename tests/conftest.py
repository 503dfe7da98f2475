"""Shared fixtures. Async tests use anyio's pytest plugin on asyncio (real time by default;
override ``anyio_backend`` with ``resilient_payout.testing.VIRTUAL_TIME_BACKEND`` for virtual).

Hypothesis explores new examples on every local run; with ``CI=true`` it draws the same ones
every time (``derandomize``), so a landing is judged on reproducible examples and a failure there
can be replayed exactly. Run ``pytest`` locally (random) to keep finding new cases.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")


@pytest.fixture
def anyio_backend() -> Any:
    return "asyncio"
