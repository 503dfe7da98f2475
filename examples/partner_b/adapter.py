"""Partner B's adapter: its codec, its webhook parser and verifier, and :func:`partner_b`.

Everything else (timeouts, what a 504 or a 409 means, when to re-send, status checks, the money
rule) stays in :class:`~resilient_payout.HttpPartner` and the client; README.md maps each part.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Context, Decimal
from typing import Any
from urllib.parse import quote

from resilient_payout import HttpPartner, InvalidWebhook, SubmitAttempt
from resilient_payout.partner import IdempotencyKeys, PartnerRecord, PartnerRequest, StatusWords
from resilient_payout.webhooks import (
    InMemoryReplayStore,
    RejectReason,
    ReplayStore,
    Webhook,
    WebhookAuthError,
    read_json_object,
)

__all__ = ["WORDS", "PartnerBCodec", "PartnerBVerifier", "parse_webhook", "partner_b", "to_minor"]

# Any other word (QUEUED, PROCESSING, a new ON_HOLD) is pending: only these settle a payout.
WORDS = StatusWords(completed=frozenset({"SUCCESS"}), declined=frozenset({"FAILED", "REJECTED"}))
MINOR_UNITS = {"KES": 2, "UGX": 0, "TZS": 2, "RWF": 0, "USD": 2, "BHD": 3}  # any other: 2
_KEYS = IdempotencyKeys(retention=24 * 3600.0, header="Idempotency-Key")
_REF = re.compile(r"PB-[A-Za-z0-9]{1,64}")
_DECIMAL = re.compile(r"[0-9]{1,38}(\.[0-9]{1,38})?")
_EXACT = Context(prec=120)  # above the 38 digits a stored request may have: scaling never rounds


def to_minor(amount: object, currency: str) -> int:
    """``amount`` in major units (an int, or a decimal string as requests store fractions) in
    minor units, exactly; :class:`ValueError` unless positive and a whole number of minor units."""
    if isinstance(amount, str) and _DECIMAL.fullmatch(amount):
        value = Decimal(amount)  # Decimal() alone would also take "1_000", " 5", "NaN"
    elif isinstance(amount, int) and not isinstance(amount, bool):
        value = Decimal(amount)
    else:
        raise ValueError("amount must be a number of major units")
    minor = value.scaleb(MINOR_UNITS.get(currency, 2), _EXACT)
    if not value > 0 or minor != minor.to_integral_value(context=_EXACT):
        raise ValueError(f"{amount} {currency} is not a positive whole number of minor units")
    return int(minor)


@dataclass(frozen=True, slots=True)
class PartnerBCodec:
    """``POST /v1/payouts`` with an ``Idempotency-Key``; ``GET /v1/payouts/{payout_id}``, or
    ``?reference={our id}`` while its reference is unknown.

    ``submit_request`` raises :class:`ValueError` for an amount Partner B cannot take: nothing
    is sent and HttpPartner refuses the payout. ``demo_amount`` stands in for a missing
    ``amount`` (the demo's app sends ids only); keep it None in production.
    """

    currency: str = "KES"
    demo_amount: int | str | None = None
    idempotency: IdempotencyKeys | None = _KEYS

    def submit_request(self, attempt: SubmitAttempt) -> PartnerRequest:
        currency = attempt.request.get("currency", self.currency)
        if not (isinstance(currency, str) and re.fullmatch("[A-Z]{3}", currency)):
            raise ValueError("currency must be three capital letters")
        body = {
            "reference": attempt.payout_id,
            "amount_minor": to_minor(attempt.request.get("amount", self.demo_amount), currency),
            "currency": currency,
            "beneficiary": attempt.request.get("beneficiary", {}),
            "callback_url": attempt.webhook_url,
        }
        key = {"Idempotency-Key": attempt.idempotency_key}
        return PartnerRequest("POST", "/v1/payouts", body, key)

    def check_request(self, payout_id: str, partner_ref: str | None) -> PartnerRequest:
        if partner_ref is not None:
            return PartnerRequest("GET", f"/v1/payouts/{quote(partner_ref, safe='')}")
        return PartnerRequest("GET", f"/v1/payouts?reference={quote(payout_id, safe='')}")

    def read_record(self, data: Any, payout_id: str, partner_ref: str | None) -> PartnerRecord:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - garbage is a value problem
        ref = data.get("payout_id")
        if not (isinstance(ref, str) and _REF.fullmatch(ref)):
            raise ValueError("payout_id is not a Partner B reference")
        if ref != (partner_ref or ref) or data.get("reference", payout_id) != payout_id:
            raise ValueError("the record is another transfer's")
        return PartnerRecord(WORDS.read(data.get("state")), ref)


def parse_webhook(body: bytes | str | dict[str, Any], headers: Mapping[str, str]) -> Webhook:
    """``{"event_id", "payout_id": "PB-...", "state"}``: it names only Partner B's reference."""
    data = read_json_object(body)
    ref, event_id = data.get("payout_id"), data.get("event_id")
    if not (isinstance(ref, str) and _REF.fullmatch(ref)):
        raise InvalidWebhook("payout_id is not a Partner B reference")
    if not (isinstance(event_id, str) and 0 < len(event_id) <= 128):
        raise InvalidWebhook("event_id must be a string of 1-128 characters")
    try:
        status = WORDS.read(data.get("state"))
    except ValueError as exc:
        raise InvalidWebhook(str(exc)) from None
    return Webhook(None, status, partner_ref=ref, event_id=event_id)


class PartnerBVerifier:
    """``X-PB-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">``: the timestamp within
    ``tolerance`` of ``now``, the HMAC compared in constant time, each signature accepted once
    (remembered until it would be stale anyway)."""

    def __init__(
        self, secret: str, *, tolerance: float = 300.0, replay_store: ReplayStore | None = None
    ) -> None:
        if len(secret.encode()) < 16 or not tolerance > 0:
            raise ValueError("the secret needs at least 16 bytes and tolerance must be > 0")
        self._key, self.tolerance = secret.encode(), tolerance
        self.replays = InMemoryReplayStore() if replay_store is None else replay_store

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        header = {k.lower(): v for k, v in headers.items()}.get("x-pb-signature", "")
        if not header:
            raise WebhookAuthError(RejectReason.MISSING_HEADERS, "X-PB-Signature is required")
        fields = {k: v for k, _, v in (part.partition("=") for part in header[:256].split(","))}
        ts, sig = fields.get("t", ""), fields.get("v1", "")
        if not (re.fullmatch("[0-9]{1,12}", ts) and re.fullmatch("[0-9a-f]{64}", sig)):
            raise WebhookAuthError(RejectReason.MALFORMED, "malformed X-PB-Signature")
        if abs(now - int(ts)) > self.tolerance:
            raise WebhookAuthError(RejectReason.STALE, "timestamp outside the tolerance")
        mac = hmac.new(self._key, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, sig):
            raise WebhookAuthError(RejectReason.FORGED, "signature does not match")
        if not await self.replays.add(f"pb:{sig}", int(ts) + self.tolerance, now):
            raise WebhookAuthError(RejectReason.REPLAYED, "signature already received")


def partner_b(base_url: str, codec: PartnerBCodec | None = None, **http: Any) -> HttpPartner:
    """Partner B: an HttpPartner with :class:`PartnerBCodec` (``http``: policy, client)."""
    return HttpPartner(base_url, codec=codec or PartnerBCodec(), **http)
