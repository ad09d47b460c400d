"""The stored generation request: one type between the web's validation and the worker's read."""

from __future__ import annotations

import json
import logging

import pytest

from qwen_deploy.config import load_settings
from qwen_deploy.requests import GenerationRequest, InvalidRequest
from qwen_deploy.served import served_models
from web.schemas import _NOT_STORED, JobCreate, parse_job

SETTINGS = load_settings(environ={})


def test_the_body_schema_and_the_stored_request_name_the_same_fields() -> None:
    """Every body field the worker needs is a field of the stored request, and the request has no field
    the body cannot set but the adapter (from `model`) — so the two cannot drift apart silently."""
    body_fields = set(JobCreate.model_fields) - _NOT_STORED | {"model", "response_format"}
    assert body_fields <= GenerationRequest.fields()
    # the adapter comes from `model`; the embedding fields from POST /v1/embeddings (web/openai_api/embed.py)
    assert GenerationRequest.fields() - body_fields == {"adapter", "embed", "dimensions", "encoding_format"}


def test_a_validated_body_round_trips_through_its_stored_form() -> None:
    body = {
        "messages": [{"role": "user", "content": "Errors should never"}],
        "max_new_tokens": 5,
        "temperature": 1,
        "stop": "\n",
        "n": 2,
        "logit_bias": {"7": -3},
        "ignore_eos": False,
        "priority": "high",
        "webhook": "https://example.com/hook",
    }
    req = parse_job(body, SETTINGS)
    stored = req.stored(model=False)
    assert stored == {
        "messages": [{"role": "user", "content": "Errors should never"}],
        "max_new_tokens": 5,
        "temperature": 1.0,
        "stop": ["\n"],
        "n": 2,
        "logit_bias": {"7": -3},
    }
    assert req.model == served_models(SETTINGS)[0].alias and "model" in req.stored()
    again = GenerationRequest.from_dict(json.loads(json.dumps(req.stored())), strict=True)
    assert again == req and isinstance(again.temperature, float)


def test_an_unknown_stored_key_raises_when_strict_and_is_ignored_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    raw = {"prompt": "Beautiful is", "max_new_tokens": 3, "webhook": "https://example.com", "best_of": 2}
    with pytest.raises(InvalidRequest, match="unknown fields: best_of, webhook") as err:
        GenerationRequest.from_dict(raw, strict=True)
    assert err.value.code == "invalid_request"
    assert GenerationRequest.from_dict({"prompt": "x"}, strict=True).prompt == "x"
    assert load_settings().generation.strict_requests  # the suite's stacks read stored requests strictly
    with caplog.at_level(logging.WARNING, logger="qwen_deploy.requests"):
        req = GenerationRequest.from_dict(raw)
    assert (req.prompt, req.max_new_tokens) == ("Beautiful is", 3)
    assert req.stored() == {"prompt": "Beautiful is", "max_new_tokens": 3}
    assert any("best_of" in r.getMessage() for r in caplog.records)


def test_a_claimed_request_that_does_not_parse_fails_alone() -> None:
    """The worker reads a claimed job's request through the same type: bad JSON or an unknown key is the
    job's invalid_request, never an exception out of the engine loop."""
    from worker.driver import parse_request

    assert parse_request(json.dumps({"prompt": "x", "n": 2}), True) == GenerationRequest(prompt="x", n=2)
    assert parse_request('{"prompt": "x", "nn": 2}', False) == GenerationRequest(prompt="x")
    for raw, why in (("{", "not JSON"), ("[1]", "not a JSON object"), ('{"prompt": "x", "nn": 2}', "nn")):
        found = parse_request(raw, True)
        assert isinstance(found, InvalidRequest) and why in str(found)
