"""The example service (``resilient_payout.service``) speaking Partner B instead of the exercise's
partner: the same routes and ``RP_*`` settings, another client factory.

``PARTNER_B_SECRET`` (at least 16 bytes) is the webhook secret shared with Partner B;
``PARTNER_B_DEMO_AMOUNT`` (the demo only) is paid for a request without an ``amount``.
``RP_WEBHOOK_SECRETS`` is not used: Partner B signs with its own ``X-PB-Signature``.

Run it with ``python -m examples.partner_b.service [serve flags]`` (``resilient-payout serve
--help`` lists them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from resilient_payout import HttpNotifier, InMemoryReplayStore, PayoutClient
from resilient_payout.service import ServiceSettings, create_app
from resilient_payout.storage import storage_from_url
from resilient_payout.wiring import open_storage

from .adapter import PartnerBCodec, PartnerBVerifier, parse_webhook, partner_b

__all__ = ["SECRET_VAR", "create_partner_b_app", "main", "partner_b_client"]

SECRET_VAR = "PARTNER_B_SECRET"  # noqa: S105 - the variable's name, not a secret
DEMO_AMOUNT_VAR = "PARTNER_B_DEMO_AMOUNT"


@asynccontextmanager
async def partner_b_client(settings: ServiceSettings) -> AsyncIterator[PayoutClient]:
    """A :data:`~resilient_payout.wiring.ClientFactory`: like ``open_client``, with Partner B's
    adapter, webhook parser and verifier (``open_client`` always uses the settings' verifier)."""
    secret = os.environ.get(SECRET_VAR, "")
    verifier = PartnerBVerifier(secret, tolerance=settings.webhook_tolerance)  # ValueError if unset
    codec = PartnerBCodec(demo_amount=os.environ.get(DEMO_AMOUNT_VAR) or None)
    policy = settings.policy()
    async with AsyncExitStack() as stack:
        storage = await open_storage(storage_from_url(settings.storage_url), settings.storage_url)
        stack.push_async_callback(storage.close)  # also if the client never starts
        partner = await stack.enter_async_context(
            partner_b(settings.partner_url, codec, policy=policy)
        )
        notifier = await stack.enter_async_context(
            HttpNotifier(settings.push_url, body=settings.push_body, timeout=policy.notify_timeout)
        )
        client = PayoutClient(
            storage=storage,
            partner=partner,
            webhook_url=settings.webhook_url,
            notifier=notifier,
            policy=policy,
            webhook_parser=parse_webhook,
            webhook_verifier=verifier,
            # Event ids are remembered per process: several instances need a shared store.
            webhook_replays=InMemoryReplayStore(),
            close_storage=False,
        )
        async with client:
            yield client


def create_partner_b_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The service app over :func:`partner_b_client` (settings from ``RP_*`` by default)."""
    return create_app(settings or ServiceSettings.from_env(), client_factory=partner_b_client)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.partner_b.service``: the ``serve`` flags, served until SIGTERM."""
    import uvicorn

    from resilient_payout.cli import serve
    from resilient_payout.testing._server import listen

    parser = argparse.ArgumentParser(prog="python -m examples.partner_b")
    serve.add_parser(parser.add_subparsers())
    ns = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    try:
        settings = serve.serve_settings(ns)
        PartnerBVerifier(os.environ.get(SECRET_VAR, ""))  # fail now, not in the lifespan
        app = create_partner_b_app(settings)
    except ValueError as exc:
        print(f"partner B service ({SECRET_VAR}, RP_*): {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, lifespan="on", log_level=ns.log_level, access_log=ns.access_log)
    server = uvicorn.Server(config)
    with listen(settings.host, settings.port) as sock:
        server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
