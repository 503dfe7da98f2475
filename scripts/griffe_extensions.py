"""Griffe extensions for the API reference (mkdocs.yml, mkdocstrings ``extensions``).

- :class:`RestructuredText`: the docstrings were written with a little reStructuredText, which
  mkdocstrings (Markdown) would show raw: Sphinx roles (:class:`~.x.Y`) become inline code
  (``~`` keeps the last component, as in Sphinx), simple tables (``===  ===`` borders) become
  Markdown tables, and a literal block's ``text::`` becomes ``text:`` (the indented block after
  it is a Markdown code block already).
- :class:`TupleConstants`: ``A, B = 0, 1`` at module level defines two constants that griffe
  does not see; each becomes an attribute, with the docstring that follows the line.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|exc|data|mod|obj|const|ref|term):`([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    target = match.group(1).strip()
    if "<" in target and target.endswith(">"):  # :ref:`title <target>`
        return f"`{target.split('<', 1)[0].strip()}`"
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return f"`{target.lstrip('.')}`"


def strip_roles(text: str) -> str:
    """The text with every Sphinx role replaced by inline code."""
    return _ROLE.sub(_plain, text)


_BORDER = re.compile(r"^( *)=+(?: +=+)+ *$")


def simple_tables(text: str) -> str:
    """reStructuredText simple tables (border, header, border, rows, border) as Markdown."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _BORDER.match(lines[i])
        borders = [i]
        if m is not None:
            borders += [j for j in range(i + 1, len(lines)) if lines[j] == lines[i]][:2]
        if m is None or len(borders) < 3:
            out.append(lines[i])
            i += 1
            continue
        starts = [s.start() for s in re.finditer(r"=+", lines[i])]

        def cells(line: str, starts: list[int] = starts) -> list[str]:
            ends = [*starts[1:], len(line)]
            return [
                line[a:b].strip().replace("|", "\\|") for a, b in zip(starts, ends, strict=True)
            ]

        pad = m.group(1)
        header = [cells(row) for row in lines[borders[0] + 1 : borders[1]] if row.strip()][:1]
        body: list[list[str]] = []
        for row in lines[borders[1] + 1 : borders[2]]:
            if not row.strip():
                continue
            values = cells(row)
            if values[0] or not body:
                body.append(values)
            else:  # a blank first column continues the row above
                body[-1] = [f"{a} {b}".strip() for a, b in zip(body[-1], values, strict=True)]
        out.append("")
        out += [f"{pad}| {' | '.join(row)} |" for row in header]
        out.append(pad + "|" + " --- |" * len(starts))
        out += [f"{pad}| {' | '.join(row)} |" for row in body]
        out.append("")
        i = borders[2] + 1
    return "\n".join(out)


_LITERAL = re.compile(r"(\S)::$", re.M)


def to_markdown(text: str) -> str:
    """The docstring's reStructuredText bits in Markdown."""
    return _LITERAL.sub(r"\1:", strip_roles(simple_tables(text)))  # tables first: columns


class RestructuredText(griffe.Extension):
    """Rewrite the docstrings once the object tree is complete."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)


class TupleConstants(griffe.Extension):
    """Module-level ``A, B = 1, 2`` as one attribute per name."""

    def on_module_members(
        self, *, node: ast.AST | griffe.ObjectNode, mod: griffe.Module, **kwargs: Any
    ) -> None:
        body = getattr(node, "body", None)
        if not isinstance(node, ast.Module) or body is None:
            return
        for stmt, after in zip(body, [*body[1:], None], strict=True):
            if not (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(target := stmt.targets[0], ast.Tuple)
                and isinstance(stmt.value, ast.Tuple)
                and len(target.elts) == len(stmt.value.elts)
                and all(isinstance(e, ast.Name) for e in target.elts)
            ):
                continue
            doc = None
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                doc = griffe.Docstring(after.value.value, lineno=after.lineno, parent=mod)
            for name, value in zip(target.elts, stmt.value.elts, strict=True):
                assert isinstance(name, ast.Name)
                if name.id in mod.members:
                    continue
                attr = griffe.Attribute(
                    name.id,
                    value=ast.unparse(value),
                    lineno=stmt.lineno,
                    endlineno=stmt.end_lineno,
                    docstring=doc,
                )
                attr.labels.add("module-attribute")
                mod.set_member(name.id, attr)
