"""Read a docstring into a summary, a description and per-argument docs.

Understands the two common styles, Google (``Args:`` / ``Returns:`` sections) and Sphinx
(``:param name:`` / ``:returns:``). Anything else is kept as description text.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

_GOOGLE_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Return|Raises|Yields):\s*$")
_GOOGLE_ARG = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_FIELD = re.compile(r"^:(param|parameter|arg|returns?|raises?|type|rtype)\b([^:]*):\s*(.*)$")


@dataclass(frozen=True)
class Docstring:
    """The parts of a docstring a tool description needs."""

    summary: str = ""
    description: str = ""
    params: dict[str, str] = field(default_factory=dict)
    returns: str = ""


def parse_docstring(doc: str | None) -> Docstring:
    """Split ``doc`` into summary (first line), description (the rest), args and returns."""
    if not doc or not doc.strip():
        return Docstring()
    lines = inspect.cleandoc(doc).splitlines()
    body: list[str] = []
    params: dict[str, str] = {}
    returns: list[str] = []
    section: str | None = None
    current: str | None = None  # the argument whose doc is being continued
    arg_indent: int | None = None  # indentation of argument lines in a Google section

    for line in lines:
        stripped = line.strip()
        sphinx = _SPHINX_FIELD.match(stripped)
        if sphinx:
            kind, rest, text = sphinx.group(1), sphinx.group(2).strip(), sphinx.group(3).strip()
            section, current = "sphinx", None
            if kind in ("param", "parameter", "arg") and rest:
                current = rest.split()[-1]
                params[current] = text
            elif kind in ("return", "returns"):
                returns.append(text)
                current = "\0returns"
            continue
        heading = _GOOGLE_SECTION.match(stripped)
        if heading and not line.startswith((" ", "\t")):
            section, current, arg_indent = heading.group(1), None, None
            continue
        if section is None:
            body.append(line)
            continue
        if not stripped:
            current = None
            continue
        if section in ("Args", "Arguments", "Parameters"):
            arg = _GOOGLE_ARG.match(stripped)
            indent = len(line) - len(line.lstrip())
            if arg_indent is None:
                arg_indent = indent
            if arg and indent <= arg_indent:
                current = arg.group(1).lstrip("*")
                params[current] = arg.group(2).strip()
            elif current is not None:
                params[current] = f"{params[current]} {stripped}".strip()
        elif section in ("Returns", "Return", "Yields"):
            returns.append(stripped)
        elif section == "sphinx" and current is not None:
            if current == "\0returns":
                returns.append(stripped)
            else:
                params[current] = f"{params[current]} {stripped}".strip()

    text = "\n".join(body).strip()
    summary, _, rest = text.partition("\n")
    return Docstring(
        summary=summary.strip(),
        description=rest.strip(),
        params=params,
        returns=" ".join(returns).strip(),
    )
