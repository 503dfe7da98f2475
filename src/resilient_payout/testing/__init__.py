"""Test support shipped with the package: virtual time, the storage contract suite, the mock
partner and the mobile-client simulator."""

from __future__ import annotations

from ._fake_partner import FakePartner, Fate, Script
from ._hostile import SkewedClock, StallingStorage
from ._vtime import VIRTUAL_TIME_BACKEND, new_virtual_time_loop, run_virtual

__all__ = [
    "VIRTUAL_TIME_BACKEND",
    "FakePartner",
    "Fate",
    "Script",
    "SkewedClock",
    "StallingStorage",
    "new_virtual_time_loop",
    "run_virtual",
]
