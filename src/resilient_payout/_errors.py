"""The one exception tree of resilient_payout.

Everything the library raises on purpose derives from :class:`PayoutError`::

    PayoutError
    ├── InvalidRequest            the app's request is malformed (bad id, bad fields)
    ├── IdempotencyConflict       same id / idempotency key, different payload
    ├── UnknownPayout             no payout with that id
    ├── PayoutAlreadyFinal        an operator tried to settle a payout that is final already
    ├── WebhookError
    │   ├── InvalidWebhook        malformed body, or a status outside the partner's vocabulary
    │   └── WebhookRejected       failed authenticity checks: forged, stale or replayed
    │       └── WebhookAuthError  the same, with ``reason`` (a webhooks.RejectReason)
    ├── ConfigurationError        a setting or URL the library cannot use (also a ValueError)
    │   └── MissingExtra          an optional dependency is not installed (also an ImportError)
    ├── NotificationFailed        the app did not acknowledge a push (retried later)
    ├── StorageError
    │   ├── StorageUnavailable    the backend cannot be reached right now; retry later
    │   ├── ConcurrencyError      a compare-and-set kept losing races; retry later
    │   └── PartnerReferenceTaken another payout already holds this partner reference
    ├── Overloaded                this process is at its bound of work in flight; retry later
    └── ClientNotRunning          PayoutClient used outside ``async with``
        └── ShuttingDown          the client is draining (SIGTERM, a deploy); retry elsewhere

Partner failures are *not* exceptions: the partner adapter classifies every answer into a
typed outcome (see :mod:`resilient_payout.partner`) because each one is an ordinary event of
the payout lifecycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .webhooks import RejectReason

__all__ = [
    "ClientNotRunning",
    "ConcurrencyError",
    "ConfigurationError",
    "IdempotencyConflict",
    "InvalidRequest",
    "InvalidWebhook",
    "MissingExtra",
    "NotificationFailed",
    "Overloaded",
    "PartnerReferenceTaken",
    "PayoutAlreadyFinal",
    "PayoutError",
    "ShuttingDown",
    "StorageError",
    "StorageUnavailable",
    "UnknownPayout",
    "WebhookAuthError",
    "WebhookError",
    "WebhookRejected",
]


class PayoutError(Exception):
    """Base of every exception raised by resilient_payout on purpose."""


class InvalidRequest(PayoutError, ValueError):
    """The app's request cannot be accepted as it is (a client error, HTTP 422)."""


class IdempotencyConflict(PayoutError):
    """The id is known with a different payload (a client error, HTTP 409)."""

    def __init__(self, payout_id: str) -> None:
        super().__init__(f"payout {payout_id!r} exists with a different payload")
        self.payout_id = payout_id


class UnknownPayout(PayoutError, LookupError):
    """No payout has this id (HTTP 404)."""

    def __init__(self, payout_id: str) -> None:
        super().__init__(f"no payout with id {payout_id!r}")
        self.payout_id = payout_id


class PayoutAlreadyFinal(PayoutError):
    """An operator tried to settle a payout that is final already (HTTP 409); nothing changed.

    ``status`` is the final status it has (a string: this module imports no model)."""

    def __init__(self, payout_id: str, status: str) -> None:
        super().__init__(f"payout {payout_id!r} is final already ({status})")
        self.payout_id = payout_id
        self.status = status


class WebhookError(PayoutError):
    """A partner webhook was not accepted."""


class InvalidWebhook(WebhookError, ValueError):
    """Malformed webhook body, or a status the partner's vocabulary does not have."""


class WebhookRejected(WebhookError):
    """The webhook failed authenticity checks (bad signature, stale timestamp, replay)."""


class WebhookAuthError(WebhookRejected):
    """A :class:`~resilient_payout.WebhookRejected` that says why (``reason``)."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class ConfigurationError(PayoutError, ValueError):
    """A setting or URL the library cannot use (never echoing a URL's password)."""


class MissingExtra(ConfigurationError, ImportError):
    """An optional dependency is missing; the message is the ``pip install`` line that adds it.

    Also an :class:`ImportError` (``name`` is the missing module), so ``except ImportError``
    around an optional import still catches it.
    """

    def __init__(self, module: str, extra: str, needed_by: str) -> None:
        super().__init__(
            f"{needed_by} needs {module!r}, which is not installed: "
            f"pip install 'resilient-payout[{extra}]'"
        )
        self.name = module
        self.extra = extra


class NotificationFailed(PayoutError):
    """The app did not acknowledge a push (non-2xx answer, network error, timeout)."""


class StorageError(PayoutError):
    """A storage backend failed."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached or is locked; the operation may be retried later."""


class ConcurrencyError(StorageError):
    """A compare-and-set lost too many races in a row."""


class PartnerReferenceTaken(StorageError):
    """A write would give a payout a partner reference another payout already holds.

    Storage refuses it atomically (a unique index, or its equivalent inside one script) and
    writes nothing; the client records the claim as a conflict on the payout instead.
    """

    def __init__(self, partner_ref: str, holder_id: str | None) -> None:
        super().__init__(f"partner reference already held by payout {holder_id!r}")
        self.partner_ref = partner_ref
        self.holder_id = holder_id


class ClientNotRunning(PayoutError, RuntimeError):
    """The PayoutClient must be entered with ``async with`` before use."""


class ShuttingDown(ClientNotRunning):
    """The client is draining before it exits: it takes no new work, and finishes what it has.

    Nothing was written. Another instance (or this one once restarted) takes the request;
    ``retry_after`` is a hint in seconds.
    """

    def __init__(self, message: str = "shutting down", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(PayoutError):
    """This process already holds as much work as it was sized for; the request was refused
    before anything was written, so a retry (here after ``retry_after`` seconds, or at another
    instance) is safe."""

    def __init__(self, message: str = "overloaded", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
