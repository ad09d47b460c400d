"""`response_format` on POST /v1/jobs and batches: good formats are stored as given, bad ones get 422 + param."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.helpers import Stack
from tests.response_formats import GOOD, LABEL, js, nested
from web.response_format import MAX_SCHEMA_BYTES

P = "response_format.json_schema.schema"


@pytest.mark.parametrize(
    "fmt",
    GOOD,
    ids=["text", "json_object", "label", "recursive_ref", "anyOf_format", "mixed", "depth_9", "every_keyword"],
)
def test_good_formats_are_accepted_and_stored_as_given(http: Any, stack: Stack, fmt: dict[str, Any]) -> None:
    body = json.dumps({"prompt": "x", "max_new_tokens": 1, "response_format": fmt})  # key order kept
    response = http.post("/v1/jobs", data=body, content_type="application/json")
    assert response.status_code == 202, response.get_json()
    stored = json.loads(stack.record(response.get_json()["id"])["request"])
    assert json.dumps(stored["response_format"]) == json.dumps(fmt)  # as given, property order included


@pytest.mark.parametrize(
    ("fmt", "code", "param"),
    [
        ({"type": "xml"}, "invalid_value", "response_format.type"),
        ({}, "missing_field", "response_format.type"),
        ("json", "invalid_type", "response_format"),
        ({"type": "json_schema"}, "missing_field", "response_format.json_schema"),
        (
            {"type": "json_object", "json_schema": {"name": "a", "schema": {}}},
            "invalid_value",
            "response_format.json_schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"schema": LABEL}},
            "missing_field",
            "response_format.json_schema.name",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "no spaces", "schema": LABEL}},
            "invalid_value",
            "response_format.json_schema.name",
        ),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}, "invalid_type", P),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": LABEL, "extra": 1}},
            "unknown_field",
            "response_format.json_schema.extra",
        ),
        (js({"type": "strang"}), "invalid_value", f"{P}.type"),
        (
            js({"type": "object", "properties": {"a": {"minLength": -1}}}),
            "invalid_value",
            f"{P}.properties.a.minLength",
        ),
        (js({"type": "array", "uniqueItems": True}), "unsupported_schema", f"{P}.uniqueItems"),
        (js({"type": "object", "minProperties": 1}), "unsupported_schema", f"{P}.minProperties"),
        (
            js({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}),
            "unsupported_schema",
            f"{P}.properties.a.not",
        ),
        (js({"anyOf": [{"type": "string"}, {"if": {}, "then": {}}]}), "unsupported_schema", f"{P}.anyOf.1.if"),
        (js({"type": "string", "format": "credit-card"}), "unsupported_schema", f"{P}.format"),
        (js({"type": "string", "pattern": "^(?!x)"}), "unsupported_schema", f"{P}.pattern"),
        (js({"$ref": "https://example.com/s.json"}), "unsupported_schema", f"{P}.$ref"),
        (js({"$ref": "#/$defs/missing"}), "invalid_value", f"{P}.$ref"),
        (js({"type": "object", "properties": {"a": {"enum": []}}}), "invalid_value", f"{P}.properties.a.enum"),
        (
            js({"type": "object", "properties": {"a": {"type": "string", "description": "x" * MAX_SCHEMA_BYTES}}}),
            "invalid_value",
            P,
        ),
        (js(nested(11)), "invalid_value", P + ".items" * 11),
    ],
    ids=[
        "type",
        "no_type",
        "not_object",
        "no_json_schema",
        "json_schema_with_json_object",
        "no_name",
        "bad_name",
        "schema_not_object",
        "extra_key",
        "bad_type",
        "negative_minLength",
        "uniqueItems",
        "minProperties",
        "not",
        "if_then",
        "format",
        "lookahead",
        "remote_ref",
        "dangling_ref",
        "empty_enum",
        "too_large",
        "too_deep",
    ],
)
def test_bad_formats_are_422_with_param(http: Any, fmt: Any, code: str, param: str) -> None:
    response = http.post("/v1/jobs", json={"prompt": "x", "response_format": fmt})
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"]


def test_batch_lines_are_checked_the_same_way(http: Any, stack: Stack) -> None:
    response = http.post(
        "/v1/batches",
        json={
            "requests": [
                {"custom_id": "good", "body": {"prompt": "x", "max_new_tokens": 1, "response_format": js(LABEL)}},
                {"custom_id": "bad", "body": {"prompt": "x", "response_format": js({"type": "array", "contains": {}})}},
            ]
        },
    )
    assert response.status_code == 202, response.get_json()
    batch = response.get_json()
    assert batch["request_counts"]["total"] == 2
    lines = [json.loads(line) for line in stack.redis.lrange(f"qd:batch:{batch['id']}:out", 0, -1)]
    bad = next(line for line in lines if line["custom_id"] == "bad")
    assert bad["error"]["code"] == "unsupported_schema" and bad["error"]["param"] == f"{P}.contains"
    good = [json.loads(line) for line in stack.redis.lrange(f"qd:batch:{batch['id']}:req", 0, -1)]
    assert [g["body"]["response_format"] for g in good] == [js(LABEL)]
