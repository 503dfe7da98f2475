"""The mobile-client simulator graded against a fake service + partner whose behaviour each test
controls, in process (httpx.ASGITransport) and on virtual time."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskGroup
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from resilient_payout.testing import VIRTUAL_TIME_BACKEND
from resilient_payout.testing.simulator import (
    SimulationReport,
    Simulator,
    SimulatorConfig,
    add_arguments,
    config_from_args,
    render_summary,
    write_json,
)

pytestmark = pytest.mark.anyio

API = "http://127.0.0.1:3200"
PARTNER = "http://127.0.0.1:3000"
OUTCOMES = ("completed", "declined", "failed")


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


def cycle_outcome(i: int) -> str:
    return OUTCOMES[i % 3]


class FakeWorld:
    """A service + partner pair. Index ``i`` is the order in which an id's first POST arrived;
    every behaviour is a function of it so tests can single out one payout."""

    def __init__(
        self,
        tg: TaskGroup,
        *,
        outcome: Callable[[int], str] = cycle_outcome,
        reported: Callable[[int], str] | None = None,
        answer_delay: Callable[[int], float] = lambda i: 0.0,
        final_after: Callable[[int], float] = lambda i: 5.0,
        pushes: Callable[[int], list[str]] | None = None,
        push_gap: float = 1.0,
        nested: Callable[[int], bool] = lambda i: False,
        get_404: Callable[[int], bool] = lambda i: False,
        whole_second_waits: bool = False,
        double_payment: Callable[[int], bool] = lambda i: False,
        blocks: int = 0,
        partner_down: bool = False,
        lands_after: Callable[[int], float] = lambda i: 0.0,
    ) -> None:
        self.tg = tg
        self.outcome = outcome
        self.reported = reported or outcome
        self.answer_delay = answer_delay
        self.final_after = final_after
        self.pushes = pushes or (lambda i: [self.reported(i)])
        self.push_gap = push_gap
        self.nested = nested
        self.get_404 = get_404
        self.whole_second_waits = whole_second_waits
        self.double_payment = double_payment
        self.blocks = blocks
        self.partner_down = partner_down
        self.lands_after = lands_after
        self.order: dict[str, int] = {}
        self.first_post_at: dict[str, float] = {}
        self.posts: Counter[str] = Counter()
        self.gets: Counter[str] = Counter()
        self.wait_params: list[str] = []
        self.final: dict[str, str] = {}
        self.settled: dict[str, anyio.Event] = {}
        self.push: Callable[[dict[str, Any]], Awaitable[httpx.Response]] | None = None
        self.service = Starlette(
            routes=[
                Route("/transaction", self._post, methods=["POST"]),
                Route("/transaction/{id}", self._get, methods=["GET"]),
            ]
        )
        self.partner = Starlette(
            routes=[
                Route("/_mock/truth", self._truth, methods=["GET"]),
                Route("/_mock/stats", self._stats, methods=["GET"]),
            ]
        )

    def ids(self) -> list[str]:
        return sorted(self.order, key=self.order.__getitem__)

    async def _post(self, request: Request) -> Response:
        tx_id = (await request.json())["id"]
        self.posts[tx_id] += 1
        if tx_id not in self.order:
            self.order[tx_id] = len(self.order)
            self.first_post_at[tx_id] = anyio.current_time()
            self.settled[tx_id] = anyio.Event()
            self.tg.start_soon(self._settle, tx_id)
        i = self.order[tx_id]
        await anyio.sleep(self.answer_delay(i))
        return JSONResponse({"id": tx_id, "status": self.final.get(tx_id, "pending")}, 201)

    async def _settle(self, tx_id: str) -> None:
        i = self.order[tx_id]
        await anyio.sleep(self.final_after(i))
        self.final[tx_id] = self.reported(i)
        self.settled[tx_id].set()
        for status in self.pushes(i):
            record = {"id": tx_id, "status": status}
            body = {"status": record} if self.nested(i) else record
            assert self.push is not None
            await self.push(body)
            await anyio.sleep(self.push_gap)

    async def _get(self, request: Request) -> Response:
        tx_id = request.path_params["id"]
        self.gets[tx_id] += 1
        wait = request.query_params.get("wait", "0")
        self.wait_params.append(wait)
        if self.whole_second_waits and not wait.isdigit():
            return JSONResponse({"error": "wait must be whole seconds"}, 422)
        if tx_id not in self.order or self.get_404(self.order[tx_id]):
            return JSONResponse({"error": "unknown"}, 404)
        with anyio.move_on_after(float(wait)):
            await self.settled[tx_id].wait()
        return JSONResponse({"id": tx_id, "status": self.final.get(tx_id, "pending")})

    async def _truth(self, request: Request) -> Response:
        if self.partner_down:
            return JSONResponse({"error": "down"}, 500)
        truth = {}
        for tx_id, i in self.order.items():
            # Until it lands, the partner's record is empty and may still change (a 504'd POST).
            landed = anyio.current_time() >= self.first_post_at[tx_id] + self.lands_after(i)
            outcome = self.outcome(i) if landed else "failed"
            truth[tx_id] = {
                "status": None if outcome == "failed" else outcome,
                "posts": 2 if self.double_payment(i) else 1,
                "settled": landed,
                "double_payment": self.double_payment(i),
            }
        return JSONResponse({"transactions": truth})

    async def _stats(self, request: Request) -> Response:
        if self.partner_down:
            return JSONResponse({"error": "down"}, 500)
        doubles = [tx_id for tx_id, i in self.order.items() if self.double_payment(i)]
        return JSONResponse(
            {
                "posts_total": len(self.order) + len(doubles),
                "posts_max_per_id": 2 if doubles else 1,
                "double_payments": doubles,
                "checks_total": 3 * len(self.order),
                "checks_peak_per_second": 2.5,
                "checks_per_second": {},
                "blocks": self.blocks,
                "rate_limited_checks": 0,
                "webhooks_sent": len(self.order),
                "webhooks_failed": 0,
            }
        )


def config(**overrides: Any) -> SimulatorConfig:
    base: dict[str, Any] = {
        "api_url": API,
        "partner_url": PARTNER,
        "n": 12,
        "seed": 7,
        "p_repeat_concurrent": 0.0,
        "p_repeat_late": 0.0,
    }
    return SimulatorConfig(**(base | overrides))


@asynccontextmanager
async def world_and_simulator(cfg: SimulatorConfig, **behaviour: Any) -> Any:
    async with anyio.create_task_group() as tg:
        world = FakeWorld(tg, **behaviour)
        service = httpx.AsyncClient(transport=httpx.ASGITransport(app=world.service))
        partner = httpx.AsyncClient(transport=httpx.ASGITransport(app=world.partner))
        simulator = Simulator(cfg, api_client=service, partner_client=partner)
        receiver = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=simulator.receiver_app),
            base_url="http://127.0.0.1:3100",
        )
        world.push = lambda body: receiver.put("/transaction", json=body)
        async with service, partner, receiver:
            yield world, simulator
        tg.cancel_scope.cancel()


async def simulate(
    cfg: SimulatorConfig | None = None, **behaviour: Any
) -> tuple[FakeWorld, SimulationReport]:
    async with world_and_simulator(cfg or config(), **behaviour) as (world, simulator):
        report = await simulator.run()
    return world, report


async def test_honest_service_is_all_correct() -> None:
    world, report = await simulate()

    assert (report.sent, report.correct) == (12, 12)
    assert (report.wrong, report.missing, report.conflicting, report.unverified) == (0, 0, 0, 0)
    assert report.pushes_received == 12
    assert report.repeat_pushes == 0
    assert report.get_fallbacks == 0
    assert report.finals_by_channel == {"push": 12}
    assert report.partner_posts_max_per_id == 1
    assert report.checks_per_payout == 3.0
    assert report.checks_peak_per_second == 2.5
    assert report.blocks == 0
    assert report.problems() == []
    assert report.ok
    assert report.exit_code() == 0
    assert set(world.posts) == set(world.ids())


async def test_wrong_outcome_for_one_id() -> None:
    world, report = await simulate(reported=lambda i: "declined" if i == 3 else cycle_outcome(i))

    assert (report.correct, report.wrong) == (11, 1)
    assert report.wrong_ids == [world.ids()[3]]
    assert report.non_correct[0]["expected"] == "completed"
    assert report.non_correct[0]["reported"] == ["declined"]
    assert not report.ok
    assert report.exit_code() == 1


async def test_no_push_and_404_is_missing() -> None:
    world, report = await simulate(
        config(deadline=120.0),
        pushes=lambda i: [] if i == 5 else [cycle_outcome(i)],
        get_404=lambda i: i == 5,
    )

    missing_id = world.ids()[5]
    assert (report.correct, report.missing) == (11, 1)
    assert report.missing_ids == [missing_id]
    assert report.get_fallbacks == 1
    # Polled from push_grace (30 s) to the deadline (120 s), one GET per poll_interval (1 s).
    assert world.gets[missing_id] == 90
    assert report.non_correct[0]["get_404s"] == 90
    assert report.exit_code() == 1


async def test_failed_reported_before_a_late_landing_is_wrong() -> None:
    """The partner's record is still empty when the service's final comes; grading waits for
    the landing instead of taking the empty record for ``failed``."""
    world, report = await simulate(
        reported=lambda i: "failed" if i == 0 else cycle_outcome(i),
        lands_after=lambda i: 100.0 if i == 0 else 0.0,
    )

    assert (report.correct, report.wrong) == (11, 1)
    assert report.wrong_ids == [world.ids()[0]]
    assert report.non_correct[0]["expected"] == "completed"
    assert report.non_correct[0]["partner"]["settled"] is True
    # The last final came at 6.1 s (id 11: sent at 1.1 s, pushed 5 s later); the truth is read
    # once per poll_interval (1 s) until the landing at 100 s.
    assert report.settle_wait_s == pytest.approx(94.0, abs=1.0)
    assert report.problems() == ["1 wrong outcome(s)"]


async def test_partner_unsettled_at_the_deadline_is_not_graded() -> None:
    world, report = await simulate(
        config(deadline=60.0),
        reported=lambda i: "failed" if i == 0 else cycle_outcome(i),
        lands_after=lambda i: math.inf if i == 0 else 0.0,
    )

    assert (report.correct, report.wrong, report.unsettled) == (11, 0, 1)
    assert report.unsettled_ids == [world.ids()[0]]
    assert report.non_correct[0]["verdict"] == "unsettled"
    assert report.non_correct[0]["expected"] is None
    # Waited up to the deadline after the last send (1.1 s + 60 s), then lingered 5 s.
    assert report.duration_s == pytest.approx(1.1 + 60.0 + 5.0)
    assert report.problems() == ["1 unsettled outcome(s)"]
    assert report.exit_code() == 1


async def test_honest_service_waits_no_longer_than_needed() -> None:
    _, report = await simulate(final_after=lambda i: 50.0, lands_after=lambda i: 50.0)

    assert report.correct == 12
    assert report.settle_wait_s == 0.0
    assert report.ok


async def test_two_different_pushes_are_conflicting() -> None:
    world, report = await simulate(
        pushes=lambda i: ["completed", "declined"] if i == 2 else [cycle_outcome(i)]
    )

    assert (report.correct, report.conflicting) == (11, 1)
    assert report.conflicting_ids == [world.ids()[2]]
    assert report.non_correct[0]["reported"] == ["completed", "declined"]
    assert report.repeat_pushes == 1
    assert not report.ok


async def test_repeat_of_the_same_push_is_fine() -> None:
    _, report = await simulate(pushes=lambda i: [cycle_outcome(i)] * 3)

    assert report.pushes_received == 36
    assert report.repeat_pushes == 24
    assert report.correct == 12
    assert report.ok


async def test_double_payment_at_the_partner_is_not_ok() -> None:
    world, report = await simulate(double_payment=lambda i: i == 0)

    assert report.correct == 12
    assert report.double_payments == [world.ids()[0]]
    assert report.partner_posts_max_per_id == 2
    assert report.problems() == ["1 double payment(s)"]
    assert report.exit_code() == 1


async def test_partner_blocks_are_not_ok() -> None:
    _, report = await simulate(blocks=1)

    assert report.correct == 12
    assert report.blocks == 1
    assert report.problems() == ["1 partner block(s)"]
    assert not report.ok


async def test_unreachable_partner_leaves_outcomes_unverified() -> None:
    _, report = await simulate(partner_down=True)

    assert (report.correct, report.unverified) == (0, 12)
    assert report.blocks is None
    assert len(report.partner_errors) == 2
    assert not report.ok


async def test_nested_and_flat_push_bodies_are_both_understood() -> None:
    _, report = await simulate(nested=lambda i: i % 2 == 0)

    assert report.push_shapes == {"flat": 6, "nested": 6}
    assert report.finals_by_channel == {"push": 12}
    assert report.correct == 12
    assert report.ok


async def test_expected_push_shape_rejects_the_other_one() -> None:
    _, report = await simulate(config(push_shape="flat"), nested=lambda i: True)

    assert report.pushes_rejected == 12
    assert report.pushes_received == 0
    # The app still learns every outcome, by GET once push_grace has passed.
    assert report.get_fallbacks == 12
    assert report.correct == 12
    assert report.problems() == ["12 rejected push(es)"]


@pytest.mark.parametrize(("p", "per_id"), [(0.0, 1), (1.0, 3)])
async def test_repeats_are_sent(p: float, per_id: int) -> None:
    world, report = await simulate(config(p_repeat_concurrent=p, p_repeat_late=p))

    assert list(world.posts.values()) == [per_id] * 12
    assert report.repeats_sent == (per_id - 1) * 12
    assert report.requests_sent == per_id * 12
    assert report.correct == 12


async def test_seeded_repeats_match_the_posts_the_service_saw() -> None:
    cfg = config(n=40, p_repeat_concurrent=0.5, p_repeat_late=0.5)
    world, report = await simulate(cfg)
    _, again = await simulate(cfg)

    assert 0 < report.repeats_concurrent < 40
    assert 0 < report.repeats_late < 40
    assert sum(world.posts.values()) == 40 + report.repeats_sent
    assert (again.repeats_concurrent, again.repeats_late) == (
        report.repeats_concurrent,
        report.repeats_late,
    )


async def test_get_fallback_when_pushes_are_missing() -> None:
    world, report = await simulate(pushes=lambda i: [])

    assert report.pushes_received == 0
    assert report.get_fallbacks == 12
    assert report.get_requests == 12
    assert report.finals_by_channel == {"get": 12}
    assert report.correct == 12
    assert report.ok
    # The outcomes were ready at 5 s; the app learned them when push_grace (30 s) ran out.
    assert report.final_p50_s == pytest.approx(30.0)
    assert report.final_max_s == pytest.approx(30.0)
    assert set(world.wait_params) == {"20"}


async def test_get_waits_for_a_late_final() -> None:
    _, report = await simulate(pushes=lambda i: [], final_after=lambda i: 42.0)

    assert report.get_requests == 12
    assert report.final_p90_s == pytest.approx(42.0)
    assert report.correct == 12


async def test_latency_and_time_to_final_percentiles() -> None:
    _, report = await simulate(
        config(n=10),
        answer_delay=lambda i: (i + 1) * 0.010,
        final_after=lambda i: float(i + 1),
    )

    assert report.first_answer_p50_ms == pytest.approx(50.0)
    assert report.first_answer_p99_ms == pytest.approx(100.0)
    assert report.final_p50_s == pytest.approx(5.0)
    assert report.final_p90_s == pytest.approx(9.0)
    assert report.final_max_s == pytest.approx(10.0)


async def test_time_scale_shrinks_every_duration() -> None:
    world, report = await simulate(
        config(time_scale=0.1), pushes=lambda i: [], final_after=lambda i: 1.0
    )

    # 12 payouts at 10/s scaled by 0.1 take 0.11 s to send; push_grace 30 s becomes 3 s.
    assert report.final_max_s == pytest.approx(3.0)
    assert set(world.wait_params) == {"2"}
    assert report.correct == 12
    assert report.duration_s == pytest.approx(0.11 + 3.0 + 0.5)


async def test_polling_is_never_faster_than_50ms_of_clock() -> None:
    _, report = await simulate(
        config(n=1, time_scale=0.01, deadline=300.0), pushes=lambda i: [], get_404=lambda i: True
    )

    # push_grace 0.3 s to deadline 3 s, one GET per 50 ms (the scaled 10 ms is below the floor).
    assert report.get_requests == 54
    assert report.missing == 1


async def test_wait_falls_back_to_whole_seconds_when_refused() -> None:
    world, report = await simulate(
        config(n=1, time_scale=0.01),
        pushes=lambda i: [],
        final_after=lambda i: 0.1,
        whole_second_waits=True,
    )

    assert world.wait_params == ["0.2", "1"]
    assert report.finals_by_channel == {"get": 1}
    assert report.correct == 1


async def test_unknown_pushes_are_acknowledged_but_not_graded() -> None:
    async with world_and_simulator(config()) as (world, simulator):
        assert world.push is not None
        stray = await world.push({"id": "from-a-past-run", "status": "completed"})
        report = await simulator.run()

    assert stray.status_code == 204
    assert (report.pushes_received, report.pushes_unknown) == (13, 1)
    assert report.correct == 12
    assert report.ok


@pytest.mark.parametrize(
    "body",
    [{"id": "x", "status": "pending"}, {"id": "x"}, {"status": "completed"}, ["x", "completed"]],
)
async def test_malformed_pushes_are_refused(body: Any) -> None:
    async with world_and_simulator(config()) as (world, simulator):
        assert world.push is not None
        refused = await world.push(body)
        report = await simulator.run()

    assert refused.status_code == 400
    assert report.pushes_rejected == 1
    assert report.problems() == ["1 rejected push(es)"]


async def test_report_outputs(tmp_path: Path) -> None:
    _, report = await simulate(reported=lambda i: "failed" if i == 0 else cycle_outcome(i))
    path = tmp_path / "report.json"
    write_json(report, path)
    data = json.loads(path.read_text())

    assert data["ok"] is False
    assert data["wrong"] == 1
    assert data["problems"] == ["1 wrong outcome(s)"]
    console = Console(record=True, width=120)
    console.print(render_summary(report))
    text = console.export_text()
    assert "NOT OK" in text
    assert "1 wrong outcome(s)" in text


def test_cli_options_build_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(
        [
            *("-n", "50", "--rate", "20", "--listen", "127.0.0.1:3999", "--time-scale", "0.05"),
            *("--push-shape", "nested", "--seed", "3", "--json", "out.json"),
        ]
    )
    cfg = config_from_args(ns)

    assert (cfg.n, cfg.rate, cfg.time_scale, cfg.seed) == (50, 20.0, 0.05, 3)
    assert (cfg.listen_host, cfg.listen_port, cfg.push_shape) == ("127.0.0.1", 3999, "nested")
    assert ns.json_path == Path("out.json")


def test_config_refuses_remote_hosts() -> None:
    with pytest.raises(ValueError, match="api_url must point at this machine"):
        SimulatorConfig(api_url="http://example.com")


def test_allow_remote_option_accepts_other_hosts() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--api", "http://service:3200", "--partner", "http://partner:3000"]
    argv += ["--listen", "0.0.0.0:3100"]

    with pytest.raises(ValueError, match="must point at this machine"):
        config_from_args(parser.parse_args(argv))
    cfg = config_from_args(parser.parse_args([*argv, "--allow-remote"]))

    assert (cfg.api_url, cfg.listen_host, cfg.allow_remote) == (
        "http://service:3200",
        "0.0.0.0",
        True,
    )


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_standalone_receiver_over_real_sockets() -> None:
    """Real time: the simulator serves its own receiver (uvicorn, port 0) and the fake service
    pushes to it over 127.0.0.1."""
    cfg = config(n=5, time_scale=0.01, listen_port=0, linger=0.0)
    async with anyio.create_task_group() as tg:
        world = FakeWorld(tg, final_after=lambda i: 0.05)
        service = httpx.AsyncClient(transport=httpx.ASGITransport(app=world.service))
        partner = httpx.AsyncClient(transport=httpx.ASGITransport(app=world.partner))
        simulator = Simulator(cfg, api_client=service, partner_client=partner, serve_receiver=True)
        async with service, partner, httpx.AsyncClient() as pusher:
            world.push = lambda body: pusher.put(f"{simulator.receiver_url}/transaction", json=body)
            with anyio.fail_after(10):
                report = await simulator.run()
        tg.cancel_scope.cancel()

    assert simulator.receiver_url.startswith("http://127.0.0.1:")
    assert report.pushes_received == 5
    assert report.finals_by_channel == {"push": 5}
    assert report.ok


async def test_a_push_cut_off_by_a_dying_service_is_neither_an_error_nor_counted() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "PUT",
        "path": "/transaction",
        "raw_path": b"/transaction",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 3100),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
    }
    async with world_and_simulator(config()) as (_, simulator):
        await simulator.receiver_app(scope, receive, send)
        report = await simulator.run()

    assert sent[0]["status"] == 499
    # Only the world's own 12 pushes are counted: the cut-off one is neither received nor rejected.
    assert (report.pushes_received, report.pushes_rejected) == (12, 0)
    assert report.ok
