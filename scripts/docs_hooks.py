"""MkDocs hooks (mkdocs.yml ``hooks:``): the API pages, the changelog page, the API check.

- Every public module (no ``_``-prefixed path component: the walk of
  ``tests/unit/test_public_api.py``) gets a page under ``api/``: ``resilient_payout.storage.sqlite``
  is ``api/storage/sqlite.md``, a package is its folder's ``index.md``. A hand-written file at that
  path wins (prose around the ``::: module`` block); otherwise the page is generated.
- ``CHANGELOG.md`` at the repository root becomes the ``changelog.md`` page.
- A relative link from a docs page to a repository file outside docs/ (``../examples/x.py``)
  becomes a link to that file in the source repository (``repo_url``); a missing one warns.
- After the build, every name in the ``__all__`` of every public module must have an entry in the
  API reference (the ``objects.inv`` mkdocstrings wrote) and a docstring: a missing page, a name
  mkdocstrings could not find or an undocumented name is a warning, which
  ``mkdocs build --strict`` turns into a failure.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
import zlib
from pathlib import Path
from typing import Any

import griffe
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.nav import Navigation, Section
from mkdocs.structure.pages import Page

PKG = "resilient_payout"
ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / PKG

log = logging.getLogger(f"mkdocs.hooks.{PKG}")

# Public names deliberately without a docstring (by where they are defined), each with the reason.
# They are still rendered (signature, fields).
UNDOCUMENTED: dict[str, str] = {
    **{
        f"{PKG}.service.{path}": "a pydantic model: its docstring would become the OpenAPI schema's"
        " description, and the schema documents it"
        for path in ("schemas.Health", "schemas.PartnerWebhook", "admin.AdminRedelivered")
    },
}

_LINK = re.compile(r"(\]\()(?!https?://|mailto:|#|/)([^)\s#]+)(#[^)\s]*)?(\))")


def public_modules() -> list[tuple[str, bool]]:
    """(dotted name, is a package) of every public module, without importing any."""
    found: list[tuple[str, bool]] = [(PKG, True)]

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            if info.name.startswith("_"):
                continue
            name = f"{prefix}.{info.name}"
            found.append((name, info.ispkg))
            if info.ispkg:
                walk(path / info.name, name)

    walk(SRC, PKG)
    return sorted(found)


def page_path(module: str, ispkg: bool) -> str:
    """The API page of a module, relative to docs/."""
    parts = module.split(".")[1:]
    return "/".join(
        ["api", *parts, "index.md"] if ispkg else ["api", *parts[:-1], f"{parts[-1]}.md"]
    )


def page_text(module: str) -> str:
    # The navigation shows the last name (the section gives the rest); the heading the whole.
    title = module.rsplit(".", 1)[-1]
    return (
        f"---\ntitle: {title}\n---\n\n# `{module}`\n\n"
        f"::: {module}\n    options:\n      show_root_heading: false\n"
    )


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    for module, ispkg in public_modules():
        path = page_path(module, ispkg)
        if files.get_file_from_path(path) is None:
            files.append(File.generated(config, path, content=page_text(module)))
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "changelog.md", content=changelog))
    return files


def on_nav(nav: Navigation, config: MkDocsConfig, files: Files, **kwargs: Any) -> Navigation:
    """Section titles from folder names ("Api" is the API reference, "Storage" is ``storage``);
    the changelog at the end."""

    def rename(items: list[Any], in_api: bool) -> None:
        for item in items:
            if isinstance(item, Section):
                api = in_api or item.title == "Api"
                item.title = "API reference" if item.title == "Api" else item.title
                if in_api:
                    item.title = item.title.lower()
                rename(item.children, api)

    rename(nav.items, False)
    # The changelog last, after the API reference (the files sort it near the top).
    last = [i for i in nav.items if isinstance(i, Page) and i.file.src_uri == "changelog.md"]
    nav.items = [i for i in nav.items if i not in last] + last
    return nav


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, **kwargs: Any) -> str:
    source = page.file.abs_src_path
    if source is None:  # a generated page
        return markdown
    docs = Path(config.docs_dir).resolve()
    base = f"{str(config.repo_url).rstrip('/')}/blob/main"

    def absolute(match: re.Match[str]) -> str:
        target = (Path(source).parent / match.group(2)).resolve()
        if target.is_relative_to(docs):
            return match.group(0)  # MkDocs resolves (and validates) it
        if not target.is_relative_to(ROOT) or not target.exists():
            log.warning(
                "%s links to %s, which is not in the repository", page.file.src_uri, match.group(2)
            )
            return match.group(0)
        url = f"{base}/{target.relative_to(ROOT).as_posix()}{match.group(3) or ''}"
        return f"{match.group(1)}{url}{match.group(4)}"

    return _LINK.sub(absolute, markdown)


def read_inventory(path: Path) -> set[str]:
    """The object names in a Sphinx v2 inventory (objects.inv)."""
    data = path.read_bytes()
    lines = data.split(b"\n", 4)
    if len(lines) < 5 or not lines[0].startswith(b"# Sphinx inventory version 2"):
        raise ValueError(f"{path} is not a Sphinx v2 inventory")
    body = zlib.decompress(lines[4]).decode("utf-8")
    return {line.split(" ", 1)[0] for line in body.splitlines() if line.strip()}


def _docstring(package: griffe.Object | griffe.Alias, module: str, name: str) -> str | None:
    """The docstring of ``module.name``: "" for one allowed to lack it, None for none (or not
    found)."""
    try:
        obj = package[f"{module.removeprefix(PKG).lstrip('.')}.{name}".lstrip(".")]
        target = obj.final_target if isinstance(obj, griffe.Alias) else obj
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    if target.docstring is not None and target.docstring.value.strip():
        return target.docstring.value
    return "" if target.path in UNDOCUMENTED else None


def problems(documented: set[str]) -> dict[str, list[str]]:
    """Per public module, what is wrong with the API reference entries of its ``__all__``."""
    extensions = griffe.load_extensions(f"{Path(__file__).parent / 'griffe_extensions.py'}")
    package = griffe.load(PKG, search_paths=[str(SRC.parent)], extensions=extensions)
    found: dict[str, list[str]] = {}
    for module, _ in public_modules():
        try:
            names = list(importlib.import_module(module).__all__)
        except (ImportError, AttributeError) as exc:
            found[module] = [f"not checked ({exc})"]
            continue
        absent = sorted(n for n in names if f"{module}.{n}" not in documented)
        bare = sorted(
            n for n in names if n not in absent and _docstring(package, module, n) is None
        )
        if absent:
            found[module] = [f"no entry for {', '.join(absent)}"]
        if bare:
            found.setdefault(module, []).append(f"no docstring for {', '.join(bare)}")
    return found


def on_post_build(config: MkDocsConfig, **kwargs: Any) -> None:
    inventory = Path(config.site_dir) / "objects.inv"
    if not inventory.exists():
        log.warning("no objects.inv: the API reference was not rendered")
        return
    for module, found in problems(read_inventory(inventory)).items():
        log.warning("API reference of %s: %s", module, "; ".join(found))
