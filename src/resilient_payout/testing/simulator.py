"""Mobile-client simulator: plays the app and the app's backend against a payout service.

It sends a bounded, rate-limited load of ``POST /transaction`` (with concurrent and late repeats,
as a phone on a poor network does), receives the service's pushes on ``PUT /transaction``, falls
back to ``GET /transaction/{id}?wait=`` when a push is late, then waits for the mock partner's
truth to settle, reads it and the stats, and grades every outcome. It speaks only HTTP, so it can
grade any implementation of the contract. Needs starlette (receiver), uvicorn (standalone
receiver) and rich (progress, summary).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import math
import random
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from rich.table import Table

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

FINAL_STATUSES = frozenset({"completed", "declined", "failed"})
_ANSWER_STATUSES = FINAL_STATUSES | {"pending"}
_OK_POST_CODES = frozenset({200, 201, 202})
_MIN_POLL_S = 0.05
"""Floor, in clock seconds, under the scaled poll interval: at a tiny time scale an unanswered id
would otherwise be polled hundreds of times a second."""
_MIN_SETTLE_POLL_S = 0.2
"""Floor under the interval between two reads of the partner's whole truth while waiting for it to
settle: one read lists every id the partner knows."""

PushShape = Literal["auto", "flat", "nested"]
Verdict = Literal["correct", "wrong", "missing", "conflicting", "unverified", "unsettled"]
Channel = Literal["answer", "push", "get"]
_WaitMode = Literal["float", "int", "none"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SimulatorConfig:
    """What to simulate. Durations are scenario seconds, each multiplied by ``time_scale``.

    ``request_timeout`` is the exception: it bounds one HTTP exchange in real seconds, because a
    fast answer is the contract whatever the scale.
    """

    api_url: str = "http://127.0.0.1:3200"
    partner_url: str = "http://127.0.0.1:3000"
    n: int = 200
    rate: float = 10.0
    """New payouts per (scenario) second."""
    p_repeat_concurrent: float = 0.2
    p_repeat_late: float = 0.2
    repeat_late_min: float = 0.05
    repeat_late_max: float = 3.0
    push_grace: float = 30.0
    """Without a final outcome this long after the first send, the app asks ``GET ?wait=``."""
    get_wait: float = 20.0
    poll_interval: float = 1.0
    """Least time between two GETs (or POST retries) for one id; never under 50 ms of clock."""
    deadline: float = 600.0
    """An id without a final outcome this long after its first send is ``missing``; grading waits
    at most this long after the last send for the partner's truth to settle."""
    linger: float = 5.0
    """Keep receiving pushes this long after the last final, to catch late contradictions."""
    seed: int | None = None
    time_scale: float = 1.0
    listen_host: str = "127.0.0.1"
    listen_port: int = 3100
    push_shape: PushShape = "auto"
    prefer_wait: float | None = None
    request_timeout: float = 10.0
    post_retries: int = 3
    max_listed: int = 20
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 100_000:
            raise ValueError("n must be between 1 and 100000")
        if self.rate <= 0 or self.time_scale <= 0:
            raise ValueError("rate and time_scale must be positive")
        for name in ("p_repeat_concurrent", "p_repeat_late"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if not 0.0 <= self.repeat_late_min <= self.repeat_late_max:
            raise ValueError("need 0 <= repeat_late_min <= repeat_late_max")
        if min(self.push_grace, self.get_wait, self.linger, self.request_timeout) < 0:
            raise ValueError("durations must not be negative")
        if self.deadline <= 0 or self.poll_interval <= 0:
            raise ValueError("deadline and poll_interval must be positive")
        if self.prefer_wait is not None and self.prefer_wait < 0:
            raise ValueError("prefer_wait must not be negative")
        if self.post_retries < 0 or self.max_listed < 0:
            raise ValueError("post_retries and max_listed must not be negative")
        if self.push_shape not in get_args(PushShape):
            raise ValueError(f"push_shape must be one of {get_args(PushShape)}")
        if not 0 <= self.listen_port <= 65_535:
            raise ValueError("listen_port must be a TCP port")
        for name in ("api_url", "partner_url"):
            url = urlsplit(getattr(self, name))
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"{name} must be an http(s) URL")
            if not self.allow_remote and not _is_loopback(url.hostname):
                raise ValueError(f"{name} must point at this machine (allow_remote is off)")
        if not self.allow_remote and not _is_loopback(self.listen_host):
            raise ValueError("listen_host must be a loopback address (allow_remote is off)")

    def scaled(self, seconds: float) -> float:
        """Scenario seconds to clock seconds."""
        return seconds * self.time_scale

    def poll_seconds(self) -> float:
        """Clock seconds between two tries for one id (GET polls, POST retries)."""
        return max(self.scaled(self.poll_interval), _MIN_POLL_S)


@dataclass
class SimulationReport:
    """The graded result of one run. Times come from the event-loop clock (virtual in tests).

    Latencies are real milliseconds; ``final_*_s`` are clock seconds (divide by ``time_scale`` for
    scenario seconds). Partner fields are ``None`` when the partner did not say.
    """

    n: int
    seed: int
    time_scale: float
    duration_s: float
    sent: int = 0
    requests_sent: int = 0
    repeats_sent: int = 0
    repeats_concurrent: int = 0
    repeats_late: int = 0
    post_retries: int = 0
    post_errors: int = 0
    bad_answers: int = 0
    correct: int = 0
    wrong: int = 0
    missing: int = 0
    conflicting: int = 0
    unverified: int = 0
    unsettled: int = 0
    wrong_ids: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)
    conflicting_ids: list[str] = field(default_factory=list)
    unverified_ids: list[str] = field(default_factory=list)
    unsettled_ids: list[str] = field(default_factory=list)
    non_correct: list[dict[str, Any]] = field(default_factory=list)
    """Details of the first ``max_listed`` non-correct ids, to start a diagnosis from."""
    first_answer_p50_ms: float | None = None
    first_answer_p99_ms: float | None = None
    final_p50_s: float | None = None
    final_p90_s: float | None = None
    final_max_s: float | None = None
    settle_wait_s: float | None = None
    """Clock seconds spent after the load waiting for the partner's truth to settle."""
    finals_by_channel: dict[str, int] = field(default_factory=dict)
    pushes_received: int = 0
    repeat_pushes: int = 0
    pushes_unknown: int = 0
    pushes_rejected: int = 0
    push_shapes: dict[str, int] = field(default_factory=dict)
    get_fallbacks: int = 0
    get_requests: int = 0
    get_errors: int = 0
    not_sent_to_partner: int | None = None
    partner_posts_total: int | None = None
    partner_posts_max_per_id: int | None = None
    double_payments: list[str] = field(default_factory=list)
    checks_total: int | None = None
    checks_per_payout: float | None = None
    checks_peak_per_second: float | None = None
    blocks: int | None = None
    rate_limited_checks: int | None = None
    webhooks_sent: int | None = None
    webhooks_failed: int | None = None
    partner_errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Why the run is not ok; empty when it is."""
        found: list[str] = []
        for count, what in (
            (self.wrong, "wrong outcome(s)"),
            (self.missing, "missing outcome(s)"),
            (self.conflicting, "conflicting outcome(s)"),
            (self.unverified, "unverified outcome(s)"),
            (self.unsettled, "unsettled outcome(s)"),
            (len(self.double_payments), "double payment(s)"),
            (self.pushes_rejected, "rejected push(es)"),
        ):
            if count:
                found.append(f"{count} {what}")
        if self.blocks is None:
            found.append("partner blocks unknown")
        elif self.blocks:
            found.append(f"{self.blocks} partner block(s)")
        found.extend(f"partner: {error}" for error in self.partner_errors)
        return found

    @property
    def ok(self) -> bool:
        """Every outcome correct, no double payment, no block, nothing unknown."""
        return not self.problems()

    def exit_code(self) -> int:
        """0 if ok, else 1."""
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, with ``ok`` and ``problems``."""
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        data["problems"] = self.problems()
        return data


@dataclass
class _Tx:
    id: str
    concurrent: bool
    late_delay: float | None
    done: anyio.Event
    sent_at: float | None = None
    first_answer_at: float | None = None
    first_answer_status: str | None = None
    final_at: float | None = None
    final_via: Channel | None = None
    finals: list[str] = field(default_factory=list)
    pushes: list[str] = field(default_factory=list)
    gets: int = 0
    get_404s: int = 0
    requests: int = 0


@dataclass
class _Counters:
    requests: int = 0
    repeats_concurrent: int = 0
    repeats_late: int = 0
    post_retries: int = 0
    post_errors: int = 0
    bad_answers: int = 0
    pushes_received: int = 0
    repeat_pushes: int = 0
    pushes_unknown: int = 0
    pushes_rejected: int = 0
    push_shapes: dict[str, int] = field(default_factory=dict)
    get_fallbacks: int = 0
    get_requests: int = 0
    get_errors: int = 0


def _percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile: always a value that was observed."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


def _format_seconds(seconds: float) -> str:
    text = f"{max(seconds, 0.001):.3f}".rstrip("0").rstrip(".")
    return text or "0"


def _parse_answer(response: httpx.Response) -> tuple[str, str] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    tx_id, status = body.get("id"), body.get("status")
    if isinstance(tx_id, str) and isinstance(status, str) and status in _ANSWER_STATUSES:
        return tx_id, status
    return None


def _parse_push(body: object, expected: PushShape) -> tuple[str, str, str] | str:
    """``(id, status, shape)`` of a push body, or why it is refused."""
    if not isinstance(body, dict):
        return "body is not a JSON object"
    inner = body.get("status")
    if isinstance(inner, dict):
        shape, record = "nested", inner
    elif isinstance(inner, str):
        shape, record = "flat", body
    else:
        return "no status in body"
    if expected != "auto" and shape != expected:
        return f"expected a {expected} body, got a {shape} one"
    tx_id = record.get("id", body.get("id"))
    status = record.get("status")
    if not isinstance(tx_id, str) or not tx_id:
        return "no id in body"
    if status not in FINAL_STATUSES:
        return f"status {status!r} is not final"
    return tx_id, str(status), shape


def _is_settled(entry: object) -> bool:
    """Whether a partner truth entry can no longer change.

    No entry (the partner never got a POST) is settled; an entry without a boolean ``settled``
    comes from a partner that does not tell, and is taken as final.
    """
    return not (isinstance(entry, dict) and entry.get("settled") is False)


def _expected_outcome(entry: object) -> str | None:
    """The outcome the app should have got, from one settled partner truth entry; None = none yet.

    An id the partner never heard of moved no money, so ``failed`` is right for it, as it is for
    a settled entry with nothing recorded.
    """
    if entry is None:
        return "failed"
    if not isinstance(entry, dict):
        return None
    status = entry.get("status")
    if status is None:
        return "failed"
    if status in ("completed", "declined"):
        return str(status)
    return None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number_or_none(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class Simulator:
    """Plays the mobile app and its backend for one run; see :class:`SimulatorConfig`.

    Inject ``api_client`` / ``partner_client`` (e.g. over ``httpx.ASGITransport``) to run in
    process and point the service's pushes at :attr:`receiver_app`. Without an ``api_client`` the
    simulator opens real clients and serves the receiver itself on ``listen_host:listen_port``
    (override with ``serve_receiver``).
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        api_client: httpx.AsyncClient | None = None,
        partner_client: httpx.AsyncClient | None = None,
        serve_receiver: bool | None = None,
    ) -> None:
        self.config = config
        self._api_client = api_client
        self._partner_client = partner_client
        self._serve_receiver = api_client is None if serve_receiver is None else serve_receiver
        self.seed = (
            config.seed if config.seed is not None else random.SystemRandom().getrandbits(32)
        )
        self._txs: dict[str, _Tx] = {}
        self._count = _Counters()
        self._wait_mode: _WaitMode = "float"
        self._bound_port: int | None = None
        self._used = False
        self._on_sent: Callable[[], None] = lambda: None
        self._on_final: Callable[[], None] = lambda: None
        self._on_settled: Callable[[int], None] = lambda done: None
        self._settle_wait: float | None = None
        self.receiver_app = Starlette(
            routes=[Route("/transaction", self._on_push, methods=["PUT"])]
        )

    @property
    def receiver_url(self) -> str:
        """Where the service should push: the real port once the receiver listens."""
        host = self.config.listen_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._bound_port or self.config.listen_port}"

    async def run(self, progress: bool = False) -> SimulationReport:
        """Send the load, wait for every final and for the partner to settle (both bounded by the
        deadline), linger, then grade against the partner."""
        if self._used:
            raise RuntimeError("a Simulator runs once; make a new one")
        self._used = True
        cfg = self.config
        rng = random.Random(self.seed)
        for _ in range(cfg.n):
            # Ids are fresh per run even with a fixed seed: a rerun must not collide with the ids
            # a long-lived service or partner already knows. The seed fixes the behaviour only.
            concurrent = rng.random() < cfg.p_repeat_concurrent
            late = rng.random() < cfg.p_repeat_late
            delay = rng.uniform(cfg.repeat_late_min, cfg.repeat_late_max)
            tx = _Tx(str(uuid.uuid4()), concurrent, delay if late else None, anyio.Event())
            self._txs[tx.id] = tx
        started = anyio.current_time()
        async with contextlib.AsyncExitStack() as stack:
            api = self._api_client
            if api is None:
                api = await stack.enter_async_context(self._new_client(cfg.n))
            partner = self._partner_client
            if partner is None:
                partner = await stack.enter_async_context(self._new_client(1))
            if self._serve_receiver:
                await stack.enter_async_context(self._serving())
            if progress:
                stack.enter_context(self._progress_bar())
            await self._send_all(api)
            await self._await_settled(partner)
            # Lingering after the partner settled gives a service that learns of a late landing
            # the time to push its contradiction, which is then graded as conflicting.
            if cfg.linger:
                await anyio.sleep(cfg.scaled(cfg.linger))
            truth, stats, errors = await self._read_partner(partner)
        return self._report(truth, stats, errors, anyio.current_time() - started)

    # -- load -------------------------------------------------------------------------------

    def _new_client(self, n: int) -> httpx.AsyncClient:
        # Long-polling GETs hold connections; the pool must not make new payouts queue behind
        # them, yet stay bounded.
        limits = httpx.Limits(max_connections=min(3 * n + 8, 2_000), max_keepalive_connections=64)
        return httpx.AsyncClient(limits=limits, timeout=self.config.request_timeout)

    async def _send_all(self, api: httpx.AsyncClient) -> None:
        cfg = self.config
        interval = cfg.scaled(1.0 / cfg.rate)
        async with anyio.create_task_group() as tg:
            t0 = anyio.current_time()
            for i, tx in enumerate(self._txs.values()):
                delay = t0 + i * interval - anyio.current_time()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(self._drive, api, tx)

    async def _drive(self, api: httpx.AsyncClient, tx: _Tx) -> None:
        cfg = self.config
        tx.sent_at = anyio.current_time()
        self._on_sent()
        deadline_at = tx.sent_at + cfg.scaled(cfg.deadline)
        async with anyio.create_task_group() as tg:
            if tx.late_delay is not None:
                tg.start_soon(self._late_repeat, api, tx, cfg.scaled(tx.late_delay))
            await self._first_post(api, tx)
            await self._await_final(api, tx, deadline_at)

    async def _first_post(self, api: httpx.AsyncClient, tx: _Tx) -> None:
        for attempt in range(self.config.post_retries + 1):
            if attempt:
                await anyio.sleep(self.config.poll_seconds())
                self._count.post_retries += 1
            if attempt == 0 and tx.concurrent:
                self._count.repeats_concurrent += 1
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._post, api, tx)
                    tg.start_soon(self._post, api, tx)
            else:
                await self._post(api, tx)
            if tx.first_answer_at is not None:
                return

    async def _late_repeat(self, api: httpx.AsyncClient, tx: _Tx, delay: float) -> None:
        await anyio.sleep(delay)
        self._count.repeats_late += 1
        await self._post(api, tx)

    async def _post(self, api: httpx.AsyncClient, tx: _Tx) -> None:
        cfg = self.config
        headers: dict[str, str] = {}
        timeout = cfg.request_timeout
        if cfg.prefer_wait is not None:
            wait = cfg.scaled(cfg.prefer_wait)
            headers["Prefer"] = f"wait={_format_seconds(wait)}"
            timeout += wait
        self._count.requests += 1
        tx.requests += 1
        try:
            response = await api.post(
                f"{cfg.api_url.rstrip('/')}/transaction",
                json={"id": tx.id},
                headers=headers,
                timeout=timeout,
            )
        except httpx.HTTPError:
            self._count.post_errors += 1
            return
        if response.status_code not in _OK_POST_CODES:
            self._count.post_errors += 1
            return
        parsed = _parse_answer(response)
        if parsed is None or parsed[0] != tx.id:
            self._count.bad_answers += 1
            return
        if tx.first_answer_at is None:
            tx.first_answer_at = anyio.current_time()
            tx.first_answer_status = parsed[1]
        self._observe(tx, parsed[1], "answer")

    async def _await_final(self, api: httpx.AsyncClient, tx: _Tx, deadline_at: float) -> None:
        assert tx.sent_at is not None
        grace_at = min(tx.sent_at + self.config.scaled(self.config.push_grace), deadline_at)
        with anyio.move_on_after(grace_at - anyio.current_time()):
            await tx.done.wait()
        if tx.done.is_set() or anyio.current_time() >= deadline_at:
            return
        self._count.get_fallbacks += 1
        poll = self.config.poll_seconds()
        while not tx.done.is_set():
            began = anyio.current_time()
            if began >= deadline_at:
                return
            await self._get(
                api, tx, min(self.config.scaled(self.config.get_wait), deadline_at - began)
            )
            # A service may ignore ?wait= or 404 at once; space the GETs, but let a push end it.
            pause = min(began + poll, deadline_at) - anyio.current_time()
            if pause > 0 and not tx.done.is_set():
                with anyio.move_on_after(pause):
                    await tx.done.wait()

    def _wait_params(self, wait: float) -> dict[str, str]:
        if self._wait_mode == "float":
            return {"wait": _format_seconds(wait)}
        if self._wait_mode == "int":
            return {"wait": str(max(1, math.ceil(wait)))}
        return {}

    async def _get(self, api: httpx.AsyncClient, tx: _Tx, wait: float) -> None:
        mode = self._wait_mode
        params = self._wait_params(wait)
        self._count.get_requests += 1
        tx.gets += 1
        try:
            response = await api.get(
                f"{self.config.api_url.rstrip('/')}/transaction/{tx.id}",
                params=params,
                timeout=self.config.request_timeout + wait,
            )
        except httpx.HTTPError:
            self._count.get_errors += 1
            return
        if response.status_code in (400, 422) and params:
            # The service refused our wait value: try whole seconds, then no wait at all. Only
            # the first refusal per mode counts, as concurrent GETs may all be refused at once.
            if self._wait_mode == mode:
                self._wait_mode = "int" if mode == "float" else "none"
            return
        if response.status_code == 404:
            tx.get_404s += 1
            return
        parsed = _parse_answer(response) if response.status_code == 200 else None
        if parsed is None or parsed[0] != tx.id:
            self._count.get_errors += 1
            return
        self._observe(tx, parsed[1], "get")

    def _observe(self, tx: _Tx, status: str, via: Channel) -> None:
        if status not in FINAL_STATUSES:
            return
        if status not in tx.finals:
            tx.finals.append(status)
        if tx.final_at is None:
            tx.final_at = anyio.current_time()
            tx.final_via = via
            tx.done.set()
            self._on_final()

    # -- receiver ---------------------------------------------------------------------------

    async def _on_push(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ClientDisconnect:
            # The service died mid-push (a soak kills it on purpose): it will push again.
            return Response(status_code=499)
        except ValueError:
            body = None
        parsed = _parse_push(body, self.config.push_shape)
        if isinstance(parsed, str):
            self._count.pushes_rejected += 1
            return JSONResponse({"error": parsed}, status_code=400)
        tx_id, status, shape = parsed
        count = self._count
        count.pushes_received += 1
        count.push_shapes[shape] = count.push_shapes.get(shape, 0) + 1
        tx = self._txs.get(tx_id)
        if tx is None:
            # Acknowledged so the service stops retrying (e.g. deliveries left from a past run).
            count.pushes_unknown += 1
            return Response(status_code=204)
        if tx.pushes:
            count.repeat_pushes += 1
        tx.pushes.append(status)
        self._observe(tx, status, "push")
        return Response(status_code=204)

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        import uvicorn

        class _EmbeddedServer(uvicorn.Server):
            # uvicorn would take over SIGINT/SIGTERM and re-raise them only after shutting down;
            # the simulator's own run owns those signals.
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET
        # Bound here, not by uvicorn, so a busy port is an OSError now instead of a sys.exit later.
        sock = socket.create_server((cfg.listen_host, cfg.listen_port), family=family)
        self._bound_port = int(sock.getsockname()[1])
        server = _EmbeddedServer(
            uvicorn.Config(
                self.receiver_app,
                lifespan="off",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=2,
            )
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve, [sock])
                with anyio.fail_after(10):
                    # uvicorn exposes startup only as a flag, not an event.
                    while not server.started:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                try:
                    yield
                finally:
                    server.should_exit = True
        finally:
            sock.close()

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[None]:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskID,
            TextColumn,
            TimeElapsedColumn,
        )

        columns = (TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as bar:
            sent = bar.add_task("sent", total=self.config.n)
            final = bar.add_task("final", total=self.config.n)
            settled: list[TaskID] = []

            def on_settled(done: int) -> None:
                if not settled:
                    settled.append(bar.add_task("settled", total=self.config.n))
                bar.update(settled[0], completed=done)

            self._on_sent = lambda: bar.advance(sent)
            self._on_final = lambda: bar.advance(final)
            self._on_settled = on_settled
            try:
                yield
            finally:
                self._on_sent = self._on_final = lambda: None
                self._on_settled = lambda done: None

    # -- grading ----------------------------------------------------------------------------

    async def _fetch_partner(
        self, client: httpx.AsyncClient, path: str, key: str | None, errors: list[str]
    ) -> dict[str, Any] | None:
        base = self.config.partner_url.rstrip("/")
        try:
            response = await client.get(f"{base}{path}", timeout=self.config.request_timeout)
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            errors.append(f"GET {path} failed: {exc!r}")
            return None
        if key is not None:
            body = body.get(key) if isinstance(body, dict) else None
        if not isinstance(body, dict):
            errors.append(f"GET {path}: unexpected body")
            return None
        return body

    async def _await_settled(self, client: httpx.AsyncClient) -> None:
        """Wait until the partner's record of every id of this run can no longer change.

        Grading a record that may still change would pass a service that reported ``failed``
        before a late landing. Bounded by the deadline after the last send; a partner that cannot
        be read ends the wait at once (the final read reports the error).
        """
        cfg = self.config
        sent = [tx.sent_at for tx in self._txs.values() if tx.sent_at is not None]
        if not sent:
            return
        until = max(sent) + cfg.scaled(cfg.deadline)
        began = anyio.current_time()
        try:
            while True:
                truth = await self._fetch_partner(client, "/_mock/truth", "transactions", [])
                if truth is None:
                    return
                done = sum(1 for tx_id in self._txs if _is_settled(truth.get(tx_id)))
                self._on_settled(done)
                now = anyio.current_time()
                if done == len(self._txs) or now >= until:
                    return
                await anyio.sleep(min(max(cfg.poll_seconds(), _MIN_SETTLE_POLL_S), until - now))
        finally:
            self._settle_wait = anyio.current_time() - began

    async def _read_partner(
        self, client: httpx.AsyncClient
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
        errors: list[str] = []
        truth = await self._fetch_partner(client, "/_mock/truth", "transactions", errors)
        stats = await self._fetch_partner(client, "/_mock/stats", None, errors)
        return truth, stats, errors

    def _verdict(self, tx: _Tx, truth: Mapping[str, Any] | None) -> tuple[Verdict, str | None]:
        if len(tx.finals) > 1:
            return "conflicting", None
        if not tx.finals:
            return "missing", None
        if truth is None:
            return "unverified", None
        entry = truth.get(tx.id)
        if not _is_settled(entry):
            return "unsettled", None
        expected = _expected_outcome(entry)
        return ("correct" if tx.finals[0] == expected else "wrong"), expected

    def _report(
        self,
        truth: dict[str, Any] | None,
        stats: dict[str, Any] | None,
        errors: list[str],
        duration: float,
    ) -> SimulationReport:
        cfg, count = self.config, self._count
        report = SimulationReport(
            n=cfg.n,
            seed=self.seed,
            time_scale=cfg.time_scale,
            duration_s=duration,
            settle_wait_s=self._settle_wait,
            requests_sent=count.requests,
            repeats_concurrent=count.repeats_concurrent,
            repeats_late=count.repeats_late,
            repeats_sent=count.repeats_concurrent + count.repeats_late,
            post_retries=count.post_retries,
            post_errors=count.post_errors,
            bad_answers=count.bad_answers,
            pushes_received=count.pushes_received,
            repeat_pushes=count.repeat_pushes,
            pushes_unknown=count.pushes_unknown,
            pushes_rejected=count.pushes_rejected,
            push_shapes=dict(sorted(count.push_shapes.items())),
            get_fallbacks=count.get_fallbacks,
            get_requests=count.get_requests,
            get_errors=count.get_errors,
            partner_errors=errors,
        )
        latencies: list[float] = []
        finals: list[float] = []
        by_channel: dict[str, int] = {}
        for tx in self._txs.values():
            if tx.sent_at is None:
                continue
            report.sent += 1
            if tx.first_answer_at is not None:
                latencies.append((tx.first_answer_at - tx.sent_at) * 1000.0)
            if tx.final_at is not None and tx.final_via is not None:
                finals.append(tx.final_at - tx.sent_at)
                by_channel[tx.final_via] = by_channel.get(tx.final_via, 0) + 1
            verdict, expected = self._verdict(tx, truth)
            if verdict == "correct":
                report.correct += 1
                continue
            setattr(report, verdict, getattr(report, verdict) + 1)
            listed: list[str] = getattr(report, f"{verdict}_ids")
            if len(listed) < cfg.max_listed:
                listed.append(tx.id)
            if len(report.non_correct) < cfg.max_listed:
                report.non_correct.append(self._details(tx, verdict, expected, truth))
        report.first_answer_p50_ms = _percentile(latencies, 50)
        report.first_answer_p99_ms = _percentile(latencies, 99)
        report.final_p50_s = _percentile(finals, 50)
        report.final_p90_s = _percentile(finals, 90)
        report.final_max_s = max(finals, default=None)
        report.finals_by_channel = dict(sorted(by_channel.items()))
        self._add_partner(report, truth, stats)
        return report

    def _details(
        self, tx: _Tx, verdict: Verdict, expected: str | None, truth: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        return {
            "id": tx.id,
            "verdict": verdict,
            "expected": expected,
            "reported": list(tx.finals),
            "first_answer": tx.first_answer_status,
            "final_via": tx.final_via,
            "pushes": list(tx.pushes),
            "gets": tx.gets,
            "get_404s": tx.get_404s,
            "requests": tx.requests,
            "partner": truth.get(tx.id) if truth is not None else None,
        }

    def _add_partner(
        self,
        report: SimulationReport,
        truth: Mapping[str, Any] | None,
        stats: Mapping[str, Any] | None,
    ) -> None:
        ours = self._txs.keys()
        doubles: set[str] = set()
        if truth is not None:
            entries = [truth.get(tx_id) for tx_id in ours]
            posts = [_int_or_none(e.get("posts")) or 0 for e in entries if isinstance(e, dict)]
            report.not_sent_to_partner = sum(1 for e in entries if not isinstance(e, dict))
            report.partner_posts_total = sum(posts)
            report.partner_posts_max_per_id = max(posts, default=0)
            doubles.update(
                tx_id
                for tx_id, e in zip(ours, entries, strict=True)
                if isinstance(e, dict) and e.get("double_payment") is True
            )
        if stats is not None:
            listed = stats.get("double_payments")
            if isinstance(listed, list):
                doubles.update(tx_id for tx_id in listed if tx_id in self._txs)
            if report.partner_posts_max_per_id is None:
                report.partner_posts_max_per_id = _int_or_none(stats.get("posts_max_per_id"))
            report.checks_total = _int_or_none(stats.get("checks_total"))
            if report.checks_total is not None and report.sent:
                report.checks_per_payout = report.checks_total / report.sent
            report.checks_peak_per_second = _number_or_none(stats.get("checks_peak_per_second"))
            report.blocks = _int_or_none(stats.get("blocks"))
            report.rate_limited_checks = _int_or_none(stats.get("rate_limited_checks"))
            report.webhooks_sent = _int_or_none(stats.get("webhooks_sent"))
            report.webhooks_failed = _int_or_none(stats.get("webhooks_failed"))
        report.double_payments = sorted(doubles)


# -- output -----------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def render_summary(report: SimulationReport) -> Table:
    """A two-column rich table of the report, titled with the verdict."""
    from rich.table import Table

    verdict = "[bold green]OK[/]" if report.ok else "[bold red]NOT OK[/]"
    table = Table(title=f"Simulation: {verdict}", show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value")

    def bad(value: int | None) -> str:
        return "[red]unknown[/]" if value is None else f"[red]{value}[/]" if value else "0"

    scale = report.time_scale
    finals = (report.final_p50_s, report.final_p90_s, report.final_max_s)
    final_times = " / ".join(_fmt(v, "s", 2) for v in finals)
    if scale != 1.0 and report.final_max_s is not None:
        scenario = (None if v is None else v / scale for v in finals)
        final_times += f"  ({' / '.join(_fmt(v, 's', 1) for v in scenario)} scenario)"
    rows = [
        ("payouts sent", f"{report.sent} of {report.n} (seed {report.seed}, scale {scale:g})"),
        (
            "requests",
            f"{report.requests_sent} ({report.repeats_concurrent} concurrent + "
            f"{report.repeats_late} late repeats, {report.post_retries} retries, "
            f"{report.post_errors} errors)",
        ),
        ("correct", f"[green]{report.correct}[/]"),
        ("wrong", bad(report.wrong)),
        ("missing", bad(report.missing)),
        ("conflicting", bad(report.conflicting)),
        ("unverified", bad(report.unverified)),
        ("unsettled", bad(report.unsettled)),
        (
            "first answer p50 / p99",
            " / ".join(
                _fmt(v, " ms") for v in (report.first_answer_p50_ms, report.first_answer_p99_ms)
            ),
        ),
        ("final p50 / p90 / max", final_times),
        (
            "finals learned by",
            ", ".join(f"{k} {v}" for k, v in report.finals_by_channel.items()) or "-",
        ),
        (
            "pushes",
            f"{report.pushes_received} received, {report.repeat_pushes} repeats, "
            f"{report.pushes_unknown} unknown, {bad(report.pushes_rejected)} rejected",
        ),
        ("GET fallbacks", f"{report.get_fallbacks} ids, {report.get_requests} GETs"),
        ("partner POSTs max per id", _fmt(report.partner_posts_max_per_id, digits=0)),
        ("double payments", bad(len(report.double_payments))),
        (
            "status checks",
            f"{_fmt(report.checks_per_payout, ' per payout', 2)}, "
            f"peak {_fmt(report.checks_peak_per_second, '/s')}",
        ),
        ("blocks", bad(report.blocks)),
        (
            "duration",
            f"{_fmt(report.duration_s, 's', 2)} "
            f"({_fmt(report.settle_wait_s, 's', 2)} waiting for the partner to settle)",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    for problem in report.problems():
        table.add_row("[red]problem[/]", problem)
    return table


def write_json(report: SimulationReport, path: str | Path) -> None:
    """Write ``report.to_dict()`` as indented JSON."""
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


# -- command line ---------------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    d = SimulatorConfig()
    add = parser.add_argument
    add("--api", default=d.api_url, help="our service's base URL (default: %(default)s)")
    add("--partner", default=d.partner_url, help="mock partner's base URL (default: %(default)s)")
    add("-n", "--count", dest="n", type=int, default=d.n, help="payouts (default: %(default)s)")
    add("--rate", type=float, default=d.rate, help="payouts per second (default: %(default)s)")
    add(
        "--listen",
        type=_host_port,
        default=(d.listen_host, d.listen_port),
        metavar="HOST:PORT",
        help="push receiver address (default: 127.0.0.1:3100)",
    )
    add("--time-scale", type=float, default=d.time_scale, help="multiplies every duration")
    add("--seed", type=int, default=None, help="fixes repeats and delays (default: random)")
    add("--p-repeat-concurrent", type=float, default=d.p_repeat_concurrent, metavar="P")
    add("--p-repeat-late", type=float, default=d.p_repeat_late, metavar="P")
    add("--push-grace", type=float, default=d.push_grace, metavar="S", help="then GET ?wait=")
    add("--get-wait", type=float, default=d.get_wait, metavar="S")
    add("--deadline", type=float, default=d.deadline, metavar="S", help="per payout")
    add("--linger", type=float, default=d.linger, metavar="S", help="keep receiving pushes")
    add("--push-shape", choices=get_args(PushShape), default=d.push_shape)
    add("--prefer-wait", type=float, default=None, metavar="S", help="send Prefer: wait=S")
    add("--json", dest="json_path", type=Path, default=None, metavar="PATH", help="write report")
    add("--no-progress", action="store_true", help="no live progress bar")
    add(
        "--allow-remote",
        action="store_true",
        help="allow non-loopback URLs and listen address (e.g. between containers)",
    )


def config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """Build the config from parsed ``add_arguments`` options (ValueError if invalid)."""
    host, port = ns.listen
    return SimulatorConfig(
        api_url=ns.api,
        partner_url=ns.partner,
        n=ns.n,
        rate=ns.rate,
        p_repeat_concurrent=ns.p_repeat_concurrent,
        p_repeat_late=ns.p_repeat_late,
        push_grace=ns.push_grace,
        get_wait=ns.get_wait,
        deadline=ns.deadline,
        linger=ns.linger,
        seed=ns.seed,
        time_scale=ns.time_scale,
        listen_host=host,
        listen_port=port,
        push_shape=ns.push_shape,
        prefer_wait=ns.prefer_wait,
        allow_remote=ns.allow_remote,
    )


def run_from_args(ns: argparse.Namespace) -> int:
    """Run a simulation from ``add_arguments`` options and print the summary.

    Returns 0 if the run is ok, 1 if not, 2 on a setup error (bad option, busy port), 130 if
    interrupted.
    """
    from rich.console import Console

    console = Console()
    try:
        simulator = Simulator(config_from_args(ns))
    except ValueError as exc:
        console.print(f"[red]simulate: {exc}[/]")
        return 2
    try:
        report = anyio.run(simulator.run, not ns.no_progress)
    except OSError as exc:
        console.print(f"[red]simulate: {exc}[/]")
        return 2
    except KeyboardInterrupt:
        console.print("[red]simulate: interrupted[/]")
        return 130
    console.print(render_summary(report))
    if ns.json_path is not None:
        write_json(report, ns.json_path)
    return report.exit_code()


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="resilient-payout simulate",
        description="Play the mobile app against a payout service and grade every outcome.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli())
