"""What a tool accepts and returns, read from its signature and docstring.

A :class:`ToolSpec` holds a tool's parameters (types, defaults, docs), its return type, a
pydantic model of its arguments (for the JSON Schema and for validation) and its docstring.
:func:`spec_for` builds one for any registered tool: a ``@tool`` function carries its own; for a
class with ``run`` / ``run_async`` / ``run_with_context`` it is read from the method that
:func:`codemode.core.registry.call_tool` dispatches to, and cached per class.
"""

from __future__ import annotations

import contextlib
import inspect
import typing
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from codemode.core.context import RuntimeContext
from codemode.tools.docstrings import Docstring, parse_docstring

__all__ = ["Param", "ToolSpec", "spec_for", "spec_from_callable"]

EMPTY: Any = inspect.Parameter.empty

# NaN and infinities are kept as floats so that the relay's strict JSON encoding refuses them
# with its own message, instead of pydantic turning them into null silently.
_RESULT_ADAPTER: TypeAdapter[Any] = TypeAdapter(
    Any, config=ConfigDict(ser_json_inf_nan="constants")
)


@dataclass(frozen=True)
class Param:
    """One argument a program passes: its name, type, default (``EMPTY`` if required), doc."""

    name: str
    annotation: Any
    default: Any
    kind: inspect._ParameterKind
    doc: str = ""

    @property
    def required(self) -> bool:
        """Whether the program must pass this argument."""
        return self.default is EMPTY


@dataclass(frozen=True)
class ToolSpec:
    """A tool's arguments, return type and docs; validates a call's arguments.

    ``permissive`` specs (a class tool taking ``*args``/``**kwargs``, or whose annotations
    cannot be resolved) describe what they can and pass arguments through unvalidated.
    """

    params: tuple[Param, ...]
    returns: Any
    doc: Docstring
    is_async: bool = False
    context_param: str | None = None
    permissive: bool = False
    _model: type[BaseModel] | None = field(default=None, repr=False, compare=False)

    def input_schema(self) -> dict[str, Any]:
        """JSON Schema of the arguments, as an object keyed by parameter name."""
        if self._model is None:
            return {"type": "object", "additionalProperties": True}
        schema = self._model.model_json_schema()
        schema.pop("title", None)
        if self.permissive:
            schema["additionalProperties"] = True
        return schema

    def output_schema(self) -> dict[str, Any] | None:
        """JSON Schema of the return value, or None when the return type is not annotated."""
        if self.returns is EMPTY:
            return None
        try:
            return TypeAdapter(self.returns).json_schema(mode="serialization")
        except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError):
            return None

    def bind(
        self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Validate a call's arguments; return them converted to the declared types.

        Raises ``TypeError`` naming the tool and each bad argument, as Python does for a wrong
        call, so the program sees an ordinary exception. Only the arguments the caller passed
        are returned: the tool's own defaults apply to the rest.
        """
        if self._model is None or self.permissive:
            return list(args), dict(kwargs)
        given = self.match(name, args, kwargs)
        try:
            model = self._model.model_validate(given)
        except ValidationError as exc:
            raise TypeError(_validation_message(name, exc)) from None
        values = {p.name: getattr(model, _field(i)) for i, p in enumerate(self.params)}
        out_args: list[Any] = []
        out_kwargs: dict[str, Any] = {}
        for param in self.params:
            if param.name not in given:
                continue
            if param.kind is inspect.Parameter.POSITIONAL_ONLY:
                out_args.append(values[param.name])
            else:
                out_kwargs[param.name] = values[param.name]
        return out_args, out_kwargs

    def match(
        self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, extra: bool = False
    ) -> dict[str, Any]:
        """A call's arguments by parameter name, refused as Python refuses a wrong call
        (``TypeError`` naming the tool); ``extra`` lets unknown keywords through."""
        by_name = {p.name: p for p in self.params}
        given: dict[str, Any] = {}
        positional = [p for p in self.params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        if len(args) > len(positional):
            raise TypeError(
                f"tools.{name}() takes {len(positional)} positional arguments "
                f"but {len(args)} were given"
            )
        for param, value in zip(positional, args, strict=False):
            given[param.name] = value
        for key, value in kwargs.items():
            target = by_name.get(key)
            if target is None and not extra:
                raise TypeError(
                    f"tools.{name}() got an unexpected keyword argument {key!r}; "
                    f"it takes: {', '.join(by_name) or '(no arguments)'}"
                )
            if target is not None and target.kind is inspect.Parameter.POSITIONAL_ONLY:
                raise TypeError(f"tools.{name}() argument {key!r} is positional-only")
            if key in given:
                raise TypeError(f"tools.{name}() got multiple values for argument {key!r}")
            given[key] = value
        missing = [p.name for p in self.params if p.required and p.name not in given]
        if missing:
            raise TypeError(
                f"tools.{name}() missing required argument{'s' if len(missing) > 1 else ''}: "
                + ", ".join(repr(m) for m in missing)
            )
        return given

    @staticmethod
    def dump_result(value: Any) -> Any:
        """``value`` as plain JSON data (models and dataclasses become dicts, dates strings).

        A value pydantic cannot serialise is returned unchanged, for the relay to refuse.
        """
        if value is None or isinstance(value, str | int | float | bool):
            return value
        try:
            return _RESULT_ADAPTER.dump_python(value, mode="json")
        except PydanticSerializationError:
            return value


def _field(index: int) -> str:
    # Parameters are stored under neutral field names (aliased to the real ones) so that a
    # parameter called ``json`` or ``schema`` cannot clash with BaseModel's attributes.
    return f"p{index}"


def _validation_message(name: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        got = error.get("input")
        shown = repr(got)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        problems.append(f"argument {where!r}: {error['msg']} (got {shown})")
    return f"tools.{name}(): " + "; ".join(problems)


def _is_context(annotation: Any) -> bool:
    if annotation is RuntimeContext:
        return True
    return typing.get_origin(annotation) in (typing.Union, _UnionType) and RuntimeContext in (
        typing.get_args(annotation)
    )


_UnionType = type(int | None)


def spec_from_callable(
    func: Callable[..., Any],
    *,
    skip_first: bool = False,
    strict: bool = True,
    name: str | None = None,
    doc: Docstring | None = None,
) -> ToolSpec:
    """Read a :class:`ToolSpec` from ``func``'s signature, type hints and docstring.

    A parameter annotated ``RuntimeContext`` receives the application's context and is not
    part of the schema. ``skip_first`` drops the first parameter (``run_with_context``'s
    context). With ``strict``, ``*args``/``**kwargs``, unresolvable annotations and types
    that have no JSON Schema raise ``TypeError``; without, the spec becomes permissive.
    """
    label = name or str(getattr(func, "__name__", "tool"))
    signature = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception as exc:  # any error while evaluating annotations, e.g. NameError
        if strict:
            raise TypeError(f"tool {label!r}: cannot resolve its type hints: {exc}") from None
        hints = {}
    parsed = doc if doc is not None else parse_docstring(inspect.getdoc(func))
    params: list[Param] = []
    context_param: str | None = None
    permissive = False
    parameters = list(signature.parameters.values())
    if skip_first and parameters:
        parameters = parameters[1:]
    for p in parameters:
        annotation = hints.get(p.name, Any)
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            if strict:
                raise TypeError(
                    f"tool {label!r}: *args and **kwargs have no schema; name each parameter"
                )
            permissive = True
            continue
        if _is_context(annotation):
            context_param = p.name
            continue
        default = p.default
        if isinstance(default, pydantic.fields.FieldInfo):
            default = (
                EMPTY if default.is_required() else default.get_default(call_default_factory=True)
            )
        params.append(Param(p.name, annotation, default, p.kind, parsed.params.get(p.name, "")))
    returns = hints.get("return", EMPTY) if signature.return_annotation is not EMPTY else EMPTY
    model: type[BaseModel] | None
    try:
        model = _arguments_model(label, params)
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError) as exc:
        if strict:
            raise TypeError(f"tool {label!r}: an argument type has no JSON Schema: {exc}") from None
        model, permissive = None, True
    return ToolSpec(
        params=tuple(params),
        returns=returns,
        doc=parsed,
        is_async=inspect.iscoroutinefunction(func),
        context_param=context_param,
        permissive=permissive,
        _model=model,
    )


def _arguments_model(label: str, params: Sequence[Param]) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for i, param in enumerate(params):
        default = ... if param.required else param.default
        info = Field(default, alias=param.name, description=param.doc or None)
        fields[_field(i)] = (param.annotation, info)
    model: type[BaseModel] = pydantic.create_model(
        f"{label}_arguments",
        __config__=ConfigDict(extra="forbid", populate_by_name=False),
        **fields,
    )
    model.model_json_schema()  # fail now, not at the first describe, on types with no schema
    return model


# Class tools: one spec per class, read from the method call_tool dispatches to.
_CLASS_SPECS: weakref.WeakKeyDictionary[type, ToolSpec] = weakref.WeakKeyDictionary()


def spec_for(tool: Any) -> ToolSpec:
    """The :class:`ToolSpec` of a registered tool (a ``@tool`` function or a tool class)."""
    own = getattr(tool, "spec", None)
    if isinstance(own, ToolSpec):
        return own
    cls = type(tool)
    cached = _CLASS_SPECS.get(cls)
    if cached is not None:
        return cached
    spec = _class_spec(tool)
    with contextlib.suppress(TypeError):  # a class that cannot be weakly referenced
        _CLASS_SPECS[cls] = spec
    return spec


def _class_spec(tool: Any) -> ToolSpec:
    class_doc = parse_docstring(type(tool).__doc__)
    for method_name, skip_first in (
        ("run_with_context", True),
        ("run_async", False),
        ("run", False),
    ):
        method = getattr(tool, method_name, None)
        if method is None or not callable(method):
            continue
        # The class docstring says what the tool is; the method's may document the arguments.
        own = parse_docstring(method.__doc__)
        doc = Docstring(
            summary=class_doc.summary or own.summary,
            description=class_doc.description or own.description,
            params={**class_doc.params, **own.params},
            returns=own.returns or class_doc.returns,
        )
        try:
            return spec_from_callable(
                method,
                skip_first=skip_first,
                strict=False,
                name=type(tool).__name__,
                doc=doc,
            )
        except (TypeError, ValueError):  # no signature (a builtin) or an unusable one
            break
    return ToolSpec(params=(), returns=EMPTY, doc=class_doc, permissive=True)
