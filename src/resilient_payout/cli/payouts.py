"""``resilient-payout payouts``: find, inspect and settle payouts that need a human.

Reads the same ``RP_*`` settings as ``serve`` (``RP_STORAGE_URL`` above all; ``--storage``
overrides it), so it sees what the service sees::

    payouts list --status unknown --older-than 10m     oldest first, pages by --cursor
    payouts show ID                                    record, timeline, outbox, partner ref
    payouts resolve ID --status failed --note "..." --operator NAME
    payouts redeliver ID --operator NAME               push a delivered or failing outcome again
    payouts stats                                      counts by status and the alert figures
    payouts prune --older-than 30d [--dry-run]         retention (docs/operations.md)

Every command takes ``--json`` (one JSON document on stdout, for scripts); without it, rich
tables. ``resolve`` goes through a :class:`~resilient_payout.PayoutClient` opened with the
service's wiring (``open_client``) but without background work, so it makes its decision
through ``decide`` and the same compare-and-set as the service, and then pushes the outcome to
the app once itself (``--no-push``: leave it to the service's outbox loop). Exit status: 0 done,
1 refused (unknown id, already final, nothing to re-queue) or a push not acknowledged, 2 bad
options or settings, or a storage that cannot be opened.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio

from .._errors import InvalidRequest, PayoutAlreadyFinal, StorageError, UnknownPayout
from .._model import Payout, PayoutStatus
from .._ops import (
    OUTBOX_FAILING_AFTER,
    ago,
    format_duration,
    outbox_state,
    outbox_view,
    parse_duration,
    payout_view,
    push_now,
    snapshot_view,
    timeline,
)
from ..storage import PayoutQuery, Storage, storage_from_url
from ._common import EXIT_NOT_OK, EXIT_OK, EXIT_SETUP, error

if TYPE_CHECKING:
    from rich.console import Console

    from ..settings import ServiceSettings

__all__ = ["add_parser", "main", "run"]

log = logging.getLogger("resilient_payout.operator")

_FINAL: Final = [s.value for s in PayoutStatus if s.is_final]
_PRUNE_BATCH: Final = 1000


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _status(text: str) -> list[PayoutStatus]:
    try:
        return [PayoutStatus(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        names = ", ".join(s.value for s in PayoutStatus)
        raise argparse.ArgumentTypeError(f"not a status: {text!r} (one of {names})") from None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``payouts`` command group."""
    p = sub.add_parser(
        "payouts",
        help="find, inspect and settle payouts that need a human",
        description="Operator commands on the storage the service uses (RP_STORAGE_URL; "
        "docs/operations.md).",
    )
    _add_commands(p)


def _add_commands(p: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="one JSON document on stdout")
    common.add_argument("--storage", metavar="URL", help="storage URL (default RP_STORAGE_URL)")
    cmds = p.add_subparsers(dest="payouts_command", required=True, metavar="COMMAND")

    ls = cmds.add_parser("list", parents=[common], help="payouts by filter, oldest first")
    ls.add_argument(
        "--status",
        type=_status,
        action="extend",
        metavar="S[,S]",
        help="only these statuses (repeat or comma-separate)",
    )
    ls.add_argument("--older-than", type=_duration, metavar="D", help="created more than D ago")
    ls.add_argument("--newer-than", type=_duration, metavar="D", help="created less than D ago")
    ls.add_argument(
        "--unchanged-for", type=_duration, metavar="D", help="last changed more than D ago"
    )
    ls.add_argument("--conflicts", action="store_true", help="only payouts with a conflict")
    ls.add_argument(
        "--undelivered", action="store_true", help="only payouts whose push is not acknowledged"
    )
    ls.add_argument("--limit", type=int, default=50, help="page size, 1-500 (default 50)")
    ls.add_argument("--cursor", help="the next_cursor of the previous page")
    ls.add_argument("--all", action="store_true", help="follow every page")
    ls.set_defaults(handler=run, action=_list)

    show = cmds.add_parser("show", parents=[common], help="one payout: record and timeline")
    show.add_argument("id")
    show.set_defaults(handler=run, action=_show)

    res = cmds.add_parser("resolve", parents=[common], help="settle an open payout by hand")
    res.add_argument("id")
    res.add_argument("--status", required=True, choices=_FINAL, help="the final status")
    res.add_argument("--note", required=True, help="why (recorded in the audit trail)")
    res.add_argument("--operator", required=True, help="who you are (recorded)")
    res.add_argument("--no-push", action="store_true", help="leave the push to the service")
    res.set_defaults(handler=run, action=_resolve)

    red = cmds.add_parser(
        "redeliver", parents=[common], help="push a payout's outcome to the app again"
    )
    red.add_argument("id")
    red.add_argument("--operator", required=True, help="who you are (logged)")
    red.add_argument("--no-push", action="store_true", help="leave the push to the service")
    red.set_defaults(handler=run, action=_redeliver)

    st = cmds.add_parser("stats", parents=[common], help="counts by status, alert figures")
    st.set_defaults(handler=run, action=_stats)

    pr = cmds.add_parser(
        "prune", parents=[common], help="delete old settled payouts (retention; opt-in)"
    )
    pr.add_argument(
        "--older-than", type=_duration, required=True, metavar="D", help="last changed before"
    )
    pr.add_argument("--dry-run", action="store_true", help="count only")
    pr.add_argument("--batch", type=int, default=_PRUNE_BATCH, help="payouts per transaction")
    pr.set_defaults(handler=run, action=_prune)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``resilient-payout payouts ...`` on its own (``python -m resilient_payout.cli.payouts``);
    ``environ`` replaces ``os.environ`` (tests)."""
    parser = argparse.ArgumentParser(
        prog="resilient-payout payouts",
        description="Find, inspect and settle payouts that need a human (docs/operations.md).",
    )
    _add_commands(parser)
    try:
        ns = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_SETUP
    return run(ns, environ)


# -- running a command -----------------------------------------------------------------------


class _Refused(Exception):
    """An operator request that changes nothing: printed, exit status 1."""


def run(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run one ``payouts`` command; its exit status."""
    from ..settings import ServiceSettings

    env = dict(os.environ if environ is None else environ)
    if ns.storage:
        env["RP_STORAGE_URL"] = ns.storage
    try:
        settings = ServiceSettings.from_env(env)
    except ValueError as exc:
        error(f"payouts: {exc}")
        return EXIT_SETUP
    out = _Output(ns.json)
    action: Callable[[argparse.Namespace, ServiceSettings, _Output], Any] = ns.action
    try:
        code: int = anyio.run(action, ns, settings, out)
    except (InvalidRequest, ValueError) as exc:
        error(f"payouts {ns.payouts_command}: {exc}")
        return EXIT_SETUP
    except (_Refused, UnknownPayout, PayoutAlreadyFinal) as exc:
        out.refused(str(exc))
        return EXIT_NOT_OK
    except StorageError as exc:
        error(f"payouts {ns.payouts_command}: {exc}")
        return EXIT_SETUP
    return code


@asynccontextmanager
async def _storage(settings: ServiceSettings) -> AsyncIterator[Storage]:
    from ..wiring import open_storage

    storage = await open_storage(storage_from_url(settings.storage_url), settings.storage_url)
    try:
        yield storage
    finally:
        await storage.close()


def _now() -> float:
    return time.time()


async def _list(ns: argparse.Namespace, settings: ServiceSettings, out: _Output) -> int:
    now = _now()
    query = PayoutQuery(
        statuses=frozenset(ns.status) if ns.status else None,
        created_before=None if ns.older_than is None else now - ns.older_than,
        created_after=None if ns.newer_than is None else now - ns.newer_than,
        updated_before=None if ns.unchanged_for is None else now - ns.unchanged_for,
        conflicts_only=ns.conflicts,
        undelivered_only=ns.undelivered,
        limit=ns.limit,
        cursor=ns.cursor,
    )
    items: list[Payout] = []
    async with _storage(settings) as storage:
        while True:
            page = await storage.list_payouts(query)
            items.extend(page.items)
            if not ns.all or page.next_cursor is None:
                break
            query = dataclasses.replace(query, cursor=page.next_cursor)
    if out.json:
        out.emit({"items": [payout_view(p) for p in items], "next_cursor": page.next_cursor})
        return EXIT_OK
    out.table(
        f"{len(items)} payout(s)",
        ["id", "status", "created", "last change", "attempt", "partner ref", "conflict"],
        [
            [
                p.id,
                p.status.value,
                ago(p.created_at, now),
                ago(p.updated_at, now),
                str(p.attempt),
                p.partner_ref or "-",
                "yes" if any(a.conflict for a in p.audit) else "",
            ]
            for p in items
        ],
    )
    if page.next_cursor is not None:
        out.line(f"more: --cursor {page.next_cursor}")
    return EXIT_OK


async def _show(ns: argparse.Namespace, settings: ServiceSettings, out: _Output) -> int:
    now = _now()
    async with _storage(settings) as storage:
        payout = await storage.get(ns.id)
        if payout is None:
            raise UnknownPayout(ns.id)
        entry = await storage.get_outbox(ns.id)
    lines = timeline(payout, now)
    if out.json:
        out.emit({"payout": payout_view(payout), "timeline": lines, "outbox": outbox_view(entry)})
        return EXIT_OK
    out.table(
        f"payout {payout.id}",
        ["field", "value"],
        [
            ["status", payout.status.value],
            ["created", f"{ago(payout.created_at, now)} ({_iso(payout.created_at)})"],
            ["last change", ago(payout.updated_at, now)],
            ["attempt / POSTs / checks", f"{payout.attempt} / {payout.posts} / {payout.checks}"],
            ["partner ref", payout.partner_ref or "-"],
            ["partner status", payout.partner_status.value if payout.partner_status else "-"],
            ["resolved by", payout.resolved_by.value if payout.resolved_by else "-"],
            ["reason", payout.reason or "-"],
            ["next work due", ago(payout.next_check_at, now)],
            ["request", json.dumps(payout.request, sort_keys=True)],
        ],
    )
    out.table(
        "timeline",
        ["when", "+since created", "cause", "event", "from -> to", "detail"],
        [
            [
                line["ago"],
                line["after_creation"],
                line["cause"],
                ("CONFLICT " if line["conflict"] else "") + line["event"],
                f"{line['from']} -> {line['to']}",
                line.get("detail") or "",
            ]
            for line in lines
        ],
    )
    if entry is None:
        out.line("outbox: no entry (not final yet, or written before outboxes)")
    else:
        out.table(
            "outbox (push to the app)",
            ["state", "status", "rounds failed", "written", "next attempt", "last error"],
            [
                [
                    outbox_state(entry),
                    entry.status.value,
                    str(entry.attempts),
                    ago(entry.created_at, now),
                    "-" if entry.delivered_at or entry.dead_at else ago(entry.next_attempt_at, now),
                    entry.last_error or "-",
                ]
            ],
        )
    return EXIT_OK


async def _resolve(ns: argparse.Namespace, settings: ServiceSettings, out: _Output) -> int:
    from ..wiring import open_client

    status = PayoutStatus(ns.status)
    # The service's wiring, without its background loops: nothing here claims due payouts,
    # spends status checks or drains the outbox beside the running service.
    async with open_client(settings, background=False) as client:
        payout = await client.resolve(ns.id, status, ns.note, operator=ns.operator)
        pushed = None
        if not ns.no_push and client.notifier is not None:
            pushed = await push_now(
                client.storage, client.notifier, payout.id, client.policy, client.clock.now
            )
    return _settled(out, "resolved", payout, pushed)


async def _redeliver(ns: argparse.Namespace, settings: ServiceSettings, out: _Output) -> int:
    from ..wiring import open_client

    operator = ns.operator.strip()
    if not operator:
        raise InvalidRequest("--operator must name who re-queues the push")
    async with open_client(settings, background=False) as client:
        payout = await client.get(ns.id)
        if not await client.storage.requeue_outbox(ns.id, next_attempt_at=client.clock.now()):
            raise _Refused(f"payout {ns.id!r} has no outcome to push (not final yet)")
        log.warning("payout %s: push re-queued by operator %s (cli)", ns.id, operator)
        pushed = None
        if not ns.no_push and client.notifier is not None:
            pushed = await push_now(
                client.storage, client.notifier, payout.id, client.policy, client.clock.now
            )
    return _settled(out, "re-queued", payout, pushed)


def _settled(out: _Output, done: str, payout: Payout, pushed: bool | None) -> int:
    if out.json:
        out.emit({done.replace("-", ""): payout_view(payout), "pushed": pushed})
    else:
        out.line(f"payout {payout.id}: {done} ({payout.status.value})")
        if pushed is None:
            out.line("push: left to the service's outbox loop")
        elif pushed:
            out.line("push: acknowledged by the app")
        else:
            out.line("push: NOT acknowledged (it stays queued; the service retries it)")
    return EXIT_OK if pushed is not False else EXIT_NOT_OK


async def _stats(ns: argparse.Namespace, settings: ServiceSettings, out: _Output) -> int:
    now = _now()
    policy = settings.policy()
    async with _storage(settings) as storage:
        counts = await storage.count_by_status()
        snap = await storage.ops_snapshot(
            now, late_after=policy.late_arrival_window, failing_after=OUTBOX_FAILING_AFTER
        )
    view = snapshot_view(snap, counts)
    if out.json:
        out.emit(view)
        return EXIT_OK
    out.table(
        "payouts by status", ["status", "count"], [[k, str(v)] for k, v in view["counts"].items()]
    )
    age = snap.oldest_open_age
    window = format_duration(policy.late_arrival_window)
    out.table(
        "needs a human?",
        ["figure", "value"],
        [
            ["oldest open payout", "-" if age is None else format_duration(age)],
            [f"open past the late-arrival window ({window})", str(snap.open_past_window)],
            ["payouts with a conflict", str(snap.conflicts)],
            [f"pushes failing > {format_duration(OUTBOX_FAILING_AFTER)}", str(snap.outbox_failing)],
            ["pushes dead-lettered", str(snap.outbox_dead)],
        ],
    )
    return EXIT_OK


async def _prune(ns: argparse.Namespace, settings: ServiceSettings, out: _Output) -> int:
    if ns.batch < 1:
        raise InvalidRequest("--batch must be at least 1")
    before = _now() - ns.older_than
    total = 0
    async with _storage(settings) as storage:
        if ns.dry_run:
            total = await storage.prune(before, dry_run=True, limit=sys.maxsize)
        else:
            while True:  # one transaction per batch: writers wait at most one batch
                n = await storage.prune(before, dry_run=False, limit=ns.batch)
                total += n
                if n < ns.batch:
                    break
    if not ns.dry_run:
        log.warning("pruned %d payouts last changed before %s", total, _iso(before))
    if out.json:
        out.emit({"dry_run": ns.dry_run, "before": before, "payouts": total})
    else:
        verb = "would delete" if ns.dry_run else "deleted"
        out.line(
            f"{verb} {total} settled payout(s) last changed before {_iso(before)} "
            "(with delivered outbox entries); their ids are no longer idempotent"
        )
    return EXIT_OK


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


# -- output ----------------------------------------------------------------------------------


class _Output:
    """rich tables on stdout, or one JSON document (``--json``)."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self._console: Console | None = None

    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False)
        return self._console

    def emit(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")

    def line(self, text: str) -> None:
        self.console().print(text, markup=False)

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(title), title_justify="left")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))  # ids and notes are never markup
        self.console().print(table)

    def refused(self, message: str) -> None:
        if self.json:
            self.emit({"error": message})
        else:
            error(message)


if __name__ == "__main__":
    sys.exit(main())
