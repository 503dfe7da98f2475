"""The example service with an alternative wiring, for before/after runs (what-ifs).

``python -m benchmarks.whatif_service --port P --partner URL --client URL --storage URL
[--httpx]``: ``create_app`` with a ``client_factory`` that sends the partner calls and the pushes
through httpx clients (the library's earlier default: 16 pools of 128 connections for the
partner) instead of the default aiohttp pool. Library code is unchanged; see
docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any


def _log_gc() -> None:
    import atexit
    import gc
    import sys
    import time

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            took = time.perf_counter() - started[0]
            pauses[info["generation"]].append(took)
            if took > 0.01:  # the process is often SIGKILLed: report long pauses as they happen
                print(
                    f"gc gen{info['generation']} pause {took * 1000:.1f} ms at {time.time():.3f}",
                    file=sys.stderr,
                )

    gc.callbacks.append(callback)

    def report() -> None:
        for gen, xs in pauses.items():
            if xs:
                xs.sort()
                print(
                    f"gc gen{gen}: {len(xs)} collections, total {sum(xs) * 1000:.0f} ms, "
                    f"p50 {xs[len(xs) // 2] * 1000:.2f} ms, max {xs[-1] * 1000:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )

    atexit.register(report)


def main() -> None:
    """Serve on 127.0.0.1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--partner", required=True)
    ap.add_argument("--client", required=True)
    ap.add_argument("--storage", default="memory://")
    ap.add_argument("--httpx", action="store_true", help="partner calls and pushes over httpx")
    ap.add_argument("--gc-log", action="store_true", help="print GC pauses (> 10 ms at once)")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once the app is loaded")
    ap.add_argument("--gc-threshold", default="", help="gc.set_threshold(a, b, c) as 'a,b,c'")
    ns = ap.parse_args()
    if ns.gc_log:
        _log_gc()

    import httpx
    import uvicorn

    from resilient_payout import (
        HttpNotifier,
        HttpPartner,
        PayoutClient,
        SubmitAttempt,
        storage_from_url,
    )
    from resilient_payout.fastapi import ServiceSettings, create_app

    class Sharded:
        """One HttpPartner per httpx pool; a payout always uses the same one."""

        idempotency = None

        def __init__(self, parts: list[HttpPartner]) -> None:
            self.parts = parts

        def _pick(self, payout_id: str) -> HttpPartner:
            return self.parts[zlib.crc32(payout_id.encode()) % len(self.parts)]

        async def submit(self, attempt: SubmitAttempt) -> Any:
            return await self._pick(attempt.payout_id).submit(attempt)

        async def check(self, payout_id: str, partner_ref: str | None = None) -> Any:
            return await self._pick(payout_id).check(payout_id, partner_ref)

    settings = ServiceSettings(
        partner_url=ns.partner,
        public_url=f"http://127.0.0.1:{ns.port}",
        client_url=ns.client,
        storage_url=ns.storage,
    )

    @asynccontextmanager
    async def factory(s: ServiceSettings) -> AsyncIterator[PayoutClient]:
        policy = s.policy()
        async with AsyncExitStack() as stack:
            partner: Any
            if ns.httpx:
                limits = httpx.Limits(
                    max_connections=128, max_keepalive_connections=16, keepalive_expiry=2.0
                )
                clients = [
                    await stack.enter_async_context(httpx.AsyncClient(limits=limits))
                    for _ in range(16)
                ]
                partner = Sharded(
                    [HttpPartner(s.partner_url, client=c, policy=policy) for c in clients]
                )
                push_client = await stack.enter_async_context(httpx.AsyncClient())
                notifier = HttpNotifier(
                    s.push_url, client=push_client, timeout=policy.notify_timeout
                )
            else:
                partner = await stack.enter_async_context(HttpPartner(s.partner_url, policy=policy))
                notifier = HttpNotifier(s.push_url, timeout=policy.notify_timeout)
            await stack.enter_async_context(notifier)
            client = PayoutClient(
                storage=storage_from_url(s.storage_url),
                partner=partner,
                webhook_url=s.webhook_url,
                notifier=notifier,
                policy=policy,
            )
            entered = await stack.enter_async_context(client)
            if ns.gc_log:
                import anyio

                async def probe() -> None:
                    import time

                    while True:
                        t = time.perf_counter()
                        await anyio.sleep(0.005)
                        late = time.perf_counter() - t - 0.005
                        if late > 0.02:
                            print(f"lag {late * 1000:.0f} ms at {time.time():.3f}", file=sys.stderr)

                tg = await stack.enter_async_context(anyio.create_task_group())
                tg.start_soon(probe)
                stack.callback(tg.cancel_scope.cancel)
            yield entered

    app = create_app(settings, client_factory=factory)
    if ns.gc_threshold:
        import gc

        gc.set_threshold(*(int(x) for x in ns.gc_threshold.split(",")))
    if ns.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
    uvicorn.run(app, host="127.0.0.1", port=ns.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
