"""A plain asyncio worker: it submits payouts and receives their outcomes through the library,
with no web framework. Settings come from ``RP_*`` variables (docs/service.md), or pass your own.

Run it with ``python -m examples.worker.worker order-1 order-2`` against a partner
(``resilient-payout mock-partner``). Every outcome arrives through a callable notifier fed by
the outbox: durably, at least once, so a restarted worker still gets what was decided while it
was down.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anyio

from resilient_payout import CallbackNotifier, PayoutStatus
from resilient_payout.settings import ServiceSettings
from resilient_payout.wiring import open_client

DEADLINE = 600.0
"""Scenario seconds to wait for every outcome (the slowest correct path is ~300 s)."""


class Outcomes:
    """Final outcomes as the library pushes them; a repeated push (at least once) is ignored."""

    def __init__(self, expected: Iterable[str]) -> None:
        self.statuses: dict[str, PayoutStatus] = {}
        self._expected = set(expected)
        self._all_in = anyio.Event()

    async def record(self, payout_id: str, status: PayoutStatus) -> None:
        # Returning acknowledges the push; raising would have it retried later.
        if payout_id not in self.statuses:
            self.statuses[payout_id] = status
            print(f"{payout_id} {status.value}", flush=True)
        if self._expected <= self.statuses.keys():
            self._all_in.set()

    async def wait(self) -> None:
        await self._all_in.wait()


async def run(
    orders: Sequence[Mapping[str, Any]], settings: ServiceSettings | None = None
) -> dict[str, PayoutStatus]:
    """Submit ``orders`` (each ``{"id": ..., ...}``) and return their final statuses."""
    settings = ServiceSettings.from_env() if settings is None else settings
    outcomes = Outcomes(order["id"] for order in orders)
    # No webhook endpoint here: payouts settle by the partner's answers and status checks.
    async with open_client(settings, notifier=CallbackNotifier(outcomes.record)) as client:
        for order in orders:
            await client.submit(dict(order))  # answers at once; a repeat is idempotent
        with anyio.fail_after(DEADLINE * settings.time_scale):
            await outcomes.wait()
    return {order["id"]: outcomes.statuses[order["id"]] for order in orders}


def main(argv: Sequence[str] | None = None) -> int:
    """Pay 100 to each id given (default: three); exit 0 once every outcome is in."""
    ids = list(argv if argv is not None else sys.argv[1:]) or ["worker-1", "worker-2", "worker-3"]
    anyio.run(run, [{"id": payout_id, "amount": 100} for payout_id in ids])
    return 0


if __name__ == "__main__":
    sys.exit(main())
