"""The mock partner's outcome drawing is pure and seeded per (seed, id, POST number): these pins
keep a seed drawing exactly the outcomes it always drew (the simulator's runs and the docs'
examples depend on it)."""

from __future__ import annotations

import pytest

from resilient_payout.testing.mock_partner import MockPartnerConfig
from resilient_payout.testing.mock_partner._plan import draw

DEFAULT = MockPartnerConfig(seed=7)
FAULTS = MockPartnerConfig(
    seed="pin",
    p_timeout=0.2,
    p_500=0.2,
    p_drop=0.2,
    p_garbage=0.2,
    p_pending_answer=0.3,
    p_duplicate_webhook=0.5,
    p_out_of_order_webhook=0.5,
    p_webhook_before_answer=0.3,
)

# (config, id, POST number, (status, answer, answer_at, record_at_once, final_at, land_at, hooks))
PINNED = [
    (
        DEFAULT,
        "p-1",
        1,
        (
            "completed",
            "final",
            4.697472823428174,
            True,
            4.697472823428174,
            None,
            ((18.430965854724022, "completed"),),
        ),
    ),
    (
        DEFAULT,
        "p-1",
        2,
        (
            "completed",
            "final",
            7.567961429539007,
            True,
            7.567961429539007,
            None,
            ((28.082725149330937, "completed"),),
        ),
    ),
    (
        DEFAULT,
        "p-2",
        1,
        (
            "declined",
            "final",
            8.791886175569937,
            True,
            8.791886175569937,
            None,
            ((23.6747846355223, "declined"),),
        ),
    ),
    (DEFAULT, "p-3", 1, ("completed", "timeout", 30.0, False, None, None, ())),
    (FAULTS, "p-1", 1, ("completed", "500", 6.039406944811265, False, None, None, ())),
    (
        FAULTS,
        "p-1",
        2,
        (
            "declined",
            "pending",
            0.2,
            True,
            2.822847576082354,
            None,
            ((23.072060228991454, "declined"), (25.871587170499353, "declined")),
        ),
    ),
    (FAULTS, "p-2", 1, ("declined", "final", 2.493387269991472, True, 2.493387269991472, None, ())),
    (
        FAULTS,
        "p-3",
        1,
        (
            "declined",
            "garbage",
            8.77923356858321,
            True,
            8.77923356858321,
            None,
            ((22.42343595604761, "declined"), (22.897561863144496, "pending")),
        ),
    ),
    (
        FAULTS,
        "p-3",
        2,
        (
            "completed",
            "500",
            4.076353838041871,
            True,
            4.076353838041871,
            None,
            ((15.144531756032722, "completed"), (16.95781050724069, "pending")),
        ),
    ),
    (
        FAULTS,
        "p-4",
        2,
        (
            "completed",
            "garbage",
            7.88577573397093,
            True,
            3.942887866985465,
            None,
            ((3.942887866985465, "completed"), (8.093357936327457, "completed")),
        ),
    ),
    (
        FAULTS,
        "p-5",
        1,
        (
            "declined",
            "garbage",
            1.637873070954793,
            True,
            0.8189365354773965,
            None,
            (
                (0.8189365354773965, "declined"),
                (1.1213298037123438, "declined"),
                (4.341399274487031, "pending"),
            ),
        ),
    ),
    (FAULTS, "p-6", 1, ("declined", "drop", 0.3156686836962675, False, None, None, ())),
    (FAULTS, "p-7", 1, ("completed", "timeout", 30.0, False, None, None, ())),
    (
        FAULTS,
        "p-13",
        2,
        (
            "completed",
            "drop",
            0.4516613961885608,
            True,
            0.4516613961885608,
            None,
            ((21.576598183625293, "completed"),),
        ),
    ),
    (FAULTS, "p-16", 1, ("declined", "timeout", 30.0, False, None, 116.11976756296106, ())),
]


@pytest.mark.parametrize(("config", "payout_id", "number", "expected"), PINNED)
def test_a_seed_draws_the_pinned_plan(
    config: MockPartnerConfig, payout_id: str, number: int, expected: tuple[object, ...]
) -> None:
    plan = draw(config, payout_id, number)
    got = (
        plan.status,
        plan.answer.value,
        plan.answer_at,
        plan.record_at_once,
        plan.final_at,
        plan.land_at,
        plan.webhooks,
    )
    assert got == expected


def test_drawing_is_pure() -> None:
    assert draw(FAULTS, "p-5", 1) == draw(FAULTS, "p-5", 1)
    assert draw(FAULTS, "p-5", 1) != draw(FAULTS, "p-5", 2)


def test_events_put_the_record_before_its_announcement() -> None:
    events = [(at, kind.name, status) for at, kind, status in draw(FAULTS, "p-5", 1).events()]
    assert events == [
        (0.8189365354773965, "FINAL", "declined"),
        (0.8189365354773965, "WEBHOOK", "declined"),
        (1.1213298037123438, "WEBHOOK", "declined"),
        (1.637873070954793, "ANSWER", ""),
        (4.341399274487031, "WEBHOOK", "pending"),
    ]
    events = [(at, kind.name, status) for at, kind, status in draw(FAULTS, "p-16", 1).events()]
    assert events == [(30.0, "ANSWER", ""), (116.11976756296106, "LAND", "declined")]


def test_describe_is_one_log_line() -> None:
    assert draw(FAULTS, "p-5", 1).describe() == (
        "answers 200 garbage at 1.64s; final declined at 0.82s; "
        "webhooks: declined at 0.82s, declined at 1.12s, pending at 4.34s"
    )
    assert draw(FAULTS, "p-16", 1).describe() == (
        "answers 504 at 30.00s; lands declined at 116.12s; webhooks: none"
    )
