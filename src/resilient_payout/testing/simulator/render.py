"""Rich output: the summary table of a report and the live progress bar of a run.

rich is imported only when something is drawn, so grading and the driver work without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .report import SimulationReport

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["Progress", "progress_bar", "render_summary"]


def _nothing() -> None:
    pass


def _nothing_settled(done: int) -> None:
    pass


@dataclass
class Progress:
    """What the driver tells as it goes; does nothing unless :func:`progress_bar` shows it."""

    sent: Callable[[], None] = _nothing
    final: Callable[[], None] = _nothing
    settled: Callable[[int], None] = _nothing_settled
    """Called with how many ids the partner has settled so far."""


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Progress]:
    """Show sent / final / settled bars of ``total`` on stderr inside this block."""
    from rich import progress as rp
    from rich.console import Console

    columns = (rp.TextColumn("{task.description:>7}"), rp.BarColumn(), rp.MofNCompleteColumn())
    with rp.Progress(*columns, rp.TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        sent = bar.add_task("sent", total=total)
        final = bar.add_task("final", total=total)
        settled: list[rp.TaskID] = []

        def on_settled(done: int) -> None:
            # Added at the first read of the partner, so the bar appears only once it is waited on.
            if not settled:
                settled.append(bar.add_task("settled", total=total))
            bar.update(settled[0], completed=done)

        progress = Progress(lambda: bar.advance(sent), lambda: bar.advance(final), on_settled)
        try:
            yield progress
        finally:
            # Pushes may still arrive while the receiver shuts down; the bar is gone by then.
            progress.sent = progress.final = _nothing
            progress.settled = _nothing_settled


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _bad(value: int | None) -> str:
    return "[red]unknown[/]" if value is None else f"[red]{value}[/]" if value else "0"


def render_summary(report: SimulationReport) -> Table:
    """A two-column rich table of the report, titled with the verdict."""
    from rich.table import Table

    verdict = "[bold green]OK[/]" if report.ok else "[bold red]NOT OK[/]"
    table = Table(title=f"Simulation: {verdict}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")
    for name, value in _rows(report):
        table.add_row(name, value)
    for problem in report.problems():
        table.add_row("[red]problem[/]", problem)
    return table


def _final_times(report: SimulationReport) -> str:
    scale = report.time_scale
    finals = (report.final_p50_s, report.final_p90_s, report.final_max_s)
    text = " / ".join(_fmt(v, "s", 2) for v in finals)
    if scale != 1.0 and report.final_max_s is not None:
        scenario = (None if v is None else v / scale for v in finals)
        text += f"  ({' / '.join(_fmt(v, 's', 1) for v in scenario)} scenario)"
    return text


def _rows(report: SimulationReport) -> list[tuple[str, str]]:
    return [
        (
            "payouts sent",
            f"{report.sent} of {report.n} (seed {report.seed}, scale {report.time_scale:g})",
        ),
        (
            "requests",
            f"{report.requests_sent} ({report.repeats_concurrent} concurrent + "
            f"{report.repeats_late} late repeats, {report.post_retries} retries, "
            f"{report.post_errors} errors)",
        ),
        ("correct", f"[green]{report.correct}[/]"),
        ("wrong", _bad(report.wrong)),
        ("missing", _bad(report.missing)),
        ("conflicting", _bad(report.conflicting)),
        ("unverified", _bad(report.unverified)),
        ("unsettled", _bad(report.unsettled)),
        (
            "first answer p50 / p99",
            " / ".join(
                _fmt(v, " ms") for v in (report.first_answer_p50_ms, report.first_answer_p99_ms)
            ),
        ),
        ("final p50 / p90 / max", _final_times(report)),
        (
            "finals learned by",
            ", ".join(f"{k} {v}" for k, v in report.finals_by_channel.items()) or "-",
        ),
        (
            "pushes",
            f"{report.pushes_received} received, {report.repeat_pushes} repeats, "
            f"{report.pushes_unknown} unknown, {_bad(report.pushes_rejected)} rejected",
        ),
        ("GET fallbacks", f"{report.get_fallbacks} ids, {report.get_requests} GETs"),
        ("partner POSTs max per id", _fmt(report.partner_posts_max_per_id, digits=0)),
        ("double payments", _bad(len(report.double_payments))),
        (
            "status checks",
            f"{_fmt(report.checks_per_payout, ' per payout', 2)}, "
            f"peak {_fmt(report.checks_peak_per_second, '/s')}",
        ),
        ("blocks", _bad(report.blocks)),
        (
            "duration",
            f"{_fmt(report.duration_s, 's', 2)} "
            f"({_fmt(report.settle_wait_s, 's', 2)} waiting for the partner to settle)",
        ),
    ]
