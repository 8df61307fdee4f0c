"""Tools as the model sees them: Python stubs, a short preamble, and a ranked search.

Everything here is deterministic (tools sorted by name, types written the same way every
time), so a prompt built from it is stable across runs and can be cached.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import inspect
import re
import typing
import uuid
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

from codemode.tools.spec import EMPTY, ToolSpec, spec_for

__all__ = ["PREAMBLE", "describe_tools", "packages_line", "render_stub", "search_tools"]

PREAMBLE = """\
# Your program calls the application's tools through `tools`; their stubs follow.
# - Call a tool like a function, with keyword arguments: `x = tools.name(arg=...)`.
# - In async code: `x = await tools.name.run_async(arg=...)`; top-level `await` works, and
#   `a, b = await asyncio.gather(tools.f.run_async(...), tools.g.run_async(...))` runs calls
#   in parallel.
# - Arguments and results are JSON: objects (the TypedDicts below) arrive as dicts.
# - A tool's error is raised in your program as an exception; catch it or let it end the run.
# - `tools.search("words")` finds tools by topic; `tools.describe("name")` prints one stub.
# - Set `result` to the JSON-serialisable value you want back; print() output is returned too.
"""

_STRINGS = (datetime.datetime, datetime.date, datetime.time, uuid.UUID, decimal.Decimal, PurePath)
_NONE_TYPE = type(None)
_UNION_TYPE = type(int | None)
_MAX_DEFAULT_REPR = 40


def packages_line(packages: Iterable[str]) -> str:
    """The one line that tells the model what the sandbox can import (names sorted, once each)."""
    names = sorted({str(name) for name in packages}, key=str.lower)
    if not names:
        return "# The sandbox can import the standard library only."
    return f"# The sandbox can import the standard library and these packages: {', '.join(names)}."


def describe_tools(
    tools: Mapping[str, Any],
    names: Iterable[str] | None = None,
    *,
    preamble: bool = True,
    packages: Iterable[str] | None = None,
) -> str:
    """Stubs for ``tools`` (name → tool), or only ``names``, sorted, after the preamble.

    Object types the tools take or return (pydantic models, TypedDicts, dataclasses) are
    written once, as TypedDicts, before the functions. ``packages`` (names) adds the line of
    :func:`packages_line` after the preamble.
    """
    selected = sorted(tools if names is None else names)
    models: dict[str, Any] = {}
    functions = [
        render_stub(name, tools[name], models=models) for name in selected if name in tools
    ]
    parts = [PREAMBLE] if preamble else []
    if packages is not None:
        parts.append(packages_line(packages))
    seen: set[str] = set()
    rendered_models: list[str] = []
    # Models may reference further models; render until none is left unrendered.
    while len(seen) < len(models):
        for key in sorted(set(models) - seen):
            seen.add(key)
            rendered_models.append(_render_model(key, models[key], models))
    parts += sorted(rendered_models)
    parts += functions
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"


def render_stub(name: str, tool: Any, *, models: dict[str, Any] | None = None) -> str:
    """The stub of one tool: its signature with types, summary, argument and return docs."""
    spec = spec_for(tool)
    models = {} if models is None else models
    params = []
    keyword_only = False
    for param in spec.params:
        if param.kind is inspect.Parameter.KEYWORD_ONLY and not keyword_only:
            params.append("*")
            keyword_only = True
        text = f"{param.name}: {format_type(param.annotation, models)}"
        if not param.required:
            text += f" = {_format_default(param.default)}"
        params.append(text)
    if spec.permissive and not spec.params:
        params.append("**kwargs: Any")
    returns = "Any" if spec.returns is EMPTY else format_type(spec.returns, models)
    signature = f"def {name}({', '.join(params)}) -> {returns}:"
    if len(signature) > 100:
        inner = "".join(f"\n    {p}," for p in params)
        signature = f"def {name}({inner}\n) -> {returns}:"
    return signature + "\n" + _render_doc(_summary(tool, spec), spec)


def _summary(tool: Any, spec: ToolSpec) -> str:
    description = getattr(tool, "description", None)
    if isinstance(description, str) and description.strip() and not spec.doc.summary:
        return description.strip().splitlines()[0]
    return spec.doc.summary


def _render_doc(summary: str, spec: ToolSpec) -> str:
    lines = [summary or "(undocumented)"]
    documented = [p for p in spec.params if p.doc]
    if documented or spec.doc.returns:
        lines.append("")
    if documented:
        lines.append("Args:")
        lines += [f"    {p.name}: {p.doc}" for p in documented]
    if spec.doc.returns:
        lines.append(f"Returns: {spec.doc.returns}")
    if len(lines) == 1:
        return f'    """{_escape(lines[0])}"""'
    body = "\n".join(f"    {_escape(line)}" if line else "" for line in lines)
    return f'    """{body.lstrip()}\n    """'


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _format_default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    text = repr(value)
    if len(text) > _MAX_DEFAULT_REPR or text.startswith("<"):
        return "..."
    return text


def format_type(annotation: Any, models: dict[str, Any]) -> str:
    """``annotation`` as the program sees it; object types are named and added to ``models``."""
    if annotation is EMPTY or annotation is Any or annotation is typing.Any:
        return "Any"
    if annotation is None or annotation is _NONE_TYPE:
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return format_type(args[0], models)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is typing.Union or origin is _UNION_TYPE:
        return " | ".join(format_type(a, models) for a in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list[{format_type(args[0], models)}]"
        if origin in (tuple, set, frozenset):
            base = "list"
            if len(set(args)) == 1:
                return f"list[{format_type(args[0], models)}]"
        if not args:
            return base
        return f"{base}[{', '.join(format_type(a, models) for a in args)}]"
    if isinstance(annotation, type):
        if issubclass(annotation, bool | int | float | str | list | dict):
            if issubclass(annotation, enum.Enum):
                return f"Literal[{', '.join(repr(m.value) for m in annotation)}]"
            return annotation.__name__
        if issubclass(annotation, enum.Enum):
            return f"Literal[{', '.join(repr(m.value) for m in annotation)}]"
        if issubclass(annotation, _STRINGS):
            return "str"
        if issubclass(annotation, bytes):
            return "str"
        if issubclass(annotation, tuple | set | frozenset):
            return "list"
        if _is_object_type(annotation):
            models.setdefault(annotation.__name__, annotation)
            return annotation.__name__
        return annotation.__name__
    if isinstance(annotation, typing.TypeVar):
        return "Any"
    return re.sub(r"\btyping\.", "", str(annotation))


def _is_object_type(cls: type) -> bool:
    return (
        (isinstance(cls, type) and issubclass(cls, BaseModel))
        or dataclasses.is_dataclass(cls)
        or typing.is_typeddict(cls)
    )


def _render_model(name: str, cls: Any, models: dict[str, Any]) -> str:
    fields: list[tuple[str, Any, str]] = []
    if issubclass(cls, BaseModel):
        for field_name, info in cls.model_fields.items():
            fields.append((info.alias or field_name, info.annotation, info.description or ""))
    elif dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = [(f.name, hints.get(f.name, Any), "") for f in dataclasses.fields(cls)]
    else:
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = [(key, value, "") for key, value in hints.items()]
    lines = [f"class {name}(TypedDict):"]
    summary = (inspect.getdoc(cls) or "").strip().splitlines()
    if summary and not issubclass(cls, dict) and cls.__doc__ is not None:
        lines.append(f'    """{_escape(summary[0])}"""')
    for field_name, annotation, description in fields:
        line = f"    {field_name}: {format_type(annotation, models)}"
        if description:
            line += f"  # {description}"
        lines.append(line)
    if len(lines) == 1:
        lines.append("    pass")
    return "\n".join(lines)


_WORD = re.compile(r"[a-z0-9]+")


def search_tools(tools: Mapping[str, Any], query: str, limit: int = 10) -> list[dict[str, str]]:
    """Tools ranked by how well ``query``'s words match their name, summary and docs.

    Returns up to ``limit`` ``{"name", "summary"}`` dicts, best first (ties by name); words
    in the name count most, then the summary, then argument names and docs.
    """
    words = set(_WORD.findall(query.lower()))
    scored: list[tuple[float, str, str]] = []
    for name, tool in tools.items():
        spec = spec_for(tool)
        summary = _summary(tool, spec)
        name_words = set(_WORD.findall(name.lower().replace("_", " ")))
        summary_words = set(_WORD.findall(summary.lower()))
        other = " ".join(
            [spec.doc.description, spec.doc.returns]
            + [f"{p.name.replace('_', ' ')} {p.doc}" for p in spec.params]
        )
        other_words = set(_WORD.findall(other.lower()))
        score = 0.0
        for word in words:
            if word in name_words:
                score += 3
            elif any(w.startswith(word) for w in name_words):
                score += 2
            if word in summary_words:
                score += 2
            elif any(w.startswith(word) for w in summary_words):
                score += 1
            if word in other_words:
                score += 1
        if query.strip().lower() == name.lower():
            score += 10
        if score > 0:
            scored.append((-score, name, summary))
    scored.sort()
    return [{"name": name, "summary": summary} for _, name, summary in scored[:limit]]
