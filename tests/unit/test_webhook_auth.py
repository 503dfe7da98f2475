"""Standard Webhooks verification: signatures, rotation, timestamps, replays, malformed input."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import pytest

from resilient_payout import (
    PartnerStatus,
    Payout,
    PayoutClient,
    PayoutRequest,
    PayoutStatus,
    StorageUnavailable,
    WebhookRejected,
)
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import FakePartner
from resilient_payout.testing.mock_partner._signing import sign as mock_sign
from resilient_payout.webhooks import (
    InMemoryReplayStore,
    RejectReason,
    StandardWebhookVerifier,
    UnsignedWebhooks,
    Webhook,
    WebhookAuthError,
    WebhookVerifier,
    sign_webhook,
)

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD = "an-old-raw-secret-of-32-bytes-xx"
OTHER = "whsec_" + base64.b64encode(b"x" * 32).decode()
BODY = b'{"id": "tx-1", "status": "completed"}'
NOW = 1_700_000_000.0


def headers(secret: Any = SECRET, msg_id: str = "msg_1", ts: float = NOW, body: bytes = BODY):
    return sign_webhook(secret, msg_id, ts, body)


async def rejected(
    verifier: StandardWebhookVerifier, hdrs: dict[str, str], body: bytes = BODY, now: float = NOW
) -> RejectReason:
    with pytest.raises(WebhookAuthError) as info:
        await verifier.verify(hdrs, body, now)
    assert isinstance(info.value, WebhookRejected)
    return info.value.reason


def test_signature_matches_the_standard_webhooks_test_vector() -> None:
    # From the Standard Webhooks / Svix documentation.
    out = sign_webhook(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert out == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


def test_the_mock_partners_copy_of_the_signer_agrees() -> None:
    assert mock_sign(SECRET, "msg_9", int(NOW), BODY) == headers(msg_id="msg_9")
    assert mock_sign(OLD, "msg_9", int(NOW), BODY) == headers(OLD, msg_id="msg_9")


def test_verifiers_satisfy_the_protocol() -> None:
    assert isinstance(StandardWebhookVerifier([SECRET]), WebhookVerifier)
    assert isinstance(UnsignedWebhooks(), WebhookVerifier)


async def test_a_valid_signature_passes_and_header_names_are_case_insensitive() -> None:
    v = StandardWebhookVerifier([SECRET])
    await v.verify({k.upper(): val for k, val in headers().items()}, BODY, NOW)
    assert v.rejected == {}


async def test_forged_body_and_wrong_secret_are_forged() -> None:
    v = StandardWebhookVerifier([SECRET])
    assert await rejected(v, headers(), body=BODY.replace(b"completed", b"declined")) == "forged"
    assert await rejected(v, headers(OTHER, msg_id="msg_2")) == "forged"
    tampered = headers(msg_id="msg_3") | {"webhook-id": "msg_4"}
    assert await rejected(v, tampered) == "forged"
    assert v.rejected == {"forged": 3}


async def test_rotation_accepts_any_configured_secret() -> None:
    v = StandardWebhookVerifier([SECRET, OLD])
    await v.verify(headers(SECRET, "msg_new"), BODY, NOW)
    await v.verify(headers(OLD, "msg_old"), BODY, NOW)
    assert await rejected(v, headers(OTHER, "msg_other")) == "forged"


async def test_several_signatures_pass_if_any_matches_and_unknown_versions_are_skipped() -> None:
    v = StandardWebhookVerifier([SECRET])
    both = headers([OTHER, SECRET], "msg_both")
    assert len(both["webhook-signature"].split(" ")) == 2
    await v.verify(both, BODY, NOW)
    mixed = headers(SECRET, "msg_mixed")
    mixed["webhook-signature"] = "v1a,c29tZXRoaW5n " + mixed["webhook-signature"]
    await v.verify(mixed, BODY, NOW)
    only_other_scheme = headers(SECRET, "msg_v2")
    only_other_scheme["webhook-signature"] = only_other_scheme["webhook-signature"].replace(
        "v1,", "v2,"
    )
    assert await rejected(v, only_other_scheme) == "forged"


@pytest.mark.parametrize("offset", [-301.0, 301.0, -10_000.0, 1e9])
async def test_timestamps_outside_the_tolerance_are_stale_both_ways(offset: float) -> None:
    v = StandardWebhookVerifier([SECRET], tolerance=300)
    assert await rejected(v, headers(ts=NOW + offset)) == "stale"


@pytest.mark.parametrize("offset", [-300.0, 300.0])
async def test_timestamps_at_the_edge_of_the_tolerance_pass(offset: float) -> None:
    await StandardWebhookVerifier([SECRET], tolerance=300).verify(
        headers(ts=NOW + offset), BODY, NOW
    )


async def test_a_replayed_id_is_rejected_until_it_leaves_the_window() -> None:
    store = InMemoryReplayStore()
    v = StandardWebhookVerifier([SECRET], tolerance=300, replay_store=store)
    first = headers(msg_id="msg_r")
    await v.verify(first, BODY, NOW)
    assert await rejected(v, first) == "replayed"
    # Re-signed with a fresh timestamp: still the same message id.
    assert await rejected(v, headers(msg_id="msg_r", ts=NOW + 5), now=NOW + 5) == "replayed"
    # Once the original timestamp is past the window the id is forgotten (an old copy would be
    # stale anyway) and the store holds nothing any more.
    later = NOW + 301
    await v.verify(headers(msg_id="msg_r", ts=later), BODY, later)
    assert len(store) == 1
    assert v.rejected == {"replayed": 2}


async def test_forged_messages_are_not_remembered() -> None:
    store = InMemoryReplayStore()
    v = StandardWebhookVerifier([SECRET], replay_store=store)
    assert await rejected(v, headers(OTHER, "msg_f")) == "forged"
    assert len(store) == 0
    await v.verify(headers(SECRET, "msg_f"), BODY, NOW)


async def test_the_in_memory_store_is_bounded() -> None:
    store = InMemoryReplayStore(max_entries=2)
    assert [await store.add(k, NOW + i, NOW) for i, k in enumerate("abc")] == [True] * 3
    assert len(store) == 2
    assert await store.add("c", NOW + 10, NOW) is False


@pytest.mark.parametrize("drop", ["webhook-id", "webhook-timestamp", "webhook-signature"])
async def test_missing_headers(drop: str) -> None:
    v = StandardWebhookVerifier([SECRET])
    hdrs = headers()
    del hdrs[drop]
    assert await rejected(v, hdrs) == "missing_headers"
    assert await rejected(v, hdrs | {drop: ""}) == "missing_headers"
    assert await rejected(v, {}) == "missing_headers"


MALFORMED = [
    {"webhook-timestamp": "1e9"},
    {"webhook-timestamp": "-1700000000"},
    {"webhook-timestamp": "nan"},
    {"webhook-timestamp": "\uff11\uff17\uff10\uff10"},  # fullwidth digits: isdigit(), not ASCII
    {"webhook-signature": "v1"},
    {"webhook-signature": "v1,not*base64"},
    {"webhook-signature": " ".join(["v1,AAAA"] * 17)},
    {"webhook-signature": "v1," + "A" * 5000},
    {"webhook-id": "x" * 257},
    {"webhook-id": "msg\n1"},
]


@pytest.mark.parametrize("override", MALFORMED, ids=[str(i) for i in range(len(MALFORMED))])
async def test_malformed_headers_are_rejected_as_malformed(override: dict[str, str]) -> None:
    v = StandardWebhookVerifier([SECRET])
    assert await rejected(v, headers() | override) == "malformed"


async def test_unsigned_webhooks_accept_anything() -> None:
    await UnsignedWebhooks().verify({}, b"anything", NOW)


@pytest.mark.parametrize(
    ("secrets", "error"),
    [
        ([], ValueError),
        (["short"], ValueError),
        (["whsec_***"], ValueError),
        ("whsec_" + "a" * 40, TypeError),
    ],
)
def test_bad_configuration_fails_at_construction(secrets: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        StandardWebhookVerifier(secrets)
    assert "***" not in str(info.value)  # a secret never appears in the message


def test_repr_shows_no_secret() -> None:
    assert SECRET not in repr(StandardWebhookVerifier([SECRET]))
    assert SECRET[6:] not in repr(StandardWebhookVerifier([SECRET]))


# -- a verified webhook that could not be applied is not a replay when the partner retries ------


class _FixedClock:
    def now(self) -> float:
        return NOW


class _FlakyStorage(MemoryStorage):
    """The next ``failures`` compare-and-sets fail as if the database were down."""

    failures = 0

    async def compare_and_set(self, payout: Any, **kw: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("database restarting")
        return await super().compare_and_set(payout, **kw)


async def _awaiting(storage: MemoryStorage, payout_id: str) -> None:
    p, _ = await storage.create_if_absent(
        Payout.new(PayoutRequest(id=payout_id), NOW, next_check_at=NOW + 10**6)
    )
    await storage.compare_and_set(replace(p, status=PayoutStatus.AWAITING), expected_version=1)
    if isinstance(storage, _FlakyStorage):
        storage.failures = 1


async def test_a_webhook_that_failed_after_verification_is_accepted_on_retry() -> None:
    storage = _FlakyStorage()
    verifier = StandardWebhookVerifier([SECRET])
    client = PayoutClient(
        storage=storage,
        partner=FakePartner(),
        webhook_url="http://service/webhook",
        webhook_verifier=verifier,
        clock=_FixedClock(),
        background=False,
    )
    async with client:
        await _awaiting(storage, "tx-1")
        with pytest.raises(StorageUnavailable):
            await client.handle_webhook(BODY, headers())
        # The partner retries the same message (same webhook-id): applied, not a replay.
        done = await client.handle_webhook(BODY, headers())
        assert done.status is PayoutStatus.COMPLETED
        # A third delivery of the applied message is a replay again.
        with pytest.raises(WebhookAuthError) as info:
            await client.handle_webhook(BODY, headers())
    assert info.value.reason is RejectReason.REPLAYED


async def test_a_partner_event_id_that_failed_is_accepted_on_retry() -> None:
    def with_event(body: Any, hdrs: Any) -> Webhook:
        return Webhook("tx-2", PartnerStatus.DECLINED, event_id="evt-9")

    storage = _FlakyStorage()
    client = PayoutClient(
        storage=storage,
        partner=FakePartner(),
        webhook_url="http://service/webhook",
        webhook_parser=with_event,
        webhook_replays=InMemoryReplayStore(),
        clock=_FixedClock(),
        background=False,
    )
    async with client:
        await _awaiting(storage, "tx-2")
        with pytest.raises(StorageUnavailable):
            await client.handle_webhook(b"{}")
        assert (await client.handle_webhook(b"{}")).status is PayoutStatus.DECLINED
        with pytest.raises(WebhookAuthError) as info:
            await client.handle_webhook(b"{}")
    assert info.value.reason is RejectReason.REPLAYED
