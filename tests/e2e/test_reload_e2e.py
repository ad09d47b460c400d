"""A served model rolled to new weights through `POST /v1/models/{id}/reload`, on one stack with two workers of a
random Qwen2 model and API keys: the route's checks (admin only, paths under models_root, a model directory of
the same architecture), a reload under load that loses no job, each job's greedy tokens those of the weights
that made them (a job handed back mid-way: its tokens so far, then the new weights' continuation), and a
checkpoint that fails to load leaving the reloaded weights serving."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from qwen_deploy.config import load_settings
from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until
from tests.unit.test_engine import greedy_ids, tiny
from worker.handler import ModelHandler

KEY, ADMIN = "sk-user-reload-0001", "sk-admin-reload-0001"
PROMPTS = ["The Zen of Python, by Tim Peters. Beautiful is better than", "Errors should never pass"]
TOKENS = 256  # long enough that the first jobs are still generating when a worker takes its turn
ENDED = ("succeeded", "failed", "canceled", "timed_out")


def variant(src: Path, out: Path, seed: int) -> Path:
    """`src`'s model with its weights moved by noise, saved without a tokenizer (the served one is kept)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return out


def handler_for(path: Path, tokenizer: Path) -> ModelHandler:
    overrides = {"model": {"name_or_path": str(path), "threads": 1, "dtype": "fp32", "device": "cpu"}}
    h = ModelHandler(load_settings(environ={"QWEN_DEPLOY_ENV_FILE": "none.env"}, overrides=overrides), str(tokenizer))
    h.setup()
    return h


def greedy(h: ModelHandler, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of `ids` by `n` tokens (EOS ignored)."""
    return list(_greedy(h, tuple(ids), n))


@functools.cache
def _greedy(h: ModelHandler, ids: tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(greedy_ids(h, list(ids), n))


@pytest.fixture(scope="module")
def setup(stack_factory: StackFactory, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reload-models")
    v1 = tiny("qwen2", root / "v1", demo_model, layers=4)
    stack = stack_factory(
        {
            "paths": {"models_root": str(root), "checkpoints_root": str(root)},
            "model": {"dtype": "fp32"},
            "engine": {"max_batch": 2, "reload_drain_seconds": 0},
            "web": {"api_keys": [KEY], "admin_keys": [ADMIN]},
        },
        model=v1,
        name="reload",
    )
    stack.start_worker(wait=False)
    stack.others.append(stack.deployment.start_worker(None, "gen-second", "worker-second", "INFO"))
    stack.start_web()
    v2 = variant(v1, root / "v2", seed=2)
    tiny("llama", root / "llama", demo_model)
    shutil.copytree(v2, root / "broken")
    weights = root / "broken" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # its header intact, its data cut
    handlers = {"v1": handler_for(v1, v1), "v2": handler_for(v2, v1)}
    wait_until(lambda: len([w for w in stack.workers() if w["state"] == "ready"]) == 2, 90, 0.1, "two ready workers")
    return {"stack": stack, "root": root, "handlers": handlers}


def call(stack: Stack, method: str, path: str, key: str = ADMIN, **kwargs: Any) -> requests.Response:
    return requests.request(method, stack.url + path, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs)


def body(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "max_new_tokens": TOKENS, "ignore_eos": True, "return_token_ids": True}


def submit(stack: Stack, prompt: str) -> str:
    created = call(stack, "POST", "/v1/jobs", KEY, json=body(prompt))
    assert created.status_code == 202, created.text
    return str(created.json()["id"])


def job(stack: Stack, job_id: str) -> dict[str, Any]:
    return call(stack, "GET", f"/v1/jobs/{job_id}", KEY).json()


def reload_to(stack: Stack, model: str, path: str, during: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Reload `model` to `path` and wait for the reload to end; `during` runs once a worker has taken its turn."""
    started = call(stack, "POST", f"/v1/models/{model}/reload", json={"path": path})
    assert started.status_code == 202, started.text
    assert started.json()["status"] in ("queued", "running") and started.json()["path"] == path
    if during is not None:
        url = f"/v1/models/{model}/reload"
        wait_until(lambda: {w["state"] for w in call(stack, "GET", url).json()["workers"]} != {"waiting"}, 30, 0.01)
        during()
    return wait_until(
        lambda: (r := call(stack, "GET", f"/v1/models/{model}/reload").json())["status"] in ENDED and r,
        60,
        0.05,
        "the reload",
    )


def served(stack: Stack, model: str) -> list[tuple[str, str | None]]:
    revisions = call(stack, "GET", f"/v1/models/{model}", KEY).json()["revisions"]
    return sorted((Path(r["path"]).name, r["reload"]) for r in revisions)


def made_by(old: ModelHandler, new: ModelHandler, prompt_ids: list[int], ids: list[int]) -> str:
    """Which weights made `ids`: "old" or "new" alone, or "old->new@k": the old weights' first k tokens, then the
    new weights' continuation."""
    before = greedy(old, prompt_ids, TOKENS)
    if ids == before:
        return "old"
    same = next((i for i, (a, b) in enumerate(zip(ids, before)) if a != b), len(ids))
    for k in range(same, -1, -1):  # the hand-back came after k tokens (a new token may equal the old one)
        if ids == before[:k] + greedy(new, prompt_ids + before[:k], TOKENS - k):
            return "new" if k == 0 else f"old->new@{k}"
    return "neither"


def under_load(
    stack: Stack, model: str, path: str, old: ModelHandler, new: ModelHandler, during: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Reload `model` to `path` while jobs run and wait, then submit more: every job succeeds and its tokens are
    those of the weights that made them. The kinds of job ("old", "new", "old->new@k") and the reload record."""
    before = [submit(stack, PROMPTS[i % 2]) for i in range(12)]  # 2 run per worker, the rest wait
    wait_until(lambda: job(stack, before[0])["progress"]["tokens"] > 0, 30, 0.01, "a job generating")
    record = reload_to(stack, model, path, during)
    assert record["status"] == "succeeded", record
    assert {w["state"] for w in record["workers"]} == {"succeeded"}
    after = [submit(stack, p) for p in PROMPTS]
    wait_until(lambda: all(job(stack, j)["status"] in ENDED for j in before + after), 120, 0.1, "every job")
    done = {j: job(stack, j) for j in before + after}
    assert [d["status"] for d in done.values()] == ["succeeded"] * len(done)  # none lost, none failed
    kinds = {}
    for job_id, d in done.items():
        choice = d["output"]["choices"][0]
        kinds[job_id] = made_by(old, new, choice["prompt_token_ids"], choice["token_ids"])
        assert d["output"]["text"] == old.decode(choice["token_ids"])
        if kinds[job_id].startswith("old->"):  # handed back mid-way: resumed from its streamed tokens
            assert d["attempts"] >= 2, d
    assert "neither" not in kinds.values(), kinds
    assert [kinds[j] for j in after] == ["new", "new"], kinds  # submitted after the reload
    assert kinds[before[0]] != "new", kinds  # it was generating when the reload came
    handed = sum(w.get("handed_back") or 0 for w in record["workers"])
    resumed = [j for j in before if done[j]["attempts"] >= 2]
    assert handed >= 1 and len(resumed) >= 1, (record, kinds)  # running jobs were handed back (no drain time)
    return {"kinds": kinds, "record": record, "before": before, "resumed": resumed}


def test_reload_checks(setup: dict[str, Any]) -> None:
    stack = setup["stack"]
    model = call(stack, "GET", "/v1/models", KEY).json()["data"][0]["id"]
    denied = call(stack, "POST", f"/v1/models/{model}/reload", KEY, json={"path": "v2"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
    missing = call(stack, "POST", "/v1/models/nope/reload", json={"path": "v2"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    for path, code, words in [
        ("../outside", "path_outside_root", "inside its root"),
        ("absent", "path_not_found", "does not exist"),
        ("v1/config.json", "invalid_checkpoint", "not a directory"),
        ("llama", "invalid_checkpoint", "LlamaForCausalLM"),
    ]:
        got = call(stack, "POST", f"/v1/models/{model}/reload", json={"path": path})
        assert got.status_code == 422 and got.json()["error"]["code"] == code, (path, got.text)
        assert words in got.json()["error"]["message"], got.text
    bad = call(stack, "POST", f"/v1/models/{model}/reload", json={"path": "v2", "extra": 1})
    assert bad.status_code == 422
    assert call(stack, "GET", f"/v1/models/{model}/reload", KEY).status_code == 404  # never reloaded
    assert served(stack, model) == [("v1", None), ("v1", None)]


def test_reload_under_load_then_a_failing_checkpoint(setup: dict[str, Any]) -> None:
    stack, v1, v2 = setup["stack"], setup["handlers"]["v1"], setup["handlers"]["v2"]
    model = call(stack, "GET", "/v1/models", KEY).json()["data"][0]["id"]
    # two workers, one at a time: a job handed back by the first may resume on the second, still on v1
    first = under_load(stack, model, "v2", v1, v2)
    rolled = first["record"]["id"]
    assert served(stack, model) == [("v2", rolled), ("v2", rolled)]
    busy = call(stack, "POST", f"/v1/models/{model}/reload", json={"path": "v1"})
    assert busy.status_code == 202
    again = call(stack, "POST", f"/v1/models/{model}/reload", json={"path": "v1"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "reload_in_progress"
    wait_until(lambda: call(stack, "GET", f"/v1/models/{model}/reload").json()["status"] == "succeeded", 60, 0.05)
    assert [p for p, _ in served(stack, model)] == ["v1", "v1"]

    # one worker: what it hands back waits for its new weights, and resumes on them from its streamed tokens
    second = stack.others.pop()
    os.killpg(second.pid, signal.SIGTERM)
    second.wait(60)
    wait_until(lambda: len(stack.workers()) == 1, 30, 0.1, "one worker left")
    batch: list[str] = []  # a micro-batch submitted during the turn: it waits for the load, never handed back
    lines = [{"custom_id": f"l{i}", "body": body(PROMPTS[i])} for i in range(2)]
    alone = under_load(
        stack,
        model,
        "v2",
        v1,
        v2,
        lambda: batch.append(call(stack, "POST", "/v1/batches", KEY, json={"requests": lines}).json()["id"]),
    )
    kinds = alone["kinds"]
    assert all(kinds[j] != "old" for j in alone["resumed"]), kinds  # resumed on the new weights
    started = [j for j in alone["before"] if kinds[j] == "old"]  # finished before the turn
    assert all(kinds[j] == "new" for j in alone["before"] if j not in started + alone["resumed"]), kinds
    rolled = alone["record"]["id"]
    url = f"/v1/batches/{batch[0]}"
    wait_until(lambda: call(stack, "GET", url, KEY).json()["status"] in ("completed", "failed"), 60, 0.05, "the batch")
    assert call(stack, "GET", url, KEY).json()["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    results = [json.loads(line) for line in call(stack, "GET", url + "/results", KEY).text.splitlines()]
    for result in results:
        choice = result["response"]["body"]["output"]["choices"][0]
        assert made_by(v1, v2, choice["prompt_token_ids"], choice["token_ids"]) == "new", result["custom_id"]

    # a checkpoint whose data cannot be read: the worker keeps v2 and the reload fails, saying why
    failed = reload_to(stack, model, "broken")
    assert failed["status"] == "failed" and failed["error"]["code"] == "reload_failed", failed
    assert "could not be loaded" in failed["error"]["message"]
    assert [w["state"] for w in failed["workers"]] == ["failed"]
    assert served(stack, model) == [("v2", rolled)]
    after = submit(stack, PROMPTS[0])
    wait_until(lambda: job(stack, after)["status"] in ENDED, 60, 0.05, "a job after the failed reload")
    choice = job(stack, after)["output"]["choices"][0]
    assert made_by(v1, v2, choice["prompt_token_ids"], choice["token_ids"]) == "new"

    # a replacement child (the worker's child killed) loads the weights the model was rolled to, not the configured
    [child] = [w["pid"] for w in stack.workers()]
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: [w["pid"] for w in stack.workers() if w["state"] == "ready"] not in ([], [child]), 60, 0.1)
    wait_until(lambda: len(stack.workers()) == 1, 30, 0.1, "the killed child's record to lapse")
    assert served(stack, model) == [("v2", rolled)]
