"""Pluggable storage: the :class:`Storage` protocol, its backends, and :func:`storage_from_url`.

========================  ==========================================  =====================
URL                       backend                                     extra
========================  ==========================================  =====================
``memory://``             :class:`~.memory.MemoryStorage` (tests)     none
``sqlite:///path.db``     :class:`~.sqlite.SQLiteStorage` (default)   ``[sqlite]``
``postgresql://...``      PostgresStorage (several instances)         ``[postgres]``
``redis://...``           RedisStorage (several instances)            ``[redis]``
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
    raise ValueError(f"unsupported storage URL scheme {scheme!r} (in {url!r})")
