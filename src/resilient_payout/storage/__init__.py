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

from ._base import Storage

__all__ = ["Storage", "storage_from_url"]


def storage_from_url(url: str) -> Storage:
    """Build a (not yet opened) storage backend from a URL; see the table above."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from .memory import MemoryStorage

        return MemoryStorage()
    if scheme == "sqlite":
        from .sqlite import SQLiteStorage

        return SQLiteStorage.from_url(url)
    if scheme in ("postgresql", "postgres"):
        from .postgres import PostgresStorage

        return PostgresStorage.from_url(url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisStorage

        return RedisStorage.from_url(url)
    # The scheme only: a URL may carry a password.
    raise ValueError(f"unsupported storage URL scheme {scheme!r}")
