"""An app of your own with the payout routes in it, under ``/payouts``.

Run it with ``uvicorn examples.fastapi_service.host:app --port 3200``. The prefix is part of
the webhook URL the partner is given, so the service is told it (``prefix=``, or
``RP_ROUTE_PREFIX``) as well as ``include_router``. Settings are the ``RP_*`` variables of
docs/service.md; docs/embedding.md explains each part.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from resilient_payout.service import PayoutService, ServiceSettings

service = PayoutService(ServiceSettings.from_env(), prefix="/payouts")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Your own startup work goes around (or inside) the payout client's lifespan.
    async with service.lifespan(app):
        yield


app = FastAPI(title="my payments app", lifespan=lifespan)
app.include_router(service.router, prefix=service.prefix, tags=["payouts"])


@app.get("/hello")
async def hello() -> dict[str, str]:
    """A route of the host app itself."""
    return {"hello": "world"}
