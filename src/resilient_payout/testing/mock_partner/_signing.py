"""Standard Webhooks signing, a copy of ``resilient_payout.webhooks.sign_webhook`` so that the mock
stays an independent referee (tests check the two agree)."""

from __future__ import annotations

import base64
import hashlib
import hmac


def signing_key(secret: str) -> bytes:
    """The HMAC key: a ``whsec_`` secret is base64, anything else is used as UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[6:], validate=True)
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers for a body."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }
