"""The example service's former home: everything moved to :mod:`resilient_payout.service`, and
this module re-exports its public names (``uvicorn --factory resilient_payout.fastapi:create_app``
and existing imports keep working)."""

from __future__ import annotations

from . import service
from .service import *  # noqa: F403 - the whole public API of the new home, by definition

__all__ = service.__all__
