"""Summary statistics shared by the simulator, the reconciliation model and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

__all__ = ["percentile"]


@overload
def percentile(values: Sequence[float], q: float, *, default: float = ...) -> float: ...


@overload
def percentile(values: Sequence[float], q: float, *, default: None) -> float | None: ...


def percentile(values: Sequence[float], q: float, *, default: float | None = 0.0) -> float | None:
    """Nearest-rank percentile, ``q`` in 0..1: always a value that was observed.

    ``default`` is the result for no values: 0.0 keeps a benchmark's JSON numeric, None lets a
    report say "no data".
    """
    if not values:
        return default
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
