"""The app's side of a run: :class:`Simulator` sends the load, receives the pushes, falls back to
GET, waits for the partner to settle, then hands what it saw to the pure grading."""

from __future__ import annotations

import contextlib
import math
import random
import uuid
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Literal

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .._server import embedded_server, listen
from . import _partner
from ._grading import Channel, Counters, Tx, grade
from .config import PushShape, SimulatorConfig
from .render import Progress, progress_bar
from .report import SimulationReport

__all__ = ["FINAL_STATUSES", "Simulator"]

FINAL_STATUSES = frozenset({"completed", "declined", "failed"})
"""The statuses the app may be told as final."""
_ANSWER_STATUSES = FINAL_STATUSES | {"pending"}
_OK_POST_CODES = frozenset({200, 201, 202})

_WaitMode = Literal["float", "int", "none"]


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
        self._txs: dict[str, Tx] = {}
        # Kept apart from the Tx records so grading takes plain data: set at an id's first
        # final outcome, it ends the wait for a push and the GET polling.
        self._done: dict[str, anyio.Event] = {}
        self._count = Counters()
        self._wait_mode: _WaitMode = "float"
        self._bound_port: int | None = None
        self._used = False
        self._progress = Progress()
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

    @property
    def transactions(self) -> Mapping[str, Tx]:
        """Every payout of the run as the app saw it (complete once :meth:`run` returned)."""
        return MappingProxyType(self._txs)

    async def run(self, progress: bool = False) -> SimulationReport:
        """Send the load, wait for every final and for the partner to settle (both bounded by the
        deadline), linger, then grade against the partner."""
        if self._used:
            raise RuntimeError("a Simulator runs once; make a new one")
        self._used = True
        cfg = self.config
        self._plan()
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
                self._progress = stack.enter_context(progress_bar(cfg.n))
            await self._send_all(api)
            settle_wait = await _partner.await_settled(partner, cfg, self._txs, self._progress)
            # Lingering after the partner settled gives a service that learns of a late landing
            # the time to push its contradiction, which is then graded as conflicting.
            if cfg.linger:
                await anyio.sleep(cfg.scaled(cfg.linger))
            truth, stats, errors = await _partner.read(partner, cfg)
        return grade(
            cfg,
            self._txs,
            truth,
            stats,
            seed=self.seed,
            count=self._count,
            errors=errors,
            duration=anyio.current_time() - started,
            settle_wait=settle_wait,
        )

    def _plan(self) -> None:
        cfg = self.config
        rng = random.Random(self.seed)
        for _ in range(cfg.n):
            # Ids are fresh per run even with a fixed seed: a rerun must not collide with the ids
            # a long-lived service or partner already knows. The seed fixes the behaviour only.
            concurrent = rng.random() < cfg.p_repeat_concurrent
            late = rng.random() < cfg.p_repeat_late
            delay = rng.uniform(cfg.repeat_late_min, cfg.repeat_late_max)
            tx = Tx(str(uuid.uuid4()), concurrent, delay if late else None)
            self._txs[tx.id] = tx
            self._done[tx.id] = anyio.Event()

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

    async def _drive(self, api: httpx.AsyncClient, tx: Tx) -> None:
        cfg = self.config
        tx.sent_at = anyio.current_time()
        self._progress.sent()
        deadline_at = tx.sent_at + cfg.scaled(cfg.deadline)
        async with anyio.create_task_group() as tg:
            if tx.late_delay is not None:
                tg.start_soon(self._late_repeat, api, tx, cfg.scaled(tx.late_delay))
            await self._first_post(api, tx)
            await self._await_final(api, tx, deadline_at)

    async def _first_post(self, api: httpx.AsyncClient, tx: Tx) -> None:
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

    async def _late_repeat(self, api: httpx.AsyncClient, tx: Tx, delay: float) -> None:
        await anyio.sleep(delay)
        self._count.repeats_late += 1
        await self._post(api, tx)

    async def _post(self, api: httpx.AsyncClient, tx: Tx) -> None:
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

    async def _await_final(self, api: httpx.AsyncClient, tx: Tx, deadline_at: float) -> None:
        assert tx.sent_at is not None
        done = self._done[tx.id]
        grace_at = min(tx.sent_at + self.config.scaled(self.config.push_grace), deadline_at)
        with anyio.move_on_after(grace_at - anyio.current_time()):
            await done.wait()
        if done.is_set() or anyio.current_time() >= deadline_at:
            return
        self._count.get_fallbacks += 1
        poll = self.config.poll_seconds()
        while not done.is_set():
            began = anyio.current_time()
            if began >= deadline_at:
                return
            await self._get(
                api, tx, min(self.config.scaled(self.config.get_wait), deadline_at - began)
            )
            # A service may ignore ?wait= or 404 at once; space the GETs, but let a push end it.
            pause = min(began + poll, deadline_at) - anyio.current_time()
            if pause > 0 and not done.is_set():
                with anyio.move_on_after(pause):
                    await done.wait()

    def _wait_params(self, wait: float) -> dict[str, str]:
        if self._wait_mode == "float":
            return {"wait": _format_seconds(wait)}
        if self._wait_mode == "int":
            return {"wait": str(max(1, math.ceil(wait)))}
        return {}

    async def _get(self, api: httpx.AsyncClient, tx: Tx, wait: float) -> None:
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

    def _observe(self, tx: Tx, status: str, via: Channel) -> None:
        if status not in FINAL_STATUSES:
            return
        if status not in tx.finals:
            tx.finals.append(status)
        if tx.final_at is None:
            tx.final_at = anyio.current_time()
            tx.final_via = via
            self._done[tx.id].set()
            self._progress.final()

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
        else:
            tx.pushed_at = anyio.current_time()
        tx.pushes.append(status)
        self._observe(tx, status, "push")
        return Response(status_code=204)

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[None]:
        # Bound before the load starts, so a busy port is an OSError (exit 2) up front.
        sock = listen(self.config.listen_host, self.config.listen_port)
        self._bound_port = int(sock.getsockname()[1])
        async with embedded_server(self.receiver_app, sock, graceful_shutdown=2):
            yield
