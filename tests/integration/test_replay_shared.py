"""Webhook replay protection shared by two service instances on one PostgreSQL or Redis.

Two apps, each with the default wiring (:func:`~resilient_payout.wiring.open_client`) over the
same ``RP_STORAGE_URL``, as two processes behind one URL would run: a signed webhook accepted by
one is refused as a replay by the other (by its ``webhook-id``, and by the partner's event id),
a webhook whose handling failed (503) is accepted when the partner retries it at the other, and
leaving the lifespans closes every connection the replay stores opened.
"""

from __future__ import annotations

import base64
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel
import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from resilient_payout import PayoutClient, StorageUnavailable
from resilient_payout._model import Payout
from resilient_payout.service import ServiceSettings, create_app
from resilient_payout.storage import Storage, storage_from_url
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import FakePartner, Fate, Script
from resilient_payout.webhooks import (
    InMemoryReplayStore,
    PostgresReplayStore,
    RedisReplayStore,
    StandardWebhookVerifier,
    Webhook,
    parse_webhook,
    read_json_object,
    sign_webhook,
)
from resilient_payout.wiring import open_client
from tests.contract.conftest import (
    Server,
    closed_port,
    delete_prefix,
    drop_schema,
    fresh_prefix,
    server_url,
)

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"r" * 32).decode()


class FailingStorage:
    """The storage, except that ``get`` fails while ``down`` (the storage is unreachable)."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def get(self, payout_id: str) -> Payout | None:
        if self.down:
            raise StorageUnavailable("injected: storage unreachable")
        found: Payout | None = await self._inner.get(payout_id)
        return found


def _with_event_id(body: bytes | str | dict[str, Any], headers: Mapping[str, str]) -> Webhook:
    """The exercise's webhook plus the partner's event id in ``"event"``."""
    hook = parse_webhook(body)
    event = read_json_object(body).get("event")
    return Webhook(hook.payout_id, hook.status, event_id=event if isinstance(event, str) else None)


@dataclass
class Instance:
    app: FastAPI
    http: httpx.AsyncClient
    storage: FailingStorage

    @property
    def client(self) -> PayoutClient:
        client: PayoutClient = self.app.state.payout_client
        return client

    async def webhook(self, payload: dict[str, Any], msg_id: str) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = sign_webhook(SECRET, msg_id, time.time(), body)
        headers["content-type"] = "application/json"
        return await self.http.post("/webhook", content=body, headers=headers)


@asynccontextmanager
async def instance(settings: ServiceSettings) -> AsyncIterator[Instance]:
    """One service process: the default wiring, a partner that answers "pending" at once."""
    storage = FailingStorage(storage_from_url(settings.storage_url))
    partner = FakePartner(
        script=lambda pid, n: Script(Fate.PENDING, answer_delay=0, webhook=False, final_delay=1e6)
    )
    factory = functools.partial(
        open_client, partner=partner, notifier=None, storage=storage, webhook_parser=_with_event_id
    )
    app = create_app(settings, client_factory=factory)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")
    async with http, app.router.lifespan_context(app):
        await anyio.lowlevel.checkpoint()
        yield Instance(app, http, storage)


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("redis", marks=pytest.mark.redis)])  # fmt: skip
async def storage_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A fresh schema (PostgreSQL, with an application name to find our connections by) or key
    prefix (Redis) on the test server, removed afterwards."""
    server: Server = request.param
    url = await server_url(server)
    if server == "postgres":
        schema = f"rp_test_{uuid.uuid4().hex[:12]}"
        yield f"{url}?schema={schema}&application_name={schema}"
        await drop_schema(url, schema)
    else:
        prefix = fresh_prefix()
        yield f"{url}?prefix={prefix}"
        await delete_prefix(url, prefix)


async def _connections(url: str) -> int:
    """PostgreSQL sessions under the URL's application name, not counting this one."""
    app_name = url.rsplit("application_name=", 1)[1]
    conn = await asyncpg.connect(url.split("?", 1)[0], timeout=5)
    try:
        found: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
    finally:
        await conn.close()
    return found


async def test_two_instances_share_replay_protection(storage_url: str) -> None:
    settings = ServiceSettings(
        storage_url=storage_url, public_url="http://service", webhook_secrets=(SECRET,)
    )
    async with instance(settings) as one, instance(settings) as two:
        stores = (one.client.webhook_replays, two.client.webhook_replays)
        shared = PostgresReplayStore if storage_url.startswith("postgres") else RedisReplayStore
        assert all(isinstance(s, shared) for s in stores)
        assert one.client.webhook_verifier.replay_store is stores[0]  # type: ignore[union-attr]
        for pid in ("tx-1", "tx-2", "tx-3"):
            assert (await one.http.post("/transaction", json={"id": pid})).status_code == 200

        # A replay of a message id, and of a partner event id under a new message id.
        first = await one.webhook({"id": "tx-1", "status": "completed"}, "msg-1")
        replay = await two.webhook({"id": "tx-1", "status": "completed"}, "msg-1")
        event = await one.webhook({"id": "tx-3", "status": "pending", "event": "ev-9"}, "msg-3")
        event_again = await two.webhook(
            {"id": "tx-3", "status": "pending", "event": "ev-9"}, "msg-3b"
        )
        assert first.json() == {"id": "tx-1", "status": "completed"}
        assert (replay.status_code, replay.json()["type"].rsplit(":", 1)[-1]) == (
            409,
            "webhook-replayed",
        )
        assert (event.status_code, event_again.status_code) == (200, 409)
        assert two.client.stats.webhooks_rejected == {"replayed": 2}  # msg-1, ev-9

        # Handling failed after verification: the partner's retry (same id) gets through.
        one.storage.down = True
        failed = await one.webhook({"id": "tx-2", "status": "declined"}, "msg-2")
        one.storage.down = False
        retried = await two.webhook({"id": "tx-2", "status": "declined"}, "msg-2")
        again = await one.webhook({"id": "tx-2", "status": "declined"}, "msg-2")
        assert failed.status_code == 503
        assert retried.json() == {"id": "tx-2", "status": "declined"}
        assert again.status_code == 409
        payout = await two.client.storage.get("tx-2")
        assert payout is not None
        assert payout.status.value == "declined"
        if storage_url.startswith("postgres"):
            assert await _connections(storage_url) > 0
    # Both lifespans are over: every replay-store (and storage) connection is closed.
    for store in stores:
        assert (
            store._pool is None if isinstance(store, PostgresReplayStore) else store._redis is None
        )  # type: ignore[union-attr]
    if storage_url.startswith("postgres"):
        assert await _connections(storage_url) == 0


async def test_without_a_shared_storage_the_store_is_this_processs_memory() -> None:
    settings = ServiceSettings(storage_url="memory://", webhook_secrets=(SECRET,))
    async with open_client(settings, partner=FakePartner(), notifier=None) as client:
        assert isinstance(client.webhook_replays, InMemoryReplayStore)
        assert client.webhook_verifier.replay_store is client.webhook_replays  # type: ignore[union-attr]


async def test_a_replay_store_that_cannot_open_is_one_clear_error() -> None:
    down = f"postgresql://u:s3cret@127.0.0.1:{closed_port()}/payouts"
    settings = ServiceSettings(storage_url=down, webhook_secrets=(SECRET,))
    with pytest.raises(StorageUnavailable) as info:
        async with open_client(
            settings, partner=FakePartner(), notifier=None, storage=MemoryStorage()
        ):
            pytest.fail("the client must not start")
    message = str(info.value)
    assert message.startswith(
        f"cannot open the webhook replay store (postgresql://127.0.0.1:{down.rsplit(':', 1)[1]}):"
    )
    assert "s3cret" not in message


async def test_your_own_verifier_and_store_open_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import resilient_payout.wiring as wiring

    def unexpected(url: str) -> None:
        raise AssertionError("no replay store should be built")

    monkeypatch.setattr(wiring, "replay_store_for", unexpected)
    mine = InMemoryReplayStore()
    verifier = StandardWebhookVerifier([SECRET], replay_store=mine)
    settings = ServiceSettings(storage_url="memory://")
    async with open_client(
        settings, partner=FakePartner(), notifier=None, webhook_verifier=verifier,
        webhook_replays=mine,
    ) as client:  # fmt: skip
        assert (client.webhook_verifier, client.webhook_replays) == (verifier, mine)
