"""Renders a Helm chart with the small part of Go templates that ``deploy/helm/codemode`` uses.

No Kubernetes Helm binary installs here from Debian or PyPI, so the deploy tests render the
chart with this instead. It knows only: ``{{ pipeline }}`` with ``{{-``/``-}}`` trimming,
``{{/* comments */}}``, ``if``/``else``/``end``; operands ``.Values.a.b``, ``.Release.Name``,
``.Release.Namespace``, ``.Release.Service``, ``.Chart.Name``/``Version``/``AppVersion``,
``"strings"`` and integers; the functions ``quote``, ``toYaml``, ``nindent``, ``indent``,
``add``, ``not`` and ``default``. Anything else raises :class:`TemplateError`, so a template
that leaves the subset fails the tests instead of rendering differently from Helm.

Numbers read from values files become floats, as in Helm (which reads values as JSON), and
print as Go's ``%v`` does: ``268435456`` in a values file prints as ``2.68435456e+08``.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TemplateError", "load_values", "merge_values", "render_chart"]

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_INT = re.compile(r"^-?\d+$")


class TemplateError(Exception):
    """The template uses something outside the subset, or a value it names is missing."""


@dataclass
class _If:
    condition: str
    then: list[Any] = field(default_factory=list)
    otherwise: list[Any] = field(default_factory=list)
    in_else: bool = False


def _parse(text: str) -> list[Any]:
    """Text and actions as a tree: str (text), ("expr", pipeline) and _If nodes."""
    root: list[Any] = []
    stack: list[_If] = []

    def body() -> list[Any]:
        if not stack:
            return root
        node = stack[-1]
        return node.otherwise if node.in_else else node.then

    pos = 0
    pending_trim = False
    for match in _ACTION.finditer(text):
        chunk = text[pos : match.start()]
        if pending_trim:
            chunk = chunk.lstrip()
        if match.group(1):
            chunk = chunk.rstrip()
        if chunk:
            body().append(chunk)
        pending_trim = bool(match.group(3))
        pos = match.end()
        action = match.group(2).strip()
        if action.startswith("/*") and action.endswith("*/"):
            continue
        word = action.split(None, 1)[0] if action else ""
        if word == "if":
            node = _If(action[2:].strip())
            body().append(node)
            stack.append(node)
        elif word == "else":
            if not stack or action != "else":
                raise TemplateError(f"unsupported: {{{{ {action} }}}}")
            stack[-1].in_else = True
        elif word == "end":
            if not stack:
                raise TemplateError("{{ end }} without {{ if }}")
            stack.pop()
        elif word in {"range", "with", "define", "template", "include", "block", "tpl"}:
            raise TemplateError(f"unsupported action: {{{{ {action} }}}}")
        else:
            body().append(("expr", action))
    if stack:
        raise TemplateError("{{ if }} without {{ end }}")
    tail = text[pos:]
    if pending_trim:
        tail = tail.lstrip()
    if tail:
        root.append(tail)
    return root


def _go_string(value: Any) -> str:
    """``value`` as Go's ``fmt.Sprint`` prints it (the types values files can hold)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            digits = str(int(value)).lstrip("-")
            exponent = len(digits) - 1
            if exponent < 6:  # Go's %v switches to %e from an exponent of 6 (shortest form)
                return str(int(value))
            mantissa = digits.rstrip("0")
            text = mantissa[0] + ("." + mantissa[1:] if len(mantissa) > 1 else "")
            return f"{'-' if value < 0 else ''}{text}e+{exponent:02d}"
        return repr(value)
    if isinstance(value, str):
        return value
    raise TemplateError(f"cannot print {type(value).__name__} {value!r} (Helm prints it as Go)")


def _plain(value: Any) -> Any:
    """Whole floats back to ints, as Helm's JSON-based toYaml writes them."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return int(value)
    return value


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, 0.0, "") and not (
        isinstance(value, dict | list) and not value
    )


def _indent(width: Any, text: Any) -> str:
    pad = " " * int(width)
    return pad + str(text).replace("\n", "\n" + pad)


def _to_yaml(value: Any) -> str:
    dumped = yaml.safe_dump(_plain(value), default_flow_style=False, sort_keys=True)
    return str(dumped).removesuffix("\n")


_FUNCTIONS: dict[str, Any] = {
    "quote": lambda *values: " ".join(json.dumps(_go_string(v)) for v in values),
    "toYaml": _to_yaml,
    "nindent": lambda width, text: "\n" + _indent(width, text),
    "indent": _indent,
    "add": lambda *values: sum(int(v) for v in values),
    "not": lambda value: not _truthy(value),
    "default": lambda fallback, value: value if _truthy(value) else fallback,
}


class _Renderer:
    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope

    def operand(self, token: str) -> Any:
        if token.startswith('"'):
            return json.loads(token)
        if _INT.match(token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        if token.startswith("."):
            value: Any = self.scope
            for part in token[1:].split("."):
                if not isinstance(value, dict) or part not in value:
                    raise TemplateError(f"{token}: no such value")
                value = value[part]
            return value
        raise TemplateError(f"unsupported operand {token!r}")

    def command(self, words: list[str], piped: list[Any]) -> Any:
        head, *rest = words
        if head in _FUNCTIONS:
            return _FUNCTIONS[head](*[self.operand(w) for w in rest], *piped)
        if rest or piped:
            raise TemplateError(f"unsupported function {head!r}")
        return self.operand(head)

    def pipeline(self, text: str) -> Any:
        lexer = shlex.shlex(text, posix=False, punctuation_chars="|")
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token == "|":
                commands.append([])
            else:
                commands[-1].append(token)
        value: list[Any] = []
        for words in commands:
            if not words:
                raise TemplateError(f"empty command in {text!r}")
            value = [self.command(words, value)]
        return value[0]

    def render(self, nodes: list[Any]) -> str:
        out: list[str] = []
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif isinstance(node, _If):
                chosen = node.then if _truthy(self.pipeline(node.condition)) else node.otherwise
                out.append(self.render(chosen))
            else:
                out.append(_go_string(self.pipeline(node[1])))
        return "".join(out)


def _as_helm_numbers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_helm_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_helm_numbers(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def load_values(path: Path) -> dict[str, Any]:
    """A values file as Helm reads it (numbers as floats)."""
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: not a mapping")
    return dict(_as_helm_numbers(data))


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``helm -f override.yaml``: maps merge key by key, anything else is replaced, null deletes."""
    merged = dict(base)
    for key, value in _as_helm_numbers(override).items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def render_chart(
    chart: Path,
    *,
    release: str = "codemode",
    namespace: str = "codemode",
    values: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Every file of ``chart``/templates rendered, by file name (``_*`` helpers excluded)."""
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    scope = {
        "Values": values if values is not None else load_values(chart / "values.yaml"),
        "Release": {"Name": release, "Namespace": namespace, "Service": "Helm"},
        "Chart": {
            "Name": meta["name"],
            "Version": meta["version"],
            "AppVersion": meta["appVersion"],
        },
    }
    renderer = _Renderer(scope)
    out = {}
    for template in sorted((chart / "templates").iterdir()):
        if template.name.startswith("_") or not template.is_file():
            continue
        out[template.name] = renderer.render(_parse(template.read_text()))
    return out
