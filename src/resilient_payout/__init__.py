"""resilient-payout: move money through a slow, flaky, half-honest partner API.

Exactly one correct final outcome per transfer, durably, with idempotent submits, webhook
correlation, budgeted status checks and an outbox for notifications. See README.md.
"""

from __future__ import annotations

from ._client import ClientStats, PayoutClient, SubmitResult
from ._clock import Clock, LoopClock
from ._errors import (
    ClientNotRunning,
    ConcurrencyError,
    IdempotencyConflict,
    InvalidRequest,
    InvalidWebhook,
    PayoutError,
    StorageError,
    StorageUnavailable,
    UnknownPayout,
    WebhookError,
    WebhookRejected,
)
from ._lifecycle import (
    CheckStatus,
    ConflictDetected,
    Decision,
    Effect,
    Event,
    Notify,
    OperatorResolved,
    PartnerAnswered,
    StatusChecked,
    SubmitNow,
    SubmitToPartner,
    WebhookReceived,
    WorkDue,
    decide,
    plan_next_check,
)
from ._model import (
    Accepted,
    AuditEntry,
    Cause,
    CheckFailed,
    CheckOutcome,
    Found,
    NotFound,
    NotSent,
    OutboxEntry,
    PartnerStatus,
    Payout,
    PayoutRequest,
    PayoutStatus,
    RateLimited,
    Refused,
    SubmitOutcome,
    Uncertain,
)
from ._policy import Policy
from ._version import __version__
from .notify import CallbackNotifier, HttpNotifier, NotificationFailed, Notifier
from .partner import HttpPartner, Partner
from .reconcile import CheckBudget, LocalCheckBudget
from .storage import Storage, storage_from_url
from .webhooks import Webhook, parse_webhook

__all__ = [
    "Accepted",
    "AuditEntry",
    "CallbackNotifier",
    "Cause",
    "CheckBudget",
    "CheckFailed",
    "CheckOutcome",
    "CheckStatus",
    "ClientNotRunning",
    "ClientStats",
    "Clock",
    "ConcurrencyError",
    "ConflictDetected",
    "Decision",
    "Effect",
    "Event",
    "Found",
    "HttpNotifier",
    "HttpPartner",
    "IdempotencyConflict",
    "InvalidRequest",
    "InvalidWebhook",
    "LocalCheckBudget",
    "LoopClock",
    "NotFound",
    "NotSent",
    "NotificationFailed",
    "Notifier",
    "Notify",
    "OperatorResolved",
    "OutboxEntry",
    "Partner",
    "PartnerAnswered",
    "PartnerStatus",
    "Payout",
    "PayoutClient",
    "PayoutError",
    "PayoutRequest",
    "PayoutStatus",
    "Policy",
    "RateLimited",
    "Refused",
    "StatusChecked",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "SubmitNow",
    "SubmitOutcome",
    "SubmitResult",
    "SubmitToPartner",
    "Uncertain",
    "UnknownPayout",
    "Webhook",
    "WebhookError",
    "WebhookReceived",
    "WebhookRejected",
    "WorkDue",
    "__version__",
    "decide",
    "parse_webhook",
    "plan_next_check",
    "storage_from_url",
]
