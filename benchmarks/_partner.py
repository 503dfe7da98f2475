"""Serve the mock partner from a JSON config: ``python -m benchmarks._partner PORT JSON``.

The same server as ``resilient-payout mock-partner`` (``serve_mock_partner``), without the CLI's
option parsing, so any ``MockPartnerConfig`` field can be set.
"""

from __future__ import annotations

import json
import sys

import anyio

from resilient_payout.cli._procs import tune_gc as _tune_gc
from resilient_payout.testing.mock_partner import MockPartnerConfig, serve_mock_partner


def main() -> None:
    """Serve on 127.0.0.1 until SIGTERM."""
    port, config = int(sys.argv[1]), MockPartnerConfig(**json.loads(sys.argv[2]))
    _tune_gc()  # as `resilient-payout mock-partner` does
    anyio.run(lambda: serve_mock_partner(config, "127.0.0.1", port, log_level="warning"))


if __name__ == "__main__":
    main()
