"""An MCP tool's JSON Schemas as a :class:`~codemode.tools.spec.ToolSpec`.

The server's ``inputSchema`` is the contract, so a call's arguments are checked against that
schema itself, with ``jsonschema`` (which the MCP SDK needs), whatever keywords it uses.
Python types are only guessed from the schemas to draw the stubs: ``str``, ``list[int]``,
``Literal[...]``, unions, and a class per object type (rendered as a ``TypedDict``). Property
names that are not identifiers get one (``user-id`` becomes ``user_id``); the spec keeps the
mapping back. No MCP import here: the conversion is plain data in, plain data out.
"""

from __future__ import annotations

import functools
import inspect
import json
import keyword
import logging
import operator
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pydantic
from pydantic import Field

from codemode.tools.docstrings import parse_docstring
from codemode.tools.spec import EMPTY, Param, ToolSpec

__all__ = ["ModelNames", "SchemaSpec", "python_name", "spec_from_schemas"]

logger = logging.getLogger("codemode.mcp")

_NOT_IDENTIFIER = re.compile(r"[^0-9A-Za-z_]")
_MAX_MESSAGE = 120  # characters of one argument problem (its message quotes the value)
_MAX_PROBLEMS = 5


def python_name(name: str) -> str:
    """``name`` as a Python identifier: other characters become ``_``; a name that starts
    with a digit, or is empty, gets a leading ``_``; a keyword gets a trailing one."""
    text = _NOT_IDENTIFIER.sub("_", name)
    if not text or text[0].isdigit():
        text = "_" + text
    if keyword.iskeyword(text):
        text += "_"
    return text


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name))


@dataclass(frozen=True)
class SchemaSpec(ToolSpec):
    """A ToolSpec read from JSON Schemas: arguments are checked against ``input`` itself.

    ``wire_names`` maps each parameter's Python name to its property in the schema;
    ``omit_none`` are optional parameters whose schema refuses null, for which the stub's
    ``= None`` means "not sent"; ``extra`` allows arguments the schema does not name (it
    sets ``additionalProperties``); ``unwrap_result`` marks the ``{"result": x}`` output
    wrapper of FastMCP, whose ``x`` is the tool's real return value.
    """

    input: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    output: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    wire_names: Mapping[str, str] = field(default_factory=dict, compare=False)
    omit_none: frozenset[str] = frozenset()
    extra: bool = False
    unwrap_result: bool = False
    validator: Any = field(default=None, compare=False, repr=False)

    def input_schema(self) -> dict[str, Any]:
        """The server's own ``inputSchema``."""
        return dict(self.input)

    def output_schema(self) -> dict[str, Any] | None:
        """The server's own ``outputSchema``, or None when it gives none."""
        return None if self.output is None else dict(self.output)

    def bind(
        self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Check a call against the schema; return its arguments by Python name, as keywords.

        Raises ``TypeError`` naming the tool and each bad argument, as for other tools.
        """
        given = self.match(name, args, kwargs, extra=self.extra)
        for key in self.omit_none:
            if key in given and given[key] is None:
                del given[key]
        if self.validator is not None:
            problems = _problems(self.validator, self.wire_arguments(given), self.wire_names)
            if problems:
                raise TypeError(f"tools.{name}(): " + "; ".join(problems))
        return [], given

    def wire_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """``arguments`` keyed by the schema's property names, as the server expects them."""
        return {self.wire_names.get(key, key): value for key, value in arguments.items()}


def _problems(validator: Any, instance: dict[str, Any], wire_names: Mapping[str, str]) -> list[str]:
    python_names = {wire: py for py, wire in wire_names.items()}
    try:
        errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.path])
    except Exception as exc:  # an unresolvable $ref or the like: leave the check to the server
        logger.debug("argument check skipped, the schema cannot be applied: %s", exc)
        return []
    problems = []
    for error in errors[:_MAX_PROBLEMS]:
        path = [str(part) for part in error.path]
        message = str(error.message)
        if len(message) > _MAX_MESSAGE:
            message = message[: _MAX_MESSAGE - 3] + "..."
        if path:  # jsonschema's message shows the bad value itself
            where = ".".join([python_names.get(path[0], path[0]), *path[1:]])
            problems.append(f"argument {where!r}: {message}")
        else:
            problems.append(f"arguments: {message}")
    if len(errors) > _MAX_PROBLEMS:
        problems.append(f"and {len(errors) - _MAX_PROBLEMS} more")
    return problems


def is_wrapped_output(schema: Mapping[str, Any] | None) -> bool:
    """Whether ``schema`` is FastMCP's wrapper for a non-object return value.

    FastMCP (the SDK's high-level server) returns a ``str``, a list … as ``{"result": x}``
    under a schema titled ``<function>Output`` with that one required property.
    """
    if not isinstance(schema, Mapping):
        return False
    properties = schema.get("properties")
    return (
        isinstance(properties, Mapping)
        and list(properties) == ["result"]
        and schema.get("required") == ["result"]
        and str(schema.get("title", "")).endswith("Output")
    )


def spec_from_schemas(
    tool: str,
    input_schema: Mapping[str, Any] | None,
    output_schema: Mapping[str, Any] | None = None,
    description: str | None = None,
    *,
    title: str | None = None,
    models: ModelNames | None = None,
) -> SchemaSpec:
    """The spec of MCP tool ``tool`` from its schemas and description.

    Parameters are the schema's properties, required ones first, in the schema's order; an
    optional one without a default shows ``= None``. Docs come from each property's
    ``description``, else from an ``Args:`` section of the tool's description. ``models``
    shares class names between the tools of one server. A schema that is not valid JSON
    Schema is logged and not enforced here (the server still checks its arguments).
    """
    inputs: Mapping[str, Any] = input_schema if isinstance(input_schema, Mapping) else {}
    doc = parse_docstring(description)
    if not doc.summary and title:
        doc = parse_docstring(title)
    types = _Types(inputs, models if models is not None else ModelNames())
    properties = inputs.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = {str(k) for k in inputs.get("required") or () if isinstance(k, str)}
    order = [k for k in properties if k in required] + [k for k in properties if k not in required]
    params: list[Param] = []
    wire_names: dict[str, str] = {}
    omit_none: set[str] = set()
    for key in order:
        schema = properties[key]
        name = python_name(str(key))
        while name in wire_names:
            name += "_"
        wire_names[name] = str(key)
        annotation = types.annotation(schema, _camel(tool) + _camel(str(key)))
        own = schema.get("description") if isinstance(schema, Mapping) else None
        text = str(own).strip() if own else doc.params.get(str(key), "")
        if key in required:
            default: Any = EMPTY
        elif isinstance(schema, Mapping) and "default" in schema:
            default = schema["default"]
        else:
            default = None
            if not _accepts_null(schema, inputs):
                annotation = _union([annotation, None])
                omit_none.add(name)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(Param(name, annotation, default, kind, " ".join(text.split())))
    # Arguments the schema does not name are refused (a typo is caught here) unless it says
    # ``additionalProperties``, or names no properties at all.
    default_extra = "properties" not in inputs
    extra = inputs.get("additionalProperties", default_extra) is not False
    wrapped = is_wrapped_output(output_schema)
    returns: Any = EMPTY
    if isinstance(output_schema, Mapping):
        out_types = _Types(output_schema, types.names)
        if wrapped:
            returns = out_types.annotation(output_schema["properties"]["result"], _camel(tool))
        else:
            returns = out_types.annotation(output_schema, _camel(tool) + "Result")
    return SchemaSpec(
        params=tuple(params),
        returns=returns,
        doc=doc,
        is_async=True,
        permissive=extra and not params,
        input=inputs,
        output=output_schema,
        wire_names=wire_names,
        omit_none=frozenset(omit_none),
        extra=extra,
        unwrap_result=wrapped,
        validator=_validator(tool, inputs),
    )


def _validator(tool: str, schema: Mapping[str, Any]) -> Any:
    # Imported here: jsonschema comes with the MCP SDK, which codemode.mcp.tools checks for.
    from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
    from jsonschema.exceptions import SchemaError  # type: ignore[import-untyped]
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]
    from referencing import Registry

    with warnings.catch_warnings():
        # jsonschema warns about an unknown "$schema" and then uses the latest draft: fine.
        warnings.simplefilter("ignore", DeprecationWarning)
        cls = validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        logger.warning("MCP tool %r: its inputSchema is not valid JSON Schema: %s", tool, exc)
        return None
    # An empty registry: $refs resolve within the schema, nothing is fetched.
    return cls(schema, registry=Registry())


def _accepts_null(schema: Any, root: Mapping[str, Any], depth: int = 0) -> bool:
    """Whether ``schema`` lets null through, judged from its type keywords alone."""
    if depth > 20:
        return True
    if schema is True or schema == {}:
        return True
    if not isinstance(schema, Mapping):
        return False
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _accepts_null(_resolve(root, ref), root, depth + 1)
    if "const" in schema:
        return schema["const"] is None
    if "enum" in schema:
        return None in (schema["enum"] or ())
    for combinator in ("anyOf", "oneOf"):
        branches = schema.get(combinator)
        if isinstance(branches, list):
            return any(_accepts_null(b, root, depth + 1) for b in branches)
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind == "null"
    if isinstance(kind, list):
        return "null" in kind
    return not any(k in schema for k in ("properties", "items", "allOf"))


def _resolve(root: Mapping[str, Any], ref: str) -> Any:
    """The schema a local ``$ref`` (``#/$defs/Name``) points to, or None."""
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _union(items: Sequence[Any]) -> Any:
    unique: list[Any] = []
    for item in items:
        if item is Any:
            return Any
        if item not in unique:
            unique.append(item)
    others = [item for item in unique if item is not None]
    if not others:
        return None
    joined = functools.reduce(operator.or_, others)
    return joined | None if None in unique else joined


class ModelNames:
    """Class names for the object types of one server's schemas, each name used once.

    The same name with the same schema gives the same class (tools sharing a ``$defs``
    entry); a different schema under a taken name gets a numbered name.
    """

    def __init__(self) -> None:
        self._classes: dict[str, tuple[str, type[pydantic.BaseModel]]] = {}

    def get(self, name: str, schema: Mapping[str, Any]) -> type[pydantic.BaseModel] | None:
        """The class already made for this name and schema, if any."""
        known = self._classes.get(name)
        return known[1] if known is not None and known[0] == _canonical(schema) else None

    def claim(self, name: str) -> str:
        """A free class name, ``name`` itself when possible."""
        candidate, number = name, 1
        while candidate in self._classes:
            number += 1
            candidate = f"{name}{number}"
        return candidate

    def add(self, name: str, schema: Mapping[str, Any], cls: type[pydantic.BaseModel]) -> None:
        """Record ``cls`` as the class of ``schema`` under ``name``."""
        self._classes[name] = (_canonical(schema), cls)


def _canonical(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, default=str)


_SCALARS: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "null": None,
}


class _Types:
    """Python annotations for the schemas under one root (which holds their ``$defs``)."""

    def __init__(self, root: Mapping[str, Any], names: ModelNames) -> None:
        self.root = root
        self.names = names
        self._refs: dict[str, Any] = {}
        self._resolving: set[str] = set()

    def annotation(self, schema: Any, hint: str) -> Any:
        """The Python type the stubs show for ``schema``; ``hint`` names an object type."""
        if not isinstance(schema, Mapping) or not schema:
            return Any
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return self._ref(ref)
        if "const" in schema:
            return _literal([schema["const"]])
        if isinstance(schema.get("enum"), list):
            return _literal(schema["enum"])
        for combinator in ("anyOf", "oneOf"):
            branches = schema.get(combinator)
            if isinstance(branches, list) and branches:
                return _union([self.annotation(b, hint) for b in branches])
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1:
            return self.annotation(all_of[0], hint)
        kind = schema.get("type")
        if isinstance(kind, list):
            return _union([self._typed(schema, str(k), hint) for k in kind])
        if isinstance(kind, str):
            return self._typed(schema, kind, hint)
        if "properties" in schema:
            return self._typed(schema, "object", hint)
        if "items" in schema:
            return self._typed(schema, "array", hint)
        return Any

    def _typed(self, schema: Mapping[str, Any], kind: str, hint: str) -> Any:
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "array":
            items = schema.get("items")
            if isinstance(items, Mapping):
                return list[self.annotation(items, hint + "Item")]  # type: ignore[misc]
            return list[Any]
        if kind == "object":
            properties = schema.get("properties")
            if isinstance(properties, Mapping) and properties:
                title = str(schema.get("title") or "")
                return self._model(schema, title if _class_like(title) else hint)
            values = schema.get("additionalProperties")
            if isinstance(values, Mapping) and values:
                return dict[str, self.annotation(values, hint + "Value")]  # type: ignore[misc]
            return dict[str, Any]
        return Any

    def _ref(self, ref: str) -> Any:
        if ref in self._refs:
            return self._refs[ref]
        target = _resolve(self.root, ref)
        if target is None or ref in self._resolving:
            return dict[str, Any] if target is not None else Any  # a recursive type: untyped
        self._resolving.add(ref)
        try:
            annotation = self.annotation(target, python_name(_camel(ref.rsplit("/", 1)[-1])))
        finally:
            self._resolving.discard(ref)
        self._refs[ref] = annotation
        return annotation

    def _model(self, schema: Mapping[str, Any], name: str) -> Any:
        known = self.names.get(name, schema)
        if known is not None:
            return known
        name = self.names.claim(name)
        required = set(schema.get("required") or ())
        fields: dict[str, Any] = {}
        for i, (key, sub) in enumerate(schema["properties"].items()):
            annotation = self.annotation(sub, name + _camel(str(key)))
            description = sub.get("description") if isinstance(sub, Mapping) else None
            default = ... if key in required else (sub or {}).get("default")
            # Neutral field names, aliased to the keys: a key may be any string.
            fields[f"p{i}"] = (annotation, Field(default, alias=str(key), description=description))
        description = schema.get("description")
        try:
            cls: type[pydantic.BaseModel] = pydantic.create_model(
                name, __doc__=str(description) if description else None, **fields
            )
        except Exception as exc:  # pydantic refused a guessed type: show a plain dict
            logger.debug("no class for object type %s: %s", name, exc)
            return dict[str, Any]
        self.names.add(name, schema, cls)
        return cls


def _class_like(title: str) -> bool:
    return title.isidentifier() and title[:1].isupper() and not keyword.iskeyword(title)


def _literal(values: list[Any]) -> Any:
    if not values or not all(isinstance(v, str | int | float | bool) or v is None for v in values):
        return Any
    scalars = [v for v in values if v is not None]
    parts: list[Any] = [Literal[tuple(scalars)]] if scalars else []
    if len(scalars) < len(values):
        parts.append(None)
    return _union(parts)
