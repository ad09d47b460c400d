"""A batch's request lines as `POST /v1/batches` reads them: the JSON body, an OpenAI Batch JSONL body or an
uploaded input file; the batch metadata; and the checks of each line (the routes are in web/batches.py)."""

from __future__ import annotations

import json
from typing import Any

from flask import g, request

from qwen_deploy.errors import AppError, BadRequest, Unprocessable, UnsupportedMediaType
from web.batch_lines import jsonl_lines, parse_lines
from web.context import current_services
from web.openai_api.batch_files import file_lines, line_endpoint, line_request

METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # as OpenAI
JSONL_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/jsonlines", "text/jsonl"})


def line_error(line: int, custom_id: Any, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """A rejected line's entry in the batch's error file."""
    return {
        "id": f"line-{line}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message, "param": param, "line": line},
    }


def read_lines() -> tuple[list[tuple[int, Any]], Any, dict[str, str]]:
    """(line number, parsed item or the parse error) pairs, the batch metadata, extra record fields."""
    settings = current_services().settings.batches
    request.max_content_length = settings.max_bytes
    raw = request.get_data(cache=False)
    if request.mimetype in JSONL_TYPES:
        items = parse_lines(jsonl_lines(raw, settings.max_lines, settings.max_line_bytes))
        return items, None, {"endpoint": line_endpoint(items)}
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("expected application/json or application/x-ndjson", param="Content-Type")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if isinstance(body, dict) and "input_file_id" in body:  # OpenAI's form: lines from an uploaded file
        return file_lines(body)
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        raise Unprocessable("body must be an object with a list of requests", code="invalid_type", param="requests")
    if len(body["requests"]) > settings.max_lines:  # before any line is looked at
        raise Unprocessable(
            f"the batch has {len(body['requests'])} lines; the maximum is {settings.max_lines}",
            code="too_many_lines",
            param="requests",
        )
    webhook = body.get("webhook")
    if webhook is not None and not isinstance(webhook, str):
        raise Unprocessable("webhook must be a URL string", code="invalid_type", param="webhook")
    g.batch_webhook = webhook
    extra = {"endpoint": "/v1/jobs"}
    if body.get("completion_window") is not None:
        if not isinstance(body["completion_window"], str):
            raise Unprocessable(
                "completion_window must be a duration like 24h", code="invalid_type", param="completion_window"
            )
        extra["completion_window"] = body["completion_window"]
    return list(enumerate(body["requests"], start=1)), body.get("metadata"), extra


def check_metadata(metadata: Any) -> None:
    """Up to 16 string pairs, keys up to 64 and values up to 512 characters (OpenAI's limits)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > METADATA_KEYS:
        raise Unprocessable(f"metadata must be an object of at most {METADATA_KEYS} keys", param="metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS or not isinstance(value, str) or len(value) > METADATA_VALUE_CHARS:
            raise Unprocessable(
                f"metadata keys must be up to {METADATA_KEY_CHARS} characters and values strings "
                f"up to {METADATA_VALUE_CHARS}",
                param=f"metadata.{key[:METADATA_KEY_CHARS]}",
            )


def validate_line(line: int, item: Any, jsonl: bool, endpoint: str) -> dict[str, Any]:
    """The stored request for one line; raises AppError for a bad line."""
    if isinstance(item, AppError):
        raise item
    if not isinstance(item, dict):
        raise Unprocessable("each line must be a JSON object", code="invalid_type")
    if not isinstance(item.get("custom_id"), str) or not item["custom_id"]:
        raise Unprocessable("custom_id must be a non-empty string", code="invalid_value", param="custom_id")
    if isinstance(item.get("body"), dict) and {"webhook", "webhook_events_filter"} & item["body"].keys():
        raise Unprocessable(
            "a batch line cannot have its own webhook; give the batch one", code="unknown_field", param="body.webhook"
        )
    if jsonl and (item.get("method", "POST") != "POST" or item.get("url", endpoint) != endpoint):
        raise Unprocessable(f"every line must be POST {endpoint}", code="invalid_url", param="url")
    body = line_request(endpoint, item.get("body"), current_services().settings)
    return {"line": line, "custom_id": item["custom_id"], "body": body.stored()}


def check_ids(items: list[tuple[int, Any]]) -> None:
    seen: dict[str, int] = {}
    for line, item in items:
        cid = item.get("custom_id") if isinstance(item, dict) else None
        if isinstance(cid, str) and cid:
            if cid in seen:
                raise Unprocessable(
                    f"custom_id {cid!r} appears on lines {seen[cid]} and {line}",
                    code="duplicate_custom_id",
                    param="custom_id",
                )
            seen[cid] = line
