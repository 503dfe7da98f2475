"""A short soak in ``make test``: ``resilient-payout soak`` for 45 s, the service SIGKILLed every
3-10 s and restarted, every transfer graded against the mock partner's truth.

Time scale 0.1, not the soak's default 0.05: the partner counts status checks per scenario second
by arrival, and a restarting service on a busy two-core machine can stall its loop for 100 ms or
more, so checks granted apart reach the partner together. At 0.05 that is two scenario seconds
and a block in about one restart out of twenty (see docs/reliability.md); at 0.1 it is one.

Plus a 2.4 s rolling restart (``--signal TERM``) that checks outcomes and the recovery figures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from resilient_payout import cli


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_short_soak_survives_repeated_sigkills(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = random.SystemRandom().randrange(1_000_000)
    report = tmp_path / "soak.json"
    code = cli.main(
        [
            *("soak", "--minutes", "0.75", "--time-scale", "0.1", "--kill-every", "3-10"),
            *("--seed", str(seed), "--workdir", str(tmp_path), "--json", str(report)),
        ]
    )
    out = capsys.readouterr().out
    assert code == cli.EXIT_OK, out
    figures = json.loads(report.read_text())["soak"]
    with capsys.disabled():
        print(f"\nsoak (seed {seed}): {figures}")
    assert figures["kills"] >= 3
    assert figures["sent"] == figures["final"] > 0
    for name in ("wrong", "missing", "double_payments", "conflicting_notifications", "blocks"):
        assert figures[name] == 0, (name, figures)
    assert figures["crashed"] == []


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_rolling_restart_soak_reports_recovery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tiny (2.4 s of load at scale 0.03, ~10 s in all): a partner block would only cost the exit
    # code, which this test leaves to the 45 s soak above; it checks outcomes and recovery figures.
    report = tmp_path / "soak.json"
    code = cli.main(
        [
            *("soak", "--minutes", "0.04", "--time-scale", "0.03", "--kill-every", "1-1.2"),
            *("--signal", "TERM", "--seed", "7", "--workdir", str(tmp_path)),
            *("--json", str(report)),
        ]
    )
    assert code in (cli.EXIT_OK, cli.EXIT_NOT_OK), capsys.readouterr().out
    data = json.loads(report.read_text())
    figures, recovery = data["soak"], data["recovery"]
    assert figures["sent"] == figures["final"] > 0
    for name in ("wrong", "missing", "double_payments", "conflicting_notifications"):
        assert figures[name] == 0, (name, figures)
    assert figures["kills"] >= 1
    assert figures["crashed"] == []
    assert figures["drain_killed"] == 0
    # Every process ends by SIGTERM, the last one too, each under its own instance id.
    exits = data["exits"]
    assert sorted(e["instance"] for e in exits) == [
        f"soak-{i}" for i in range(1, figures["kills"] + 2)
    ]
    assert {e["signal"] for e in exits} == {"TERM"}
    assert recovery["signal"] == "TERM"
    assert recovery["push_lag_payouts"] + recovery["push_lag_skipped"] == figures["sent"]
    assert 0 <= recovery["push_lag_p50_s"] <= recovery["push_lag_p99_s"]
    assert recovery["push_lag_p99_s"] <= recovery["push_lag_max_s"]
    assert 0 < recovery["final_p50_s"] <= recovery["final_p99_s"]
    assert isinstance(recovery["orphans_recovered"], int)
    assert isinstance(recovery["orphans_left"], int)
    assert recovery["drain_max_s"] > 0


def test_soak_refuses_a_bad_kill_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["soak", "--kill-every", "10-3"]) == cli.EXIT_SETUP
    assert "need 0 < MIN <= MAX" in capsys.readouterr().err
