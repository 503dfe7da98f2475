"""Parsing partner webhooks into typed, trusted values.

The partner POSTs ``{"id": "...", "status": "completed" | "declined" | "pending"}``. Anything
else is an :class:`~resilient_payout.InvalidWebhook`; the client then maps an unknown id to
:class:`~resilient_payout.UnknownPayout` (a webhook never creates a payout).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidWebhook
from ._model import ID_PATTERN, PartnerStatus

__all__ = ["Webhook", "parse_webhook"]

_MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Webhook:
    """A well-formed partner notification."""

    payout_id: str
    status: PartnerStatus


def parse_webhook(body: bytes | str | dict[str, Any]) -> Webhook:
    """Validate a webhook body (raw bytes/str or already-decoded JSON object)."""
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
