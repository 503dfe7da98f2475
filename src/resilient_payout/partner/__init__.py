"""The partner seam: the :class:`Partner` protocol, :class:`HttpPartner` and its codecs.

A :class:`Partner` is given one :class:`SubmitAttempt` per POST (the payout id, the attempt
number, the app's request as stored, the webhook URL and this attempt's idempotency key) and the
partner's reference for each status check. It never raises for partner behaviour: every answer,
error and non-answer is classified into a typed outcome, because each one is an ordinary
lifecycle event:

==============================================  ===================================
what happened                                   outcome
==============================================  ===================================
200 with a readable record                      ``Accepted(status, partner_ref)``
400 / 401 / 403 / 422                           ``Refused(http_status, reason)``
the codec cannot encode it (``ValueError``)     ``Refused(0, reason)``, never sent
429                                             ``RateLimited(retry_after)``
connection refused, DNS failure (before send)   ``NotSent(reason)``
409 from a partner that honours keys            ``Uncertain(reason, retry_after)``
504, 5xx, read timeout, reset after sending,    ``Uncertain(reason)``
garbage body, any other status, an adapter
that raises
==============================================  ===================================

Status checks: 200 -> ``Found(status, partner_ref)``, 404 with an empty or JSON body ->
``NotFound()`` (a 404 page in HTML or text is a gateway's, not the partner's: ``CheckFailed``),
429 -> ``RateLimited``, anything else -> ``CheckFailed(reason)``. A ``Retry-After`` is passed on
as given; the client caps it at ``Policy.max_retry_after``.

The line that matters for money: ``NotSent`` only when the request surely never left this
process; anything after it may have left is ``Uncertain``, and the client never re-POSTs an
uncertain attempt with a new key. :class:`HttpPartner` keeps that line for every partner; a
:class:`PartnerCodec` only says how one partner's requests and answers look (docs/partners.md).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .._model import CheckOutcome, IdempotencyKeys, SubmitAttempt, SubmitOutcome
from ._codec import ExerciseCodec, PartnerCodec, PartnerRecord, PartnerRequest, StatusWords
from ._http import HttpPartner

__all__ = [
    "ExerciseCodec",
    "HttpPartner",
    "IdempotencyKeys",
    "Partner",
    "PartnerCodec",
    "PartnerRecord",
    "PartnerRequest",
    "StatusWords",
    "SubmitAttempt",
]


@runtime_checkable
class Partner(Protocol):
    """What the client needs from a payment partner.

    ``idempotency``: None if the partner's POST honours no idempotency key (an uncertain POST
    is then never re-sent before its absence is confirmed), else how it honours one.
    """

    @property
    def idempotency(self) -> IdempotencyKeys | None: ...

    async def submit(self, attempt: SubmitAttempt) -> SubmitOutcome:
        """POST the transfer. Must not raise for anything the partner or network does (if it
        raises anyway, the client takes the outcome as ``Uncertain``)."""
        ...

    async def check(self, payout_id: str, partner_ref: str | None = None) -> CheckOutcome:
        """Ask the partner for the transfer's status. Must not raise either."""
        ...
