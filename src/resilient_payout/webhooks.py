"""Partner webhooks: authenticity checks, then parsing into typed, trusted values.

The exercise's partner POSTs ``{"id": "...", "status": "completed" | "declined" | "pending"}``
(:func:`parse_webhook`, the default). Another partner's shape is read by a
:class:`WebhookParser` of its own (body + headers -> :class:`Webhook`: our id or the partner's
reference, its status, its event id). Anything unreadable is an
:class:`~resilient_payout.InvalidWebhook`; the client then maps an unknown id or reference to
:class:`~resilient_payout.UnknownPayout` (a webhook never creates a payout).

Authenticity follows Standard Webhooks (https://www.standardwebhooks.com): the sender signs
``"{webhook-id}.{webhook-timestamp}.{body}"`` with HMAC-SHA256 and sends ``webhook-id``,
``webhook-timestamp`` (integer epoch seconds) and ``webhook-signature`` (space-separated
``v1,<base64>`` entries, one per secret in use, so keys can rotate without downtime).
:class:`StandardWebhookVerifier` checks them; :class:`UnsignedWebhooks` accepts anything and must
be chosen explicitly.

Why not the ``standardwebhooks`` package (1.1.0, evaluated): it is tiny and ships ``py.typed``,
but it reads the wall clock (``datetime.now``) with a fixed 5-minute tolerance, so it cannot run
on the loop's (virtual) clock; it takes one secret per instance; it decodes the body as UTF-8
and lets ``ValueError``/``binascii.Error`` escape on malformed headers instead of a verification
error; it has no replay protection and does not say *why* a message failed. The scheme itself is
a few lines of ``hmac``; this module implements it and is checked against the spec's test vector.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from ._errors import InvalidWebhook, WebhookAuthError
from ._model import ID_PATTERN, PartnerStatus
from ._replay import PostgresReplayStore, RedisReplayStore

__all__ = [
    "InMemoryReplayStore",
    "PostgresReplayStore",
    "RedisReplayStore",
    "RejectReason",
    "ReplayStore",
    "StandardWebhookVerifier",
    "UnsignedWebhooks",
    "Webhook",
    "WebhookAuthError",
    "WebhookParser",
    "WebhookVerifier",
    "parse_webhook",
    "read_json_object",
    "sign_webhook",
]

_MAX_BODY = 64 * 1024
_SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks prefix, not a secret
_MIN_KEY_BYTES = 16
# Bounds on attacker-controlled headers, so a hostile sender cannot make us hash much.
_MAX_MSG_ID = 256
_MAX_SIGNATURES = 16
_MAX_SIGNATURE_HEADER = 4096


class RejectReason(StrEnum):
    """Why a webhook failed authenticity checks (the label of the rejection counters)."""

    MISSING_HEADERS = "missing_headers"
    MALFORMED = "malformed"
    STALE = "stale"
    FORGED = "forged"
    REPLAYED = "replayed"
    NOT_CONFIGURED = "not_configured"
    """The receiver has no secret and was not told to accept unsigned webhooks."""


@runtime_checkable
class WebhookVerifier(Protocol):
    """Decides whether a webhook really comes from the partner, before its body is parsed."""

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """Return if authentic; raise :class:`WebhookAuthError` otherwise. ``now``: epoch s.

        Async because a shared replay store (Redis, a database) needs I/O.
        """
        ...


@runtime_checkable
class ReplayStore(Protocol):
    """Remembers webhook ids until they expire; shared by all processes in a fleet."""

    async def add(self, key: str, expires_at: float, now: float) -> bool:
        """Remember ``key`` until ``expires_at``; False if it is already remembered (a replay).

        Must be atomic (check-and-set): two concurrent deliveries of one id, one True.
        """
        ...


class InMemoryReplayStore:
    """A :class:`ReplayStore` for one process: a dict plus an expiry heap.

    At ``max_entries`` live ids the one closest to expiry is forgotten first: under such a flood
    replay protection weakens for the oldest ids instead of memory growing without bound.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    async def discard(self, key: str) -> None:
        """Forget ``key`` (its message failed after it was remembered; a retry may come)."""
        self._expiry.pop(key, None)  # its heap entry expires harmlessly

    async def add(self, key: str, expires_at: float, now: float) -> bool:
        self._prune(now)
        if key in self._expiry:
            return False
        while len(self._expiry) >= self.max_entries:
            _, old = heapq.heappop(self._heap)
            self._expiry.pop(old, None)
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return True

    def _prune(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            self._expiry.pop(key, None)


class UnsignedWebhooks:
    """Accepts every webhook unchecked. Only for a partner that cannot sign, on a trusted
    network: anyone who can reach the endpoint can then settle payouts."""

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        return None


def _key(secret: str) -> bytes:
    """``whsec_<base64>`` (the Standard Webhooks form) is decoded; any other string is used
    as its UTF-8 bytes."""
    if secret.startswith(_SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(_SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
    else:
        key = secret.encode()
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"a webhook secret must be at least {_MIN_KEY_BYTES} bytes")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign_webhook(
    secret: str | Sequence[str], msg_id: str, timestamp: float, body: bytes
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``: one ``v1`` signature per secret given."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    ts = int(timestamp)
    sigs = " ".join(
        "v1," + base64.b64encode(_signature(_key(s), msg_id, ts, body)).decode() for s in secrets
    )
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sigs}


class StandardWebhookVerifier:
    """Standard Webhooks HMAC-SHA256 verification with key rotation and replay protection.

    Args:
        secrets: every secret currently valid (during a rotation, the old and the new one); a
            message passes if any of its ``v1`` signatures matches any secret.
        tolerance: seconds a timestamp may be off ``now``, both ways (clock skew, retries).
        replay_store: remembers accepted ids until their timestamp leaves the window (older
            messages are stale anyway); an :class:`InMemoryReplayStore` by default, which is
            per process: several processes behind one URL need a shared store
            (:class:`RedisReplayStore`, :class:`PostgresReplayStore`).

    ``rejected`` counts rejections by :class:`RejectReason`. Secrets never appear in messages.
    """

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        tolerance: float = 300.0,
        replay_store: ReplayStore | None = None,
    ) -> None:
        if isinstance(secrets, str):
            raise TypeError("secrets must be a sequence of strings, not one string")
        if not secrets:
            raise ValueError("at least one webhook secret is needed")
        if not tolerance > 0:
            raise ValueError("tolerance must be > 0")
        self._keys = tuple(_key(s) for s in secrets)
        self.tolerance = tolerance
        # `is None`, not `or`: an empty store is falsy (it has __len__).
        self.replay_store: ReplayStore = (
            InMemoryReplayStore() if replay_store is None else replay_store
        )
        self.rejected: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"StandardWebhookVerifier(<{len(self._keys)} secrets>, tolerance={self.tolerance})"

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        try:
            await self._verify(headers, body, now)
        except WebhookAuthError as exc:
            self.rejected[exc.reason.value] = self.rejected.get(exc.reason.value, 0) + 1
            raise

    async def release(self, headers: Mapping[str, str]) -> None:
        """Forget a verified message's id because handling it failed (a 5xx, storage down):
        the partner's retry, which carries the same ``webhook-id``, is then accepted instead of
        refused as a replay. Only with a store that can ``discard`` (the in-memory one can)."""
        discard = getattr(self.replay_store, "discard", None)
        msg_id = {k.lower(): v for k, v in headers.items()}.get("webhook-id", "")
        if discard is not None and msg_id:
            await discard(msg_id)

    async def _verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        h = {k.lower(): v for k, v in headers.items()}
        msg_id, ts_text, sig_header = (
            h.get("webhook-id", ""),
            h.get("webhook-timestamp", ""),
            h.get("webhook-signature", ""),
        )
        if not (msg_id and ts_text and sig_header):
            raise WebhookAuthError(
                RejectReason.MISSING_HEADERS,
                "webhook-id, webhook-timestamp and webhook-signature are required",
            )
        if len(msg_id) > _MAX_MSG_ID or not msg_id.isprintable():
            raise WebhookAuthError(RejectReason.MALFORMED, "malformed webhook-id")
        # Integer seconds only: "1e9", "nan" or "-5" are not timestamps a signer produces.
        if not (ts_text.isascii() and ts_text.isdigit() and len(ts_text) <= 12):
            raise WebhookAuthError(RejectReason.MALFORMED, "malformed webhook-timestamp")
        timestamp = int(ts_text)
        if abs(now - timestamp) > self.tolerance:
            raise WebhookAuthError(
                RejectReason.STALE, f"timestamp outside the {self.tolerance:g} s tolerance"
            )
        candidates = self._signatures(sig_header)
        expected = [_signature(key, msg_id, timestamp, body) for key in self._keys]
        # Every pair is compared (no early exit), each in constant time.
        matched = False
        for sig in candidates:
            for exp in expected:
                matched |= hmac.compare_digest(sig, exp)
        if not matched:
            raise WebhookAuthError(RejectReason.FORGED, "no valid signature")
        # Remembered only once authentic: forged messages cannot fill or poison the store.
        if not await self.replay_store.add(msg_id, timestamp + self.tolerance, now):
            raise WebhookAuthError(RejectReason.REPLAYED, "webhook-id already received")

    @staticmethod
    def _signatures(header: str) -> list[bytes]:
        if len(header) > _MAX_SIGNATURE_HEADER:
            raise WebhookAuthError(RejectReason.MALFORMED, "webhook-signature too long")
        entries = header.split()
        if not entries or len(entries) > _MAX_SIGNATURES:
            raise WebhookAuthError(RejectReason.MALFORMED, "malformed webhook-signature")
        out: list[bytes] = []
        for entry in entries:
            version, sep, value = entry.partition(",")
            if not sep:
                raise WebhookAuthError(RejectReason.MALFORMED, "malformed webhook-signature")
            if version != "v1":
                continue  # other schemes (v1a: ed25519) may sit alongside; not ours to check
            try:
                out.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise WebhookAuthError(
                    RejectReason.MALFORMED, "malformed webhook-signature"
                ) from None
        if not out:
            raise WebhookAuthError(RejectReason.FORGED, "no v1 signature")
        return out


@dataclass(frozen=True, slots=True)
class Webhook:
    """A well-formed partner notification: it names our id, the partner's reference, or both.

    ``event_id`` is the partner's id of this notification (if it has one): with a replay store
    given to the client, a second webhook with the same event id is refused as a replay.
    """

    payout_id: str | None
    status: PartnerStatus
    partner_ref: str | None = None
    event_id: str | None = None

    def __post_init__(self) -> None:
        if self.payout_id is None and self.partner_ref is None:
            raise InvalidWebhook("a webhook must name our id or the partner's reference")


@runtime_checkable
class WebhookParser(Protocol):
    """Turns an authentic webhook (body and headers) into a :class:`Webhook`, raising
    :class:`~resilient_payout.InvalidWebhook` for anything it cannot read."""

    def __call__(
        self, body: bytes | str | dict[str, Any], headers: Mapping[str, str]
    ) -> Webhook: ...


def read_json_object(body: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """A webhook body as a JSON object (for parsers): bounded, or :class:`InvalidWebhook`."""
    data: Any = body
    if isinstance(body, bytes | str):
        if len(body) > _MAX_BODY:
            raise InvalidWebhook("webhook body too large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidWebhook("webhook body is not JSON") from exc
    if not isinstance(data, dict):
        raise InvalidWebhook("webhook body must be a JSON object")
    return data


def parse_webhook(
    body: bytes | str | dict[str, Any], headers: Mapping[str, str] | None = None
) -> Webhook:
    """The exercise's webhook ``{"id", "status"}`` (raw bytes/str or decoded JSON object)."""
    data = read_json_object(body)
    pid = data.get("id")
    status = data.get("status")
    if not isinstance(pid, str) or not pid:
        raise InvalidWebhook("webhook 'id' must be a non-empty string")

    if not re.fullmatch(ID_PATTERN, pid):
        raise InvalidWebhook("webhook 'id' has an invalid format")
    if not isinstance(status, str):
        raise InvalidWebhook("webhook 'status' must be a string")
    try:
        ps = PartnerStatus(status)
    except ValueError:
        raise InvalidWebhook(
            f"webhook status {status[:32]!r} is not one of "
            f"{', '.join(s.value for s in PartnerStatus)}"
        ) from None
    return Webhook(pid, ps)
