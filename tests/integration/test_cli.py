"""The ``resilient-payout`` command line: parsing, ``demo`` validation, process cleanup, and one
real ``demo`` run (mock partner and service as subprocesses on free 127.0.0.1 ports)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from resilient_payout import __version__, cli
from resilient_payout._urls import redact_url
from resilient_payout.cli import build_parser, main, partner_config, serve_settings
from resilient_payout.cli._procs import Child, prepare_logs, stop, tune_gc
from resilient_payout.testing.mock_partner import MockPartnerConfig
from resilient_payout.testing.simulator import config_from_args

needs_service = pytest.mark.skipif(
    importlib.util.find_spec("resilient_payout.fastapi") is None,
    reason="the example service (resilient_payout.fastapi) is not in this tree yet",
)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def port_free(port: int) -> bool:
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def processes_on(ports: list[int]) -> list[int]:
    """Pids of ``resilient_payout.cli`` processes started with ``--port`` one of ``ports``."""
    needles = [f"--port\0{port}\0".encode() for port in ports]
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if b"resilient_payout.cli" in cmdline and any(n in cmdline for n in needles):
                found.append(int(entry.name))
    return found


# -- top level ------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"resilient-payout {__version__}"


def test_python_dash_m_resilient_payout_is_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "resilient_payout", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"resilient-payout {__version__}")


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


# -- serve ----------------------------------------------------------------------------------


def test_serve_flags_parse() -> None:
    ns = parse(
        *("serve", "--host", "0.0.0.0", "--port", "8080", "--storage", "sqlite:///x.db"),
        *(
            "--partner-url",
            "http://p:1",
            "--public-url",
            "http://s:2",
            "--client-url",
            "http://c:3",
        ),
        *("--push-body", "nested", "--time-scale", "0.1", "--check-rate", "3.5"),
        *("--check-burst", "4", "--max-wait", "10", "--log-level", "debug", "--access-log"),
    )

    assert ns.handler is cli.serve.run
    assert (ns.host, ns.port, ns.storage) == ("0.0.0.0", 8080, "sqlite:///x.db")
    assert (ns.partner_url, ns.public_url, ns.client_url) == (
        "http://p:1",
        "http://s:2",
        "http://c:3",
    )
    assert (ns.push_body, ns.time_scale, ns.check_rate, ns.check_burst) == ("nested", 0.1, 3.5, 4)
    assert (ns.max_wait, ns.log_level, ns.access_log) == (10.0, "debug", True)


def test_serve_without_flags_leaves_every_setting_to_the_environment() -> None:
    ns = parse("serve")

    assert all(getattr(ns, dest) is None for dest in cli.serve.SERVE_ENV)


@needs_service
def test_serve_flags_override_the_environment() -> None:
    environ = {"RP_PORT": "9000", "RP_CHECK_RATE": "1.5", "RP_PUSH_BODY": "nested"}
    ns = parse("serve", "--port", "8080", "--storage", "memory://", "--time-scale", "0.5")

    settings = serve_settings(ns, environ)

    assert (settings.port, settings.storage_url, settings.time_scale) == (8080, "memory://", 0.5)
    assert (settings.check_rate, settings.push_body) == (1.5, "nested")


@needs_service
def test_serve_refuses_an_unknown_storage_scheme(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--storage", "bogus://x", "--port", str(free_ports(1)[0])]) == 2
    assert "unsupported storage URL scheme 'bogus'" in capsys.readouterr().err


def test_serve_names_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--storage", "memory://", "--port", str(port)]) == 2
    assert f"port {port} is already in use on 127.0.0.1" in capsys.readouterr().err


# -- mock-partner ---------------------------------------------------------------------------


def test_mock_partner_defaults() -> None:
    ns = parse("mock-partner")

    assert (ns.host, ns.port, ns.log_level) == ("127.0.0.1", 3000, "info")
    assert partner_config(ns) == MockPartnerConfig()


def test_every_mock_partner_knob_has_a_flag() -> None:
    fields = [
        f
        for f in dataclasses.fields(MockPartnerConfig)
        # The webhook secret comes from RP_PARTNER_WEBHOOK_SECRET, never argv (it would show in ps).
        if f.name not in ("seed", "time_scale", "webhook_secret", "honor_idempotency_key")
    ]
    argv = ["mock-partner", "--seed", "abc", "--time-scale", "0.5", "--honor-idempotency-key"]
    # A valid, non-default value for each: probabilities and durations 0.25, the int knob 7.
    for f in fields:
        argv += ["--" + f.name.replace("_", "-"), "7" if f.name == "rate_limit_checks" else "0.25"]

    config = partner_config(parse(*argv))

    assert (config.seed, config.time_scale) == ("abc", 0.5)
    assert config.honor_idempotency_key is True
    assert partner_config(parse("mock-partner")).honor_idempotency_key is False
    assert config.rate_limit_checks == 7
    assert all(getattr(config, f.name) == 0.25 for f in fields if f.name != "rate_limit_checks")


def test_mock_partner_int_seed_stays_an_int() -> None:
    assert partner_config(parse("mock-partner", "--seed", "42")).seed == 42


def test_mock_partner_refuses_an_invalid_knob(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mock-partner", "--p-timeout", "2"]) == 2
    assert "p_timeout is a probability" in capsys.readouterr().err


def test_mock_partner_names_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["mock-partner", "--port", str(port)]) == 2
    assert f"port {port} is already in use on 127.0.0.1" in capsys.readouterr().err


# -- simulate -------------------------------------------------------------------------------


def test_simulate_takes_the_simulator_options() -> None:
    ns = parse(
        *("simulate", "--api", "http://127.0.0.1:4200", "--partner", "http://127.0.0.1:4000"),
        *("-n", "5", "--rate", "2", "--listen", "127.0.0.1:4100", "--time-scale", "0.1"),
        *("--seed", "9", "--push-shape", "nested", "--json", "out.json", "--no-progress"),
    )
    config = config_from_args(ns)

    assert ns.handler is cli.simulate.run
    assert (config.api_url, config.partner_url) == (
        "http://127.0.0.1:4200",
        "http://127.0.0.1:4000",
    )
    assert (config.n, config.rate, config.time_scale, config.seed) == (5, 2.0, 0.1, 9)
    assert (config.listen_port, config.push_shape) == (4100, "nested")
    assert (ns.json_path, ns.no_progress) == (Path("out.json"), True)


# -- demo -----------------------------------------------------------------------------------


def test_demo_defaults() -> None:
    ns = parse("demo")

    assert (ns.time_scale, ns.n, ns.rate, ns.storage, ns.seed) == (0.05, 200, 10.0, None, None)
    assert (ns.partner_port, ns.service_port, ns.client_port) == (3000, 3200, 3100)
    assert (ns.workdir, ns.json_path, ns.push_body) == (Path(".demo"), None, "flat")
    assert (ns.keep_logs, ns.no_progress, ns.deadline) == (False, False, 600.0)


def test_demo_flags_parse() -> None:
    ns = parse(
        *("demo", "--time-scale", "1", "-n", "50", "--rate", "5", "--storage", "redis://r:6379/0"),
        *("--seed", "7", "--json", "r.json", "--keep-logs", "--push-body", "nested"),
        *("--partner-port", "4000", "--service-port", "4200", "--client-port", "4100"),
        *("--workdir", "/tmp/d", "--no-progress", "--deadline", "900"),
    )

    assert ns.handler is cli.demo.run
    assert (ns.time_scale, ns.n, ns.rate, ns.storage) == (1.0, 50, 5.0, "redis://r:6379/0")
    assert (ns.seed, ns.json_path, ns.keep_logs) == (7, Path("r.json"), True)
    assert (ns.push_body, ns.deadline) == ("nested", 900.0)
    assert (ns.partner_port, ns.service_port, ns.client_port) == (4000, 4200, 4100)
    assert (ns.workdir, ns.no_progress) == (Path("/tmp/d"), True)


def test_demo_options_become_the_simulator_config() -> None:
    ns = parse(
        *("demo", "--storage", "postgresql://u@db/payouts", "-n", "30", "--rate", "4"),
        *("--time-scale", "0.2", "--client-port", "4100", "--service-port", "4200"),
    )

    config = cli.demo.simulator_config(ns, 3)

    assert not isinstance(config, str)  # other storage URLs are passed through, not refused
    assert (config.n, config.rate, config.time_scale, config.seed) == (30, 4.0, 0.2, 3)
    assert config.api_url == "http://127.0.0.1:4200"
    assert config.partner_url == "http://127.0.0.1:3000"
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 4100)
    assert (config.push_shape, config.deadline) == ("flat", 600.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-n", "0"], "n must be between 1 and 100000"),
        (["--rate", "0"], "argument --rate: must be a positive number"),
        (["--time-scale", "-1"], "argument --time-scale: must be a positive number"),
        (["--time-scale", "inf"], "argument --time-scale: must be a positive number"),
        (["--client-port", "70000"], "port must be within 1-65535"),
        (
            ["--partner-port", "3100"],
            "--partner-port, --service-port and --client-port must differ",
        ),
        (["--storage", "payouts.db"], "--storage must be a URL"),
    ],
)
def test_demo_refuses_bad_options_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    workdir = tmp_path / "demo"

    assert main(["demo", "--workdir", str(workdir), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_demo_names_the_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    partner, client = free_ports(2)
    workdir = tmp_path / "demo"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        code = main(
            [
                *("demo", "--workdir", str(workdir), "--partner-port", str(partner)),
                *("--service-port", str(port), "--client-port", str(client)),
            ]
        )

    assert code == 2
    assert f"port {port} (example service, --service-port)" in capsys.readouterr().err
    assert not workdir.exists()


def test_logs_are_replaced_or_kept(tmp_path: Path) -> None:
    (tmp_path / "partner.log").write_text("run 1\n")

    (log,) = prepare_logs(tmp_path, ["partner"], keep=True)
    kept = list(tmp_path.glob("partner.*.log"))
    log.write_text("run 2\n")
    prepare_logs(tmp_path, ["partner"], keep=False)

    assert len(kept) == 1
    assert kept[0].read_text() == "run 1\n"
    assert log.read_text() == ""


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://payout:s3cret@db:5432/payouts", "postgresql://payout:***@db:5432/payouts"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("sqlite:///.demo/demo.db", "sqlite:///.demo/demo.db"),
    ],
)
def test_demo_never_prints_a_storage_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_each_demo_gets_a_fresh_sqlite_file(tmp_path: Path) -> None:
    for name in ("demo.db", "demo.db-wal", "demo.db-shm"):
        (tmp_path / name).write_bytes(b"last run")

    url = cli.demo.fresh_sqlite(tmp_path)

    assert url == f"sqlite:///{tmp_path}/demo.db"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def stubborn_child(tmp_path: Path) -> Iterator[Child]:
    """A child in its own process group that ignores SIGTERM, as a hung server would."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); "
    code += "time.sleep(60)"
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"
        yield Child("stubborn", proc, tmp_path / "x.log", "http://127.0.0.1:1/")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_stop_kills_a_child_that_ignores_sigterm(stubborn_child: Child) -> None:
    out = io.StringIO()

    began = time.monotonic()
    stop([stubborn_child], Console(file=out, width=120), timeout=0.3)

    assert stubborn_child.proc.returncode == -signal.SIGKILL
    assert time.monotonic() - began < 5
    assert "stubborn did not stop in 0.3 s: killed" in out.getvalue()


# -- the real thing -------------------------------------------------------------------------


@needs_service
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_end_to_end(tmp_path: Path) -> None:
    """The whole demo in a subprocess, small and fast: every outcome correct, nothing left."""
    partner, service, client = ports = free_ports(3)
    workdir, report_path = tmp_path / "demo", tmp_path / "report.json"
    argv = [
        *(sys.executable, "-m", "resilient_payout.cli", "demo", "-n", "20", "--rate", "20"),
        *("--time-scale", "0.02", "--seed", "11", "--no-progress", "--workdir", str(workdir)),
        *("--partner-port", str(partner), "--service-port", str(service)),
        *("--client-port", str(client), "--json", str(report_path)),
    ]
    demo = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.communicate()
        # The demo stops its children before it exits: any still there is a leak.
        left = processes_on(ports)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    assert demo.returncode == 0, out
    assert left == []
    assert all(port_free(port) for port in ports)
    assert "Simulation: OK" in out
    assert re.search(r"\bcorrect\W+20\b", out), out
    assert re.search(r"\bdouble payments\W+0\b", out), out
    assert re.search(r"\bblocks\W+0\b", out), out
    assert re.search(r"demo OK in \d+\.\d s", out), out
    report = json.loads(report_path.read_text())
    assert (report["ok"], report["sent"], report["correct"]) == (True, 20, 20)
    assert (report["double_payments"], report["blocks"]) == ([], 0)
    # Both children were stopped by SIGTERM and shut down cleanly, not killed.
    for log in ("partner.log", "service.log"):
        assert "Application shutdown complete" in (workdir / log).read_text()
    assert "did not stop" not in out


def test_servers_tune_the_garbage_collector_before_serving() -> None:
    # Full collections of a heap with ~1,300 payouts in flight stopped the loop for 100-190 ms
    # (docs/performance.md): `serve` and `mock-partner` freeze the start-up heap and make them
    # rarer, leaving young collections as they are.
    import gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == (before[0], before[1], 1000)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
