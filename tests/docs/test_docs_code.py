"""Code blocks in docs/ that say they run, run: each ```python block right after a marker line.

- ``<!-- run -->``: runs as written, in an empty temporary directory.
- ``<!-- run: mock-partner -->``: the same, with ``PARTNER_URL`` set to a fresh mock partner.

A block fails on a non-zero exit, on a ``ResourceWarning`` (run with ``-W
error::ResourceWarning``, and looked for in its output, since one raised in ``__del__`` is only
printed) and on any "Unclosed ..." message. docs/index.md, "Writing docs", is the authors' guide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._run import ROOT, mock_partner, run_code

DOCS = ROOT / "docs"
MODES = {"": "as-is", "mock-partner": "mock-partner"}
_MARKED = re.compile(
    r"^<!--\s*run(?::\s*(?P<mode>[\w-]+))?\s*-->[ \t]*\n"  # the marker line
    r"(?:[ \t]*\n)*```python[^\n]*\n(?P<code>.*?)^```",  # blank lines, then the block
    re.M | re.S,
)
_ANY_MARKER = re.compile(r"^<!--\s*run\b[^>]*-->", re.M)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    mode: str
    code: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for m in _MARKED.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(Block(page, line, m.group("mode") or "", m.group("code")))
    return found


def test_every_marker_is_followed_by_a_python_block_with_a_known_mode() -> None:
    marked = {(b.page, b.line) for b in blocks()}
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        for m in _ANY_MARKER.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            where = f"{page.relative_to(ROOT)}:{line}"
            assert (page, line) in marked, f"{where}: marker not followed by a ```python block"
    for block in blocks():
        assert block.mode in MODES, f"{block}: unknown run mode {block.mode!r}"


@pytest.mark.parametrize("block", blocks(), ids=str)
def test_block_runs(block: Block, tmp_path: Path) -> None:
    if block.mode == "mock-partner":
        with mock_partner() as url:
            run_code(block.code, tmp_path, {"PARTNER_URL": url})
    else:
        run_code(block.code, tmp_path, {})
