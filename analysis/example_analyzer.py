"""An example analyzer: sentiment labelling of texts, with tolerant parsing of the model's answer.

    uv run qwen-deploy analyze reviews.jsonl --out labels.jsonl            # via the API
    uv run qwen-deploy analyze reviews.csv --out labels.jsonl --local      # in-process

Each input record needs a `text` field (an `id` field, if present, is used to resume).
"""

from __future__ import annotations

import re

from analysis.base import Analyzer, Record

LABELS = ("positive", "negative", "neutral")
SYNONYMS = {"good": "positive", "great": "positive", "bad": "negative", "poor": "negative", "mixed": "neutral"}


class SentimentAnalyzer(Analyzer):
    """Labels `record["text"]` as positive, negative or neutral (or unknown when the answer is unclear)."""

    max_new_tokens = 8
    stop = ["\n"]

    def prompt(self, record: Record) -> list[dict[str, str]]:
        question = ("Classify the sentiment of this text as positive, negative or neutral. "
                    f"Answer with one word.\n\nText: {record.get('text', '')}")
        return [{"role": "user", "content": question}]

    def parse(self, record: Record, text: str) -> Record:
        words = re.findall(r"[a-z]+", text.lower())
        label = next((w for w in words if w in LABELS), None)
        label = label or next((SYNONYMS[w] for w in words if w in SYNONYMS), "unknown")
        return {"sentiment": label}
