"""A small fake Partner B: a Starlette app that moves pretend money and keeps the truth.

It honours ``Idempotency-Key`` (the same key gets the first request's transfer, a 409 while that
is in progress, never a second transfer), answers after a short delay, sometimes gives up with a
504 while the transfer still lands later, sends signed webhooks (some never come; a refused one
is retried twice) and counts every transfer per reference, so a double payment is visible in
``/_fake/stats``. ``/_fake/truth`` is the ground truth per reference; both are also served at
``/_mock/...``, the paths the simulator grades against. Every duration is multiplied by
``time_scale``. It imports nothing from the adapter: it is the adapter's referee.

Run it with ``python -m examples.partner_b.fake --port 3000`` (the secret in
``PARTNER_B_SECRET``), or in-process: ``async with FakePartnerB(config) as fake:`` and serve
``fake.app``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["DEMO_SECRET", "FakeConfig", "FakePartnerB", "main"]

DEMO_SECRET = "partner-b-demo-secret-0123456789"  # noqa: S105 - the fake's default, for demos
FINAL = frozenset({"SUCCESS", "FAILED", "REJECTED"})
_OURS = {"SUCCESS": "completed", "FAILED": "declined", "REJECTED": "declined"}
_CURRENCY = re.compile(r"[A-Z]{3}")


@dataclass(frozen=True, kw_only=True)
class FakeConfig:
    """The fake's behaviour, in unscaled seconds; ``time_scale`` multiplies every duration."""

    seed: int = 0
    time_scale: float = 1.0
    secret: str = DEMO_SECRET
    answer_delay: tuple[float, float] = (0.2, 3.0)
    p_504: float = 0.15
    gateway_timeout: float = 10.0
    """A 504 comes this long after the request; its transfer lands within ``landing``."""
    landing: tuple[float, float] = (5.0, 60.0)
    p_final_at_once: float = 0.5
    """A transfer is final when made; else QUEUED/PROCESSING, final within ``settle``."""
    settle: tuple[float, float] = (2.0, 20.0)
    p_success: float = 0.7
    p_webhook: float = 0.8
    webhook_delay: tuple[float, float] = (1.0, 10.0)
    webhook_timeout: float = 5.0
    """Real seconds (not scaled) a webhook delivery may take."""

    def __post_init__(self) -> None:
        if not self.time_scale > 0 or len(self.secret.encode()) < 16:
            raise ValueError("time_scale must be > 0 and the secret at least 16 bytes")


@dataclass
class Transfer:
    ref: str
    body: dict[str, Any]
    state: str

    def record(self) -> dict[str, Any]:
        return {
            "payout_id": self.ref,
            "reference": self.body["reference"],
            "amount_minor": self.body["amount_minor"],
            "currency": self.body["currency"],
            "state": self.state,
        }


@dataclass
class _Key:
    body: dict[str, Any]
    ref: str | None = None
    """The transfer, once the first request with this key is done (None: in progress)."""
    done: anyio.Event = field(default_factory=anyio.Event)


class FakePartnerB:
    """Partner B's API as ``app``; ``async with`` runs its background jobs (landings, webhooks)."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config if config is not None else FakeConfig()
        self.transfers: dict[str, Transfer] = {}
        self.by_reference: dict[str, list[str]] = {}
        self.posts: Counter[str] = Counter()
        self.landing: Counter[str] = Counter()
        """Transfers still to land per reference (their POST answered 504)."""
        self.counts: Counter[str] = Counter()
        self.checks_per_second: Counter[int] = Counter()
        self._keys: dict[str, _Key] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._http: httpx.AsyncClient | None = None
        self._started = time.monotonic()
        admin = {"truth": self.truth, "stats": self.stats}
        self.app = Starlette(
            routes=[
                Route("/v1/payouts", self._payouts, methods=["GET", "POST"]),
                Route("/v1/payouts/{ref}", self._get, methods=["GET"]),
                *(
                    Route(f"/{prefix}/{name}", _admin(view), methods=["GET"])
                    for name, view in admin.items()
                    for prefix in ("_fake", "_mock")
                ),
            ]
        )

    async def __aenter__(self) -> FakePartnerB:
        self._http = httpx.AsyncClient(timeout=self.config.webhook_timeout, trust_env=False)
        self._tg = await anyio.create_task_group().__aenter__()
        self._started = time.monotonic()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        if self._http is not None:
            await self._http.aclose()

    # -- the API -----------------------------------------------------------------------------

    async def _payouts(self, request: Request) -> Response:
        if request.method == "GET":
            reference = request.query_params.get("reference")
            if not reference:
                return _error(400, "the reference query parameter is required")
            refs = self.by_reference.get(reference, [])
            return self._check(refs[-1] if refs else None)
        key = request.headers.get("idempotency-key", "")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "malformed JSON")
        problem = _invalid(body) or (None if 0 < len(key) <= 255 else "Idempotency-Key missing")
        if problem is not None:
            return _error(422, problem)
        self.posts[body["reference"]] += 1
        seen = self._keys.get(key)
        if seen is not None:
            return self._repeat(seen, body)
        entry = self._keys[key] = _Key(body)
        rng = random.Random(f"{self.config.seed}:{body['reference']}:{key}")
        final = (
            "SUCCESS"
            if rng.random() < self.config.p_success
            else rng.choice(["FAILED", "REJECTED"])
        )
        if rng.random() < self.config.p_504:
            self.landing[body["reference"]] += 1
            self._job(self._land, entry, final, rng.uniform(*self.config.landing), rng)
            await anyio.sleep(self._scaled(self.config.gateway_timeout))
            self.counts["answers_504"] += 1
            return _error(504, "gateway timeout")
        transfer = self._make(entry, final, rng)
        # Done in a job: a caller that gives up does not leave the key in progress for ever.
        self._job(self._complete, entry, transfer, rng.uniform(*self.config.answer_delay))
        await entry.done.wait()
        self.counts["answers_200"] += 1
        return JSONResponse(transfer.record())

    def _repeat(self, seen: _Key, body: dict[str, Any]) -> Response:
        if seen.body != body:
            return _error(422, "Idempotency-Key reused with another request")
        if seen.ref is None:
            self.counts["in_progress_409s"] += 1
            return _error(409, "a request with this Idempotency-Key is in progress", retry=True)
        self.counts["idempotent_replays"] += 1
        return JSONResponse(self.transfers[seen.ref].record())

    async def _get(self, request: Request) -> Response:
        return self._check(request.path_params["ref"])

    def _check(self, ref: str | None) -> Response:
        self.counts["checks"] += 1
        self.checks_per_second[
            int((time.monotonic() - self._started) / self.config.time_scale)
        ] += 1
        transfer = self.transfers.get(ref) if ref is not None else None
        if transfer is None:
            return _error(404, "no such payout")
        return JSONResponse(transfer.record())

    # -- the money -----------------------------------------------------------------------------

    def _make(self, entry: _Key, final: str, rng: random.Random) -> Transfer:
        reference = entry.body["reference"]
        ref = f"PB-{uuid.uuid4().hex[:16].upper()}"
        at_once = rng.random() < self.config.p_final_at_once
        transfer = Transfer(
            ref, entry.body, final if at_once else rng.choice(["QUEUED", "PROCESSING"])
        )
        self.transfers[ref] = transfer
        self.by_reference.setdefault(reference, []).append(ref)  # a second one: a double payment
        delay = 0.0 if at_once else rng.uniform(*self.config.settle)
        self._job(self._settle, transfer, final, delay, rng)
        return transfer

    async def _complete(self, entry: _Key, transfer: Transfer, delay: float) -> None:
        await anyio.sleep(self._scaled(delay))
        entry.ref = transfer.ref
        entry.done.set()

    async def _land(self, entry: _Key, final: str, delay: float, rng: random.Random) -> None:
        await anyio.sleep(self._scaled(delay))
        transfer = self._make(entry, final, rng)
        self.landing[entry.body["reference"]] -= 1
        entry.ref = transfer.ref
        entry.done.set()

    async def _settle(
        self, transfer: Transfer, final: str, delay: float, rng: random.Random
    ) -> None:
        await anyio.sleep(self._scaled(delay))
        transfer.state = final
        if rng.random() >= self.config.p_webhook:
            self.counts["webhooks_skipped"] += 1
            return
        event = {"event_id": f"evt_{uuid.uuid4().hex}", "payout_id": transfer.ref, "state": final}
        await anyio.sleep(self._scaled(rng.uniform(*self.config.webhook_delay)))
        for attempt in range(3):  # a refused webhook is tried twice more, later
            if attempt:
                # At least a real second apart, whatever the scale: a retry signed in the same
                # second would be byte for byte a replay, and refused as one.
                await anyio.sleep(max(1.0, self._scaled(rng.uniform(*self.config.webhook_delay))))
            if await self._deliver(transfer.body["callback_url"], event):
                return

    async def _deliver(self, url: str, event: dict[str, str]) -> bool:
        assert self._http is not None
        body = json.dumps(event).encode()
        ts = int(time.time())
        mac = hmac.new(self.config.secret.encode(), f"{ts}.".encode() + body, hashlib.sha256)
        headers = {
            "content-type": "application/json",
            "x-pb-signature": f"t={ts},v1={mac.hexdigest()}",
        }
        self.counts["webhooks_sent"] += 1
        try:
            ok = (await self._http.post(url, content=body, headers=headers)).is_success
        except httpx.HTTPError:
            ok = False
        self.counts["webhooks_failed"] += not ok
        return ok

    # -- the referee ---------------------------------------------------------------------------

    def truth(self) -> dict[str, Any]:
        """Per reference (our id): the first transfer's state (and ours), POSTs, transfers."""
        out: dict[str, Any] = {}
        for reference, posts in self.posts.items():
            transfers = [self.transfers[ref] for ref in self.by_reference.get(reference, [])]
            first = transfers[0] if transfers else None
            out[reference] = {
                "status": _OURS.get(first.state) if first else None,
                "state": first.state if first else None,
                "partner_ref": first.ref if first else None,
                "posts": posts,
                "transfers": len(transfers),
                "settled": not self.landing[reference] and all(t.state in FINAL for t in transfers),
                "double_payment": len(transfers) > 1,
            }
        return {"transactions": out}

    def stats(self) -> dict[str, Any]:
        """Counters, in the mock partner's names where they mean the same."""
        c = self.counts
        return {
            "posts_total": sum(self.posts.values()),
            "posts_max_per_id": max(self.posts.values(), default=0),
            "transfers_total": len(self.transfers),
            "double_payments": sorted(r for r, refs in self.by_reference.items() if len(refs) > 1),
            "answers": {"200": c["answers_200"], "504": c["answers_504"]},
            "idempotent_replays": c["idempotent_replays"],
            "in_progress_409s": c["in_progress_409s"],
            "checks_total": c["checks"],
            "checks_peak_per_second": max(self.checks_per_second.values(), default=0),
            "blocks": 0,  # Partner B rate-limits nobody
            "rate_limited_checks": 0,
            "webhooks_sent": c["webhooks_sent"],
            "webhooks_failed": c["webhooks_failed"],
            "webhooks_skipped": c["webhooks_skipped"],
        }

    # -- plumbing ----------------------------------------------------------------------------

    def _scaled(self, seconds: float) -> float:
        return seconds * self.config.time_scale

    def _job(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._tg is None:
            raise RuntimeError("FakePartnerB is not running: use `async with`")
        self._tg.start_soon(fn, *args)


def _admin(view: Callable[[], dict[str, Any]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return JSONResponse(view())

    return endpoint


def _error(code: int, message: str, *, retry: bool = False) -> Response:
    return JSONResponse({"error": message}, code, {"retry-after": "1"} if retry else None)


def _invalid(body: Any) -> str | None:
    """What is wrong with a POST body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    reference, amount, url = (
        body.get("reference"),
        body.get("amount_minor"),
        body.get("callback_url"),
    )
    if not (isinstance(reference, str) and 0 < len(reference) <= 128):
        return "reference must be a string of 1-128 characters"
    if not (isinstance(amount, int) and not isinstance(amount, bool) and amount > 0):
        return "amount_minor must be a positive integer"
    if not (isinstance(body.get("currency"), str) and _CURRENCY.fullmatch(body["currency"])):
        return "currency must be an ISO 4217 code"
    if not isinstance(body.get("beneficiary"), dict):
        return "beneficiary must be an object"
    if not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        return "callback_url must be an http(s) URL"
    return None


def main(argv: list[str] | None = None) -> None:
    """``python -m examples.partner_b.fake``: serve until interrupted."""
    from resilient_payout.testing._server import embedded_server, listen

    p = argparse.ArgumentParser(prog="python -m examples.partner_b.fake", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0)
    ns = p.parse_args(argv)
    secret = os.environ.get("PARTNER_B_SECRET") or DEMO_SECRET
    config = FakeConfig(seed=ns.seed, time_scale=ns.time_scale, secret=secret)

    async def serve() -> None:
        async with (
            FakePartnerB(config) as fake,
            embedded_server(fake.app, listen(ns.host, ns.port)),
        ):
            print(f"fake Partner B on http://{ns.host}:{ns.port}", flush=True)
            await anyio.sleep_forever()

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(serve)


if __name__ == "__main__":
    main()
