"""The public API is exactly what __all__ lists, and the exception tree is one tree."""

from __future__ import annotations

import inspect

import resilient_payout
from resilient_payout import PayoutError


def test_all_is_unique_and_importable() -> None:
    names = resilient_payout.__all__
    assert len(set(names)) == len(names)
    for name in names:
        assert hasattr(resilient_payout, name), name


def test_every_public_name_is_in_all() -> None:
    public = {
        n
        for n, v in vars(resilient_payout).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"
    }
    assert public <= set(resilient_payout.__all__)


def test_every_exception_derives_from_payout_error_and_is_documented() -> None:
    from resilient_payout import _errors

    excs = [
        getattr(resilient_payout, n)
        for n in resilient_payout.__all__
        if inspect.isclass(getattr(resilient_payout, n))
        and issubclass(getattr(resilient_payout, n), BaseException)
    ]
    assert len(excs) >= 10
    for exc in excs:
        assert issubclass(exc, PayoutError), exc
        assert exc.__name__ in (_errors.__doc__ or ""), exc


def test_package_ships_py_typed() -> None:
    from importlib.resources import files

    assert files("resilient_payout").joinpath("py.typed").is_file()


def test_urls_are_redacted_the_same_way_everywhere() -> None:
    from resilient_payout._urls import redact_url

    assert redact_url("postgresql://u:s3cr@t@db:5432/x?schema=a") == (
        "postgresql://u:***@db:5432/x?schema=a"
    )
    assert redact_url("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("sqlite:///payouts.db") == "sqlite:///payouts.db"
