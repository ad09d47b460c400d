"""/openapi.json describes every route the app serves, and the OpenAI bodies it documents are the ones the
routes accept."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from pydantic import BaseModel

from qwen_deploy.config import load_settings
from web import create_app
from web.openai_api import bodies, embed, responses, translate
from web.openapi import openapi_path

# Routes that are not part of the API: the document itself, its viewers, and the console's static files.
NOT_API = {"/openapi.json", "/docs", "/docs/openapi.json", "/docs/redoc/", "/docs/scalar/", "/docs/swagger/"}
NOT_API_PREFIXES = ("/static/",)


@pytest.fixture(scope="module")
def app() -> Flask:
    return create_app(load_settings(overrides={"redis_url": "redis://127.0.0.1:1/0"}))


@pytest.fixture(scope="module")
def document(app: Flask) -> dict[str, Any]:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def served_operations(app: Flask) -> dict[tuple[str, str], str]:
    """(method, OpenAPI path) → "METHOD rule (endpoint)" of every API route of `app`."""
    found = {}
    for rule in app.url_map.iter_rules():
        path = openapi_path(rule.rule)
        if path in NOT_API or path.startswith(NOT_API_PREFIXES):
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            found[(method.lower(), path)] = f"{method} {rule.rule} ({rule.endpoint})"
    return found


def undocumented(app: Flask, document: dict[str, Any]) -> list[str]:
    return sorted(
        name for (method, path), name in served_operations(app).items() if method not in document["paths"].get(path, {})
    )


def test_every_route_and_method_is_documented(app: Flask, document: dict[str, Any]) -> None:
    missing = undocumented(app, document)
    assert not missing, "routes missing from /openapi.json (decorate them with web.openapi.doc): " + ", ".join(missing)
    served = set(served_operations(app))
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops}
    assert documented == served  # and nothing is documented that is not served
    assert {
        ("post", "/v1/chat/completions"),
        ("get", "/metrics"),
        ("get", "/"),
        ("delete", "/v1/files/{file_id}"),
    } <= served
    assert len(served) >= 38


def test_an_undocumented_route_is_named_in_the_failure(app: Flask, document: dict[str, Any]) -> None:
    extra = create_app(load_settings(overrides={"redis_url": "redis://127.0.0.1:1/0"}))
    extra.add_url_rule("/v1/undocumented", "undocumented_route", lambda: "", methods=["POST"])
    assert undocumented(extra, document) == ["POST /v1/undocumented (undocumented_route)"]


def _schema(document: dict[str, Any], name: str) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    found = [k for k in schemas if k.split(".")[0] == name and k.count(".") <= 1]  # not its nested models
    assert len(found) == 1, (name, found)
    return schemas[found[0]]


def _content(document: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    return document["paths"][path][method]["responses"]["200"]["content"]


def test_openai_routes_document_their_bodies_streams_and_answers(document: dict[str, Any]) -> None:
    chat = document["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    assert body.split(".")[0] == "ChatCompletionCreate"
    assert set(_content(document, "/v1/chat/completions", "post")) == {"application/json", "text/event-stream"}
    assert {"500", "504"} <= set(chat["responses"])
    assert set(_content(document, "/v1/responses", "post")) == {"application/json", "text/event-stream"}
    upload = document["paths"]["/v1/files"]["post"]["requestBody"]["content"]
    assert list(upload) == ["multipart/form-data"]
    assert set(_content(document, "/v1/files/{file_id}/content")) == {"application/jsonl", "application/octet-stream"}
    assert list(_content(document, "/metrics")) == ["text/plain"]
    assert list(_content(document, "/")) == ["text/html"]
    assert _schema(document, "ChatCompletion")["properties"]["object"]["const"] == "chat.completion"
    assert _schema(document, "ModelList")["required"] == ["object", "data"]
    # the sampling parameters are the job's own fields: same bounds
    assert (
        _schema(document, "ChatCompletionCreate")["properties"]["n"]
        == _schema(document, "JobCreate")["properties"]["n"]
    )


def test_token_caps_follow_the_settings_on_every_route() -> None:
    settings = load_settings(
        overrides={
            "redis_url": "redis://127.0.0.1:1/0",
            "generation": {"max_new_tokens_cap": 100, "default_max_new_tokens": 10},
        }
    )
    doc = create_app(settings).test_client().get("/openapi.json").get_json()
    for model, name in [
        ("ChatCompletionCreate", "max_tokens"),
        ("ChatCompletionCreate", "max_completion_tokens"),
        ("CompletionCreate", "max_tokens"),
        ("ResponseCreate", "max_output_tokens"),
        ("AnthropicMessageCreate", "max_tokens"),
    ]:
        prop = _schema(doc, model)["properties"][name]
        maxima = {b["maximum"] for b in [prop, *prop.get("anyOf", [])] if "maximum" in b}
        assert maxima == {100}, (model, name, prop)
        assert "512" not in prop["description"] and "100" in prop["description"], (model, name)


@pytest.mark.parametrize(
    ("model", "keys"),
    [
        (bodies.ChatCompletionCreate, translate.CHAT_KEYS),
        (bodies.CompletionCreate, translate.COMPLETION_KEYS),
        (bodies.ResponseCreate, responses.KEYS),
        (embed.EmbeddingCreate, embed.KEYS),
    ],
)
def test_documented_bodies_name_exactly_the_accepted_keys(model: type[BaseModel], keys: frozenset[str]) -> None:
    assert set(model.model_fields) == set(keys)


def test_a_documented_body_passes_its_route_and_an_undocumented_key_is_refused() -> None:
    settings = load_settings(overrides={"redis_url": "redis://127.0.0.1:1/0"})
    body = {
        "model": translate.model_id(settings),
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}],
        "max_completion_tokens": 5,
        "stop": ["\n"],
        "n": 2,
        "stream": False,
    }
    bodies.ChatCompletionCreate.model_validate(body)
    job = translate.chat_request(body, settings)
    assert (job.max_new_tokens, job.n, (job.messages or [{}])[0]["role"]) == (5, 2, "system")
    with pytest.raises(Exception, match="functions"):
        bodies.ChatCompletionCreate.model_validate({**body, "functions": []})  # the legacy form, not taken
    with pytest.raises(Exception, match="functions"):
        translate.chat_request({**body, "functions": []}, settings)
