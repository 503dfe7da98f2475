"""Running documentation code as a reader would: in a fresh process, against the mock partner.

Shared by the docs runner (test_docs_code.py) and the release test, which runs the README
quickstart with the Python of a venv that installed the package from an index.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]

MOCK = """
import anyio
from resilient_payout.testing.mock_partner import MockPartnerConfig, serve_mock_partner
cfg = MockPartnerConfig(seed=7, time_scale=0.01, p_timeout=0.0, p_webhook=0.0)
anyio.run(serve_mock_partner, cfg, "127.0.0.1", {port})
"""

# Leaks a reader would inherit: a ResourceWarning (an error under -W, but one raised in __del__
# is only printed) and aiohttp's/asyncio's "Unclosed client session / connector / transport".
_LEAK = re.compile(r"ResourceWarning|unclosed", re.I)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mock_partner() -> Iterator[str]:
    """A fresh mock partner (fast, no timeouts, no webhooks) on a free port: its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", MOCK.format(port=port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/_mock/stats", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "mock partner exited"
                assert time.monotonic() < deadline, "mock partner did not start"
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def run_code(
    code: str,
    cwd: Path,
    env: dict[str, str],
    python: str = sys.executable,
    *,
    leaks_fail: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ResourceWarnings as errors; fail on a non-zero exit or (``leaks_fail``)
    a leak."""
    done = subprocess.run(
        [python, "-W", "error::ResourceWarning", "-c", code],
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    leak = _LEAK.search(done.stdout + done.stderr) if leaks_fail else None
    assert leak is None, f"resource leak reported:\n{done.stdout}\n{done.stderr}"
    return done


def readme_quickstart() -> str:
    """The README's first python block (the quickstart)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python block"
    return str(blocks[0])
