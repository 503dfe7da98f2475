"""How :class:`~resilient_payout.partner.HttpPartner` speaks one partner's dialect.

The codec builds each request from what the client knows (a :class:`SubmitAttempt`, or an id and
the partner's reference) and reads the partner's record out of a 200 answer. It knows nothing of
HTTP statuses, timeouts or retries: what a 504, a reset or a 429 means is the money rule of
:mod:`resilient_payout.partner` and the same for every partner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

from .._http import clean_text
from .._model import IdempotencyKeys, PartnerStatus, SubmitAttempt

__all__ = [
    "ExerciseCodec",
    "PartnerCodec",
    "PartnerRecord",
    "PartnerRequest",
    "StatusWords",
]


@dataclass(frozen=True, slots=True)
class PartnerRequest:
    """One request to the partner: ``path`` is joined to the partner's base URL; ``json`` is
    sent as the body (None: no body)."""

    method: str
    path: str
    json: Any | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PartnerRecord:
    """What a 200 answer says: the transfer's status and the partner's own reference."""

    status: PartnerStatus
    partner_ref: str | None = None


@dataclass(frozen=True, slots=True)
class StatusWords:
    """The partner's status words, mapped to ours.

    Only the words in ``completed`` and ``declined`` are final. Any other string is ``pending``
    when ``unknown_is_pending`` (a new word a partner starts sending must never settle a payout
    by mistake), or unreadable otherwise (the answer is then garbage: ``Uncertain`` on a submit,
    ``CheckFailed`` on a check).
    """

    completed: frozenset[str]
    declined: frozenset[str]
    pending: frozenset[str] = frozenset()
    unknown_is_pending: bool = True

    def read(self, word: object) -> PartnerStatus:
        """Our status for ``word``; :class:`ValueError` (a short description) if unreadable."""
        if not isinstance(word, str):
            raise ValueError("status missing or not a string")  # noqa: TRY004 - garbage, a value
        if word in self.completed:
            return PartnerStatus.COMPLETED
        if word in self.declined:
            return PartnerStatus.DECLINED
        if word in self.pending or self.unknown_is_pending:
            return PartnerStatus.PENDING
        raise ValueError(f"status {clean_text(word)[:32]!r} outside the partner vocabulary")


@runtime_checkable
class PartnerCodec(Protocol):
    """One partner's request and answer shapes (see :class:`ExerciseCodec`).

    ``idempotency`` declares whether the partner's POST honours an idempotency key, and how it
    travels; a codec that declares one must put :attr:`SubmitAttempt.idempotency_key` there.
    """

    @property
    def idempotency(self) -> IdempotencyKeys | None: ...

    def submit_request(self, attempt: SubmitAttempt) -> PartnerRequest:
        """The POST for this attempt."""
        ...

    def check_request(self, payout_id: str, partner_ref: str | None) -> PartnerRequest:
        """The status check (``partner_ref``: the partner's reference once we know it)."""
        ...

    def read_record(self, data: Any, payout_id: str, partner_ref: str | None) -> PartnerRecord:
        """The record in a 200 answer's JSON ``data``, checked against what we asked for.

        Raises :class:`ValueError` with a short description when the body is not a record of
        this transfer: the answer then counts as garbage, never as a status.
        """
        ...


_EXERCISE_WORDS = StatusWords(
    completed=frozenset({"completed"}),
    declined=frozenset({"declined"}),
    pending=frozenset({"pending"}),
    # The exercise's vocabulary is closed: another word is a broken answer, not a new state.
    unknown_is_pending=False,
)


@dataclass(frozen=True, slots=True)
class ExerciseCodec:
    """The exercise's partner (``shared/scenario.md``), the default.

    ``POST /transaction`` with ``{"id", "webhookUrl"}``, ``GET /transaction/{id}``; answers are
    ``{"id", "status"}`` with ``completed``/``declined``/``pending``. It names no reference of
    its own: our id is the reference. The exercise's partner honours no idempotency key; declare
    ``idempotency`` for one that does (the mock partner's ``honor_idempotency_key``) and the key
    is sent where the declaration says.
    """

    idempotency: IdempotencyKeys | None = None

    def submit_request(self, attempt: SubmitAttempt) -> PartnerRequest:
        body: dict[str, Any] = {"id": attempt.payout_id, "webhookUrl": attempt.webhook_url}
        keys = self.idempotency
        if keys is None:
            return PartnerRequest("POST", "/transaction", body)
        if keys.body_field is not None:
            body[keys.body_field] = attempt.idempotency_key
            return PartnerRequest("POST", "/transaction", body)
        assert keys.header is not None  # IdempotencyKeys holds exactly one
        return PartnerRequest("POST", "/transaction", body, {keys.header: attempt.idempotency_key})

    def check_request(self, payout_id: str, partner_ref: str | None) -> PartnerRequest:
        return PartnerRequest("GET", f"/transaction/{quote(payout_id, safe='')}")

    def read_record(self, data: Any, payout_id: str, partner_ref: str | None) -> PartnerRecord:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - garbage is a value problem
        if data.get("id") != payout_id:
            raise ValueError("id does not match the request")
        return PartnerRecord(_EXERCISE_WORDS.read(data.get("status")))
