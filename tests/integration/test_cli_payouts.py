"""``resilient-payout payouts``: list, show, resolve, redeliver, stats and prune against a seeded
SQLite file, with the app's backend a local HTTP server recording every push."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from resilient_payout import AuditEntry, Cause, OutboxEntry, PayoutStatus
from resilient_payout.cli import payouts
from resilient_payout.storage.sqlite import SQLiteStorage
from resilient_payout.testing.contract import make_payout

S = PayoutStatus
HOUR = 3600.0


class _App(BaseHTTPRequestHandler):
    pushes: list[dict[str, Any]]

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.pushes.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def app_backend() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _App)
    server.pushes = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.pushes  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()


async def _seed(path: Path, NOW: float) -> None:
    conflict = AuditEntry(
        NOW - 2 * HOUR, Cause.WEBHOOK, "conflict", S.COMPLETED, S.COMPLETED,
        "webhook reported declined after final completed", conflict=True,
    )  # fmt: skip
    storage = SQLiteStorage(path)
    await storage.open()
    try:

        async def add(
            pid: str, age: float, status: S, conflict: AuditEntry | None = None, **changes: Any
        ) -> None:
            created = make_payout(
                pid, created_at=NOW - age, updated_at=NOW - age, next_check_at=NOW + 10 * HOUR
            )
            created = replace(created, audit=(replace(created.audit[0], at=NOW - age),))
            stored, _ = await storage.create_if_absent(created)
            final = status.is_final
            entry = OutboxEntry(pid, status, NOW - age, NOW - age) if final else None
            changed = replace(
                stored,
                status=status,
                next_check_at=None if final else stored.next_check_at,
                audit=(*stored.audit, conflict) if conflict else stored.audit,
                **changes,
            )
            assert await storage.compare_and_set(changed, expected_version=1, outbox=entry)

        await add("stuck-1", HOUR, S.UNKNOWN, attempt=1, attempt_started_at=NOW - HOUR)
        await add("fresh", 60, S.AWAITING, partner_ref="ref-fresh")
        await add("conflicted", 3 * HOUR, S.COMPLETED, conflict=conflict)
        await add("old-done", 40 * 24 * HOUR, S.DECLINED, updated_at=NOW - 40 * 24 * HOUR)
        await storage.ack_outbox("old-done", delivered_at=NOW - 40 * 24 * HOUR)
        await storage.ack_outbox("conflicted", delivered_at=NOW - 3 * HOUR)
    finally:
        await storage.close()


@pytest.fixture
def env(tmp_path: Path, app_backend: tuple[str, list[dict[str, Any]]]) -> dict[str, str]:
    path = tmp_path / "payouts.db"
    anyio.run(_seed, path, time.time())
    return {"RP_STORAGE_URL": f"sqlite:///{path}", "RP_CLIENT_URL": app_backend[0]}


def cli(env: dict[str, str], capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """Run ``payouts ARGV --json``; the exit status and the JSON it printed (None if none)."""
    code = payouts.main([*argv, "--json"], environ=env)
    out = capsys.readouterr().out.strip()
    return code, json.loads(out) if out else None


def test_list_filters_oldest_first(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, data = cli(env, capsys, "list", "--status", "unknown", "--older-than", "10m")
    assert code == 0
    assert [p["id"] for p in data["items"]] == ["stuck-1"]
    _, data = cli(env, capsys, "list")
    assert [p["id"] for p in data["items"]] == ["old-done", "conflicted", "stuck-1", "fresh"]
    _, data = cli(env, capsys, "list", "--conflicts")
    assert [p["id"] for p in data["items"]] == ["conflicted"]
    _, data = cli(env, capsys, "list", "--status", "unknown,awaiting", "--newer-than", "5m")
    assert [p["id"] for p in data["items"]] == ["fresh"]
    code, first = cli(env, capsys, "list", "--limit", "3")
    assert len(first["items"]) == 3
    _, rest = cli(env, capsys, "list", "--limit", "3", "--cursor", first["next_cursor"])
    assert [p["id"] for p in rest["items"]] == ["fresh"]
    assert rest["next_cursor"] is None
    _, every = cli(env, capsys, "list", "--limit", "1", "--all")
    assert len(every["items"]) == 4


def test_list_and_show_print_tables(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert payouts.main(["list", "--status", "unknown"], environ=env) == 0
    table = capsys.readouterr().out
    assert "stuck-1" in table
    assert "1h ago" in table
    assert payouts.main(["show", "conflicted"], environ=env) == 0
    shown = capsys.readouterr().out
    assert "timeline" in shown
    assert "CONFLICT" in shown
    assert "delivered" in shown


def test_show_gives_record_timeline_outbox_and_partner_ref(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, data = cli(env, capsys, "show", "fresh")
    assert code == 0
    assert data["payout"]["partner_ref"] == "ref-fresh"
    assert data["outbox"] is None
    assert [line["event"] for line in data["timeline"]] == ["received"]
    assert re.fullmatch(r"1m( \d+s)? ago", data["timeline"][0]["ago"])
    code, data = cli(env, capsys, "show", "conflicted")
    assert data["outbox"]["state"] == "delivered"
    assert data["payout"]["conflict"] is True
    code, data = cli(env, capsys, "show", "nope")
    assert (code, data) == (1, {"error": "no payout with id 'nope'"})


def test_resolve_settles_audits_and_pushes(
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    app_backend: tuple[str, list[dict[str, Any]]],
) -> None:
    code, data = cli(
        env, capsys, "resolve", "stuck-1", "--status", "failed",
        "--note", "back office: never arrived", "--operator", "alice",
    )  # fmt: skip
    assert code == 0
    assert data["pushed"] is True
    assert app_backend[1] == [{"id": "stuck-1", "status": "failed"}]
    resolved = data["resolved"]
    assert (resolved["status"], resolved["resolved_by"]) == ("failed", "operator")
    assert resolved["audit"][-1]["detail"] == "back office: never arrived (by alice)"
    _, shown = cli(env, capsys, "show", "stuck-1")
    assert shown["outbox"]["state"] == "delivered"
    # Final now: a second resolve changes nothing.
    code, data = cli(
        env, capsys, "resolve", "stuck-1", "--status", "completed",
        "--note", "second thoughts", "--operator", "bob",
    )  # fmt: skip
    assert code == 1
    assert "final already" in data["error"]
    _, after = cli(env, capsys, "show", "stuck-1")
    assert after["payout"] == shown["payout"]
    assert len(app_backend[1]) == 1


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["resolve", "nope", "--status", "failed", "--note", "x", "--operator", "a"],
            1,
            "no payout",
        ),
        (
            ["resolve", "stuck-1", "--status", "failed", "--note", "  ", "--operator", "a"],
            2,
            "note",
        ),
        (["resolve", "stuck-1", "--status", "awaiting", "--note", "x", "--operator", "a"], 2, ""),
        (["resolve", "stuck-1", "--status", "failed", "--note", "x"], 2, ""),
        (["list", "--older-than", "ten minutes"], 2, ""),
        (["list", "--limit", "0"], 2, "limit"),
        (["list", "--cursor", "garbage"], 2, "cursor"),
        (["redeliver", "fresh", "--operator", "a"], 1, "no outcome"),
    ],
)
def test_bad_requests_change_nothing(
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    message: str,
) -> None:
    _, before = cli(env, capsys, "list")
    assert payouts.main(argv, environ=env) == code
    captured = capsys.readouterr()
    assert message in captured.err + captured.out
    _, after = cli(env, capsys, "list")
    assert after == before


def test_redeliver_pushes_a_delivered_outcome_again(
    env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    app_backend: tuple[str, list[dict[str, Any]]],
) -> None:
    code, data = cli(env, capsys, "redeliver", "conflicted", "--operator", "alice")
    assert (code, data["pushed"]) == (0, True)
    assert app_backend[1] == [{"id": "conflicted", "status": "completed"}]
    code, data = cli(env, capsys, "redeliver", "conflicted", "--operator", "alice", "--no-push")
    assert (code, data["pushed"]) == (0, None)
    _, shown = cli(env, capsys, "show", "conflicted")
    assert (shown["outbox"]["state"], shown["outbox"]["attempts"]) == ("queued", 0)


def test_stats(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    code, data = cli(env, capsys, "stats")
    assert code == 0
    assert data["counts"] == {
        "received": 0, "submitting": 0, "awaiting": 1, "unknown": 1,
        "completed": 1, "declined": 1, "failed": 0,
    }  # fmt: skip
    assert data["oldest_open_age"] == pytest.approx(HOUR, abs=120)
    # stuck-1's attempt started an hour ago: past the late-arrival window.
    assert (data["open_past_window"], data["conflicts"], data["outbox_dead"]) == (1, 1, 0)
    assert payouts.main(["stats"], environ=env) == 0
    assert "needs a human?" in capsys.readouterr().out


def test_prune_dry_run_then_for_real(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, data = cli(env, capsys, "prune", "--older-than", "30d", "--dry-run")
    assert (code, data["payouts"], data["dry_run"]) == (0, 1, True)
    _, listed = cli(env, capsys, "list")
    assert len(listed["items"]) == 4
    code, data = cli(env, capsys, "prune", "--older-than", "30d", "--batch", "1")
    assert (code, data["payouts"]) == (0, 1)
    code, _ = cli(env, capsys, "show", "old-done")
    assert code == 1
    _, data = cli(env, capsys, "prune", "--older-than", "30d")
    assert data["payouts"] == 0
