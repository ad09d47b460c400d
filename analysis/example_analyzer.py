"""An example analyzer: sentiment labelling of texts, as structured output with tolerant parsing as fallback.

    uv run qwen-deploy analyze reviews.jsonl --out labels.jsonl            # via the API
    uv run qwen-deploy analyze reviews.csv --out labels.jsonl --local      # in-process

Each input record needs a `text` field (an `id` field, if present, is used to resume). The request
asks for JSON matching `SCHEMA` (`response_format`), so a worker that applies the grammar always
returns `{"label": ..., "confidence": ...}`; any other answer goes through the word-based parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

from analysis.base import Analyzer, Record

LABELS = ("positive", "negative", "neutral")
SYNONYMS = {"good": "positive", "great": "positive", "bad": "negative", "poor": "negative", "mixed": "neutral"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"enum": list(LABELS)}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["label", "confidence"],
    "additionalProperties": False,
}


class SentimentAnalyzer(Analyzer):
    """Labels `record["text"]` as positive, negative or neutral (or unknown when the answer is unclear)."""

    max_new_tokens = 24
    stop = ["\n"]
    required_fields = ("text",)
    response_format = {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": SCHEMA, "strict": True}}

    def prompt(self, record: Record) -> list[dict[str, str]]:
        question = (
            "Classify the sentiment of this text as positive, negative or neutral. Answer in JSON: "
            '{"label": "positive" | "negative" | "neutral", "confidence": 0 to 1}.'
            f"\n\nText: {record.get('text', '')}"
        )
        return [{"role": "user", "content": question}]

    def parse(self, record: Record, text: str) -> Record:
        structured = _from_json(text)
        if structured is not None:
            return structured
        words = re.findall(r"[a-z]+", text.lower())
        label = next((w for w in words if w in LABELS), None)
        label = label or next((SYNONYMS[w] for w in words if w in SYNONYMS), "unknown")
        return {"sentiment": label, "confidence": None}


def _from_json(text: str) -> Record | None:
    """The result from a structured answer, or None when the text is not one."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    if not isinstance(answer, dict) or answer.get("label") not in LABELS:
        return None
    confidence = answer.get("confidence")
    ok = isinstance(confidence, (int, float)) and not isinstance(confidence, bool) and 0 <= confidence <= 1
    return {"sentiment": answer["label"], "confidence": float(confidence) if ok and confidence is not None else None}
