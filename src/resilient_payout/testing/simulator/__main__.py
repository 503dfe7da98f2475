"""``python -m resilient_payout.testing.simulator``: the ``simulate`` command line."""

from __future__ import annotations

import sys

from .cli import run_cli

if __name__ == "__main__":
    sys.exit(run_cli())
