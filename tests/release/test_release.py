"""The release path end to end, as a consuming service sees it (docs/releasing.md).

Build wheel and sdist from this tree, ``twine check`` them, upload them with twine to a
pypiserver on a free loopback port over a temporary folder, install ``resilient-payout[server]``
into a fresh venv, ``pip check``, import it, run the README quickstart against the mock partner
with that venv's Python, and check what the wheel and the sdist contain.

"Our package from that index only": it is installed first with ``--no-deps`` from the local index
alone (every pip configuration file and ``PIP_*`` variable ignored, so no other index, mirror or
find-links folder can supply it); then ``resilient-payout[server]`` is installed again with this
machine's ordinary pip configuration, which only adds the dependencies (ours is already
satisfied), and the installed files are checked against the built wheel's RECORD.
"""

from __future__ import annotations

import csv
import email
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.docs._run import ROOT, free_port, mock_partner, readme_quickstart, run_code

pytestmark = pytest.mark.slow


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    done = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{cmd[:4]}... exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


def _clean_env() -> dict[str, str]:
    """This environment without pip's or twine's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "TWINE_"))}


@contextmanager
def pypiserver(packages: Path) -> Iterator[str]:
    """pypiserver over ``packages`` on a free loopback port, no authentication: its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pypiserver", "run", "-i", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        [*cmd, "-a", ".", "-P", ".", str(packages)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/simple/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "pypiserver exited"
            assert time.monotonic() < deadline, "pypiserver did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def work() -> Iterator[Path]:
    """A temporary folder removed at the end (pytest's tmp_path keeps the last runs: a venv)."""
    with tempfile.TemporaryDirectory(prefix="rp-release-") as folder:
        yield Path(folder)


def test_release_builds_uploads_installs_and_runs(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = work
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        timings[name] = now - mark
        mark = now

    dist, packages = tmp_path / "dist", tmp_path / "packages"
    packages.mkdir()
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)])
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    version = wheel.name.split("-")[1]
    lap("build")
    run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)])
    lap("twine check")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"resilient_payout-{version}.dist-info"
        meta = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        rows = csv.reader(io.StringIO(zf.read(f"{info}/RECORD").decode()))
        record = {
            f"{path} {digest}" for path, digest, _ in rows if path.startswith("resilient_payout/")
        }
    assert "resilient_payout/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert "resilient-payout = resilient_payout.cli:main" in entry_points
    assert meta["License-Expression"] == "MIT"
    extras = set(meta.get_all("Provides-Extra") or [])
    assert "server" in extras
    assert "dev" not in extras, "development tools are dependency groups, not a published extra"
    urls = {u.split(",")[0] for u in meta.get_all("Project-URL") or []}
    assert {"Homepage", "Source", "Documentation", "Changelog"} <= urls
    description = meta.get_payload()
    assert "](docs/" not in description, "relative links break on an index page"
    assert "](https://" in description
    with tarfile.open(sdist) as tf:
        members = [m.split("/", 1)[1] for m in tf.getnames() if "/" in m]
    assert {"LICENSE", "PKG-INFO", "src/resilient_payout/py.typed", "CHANGELOG.md"} <= set(members)
    assert not [m for m in members if m.startswith("tests/")]
    lap("contents")

    with pypiserver(packages) as index:
        upload_env = {**_clean_env(), "TWINE_USERNAME": "release-test", "TWINE_PASSWORD": "-"}
        twine = [sys.executable, "-m", "twine", "upload", "--non-interactive"]
        run([*twine, "--repository-url", f"{index}/", str(wheel), str(sdist)], env=upload_env)
        listed = httpx.get(f"{index}/simple/resilient-payout/", timeout=5).text
        assert wheel.name in listed
        assert sdist.name in listed
        lap("upload")

        venv = tmp_path / "venv"
        run([sys.executable, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        lap("venv")
        # Ours from the local index alone: no configuration file, no PIP_* variable.
        only_local = {**_clean_env(), "PIP_CONFIG_FILE": os.devnull}
        pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        run(
            [*pip, "--no-deps", "--index-url", f"{index}/simple/", f"resilient-payout=={version}"],
            env=only_local,
        )
        # The dependencies from this machine's ordinary index; ours is already satisfied.
        run([*pip, f"resilient-payout[server]=={version}"])
        lap("install")

    run([py, "-m", "pip", "check"])
    installed = run(
        [
            py,
            "-c",
            "import importlib.metadata as m, resilient_payout, resilient_payout.service; "
            "d = m.distribution('resilient-payout'); "
            "print(resilient_payout.__version__); "
            "print('\\n'.join(f'{f} sha256={f.hash.value}' for f in d.files or () if f.hash))",
        ]
    ).splitlines()
    assert installed[0] == version
    # The same files, byte for byte (hashes), as the wheel built above: the one from our index.
    assert {f for f in installed[1:] if f.startswith("resilient_payout/")} == record, (
        "the installed files are not the built wheel's"
    )
    run([str(venv / "bin" / "resilient-payout"), "--help"])
    lap("check")

    with mock_partner() as url:
        work = tmp_path / "quickstart"
        work.mkdir()
        done = run_code(
            readme_quickstart(), work, {"PARTNER_URL": url}, python=py, leaks_fail=False
        )
    assert done.stdout.strip(), "the quickstart printed nothing"
    lap("quickstart")

    with capsys.disabled():
        total = sum(timings.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        print(f"\nrelease test {version}: {total:.1f} s ({parts})")
