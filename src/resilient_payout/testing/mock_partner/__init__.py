"""A mock of the unreliable payment partner, as an ASGI app with seeded, scalable behaviour.

It reproduces the partner described in the scenario (random outcome, slow answers, 504s that may
still land, webhooks, a rate-limited status check that blocks abusers) plus opt-in faults, and
keeps the ground truth a test compares the client's results with. See ``docs/mock-partner.md``.

Use it in-process (virtual time, ``httpx.ASGITransport``)::

    async with MockPartner(MockPartnerConfig(seed=1)) as partner:
        transport = httpx.ASGITransport(app=partner.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://partner") as http:
            ...
        await partner.wait_idle()
        assert partner.stats()["double_payments"] == []

or as a server with :func:`serve_mock_partner`. It deliberately imports nothing else from the
library, so it stays an independent referee of the client.

Modules: ``config`` (the knobs), ``_plan`` (each POST's fate, pure and seeded), ``_state``
(records, truth, counters, rate limit), ``_signing`` (webhook signatures), ``_endpoints`` (the
HTTP side), ``partner`` (``MockPartner``: timelines and webhooks), ``server`` (uvicorn).
"""

from __future__ import annotations

from ._endpoints import ConnectionDropped
from ._state import AnswerCounts, MockPartnerStats, MockPartnerTruth, TruthEntry
from .config import MockPartnerConfig
from .partner import MockPartner
from .server import serve_mock_partner

__all__ = [
    "AnswerCounts",
    "ConnectionDropped",
    "MockPartner",
    "MockPartnerConfig",
    "MockPartnerStats",
    "MockPartnerTruth",
    "TruthEntry",
    "serve_mock_partner",
]
