"""The example service with an alternative wiring, for before/after runs (what-ifs).

``python -m benchmarks.whatif_service --port P --partner URL --client URL --storage URL
[--httpx]``: ``create_app`` with a ``client_factory`` that sends the partner calls and the pushes
through httpx clients (the library's default before 0.6: 16 pools of 128 connections for the
partner) instead of the default aiohttp pool. Library code is unchanged; see
docs/performance.md.
"""

from __future__ import annotations

import argparse
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any


def main() -> None:
    """Serve on 127.0.0.1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--partner", required=True)
    ap.add_argument("--client", required=True)
    ap.add_argument("--storage", default="memory://")
    ap.add_argument("--httpx", action="store_true", help="partner calls and pushes over httpx")
    ns = ap.parse_args()

    import httpx
    import uvicorn

    from resilient_payout import HttpNotifier, HttpPartner, PayoutClient, storage_from_url
    from resilient_payout.fastapi import ServiceSettings, create_app

    class Sharded:
        """One HttpPartner per httpx pool; a payout always uses the same one."""

        def __init__(self, parts: list[HttpPartner]) -> None:
            self.parts = parts

        def _pick(self, payout_id: str) -> HttpPartner:
            return self.parts[zlib.crc32(payout_id.encode()) % len(self.parts)]

        async def submit(self, payout_id: str, webhook_url: str) -> Any:
            return await self._pick(payout_id).submit(payout_id, webhook_url)

        async def check(self, payout_id: str) -> Any:
            return await self._pick(payout_id).check(payout_id)

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
            yield await stack.enter_async_context(client)

    app = create_app(settings, client_factory=factory)
    uvicorn.run(app, host="127.0.0.1", port=ns.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
