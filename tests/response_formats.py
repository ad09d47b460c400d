"""Response formats the web accepts (shared by the web's tests and the grammar compiler's)."""

from __future__ import annotations

from typing import Any

LABEL = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "confidence"],
    "additionalProperties": False,
}


def js(schema: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, **extra}}


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


GOOD = [
    {"type": "text"},
    {"type": "json_object"},
    js(LABEL, strict=True),
    js(
        {
            "$defs": {
                "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
            },
            "$ref": "#/$defs/node",
            "title": "tree",
            "description": "recursive",
        }
    ),
    js({"anyOf": [{"type": "string", "format": "date", "pattern": "^2"}, {"type": "null"}]}, description="d"),
    js(
        {
            "type": "object",
            "properties": {
                "a": {"const": 1},
                "b": {"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 1, "maxItems": 4},
            },
            "additionalProperties": {"type": "string", "minLength": 1, "maxLength": 3},
        }
    ),
    js(nested(9)),
]
EVERY_KEYWORD = js(
    {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "x",
        "$comment": "c",
        "title": "t",
        "description": "d",
        "type": "object",
        "properties": {
            "s": {
                "type": "string",
                "minLength": 1,
                "maxLength": 5,
                "pattern": "^[a-z]+$",
                "default": "a",
                "examples": ["b"],
                "deprecated": False,
            },
            "f": {"type": "string", "format": "uuid", "readOnly": True, "writeOnly": False},
            "m": {"type": "string", "contentMediaType": "text/plain", "contentEncoding": "7bit"},
            "n": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 9},
            "i": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5},
            "e": {"oneOf": [{"enum": [1, 2]}, {"anyOf": [{"const": "z"}]}]},
            "a": {"allOf": [{"type": "array"}, {"items": {"$ref": "#/definitions/d"}}]},
            "t": {"type": "array", "prefixItems": [{"$ref": "#/$defs/d"}], "minItems": 1, "maxItems": 2},
        },
        "required": ["s"],
        "patternProperties": {"^x": {"type": "boolean"}},
        "additionalProperties": False,
        "$defs": {"d": {"type": "null"}},
        "definitions": {"d": True},
    }
)
GOOD.append(EVERY_KEYWORD)
