"""Embedded uvicorn servers on sockets we bind ourselves (internal API of the CLI and testing).

Binding here, not in uvicorn, turns a busy port into an :class:`OSError` at once instead of a
``sys.exit`` from inside uvicorn later; the caller owns SIGINT/SIGTERM, not the server.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio

__all__ = ["embedded_server", "listen"]


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: the kernel picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    try:
        # create_server's socket does not say it is TCP, so asyncio would leave Nagle on for the
        # connections it accepts: ~40 ms added to every small response.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def embedded_server(
    app: Any, sock: socket.socket, *, graceful_shutdown: int | None = None
) -> AsyncIterator[None]:
    """Serve the ASGI ``app`` on ``sock`` (no lifespan, no access log) inside this block.

    The socket is closed on exit, also when the server cannot be built. Startup waits up to 10 s.
    """
    try:
        import uvicorn

        class _Embedded(uvicorn.Server):
            # uvicorn would take over SIGINT/SIGTERM and re-raise them only after shutting down.
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        server = _Embedded(
            uvicorn.Config(
                app,
                lifespan="off",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=graceful_shutdown,
            )
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
                    await anyio.sleep(0.01)
            try:
                yield
            finally:
                server.should_exit = True
    finally:
        sock.close()
