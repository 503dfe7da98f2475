"""docker-compose.yml stays runnable without Docker: its commands parse with the real CLI, the
service's environment is valid ServiceSettings, every image builds from a Dockerfile that exists,
and the ports are the scenario's (partner 3000, client 3100, service 3200)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from resilient_payout import cli
from resilient_payout.fastapi import ENV_VARS, ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PORTS = {"partner": 3000, "client": 3100, "service": 3200}
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set in the environment: the defaults."""
    return _VAR.sub(lambda m: m.group(2) or "", text)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return dict(data["services"])


def command(services: dict[str, Any], name: str) -> list[str]:
    return [interpolate(str(part)) for part in services[name]["command"]]


def parse(services: dict[str, Any], name: str) -> argparse.Namespace:
    argv = command(services, name)
    assert argv[0] == "resilient-payout"
    try:
        return cli.build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{name}: the CLI refuses {argv}")


def environment(services: dict[str, Any], name: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in services[name].get("environment", {}).items()}


def test_services_and_profiles(services: dict[str, Any]) -> None:
    assert set(services) == {"partner", "service", "client", "postgres", "redis"}
    for name in PORTS:
        assert "profiles" not in services[name], name
    for name in ("postgres", "redis"):
        assert services[name]["profiles"] == ["servers"]


def test_ports_are_the_scenarios(services: dict[str, Any]) -> None:
    for name, port in PORTS.items():
        assert services[name]["ports"] == [f"{port}:{port}"], name
    assert (cli.DEFAULT_PARTNER_PORT, cli.DEFAULT_CLIENT_PORT, cli.DEFAULT_SERVICE_PORT) == (
        3000,
        3100,
        3200,
    )
    defaults = ServiceSettings(storage_url="memory://")
    assert [urlsplit(u).port for u in (defaults.partner_url, defaults.client_url)] == [3000, 3100]
    assert (urlsplit(defaults.public_url).port, defaults.port) == (3200, 3200)


def test_partner_command_parses(services: dict[str, Any]) -> None:
    ns = parse(services, "partner")
    assert ns.command == "mock-partner"
    assert (ns.host, ns.port, ns.seed, ns.time_scale) == ("0.0.0.0", 3000, 1, 1.0)


def test_client_command_parses(services: dict[str, Any]) -> None:
    ns = parse(services, "client")
    assert ns.command == "simulate"
    assert ns.api == "http://service:3200"
    assert ns.partner == "http://partner:3000"
    assert ns.listen == ("0.0.0.0", 3100)
    assert (ns.n, ns.rate, ns.time_scale, ns.push_shape) == (200, 10.0, 1.0, "flat")
    assert str(ns.json_path).startswith("/reports/")
    assert "/reports" in {v.split(":")[1] for v in services["client"]["volumes"]}


def test_client_command_is_accepted_by_the_simulator(services: dict[str, Any]) -> None:
    from resilient_payout.testing.simulator import config_from_args

    config = config_from_args(parse(services, "client"))
    assert config.listen_port == 3100


def test_service_command_and_environment_are_valid_settings(services: dict[str, Any]) -> None:
    ns = parse(services, "service")
    assert ns.command == "serve"
    env = environment(services, "service")
    assert set(env) <= set(ENV_VARS), set(env) - set(ENV_VARS)
    settings = ServiceSettings.from_env(env)
    assert (settings.host, settings.port) == ("0.0.0.0", 3200)
    assert settings.partner_url == "http://partner:3000"
    assert settings.webhook_url == "http://service:3200/webhook"
    assert settings.push_url == "http://client:3100/transaction"
    assert settings.storage_url == "sqlite:////data/payouts.db"
    assert "/data" in {v.split(":")[1] for v in services["service"]["volumes"]}
    # Every URL names a compose service on its scenario port.
    for url in (settings.partner_url, settings.public_url, settings.client_url):
        parts = urlsplit(url)
        assert parts.port == PORTS[str(parts.hostname)], url


def test_time_scale_and_push_shape_come_from_one_variable_each(services: dict[str, Any]) -> None:
    raw = {name: [str(p) for p in services[name]["command"]] for name in ("partner", "client")}
    env = services["service"]["environment"]
    scale = "${RP_TIME_SCALE:-1}"
    assert env["RP_TIME_SCALE"] == scale
    assert f"--time-scale={scale}" in raw["partner"]
    assert f"--time-scale={scale}" in raw["client"]
    assert env["RP_PUSH_BODY"] == "${RP_PUSH_BODY:-flat}"
    assert "--push-shape=${RP_PUSH_BODY:-flat}" in raw["client"]


def test_every_service_has_an_image_or_a_dockerfile_that_exists(services: dict[str, Any]) -> None:
    for name, spec in services.items():
        build = spec.get("build")
        if build is None:
            assert spec["image"], name
            continue
        context = ROOT / build["context"]
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), (name, dockerfile)
        text = dockerfile.read_text(encoding="utf-8")
        assert 'pip install ".[example]"' in text
        assert 'CMD ["resilient-payout", "serve"]' in text
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), (dockerfile, source)
        found = set(re.findall(r"\b(RP_\w+)=", text))
        assert found, dockerfile
        assert found <= set(ENV_VARS), found - set(ENV_VARS)
