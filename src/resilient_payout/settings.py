"""The service's settings: :class:`ServiceSettings`, read from ``RP_*`` variables.

Settings come from :meth:`ServiceSettings.from_env` (an unset or empty variable means the
default; an invalid value raises :class:`ValueError` naming the variable):

==================  ==========================  =================================================
variable            default                     meaning
==================  ==========================  =================================================
``RP_PARTNER_URL``  ``http://127.0.0.1:3000``   the partner's base URL
``RP_PUBLIC_URL``   ``http://127.0.0.1:3200``   our base URL as the partner reaches it;
                                                webhooks go to ``{public}/webhook``
``RP_CLIENT_URL``   ``http://127.0.0.1:3100``   the app's backend: ``PUT {client}/transaction``
``RP_PUSH_BODY``    ``flat``                    push body: ``flat`` ``{"id", "status"}`` or
                                                ``nested`` ``{"status": {"id", "status"}}``
``RP_STORAGE_URL``  ``sqlite:///payouts.db``    :func:`~resilient_payout.storage_from_url`
``RP_CHECK_RATE``   ``2.0``                     status checks per (scenario) second
``RP_CHECK_BURST``  ``2``                       status checks that may go out back to back
``RP_BUDGET_URL``   empty                       empty: a check budget per process
                                                (``LocalCheckBudget``); ``redis://...``: one
                                                ``RedisCheckBudget`` shared by every instance
                                                using the same Redis and key
``RP_BUDGET_KEY``   ``rp:budget``               the shared budget's Redis key
``RP_TIME_SCALE``   ``1.0``                     ``Policy().scaled(x)``: multiplies every
                                                duration, divides the check rate
``RP_HOST``         ``127.0.0.1``               address ``serve`` listens on
``RP_PORT``         ``3200``                    port ``serve`` listens on
``RP_MAX_WAIT``     ``30``                      cap of ``Prefer: wait`` and ``?wait=``, in real
                                                seconds (not scaled)
==================  ==========================  =================================================

Security settings (docs/security.md):

===============================  ==========  ==================================================
variable                         default     meaning
===============================  ==========  ==================================================
``RP_WEBHOOK_SECRETS``           empty       comma-separated Standard Webhooks secrets; set:
                                             webhooks must be signed by one of them
``RP_ALLOW_UNSIGNED_WEBHOOKS``   ``false``   with no secret: ``true`` accepts unsigned
                                             webhooks, ``false`` answers every webhook 401
                                             (payouts then settle by status checks)
``RP_WEBHOOK_TOLERANCE``         ``300``     seconds a webhook timestamp may be off, both ways
``RP_MAX_TRANSACTION_BODY``      ``16384``   bytes; a larger ``POST /transaction`` is a 413
``RP_MAX_WEBHOOK_BODY``          ``65536``   bytes; a larger ``POST /webhook`` is a 413
``RP_ID_FORMAT``                 ``token``   ``token``: 1-128 of ``[A-Za-z0-9._:-]``, starting
                                             alphanumeric; ``uuid``: a lowercase canonical UUID
``RP_EXTRA_FIELDS``              ``allow``   ``allow``: fields besides ``id`` are kept and part
                                             of the fingerprint; ``forbid``: they are a 422
===============================  ==========  ==================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from ._policy import Policy
from ._urls import redact_url as _redact
from .storage import storage_from_url
from .webhooks import (
    RejectReason,
    StandardWebhookVerifier,
    UnsignedWebhooks,
    WebhookAuthError,
    WebhookVerifier,
)

__all__ = ["ENV_VARS", "NoWebhookSecret", "ServiceSettings"]

ENV_VARS: Final[Mapping[str, str]] = {
    "RP_PARTNER_URL": "partner_url",
    "RP_PUBLIC_URL": "public_url",
    "RP_CLIENT_URL": "client_url",
    "RP_PUSH_BODY": "push_body",
    "RP_STORAGE_URL": "storage_url",
    "RP_CHECK_RATE": "check_rate",
    "RP_CHECK_BURST": "check_burst",
    "RP_BUDGET_URL": "budget_url",
    "RP_BUDGET_KEY": "budget_key",
    "RP_TIME_SCALE": "time_scale",
    "RP_HOST": "host",
    "RP_PORT": "port",
    "RP_MAX_WAIT": "max_wait",
    "RP_WEBHOOK_SECRETS": "webhook_secrets",
    "RP_ALLOW_UNSIGNED_WEBHOOKS": "allow_unsigned_webhooks",
    "RP_WEBHOOK_TOLERANCE": "webhook_tolerance",
    "RP_MAX_TRANSACTION_BODY": "max_transaction_body",
    "RP_MAX_WEBHOOK_BODY": "max_webhook_body",
    "RP_ID_FORMAT": "id_format",
    "RP_EXTRA_FIELDS": "extra_fields",
}
"""Environment variable -> :class:`ServiceSettings` field."""

_SECRET_FIELDS: Final = frozenset({"storage_url", "budget_url", "webhook_secrets"})
"""Never echoed in error messages or logs (a database URL may carry a password)."""
_MAX_WEBHOOK_BODY: Final = 64 * 1024
"""The most :func:`~resilient_payout.webhooks.parse_webhook` reads; caps ``max_webhook_body``."""


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL with a host, like http://127.0.0.1:3000")
    if parts.query or parts.fragment:
        raise ValueError("must be a base URL, without a query or fragment")
    _ = parts.port  # raises ValueError for a port out of range
    return value.rstrip("/")


class ServiceSettings(BaseModel):
    """Everything the example service needs; see the module docstring for the variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partner_url: str = "http://127.0.0.1:3000"
    public_url: str = "http://127.0.0.1:3200"
    client_url: str = "http://127.0.0.1:3100"
    push_body: Literal["flat", "nested"] = "flat"
    storage_url: str = "sqlite:///payouts.db"
    check_rate: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    check_burst: int = Field(default=2, ge=1)
    budget_url: str = ""
    budget_key: str = Field(default="rp:budget", min_length=1)
    time_scale: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=3200, ge=0, le=65_535)
    max_wait: float = Field(default=30.0, ge=0, allow_inf_nan=False)
    webhook_secrets: tuple[SecretStr, ...] = ()
    allow_unsigned_webhooks: bool = False
    webhook_tolerance: float = Field(default=300.0, gt=0, allow_inf_nan=False)
    max_transaction_body: int = Field(default=16 * 1024, ge=64, le=1024 * 1024)
    max_webhook_body: int = Field(default=_MAX_WEBHOOK_BODY, ge=64, le=_MAX_WEBHOOK_BODY)
    id_format: Literal["token", "uuid"] = "token"
    extra_fields: Literal["allow", "forbid"] = "allow"

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _split_secrets(cls, value: Any) -> Any:
        # RP_WEBHOOK_SECRETS is comma-separated: "new,old" while rotating.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_secrets")
    @classmethod
    def _check_secrets(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        # Built once to fail at startup; the message never contains the secret.
        if value:
            StandardWebhookVerifier([s.get_secret_value() for s in value])
        return value

    @field_validator("partner_url", "public_url", "client_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _base_url(value)

    @field_validator("storage_url")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        # Builds the (unopened) backend only to reject a bad URL at startup, not at first use.
        try:
            storage_from_url(value)
        except ValueError as exc:
            raise ValueError(str(exc).replace(value, _redact(value))) from None
        return value

    @field_validator("budget_url")
    @classmethod
    def _check_budget(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be empty or a Redis URL (redis://, rediss://, unix://)")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Settings from ``RP_*`` variables (``os.environ`` by default); ValueError if invalid."""
        env = os.environ if environ is None else environ
        data = {
            name: env[var].strip() for var, name in ENV_VARS.items() if env.get(var, "").strip()
        }
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(_explain(exc, data)) from None

    def replace(self, **changes: Any) -> ServiceSettings:
        """A validated copy with some fields changed (e.g. ``host``/``port`` from CLI flags)."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def webhook_url(self) -> str:
        """Where the partner POSTs webhooks: ``{public_url}/webhook``."""
        return f"{self.public_url}/webhook"

    @property
    def push_url(self) -> str:
        """Where outcomes are pushed: ``PUT {client_url}/transaction``."""
        return f"{self.client_url}/transaction"

    def policy(self) -> Policy:
        """The policy: defaults with this check budget, scaled by ``time_scale``."""
        base = Policy(check_rate=self.check_rate, check_burst=self.check_burst)
        return base if self.time_scale == 1 else base.scaled(self.time_scale)

    def webhook_verifier(self) -> WebhookVerifier:
        """A :class:`StandardWebhookVerifier` with the secrets; with none, unsigned webhooks are
        accepted only if ``allow_unsigned_webhooks``, else every webhook is rejected (401)."""
        if self.webhook_secrets:
            return StandardWebhookVerifier(
                [s.get_secret_value() for s in self.webhook_secrets],
                tolerance=self.webhook_tolerance,
            )
        return UnsignedWebhooks() if self.allow_unsigned_webhooks else NoWebhookSecret()


class NoWebhookSecret:
    """Fail closed: no secret and unsigned webhooks not allowed."""

    async def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        raise WebhookAuthError(
            RejectReason.NOT_CONFIGURED,
            "no webhook secret is configured and unsigned webhooks are not allowed",
        )


def _explain(exc: ValidationError, data: Mapping[str, str]) -> str:
    by_field = {name: var for var, name in ENV_VARS.items()}
    lines = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else ""
        var = by_field.get(name, name or "settings")
        shown = "" if name in _SECRET_FIELDS or name not in data else f"={data[name][:80]!r}"
        lines.append(f"  {var}{shown}: {str(err['msg']).removeprefix('Value error, ')}")
    return "invalid service settings:\n" + "\n".join(lines)
