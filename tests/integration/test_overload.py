"""Overload shedding of ``POST /transaction`` and the drain's HTTP face, in process on virtual
time (the stack: conftest.py). Requests are held in flight by a storage whose writes wait for
the test, never by sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskGroup
from prometheus_client.parser import text_string_to_metric_families

from resilient_payout import Overloaded, ShuttingDown
from resilient_payout._admission import AdmissionGate, retry_after_header
from resilient_payout._model import Payout
from resilient_payout.service import PROBLEM_TYPE_PREFIX, ServiceSettings
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND
from resilient_payout.testing.mock_partner import MockPartnerConfig
from tests.integration.conftest import ServiceStack, service_stack

pytestmark = pytest.mark.anyio

QUIET = MockPartnerConfig(seed=1, p_timeout=0.0, p_webhook=0.0, p_completed=1.0)


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


class HeldStorage(MemoryStorage):
    """Creating a payout waits while ``held``: its request stays in flight until released;
    ``all_waiting`` is set once ``expected`` creates wait."""

    def __init__(self) -> None:
        super().__init__()
        self.held = False
        self.expected = 0
        self.waiting = 0
        self.all_waiting = anyio.Event()
        self.created = anyio.Event()
        self._release = anyio.Event()

    async def create_if_absent(self, payout: Payout) -> tuple[Payout, bool]:
        if self.held:
            self.waiting += 1
            if self.waiting >= self.expected:
                self.all_waiting.set()
            await self._release.wait()
            self.waiting -= 1
        try:
            return await super().create_if_absent(payout)
        finally:
            self.created.set()

    def release(self) -> None:
        self.held = False
        self._release.set()


@asynccontextmanager
async def running(storage: MemoryStorage, **settings: Any) -> AsyncIterator[ServiceStack]:
    cfg = ServiceSettings(storage_url="memory://", public_url="http://service", **settings)
    async with service_stack(cfg, QUIET, storage=lambda: storage) as svc:
        yield svc


def assert_503(response: httpx.Response, slug: str, path: str = "/transaction") -> None:
    """A problem+json 503 of this type, with an integral ``Retry-After`` of at least 1 s."""
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == PROBLEM_TYPE_PREFIX + slug
    assert body["status"] == 503
    assert body["instance"] == path
    assert body["title"]
    assert body["detail"]
    assert int(response.headers["retry-after"]) >= 1


def samples(text: str) -> dict[str, float]:
    """Prometheus samples by name, a label's value appended: ``name[value]``."""
    return {
        s.name + "".join(f"[{v}]" for v in s.labels.values()): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def hold(
    svc: ServiceStack, storage: HeldStorage, tg: TaskGroup, ids: list[str]
) -> list[httpx.Response]:
    """POST ``ids`` in ``tg``; returns once all of them wait in storage (in flight), with the
    list their answers will be appended to."""
    answers: list[httpx.Response] = []

    async def post(payout_id: str) -> None:
        answers.append(await svc.http.post("/transaction", json={"id": payout_id}))

    storage.held, storage.expected = True, len(ids)
    for payout_id in ids:
        tg.start_soon(post, payout_id)
    await storage.all_waiting.wait()
    return answers


async def test_past_the_bound_a_post_is_shed_and_leaves_no_record() -> None:
    storage = HeldStorage()
    async with running(storage, max_inflight_submits=2) as svc, anyio.create_task_group() as tg:
        held = await hold(svc, storage, tg, ["tx-1", "tx-2"])
        shed = await svc.http.post("/transaction", json={"id": "tx-3"})
        # Refused before the body is read: not even a malformed body gets as far as a 400.
        garbage = await svc.http.post(
            "/transaction", content=b"{not json", headers={"content-type": "application/json"}
        )
        metrics = samples((await svc.http.get("/metrics")).text)
        storage.release()
    assert_503(shed, "overloaded")
    assert_503(garbage, "overloaded")
    assert shed.headers["retry-after"] == "1"
    assert sorted(r.status_code for r in held) == [200, 200]
    assert await storage.get("tx-3") is None
    assert metrics["resilient_payout_submits_in_flight"] == 2
    assert metrics["resilient_payout_submits_shed_total[in_flight]"] == 2
    assert metrics["resilient_payout_submits_shed_total[loop_lag]"] == 0


async def test_at_the_bound_nothing_is_shed_and_a_shed_id_is_taken_later() -> None:
    storage = HeldStorage()
    async with running(storage, max_inflight_submits=3) as svc:
        async with anyio.create_task_group() as tg:
            held = await hold(svc, storage, tg, ["tx-1", "tx-2", "tx-3"])
            shed = await svc.http.post("/transaction", json={"id": "tx-4"})
            storage.release()
        retried = await svc.http.post("/transaction", json={"id": "tx-4"})
        replay = await svc.http.post("/transaction", json={"id": "tx-1"})
        metrics = samples((await svc.http.get("/metrics")).text)
    assert [r.status_code for r in held] == [200, 200, 200]
    assert_503(shed, "overloaded")
    assert retried.status_code == replay.status_code == 200
    assert retried.json()["id"] == "tx-4"
    assert metrics["resilient_payout_submits_in_flight"] == 0
    assert metrics["resilient_payout_submits_shed_total[in_flight]"] == 1


async def test_no_bound_sheds_nothing() -> None:
    storage = HeldStorage()
    async with running(storage, max_inflight_submits=0) as svc:
        async with anyio.create_task_group() as tg:
            held = await hold(svc, storage, tg, [f"tx-{i}" for i in range(20)])
            storage.release()
    assert [r.status_code for r in held] == [200] * 20


async def test_a_post_waiting_for_its_outcome_holds_no_slot() -> None:
    storage = HeldStorage()
    slow = QUIET.replace(answer_delay_min=5, answer_delay_max=5)
    cfg = ServiceSettings(
        storage_url="memory://", public_url="http://service", max_inflight_submits=1
    )
    async with service_stack(cfg, slow, storage=lambda: storage) as svc:
        async with anyio.create_task_group() as tg:
            waited: list[httpx.Response] = []

            async def wait_for_it() -> None:
                waited.append(
                    await svc.http.post(
                        "/transaction", json={"id": "tx-w"}, headers={"Prefer": "wait=10"}
                    )
                )

            tg.start_soon(wait_for_it)
            await storage.created.wait()
            other = await svc.http.post("/transaction", json={"id": "tx-o"})
    assert other.status_code == 200
    assert waited[0].status_code == 200
    assert waited[0].json() == {"id": "tx-w", "status": "completed"}


async def test_a_draining_client_is_not_ready_and_refuses_posts_with_shutting_down() -> None:
    storage = MemoryStorage()
    async with running(storage) as svc:
        ready = await svc.http.get("/readyz")
        svc.client.begin_drain()
        not_ready = await svc.http.get("/readyz")
        refused = await svc.http.post("/transaction", json={"id": "tx-late"})
        alive = await svc.http.get("/healthz")
    assert ready.status_code == 200
    assert_503(not_ready, "not-ready", "/readyz")
    assert "draining" in not_ready.json()["detail"]
    assert_503(refused, "shutting-down")
    assert await storage.get("tx-late") is None
    # Liveness stays 200: an orchestrator must not kill a process that is draining.
    assert alive.status_code == 200


# -- the pieces --------------------------------------------------------------------------------


def test_the_gate_admits_up_to_its_limit_and_counts_what_it_sheds() -> None:
    gate = AdmissionGate(2, retry_after=2.5)
    with gate.admit(), gate.admit():
        assert gate.in_flight == 2
        with pytest.raises(Overloaded) as refused, gate.admit():
            pass
        assert refused.value.retry_after == 2.5
    assert (gate.in_flight, gate.admitted, gate.shed, gate.peak) == (0, 2, 1, 2)
    with pytest.raises(RuntimeError):
        gate.leave()
    unbounded = AdmissionGate(0)
    for _ in range(1000):
        unbounded.enter()
    assert unbounded.shed == 0
    with pytest.raises(ValueError):
        AdmissionGate(-1)


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (2.5, "3"), (float("inf"), "1")]
)
def test_retry_after_is_whole_seconds_of_at_least_one(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


async def test_overloaded_and_shutting_down_raised_by_a_host_route_map_to_their_problems() -> None:
    from fastapi import FastAPI

    from resilient_payout.service.problems import add_problem_handlers

    app = FastAPI()
    add_problem_handlers(app)

    @app.get("/overloaded")
    async def overloaded() -> None:
        raise Overloaded(retry_after=2.5)

    @app.get("/draining")
    async def draining() -> None:
        raise ShuttingDown(retry_after=0.1)

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://h") as http:
        over, drain = await http.get("/overloaded"), await http.get("/draining")
    assert over.status_code == drain.status_code == 503
    assert over.json()["type"] == PROBLEM_TYPE_PREFIX + "overloaded"
    assert over.headers["retry-after"] == "3"
    assert drain.json()["type"] == PROBLEM_TYPE_PREFIX + "shutting-down"
    assert drain.headers["retry-after"] == "1"


def test_the_lag_bound_sheds_while_the_loop_is_behind_on_average_and_not_after() -> None:
    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        clock = [loop.time()]
        loop.time = lambda: clock[0]  # type: ignore[method-assign]
        gate = AdmissionGate(0, max_lag=0.02)  # the average moves a quarter of the way

        def admitted() -> bool:
            try:
                with gate.admit():
                    return True
            except Overloaded:
                return False

        async def probe_runs_late(by: float) -> None:
            clock[0] += 0.005 + by  # the probe was due in 5 ms
            for _ in range(2):  # a pass to move it to the ready queue, one to run it
                await asyncio.sleep(0)

        seen = [admitted()]  # arms the first probe
        await probe_runs_late(0.05)  # one slow callback: average 12.5 ms
        seen.append(admitted())
        await probe_runs_late(0.2)  # behind again: 59 ms
        seen.append(admitted())
        for _ in range(4):  # on time again: 44, 33, 25, 19 ms
            await probe_runs_late(0.0)
            seen.append(admitted())
        await probe_runs_late(0.3)  # far behind: 90 ms
        clock[0] += 1.0  # then a second with nothing to do: the average starts again
        seen.append(admitted())
        return seen

    assert asyncio.run(main()) == [True, True, False, False, False, False, True, True]
