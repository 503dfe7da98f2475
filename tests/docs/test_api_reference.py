"""The strict docs build's API check (scripts/docs_hooks.py) checks what it claims to.

``make test`` runs ``mkdocs build --strict``; these tests keep its check honest: it walks the same
public modules as tests/unit/test_public_api.py, and it does report a name without an entry and
a name without a docstring.
"""

from __future__ import annotations

import importlib.util
import types

import pytest

from tests.unit.test_public_api import _public_modules

from ._run import ROOT


@pytest.fixture(scope="module")
def hooks() -> types.ModuleType:
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_check_walks_the_public_modules_of_test_public_api(hooks: types.ModuleType) -> None:
    assert [name for name, _ in hooks.public_modules()] == _public_modules()


def test_pages_follow_the_module_layout(hooks: types.ModuleType) -> None:
    assert hooks.page_path("resilient_payout", True) == "api/index.md"
    assert hooks.page_path("resilient_payout.storage", True) == "api/storage/index.md"
    assert hooks.page_path("resilient_payout.storage.sqlite", False) == "api/storage/sqlite.md"


def test_a_name_without_an_entry_is_reported(hooks: types.ModuleType) -> None:
    found = hooks.problems(set())
    assert "no entry for" in " ".join(found["resilient_payout.partner"])
    assert "HttpPartner" in " ".join(found["resilient_payout.partner"])


def test_a_name_without_a_docstring_is_reported(
    hooks: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import griffe

    real = griffe.load

    def stripped(*args: object, **kwargs: object) -> object:
        package = real(*args, **kwargs)  # type: ignore[arg-type]
        package["partner"]["HttpPartner"].final_target.docstring = None
        return package

    monkeypatch.setattr(hooks.griffe, "load", stripped)
    everything = {f"{m}.{n}" for m in _public_modules() for n in _all(m)}
    found = hooks.problems(everything)
    assert found["resilient_payout.partner"] == ["no docstring for HttpPartner"]
    assert found["resilient_payout"] == ["no docstring for HttpPartner"]


def _all(module: str) -> list[str]:
    return list(importlib.import_module(module).__all__)
