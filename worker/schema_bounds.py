"""Bounds for what a JSON Schema leaves unbounded, so a small model cannot loop inside one value.

A plain `{"type": "number"}` lets the grammar accept digits forever (`31212222312344444444…` until
`max_tokens`, seen on a 135 M chat model). Before compiling, every number or integer without bounds of
its own gets `minimum`/`maximum` of ±10¹⁵ (at most 16 integer digits, no exponent) and every number
without `multipleOf` gets `multipleOf` 10⁻⁶ (at most 6 decimals). What the grammar then accepts is
still valid against the caller's schema. Whitespace is already fixed by the compile options.
"""

from __future__ import annotations

from typing import Any

LIMIT = 1e15  # |value| ≤ this: at most 16 integer digits
STEP = 1e-6  # at most 6 decimals
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "unevaluatedProperties")


def bounded(schema: Any) -> Any:
    """A copy of `schema` with every unbounded number and integer bounded (see the module doc)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    types = out.get("type")
    kinds = set(types) if isinstance(types, list) else {types}
    if kinds & {"number", "integer"}:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -LIMIT
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = LIMIT
        if "number" in kinds and "multipleOf" not in out:
            out["multipleOf"] = STEP
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [bounded(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: bounded(s) for name, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = bounded(out[key])
    return out
