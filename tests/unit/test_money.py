"""Money is exact: how a request's values are canonicalized and fingerprinted.

Bodies are parsed here as the service parses them (``parse_float=Decimal``); numbers never go
through a binary float, and the fingerprint is ``"v2:"`` + sha256 of the canonical payload.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from resilient_payout import InvalidRequest, PayoutClient, PayoutRequest
from resilient_payout.storage.memory import MemoryStorage
from resilient_payout.testing import VIRTUAL_TIME_BACKEND, FakePartner


def exact(text: str) -> PayoutRequest:
    """A request from JSON text, numbers parsed exactly (as ``POST /transaction`` does)."""
    return PayoutRequest.parse(json.loads(text, parse_float=Decimal))


def amount(value: Any) -> Any:
    return PayoutRequest(id="tx", amount=value).payload()["amount"]


def legacy_fingerprint(payload: dict[str, Any]) -> str:
    """What 0.1.0 stored: sha256 of the float-parsed payload, no version prefix."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def only_plain_json(value: Any) -> bool:
    if isinstance(value, dict):
        return all(type(k) is str and only_plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(only_plain_json(v) for v in value)
    return value is None or type(value) in (bool, int, str)


# -- the review's examples -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"id": "tx", "amount": NaN}',
        '{"id": "tx", "amount": Infinity}',
        '{"id": "tx", "amount": -Infinity}',
        '{"id": "tx", "amount": 1e400}',
        '{"id": "tx", "amount": -1e400}',
        '{"id": "tx", "amount": 1e-400}',
        '{"id": "tx", "legs": [{"amount": 1}, {"amount": NaN}]}',
    ],
)
def test_non_finite_and_absurd_numbers_are_refused(body: str) -> None:
    data = json.loads(body, parse_float=Decimal, parse_constant=Decimal)
    with pytest.raises(InvalidRequest) as refused:
        PayoutRequest.parse(data)
    message = str(refused.value)
    assert message.startswith(("amount: ", "legs.1.amount: ")), message
    assert "must" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e300, 5e-324])
def test_python_floats_are_refused_the_same_way(value: float) -> None:
    with pytest.raises(ValidationError):
        PayoutRequest(id="tx", amount=value)
    with pytest.raises(InvalidRequest, match="amount"):
        PayoutRequest.parse({"id": "tx", "amount": value})


def test_null_stays_null_unlike_nan_and_differs_from_a_missing_field() -> None:
    null = exact('{"id": "tx", "amount": null}')
    missing = exact('{"id": "tx"}')
    assert null.payload() == {"id": "tx", "amount": None}
    assert null.fingerprint() != missing.fingerprint()
    with pytest.raises(InvalidRequest):
        PayoutRequest.parse({"id": "tx", "amount": float("nan")})  # 0.1.0 stored it as null


def test_integers_beyond_2_53_stay_exact_and_distinct() -> None:
    low = exact('{"id": "tx", "amount": 9007199254740992.0}')
    high = exact('{"id": "tx", "amount": 9007199254740993.0}')
    assert low.payload()["amount"] == 9007199254740992
    assert high.payload()["amount"] == 9007199254740993
    assert type(high.payload()["amount"]) is int
    assert low.fingerprint() != high.fingerprint()
    assert not high.matches(low.fingerprint())


def test_a_float_is_taken_by_its_shortest_repr_and_more_digits_are_another_amount() -> None:
    short = PayoutRequest(id="tx", amount=0.1)
    long = exact('{"id": "tx", "amount": 0.10000000000000000555}')
    assert short.fingerprint() == exact('{"id": "tx", "amount": 0.1}').fingerprint()
    assert long.payload()["amount"] == "0.10000000000000000555"
    assert short.fingerprint() != long.fingerprint()
    assert not long.matches(short.fingerprint())


@pytest.mark.parametrize("spelling", ["100", "100.0", "100.00", "1e2", "1E+2", "10000e-2"])
def test_an_integral_amount_is_one_payload_however_it_is_spelled(spelling: str) -> None:
    request = exact(f'{{"id": "tx", "amount": {spelling}}}')
    assert request.payload() == {"id": "tx", "amount": 100}
    assert request.fingerprint() == PayoutRequest(id="tx", amount=100).fingerprint()
    assert request.fingerprint() == PayoutRequest(id="tx", amount=100.0).fingerprint()


def test_a_decimal_amount_the_same_number_and_its_string_are_one_payload() -> None:
    forms = [
        exact('{"id": "tx", "amount": 100.5}'),
        exact('{"id": "tx", "amount": 100.50}'),
        exact('{"id": "tx", "amount": "100.5"}'),
        PayoutRequest(id="tx", amount=100.5),
        PayoutRequest(id="tx", amount=Decimal("1.005E+2")),
    ]
    assert {f.fingerprint() for f in forms} == {forms[0].fingerprint()}
    assert all(f.payload() == {"id": "tx", "amount": "100.5"} for f in forms)
    assert exact('{"id": "tx", "amount": "100.50"}').payload()["amount"] == "100.50"  # a string


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        (Decimal("100.50"), "100.5"),
        (Decimal("1E-7"), "0.0000001"),
        (1e-7, "0.0000001"),
        (Decimal("-12.340"), "-12.34"),
        (Decimal("1E+2"), 100),
        (Decimal("-0.00"), 0),
        (-0.0, 0),
        (1e22, 10**22),
        (Decimal("9" * 38), int("9" * 38)),
        (Decimal("0." + "0" * 37 + "1"), "0." + "0" * 37 + "1"),
        (True, True),
        ("  1.50 ", "  1.50 "),
    ],
)
def test_canonical_forms(value: Any, canonical: Any) -> None:
    got = amount(value)
    assert got == canonical
    assert type(got) is type(canonical)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (10**38, "below 10\\*\\*38"),
        (Decimal("1E+38"), "below 10\\*\\*38"),
        (Decimal("1E-39"), "at most 38"),
        (Decimal("1." + "1" * 38), "at most 38"),
        ({1: "a"}, "keys must be strings"),
        (b"100", "must be JSON data"),
    ],
)
def test_limits_and_non_json_values(value: Any, why: str) -> None:
    with pytest.raises(InvalidRequest, match=why):
        PayoutRequest.parse({"id": "tx", "amount": value})


def test_nesting_is_limited() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(InvalidRequest, match="nested deeper"):
        PayoutRequest.parse({"id": "tx", "deep": deep})


def test_key_order_is_irrelevant_and_the_fingerprint_is_the_documented_form() -> None:
    one = exact('{"id": "k", "b": {"y": [1.0, null], "x": 2.50}, "a": 1}')
    two = exact('{"a": 1.0, "b": {"x": 2.5, "y": [1, null]}, "id": "k"}')
    canonical = '{"a":1,"b":{"x":"2.5","y":[1,null]},"id":"k"}'
    expected = "v2:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert one.fingerprint() == two.fingerprint() == expected


def test_a_fingerprint_written_by_0_1_0_still_matches_the_same_request() -> None:
    # 0.1.0 parsed numbers with a fraction as floats and stored an unprefixed sha256.
    old = legacy_fingerprint({"id": "tx", "amount": 100.5, "count": 3, "note": "rent"})
    assert exact('{"id": "tx", "amount": 100.5, "count": 3, "note": "rent"}').matches(old)
    assert exact('{"note": "rent", "count": 3, "amount": 100.50, "id": "tx"}').matches(old)
    assert not exact('{"id": "tx", "amount": 100.6, "count": 3, "note": "rent"}').matches(old)
    assert not exact('{"id": "tx", "amount": "100.5", "count": 3, "note": "rent"}').matches(old)
    # A client that sent every amount as a float (100.0) is recognized too.
    floats = legacy_fingerprint({"id": "tx", "amount": 100.0})
    assert exact('{"id": "tx", "amount": 100.0}').matches(floats)
    assert exact('{"id": "tx", "amount": 100}').matches(
        legacy_fingerprint({"id": "tx", "amount": 100})
    )
    # A v2 fingerprint is compared as such, never by the legacy rule.
    new = exact('{"id": "tx", "amount": 100.5}')
    assert new.matches(new.fingerprint())
    assert not new.matches("v2:" + legacy_fingerprint({"id": "tx", "amount": 100.5}))


@pytest.fixture
def anyio_backend() -> Any:
    return VIRTUAL_TIME_BACKEND


@pytest.mark.anyio
async def test_client_submit_of_a_dict_gets_the_same_rules() -> None:
    async with FakePartner() as partner:
        client = PayoutClient(
            storage=MemoryStorage(), partner=partner, webhook_url="http://service/webhook"
        )
        async with client:
            first = await client.submit({"id": "c-1", "amount": 100.0})
            again = await client.submit({"id": "c-1", "amount": 100})
            with pytest.raises(InvalidRequest, match="amount"):
                await client.submit({"id": "c-2", "amount": float("nan")})
    assert first.payout.request == {"id": "c-1", "amount": 100}
    assert again.replayed
    assert await client.storage.get("c-2") is None


# -- properties ----------------------------------------------------------------------------

decimals = st.builds(
    lambda n, e: Decimal(f"{n}E{e}"),
    st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1),
    st.integers(min_value=-38, max_value=37),
).filter(lambda d: d.is_zero() or (d.adjusted() < 38 and -d.as_tuple().exponent <= 38))
floats = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30, max_value=1e30).filter(
    lambda f: f == 0 or abs(f) >= 1e-20
)
keys = st.text(max_size=8)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1)
    | decimals
    | floats
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)
extras = st.dictionaries(keys.filter(lambda k: k != "id"), json_values, max_size=5)


@given(extras)
def test_canonicalization_is_idempotent(fields: dict[str, Any]) -> None:
    once = PayoutRequest(id="h", **fields)
    assert only_plain_json(once.payload())  # no float, no Decimal is left
    twice = PayoutRequest.model_validate(once.payload())
    assert twice.payload() == once.payload()
    assert twice.fingerprint() == once.fingerprint()


@given(extras)
def test_the_fingerprint_survives_a_json_round_trip_of_the_canonical_payload(
    fields: dict[str, Any],
) -> None:
    request = PayoutRequest(id="h", **fields)
    text = json.dumps(request.payload())
    again = exact(text)
    assert again.fingerprint() == request.fingerprint()
    assert again.matches(request.fingerprint())
    shuffled = dict(reversed(list(json.loads(text).items())))
    assert PayoutRequest.model_validate(shuffled).fingerprint() == request.fingerprint()


@given(decimals)
def test_the_exact_decimal_value_is_preserved(value: Decimal) -> None:
    canonical = amount(value)
    assert Decimal(str(canonical)) == value
    assert isinstance(canonical, int) == (value == value.to_integral_value())
    if isinstance(canonical, str):
        assert "E" not in canonical.upper()
        assert not canonical.endswith("0")


@given(floats)
def test_a_float_round_trips_through_its_canonical_form(value: float) -> None:
    canonical = amount(value)
    assert type(canonical) in (int, str)
    assert float(canonical) == value
    assert Decimal(str(canonical)) == Decimal(repr(value))
