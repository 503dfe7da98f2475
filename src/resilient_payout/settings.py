"""The service's settings: :class:`ServiceSettings`, read from ``RP_*`` variables.

Settings come from :meth:`ServiceSettings.from_env` (an unset or empty variable means the
default; an invalid value raises :class:`ValueError` naming the variable):

==================  ==========================  =================================================
variable            default                     meaning
==================  ==========================  =================================================
``RP_PARTNER_URL``  ``http://127.0.0.1:3000``   the partner's base URL
``RP_PUBLIC_URL``   ``http://127.0.0.1:3200``   our base URL as the partner reaches it;
                                                webhooks go to ``{public}{prefix}{webhook}``
``RP_CLIENT_URL``   ``http://127.0.0.1:3100``   the app's backend: ``PUT {client}{push path}``
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
``RP_INSTANCE_ID``  random per process          this process's name in storage; keep it stable
                                                across restarts of one slot (pod name) so a
                                                restarted instance recovers its own open
                                                submits at once; unique among live processes
==================  ==========================  =================================================

Only ``resilient-payout serve`` reads these (docs/deploying.md):

=====================  =======  ============================================================
variable               default  meaning
=====================  =======  ============================================================
``RP_WORKERS``         ``1``    processes sharing one listening socket, each its own client
                                named ``<RP_INSTANCE_ID or host name>-<i>``
``RP_SHUTDOWN_DELAY``  ``0``    real seconds from SIGTERM (readiness 503 at once) until the
                                listener closes, e.g. the load balancer's readiness period
=====================  =======  ============================================================

Routes and paths (docs/embedding.md); a path is ``/`` then segments of ``[A-Za-z0-9._~-]``:

=============================  ================  ===============================================
variable                       default           meaning
=============================  ================  ===============================================
``RP_ROUTE_PREFIX``            empty             where the routes sit in the app serving them
                                                 (``include_router(..., prefix=...)``), e.g.
                                                 ``/payouts``; part of the webhook URL
``RP_TRANSACTION_PATH``        ``/transaction``  ``POST`` it, ``GET`` it ``/{id}``
``RP_WEBHOOK_PATH``            ``/webhook``      the partner's ``POST``
``RP_HEALTH_PATH``             ``/healthz``      liveness; ``off``: not served
``RP_READY_PATH``              ``/readyz``       readiness; ``off``: not served
``RP_METRICS_PATH``            ``/metrics``      Prometheus; ``off``: not served
``RP_PUSH_PATH``               ``/transaction``  outcomes are ``PUT {client}{push path}``
``RP_EXPOSE_PARTNER_REF``      ``false``         ``true``: ``GET`` answers carry the partner's
                                                 reference (``partner_ref``) once known
=============================  ================  ===============================================

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
``RP_MAX_INFLIGHT_SUBMITS``      ``64``      ``POST /transaction`` requests handled at once;
                                             one more is a 503 ``overloaded`` before its body
                                             is read (nothing written); ``0``: no bound
``RP_MAX_LOOP_LAG``              ``0.01``    seconds the event loop may be behind before a
                                             ``POST /transaction`` is a 503 ``overloaded``
                                             (the same way); ``0``: no bound
``RP_ID_FORMAT``                 ``token``   ``token``: 1-128 of ``[A-Za-z0-9._:-]``, starting
                                             alphanumeric; ``uuid``: a lowercase canonical UUID
``RP_EXTRA_FIELDS``              ``allow``   ``allow``: fields besides ``id`` are kept and part
                                             of the fingerprint; ``forbid``: they are a 422
``RP_ADMIN_TOKEN``               empty       the bearer token of the admin API and ops page
                                             (at least 24 characters); empty: they are off
                                             (docs/operations.md)
===============================  ==========  ==================================================
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ._errors import MissingExtra
from ._policy import Policy
from ._urls import redact_url as _redact
from .storage import storage_from_url
from .webhooks import (
    RejectReason,
    ReplayStore,
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
    "RP_MAX_INFLIGHT_SUBMITS": "max_inflight_submits",
    "RP_MAX_LOOP_LAG": "max_loop_lag",
    "RP_ID_FORMAT": "id_format",
    "RP_EXTRA_FIELDS": "extra_fields",
    "RP_ADMIN_TOKEN": "admin_token",
    "RP_ROUTE_PREFIX": "route_prefix",
    "RP_TRANSACTION_PATH": "transaction_path",
    "RP_WEBHOOK_PATH": "webhook_path",
    "RP_HEALTH_PATH": "health_path",
    "RP_READY_PATH": "ready_path",
    "RP_METRICS_PATH": "metrics_path",
    "RP_PUSH_PATH": "push_path",
    "RP_EXPOSE_PARTNER_REF": "expose_partner_ref",
    "RP_INSTANCE_ID": "instance_id",
    "RP_WORKERS": "workers",
    "RP_SHUTDOWN_DELAY": "shutdown_delay",
}
"""Environment variable -> :class:`ServiceSettings` field."""

_SECRET_FIELDS: Final = frozenset({"storage_url", "budget_url", "webhook_secrets", "admin_token"})
"""Never echoed in error messages or logs (a database URL may carry a password)."""
_MAX_WEBHOOK_BODY: Final = 64 * 1024
"""The most :func:`~resilient_payout.webhooks.parse_webhook` reads; caps ``max_webhook_body``."""


_PATH: Final = re.compile(r"(/[A-Za-z0-9._~-]+)+")
"""A route path or prefix: no trailing slash, no parameters, nothing that needs escaping."""


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
    max_inflight_submits: int = Field(default=64, ge=0, le=100_000)
    max_loop_lag: float = Field(default=0.01, ge=0, le=60, allow_inf_nan=False)
    id_format: Literal["token", "uuid"] = "token"
    extra_fields: Literal["allow", "forbid"] = "allow"
    admin_token: SecretStr | None = None
    route_prefix: str = ""
    transaction_path: str = "/transaction"
    webhook_path: str = "/webhook"
    health_path: str = "/healthz"
    ready_path: str = "/readyz"
    metrics_path: str = "/metrics"
    push_path: str = "/transaction"
    expose_partner_ref: bool = False
    instance_id: str | None = Field(default=None, min_length=1, max_length=100)
    workers: int = Field(default=1, ge=1, le=256)
    shutdown_delay: float = Field(default=0.0, ge=0, le=3600, allow_inf_nan=False)

    @field_validator("admin_token")
    @classmethod
    def _check_admin_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Long enough not to be guessed online; the message never contains the token.
        if value is not None and len(value.get_secret_value().strip()) < 24:
            raise ValueError("must be at least 24 characters (e.g. `openssl rand -hex 24`)")
        return value

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

    @field_validator("transaction_path", "webhook_path", "push_path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not _PATH.fullmatch(value):
            raise ValueError("must be a path like /transaction (segments of [A-Za-z0-9._~-])")
        return value

    @field_validator("route_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if value and not _PATH.fullmatch(value):
            raise ValueError("must be empty or a path like /payouts (segments of [A-Za-z0-9._~-])")
        return value

    @field_validator("health_path", "ready_path", "metrics_path")
    @classmethod
    def _check_optional_path(cls, value: str) -> str:
        # An empty variable means the default (as for every variable): "off" turns a route off.
        if value in ("", "off"):
            return ""
        if not _PATH.fullmatch(value):
            raise ValueError("must be off or a path like /healthz (segments of [A-Za-z0-9._~-])")
        return value

    @model_validator(mode="after")
    def _distinct_paths(self) -> ServiceSettings:
        paths = [self.transaction_path, self.webhook_path, self.health_path, self.ready_path,
                 self.metrics_path]  # fmt: skip
        served = [p for p in paths if p]
        if len(set(served)) < len(served):
            raise ValueError("RP_TRANSACTION_PATH, RP_WEBHOOK_PATH, RP_HEALTH_PATH, "
                             "RP_READY_PATH and RP_METRICS_PATH must differ")  # fmt: skip
        return self

    @field_validator("storage_url")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        # Builds the (unopened) backend only to reject a bad URL at startup, not at first use.
        try:
            storage_from_url(value)
        except MissingExtra:
            pass  # not a bad setting: building the storage says which pip install it needs
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
        """Where the partner POSTs webhooks: ``{public_url}{route_prefix}{webhook_path}``."""
        return f"{self.public_url}{self.route_prefix}{self.webhook_path}"

    @property
    def push_url(self) -> str:
        """Where outcomes are pushed: ``PUT {client_url}{push_path}``."""
        return f"{self.client_url}{self.push_path}"

    def policy(self) -> Policy:
        """The policy: defaults with this check budget, scaled by ``time_scale``."""
        base = Policy(check_rate=self.check_rate, check_burst=self.check_burst)
        return base if self.time_scale == 1 else base.scaled(self.time_scale)

    def webhook_verifier(self, replay_store: ReplayStore | None = None) -> WebhookVerifier:
        """A :class:`StandardWebhookVerifier` with the secrets (and ``replay_store``: by default
        one in this process's memory); with none, unsigned webhooks are accepted only if
        ``allow_unsigned_webhooks``, else every webhook is rejected (401)."""
        if self.webhook_secrets:
            return StandardWebhookVerifier(
                [s.get_secret_value() for s in self.webhook_secrets],
                tolerance=self.webhook_tolerance,
                replay_store=replay_store,
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
