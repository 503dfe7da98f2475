"""ServiceSettings: RP_* variables, defaults, validation with clear messages, the policy."""

from __future__ import annotations

import pytest

from resilient_payout import Policy
from resilient_payout.service import ENV_VARS, ServiceSettings


def test_defaults_are_the_scenarios_ports_and_an_empty_variable_means_the_default() -> None:
    settings = ServiceSettings.from_env({"RP_PORT": "", "RP_PUSH_BODY": "  "})
    assert settings == ServiceSettings()
    assert settings.partner_url == "http://127.0.0.1:3000"
    assert settings.webhook_url == "http://127.0.0.1:3200/webhook"
    assert settings.push_url == "http://127.0.0.1:3100/transaction"
    assert (settings.host, settings.port, settings.push_body) == ("127.0.0.1", 3200, "flat")
    assert settings.storage_url == "sqlite:///payouts.db"
    assert (settings.check_rate, settings.check_burst, settings.max_wait) == (2.0, 2, 30.0)


def test_every_variable_is_read() -> None:
    env = {
        "RP_PARTNER_URL": "https://partner.example:8443/api/",
        "RP_PUBLIC_URL": "http://10.0.0.5:3200",
        "RP_CLIENT_URL": "http://app:3100",
        "RP_PUSH_BODY": "nested",
        "RP_STORAGE_URL": "memory://",
        "RP_CHECK_RATE": "4.5",
        "RP_CHECK_BURST": "3",
        "RP_TIME_SCALE": "0.01",
        "RP_HOST": "0.0.0.0",
        "RP_PORT": "8080",
        "RP_MAX_WAIT": "5",
        "RP_BUDGET_URL": "redis://127.0.0.1:6379/0",
        "RP_BUDGET_KEY": "k",
        "RP_WEBHOOK_SECRETS": "first-secret-0123456789,second-secret-0123456789",
        "RP_ALLOW_UNSIGNED_WEBHOOKS": "false",
        "RP_WEBHOOK_TOLERANCE": "120",
        "RP_MAX_TRANSACTION_BODY": "4096",
        "RP_MAX_WEBHOOK_BODY": "8192",
        "RP_ID_FORMAT": "uuid",
        "RP_EXTRA_FIELDS": "forbid",
        "RP_ROUTE_PREFIX": "/payouts",
        "RP_TRANSACTION_PATH": "/transfers",
        "RP_WEBHOOK_PATH": "/hooks",
        "RP_HEALTH_PATH": "/live",
        "RP_READY_PATH": "/ready",
        "RP_METRICS_PATH": "off",
        "RP_PUSH_PATH": "/outcomes",
        "RP_EXPOSE_PARTNER_REF": "true",
        "RP_ADMIN_TOKEN": "an-admin-token-0123456789",
        "RP_INSTANCE_ID": "pod-7",
        "RP_MAX_INFLIGHT_SUBMITS": "32",
        "RP_MAX_LOOP_LAG": "0.05",
        "RP_WORKERS": "3",
        "RP_SHUTDOWN_DELAY": "5",
    }
    assert set(env) == set(ENV_VARS)
    s = ServiceSettings.from_env(env)
    assert s.partner_url == "https://partner.example:8443/api"
    assert s.instance_id == "pod-7"
    assert (s.max_inflight_submits, s.max_loop_lag) == (32, 0.05)
    assert (s.workers, s.shutdown_delay) == (3, 5.0)
    assert s.webhook_url == "http://10.0.0.5:3200/payouts/hooks"
    assert s.push_url == "http://app:3100/outcomes"
    assert (s.budget_url, s.budget_key, s.webhook_tolerance) == (
        "redis://127.0.0.1:6379/0",
        "k",
        120.0,
    )
    assert (s.max_transaction_body, s.max_webhook_body, s.id_format, s.extra_fields) == (
        4096,
        8192,
        "uuid",
        "forbid",
    )
    assert not s.allow_unsigned_webhooks
    assert len(s.webhook_secrets) == 2
    assert (s.push_body, s.storage_url, s.host, s.port, s.max_wait) == (
        "nested",
        "memory://",
        "0.0.0.0",
        8080,
        5.0,
    )
    policy = s.policy()
    assert policy == Policy(check_rate=4.5, check_burst=3).scaled(0.01)
    assert policy.check_rate == pytest.approx(450.0)
    assert policy.late_arrival_window == pytest.approx(1.5)


def test_invalid_values_name_their_variable() -> None:
    env = {
        "RP_PARTNER_URL": "ftp://partner",
        "RP_PUSH_BODY": "deep",
        "RP_CHECK_BURST": "0",
        "RP_TIME_SCALE": "nan",
        "RP_PORT": "http",
        "RP_MAX_WAIT": "-1",
    }
    with pytest.raises(ValueError, match="invalid service settings") as info:
        ServiceSettings.from_env(env)
    lines = str(info.value).splitlines()[1:]
    assert [line.split("=")[0].strip() for line in lines] == [
        "RP_PARTNER_URL",
        "RP_PUSH_BODY",
        "RP_CHECK_BURST",
        "RP_TIME_SCALE",
        "RP_PORT",
        "RP_MAX_WAIT",
    ]
    assert "RP_PARTNER_URL='ftp://partner': must be an http(s) URL" in lines[0]


def test_a_bad_storage_url_fails_at_startup_without_echoing_its_password() -> None:
    with pytest.raises(ValueError, match="RP_STORAGE_URL: unsupported storage URL") as info:
        ServiceSettings.from_env({"RP_STORAGE_URL": "nosql://user:s3cret@db/payouts"})
    assert "s3cret" not in str(info.value)
    assert "'nosql'" in str(info.value)
    with pytest.raises(ValueError, match="not an SQLite URL"):
        ServiceSettings.from_env({"RP_STORAGE_URL": "sqlite://host/x.db"})


def test_replace_validates_like_from_env() -> None:
    settings = ServiceSettings().replace(port=9000, host="0.0.0.0")
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    with pytest.raises(ValueError, match="less than or equal to 65535"):
        settings.replace(port=70_000)
    with pytest.raises(ValueError, match="base URL"):
        settings.replace(public_url="http://service:3200/?x=1")
