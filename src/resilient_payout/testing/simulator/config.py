"""What to simulate: :class:`SimulatorConfig`, validated on construction."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import urlsplit

__all__ = ["PushShape", "SimulatorConfig"]

PushShape = Literal["auto", "flat", "nested"]
"""The push body the simulated backend expects: ``flat``, ``nested`` (the two `HttpNotifier`
shapes) or ``auto`` (either)."""

_MIN_POLL_S = 0.05
"""Floor, in clock seconds, under the scaled poll interval: at a tiny time scale an unanswered id
would otherwise be polled hundreds of times a second."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SimulatorConfig:
    """What to simulate. Durations are scenario seconds, each multiplied by ``time_scale``.

    ``request_timeout`` is the exception: it bounds one HTTP exchange in real seconds, because a
    fast answer is the contract whatever the scale.
    """

    api_url: str = "http://127.0.0.1:3200"
    partner_url: str = "http://127.0.0.1:3000"
    n: int = 200
    rate: float = 10.0
    """New payouts per (scenario) second."""
    p_repeat_concurrent: float = 0.2
    p_repeat_late: float = 0.2
    repeat_late_min: float = 0.05
    repeat_late_max: float = 3.0
    push_grace: float = 30.0
    """Without a final outcome this long after the first send, the app asks ``GET ?wait=``."""
    get_wait: float = 20.0
    poll_interval: float = 1.0
    """Least time between two GETs (or POST retries) for one id; never under 50 ms of clock."""
    deadline: float = 600.0
    """An id without a final outcome this long after its first send is ``missing``; grading waits
    at most this long after the last send for the partner's truth to settle."""
    linger: float = 5.0
    """Keep receiving pushes this long after the last final, to catch late contradictions."""
    seed: int | None = None
    time_scale: float = 1.0
    listen_host: str = "127.0.0.1"
    listen_port: int = 3100
    push_shape: PushShape = "auto"
    prefer_wait: float | None = None
    request_timeout: float = 10.0
    post_retries: int = 3
    max_listed: int = 20
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 100_000:
            raise ValueError("n must be between 1 and 100000")
        if self.rate <= 0 or self.time_scale <= 0:
            raise ValueError("rate and time_scale must be positive")
        for name in ("p_repeat_concurrent", "p_repeat_late"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if not 0.0 <= self.repeat_late_min <= self.repeat_late_max:
            raise ValueError("need 0 <= repeat_late_min <= repeat_late_max")
        if min(self.push_grace, self.get_wait, self.linger, self.request_timeout) < 0:
            raise ValueError("durations must not be negative")
        if self.deadline <= 0 or self.poll_interval <= 0:
            raise ValueError("deadline and poll_interval must be positive")
        if self.prefer_wait is not None and self.prefer_wait < 0:
            raise ValueError("prefer_wait must not be negative")
        if self.post_retries < 0 or self.max_listed < 0:
            raise ValueError("post_retries and max_listed must not be negative")
        if self.push_shape not in get_args(PushShape):
            raise ValueError(f"push_shape must be one of {get_args(PushShape)}")
        if not 0 <= self.listen_port <= 65_535:
            raise ValueError("listen_port must be a TCP port")
        for name in ("api_url", "partner_url"):
            url = urlsplit(getattr(self, name))
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"{name} must be an http(s) URL")
            if not self.allow_remote and not _is_loopback(url.hostname):
                raise ValueError(f"{name} must point at this machine (allow_remote is off)")
        if not self.allow_remote and not _is_loopback(self.listen_host):
            raise ValueError("listen_host must be a loopback address (allow_remote is off)")

    def scaled(self, seconds: float) -> float:
        """Scenario seconds to clock seconds."""
        return seconds * self.time_scale

    def poll_seconds(self) -> float:
        """Clock seconds between two tries for one id (GET polls, POST retries)."""
        return max(self.scaled(self.poll_interval), _MIN_POLL_S)
