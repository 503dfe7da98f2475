"""``serve_mock_partner``: the mock partner on a real port, with uvicorn."""

from __future__ import annotations

import logging
from typing import Any

import anyio

from ._endpoints import ConnectionDropped
from ._log import log
from .config import MockPartnerConfig
from .partner import MockPartner

__all__ = ["serve_mock_partner"]


class _HideDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every deliberate ``p_drop``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionDropped))


async def serve_mock_partner(
    config: MockPartnerConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 3000,
    *,
    log_level: str = "info",
) -> None:
    """Serve the mock partner with uvicorn until cancelled (or SIGINT/SIGTERM).

    Logs one line per POST (no bodies) instead of uvicorn's access log. Needs ``uvicorn``
    (the ``server`` extra).
    """
    import uvicorn
    import uvicorn.config

    partner = MockPartner(config)
    log_config = dict(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"] = {
        **uvicorn.config.LOGGING_CONFIG["loggers"],
        log.name: {"handlers": ["default"], "level": log_level.upper(), "propagate": False},
    }
    server = uvicorn.Server(
        uvicorn.Config(
            partner.app,
            host=host,
            port=port,
            lifespan="on",
            access_log=False,
            log_level=log_level,
            log_config=log_config,
        )
    )
    hide_drops = _HideDrops()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(hide_drops)
    try:
        await _serve_until_cancelled(server)
    finally:
        uvicorn_log.removeFilter(hide_drops)


async def _serve_until_cancelled(server: Any) -> None:
    import asyncio

    async def serve() -> bool:
        # uvicorn calls sys.exit() when startup fails; a SystemExit escaping an asyncio task
        # would stop the whole event loop.
        try:
            await server.serve()
        except SystemExit:
            return False
        return True

    task = asyncio.ensure_future(serve())
    try:
        started = await asyncio.shield(task)
    except anyio.get_cancelled_exc_class():
        # Cancelling uvicorn mid-flight would skip its shutdown (open sockets, no lifespan end):
        # ask it to exit and wait for it instead.
        server.should_exit = True
        with anyio.CancelScope(shield=True):
            await task
        raise
    if not started:
        raise RuntimeError("the mock partner server failed to start (see uvicorn's log)")
