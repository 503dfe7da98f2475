"""A missing optional dependency is one sentence naming the ``pip install`` line that adds it,
raised where the import happens (the module is simulated missing: ``sys.modules[name] = None``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from resilient_payout import ConfigurationError, MissingExtra
from resilient_payout._extras import EXTRA_OF, explain_missing, needs_extra


def test_a_missing_optional_module_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(MissingExtra) as caught, needs_extra(None, "PostgreSQL storage"):
        import asyncpg  # noqa: F401
    assert str(caught.value) == (
        "PostgreSQL storage needs 'asyncpg', which is not installed: "
        "pip install 'resilient-payout[postgres]'"
    )
    # Both a configuration error and an ImportError: existing `except ImportError` still work.
    assert isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value, ImportError)
    assert (caught.value.name, caught.value.extra) == ("asyncpg", "postgres")


def test_the_extra_to_name_may_be_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)
    with pytest.raises(MissingExtra, match=r"pip install 'resilient-payout\[example\]'$"):
        with needs_extra("example", "the demo"):
            from rich.console import Console  # noqa: F401


def test_a_missing_module_that_is_no_optional_dependency_keeps_its_error() -> None:
    with pytest.raises(ModuleNotFoundError) as caught, needs_extra("server", "x"):
        import resilient_payout_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert not isinstance(caught.value, MissingExtra)
    assert explain_missing(ModuleNotFoundError(name="httpx"), "x") is None  # a core dependency


def test_every_extra_named_exists_in_the_package_metadata() -> None:
    from importlib.metadata import metadata

    provided = set(metadata("resilient-payout").get_all("Provides-Extra") or [])
    assert set(EXTRA_OF.values()) | {"example"} <= provided


def _run_without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter where ``module`` cannot be imported."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(
    ("module", "code", "message"),
    [
        ("fastapi", "import resilient_payout.service",
         "resilient_payout.service needs 'fastapi', which is not installed: "
         "pip install 'resilient-payout[server]'"),
        ("prometheus_client", "import resilient_payout.fastapi",
         "resilient_payout.service needs 'prometheus_client', which is not installed: "
         "pip install 'resilient-payout[server]'"),
        ("redis", "import resilient_payout.reconcile.redis",
         "RedisCheckBudget (RP_BUDGET_URL) needs 'redis', which is not installed: "
         "pip install 'resilient-payout[redis]'"),
        ("asyncpg", "from resilient_payout.storage import storage_from_url as s; "
                    "s('postgresql://u:pw@h/db')",
         "PostgreSQL storage (postgresql:// URLs) needs 'asyncpg', which is not installed: "
         "pip install 'resilient-payout[postgres]'"),
        ("redis", "from resilient_payout.storage import RedisStorage",
         "Redis storage (redis:// URLs) needs 'redis', which is not installed: "
         "pip install 'resilient-payout[redis]'"),
    ],
)  # fmt: skip
def test_importing_a_module_without_its_extra_raises_missing_extra(
    module: str, code: str, message: str
) -> None:
    done = _run_without(module, code)
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"resilient_payout._errors.MissingExtra: {message}"


@pytest.mark.parametrize(
    ("module", "argv", "line"),
    [
        ("rich", ["demo", "-n", "1"],
         "resilient-payout: demo needs 'rich', which is not installed: "
         "pip install 'resilient-payout[example]'"),
        ("uvicorn", ["serve", "--storage", "memory://"],
         "resilient-payout: serve needs 'uvicorn', which is not installed: "
         "pip install 'resilient-payout[server]'"),
        ("asyncpg", ["serve", "--storage", "postgresql://u:s3cret@127.0.0.1:5432/x"],
         "needs 'asyncpg', which is not installed: pip install 'resilient-payout[postgres]'"),
    ],
)  # fmt: skip
def test_the_cli_says_it_in_one_line_and_exits_2(module: str, argv: list[str], line: str) -> None:
    # Another interpreter: the driver may already be imported (and cached) in this one.
    done = _run_without(module, f"from resilient_payout.cli import main; sys.exit(main({argv!r}))")
    assert done.returncode == 2, done.stderr
    # One line: "resilient-payout: <who> needs ..." (who: the command, or the module importing it).
    assert done.stderr.startswith("resilient-payout: ")
    assert done.stderr.strip().endswith(line)
    assert len(done.stderr.strip().splitlines()) == 1
    assert "s3cret" not in done.stderr
