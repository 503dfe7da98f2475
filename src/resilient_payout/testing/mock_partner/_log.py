"""The mock partner's one logger, named after the package as before the split, so that
``serve_mock_partner`` and anyone else configure a single name."""

from __future__ import annotations

import logging

log = logging.getLogger("resilient_payout.testing.mock_partner")
