"""The example payout service, configured from ``RP_*`` environment variables.

Run it with ``uvicorn examples.fastapi_service.app:app --port 3200`` or ``resilient-payout serve``;
the variables are listed in ``docs/service.md``. Invalid settings fail the import with a
``ValueError`` naming the variable.
"""

from __future__ import annotations

from resilient_payout.service import ServiceSettings, create_app

app = create_app(ServiceSettings.from_env())
