"""Scenario 4: reconciliation under a status-check budget (issue #3's simulation, virtual time).

Runs :func:`resilient_payout.testing.reconciliation.simulate` with the reference ``Profile()`` and
adds what the plot needs: status checks per simulated second, from the scripted partner's
``check_times`` (the partner instance is captured by substituting a recording subclass of
``FakePartner`` in that module; the simulation itself is unchanged).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from resilient_payout.testing import reconciliation as rec
from resilient_payout.testing._fake_partner import FakePartner
from resilient_payout.testing._vtime import run_virtual

from ._common import machine, write_json

NAME = "reconciliation"


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    """Prints the figures and writes ``reconciliation.json``."""
    captured: list[tuple[FakePartner, float]] = []

    class _Recording(FakePartner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            captured.append((self, anyio.current_time()))

    profile = rec.Profile(duration=60.0) if quick else rec.Profile()
    original = rec.FakePartner
    rec.FakePartner = _Recording  # type: ignore[misc]
    try:
        report = run_virtual(rec.simulate, profile)
    finally:
        rec.FakePartner = original  # type: ignore[misc]
    partner, t0 = captured[0]
    per_second = Counter(int(t - t0) for t in partner.check_times)
    horizon = int(report.virtual_seconds) + 1
    data = {
        "scenario": NAME,
        "quick": quick,
        "machine": machine(),
        "report": report.to_dict(),
        "targets": report.targets(),
        "checks_per_second": [per_second.get(s, 0) for s in range(horizon)],
        "budget_rate": profile.check_rate,
        "budget_burst_plus_rate": profile.check_burst + profile.check_rate,
        "partner_limit": profile.partner_check_limit,
    }
    write_json(out, NAME, data)
    print(rec.render(report), flush=True)
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.reconciliation [--quick] [--out DIR]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ns = ap.parse_args(argv)
    run(ns.out, ns.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
