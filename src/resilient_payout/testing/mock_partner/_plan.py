"""The pure part of the mock: each POST's fate, drawn up front from ``(seed, id, POST number)``.

No I/O and no clock: the same config, id and number always give the same :class:`Plan`, whatever
order concurrent requests arrive in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import MockPartnerConfig

FinalStatus = Literal["completed", "declined"]


class Answer(Enum):
    FINAL = "final"
    PENDING = "pending"
    TIMEOUT = "timeout"
    ERROR_500 = "500"
    DROP = "drop"
    GARBAGE = "garbage"


class Event(Enum):
    # The value orders events due at the same moment: the record changes before it is announced.
    FINAL = 0
    LAND = 1
    ANSWER = 2
    WEBHOOK = 3


@dataclass(frozen=True)
class Plan:
    """One POST's fate, drawn up front; times are unscaled seconds after the request."""

    status: FinalStatus
    answer: Answer
    answer_at: float
    record_at_once: bool
    final_at: float | None
    land_at: float | None
    webhooks: tuple[tuple[float, str], ...]

    def events(self) -> list[tuple[float, Event, str]]:
        out: list[tuple[float, Event, str]] = [(self.answer_at, Event.ANSWER, "")]
        if self.final_at is not None:
            out.append((self.final_at, Event.FINAL, self.status))
        if self.land_at is not None:
            out.append((self.land_at, Event.LAND, self.status))
        out.extend((at, Event.WEBHOOK, status) for at, status in self.webhooks)
        out.sort(key=lambda e: (e[0], e[1].value))
        return out

    def describe(self) -> str:
        """One log line's worth, in unscaled seconds."""
        answer = {
            Answer.FINAL: f"200 {self.status}",
            Answer.PENDING: "200 pending",
            Answer.TIMEOUT: "504",
            Answer.ERROR_500: "500",
            Answer.DROP: "drop",
            Answer.GARBAGE: "200 garbage",
        }[self.answer]
        if self.final_at is not None:
            record = f"final {self.status} at {self.final_at:.2f}s"
        elif self.land_at is not None:
            record = f"lands {self.status} at {self.land_at:.2f}s"
        else:
            record = "never recorded"
        hooks = ", ".join(f"{s} at {at:.2f}s" for at, s in self.webhooks) or "none"
        return f"answers {answer} at {self.answer_at:.2f}s; {record}; webhooks: {hooks}"

    def answer_key(self) -> str:
        """The ``answers`` counter this POST's answer counts under."""
        match self.answer:
            case Answer.FINAL:
                return self.status
            case Answer.PENDING:
                return "pending"
            case Answer.TIMEOUT:
                return "timeout"
            case _:
                return "error"


def draw(config: MockPartnerConfig, payout_id: str, number: int) -> Plan:
    """The plan of the ``number``-th POST (from 1) of ``payout_id``."""
    rng = random.Random(f"{config.seed}:{payout_id}:{number}")
    # Every draw is made, in a fixed order, whatever the branch: changing one knob then leaves
    # the other draws of a seed alone (p_500=1 keeps the same completed/declined outcomes).
    u_timeout, u_completed = rng.random(), rng.random()
    answer_delay = rng.uniform(config.answer_delay_min, config.answer_delay_max)
    u_late = rng.random()
    late_at = rng.uniform(config.late_landing_min, config.late_landing_max)
    u_webhook = rng.random()
    webhook_at = rng.uniform(config.webhook_delay_min, config.webhook_delay_max)
    u_500, u_500_rec, u_drop, u_drop_rec = rng.random(), rng.random(), rng.random(), rng.random()
    u_garbage, u_pending = rng.random(), rng.random()
    u_dup, dup_lag = rng.random(), rng.random() * config.extra_webhook_lag_max
    u_stale, stale_lag = rng.random(), rng.random() * config.extra_webhook_lag_max
    u_early = rng.random()

    status: FinalStatus = "completed" if u_completed < config.p_completed else "declined"
    if u_timeout < config.p_timeout:
        lands = u_late < config.p_late_landing_given_timeout
        return Plan(
            status=status,
            answer=Answer.TIMEOUT,
            answer_at=config.timeout_after,
            record_at_once=False,
            final_at=None,
            land_at=late_at if lands else None,
            webhooks=(),
        )
    transfer = True
    if u_500 < config.p_500:
        answer, transfer = Answer.ERROR_500, u_500_rec < config.p_500_after_recording
    elif u_drop < config.p_drop:
        answer, transfer = Answer.DROP, u_drop_rec < config.p_drop_after_recording
    elif u_garbage < config.p_garbage:
        answer = Answer.GARBAGE
    elif u_pending < config.p_pending_answer:
        answer = Answer.PENDING
    else:
        answer = Answer.FINAL
    answer_at = config.answer_delay_min if answer is Answer.PENDING else answer_delay
    if not transfer:
        return Plan(status, answer, answer_at, False, None, None, ())
    final_at = answer_delay
    webhooks: list[tuple[float, str]] = []
    if u_webhook < config.p_webhook:
        if u_early < config.p_webhook_before_answer:
            webhook_at = final_at = answer_delay / 2
        webhooks.append((webhook_at, status))
        if u_dup < config.p_duplicate_webhook:
            webhooks.append((webhook_at + dup_lag, status))
        if u_stale < config.p_out_of_order_webhook:
            webhooks.append((webhook_at + stale_lag, "pending"))
    return Plan(status, answer, answer_at, True, final_at, None, tuple(webhooks))
