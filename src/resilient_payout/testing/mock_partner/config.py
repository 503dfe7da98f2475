"""``MockPartnerConfig``: every knob of the mock partner, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ._signing import signing_key

__all__ = ["MockPartnerConfig"]


@dataclass(frozen=True, kw_only=True)
class MockPartnerConfig:
    """Everything the mock partner does, in unscaled seconds; ``time_scale`` multiplies them all.

    Probabilities of the answer faults are tried in order (timeout, 500, drop, garbage, pending
    answer); the first that hits decides the answer. Webhook faults apply to calls that send a
    webhook. ``p_500_after_recording`` and ``p_drop_after_recording`` say how often the transfer
    still happens behind a 500 or a dropped connection.
    """

    seed: int | str = 0
    time_scale: float = 1.0

    p_completed: float = 2 / 3
    answer_delay_min: float = 0.2
    answer_delay_max: float = 10.0

    p_timeout: float = 0.10
    timeout_after: float = 30.0
    p_late_landing_given_timeout: float = 0.5
    late_landing_min: float = 30.0
    late_landing_max: float = 120.0

    p_webhook: float = 0.8
    webhook_delay_min: float = 10.0
    webhook_delay_max: float = 30.0
    webhook_timeout: float = 5.0
    """Real seconds (not scaled) the default webhook client waits for the receiver."""

    rate_limit_checks: int = 5
    rate_limit_window: float = 1.0
    block_penalty: float = 60.0

    p_500: float = 0.0
    p_500_after_recording: float = 0.5
    p_drop: float = 0.0
    p_drop_after_recording: float = 0.5
    p_garbage: float = 0.0
    p_pending_answer: float = 0.0
    p_duplicate_webhook: float = 0.0
    p_out_of_order_webhook: float = 0.0
    p_webhook_before_answer: float = 0.0
    extra_webhook_lag_max: float = 5.0
    """A duplicate or stale webhook follows the real one after uniform(0, this) seconds."""
    webhook_secret: str | None = None
    """Set: every webhook carries Standard Webhooks signature headers made with this secret."""
    honor_idempotency_key: bool = False
    """True: a POST's ``Idempotency-Key`` header is honoured like Stripe's or Adyen's (the same
    key within ``idempotency_retention`` never makes a second transfer: it gets the first
    request's record, or a 409 while that request may still land). The exercise's partner
    honours none: off by default."""
    idempotency_retention: float = 86_400.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "webhook_secret":
                if value is not None:
                    signing_key(value)  # ValueError now rather than at the first webhook
                continue
            if f.name == "seed":
                if not isinstance(value, int | str) or isinstance(value, bool):
                    raise TypeError("seed must be an int or a str")
                continue
            if f.name == "honor_idempotency_key":
                if not isinstance(value, bool):
                    raise TypeError("honor_idempotency_key must be a bool")
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{f.name} must be finite and >= 0, got {value!r}")
            if f.name.startswith("p_") and value > 1:
                raise ValueError(f"{f.name} is a probability, got {value!r}")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        if not isinstance(self.rate_limit_checks, int) or self.rate_limit_checks < 1:
            raise ValueError("rate_limit_checks must be an int >= 1")
        if self.rate_limit_window <= 0:
            raise ValueError("rate_limit_window must be > 0")
        for low, high in (
            ("answer_delay_min", "answer_delay_max"),
            ("late_landing_min", "late_landing_max"),
            ("webhook_delay_min", "webhook_delay_max"),
        ):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} must not exceed {high}")

    def replace(self, **overrides: Any) -> MockPartnerConfig:
        """A copy with some fields changed (validated; unknown names raise ``ValueError``)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)
