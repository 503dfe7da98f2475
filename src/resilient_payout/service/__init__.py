"""The mobile app contract as a FastAPI app over a :class:`~resilient_payout.PayoutClient`.

Needs the ``[server]`` extra (fastapi, uvicorn, prometheus-client)::

    from resilient_payout.service import ServiceSettings, create_app

    app = create_app(ServiceSettings.from_env())  # then: uvicorn module:app --port 3200

The web layer knows HTTP, not payout rules. Settings (``RP_*``) and the default client are
framework-neutral and live in :mod:`resilient_payout.settings` and :mod:`resilient_payout.wiring`
(re-exported here). One concern per module: ``schemas`` (JSON bodies), ``problems`` (RFC 9457
answers), ``metrics`` (Prometheus), ``middleware`` (body limits), ``deps`` (what routes take
from a request), ``routes`` (the endpoints, listed there) and ``app`` (:func:`create_app`).
"""

from __future__ import annotations

from ..settings import ENV_VARS, ServiceSettings
from ..wiring import ClientFactory, open_client
from .app import create_app
from .schemas import PROBLEM_TYPE_PREFIX, Health, Problem, ProblemFieldError, TransactionStatus

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
