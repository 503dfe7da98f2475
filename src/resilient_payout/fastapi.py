"""The example service's former home: everything moved to :mod:`resilient_payout.service`, and
this module re-exports its public names (``uvicorn --factory resilient_payout.fastapi:create_app``
and existing imports keep working)."""

from __future__ import annotations

from .service import (
    ENV_VARS,
    PROBLEM_TYPE_PREFIX,
    ClientFactory,
    Health,
    Problem,
    ProblemFieldError,
    ServiceSettings,
    TransactionStatus,
    create_app,
    open_client,
)

__all__ = [
    "ENV_VARS",
    "PROBLEM_TYPE_PREFIX",
    "ClientFactory",
    "Health",
    "Problem",
    "ProblemFieldError",
    "ServiceSettings",
    "TransactionStatus",
    "create_app",
    "open_client",
]
