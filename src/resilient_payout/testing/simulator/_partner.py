"""Reads of the mock partner's admin API (``/_mock/truth``, ``/_mock/stats``) that grading needs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import httpx

from ._grading import Tx, is_settled
from .config import SimulatorConfig
from .render import Progress

__all__ = ["await_settled", "read"]

_MIN_SETTLE_POLL_S = 0.2
"""Floor under the interval between two reads of the partner's whole truth while waiting for it to
settle: one read lists every id the partner knows."""


async def _fetch(
    client: httpx.AsyncClient,
    config: SimulatorConfig,
    path: str,
    key: str | None,
    errors: list[str],
) -> dict[str, Any] | None:
    base = config.partner_url.rstrip("/")
    try:
        response = await client.get(f"{base}{path}", timeout=config.request_timeout)
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


async def await_settled(
    client: httpx.AsyncClient,
    config: SimulatorConfig,
    txs: Mapping[str, Tx],
    progress: Progress,
) -> float | None:
    """Wait until the partner's record of every id of ``txs`` can no longer change.

    Grading a record that may still change would pass a service that reported ``failed``
    before a late landing. Bounded by the deadline after the last send; a partner that cannot
    be read ends the wait at once (the final read reports the error). Returns the clock seconds
    waited, None when nothing was sent.
    """
    sent = [tx.sent_at for tx in txs.values() if tx.sent_at is not None]
    if not sent:
        return None
    until = max(sent) + config.scaled(config.deadline)
    began = anyio.current_time()
    while True:
        truth = await _fetch(client, config, "/_mock/truth", "transactions", [])
        if truth is None:
            break
        done = sum(1 for tx_id in txs if is_settled(truth.get(tx_id)))
        progress.settled(done)
        now = anyio.current_time()
        if done == len(txs) or now >= until:
            break
        await anyio.sleep(min(max(config.poll_seconds(), _MIN_SETTLE_POLL_S), until - now))
    return anyio.current_time() - began


async def read(
    client: httpx.AsyncClient, config: SimulatorConfig
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[str]]:
    """The partner's truth and stats (None where unreadable) and why any could not be read."""
    errors: list[str] = []
    truth = await _fetch(client, config, "/_mock/truth", "transactions", errors)
    stats = await _fetch(client, config, "/_mock/stats", None, errors)
    return truth, stats, errors
