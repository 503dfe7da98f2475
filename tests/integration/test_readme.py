"""The README's quickstart runs as written, against the mock partner on a local port."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

README = Path(__file__).resolve().parents[2] / "README.md"

MOCK = """
import anyio
from resilient_payout.testing.mock_partner import MockPartnerConfig, serve_mock_partner
cfg = MockPartnerConfig(seed=7, time_scale=0.01, p_timeout=0.0, p_webhook=0.0)
anyio.run(serve_mock_partner, cfg, "127.0.0.1", {port})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quickstart() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python block"
    return str(blocks[0])


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    code = _quickstart()
    assert len(code.strip().splitlines()) <= 25
    port = _free_port()
    mock = subprocess.Popen(
        [sys.executable, "-c", MOCK.format(port=port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/_mock/stats", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "mock partner did not start"
                time.sleep(0.05)
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env={"PARTNER_URL": f"http://127.0.0.1:{port}", "PATH": ""},
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
        ).stdout.splitlines()
        truth = httpx.get(f"http://127.0.0.1:{port}/_mock/truth", timeout=5).json()
    finally:
        mock.terminate()
        mock.wait(10)
    assert out[0] == "received False"
    expected = truth["transactions"]["order-1001"]["status"]
    assert out[1] == f"{expected} partner_answer"
    assert (tmp_path / "payouts.db").exists()
