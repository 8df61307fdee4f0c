"""An MCP tool's JSON Schemas as a ToolSpec: stubs, Python names, argument checks, results."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from codemode.mcp._schema import python_name, spec_from_schemas
from codemode.tools.stubs import describe_tools

# What FastMCP sends for `def move(point: Point, direction: Literal[...] = "right",
# tags: list[str] | None = None) -> Point`, with a docstring that documents `direction`.
POINT = {
    "description": "A point on the grid.",
    "properties": {
        "x": {"description": "Column, from 0.", "title": "X", "type": "integer"},
        "y": {"default": 0, "title": "Y", "type": "integer"},
    },
    "required": ["x"],
    "title": "Point",
    "type": "object",
}
MOVE_INPUT = {
    "$defs": {"Point": POINT},
    "properties": {
        "tags": {
            "anyOf": [{"items": {"type": "string"}, "type": "array"}, {"type": "null"}],
            "default": None,
            "title": "Tags",
        },
        "direction": {"default": "right", "enum": ["up", "right"], "type": "string"},
        "point": {"$ref": "#/$defs/Point"},
    },
    "required": ["point"],
    "title": "moveArguments",
    "type": "object",
}
MOVE_DOC = "Move a point one step.\n\n    Args:\n        direction: Where to.\n    "


class Holder:
    """Something with a ``spec``, as the stubs read a registered tool."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


def stub(name: str, spec: Any) -> str:
    return describe_tools({name: Holder(spec)}, preamble=False)


def test_fastmcp_schema_renders_a_signature_with_its_object_type() -> None:
    """Required first, defaults kept, $defs as a TypedDict, enum as Literal, docs merged."""
    spec = spec_from_schemas("move", MOVE_INPUT, POINT, MOVE_DOC)
    assert stub("move", spec) == (
        "class Point(TypedDict):\n"
        '    """A point on the grid."""\n'
        "    x: int  # Column, from 0.\n"
        "    y: int\n"
        "\n"
        "def move(\n"
        "    point: Point,\n"
        "    tags: list[str] | None = None,\n"
        "    direction: Literal['up', 'right'] = 'right',\n"
        ") -> Point:\n"
        '    """Move a point one step.\n'
        "\n"
        "    Args:\n"
        "        direction: Where to.\n"
        '    """\n'
    )
    assert spec.input_schema() == MOVE_INPUT
    assert spec.output_schema() == POINT
    assert not spec.unwrap_result


def test_fastmcp_result_wrapper_is_unwrapped_in_the_stub() -> None:
    """`{"result": x}` under `<name>Output` is FastMCP's wrapper: the stub returns x's type."""
    output = {
        "properties": {"result": {"items": {"type": "integer"}, "type": "array"}},
        "required": ["result"],
        "title": "evensOutput",
        "type": "object",
    }
    spec = spec_from_schemas("evens", {"type": "object", "properties": {}}, output, "Evens.")
    assert spec.unwrap_result
    assert stub("evens", spec) == 'def evens() -> list[int]:\n    """Evens."""\n'


def test_names_that_are_not_identifiers_are_mapped_back_for_the_server() -> None:
    """`user-id` and `from` become `user_id` and `from_`; the call goes out under the
    schema's names."""
    schema = {
        "type": "object",
        "properties": {"user-id": {"type": "string"}, "from": {"type": "integer"}},
        "required": ["user-id", "from"],
    }
    spec = spec_from_schemas("lookup", schema)
    assert [p.name for p in spec.params] == ["user_id", "from_"]
    args, kwargs = spec.bind("lookup", ["u1"], {"from_": 3})
    assert (args, kwargs) == ([], {"user_id": "u1", "from_": 3})
    assert spec.wire_arguments(kwargs) == {"user-id": "u1", "from": 3}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("get-time", "get_time"),
        ("time.now", "time_now"),
        ("1st", "_1st"),
        ("class", "class_"),
        ("match", "match"),  # a soft keyword is a fine name
        ("", "_"),
        ("héllo", "h_llo"),
    ],
)
def test_python_name(name: str, expected: str) -> None:
    """Any name becomes an identifier the program can write after `tools.`."""
    assert python_name(name) == expected
    assert expected.isidentifier()


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ([], {}, "tools.move() missing required argument: 'point'"),
        ([{"x": 1}, None, "up", 4], {}, "tools.move() takes 3 positional arguments but 4"),
        ([], {"point": {"x": 1}, "speed": 2}, "unexpected keyword argument 'speed'; it takes:"),
        ([{"x": 1}], {"point": {"x": 2}}, "got multiple values for argument 'point'"),
        ([], {"point": {"x": "one"}}, "tools.move(): argument 'point.x': 'one' is not of type"),
        ([], {"point": {}}, "tools.move(): argument 'point': 'x' is a required property"),
        ([], {"point": {"x": 1}, "direction": "down"}, "argument 'direction': 'down' is not one"),
    ],
)
def test_bad_arguments_are_type_errors_naming_the_tool(
    args: list[Any], kwargs: dict[str, Any], message: str
) -> None:
    """The schema's verdict comes back as a TypeError, as for any other tool."""
    spec = spec_from_schemas("move", MOVE_INPUT, POINT, MOVE_DOC)
    with pytest.raises(TypeError) as caught:
        spec.bind("move", args, kwargs)
    assert message in str(caught.value)


def test_optional_argument_without_default_none_means_not_sent() -> None:
    """An optional argument whose schema refuses null shows `= None`; None is not sent."""
    schema = {
        "type": "object",
        "properties": {"q": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["q"],
    }
    spec = spec_from_schemas("search", schema, None, "Search.")
    assert stub("search", spec).startswith("def search(q: str, limit: int | None = None) -> Any:")
    assert spec.bind("search", [], {"q": "x", "limit": None}) == ([], {"q": "x"})
    assert spec.bind("search", ["x", 5], {}) == ([], {"q": "x", "limit": 5})


def test_open_schema_takes_any_keyword() -> None:
    """A schema naming no properties accepts any keyword arguments, and says so."""
    spec = spec_from_schemas("anything", {"type": "object"}, None, "Take anything.")
    assert stub("anything", spec).startswith("def anything(**kwargs: Any) -> Any:")
    assert spec.bind("anything", [], {"a": 1, "b-c": [2]}) == ([], {"a": 1, "b-c": [2]})


def test_schema_types_as_python_types() -> None:
    """Arrays, maps, unions, nullable types, consts and nested objects get readable types."""
    schema = {
        "type": "object",
        "properties": {
            "ids": {"type": "array", "items": {"type": "integer"}},
            "scores": {"type": "object", "additionalProperties": {"type": "number"}},
            "when": {"type": ["string", "null"]},
            "either": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
            "kind": {"const": "fixed"},
            "owner": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
            "anything": {},
        },
        "required": ["ids", "scores", "when", "either", "kind", "owner", "anything"],
    }
    text = stub("f", spec_from_schemas("f", schema))
    assert "class FOwner(TypedDict):\n    name: str\n" in text
    assert (
        "    ids: list[int],\n"
        "    scores: dict[str, float],\n"
        "    when: str | None,\n"
        "    either: int | bool,\n"
        "    kind: Literal['fixed'],\n"
        "    owner: FOwner,\n"
        "    anything: Any,\n"
    ) in text


def test_recursive_schema_terminates() -> None:
    """A type that contains itself is shown as a dict where it recurs."""
    schema = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["value"],
            }
        },
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/Node"}},
        "required": ["root"],
    }
    spec = spec_from_schemas("walk", schema)
    assert "    children: list[dict[str, Any]]\n" in stub("walk", spec)
    spec.bind("walk", [{"value": 1, "children": [{"value": 2}]}], {})
    with pytest.raises(TypeError, match=r"argument 'root\.children\.0\.value'"):
        spec.bind("walk", [{"value": 1, "children": [{"value": "two"}]}], {})


def test_an_invalid_schema_is_left_to_the_server(caplog: pytest.LogCaptureFixture) -> None:
    """A schema that is not valid JSON Schema is logged and not enforced here."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}
    with caplog.at_level(logging.WARNING, logger="codemode.mcp"):
        spec = spec_from_schemas("odd", schema)
    assert "inputSchema is not valid JSON Schema" in caplog.text
    assert spec.validator is None
    assert spec.bind("odd", [], {"n": "x"}) == ([], {"n": "x"})


def test_title_stands_in_for_a_missing_description() -> None:
    """With no description, the tool's title is its summary."""
    spec = spec_from_schemas("t", {"type": "object", "properties": {}}, title="Tell the time")
    assert stub("t", spec) == 'def t() -> Any:\n    """Tell the time"""\n'
