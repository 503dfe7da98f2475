"""The example service with the proposed fixes applied from outside ``src/`` (what-if runs).

``python -m benchmarks.whatif_service --port P --partner URL --client URL --storage URL
[--sniffio-stub] [--shards K] [--aiohttp]``: ``create_app`` with a ``client_factory`` that
shards HttpPartner's httpx pool over K clients, or sends the partner POSTs and the pushes through
aiohttp (``pip install aiohttp``); ``--sniffio-stub`` makes ``import sniffio`` succeed, as
installing sniffio would. Library code is unchanged; see docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import types
import zlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any


def _stub_sniffio() -> None:
    stub = types.ModuleType("sniffio")
    stub.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
    sys.modules["sniffio"] = stub


def main() -> None:
    """Serve on 127.0.0.1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--partner", required=True)
    ap.add_argument("--client", required=True)
    ap.add_argument("--storage", default="memory://")
    ap.add_argument("--sniffio-stub", action="store_true")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--aiohttp", action="store_true")
    ns = ap.parse_args()
    if ns.sniffio_stub:
        _stub_sniffio()

    import httpx
    import uvicorn

    from resilient_payout import HttpNotifier, HttpPartner, PayoutClient, storage_from_url
    from resilient_payout import partner as partner_module
    from resilient_payout.fastapi import ServiceSettings, create_app
    from resilient_payout.notify import NotificationFailed

    class Sharded:
        def __init__(self, parts: list[HttpPartner]) -> None:
            self.parts = parts

        def _pick(self, payout_id: str) -> HttpPartner:
            return self.parts[zlib.crc32(payout_id.encode()) % len(self.parts)]

        async def submit(self, payout_id: str, webhook_url: str) -> Any:
            return await self._pick(payout_id).submit(payout_id, webhook_url)

        async def check(self, payout_id: str) -> Any:
            return await self._pick(payout_id).check(payout_id)

    class AioPartner(HttpPartner):
        def __init__(self, base: str, session: Any, policy: Any) -> None:
            super().__init__(base, policy=policy)
            self._session = session

        async def _exchange(self, method: str, url: str, payload: Any, timeouts: Any) -> Any:
            async with self._session.request(method, url, json=payload) as r:
                return partner_module._Answer(r.status, r.headers, await r.read())

    class AioNotifier(HttpNotifier):
        def __init__(self, url: str, session: Any) -> None:
            super().__init__(url)
            self._session = session

        async def deliver(self, payout_id: str, status: Any) -> None:
            import aiohttp

            try:
                async with self._session.put(self.url, json=self.payload(payout_id, status)) as r:
                    ok = 200 <= r.status < 300
            except aiohttp.ClientError as exc:
                raise NotificationFailed(str(exc)) from exc
            if not ok:
                raise NotificationFailed(f"HTTP {r.status}")

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
            if ns.aiohttp:
                import aiohttp

                ps = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000))
                )
                pushes = await stack.enter_async_context(aiohttp.ClientSession())
                partner = AioPartner(s.partner_url, ps, policy)
                notifier: HttpNotifier = AioNotifier(s.push_url, pushes)
            else:
                limits = httpx.Limits(
                    max_connections=max(1, 2000 // ns.shards),
                    max_keepalive_connections=max(1, 256 // ns.shards),
                    keepalive_expiry=2.0,
                )
                clients = [
                    await stack.enter_async_context(httpx.AsyncClient(limits=limits))
                    for _ in range(ns.shards)
                ]
                parts = [HttpPartner(s.partner_url, client=c, policy=policy) for c in clients]
                partner = Sharded(parts) if ns.shards > 1 else parts[0]
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
