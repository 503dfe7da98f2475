"""scripts/release.py (``make release`` / ``make publish``) in a throw-away git repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "release.py"

CHANGELOG = """\
# Changelog

Intro.

## [Unreleased]

### Added
- A new thing.

### Fixed
- A bug.

## [0.1.0] - 2025-01-02

### Added
- The first thing.
"""

LINKS = """
[Unreleased]: https://git.example.com/p/compare/v0.1.0...HEAD
[0.1.0]: https://git.example.com/p/releases/tag/v0.1.0
"""

ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, env=ENV, capture_output=True, text=True, check=True
    ).stdout


def release(
    repo: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=repo,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    git(tmp_path, "init", "--quiet", "--initial-branch=main")
    (tmp_path / "CHANGELOG.md").write_text(CHANGELOG)
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "--quiet", "-m", "start")
    git(tmp_path, "tag", "v0.1.0")
    return tmp_path


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "HEAD").strip()


def test_cut_moves_unreleased_commits_only_the_changelog_and_tags(repo: Path) -> None:
    (repo / "code.py").write_text("x = 2\n")
    git(repo, "commit", "--quiet", "-am", "work")
    done = release(repo, "cut", "0.2.0", "--date", "2026-03-04")
    assert done.returncode == 0, done.stderr
    assert (repo / "CHANGELOG.md").read_text() == (
        "# Changelog\n\nIntro.\n\n## [Unreleased]\n\n## [0.2.0] - 2026-03-04\n\n"
        "### Added\n- A new thing.\n\n### Fixed\n- A bug.\n\n"
        "## [0.1.0] - 2025-01-02\n\n### Added\n- The first thing.\n"
    )
    assert git(repo, "show", "--name-only", "--format=%s", "HEAD").split() == [
        "Release",
        "0.2.0",
        "CHANGELOG.md",
    ]
    assert git(repo, "tag", "--points-at", "HEAD").split() == ["v0.2.0"]
    assert git(repo, "cat-file", "-t", "v0.2.0").strip() == "tag"  # annotated
    assert git(repo, "status", "--porcelain") == ""


def test_cut_updates_the_compare_links(repo: Path) -> None:
    (repo / "CHANGELOG.md").write_text(CHANGELOG + LINKS)
    git(repo, "commit", "--quiet", "-am", "links")
    assert release(repo, "cut", "0.2.0", "--date", "2026-03-04").returncode == 0
    tail = (repo / "CHANGELOG.md").read_text().splitlines()[-3:]
    assert tail == [
        "[Unreleased]: https://git.example.com/p/compare/v0.2.0...HEAD",
        "[0.2.0]: https://git.example.com/p/compare/v0.1.0...v0.2.0",
        "[0.1.0]: https://git.example.com/p/releases/tag/v0.1.0",
    ]


@pytest.mark.parametrize(
    ("prepare", "version", "reason"),
    [
        ("untracked", "0.2.0", "uncommitted or untracked"),
        ("modified", "0.2.0", "uncommitted or untracked"),
        ("empty", "0.2.0", "[Unreleased] section of CHANGELOG.md is empty"),
        ("none", "0.1.0", "tag v0.1.0 exists already"),
        ("none", "0.0.9", "not above the latest release v0.1.0"),
        ("none", "v0.2.0", "is not X.Y.Z"),
        ("none", "0.2", "is not X.Y.Z"),
        ("none", "0.2.0rc1", "is not X.Y.Z"),
    ],
)
def test_cut_refuses_and_changes_nothing(
    repo: Path, prepare: str, version: str, reason: str
) -> None:
    if prepare == "untracked":
        (repo / "new.txt").write_text("?")
    elif prepare == "modified":
        (repo / "code.py").write_text("x = 3\n")
    elif prepare == "empty":
        text = CHANGELOG.replace("- A new thing.\n", "").replace("- A bug.\n", "")
        (repo / "CHANGELOG.md").write_text(text)
        git(repo, "commit", "--quiet", "-am", "empty")
    before, changelog = head(repo), (repo / "CHANGELOG.md").read_text()
    done = release(repo, "cut", version)
    assert done.returncode == 1
    assert reason in done.stderr
    assert head(repo) == before
    assert (repo / "CHANGELOG.md").read_text() == changelog
    assert git(repo, "tag").split() == ["v0.1.0"]


def test_cut_without_any_previous_tag_links_the_release_itself(tmp_path: Path) -> None:
    git(tmp_path, "init", "--quiet", "--initial-branch=main")
    (tmp_path / "CHANGELOG.md").write_text(
        CHANGELOG + "\n[Unreleased]: https://git.example.com/p/compare/v0.0.0...HEAD\n"
    )
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "--quiet", "-m", "start")
    assert release(tmp_path, "cut", "1.0.0", "--date", "2026-01-01").returncode == 0
    assert (tmp_path / "CHANGELOG.md").read_text().splitlines()[-2:] == [
        "[Unreleased]: https://git.example.com/p/compare/v1.0.0...HEAD",
        "[1.0.0]: https://git.example.com/p/releases/tag/v1.0.0",
    ]


def _dist(tmp_path: Path, version: str) -> Path:
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / f"resilient_payout-{version}.tar.gz").write_bytes(b"")
    (dist / f"resilient_payout-{version}-py3-none-any.whl").write_bytes(b"")
    return dist


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in ENV.items() if not k.startswith("TWINE_")}
    return {**env, **extra}


@pytest.mark.parametrize(
    ("version", "env", "reason"),
    [
        ("1.0.0", {}, "set TWINE_REPOSITORY_URL"),
        (
            "1.0.0",
            {"TWINE_REPOSITORY_URL": "https://u:s3cret@pypi.internal/"},
            "carries credentials",
        ),
        ("1.0.0", {"TWINE_REPOSITORY_URL": "file:///tmp/x"}, "must be an http(s) URL"),
        ("1.0.1.dev3+g1a2b3c4", {"TWINE_REPOSITORY": "internal"}, "not a release version"),
    ],
)
def test_publish_refuses_before_uploading(
    tmp_path: Path, version: str, env: dict[str, str], reason: str
) -> None:
    dist = _dist(tmp_path, version)
    done = release(tmp_path, "publish", "--dist", str(dist), env=_env(**env))
    assert done.returncode == 1
    assert reason in done.stderr
    assert "s3cret" not in done.stdout + done.stderr
    assert "uploading" not in done.stdout


def test_publish_refuses_mixed_versions(tmp_path: Path) -> None:
    dist = _dist(tmp_path, "1.0.0")
    (dist / "resilient_payout-1.0.1-py3-none-any.whl").write_bytes(b"")
    done = release(tmp_path, "publish", "--dist", str(dist), env=_env(TWINE_REPOSITORY="x"))
    assert done.returncode == 1
    assert "several versions" in done.stderr
