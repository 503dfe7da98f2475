"""Stateful property test: the real client, the scripted partner, virtual time, crashes.

Hypothesis interleaves submits (concurrent and late duplicates), partner fates (answer, pending,
504 then late landing or drop, our timeout, reset after sending, not sent, refused, 429),
webhooks (present, missing, duplicated, early, late), the passage of time, unknown webhooks and
crash + restart of the client on the same storage. Time is hostile: a process may stall for any
time between committing ``submitting`` and sending, POSTs spend up to ``connect_timeout`` in
transit, check answers arrive up to 40 s after the partner looked, the partner may answer 404
while its record is ``pending``, and a second instance whose clock is up to
``max_clock_skew`` apart works on the same storage. Invariants hold after every step; at the end
everything must be final, equal to the partner's truth, and notified once.

The same machine runs against two partner kinds: the exercise's (no idempotency keys: an
uncertain POST is never re-sent before its absence is confirmed) and one that honours
idempotency keys and names its own references (an uncertain POST is re-sent at once with the
same key). The invariants are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from resilient_payout import (
    CallbackNotifier,
    IdempotencyConflict,
    IdempotencyKeys,
    LocalCheckBudget,
    LoopClock,
    PartnerStatus,
    Payout,
    PayoutClient,
    PayoutStatus,
    Policy,
    UnknownPayout,
)
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import (
    FakePartner,
    Fate,
    Script,
    SkewedClock,
    StallingStorage,
    new_virtual_time_loop,
)

T = TypeVar("T")
S = PayoutStatus
# Fewer idle wake-ups keep each example cheap; the logic is the same at any poll interval.
POLICY = Policy(poll_interval=5.0)
MAX_STALL = 200.0
MAX_CHECK_DELAY = 40.0
# Worst case from the partner's last event to our final status: an orphaned submit is noticed at
# submit_deadline, its checks run to the window's end, the confirming check follows, a lease held
# by a crashed process must expire, and background work wakes every poll_interval; a stall before
# sending, late check answers and a clock apart add their own.
SLACK = (
    POLICY.submit_deadline
    + POLICY.late_arrival_window
    + POLICY.absence_check_delay
    + 2 * POLICY.check_interval
    + POLICY.lease
    + 3 * POLICY.poll_interval
    + MAX_STALL
    + 3 * MAX_CHECK_DELAY
    + POLICY.max_clock_skew
)
EXAMPLES = int(os.environ.get("RP_STATEFUL_EXAMPLES", "200" if os.environ.get("CI") else "60"))

fates = st.sampled_from(list(Fate))
scripts = st.builds(
    Script,
    fate=fates,
    status=st.sampled_from([PartnerStatus.COMPLETED, PartnerStatus.DECLINED]),
    answer_delay=st.floats(0.2, 60.0),
    webhook=st.booleans(),
    webhook_delay=st.floats(0.0, 30.0),
    duplicate_webhook=st.booleans(),
    land_after=st.floats(30.0, 120.0),
    final_delay=st.floats(1.0, 300.0),
    flaky_404=st.booleans(),
)
stalls = st.sampled_from([0.0, 0.0, 0.0, 3.0, 40.0, MAX_STALL])


class _Host:
    """Runs an async context manager in its own task, so it can be stopped or killed later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cm: Any) -> None:
        self._stop = asyncio.Event()
        self._up = asyncio.Event()
        self.task = loop.create_task(self._run(cm))
        loop.run_until_complete(self._up.wait())

    async def _run(self, cm: Any) -> None:
        async with cm:
            self._up.set()
            await self._stop.wait()

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Leave the context normally: a deploy's SIGTERM (the client drains)."""
        self._stop.set()
        loop.run_until_complete(self.task)

    def kill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel everything the context runs, mid-flight: a crash, with no cleanup writes."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(self.task)


class PayoutLifecycle(RuleBasedStateMachine):
    ids = Bundle("ids")
    keys: IdempotencyKeys | None = None
    """What the partner honours; None is the exercise's partner."""
    max_reached = POLICY.max_submit_attempts
    slack = SLACK

    def __init__(self) -> None:
        super().__init__()
        self.loop = new_virtual_time_loop()
        self.storage = MemoryStorage()
        self.stall_plan: dict[str, list[float]] = {}
        self.budget = LocalCheckBudget(POLICY.check_rate, POLICY.check_burst)
        self.second: _Host | None = None
        self.scripts: dict[str, list[Script]] = {}
        self.partner = FakePartner(
            script=self._script, idempotency=self.keys, partner_refs=self.keys is not None
        )
        self.partner.webhook_sink = self._webhook_sink
        self.pushes: dict[str, list[S]] = defaultdict(list)
        self.seen_final: dict[str, S] = {}
        self.payloads: dict[str, dict[str, Any]] = {}
        self.last_restart = 0.0
        self.counter = 0
        self.run(self.storage.open())
        self.partner_host = _Host(self.loop, self.partner)
        self.client: PayoutClient | None = None
        self.client_host: _Host | None = None
        self._start_client()

    # -- plumbing --------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def _script(self, payout_id: str, n: int) -> Script:
        plan = self.scripts[payout_id]
        return plan[min(n, len(plan)) - 1]

    async def _webhook_sink(self, body: dict[str, Any]) -> object:
        if self.client is None:
            raise ConnectionRefusedError("service down")
        return await self.client.handle_webhook(body)

    async def _push(self, payout_id: str, status: S) -> None:
        self.pushes[payout_id].append(status)

    def _stall(self, payout: Payout) -> float:
        """The drawn stall of this payout's next submitting write (each is used once)."""
        plan = self.stall_plan.get(payout.id)
        return plan.pop(0) if plan else 0.0

    def _new_client(self, **kw: Any) -> PayoutClient:
        return PayoutClient(
            storage=StallingStorage(self.storage, self._stall),  # type: ignore[arg-type]
            partner=self.partner,
            webhook_url="http://service/webhook",
            notifier=CallbackNotifier(self._push),
            policy=POLICY,
            budget=self.budget,  # one budget for both instances, as a shared one would be
            close_storage=False,
            **kw,
        )

    def _start_client(self, name: str | None = "main") -> None:
        # A stable name recovers its own open submits at once; a new one relies on the
        # second instance's watch, or on submit_deadline.
        self.client = self._new_client(instance_id=name)
        self.client_host = _Host(self.loop, self.client)

    def _now(self) -> float:
        return self.loop.time()

    # -- rules -----------------------------------------------------------------------------

    @rule(
        target=ids,
        first=scripts,
        second=scripts,
        copies=st.integers(1, 4),
        amount=st.integers(1, 1000),
        stall=stalls,
    )
    def submit(self, first: Script, second: Script, copies: int, amount: int, stall: float) -> str:
        self.counter += 1
        pid = f"p{self.counter}"
        self.scripts[pid] = [first, second]
        self.stall_plan[pid] = [stall]
        payload = {"id": pid, "amount": amount}
        self.payloads[pid] = payload
        client = self.client
        assert client is not None
        results: list[bool] = []

        async def one() -> None:
            results.append((await client.submit(payload)).replayed)

        async def all_at_once() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(copies):
                    tg.start_soon(one)

        self.run(all_at_once())
        assert sorted(results) == [False] + [True] * (copies - 1)
        return pid

    @rule(pid=ids, same=st.booleans())
    def repeat(self, pid: str, same: bool) -> None:
        assert self.client is not None
        payload = dict(self.payloads[pid])
        if same:
            assert self.run(self.client.submit(payload)).replayed
        else:
            payload["amount"] = -1
            with pytest.raises(IdempotencyConflict):
                self.run(self.client.submit(payload))

    @rule(dt=st.floats(0.1, 200.0))
    def wait(self, dt: float) -> None:
        self.run(asyncio.sleep(dt))

    @rule(
        send_delay=st.floats(0.0, POLICY.connect_timeout),
        check_delay=st.sampled_from([0.0, 5.0, MAX_CHECK_DELAY]),
    )
    def hostile_network(self, send_delay: float, check_delay: float) -> None:
        self.partner.send_delay = send_delay
        self.partner.check_delay = check_delay

    @precondition(lambda self: self.second is None)
    @rule(offset=st.floats(-POLICY.max_clock_skew, POLICY.max_clock_skew))
    def second_instance(self, offset: float) -> None:
        """Another process on the same storage, its clock ``offset`` seconds apart."""
        self.second = _Host(
            self.loop, self._new_client(clock=SkewedClock(offset), instance_id="second")
        )

    @rule(down_for=st.floats(0.0, 90.0), same_name=st.booleans())
    def crash_and_restart(self, down_for: float, same_name: bool) -> None:
        assert self.client_host is not None
        self.client_host.kill(self.loop)
        self.client = None
        self.run(asyncio.sleep(down_for))
        self.last_restart = self._now()
        self._start_client("main" if same_name else None)

    @rule(down_for=st.floats(0.0, 30.0))
    def deploy(self, down_for: float) -> None:
        """SIGTERM: the client drains (answers in flight recorded, the rest handed over)."""
        assert self.client_host is not None
        self.client_host.stop(self.loop)
        self.client = None
        self.run(asyncio.sleep(down_for))
        self.last_restart = self._now()
        self._start_client("main")

    @rule(status=st.sampled_from(list(PartnerStatus)))
    def webhook_for_unknown_id(self, status: PartnerStatus) -> None:
        assert self.client is not None
        with pytest.raises(UnknownPayout):
            self.run(self.client.handle_webhook({"id": "never-sent", "status": status.value}))
        assert self.run(self.storage.get("never-sent")) is None

    @precondition(lambda self: self.client is not None)
    @rule(pid=ids)
    def truthful_late_webhook(self, pid: str) -> None:
        truth = self.partner.truth(pid)
        if truth is not None and self.client is not None:
            self.run(self.client.handle_webhook({"id": pid, "status": truth.value}))

    @rule(pid=ids)
    def contradicting_report_after_final(self, pid: str) -> None:
        """A confused partner reports another outcome for a settled payout: never applied."""
        p = self.run(self.storage.get(pid))
        if self.client is None or p is None or not p.is_final:
            return
        other = "declined" if p.status is S.COMPLETED else "completed"
        after = self.run(self.client.handle_webhook({"id": pid, "status": other}))
        assert after.status is p.status
        assert after.audit[-1].conflict

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def never_paid_twice(self) -> None:
        assert self.partner.double_payments == []
        for pid in self.scripts:
            assert self.partner.reached(pid) <= self.max_reached

    @invariant()
    def final_states_never_change(self) -> None:
        for pid in self.scripts:
            p = self.run(self.storage.get(pid))
            assert p is not None
            if p.is_final:
                assert self.seen_final.setdefault(pid, p.status) is p.status

    @invariant()
    def never_two_outcomes_notified(self) -> None:
        for pid, got in self.pushes.items():
            assert len(set(got)) == 1, (pid, got)
            assert self.seen_final.get(pid, got[0]) is got[0]

    def teardown(self) -> None:
        try:
            if self.client is not None:
                horizon = POLICY.max_submit_attempts * self.slack + 600
                self.run(asyncio.sleep(horizon))
                self._check_end_state()
        finally:
            if self.client_host is not None:
                self.client_host.kill(self.loop)
            if self.second is not None:
                self.second.kill(self.loop)
            self.partner_host.kill(self.loop)
            self.loop.close()

    def _check_end_state(self) -> None:
        for pid in self.scripts:
            p = self.run(self.storage.get(pid))
            assert p is not None
            assert p.is_final, (pid, p.status, self.scripts[pid])
            truth = self.partner.truth(pid)
            expected = S(truth.value) if truth is not None else S.FAILED
            assert p.status is expected, (pid, p.status, truth, self.scripts[pid], p.audit)
            assert set(self.pushes[pid]) == {p.status}
            offset = self._clock_offset()
            final_at = next(a.at for a in p.audit if a.to_status.is_final) - offset
            ref = max(self.partner.settled_at(pid), self.last_restart, p.created_at - offset)
            assert final_at <= ref + self.slack, (pid, final_at, ref, p.audit)

    def _clock_offset(self) -> float:
        async def offset() -> float:
            return LoopClock().now() - self.loop.time()

        return self.run(offset())


PayoutLifecycle.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPayoutLifecycle = PayoutLifecycle.TestCase
TestPayoutLifecycle = pytest.mark.timeout(900)(TestPayoutLifecycle)


class IdempotentPartnerLifecycle(PayoutLifecycle):
    """The same rules and invariants against a partner that honours idempotency keys."""

    keys = IdempotencyKeys(retention=86_400.0)
    # Re-sends of one key that the partner dropped reach it again (each is a fresh request
    # under the same key, never a second transfer: double_payments would say so).
    max_reached = POLICY.max_submit_attempts * (1 + POLICY.max_resends)
    # Each re-send can take the partner's 504 (30 s) or our read timeout plus its backoff.
    slack = SLACK + POLICY.max_resends * (POLICY.read_timeout + POLICY.resend_backoff_max + 60)


IdempotentPartnerLifecycle.TestCase.settings = PayoutLifecycle.TestCase.settings
TestIdempotentPartnerLifecycle = IdempotentPartnerLifecycle.TestCase
TestIdempotentPartnerLifecycle = pytest.mark.timeout(900)(TestIdempotentPartnerLifecycle)
