"""`response_format` (OpenAI's shape): the request model and the checks on a json_schema's schema.

The worker compiles the schema into a token grammar (llguidance); this module refuses up front, with
the exact sub-path in `param`, what that grammar cannot express. No torch, no grammar library here.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from qwen_deploy.errors import Unprocessable

MAX_SCHEMA_BYTES = 16 * 1024
MAX_SCHEMA_DEPTH = 10  # nested subschemas (OpenAI allows 10 levels of nesting)
PARAM = "response_format.json_schema.schema"

# Keywords the grammar compiler implements, and annotations it ignores.
KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentMediaType",
        "contentEncoding",
    }
)
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"})
_ONE = ("items", "additionalProperties")  # keyword → one subschema
_MAP = ("properties", "patternProperties", "$defs", "definitions")  # keyword → {name: subschema}
_LIST = ("prefixItems", "anyOf", "oneOf", "allOf")  # keyword → [subschema]
_LOOKAROUND = re.compile(r"\(\?<?[=!]|\\[1-9]")  # the grammar's regexes have no lookaround or backreferences


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a-z, A-Z, 0-9, _ and -; at most 64")
    description: StrictStr | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="a JSON Schema (see docs/API.md: supported keywords)")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def check_response_format(fmt: ResponseFormat) -> None:
    """Refuse a json_schema format the worker could not compile (422 with the exact param)."""
    if fmt.type != "json_schema":
        if fmt.json_schema is not None:
            raise Unprocessable(
                "json_schema is only allowed with type json_schema",
                code="invalid_value",
                param="response_format.json_schema",
            )
        return
    if fmt.json_schema is None:
        raise Unprocessable(
            "type json_schema needs a json_schema object", code="missing_field", param="response_format.json_schema"
        )
    check_schema(fmt.json_schema.schema_, PARAM)


def check_schema(schema: dict[str, Any], param: str) -> None:
    """Refuse a JSON Schema the grammar could not compile (422 naming the sub-path under `param`)."""
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        raise Unprocessable(
            f"schema is {size} bytes of JSON; the maximum is {MAX_SCHEMA_BYTES}", code="invalid_value", param=param
        )
    draft: type[jsonschema.protocols.Validator] = jsonschema.Draft202012Validator
    if isinstance(schema.get("$schema"), str):
        draft = jsonschema.validators.validator_for(schema, default=draft)
    try:
        draft.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = ".".join([param, *(str(p) for p in exc.path)])
        raise Unprocessable(f"not a valid JSON Schema: {exc.message}", code="invalid_value", param=where) from None
    _walk(schema, schema, param, 0)


def _unsupported(message: str, param: str) -> Unprocessable:
    return Unprocessable(message, code="unsupported_schema", param=param)


def _walk(node: Any, root: dict[str, Any], path: str, depth: int) -> None:
    """Check one subschema and recurse into its subschemas."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise Unprocessable("a subschema must be an object or a boolean", code="invalid_value", param=path)
    if depth > MAX_SCHEMA_DEPTH:
        raise Unprocessable(f"schema nests deeper than {MAX_SCHEMA_DEPTH} levels", code="invalid_value", param=path)
    for key in node:
        if key not in KEYWORDS:
            raise _unsupported(f"keyword {key!r} is not supported in structured output", f"{path}.{key}")
    if "format" in node and (not isinstance(node["format"], str) or node["format"] not in FORMATS):
        raise _unsupported(
            f"format {node['format']!r} is not supported; use one of {sorted(FORMATS)}", f"{path}.format"
        )
    if node.get("enum") == []:
        raise Unprocessable("enum needs at least one value", code="invalid_value", param=f"{path}.enum")
    if isinstance(node.get("pattern"), str) and _LOOKAROUND.search(node["pattern"]):
        raise _unsupported("patterns may not use lookaround or backreferences", f"{path}.pattern")
    if "$ref" in node:
        _check_ref(node["$ref"], root, f"{path}.$ref")
    for key in (*_MAP, *_LIST):
        if key in node and not isinstance(node[key], dict if key in _MAP else list):
            raise Unprocessable(
                f"{key} must be an {'object' if key in _MAP else 'array'}", code="invalid_value", param=f"{path}.{key}"
            )
    for key in _ONE:
        if key in node:
            if isinstance(node[key], list):
                raise _unsupported("items must be one schema (use prefixItems for tuples)", f"{path}.{key}")
            _walk(node[key], root, f"{path}.{key}", depth + 1)
    for key in _MAP:
        for name, sub in node.get(key, {}).items():
            _walk(sub, root, f"{path}.{key}.{name}", depth + 1)
    for key in _LIST:
        for i, sub in enumerate(node.get(key, [])):
            _walk(sub, root, f"{path}.{key}.{i}", depth + 1)


def _check_ref(ref: Any, root: dict[str, Any], param: str) -> None:
    """Only references inside the schema itself (`#`, `#/$defs/...`), and they must resolve."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise _unsupported("only local references (#/$defs/...) are supported", param)
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Unprocessable(
                f"reference {ref!r} does not resolve inside the schema", code="invalid_value", param=param
            )
