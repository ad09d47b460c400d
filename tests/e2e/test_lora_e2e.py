"""LoRA adapters through the API, on one stack with two workers of a random Qwen2 base: a configured adapter
and one loaded at runtime (`/v1/load_lora_adapter`) are listed with their parent, every worker loads the runtime
one, jobs, streamed completions and n > 1 naming them equal PEFT's merged model, bad adapters are a 422 saying
why, and after `/v1/unload_lora_adapter` the name is a 404 and the workers drop it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from qwen_deploy.cli import main
from tests.conftest import StackFactory
from tests.e2e.test_cli import run_cli
from tests.helpers import Stack, wait_until
from tests.unit.test_engine import reference, tiny
from tests.unit.test_lora import make_adapter, merged
from worker.convert_job import run_export
from worker.handler import GenerationRequest

PROMPT = "The Zen of Python, by Tim Peters. Beautiful is better than"
TOKENS = 10


@pytest.fixture(scope="module")
def setup(stack_factory: StackFactory, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora-models")
    base = tiny("qwen2", root / "base", demo_model)
    stack = stack_factory(
        {
            "paths": {"models_root": str(root), "checkpoints_root": str(root)},
            "model": {"dtype": "fp32", "adapters": {"cfg": "cfg"}},  # loaded on first use: made below
            "engine": {"max_adapters": 2},
        },
        model=base,
        name="lora",
    )
    # the two workers and the web server start while the adapters and the expected texts are made
    stack.start_worker(wait=False)
    stack.others.append(stack.deployment.start_worker(None, "gen-second", "worker-second", "INFO"))
    stack.start_web()
    make_adapter(base, root / "cfg", 4, 8, False, ["q_proj", "v_proj"], seed=1)
    make_adapter(base, root / "live", 8, 16, True, ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"], seed=2)
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=TOKENS, ignore_eos=True)
    expected = {name: reference(merged(base, root / name), req) for name in ("cfg", "live")}
    wait_until(lambda: len([w for w in stack.workers() if w["state"] == "ready"]) == 2, 90, 0.1, "two ready workers")
    return {"stack": stack, "root": root, "expected": expected, "base": base}


def job_text(stack: Stack, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_new_tokens": TOKENS, "ignore_eos": True, **extra}
    created = requests.post(stack.url + "/v1/jobs", json=body, timeout=30)
    assert created.status_code == 202, created.text
    return stack.client().wait(created.json()["id"], timeout=60)


def adapters_of_workers(stack: Stack) -> list[list[str]]:
    return sorted(sorted(w.get("adapters") or []) for w in stack.workers() if w["state"] == "ready")


def test_load_generate_unload(setup: dict[str, Any]) -> None:
    stack, root, expected = setup["stack"], setup["root"], setup["expected"]
    models = requests.get(stack.url + "/v1/models", timeout=10).json()["data"]
    base_id = models[0]["id"]
    assert [(m["id"], m.get("parent")) for m in models] == [(base_id, None), ("cfg", base_id)]

    # bad adapters: a 422 that says why
    (root / "junk").mkdir()
    (root / "junk" / "adapter_config.json").write_text("{not json")
    shutil.copytree(root / "live", root / "other")
    config = json.loads((root / "other" / "adapter_config.json").read_text())
    (root / "other" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "llama-7b"}))
    for path, code, words in [
        ("junk", "invalid_adapter", "adapter_config.json cannot be read as JSON"),
        ("other", "invalid_adapter", "trained on 'llama-7b'"),
        ("missing", "path_not_found", "does not exist"),
        ("../outside", "path_outside_root", "inside its root"),
    ]:
        got = requests.post(stack.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path}, timeout=10)
        assert got.status_code == 422 and got.json()["error"]["code"] == code, (path, got.text)
        assert words in got.json()["error"]["message"]

    loaded = requests.post(
        stack.url + "/v1/load_lora_adapter", json={"lora_name": "live", "lora_path": "live"}, timeout=10
    )
    assert loaded.status_code == 200 and loaded.json()["parent"] == base_id, loaded.text
    again = requests.post(
        stack.url + "/v1/load_lora_adapter", json={"lora_name": "live", "lora_path": "live"}, timeout=10
    )
    assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"
    ids = [m["id"] for m in requests.get(stack.url + "/v1/models", timeout=10).json()["data"]]
    assert ids == [base_id, "cfg", "live"]
    assert requests.get(stack.url + "/v1/models/live", timeout=10).json()["parent"] == base_id
    # every worker loads it (idle workers in their heartbeat)
    wait_until(lambda: adapters_of_workers(stack) == [["live"], ["live"]], 30, 0.1, "both workers load the adapter")

    # jobs naming each adapter (and the base), n > 1, and a streamed OpenAI completion
    for name in ("live", "cfg"):
        done = job_text(stack, name)
        assert done["status"] == "succeeded" and done["output"]["text"] == expected[name], (name, done)
    samples = job_text(stack, "live", n=2)
    assert [c["text"] for c in samples["output"]["choices"]] == [expected["live"]] * 2
    assert job_text(stack, base_id)["output"]["text"] not in expected.values()
    import openai

    oai = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    chunks = oai.completions.create(
        model="live", prompt=PROMPT, max_tokens=TOKENS, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["live"]
    # a batch whose lines name two adapters and the base: one micro-batch, each line its own adapter
    api = stack.client()
    body = {"prompt": PROMPT, "max_new_tokens": TOKENS, "ignore_eos": True}
    names = {"l-live": "live", "l-cfg": "cfg", "l-base": base_id}
    created = api.create_batch([{"custom_id": cid, "body": {**body, "model": m}} for cid, m in names.items()])
    ended = ("completed", "failed", "cancelled", "expired")
    assert wait_until(lambda: api.batch(created["id"])["status"] in ended, 60, 0.1, "the batch")
    assert api.batch(created["id"])["status"] == "completed"
    texts = {o["custom_id"]: o["response"]["body"]["output"]["text"] for o in api.batch_results(created["id"])}
    assert texts == {"l-live": expected["live"], "l-cfg": expected["cfg"], "l-base": texts["l-base"]}
    assert texts["l-base"] not in expected.values()

    # unload: a 404 from then on, and the workers drop it
    gone = requests.post(stack.url + "/v1/unload_lora_adapter", json={"lora_name": "live"}, timeout=10)
    assert gone.status_code == 200, gone.text
    for url, body in [
        ("/v1/jobs", {"model": "live", "prompt": "x"}),
        ("/v1/completions", {"model": "live", "prompt": "x"}),
        ("/v1/unload_lora_adapter", {"lora_name": "live"}),
    ]:
        got = requests.post(stack.url + url, json=body, timeout=10)
        assert got.status_code == 404 and got.json()["error"]["code"] == "model_not_found", (url, got.text)
    configured = requests.post(stack.url + "/v1/unload_lora_adapter", json={"lora_name": "cfg"}, timeout=10)
    assert configured.status_code == 400 and configured.json()["error"]["code"] == "configured"
    wait_until(lambda: "live" not in sum(adapters_of_workers(stack), []), 30, 0.1, "the workers drop the adapter")

    # export --keep-lora --serve-as: the adapter checked, written unmerged under models_root and loaded
    argv = ["export", str(root / "live"), "--base", str(setup["base"]), "--out", str(root / "exported")]
    cli = run_cli([*argv, "--keep-lora", "--serve-as", "exported", "--url", stack.url], env=stack.env)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["served"] == {
        "id": "exported",
        "object": "model",
        "parent": base_id,
        "status": "loaded",
    }
    assert job_text(stack, "exported")["output"]["text"] == expected["live"]
    # the export job's keep_lora + serve_as (what the convert worker runs), and its checks
    req = {"checkpoint": "cfg", "base": "base", "out": "exported-job", "keep_lora": True, "serve_as": "by-job"}
    done = run_export(req, stack.settings, lambda progress: None)
    assert done["served"]["parent"] == base_id
    assert job_text(stack, "by-job")["output"]["text"] == expected["cfg"]
    for body, status, code in [
        ({"keep_lora": True, "serve_as": "cfg"}, 409, "model_exists"),
        ({"serve_as": "by-job"}, 409, "model_exists"),
        ({"keep_lora": True, "lora_alpha": 0}, 422, "invalid_value"),
    ]:
        got = requests.post(
            stack.url + "/v1/models/exports", json={"checkpoint": "cfg", "base": "base", "out": "o", **body}, timeout=10
        )
        assert got.status_code == status and got.json()["error"]["code"] == code, got.text


def verl_lora_checkpoint(base: Path, d: Path) -> Path:
    """A verl FSDP2 actor dir (2 gloo ranks) of a random PEFT LoRA (r 8, alpha 16) on `base`, with the
    adapter_config.json verl writes (lora_alpha 0); the same adapter saved by PEFT in `d/peft`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.unit.conversion.layouts import Tiny, verl_lora_dir

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    peft.save_pretrained(d / "peft")
    return verl_lora_dir(Tiny(False, base, None), peft, d / "verl" / "actor", 2, alpha=0)


def test_verl_lora_export_served_as_adapter_and_as_model(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A verl FSDP checkpoint with LoRA weights: kept unmerged and served as an adapter, merged and served as a new
    model (the export job; its worker started as a user starts it; the CLI's --serve-as); both answer the
    in-process merged model's greedy text."""
    stack, root, base = setup["stack"], setup["root"], setup["base"]
    verl_lora_checkpoint(base, root)
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=TOKENS, ignore_eos=True)
    expected = reference(merged(base, root / "peft"), req)
    base_id = requests.get(stack.url + "/v1/models", timeout=10).json()["data"][0]["id"]

    # the LoRA kept (verl writes lora_alpha 0: the alpha is stated) and served as an adapter, by the export job
    job = {"checkpoint": "verl", "base": "base", "out": "verl-adapter", "keep_lora": True, "lora_alpha": 16}
    report = run_export({**job, "serve_as": "verl-lora"}, stack.settings, lambda progress: None)
    assert (report["source"]["format"], report["source"]["world_size"], report["ranks"]) == ("verl-fsdp", 2, [8])
    assert report["checks"]["logits_match"]["with"] == "peft" and report["served"]["parent"] == base_id
    # merged and served as a new model; its worker started as a user starts it
    job = {"checkpoint": "verl", "base": "base", "out": "verl-merged", "lora_alpha": 16, "serve_as": "verl-merged"}
    done = run_export(job, stack.settings, lambda progress: None)
    assert done["checks"]["logits_match"]["ok"] and done["served"]["status"] == "registered"
    worker = stack.deployment.supervisor.start(
        "worker-verl-merged",
        [sys.executable, "-m", "qwen_deploy.cli", "worker", "--model", "verl-merged"],
        log=stack.log_path.parent / "worker-verl-merged.log",
    )
    stack.others.append(worker)
    assert job_text(stack, "verl-lora")["output"]["text"] == expected
    # the CLI: a taken name refused before any work; a merged export registered through the API
    argv = ["export", str(root / "verl"), "--base", str(base), "--url", stack.url, "--lora-alpha", "16"]
    taken = run_cli([*argv, "--out", str(root / "never"), "--serve-as", "verl-lora"], env=stack.env)
    assert taken.returncode != 0 and "already served" in taken.stderr and not (root / "never").exists()
    for key, value in stack.env.items():  # the export itself in this process: a new one would import torch again
        monkeypatch.setenv(key, value)
    assert main([*argv, "--out", str(root / "verl-merged-cli"), "--serve-as", "by-cli"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["served"]["status"] == "registered" and "--model by-cli" in err

    stack.wait_model_ready("verl-merged")
    assert job_text(stack, "verl-merged")["output"]["text"] == expected
    import openai

    oai = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    done = oai.completions.create(
        model="verl-merged", prompt=PROMPT, max_tokens=TOKENS, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].text == expected
    listed = {m["id"]: m for m in requests.get(stack.url + "/v1/models", timeout=10).json()["data"]}
    assert (listed["verl-merged"]["workers"], listed["verl-merged"]["ready"]) == (1, True)
    assert (listed["by-cli"]["workers"], listed["by-cli"]["ready"]) == (0, False)

    gone = requests.post(stack.url + "/v1/unregister_model", json={"model_name": "verl-merged"}, timeout=10)
    assert gone.status_code == 200, gone.text
    got = requests.post(stack.url + "/v1/jobs", json={"model": "verl-merged", "prompt": "x"}, timeout=10)
    assert got.status_code == 404 and got.json()["error"]["code"] == "model_not_found"
