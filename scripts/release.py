"""Cut a release and publish it: ``make release VERSION=x.y.z`` and ``make publish``.

``cut X.Y.Z`` moves the CHANGELOG's ``## [Unreleased]`` section under ``## [X.Y.Z] - <today>``
(with a fresh, empty ``[Unreleased]`` above it and the compare links at the bottom updated, if
there are any), commits that one file and makes the annotated tag ``vX.Y.Z``; the version of the
build then comes from that tag (hatch-vcs). It refuses a malformed version, a dirty tree, an
existing tag or a version not above the latest release tag, and an empty Unreleased section,
before changing anything.

``publish`` uploads ``dist/*`` with twine to ``TWINE_REPOSITORY_URL`` or ``TWINE_REPOSITORY`` (a
``.pypirc`` name). twine reads those and ``TWINE_USERNAME`` / ``TWINE_PASSWORD`` (or the keyring)
from the environment itself: no credential goes on a command line, and none is printed. It
refuses when neither is set (never the public index by default), a URL with credentials in it,
and files that are not one release version (a dev or local version: an untagged or dirty build).

docs/releasing.md is the user's guide.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

VERSION = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
UNRELEASED = re.compile(r"^## \[Unreleased\][^\n]*\n", re.M)
NEXT_SECTION = re.compile(r"^## ", re.M)
UNRELEASED_LINK = re.compile(r"^\[Unreleased\]:\s*(\S+?)/compare/(\S+)\.\.\.HEAD\s*$", re.M)
# A dist file's version: name-VERSION.tar.gz or name-VERSION-pyX-abi-plat.whl.
DIST_VERSION = re.compile(r"^resilient_payout-([^-]+?)(?:\.tar\.gz|-.+\.whl)$")


class Refused(Exception):
    """A precondition of the command does not hold; nothing was changed."""


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise Refused(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def release_tags(repo: Path) -> list[str]:
    """The versions of the repository's ``vX.Y.Z`` tags, lowest first."""
    names = git("tag", "--list", "v*", cwd=repo).split()
    return sorted((n[1:] for n in names if VERSION.match(n[1:])), key=_key)


def unreleased_body(text: str) -> tuple[int, int]:
    """Where the Unreleased section's body starts and ends in the changelog text."""
    head = UNRELEASED.search(text)
    if head is None:
        raise Refused("CHANGELOG.md has no '## [Unreleased]' section")
    nxt = NEXT_SECTION.search(text, head.end())
    links = re.search(r"^\[[^\]]+\]:\s", text[head.end() :], re.M)
    end = nxt.start() if nxt else len(text)
    if links is not None:
        end = min(end, head.end() + links.start())
    return head.end(), end


def has_entries(body: str) -> bool:
    """Whether a section body says anything: headings (### Added) and blank lines alone do not."""
    return any(line.strip() and not line.startswith("#") for line in body.splitlines())


def cut_changelog(text: str, version: str, date: str, previous: str | None) -> str:
    """The changelog with the Unreleased entries moved under ``## [version] - date``."""
    start, end = unreleased_body(text)
    body = text[start:end]
    if not has_entries(body):
        raise Refused("the [Unreleased] section of CHANGELOG.md is empty: nothing to release")
    section = f"\n## [{version}] - {date}\n{body.rstrip()}\n\n"
    text = text[:start] + section + text[end:].lstrip("\n")
    link = UNRELEASED_LINK.search(text)
    if link is not None:
        base = link.group(1)
        since = f"v{previous}" if previous else None
        ours = (
            f"[{version}]: {base}/compare/{since}...v{version}"
            if since
            else f"[{version}]: {base}/releases/tag/v{version}"
        )
        text = (
            text[: link.start()]
            + f"[Unreleased]: {base}/compare/v{version}...HEAD\n{ours}"
            + text[link.end() :]
        )
    return text


def cut(version: str, repo: Path, date: str) -> None:
    if not VERSION.match(version):
        raise Refused(f"version {version!r} is not X.Y.Z (e.g. 1.4.0)")
    if git("status", "--porcelain", cwd=repo).strip():
        raise Refused(
            "the working tree has uncommitted or untracked changes: commit or remove them"
        )
    tags = release_tags(repo)
    if version in tags:
        raise Refused(f"tag v{version} exists already")
    previous = tags[-1] if tags else None
    if previous is not None and _key(version) <= _key(previous):
        raise Refused(f"version {version} is not above the latest release v{previous}")
    changelog = repo / "CHANGELOG.md"
    text = cut_changelog(changelog.read_text(encoding="utf-8"), version, date, previous)
    changelog.write_text(text, encoding="utf-8")
    git("commit", "--quiet", "-m", f"Release {version}", "--", "CHANGELOG.md", cwd=repo)
    git("tag", "--annotate", f"v{version}", "-m", f"resilient-payout {version}", cwd=repo)
    print(f"released {version}: CHANGELOG.md committed, tag v{version} made")
    print(f"next: git push origin HEAD v{version} && make publish")


def dist_version(files: list[Path]) -> str:
    """The one release version of the files in dist/."""
    versions = set()
    for f in files:
        m = DIST_VERSION.match(f.name)
        if m is None:
            raise Refused(f"{f.name} is not a resilient-payout wheel or sdist")
        versions.add(m.group(1))
    if len(versions) != 1:
        raise Refused(f"dist/ holds several versions: {sorted(versions)}; run make build")
    (version,) = versions
    if not VERSION.match(version):
        raise Refused(
            f"{version} is not a release version (an untagged or dirty tree): "
            "publish from a clean checkout of a vX.Y.Z tag (make release)"
        )
    return version


def target() -> str:
    """Where twine will upload, for the log (never with credentials)."""
    url = os.environ.get("TWINE_REPOSITORY_URL", "")
    name = os.environ.get("TWINE_REPOSITORY", "")
    if url:
        parts = urlsplit(url)
        if parts.username or parts.password:
            raise Refused("TWINE_REPOSITORY_URL carries credentials: use TWINE_USERNAME/PASSWORD")
        if parts.scheme not in ("https", "http"):
            raise Refused("TWINE_REPOSITORY_URL must be an http(s) URL")
        return url
    if name:
        return f"the .pypirc repository {name!r}"
    raise Refused(
        "set TWINE_REPOSITORY_URL (the internal index's upload URL) or TWINE_REPOSITORY "
        "(a .pypirc name): there is no default, so nothing goes to the public index by mistake"
    )


def publish(dist: Path) -> None:
    files = sorted(p for p in dist.glob("*") if p.suffix in (".whl", ".gz"))
    if not files:
        raise Refused(f"{dist}/ is empty: run make build")
    version = dist_version(files)
    where = target()
    print(f"uploading resilient-payout {version} ({len(files)} files) to {where}")
    twine = [sys.executable, "-m", "twine", "upload", "--non-interactive"]
    done = subprocess.run([*twine, *(str(f) for f in files)], check=False)
    if done.returncode != 0:
        raise Refused(f"twine upload failed (exit {done.returncode})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/release.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_cut = sub.add_parser("cut", help="changelog section, commit and tag for VERSION")
    p_cut.add_argument("version")
    p_cut.add_argument("--repo", type=Path, default=Path.cwd())
    p_cut.add_argument("--date", default=dt.date.today().isoformat(), help="default: today")
    p_pub = sub.add_parser("publish", help="twine upload of dist/*")
    p_pub.add_argument("--dist", type=Path, default=Path("dist"))
    ns = parser.parse_args(argv)
    try:
        if ns.command == "cut":
            cut(ns.version, ns.repo.resolve(), ns.date)
        else:
            publish(ns.dist)
    except Refused as exc:
        print(f"{ns.command}: refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
