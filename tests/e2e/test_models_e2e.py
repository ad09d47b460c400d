"""Downloads and exports as jobs on the convert queue; paths confined to the configured roots."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch

from qwen_deploy.client import Client
from tests.conftest import StackFactory
from tests.helpers import Stack
from tests.unit.conversion.test_download import COMMIT, Handler, Hub, Repo, tiny_files

pytestmark = pytest.mark.slow

TOKEN = "hf_TOPsecret_e2e_token"


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    state = Hub(repos={"org/tiny": Repo(COMMIT, tiny_files()), "org/gated": Repo(COMMIT, {}, 403, "GatedRepo")})
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.hub = state  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> dict[str, Path]:
    """models_root holds the demo model as a base; checkpoints_root a fine-tuned state dict of it."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("roots")
    models, ckpts = tmp / "models", tmp / "checkpoints"
    (ckpts / "run1").mkdir(parents=True)
    models.mkdir()
    shutil.copytree(demo_model, models / "demo")
    state = AutoModelForCausalLM.from_pretrained(demo_model).state_dict()
    state["model.norm.weight"] = state["model.norm.weight"] * 1.001  # a "trained" change
    torch.save(
        {"module": {f"module.{k}": v for k, v in state.items() if k != "lm_head.weight"}}, ckpts / "run1" / "model.pt"
    )
    (ckpts / "escape").symlink_to(tmp.parent, target_is_directory=True)
    return {"models": models, "checkpoints": ckpts, "tmp": tmp}


@pytest.fixture(scope="module")
def convert(roots: dict[str, Path], hub: Hub, stack_factory: StackFactory) -> Stack:
    paths = {"models_root": str(roots["models"]), "checkpoints_root": str(roots["checkpoints"])}
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(roots["tmp"] / "hub"), "HF_TOKEN": TOKEN}
    s = stack_factory({"paths": paths}, model=roots["models"] / "exported", env=env)
    s.start_convert_worker()
    s.start_web()
    return s


def post(stack: Stack, path: str, body: dict) -> requests.Response:
    return requests.post(stack.url + path, json=body, timeout=30)


def test_export_over_http_then_serve_the_exported_model(convert: Stack, roots: dict[str, Path]) -> None:
    answer = post(convert, "/v1/models/exports", {"checkpoint": "run1/model.pt", "base": "demo", "out": "exported"})
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["type"] == "export" and job["status"] == "queued"
    done = Client(convert.url).wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", done
    report = done["output"]
    assert report["checks"]["keys_match"]["ok"] and report["checks"]["differs_from_base"]["ok"]
    assert report["checks"]["logits_match"]["ok"] and report["checks"]["strict_reload"]["ok"]
    assert (roots["models"] / "exported" / "model.safetensors").exists()
    convert.start_worker()  # serves models_root/exported
    text = Client(convert.url).generate("Beautiful is better than", max_new_tokens=6)["output"]["text"]
    assert text.startswith(" ugly.")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"checkpoint": "../run1/model.pt", "base": "demo", "out": "x"}, "path_outside_root", "checkpoint"),
        ({"checkpoint": "/etc/passwd", "base": "demo", "out": "x"}, "path_outside_root", "checkpoint"),
        ({"checkpoint": "escape", "base": "demo", "out": "x"}, "path_outside_root", "checkpoint"),
        ({"checkpoint": "run1/model.pt", "base": "demo", "out": "../../x"}, "path_outside_root", "out"),
        ({"checkpoint": "run1/nothing.pt", "base": "demo", "out": "x"}, "path_not_found", "checkpoint"),
        ({"checkpoint": "run1/model.pt", "base": "demo", "out": "x", "dtype": "int4"}, "invalid_value", "dtype"),
    ],
)
def test_export_paths_are_confined(convert: Stack, body: dict, code: str, param: str) -> None:
    answer = post(convert, "/v1/models/exports", body)
    assert answer.status_code == 422
    assert (answer.json()["error"]["code"], answer.json()["error"]["param"]) == (code, param)


def test_download_over_http_and_errors(convert: Stack, hub: Hub) -> None:
    client = Client(convert.url)
    job = post(convert, "/v1/models/downloads", {"repo_id": "org/tiny"}).json()
    done = client.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["output"]["commit"] == COMMIT
    assert done["output"]["files"] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert done["progress"]["phase"] == "done"
    gated = client.wait(post(convert, "/v1/models/downloads", {"repo_id": "org/gated"}).json()["id"], timeout=60)
    assert gated["status"] == "failed" and gated["error"]["code"] == "gated"
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth, _ in hub.seen)
    logs = (convert.tmp / "convert-worker.log").read_text()
    assert TOKEN not in logs and TOKEN not in str(done) and TOKEN not in str(gated)
    bad = post(convert, "/v1/models/downloads", {"repo_id": "org/tiny", "out": "../outside"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "path_outside_root"
