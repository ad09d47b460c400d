"""Models registered at runtime (`POST /v1/register_model`, a merged export's `serve_as`): listed, routed to their
own queues, never shadowing a configured name, refused when the name is taken or the path is not a model, and
unregistered again; a worker configured for one finds its path (real redis-server, the web app in process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from qwen_deploy.connections import redis_client
from qwen_deploy.keys import queue_key, runtime_models_key
from qwen_deploy.runtime_models import find_runtime, runtime_models, worker_model
from qwen_deploy.served import all_generation_queues
from web import create_app


def settings_for(url: str, root: Path, **sections: Any) -> Any:
    overrides = {
        "paths": {"models_root": str(root), "checkpoints_root": str(root)},
        "limits": {"max_queued_unserved": 1000},  # no worker runs here: jobs wait
        **sections,
    }
    return load_settings(environ={"REDIS_URL": url, "QWEN_DEPLOY_ENV_FILE": "no.env"}, overrides=overrides)


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    for name in ("exported", "ckpt"):
        (tmp_path / name).mkdir()
    (tmp_path / "exported" / "config.json").write_text("{}")
    (tmp_path / "exported" / "model.safetensors").write_bytes(b"")
    (tmp_path / "not-a-model").mkdir()
    return tmp_path


@pytest.fixture()
def http(server: RedisServer, root: Path) -> Any:
    redis.Redis.from_url(server.url).flushdb()
    return create_app(settings_for(server.url, root, model={"name_or_path": "org/base-model"})).test_client()


def post(http: Any, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    got = http.post(path, json=body)
    return got.status_code, got.get_json()


def test_register_route_unregister(http: Any, server: RedisServer) -> None:
    assert post(http, "/v1/register_model", {"model_name": "trained", "model_path": "exported"}) == (
        200,
        {"id": "trained", "object": "model", "path": "exported", "status": "registered"},
    )
    models = http.get("/v1/models").get_json()["data"]
    assert [(m["id"], m["workers"], m["ready"]) for m in models] == [
        ("org/base-model", 0, False),
        ("trained", 0, False),
    ]
    assert http.get("/v1/models/trained").get_json()["id"] == "trained"

    # a job naming it waits on the model's own queue, under its own id
    status, job = post(http, "/v1/jobs", {"model": "trained", "prompt": "Hi", "max_new_tokens": 2})
    assert status == 202, job
    record = redis.Redis.from_url(server.url, decode_responses=True).hgetall(f"qd:job:{job['id']}")
    assert (record["queue"], record["model"]) == ("interactive.trained", "trained")
    status, batch = post(
        http, "/v1/batches", {"requests": [{"custom_id": "a", "body": {"model": "trained", "prompt": "Hi"}}]}
    )
    assert status == 202, batch
    assert redis.Redis.from_url(server.url).llen(queue_key("qd", "bulk.trained")) == 1

    # every name taken (registered, configured, an adapter's) is a 409 before any work
    for body in (
        {"model_name": "trained", "model_path": "exported"},
        {"model_name": "base-model", "model_path": "exported"},
    ):
        status, err = post(http, "/v1/register_model", body)
        assert (status, err["error"]["code"]) == (409, "model_exists"), err
    export = {"checkpoint": "ckpt", "base": "exported", "out": "new"}
    status, err = post(http, "/v1/models/exports", {**export, "serve_as": "trained"})
    assert (status, err["error"]["code"], err["error"]["param"]) == (409, "model_exists", "serve_as")
    status, err = post(http, "/v1/models/exports", {**export, "serve_as": "trained", "keep_lora": True})
    assert (status, err["error"]["code"]) == (409, "model_exists")
    status, err = post(http, "/v1/load_lora_adapter", {"lora_name": "trained", "lora_path": "exported"})
    assert (status, err["error"]["code"]) == (400, "adapter_exists")
    status, job = post(http, "/v1/models/exports", {**export, "serve_as": "fresh", "lora_alpha": 16})
    assert status == 202 and job["type"] == "export", job  # a merged export served as a new model

    # a path that is no model, or outside the root: a 422 that says why
    for path, code, words in [
        ("not-a-model", "invalid_model", "no config.json"),
        ("missing", "path_not_found", "does not exist"),
        ("../outside", "path_outside_root", "inside its root"),
    ]:
        status, err = post(http, "/v1/register_model", {"model_name": "other", "model_path": path})
        assert (status, err["error"]["code"]) == (422, code) and words in err["error"]["message"], err

    assert post(http, "/v1/unregister_model", {"model_name": "trained"})[1]["status"] == "unregistered"
    status, err = post(http, "/v1/jobs", {"model": "trained", "prompt": "Hi"})
    assert (status, err["error"]["code"]) == (404, "model_not_found")
    status, err = post(http, "/v1/unregister_model", {"model_name": "trained"})
    assert (status, err["error"]["code"]) == (404, "model_not_found")
    status, err = post(http, "/v1/unregister_model", {"model_name": "base-model"})
    assert status == 404, err  # a configured model is not unregistered


def test_a_worker_for_a_registered_model(server: RedisServer, root: Path) -> None:
    redis.Redis.from_url(server.url).flushdb()
    config = settings_for(server.url, root, model={"name_or_path": "org/base-model", "dtype": "fp32", "threads": 1})
    client = redis_client(config)
    record = {"path": str(root / "exported"), "registered_at": 0, "source": "export"}
    client.hset(runtime_models_key(config.key_prefix), mapping={"trained": json.dumps(record)})
    client.hset(runtime_models_key(config.key_prefix), mapping={"base-model": json.dumps(record)})  # shadowed
    assert [m.alias for m in runtime_models(client, config)] == ["trained"]
    assert find_runtime(client, config, "base-model") is None

    worker = config.model_copy(update={"worker": config.worker.model_copy(update={"model": "trained"})})
    assert {"interactive.trained", "bulk.trained"} <= all_generation_queues(worker)
    served = worker_model(worker, {"interactive.trained", "bulk.trained"}, client)
    assert (served.alias, served.default, served.queues) == ("trained", False, ("interactive.trained", "bulk.trained"))
    assert (served.model.name_or_path, served.model.dtype, served.model.threads) == (str(root / "exported"), "fp32", 1)
    unknown = config.model_copy(update={"worker": config.worker.model_copy(update={"model": "nothing"})})
    with pytest.raises(ValueError, match="no model is registered at runtime under that name"):
        worker_model(unknown, None, client)


def test_qwen_deploy_worker_for_a_registered_model_joins_up(
    server: RedisServer, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`qwen-deploy worker --model NAME`, in a shell without a Redis URL while `up` runs here: the worker joins
    up's Redis and serves the registered model on its own queues."""
    from qwen_deploy.cli import main, serve

    redis.Redis.from_url(server.url).flushdb()
    record = {"path": str(root / "exported"), "registered_at": 0, "source": "export"}
    redis.Redis.from_url(server.url).hset("qd:models:runtime", "trained", json.dumps(record))
    config = tmp_path / "config.yml"
    config.write_text(f"paths: {{models_root: {root}}}\n")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("QWEN_DEPLOY_CONFIG", str(config))
    monkeypatch.setenv("QWEN_DEPLOY_ENV_FILE", str(tmp_path / "no.env"))
    monkeypatch.setattr(serve, "read_state", lambda: {"redis_url": server.url, "pids": {}})
    started: list[tuple[list[str], dict[str, str]]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        started.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(serve.os, "execve", execve)
    with pytest.raises(SystemExit):
        main(["worker", "--model", "trained"])
    argv, env = started[0]
    assert (env["REDIS_URL"], env["QWEN_DEPLOY_WORKER__MODEL"]) == (server.url, "trained")
    assert "interactive.trained,bulk.trained" in argv and "gen-trained@%h" in " ".join(argv)
    with pytest.raises(SystemExit, match="nor registered at runtime"):
        main(["worker", "--model", "nothing"])
