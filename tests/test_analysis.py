"""The analyzer template: in-process and through the queue give the same records; `analyze` resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analysis import Analyzer, LocalRunner, QueueRunner, run_analysis
from analysis.example_analyzer import SentimentAnalyzer
from analysis.records import done_keys, read_records
from qwen_deploy.config import load_settings
from tests.helpers import ROOT, Stack

ZEN_STARTS = ["Beautiful is better than", "Errors should never", "Now is better than", "Simple is better than",
              "Flat is better than", "Readability", "Explicit is better than", "Sparse is better than"]


class ZenAnalyzer(Analyzer):
    """Completes a Zen line and keeps its first word."""

    max_new_tokens = 6

    def prompt(self, record: dict[str, Any]) -> str:
        return record["text"]

    def parse(self, record: dict[str, Any], text: str) -> dict[str, Any]:
        words = text.split()
        return {"next": words[0] if words else ""}


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": f"z{i}", "text": ZEN_STARTS[i % len(ZEN_STARTS)]} for i in range(n)]


@pytest.fixture(scope="module")
def handler(demo_model: Path):  # type: ignore[no-untyped-def]
    from worker.handler import ModelHandler

    h = ModelHandler(load_settings(environ={}, overrides={"model": {"name_or_path": str(demo_model), "threads": 1}}))
    h.setup()
    return h


def test_in_process_and_queue_give_the_same_records(stack: Stack, handler) -> None:  # type: ignore[no-untyped-def]
    analyzer = ZenAnalyzer()
    local = list(run_analysis(analyzer, records(20), LocalRunner(handler, batch_size=8), set(), chunk=7))
    queued = list(run_analysis(analyzer, records(20), QueueRunner(stack.client()), set(), chunk=7))
    assert local == queued
    assert [line["key"] for line in local] == [f"z{i}" for i in range(20)]
    assert local[0]["result"] == {"next": "ugly."} and local[1]["result"] == {"next": "pass"}


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
    assert stored["response_format"] == analyzer.response_format
    tok = AutoTokenizer.from_pretrained(demo_model)
    constraint = compile_constraint(stored["response_format"], tok, 384)
    for token in tok.encode('{"label": "neutral", "confidence": 0.5}', add_special_tokens=False):
        constraint.accept(token)
    assert constraint.is_done() and constraint.error is None
    assert ZenAnalyzer().request({"text": "x"}).get("response_format") is None  # opt-in


def test_analyze_cli_resumes_without_redoing_records(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records(12)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "QWEN_DEPLOY_ENV_FILE": str(tmp_path / "none.env")}
    cmd = [sys.executable, "-m", "qwen_deploy.cli", "analyze", str(source), "--out", str(out), "--url", stack.url,
           "--analyzer", "tests.test_analysis:ZenAnalyzer", "--chunk", "4"]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    full = out.read_text().splitlines()
    assert len(full) == 12 and "0 already done, 12 analysed" in first.stderr
    out.write_text("\n".join(full[:5]) + "\n" + full[5][:20])  # interrupted mid-write
    assert done_keys(out) == {f"z{i}" for i in range(5)}
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "5 already done, 7 analysed" in second.stderr
    resumed = [json.loads(x) for x in out.read_text().splitlines()]
    assert resumed == [json.loads(x) for x in full]


def test_csv_input(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,text\na,Errors should never\nb,\"Now, is better\"\n")
    assert list(read_records(path)) == [{"id": "a", "text": "Errors should never"},
                                        {"id": "b", "text": "Now, is better"}]
