"""``async with`` for the objects that own something to close (clients, connection pools)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing"]


class AsyncClosing(ABC):
    """An async context manager that returns itself and awaits :meth:`aclose` on exit."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release what this object owns."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
