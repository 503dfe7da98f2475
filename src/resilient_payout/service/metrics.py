"""Prometheus metrics of one app: the client's counters and stored payouts, read at scrape time,
and HTTP requests by route template."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Final

import anyio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._client import PayoutClient
from .._errors import StorageError
from .._model import PayoutStatus
from .._ops import OUTBOX_FAILING_AFTER
from ..storage import OpsSnapshot

__all__ = ["Metrics", "RequestMetrics"]

# Named as before the package split: logging configs refer to it.
log = logging.getLogger("resilient_payout.fastapi")

_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip

_STATS_LABELS: Final[Mapping[str, str]] = {
    "answers": "outcome",
    "resolved": "cause",
    "webhooks_rejected": "reason",
}
_STATS_GAUGES: Final = frozenset({"checks_peak_per_second"})
"""Stats that are levels, not counts (anything else in ``ClientStats`` is a counter)."""
_STATS_HELP: Final[Mapping[str, str]] = {
    "submits": "New payouts accepted",
    "replays": "Repeated submits answered with the stored payout",
    "idempotency_conflicts": "Submits refused: same id, different request",
    "posts": "POSTs to the partner started",
    "answers": "Partner answers to POSTs, by outcome",
    "checks_sent": "Status checks sent to the partner",
    "checks_peak_per_second": "Most status checks sent within one second",
    "checks_rate_limited": "Status checks the partner answered with 429",
    "check_pauses": "Pauses of all status checks after a 429",
    "checks_skipped": "Status checks skipped because the payout was settled meanwhile",
    "webhooks": "Well-formed partner webhooks received",
    "webhooks_unknown": "Webhooks for an unknown id",
    "webhooks_rejected": "Webhooks that failed authenticity checks, by reason",
    "resolved": "Payouts that became final, by cause",
    "confirmed_absences": "Attempts confirmed absent at the partner after the window",
    "resubmissions": "Second attempts after confirmed absence",
    "recovered_orphans": "Submits orphaned by a crash, recovered as unknown",
    "takeovers": "Payouts recovered at once from an instance that restarted or went silent",
    "leases_released": "Leases of a restarted or silent instance released instead of waited out",
    "handed_over": "Cut-short POSTs and claims handed over when a drain ended",
    "drains_cut_short": "Drains that reached drain_timeout with work still running",
    "conflicts": "Reports that disagreed with a final status (never applied)",
    "hook_errors": "on_conflict hooks that raised (logged; the client went on)",
    "sends_expired": "Attempts not sent because they went stale after the decision",
    "retry_after_capped": "Partner Retry-After values capped at max_retry_after",
    "notifications_delivered": "Outcomes acknowledged by the app",
    "notification_rounds_failed": "Push rounds that gave up (retried later)",
    "notifications_dead": "Outbox entries dead-lettered by this process after notify_max_rounds",
    "races_lost": "Compare-and-set races lost (re-read and decided again)",
    "work_errors": "Background work that failed (retried later)",
}


class _ClientCollector(Collector):
    """Client counters and payouts by status, read at scrape time."""

    def __init__(self) -> None:
        self.client: PayoutClient | None = None
        self.by_status: Mapping[PayoutStatus, int] | None = None
        self.dead_outbox: int | None = None
        self.ops: OpsSnapshot | None = None

    def describe(self) -> Iterable[Metric]:
        return ()  # registering must not trigger a collect (the client may not exist yet)

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("resilient_payout_up", "1 while the payout client is running")
        up.add_metric([], 1.0 if self.client is not None else 0.0)
        yield up
        if self.client is None:
            return
        for name, value in self.client.stats.to_dict().items():
            help_text = _STATS_HELP.get(name, name.replace("_", " "))
            family: Metric
            if isinstance(value, dict):
                label = _STATS_LABELS.get(name, "key")
                family = CounterMetricFamily(f"resilient_payout_{name}", help_text, labels=[label])
                for key, count in sorted(value.items()):
                    family.add_metric([str(key)], float(count))
            elif isinstance(value, int | float):
                cls = GaugeMetricFamily if name in _STATS_GAUGES else CounterMetricFamily
                family = cls(f"resilient_payout_{name}", help_text)
                family.add_metric([], float(value))
            else:
                continue
            yield family
        if self.by_status is not None:
            payouts = GaugeMetricFamily(
                "resilient_payout_payouts", "Stored payouts by status", labels=["status"]
            )
            for status in PayoutStatus:
                payouts.add_metric([status.value], float(self.by_status.get(status, 0)))
            yield payouts
        if self.dead_outbox is not None:
            dead = GaugeMetricFamily(
                "resilient_payout_outbox_dead",
                "Outbox entries dead-lettered (pushes given up; an operator must re-queue them)",
            )
            dead.add_metric([], float(self.dead_outbox))
            yield dead
        if self.ops is not None:
            yield from _ops_gauges(self.ops)


def _ops_gauges(ops: OpsSnapshot) -> Iterable[Metric]:
    """The alert figures (docs/operations.md). ``conflicted_payouts``, not ``conflicts``: that
    name is the counter of conflicting reports (``resilient_payout_conflicts_total``)."""
    for name, help_text, value in (
        ("oldest_open_seconds", "Age of the oldest non-final payout (0: none open)",
         ops.oldest_open_age or 0.0),
        ("open_past_window", "Non-final payouts whose attempt is past the late-arrival window",
         ops.open_past_window),
        ("conflicted_payouts", "Payouts whose audit trail records a conflicting report",
         ops.conflicts),
        ("outbox_failing", "Pushes not acknowledged, with a failed round, older than "
         "OUTBOX_FAILING_AFTER (600 s)", ops.outbox_failing),
    ):  # fmt: skip
        gauge = GaugeMetricFamily(f"resilient_payout_{name}", help_text)
        gauge.add_metric([], float(value))
        yield gauge


class Metrics:
    """One app's registry (apps in one process never share one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _ClientCollector()
        self.registry.register(self._collector)
        self.requests = Counter(
            "resilient_payout_http_requests",
            "HTTP requests served, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "resilient_payout_http_request_duration_seconds",
            "HTTP request latency (long polls included), by method and route template",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        # Label lookups take a lock and build a tuple each time; the children never change.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, method: str, route: str, status: int, started: float) -> None:
        """Count one answered request and its latency since ``started``
        (``anyio.current_time()``)."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(anyio.current_time() - started)

    @property
    def client(self) -> PayoutClient | None:
        """The running client whose counters are exposed; None: ``resilient_payout_up`` is 0."""
        return self._collector.client

    @client.setter
    def client(self, client: PayoutClient | None) -> None:
        self._collector.client = client

    async def render(self) -> bytes:
        """The text exposition format, with payouts counted in storage now."""
        client = self._collector.client
        by_status: Mapping[PayoutStatus, int] | None = None
        dead: int | None = None
        ops: OpsSnapshot | None = None
        if client is not None:
            try:
                by_status = await client.storage.count_by_status()
                ops = await client.storage.ops_snapshot(
                    client.clock.now(),
                    late_after=client.policy.late_arrival_window,
                    failing_after=OUTBOX_FAILING_AFTER,
                )
                dead = ops.outbox_dead
            except StorageError as exc:
                log.warning("metrics: counting payouts failed: %s", exc)
        # No await between setting and rendering: concurrent scrapes cannot mix their counts.
        self._collector.by_status = by_status
        self._collector.dead_outbox = dead
        self._collector.ops = ops
        return generate_latest(self.registry)


class RequestMetrics:
    """Pure ASGI middleware: request counts and latency by route template (bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = anyio.current_time()
        status = 500

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            # The router stores the matched route in the scope; its template keeps labels few.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(str(scope.get("method", "")), route, status, started)
