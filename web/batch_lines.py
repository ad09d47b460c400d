"""A batch's JSONL lines, counted and measured before any is parsed (request bodies and uploaded files alike),
then parsed one by one into (line number, object or the parse error) pairs."""

from __future__ import annotations

import io
import json
from typing import Any

from qwen_deploy.errors import BadRequest, PayloadTooLarge, Unprocessable


def jsonl_lines(
    raw: bytes, max_lines: int, max_line_bytes: int, max_bytes: int | None = None
) -> list[tuple[int, bytes]]:
    """The non-blank lines, counted before any is parsed: 413 past `max_bytes`, 422 past `max_lines` or
    `max_line_bytes`."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise PayloadTooLarge(f"the batch is larger than {max_bytes} bytes", param="requests")
    lines: list[tuple[int, bytes]] = []
    for n, text in enumerate(io.BytesIO(raw), start=1):
        if len(text) > max_line_bytes:
            raise Unprocessable(
                f"line {n} is longer than {max_line_bytes} bytes", code="line_too_long", param="requests"
            )
        if text.strip():
            lines.append((n, text))
            if len(lines) > max_lines:
                raise Unprocessable(
                    f"the batch has more than {max_lines} lines", code="too_many_lines", param="requests"
                )
    return lines


def parse_lines(lines: list[tuple[int, bytes]]) -> list[tuple[int, Any]]:
    """Each line's JSON value, or the BadRequest that says why it does not parse (an error line of its own)."""
    items: list[tuple[int, Any]] = []
    for n, text in lines:
        try:
            items.append((n, json.loads(text)))
        except (ValueError, RecursionError) as exc:
            items.append((n, BadRequest(f"line {n} is not valid JSON: {exc}", code="invalid_json")))
    return items
