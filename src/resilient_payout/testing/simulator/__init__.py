"""Mobile-client simulator: plays the app and the app's backend against a payout service.

It sends a bounded, rate-limited load of ``POST /transaction`` (with concurrent and late repeats,
as a phone on a poor network does), receives the service's pushes on ``PUT /transaction``, falls
back to ``GET /transaction/{id}?wait=`` when a push is late, then waits for the mock partner's
truth to settle, reads it and the stats, and grades every outcome. It speaks only HTTP, so it can
grade any implementation of the contract. Needs starlette (receiver), uvicorn (standalone
receiver) and rich (progress, summary).

Modules: :mod:`.config` (what to simulate), :mod:`.driver` (load, push receiver, GET fallback),
:mod:`._partner` (partner reads), :mod:`._grading` (pure grading), :mod:`.report` (the result),
:mod:`.render` (rich table and progress bar), :mod:`.cli` (command line, also ``python -m``).
"""

from __future__ import annotations

from ._grading import Channel as Channel
from .cli import add_arguments, config_from_args, run_cli, run_from_args
from .config import PushShape as PushShape
from .config import SimulatorConfig
from .driver import FINAL_STATUSES as FINAL_STATUSES
from .driver import Simulator
from .render import render_summary
from .report import SimulationReport, write_json
from .report import Verdict as Verdict

__all__ = [
    "SimulationReport",
    "Simulator",
    "SimulatorConfig",
    "add_arguments",
    "config_from_args",
    "render_summary",
    "run_cli",
    "run_from_args",
    "write_json",
]
