"""Plain data: payout requests and records, audit entries, outbox entries, partner outcomes.

Records are frozen dataclasses (cheap to copy with :func:`dataclasses.replace`, small in memory);
the app-facing request is a pydantic model because it is where untrusted input is validated.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ._errors import InvalidRequest

__all__ = [
    "Accepted",
    "AuditEntry",
    "Cause",
    "CheckFailed",
    "CheckOutcome",
    "Found",
    "IdempotencyKeys",
    "NotFound",
    "NotSent",
    "OutboxEntry",
    "PartnerStatus",
    "Payout",
    "PayoutRequest",
    "PayoutStatus",
    "RateLimited",
    "Refused",
    "SubmitAttempt",
    "SubmitOutcome",
    "Uncertain",
    "idempotency_key",
]

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"


class PayoutStatus(StrEnum):
    """Where a payout stands. ``completed``, ``declined`` and ``failed`` are final."""

    RECEIVED = "received"
    """Stored; the partner has not been asked yet (or must be asked again: it was never reached)."""
    SUBMITTING = "submitting"
    """Our POST to the partner is in flight."""
    AWAITING = "awaiting"
    """The partner has it; its final status is not known yet."""
    UNKNOWN = "unknown"
    """The POST's outcome is uncertain (504, timeout, reset after sending, crash)."""
    COMPLETED = "completed"
    DECLINED = "declined"
    FAILED = "failed"
    """The transfer did not happen: refused, or confirmed absent at the partner."""

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL: Final = frozenset({PayoutStatus.COMPLETED, PayoutStatus.DECLINED, PayoutStatus.FAILED})


class PartnerStatus(StrEnum):
    """The partner's vocabulary for a transaction."""

    PENDING = "pending"
    COMPLETED = "completed"
    DECLINED = "declined"

    @property
    def payout_status(self) -> PayoutStatus | None:
        """The final payout status this partner status means, or None for ``pending``."""
        if self is PartnerStatus.PENDING:
            return None
        return PayoutStatus(self.value)


class Cause(StrEnum):
    """Why a transition happened; recorded in the audit trail."""

    APP_REQUEST = "app_request"
    PARTNER_ANSWER = "partner_answer"
    WEBHOOK = "webhook"
    STATUS_CHECK = "status_check"
    RECOVERY = "recovery"
    OPERATOR = "operator"


FINGERPRINT_VERSION: Final = "v2:"
"""Prefix of the fingerprints :meth:`PayoutRequest.fingerprint` makes; 0.1.0's had none."""
MAX_DIGITS: Final = 38
"""A number must be below ``10**MAX_DIGITS`` in magnitude and have at most this many significant
digits and this many digits after the decimal point."""
MAX_DEPTH: Final = 32
"""Objects and arrays may be nested this deep in a request's values, no deeper."""


class PayoutRequest(BaseModel):
    """What the app asks for. ``id`` is the app's id and the idempotency key.

    Extra fields (an amount, a currency...) are kept and are part of the fingerprint: the same id
    with different contents is an :class:`~resilient_payout.IdempotencyConflict`.

    Every extra value is canonicalized however the request is built (HTTP body,
    ``client.submit(dict)``, ``PayoutRequest(...)``): numbers are exact, never binary floats; an
    integral number becomes an ``int`` (``100.0`` -> ``100``), any other its decimal string
    (``Decimal("100.50")`` -> ``"100.5"``). NaN, infinities, numbers beyond :data:`MAX_DIGITS`,
    nesting beyond :data:`MAX_DEPTH`, non-string keys and non-JSON values are refused. See
    docs/concepts.md, "The idempotency fingerprint".
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str = Field(min_length=1, max_length=128, pattern=ID_PATTERN)

    @model_validator(mode="before")
    @classmethod
    def _canonicalize(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # a model instance is canonical already; anything else fails validation
        errors: list[InitErrorDetails] = []
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key == "id":
                out[key] = value  # validated as a string: a number is no id
            elif isinstance(key, str):
                out[_plain_str(key)] = _canonical(value, (key,), errors)
            else:
                errors.append(_error((), "key_not_string", "field names must be strings", key))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return out

    @classmethod
    def parse(cls, data: Any) -> PayoutRequest:
        """Validate untrusted data, raising :class:`InvalidRequest` with a readable message."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequest(_validation_message(exc)) from exc

    def payload(self) -> dict[str, Any]:
        """The canonical request as plain JSON-able data (id and extra fields), as stored.

        Values are only ``None``, ``bool``, ``int``, ``str``, lists and dicts: a non-integral
        number is its decimal string (``"100.5"``).
        """
        return {"id": self.id, **_plain(self.model_extra or {})}

    def fingerprint(self) -> str:
        """``"v2:"`` + the sha256 of the canonical payload's JSON (sorted keys, compact)."""
        return FINGERPRINT_VERSION + _sha256_json(self.payload())

    def matches(self, fingerprint: str) -> bool:
        """Whether a stored fingerprint is this request's (a replay) rather than a conflict.

        A fingerprint without the ``"v2:"`` prefix was written by 0.1.0 over float-parsed
        numbers: it matches if this request, rendered as 0.1.0 saw it (non-integral numbers as
        floats; integral ones as ints, or all of them as floats), has that fingerprint.
        """
        if fingerprint.startswith(FINGERPRINT_VERSION):
            return fingerprint == self.fingerprint()
        marked = {"id": self.id, **(self.model_extra or {})}
        return any(fingerprint == _sha256_json(_legacy(marked, f)) for f in (False, True))


class _NumberText(str):
    """The canonical form of a non-integral number: a ``str`` that remembers it was a number.

    It is a plain string in the payload and the fingerprint (the number ``100.5`` and the string
    ``"100.5"`` are the same payload); only the 0.1.0 fingerprint, in :func:`_legacy`, tells.
    """

    __slots__ = ()


_NOT_FINITE: Final = "must be a finite number (NaN and Infinity are refused)"
_TOO_LARGE: Final = f"must be below 10**{MAX_DIGITS} in magnitude"
_TOO_PRECISE: Final = (
    f"must have at most {MAX_DIGITS} significant digits and {MAX_DIGITS} after the decimal point"
)


def _error(loc: tuple[str | int, ...], kind: str, msg: str, value: Any) -> InitErrorDetails:
    # The message never contains the value: request contents are not echoed in answers.
    return InitErrorDetails(type=PydanticCustomError(kind, msg), loc=loc, input=value)


def _plain_str(value: str) -> str:
    return value if type(value) is str else str.__str__(value)


def _canonical(value: Any, loc: tuple[str | int, ...], errors: list[InitErrorDetails]) -> Any:
    """The canonical form of one value (see :class:`PayoutRequest`); refusals go to ``errors``."""
    if value is None or isinstance(value, bool | _NumberText):
        return value
    if isinstance(value, str):
        return _plain_str(value)  # the app's strings are never touched (a subclass is unwrapped)
    if isinstance(value, int):
        if abs(value) >= 10**MAX_DIGITS:
            errors.append(_error(loc, "number_too_large", _TOO_LARGE, value))
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            errors.append(_error(loc, "number_not_finite", _NOT_FINITE, value))
            return None
        return _canonical_number(Decimal(repr(value)), loc, errors)  # its shortest repr
    if isinstance(value, Decimal):
        return _canonical_number(value, loc, errors)
    if isinstance(value, dict | list | tuple) and len(loc) > MAX_DEPTH:
        errors.append(_error(loc, "too_deep", f"nested deeper than {MAX_DEPTH} levels", None))
        return None
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, str):
                out[_plain_str(key)] = _canonical(item, (*loc, key), errors)
            else:
                errors.append(_error(loc, "key_not_string", "object keys must be strings", key))
        return out
    if isinstance(value, list | tuple):
        return [_canonical(item, (*loc, i), errors) for i, item in enumerate(value)]
    msg = "must be JSON data: a string, number, boolean, null, object or array"
    errors.append(_error(loc, "not_json", msg, None))
    return None


def _canonical_number(
    number: Decimal, loc: tuple[str | int, ...], errors: list[InitErrorDetails]
) -> int | str | None:
    """An exact number: an ``int`` if integral, else its decimal string without exponent or
    trailing zeros; None, with an error, if it is not finite or beyond :data:`MAX_DIGITS`."""
    if not number.is_finite():
        errors.append(_error(loc, "number_not_finite", _NOT_FINITE, number))
        return None
    if number.is_zero():
        return 0  # -0, 0.00, 0E+400
    if number.adjusted() >= MAX_DIGITS:  # checked before any int(): 1E+400 stays small
        errors.append(_error(loc, "number_too_large", _TOO_LARGE, number))
        return None
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite
    text = "".join(map(str, digits)).rstrip("0")
    exponent += len(digits) - len(text)
    if exponent >= 0:
        return int(("-" if sign else "") + text + "0" * exponent)
    if -exponent > MAX_DIGITS or len(text) > MAX_DIGITS:
        errors.append(_error(loc, "number_too_precise", _TOO_PRECISE, number))
        return None
    return _NumberText(format(Decimal((sign, tuple(map(int, text)), exponent)), "f"))


def _plain(value: Any) -> Any:
    """Canonical values with every :class:`_NumberText` as a plain ``str``."""
    if isinstance(value, str):
        return _plain_str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _legacy(value: Any, ints_as_floats: bool) -> Any:
    """Canonical values as 0.1.0 fingerprinted them: numbers with a fraction were floats."""
    if isinstance(value, _NumberText):
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool) and ints_as_floats:
        return float(value)
    if isinstance(value, dict):
        return {k: _legacy(v, ints_as_floats) for k, v in value.items()}
    if isinstance(value, list):
        return [_legacy(v, ints_as_floats) for v in value]
    return value


def _sha256_json(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of a payout's history: what happened, why, and what it changed."""

    at: float
    cause: Cause
    event: str
    from_status: PayoutStatus
    to_status: PayoutStatus
    detail: str | None = None
    conflict: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "at": self.at,
            "cause": self.cause.value,
            "event": self.event,
            "from": self.from_status.value,
            "to": self.to_status.value,
        }
        if self.detail is not None:
            d["detail"] = self.detail
        if self.conflict:
            d["conflict"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditEntry:
        return cls(
            at=float(d["at"]),
            cause=Cause(d["cause"]),
            event=str(d["event"]),
            from_status=PayoutStatus(d["from"]),
            to_status=PayoutStatus(d["to"]),
            detail=d.get("detail"),
            conflict=bool(d.get("conflict", False)),
        )


@dataclass(frozen=True, slots=True)
class Payout:
    """The durable record of one transfer. Only :func:`decide` makes a changed copy of it.

    ``version`` is the optimistic-concurrency counter: storage writes a new copy only if the stored
    version is the one the writer read. Times are seconds since the epoch, from the client's clock.
    """

    id: str
    fingerprint: str
    status: PayoutStatus
    created_at: float
    updated_at: float
    request: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    attempt: int = 0
    """Which partner attempt this is (1 = first); a second one only after confirmed absence."""
    posts: int = 0
    """POSTs to the partner started, including ones that surely never reached it."""
    send_failures: int = 0
    """Consecutive POSTs of this attempt that surely never reached the partner (or got 429)."""
    checks: int = 0
    """Status checks spent on this attempt."""
    attempt_started_at: float | None = None
    """When the latest POST of this attempt was decided (the late-arrival window counts from it)."""
    resends: int = 0
    """POSTs of this attempt after its first, with the same idempotency key (partners that
    honour one only, see :class:`IdempotencyKeys`)."""
    key_first_sent_at: float | None = None
    """When this attempt's idempotency key was first used: the partner keeps it from then."""
    answered_at: float | None = None
    """When the partner acknowledged the attempt without a final status (``pending``)."""
    next_check_at: float | None = None
    """When background work is next due (submit, recover or check); None once final."""
    partner_status: PartnerStatus | None = None
    reason: str | None = None
    resolved_by: Cause | None = None
    partner_ref: str | None = None
    """The partner's own reference for this transfer, once it named one (unique per payout)."""
    owner: str | None = None
    """The client instance holding this payout's open work: the one that created it (while
    ``received``) or whose POST is in flight (``submitting``); None otherwise. When that
    instance is gone, the payout is recovered at once (``owner_gone``), not after a timer."""
    nonce: str | None = None
    """Random per creating call: lets the creator recognize its own record when storage
    answered a create that had in fact committed as "exists" (a retried insert after a lost
    reply), so a new request is never taken for a replay."""
    audit: tuple[AuditEntry, ...] = ()

    @classmethod
    def new(
        cls,
        request: PayoutRequest,
        now: float,
        *,
        next_check_at: float,
        owner: str | None = None,
        nonce: str | None = None,
    ) -> Payout:
        return cls(
            owner=owner,
            nonce=nonce,
            id=request.id,
            fingerprint=request.fingerprint(),
            status=PayoutStatus.RECEIVED,
            created_at=now,
            updated_at=now,
            request=request.payload(),
            next_check_at=next_check_at,
            audit=(
                AuditEntry(
                    now, Cause.APP_REQUEST, "received", PayoutStatus.RECEIVED, PayoutStatus.RECEIVED
                ),
            ),
        )

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as storage backends keep it."""
        return {
            "id": self.id,
            "fingerprint": self.fingerprint,
            "status": self.status.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "request": self.request,
            "version": self.version,
            "attempt": self.attempt,
            "posts": self.posts,
            "send_failures": self.send_failures,
            "checks": self.checks,
            "attempt_started_at": self.attempt_started_at,
            "resends": self.resends,
            "key_first_sent_at": self.key_first_sent_at,
            "answered_at": self.answered_at,
            "next_check_at": self.next_check_at,
            "partner_status": self.partner_status.value if self.partner_status else None,
            "reason": self.reason,
            "resolved_by": self.resolved_by.value if self.resolved_by else None,
            "partner_ref": self.partner_ref,
            "owner": self.owner,
            "nonce": self.nonce,
            "audit": [a.to_dict() for a in self.audit],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Payout:
        ps = d.get("partner_status")
        rb = d.get("resolved_by")
        return cls(
            id=d["id"],
            fingerprint=d["fingerprint"],
            status=PayoutStatus(d["status"]),
            created_at=float(d["created_at"]),
            updated_at=float(d["updated_at"]),
            request=dict(d.get("request") or {}),
            version=int(d["version"]),
            attempt=int(d.get("attempt", 0)),
            posts=int(d.get("posts", 0)),
            send_failures=int(d.get("send_failures", 0)),
            checks=int(d.get("checks", 0)),
            attempt_started_at=d.get("attempt_started_at"),
            resends=int(d.get("resends", 0)),
            key_first_sent_at=d.get("key_first_sent_at"),
            answered_at=d.get("answered_at"),
            next_check_at=d.get("next_check_at"),
            partner_status=PartnerStatus(ps) if ps else None,
            reason=d.get("reason"),
            resolved_by=Cause(rb) if rb else None,
            partner_ref=d.get("partner_ref"),  # absent in documents written before 0.2
            owner=d.get("owner"),
            nonce=d.get("nonce"),
            audit=tuple(AuditEntry.from_dict(a) for a in d.get("audit", ())),
        )


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A final outcome waiting to be pushed to the app; written with the final transition.

    There is at most one entry per payout (storage inserts it only if absent), so the app can get
    the same outcome again but never a different one.
    """

    payout_id: str
    status: PayoutStatus
    created_at: float
    next_attempt_at: float
    attempts: int = 0
    delivered_at: float | None = None
    last_error: str | None = None
    dead_at: float | None = None
    """When delivery was given up on (dead-lettered); never claimed again until re-queued."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "payout_id": self.payout_id,
            "status": self.status.value,
            "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at,
            "attempts": self.attempts,
            "delivered_at": self.delivered_at,
            "last_error": self.last_error,
            "dead_at": self.dead_at,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OutboxEntry:
        return cls(
            payout_id=d["payout_id"],
            status=PayoutStatus(d["status"]),
            created_at=float(d["created_at"]),
            next_attempt_at=float(d["next_attempt_at"]),
            attempts=int(d.get("attempts", 0)),
            delivered_at=d.get("delivered_at"),
            last_error=d.get("last_error"),
            dead_at=d.get("dead_at"),  # absent in documents written before dead-lettering
        )


# --- partner outcomes: every answer (or non-answer) of the partner, classified ---------------


@dataclass(frozen=True, slots=True)
class Accepted:
    """The partner took the POST and answered with a status (final or ``pending``), and its own
    reference for the transfer if its answer names one."""

    status: PartnerStatus
    partner_ref: str | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """The partner refused the request (400/401/403/422): it will not happen."""

    http_status: int
    reason: str


@dataclass(frozen=True, slots=True)
class RateLimited:
    """HTTP 429: not accepted now; ``retry_after`` seconds if the partner said so."""

    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class NotSent:
    """The request surely never reached the partner (connection refused, DNS failure)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Uncertain:
    """The request may have reached the partner; its outcome is unknown (504, timeout, 5xx...).

    ``retry_after``: the partner asked us to come back later with the same idempotency key (a
    409 "still in progress"); only meaningful for partners that honour keys.
    """

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Found:
    """A status check found the partner's record (and its reference, if the answer names it)."""

    status: PartnerStatus
    partner_ref: str | None = None


@dataclass(frozen=True, slots=True)
class NotFound:
    """A status check found no record (HTTP 404)."""


@dataclass(frozen=True, slots=True)
class CheckFailed:
    """A status check told us nothing (5xx, garbage, timeout)."""

    reason: str


# --- what the partner adapter is given --------------------------------------------------------

_KEY_NAMESPACE: Final = uuid.UUID("6f1c1c9e-5b1e-4d0e-9a53-2f0e6d1a7c44")


def idempotency_key(payout_id: str, attempt: int) -> str:
    """The partner idempotency key of one attempt: a UUID derived from our id and the attempt
    number, so it is the same on every re-send of that attempt, from any process, and new only
    for a new attempt (which is made only after the previous one was confirmed absent)."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{payout_id}\x00{attempt}"))


@dataclass(frozen=True, slots=True)
class SubmitAttempt:
    """Everything a partner adapter needs to POST one transfer.

    ``request`` is the app's request as stored: ``id`` plus its extra fields (amount, currency,
    beneficiary...), canonical (numbers exact: ints or decimal strings, see
    :class:`PayoutRequest`). ``send`` counts the POSTs of this attempt (1 = first; more only for
    a partner that honours idempotency keys, each with the same ``idempotency_key``).
    """

    payout_id: str
    attempt: int
    request: Mapping[str, Any]
    webhook_url: str
    idempotency_key: str
    send: int = 1

    @classmethod
    def first(
        cls, payout_id: str, webhook_url: str, request: Mapping[str, Any] | None = None
    ) -> SubmitAttempt:
        """The first POST of attempt 1 (for tests and scripts)."""
        return cls(
            payout_id=payout_id,
            attempt=1,
            request=request if request is not None else {"id": payout_id},
            webhook_url=webhook_url,
            idempotency_key=idempotency_key(payout_id, 1),
        )


@dataclass(frozen=True, slots=True)
class IdempotencyKeys:
    """A partner's POST honours an idempotency key: a re-send with the same key within
    ``retention`` seconds of its first use returns the first request's result and never makes a
    second transfer, and an answer of 409 means the first is still in progress.

    The key travels in the ``header`` (e.g. ``Idempotency-Key``) or in a ``body_field`` (Wise's
    ``customerTransactionId``): the adapter puts :attr:`SubmitAttempt.idempotency_key` there.
    Declaring this lets the client re-send an uncertain POST at once instead of waiting out the
    late-arrival window (``Policy.max_resends``).
    """

    retention: float = 86_400.0
    header: str | None = "Idempotency-Key"
    body_field: str | None = None

    def __post_init__(self) -> None:
        if self.retention <= 0:
            raise ValueError("retention must be positive")
        if (self.header is None) == (self.body_field is None):
            raise ValueError("an idempotency key travels in exactly one of header, body_field")


SubmitOutcome = Accepted | Refused | RateLimited | NotSent | Uncertain
"""How a partner POST ended, classified: every answer, error or silence is one of these."""
CheckOutcome = Found | NotFound | RateLimited | CheckFailed
"""How a partner status check ended, classified."""
