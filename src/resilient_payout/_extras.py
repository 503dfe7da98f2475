"""Optional dependencies: a missing one is a :class:`~resilient_payout.MissingExtra` naming the
``pip install 'resilient-payout[extra]'`` line, raised where the import happens::

    with needs_extra("postgres", "PostgreSQL storage (postgresql:// URLs)"):
        import asyncpg
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from ._errors import MissingExtra

__all__ = ["EXTRA_OF", "explain_missing", "needs_extra"]

EXTRA_OF: Final[Mapping[str, str]] = {
    "asyncpg": "postgres",
    "redis": "redis",
    "fastapi": "server",
    "uvicorn": "server",
    "prometheus_client": "server",
    "starlette": "server",
    "rich": "cli",
    "looptime": "testing",
    "matplotlib": "bench",
}
"""Top-level module of each optional dependency -> the extra that installs it."""


def explain_missing(
    exc: ModuleNotFoundError, needed_by: str, extra: str | None = None
) -> MissingExtra | None:
    """``exc`` as a :class:`MissingExtra` if the missing module is an optional dependency (named
    after ``extra``, by default the module's own extra), else None: a missing module of ours or
    of a core dependency is a broken install, not a choice, and keeps its own error."""
    root = (exc.name or "").split(".", 1)[0]
    if root not in EXTRA_OF:
        return None
    return MissingExtra(root, extra or EXTRA_OF[root], needed_by)


@contextmanager
def needs_extra(extra: str | None, needed_by: str) -> Iterator[None]:
    """Imports inside the block that fail for an optional dependency raise
    :class:`MissingExtra` (``extra``: the one to name; None: the missing module's own)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = explain_missing(exc, needed_by, extra)
        if missing is None:
            raise
        raise missing from None
