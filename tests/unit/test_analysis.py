"""The analyzer template without a deployment: the example analyzer's parsing and structured output,
CSV input. (Through the queue and the `analyze` CLI: tests/e2e/test_analysis_e2e.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis import Analyzer
from analysis.example_analyzer import SentimentAnalyzer
from analysis.records import read_records
from qwen_deploy.config import load_settings


class ZenAnalyzer(Analyzer):
    """Completes a Zen line and keeps its first word."""

    max_new_tokens = 6

    def prompt(self, record: dict[str, Any]) -> str:
        return record["text"]

    def parse(self, record: dict[str, Any], text: str) -> dict[str, Any]:
        words = text.split()
        return {"next": words[0] if words else ""}


def test_sentiment_parsing_is_tolerant() -> None:
    parse = SentimentAnalyzer().parse
    assert parse({}, " Positive.") == {"sentiment": "positive", "confidence": None}
    assert parse({}, "It is NEGATIVE!") == {"sentiment": "negative", "confidence": None}
    assert parse({}, "mostly good") == {"sentiment": "positive", "confidence": None}
    assert parse({}, "¯\\_(ツ)_/¯") == {"sentiment": "unknown", "confidence": None}
    assert parse({}, '{"label": "neutral", "confidence": 0.75}') == {"sentiment": "neutral", "confidence": 0.75}
    assert parse({}, '{"label": "negative", "confidence": 7}') == {"sentiment": "negative", "confidence": None}
    assert parse({}, '{"label": "great"}') == {"sentiment": "positive", "confidence": None}  # falls back
    body = SentimentAnalyzer().request({"text": "great film"})
    assert body["messages"][0]["content"].endswith("Text: great film") and body["max_new_tokens"] == 24


def test_sentiment_requests_structured_output(demo_model: Path) -> None:
    """The body asks for the label/confidence schema, passes the web checks, and compiles in the worker."""
    from transformers import AutoTokenizer

    from web.schemas import parse_job
    from worker.structured import compile_constraint

    analyzer = SentimentAnalyzer()
    body = analyzer.request({"text": "great film"})
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema"
    assert schema["properties"]["label"] == {"enum": ["positive", "negative", "neutral"]}
    assert schema["properties"]["confidence"]["type"] == "number" and schema["required"] == ["label", "confidence"]
    body["response_format"]["json_schema"]["name"] = "changed"
    assert analyzer.response_format["json_schema"]["name"] == "sentiment"  # each body has its own copy
    stored = parse_job(analyzer.request({"text": "x"}), load_settings(environ={}))
    assert stored.response_format == analyzer.response_format
    tok = AutoTokenizer.from_pretrained(demo_model)
    constraint = compile_constraint(stored.response_format, tok, 384)
    for token in tok.encode('{"label": "neutral", "confidence": 0.5}', add_special_tokens=False):
        constraint.accept(token)
    assert constraint.is_done() and constraint.error is None
    assert ZenAnalyzer().request({"text": "x"}).get("response_format") is None  # opt-in


def test_csv_input(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('id,text\na,Errors should never\nb,"Now, is better"\n')
    assert list(read_records(path)) == [
        {"id": "a", "text": "Errors should never"},
        {"id": "b", "text": "Now, is better"},
    ]
