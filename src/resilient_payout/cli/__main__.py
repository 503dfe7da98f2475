"""``python -m resilient_payout.cli``: how ``demo`` and ``soak`` start their children."""

from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
