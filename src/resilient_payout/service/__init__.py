"""The mobile app contract as a FastAPI app over a :class:`~resilient_payout.PayoutClient`, or
as parts for an app of your own.

Needs the ``[server]`` extra (fastapi, uvicorn, prometheus-client)::

    from resilient_payout.service import ServiceSettings, create_app

    app = create_app(ServiceSettings.from_env())  # then: uvicorn module:app --port 3200

or, in your own app (docs/embedding.md)::

    service = PayoutService(ServiceSettings.from_env(), prefix="/payouts")
    app = FastAPI(lifespan=service.lifespan)  # or enter it in your own lifespan
    app.include_router(service.router, prefix=service.prefix)

The web layer knows HTTP, not payout rules. Settings (``RP_*``) and the default client are
framework-neutral and live in :mod:`resilient_payout.settings` and :mod:`resilient_payout.wiring`
(re-exported here). One concern per module: ``schemas`` (JSON bodies), ``problems`` (RFC 9457
answers), ``metrics`` (Prometheus), ``deps`` (what routes take from a request, body limits
included), ``routes`` (the endpoints, listed there), ``_service`` (:class:`PayoutService`) and
``app`` (:func:`create_app`).
"""

from __future__ import annotations

from .._extras import needs_extra

with needs_extra("server", "resilient_payout.service"):
    from ..settings import ENV_VARS, ServiceSettings
    from ..wiring import ClientFactory, open_client
    from ._route import ProblemRoute
    from ._service import PayoutService
    from .app import create_app
    from .schemas import (
        PROBLEM_TYPE_PREFIX,
        Health,
        Problem,
        ProblemFieldError,
        Readiness,
        TransactionStatus,
    )

__all__ = [
    "ENV_VARS",
    "PROBLEM_TYPE_PREFIX",
    "ClientFactory",
    "Health",
    "PayoutService",
    "Problem",
    "ProblemFieldError",
    "ProblemRoute",
    "Readiness",
    "ServiceSettings",
    "TransactionStatus",
    "create_app",
    "open_client",
]
