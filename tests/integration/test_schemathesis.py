"""Property-based fuzzing of the example service from its own OpenAPI document (schemathesis).

Every operation gets a bounded number of generated requests, valid and invalid, through the ASGI
app in process (schemathesis runs its lifespan). No answer may be a 5xx other than a documented
503, and every answer must conform to the schema: documented status, content type, body, headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans  # noqa: E402

from resilient_payout import PayoutClient  # noqa: E402
from resilient_payout.service import ServiceSettings, create_app  # noqa: E402
from resilient_payout.storage.memory import MemoryStorage  # noqa: E402
from resilient_payout.testing import FakePartner  # noqa: E402

MAX_EXAMPLES = 50


def _client(s: ServiceSettings) -> PayoutClient:
    return PayoutClient(
        storage=MemoryStorage(),
        partner=FakePartner(seed=1, p_webhook=0.0),
        webhook_url=s.webhook_url,
        policy=s.policy(),
        webhook_verifier=s.webhook_verifier(),
    )


# Unsigned webhooks allowed so that generated bodies reach parsing (signing is covered by
# test_hostile_input); long polls capped at 50 ms of real time so the run stays short.
APP = create_app(
    ServiceSettings(storage_url="memory://", allow_unsigned_webhooks=True, max_wait=0.05),
    client_factory=_client,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


@pytest.fixture(scope="module", autouse=True)
def _stop_lifespans() -> Iterator[None]:
    yield
    shutdown_lifespans()  # leave the client (and its background work) before other tests


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same requests on every machine, CI or not
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_conforms_to_the_schema_and_none_is_a_server_error(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)
