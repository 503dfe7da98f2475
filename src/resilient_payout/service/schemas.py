"""The JSON bodies the service answers with (and the webhook body it documents).

Class names and docstrings are part of the OpenAPI document: they are its component names and
descriptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from .._model import Payout, PayoutStatus

__all__ = [
    "PROBLEM_TYPE_PREFIX",
    "AppStatus",
    "Health",
    "PartnerWebhook",
    "Problem",
    "ProblemFieldError",
    "Readiness",
    "TransactionStatus",
    "view",
]

PROBLEM_TYPE_PREFIX: Final = "tag:resilient-payout,2025:problem:"
"""Our problem types are ``PROBLEM_TYPE_PREFIX + slug`` (tag URIs: names, not web pages)."""

AppStatus = Literal["pending", "completed", "declined", "failed"]
"""A payout's status as the app sees it: ``pending`` until final."""
_APP_STATUS: Final[Mapping[PayoutStatus, AppStatus]] = {
    PayoutStatus.RECEIVED: "pending",
    PayoutStatus.SUBMITTING: "pending",
    PayoutStatus.AWAITING: "pending",
    PayoutStatus.UNKNOWN: "pending",
    PayoutStatus.COMPLETED: "completed",
    PayoutStatus.DECLINED: "declined",
    PayoutStatus.FAILED: "failed",
}


class TransactionStatus(BaseModel):
    """A payout as the app sees it."""

    id: str
    status: AppStatus = Field(description="`pending` until final")
    partner_ref: str | None = Field(
        default=None,
        description="The partner's reference, once known; only with `RP_EXPOSE_PARTNER_REF`",
    )


def view(payout: Payout, *, partner_ref: bool = False) -> TransactionStatus:
    """``payout`` as the app sees it: ``pending`` until final; with ``partner_ref``, the
    partner's reference too (when known)."""
    return TransactionStatus(
        id=payout.id,
        status=_APP_STATUS.get(payout.status, "pending"),
        partner_ref=payout.partner_ref if partner_ref else None,
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Ready: the payout client runs and its storage answered just now."""

    status: Literal["ready"] = "ready"


class ProblemFieldError(BaseModel):
    """One validation error (the offending input is never echoed)."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem details object (``application/problem+json``)."""

    type: str = Field(
        default="about:blank",
        description=f"`about:blank` for plain HTTP errors, else `{PROBLEM_TYPE_PREFIX}<slug>`",
    )
    title: str
    status: int
    detail: str
    instance: str = Field(description="the request path")
    errors: list[ProblemFieldError] | None = Field(
        default=None, description="validation errors (422 only)"
    )


# Documents ``POST /webhook`` only: the client parses the body itself, after authenticating it.
# No docstring (it would become the schema's description); the title is the one it always had.
class PartnerWebhook(BaseModel):
    model_config = ConfigDict(title="_PartnerWebhook")

    id: str
    status: Literal["pending", "completed", "declined"]
