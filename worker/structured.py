"""Structured output (grammar-constrained decoding): builds a per-sequence constraint from a request's
`response_format`. Only plain text is served by this build; other formats are refused."""

from __future__ import annotations

from typing import Any


def compile_constraint(response_format: dict[str, Any] | None, tokenizer: Any, vocab_size: int) -> Any:
    """None for unconstrained text."""
    if not response_format or response_format.get("type", "text") == "text":
        return None
    raise ValueError(f"response_format {response_format.get('type')!r} is not supported")
