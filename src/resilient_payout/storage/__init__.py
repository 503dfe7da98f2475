"""Pluggable storage: the :class:`Storage` protocol, its backends, and :func:`storage_from_url`.

========================  ==========================================  =====================
URL                       backend                                     extra
========================  ==========================================  =====================
``memory://``             :class:`~.memory.MemoryStorage` (tests)     none
``sqlite:///path.db``     :class:`~.sqlite.SQLiteStorage` (default)   ``[sqlite]``
``postgresql://...``      :class:`~.postgres.PostgresStorage`         ``[postgres]``
``redis://...``           :class:`~.redis.RedisStorage`               ``[redis]``
========================  ==========================================  =====================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError
from ._base import Storage
from ._query import MAX_PAGE, OpsSnapshot, PayoutPage, PayoutQuery
from .memory import MemoryStorage
from .sqlite import SQLiteStorage

if TYPE_CHECKING:
    from .postgres import PostgresStorage
    from .redis import RedisStorage

__all__ = [
    "MAX_PAGE",
    "MemoryStorage",
    "OpsSnapshot",
    "PayoutPage",
    "PayoutQuery",
    "PostgresStorage",
    "RedisStorage",
    "SQLiteStorage",
    "Storage",
    "storage_from_url",
]

# Their drivers are optional extras: imported on first use, never by ``import ...storage``.
_LAZY = {"PostgresStorage": ".postgres", "RedisStorage": ".redis"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def storage_from_url(url: str) -> Storage:
    """Build a (not yet opened) storage backend from a URL; see the table above.

    An unsupported scheme is a :class:`~resilient_payout.ConfigurationError` (a ``ValueError``).
    """
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        return MemoryStorage()
    if scheme == "sqlite":
        return SQLiteStorage.from_url(url)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStorage

        return PostgresStorage.from_url(url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisStorage

        return RedisStorage.from_url(url)
    # The scheme only: a URL may carry a password.
    raise ConfigurationError(f"unsupported storage URL scheme {scheme!r}")
