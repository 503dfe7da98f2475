"""The README's quickstart runs as written, against the mock partner on a local port, and leaks
nothing (any ResourceWarning or "Unclosed ..." message fails it: tests/docs/_run.py)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from tests.docs._run import ROOT, mock_partner, run_code

README = ROOT / "README.md"


def _quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python block"
    return str(blocks[0])


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    code = _quickstart()
    assert len(code.strip().splitlines()) <= 25
    with mock_partner() as url:
        out = run_code(code, tmp_path, {"PARTNER_URL": url}).stdout.splitlines()
        truth = httpx.get(f"{url}/_mock/truth", timeout=5).json()
    assert out[0] == "submitting False"
    expected = truth["transactions"]["order-1001"]["status"]
    assert out[1] == f"{expected} partner_answer"
    assert (tmp_path / "payouts.db").exists()
