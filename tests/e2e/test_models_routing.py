"""Several models in one deployment: two worker pools (the demo model and a tiny random Qwen2, each a real
Celery prefork worker on its own queues) on one redis-server, plus a configured model no worker serves.

Jobs, OpenAI routes and batches reach the worker of the model they name and return that model's
one-at-a-time greedy text; /v1/models lists every model with its workers; an unknown model is a 404; the
unserved model takes a few jobs, then answers 503 model_unavailable, and /readyz?model= says why. On the fp32
model, echoed prompt logprobs equal an in-process forward."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch

from qwen_deploy.client import APIError, Client
from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until
from tests.unit.test_handler import make_handler
from worker.handler import GenerationRequest, ModelHandler
from worker.random_model import build_random_model

CAP = 3  # limits.max_queued_unserved
PROMPTS = ["Beautiful is better than", "Errors should never", "Simple is better than"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    return build_random_model("qwen2", "tiny", tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir=demo_model)


@pytest.fixture(scope="module")
def pools(stack_factory: StackFactory, demo_model: Path, tiny_model: Path) -> Stack:
    models = [
        {"alias": "demo", "name_or_path": str(demo_model), "threads": 1},
        {"alias": "tiny", "name_or_path": str(tiny_model), "threads": 1, "dtype": "fp32"},
        {"alias": "ghost", "name_or_path": str(tiny_model), "threads": 1},
    ]  # configured, never started; the random model in fp32, where batching never changes its near-tied argmax
    stack = stack_factory({"models": models, "limits": {"max_queued_unserved": CAP}}, name="pools")
    stack.start_model_worker("demo")
    stack.start_model_worker("tiny")
    stack.start_web()
    stack.wait_model_ready("demo")
    stack.wait_model_ready("tiny")
    return stack


@pytest.fixture(scope="module")
def local(demo_model: Path, tiny_model: Path) -> dict[str, ModelHandler]:
    """Each model in this process, one request at a time: the reference texts."""
    return {"demo": make_handler(str(demo_model)), "tiny": make_handler(str(tiny_model), dtype="fp32")}


def alone(local: dict[str, ModelHandler], alias: str, body: dict[str, Any]) -> str:
    return local[alias].generate(GenerationRequest.from_dict(body)).text


def worker_alias(stack: Stack) -> dict[str, str]:
    """Worker process name (host:pid, as a job's record names it) → the alias it serves."""
    return {w["name"]: w["alias"] for w in stack.workers()}


def test_jobs_run_on_the_worker_of_their_model(pools: Stack, local: dict[str, ModelHandler]) -> None:
    client = Client(pools.url, timeout=60)
    bodies = [
        {"prompt": p, "max_new_tokens": 8, "ignore_eos": True, "model": m} for p in PROMPTS for m in ("demo", "tiny")
    ]
    bodies.append({"prompt": PROMPTS[0], "max_new_tokens": 8, "ignore_eos": True})  # no model: the default
    with ThreadPoolExecutor(len(bodies)) as pool:
        jobs = list(pool.map(lambda b: client.generate(**b), bodies))
    owners = worker_alias(pools)
    for body, job in zip(bodies, jobs):
        alias = body.get("model", "demo")
        assert job["status"] == "succeeded" and job["model"] == alias, job
        assert job["queue"] == ("interactive" if alias == "demo" else "interactive.tiny")
        assert owners[pools.record(job["id"])["worker"]] == alias
        assert job["output"]["text"] == alone(local, alias, body), (alias, body["prompt"])
    assert jobs[0]["output"]["text"] != jobs[1]["output"]["text"]  # the two models do differ


def test_openai_sdk_lists_every_model_and_routes_by_model(pools: Stack, local: dict[str, ModelHandler]) -> None:
    oai = openai.OpenAI(base_url=pools.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in oai.models.list().data] == ["demo", "tiny", "ghost"]
    listed = {m["id"]: m for m in requests.get(pools.url + "/v1/models", timeout=10).json()["data"]}
    assert {k: (v["workers"], v["ready"], v["reason"]) for k, v in listed.items()} == {
        "demo": (1, True, None),
        "tiny": (1, True, None),
        "ghost": (0, False, "no_worker"),
    }
    assert oai.models.retrieve("tiny").id == "tiny"
    messages = [{"role": "user", "content": "Errors should never"}]
    chat = oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    assert chat.model == "tiny"
    assert chat.choices[0].message.content == alone(
        local, "tiny", {"messages": messages, "max_new_tokens": 6, "ignore_eos": True}
    )
    assert worker_alias(pools)[pools.record("job_" + chat.id.removeprefix("chatcmpl-"))["worker"]] == "tiny"
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="nope", messages=messages)  # type: ignore[arg-type]
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_unknown_model_is_a_404(pools: Stack) -> None:
    with pytest.raises(APIError) as err:
        Client(pools.url).submit("x", model="nope")
    assert (err.value.status, err.value.code, err.value.param) == (404, "model_not_found", "model")


def test_an_idempotency_key_is_bound_to_the_model(pools: Stack) -> None:
    client = Client(pools.url)
    first = client.submit("x", model="tiny", max_new_tokens=2, idempotency_key="same-key")
    assert client.submit("x", model="tiny", max_new_tokens=2, idempotency_key="same-key")["id"] == first["id"]
    with pytest.raises(APIError) as err:
        client.submit("x", model="demo", max_new_tokens=2, idempotency_key="same-key")
    assert err.value.code == "idempotency_key_reused"


def test_a_batch_runs_on_its_model(pools: Stack, local: dict[str, ModelHandler]) -> None:
    client = Client(pools.url, timeout=60)
    lines = [
        {"custom_id": f"r{i}", "body": {"prompt": p, "max_new_tokens": 5, "ignore_eos": True, "model": "tiny"}}
        for i, p in enumerate(PROMPTS)
    ]
    lines.append({"custom_id": "other", "body": {"prompt": "x", "model": "demo"}})
    batch = client.create_batch(lines)
    assert batch["model"] == "tiny"
    wait_until(lambda: client.batch(batch["id"])["status"] == "completed", 60, 0.2, "the batch")
    results = {r["custom_id"]: r for r in client.batch_results(batch["id"])}
    assert results["other"]["error"]["code"] == "mixed_models"
    for line in lines[:-1]:
        body = line["body"]
        assert results[line["custom_id"]]["response"]["body"]["output"]["text"] == alone(local, "tiny", body)


def test_an_unserved_model_takes_a_few_jobs_then_503(pools: Stack) -> None:
    client = Client(pools.url)
    ready = requests.get(pools.url + "/readyz", params={"model": "ghost"}, timeout=10)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "no_worker"
    assert "ghost" in ready.json()["error"]["message"]
    assert requests.get(pools.url + "/readyz", params={"model": "tiny"}, timeout=10).json()["alias"] == "tiny"
    assert requests.get(pools.url + "/readyz", params={"model": "nope"}, timeout=10).status_code == 404
    queued = [client.submit("x", model="ghost", max_new_tokens=2) for _ in range(CAP)]
    assert all(j["status"] == "queued" and j["queue"] == "interactive.ghost" for j in queued)
    refused = requests.post(pools.url + "/v1/jobs", json={"prompt": "x", "model": "ghost"}, timeout=10)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    assert int(refused.headers["Retry-After"]) > 0
    metrics = requests.get(pools.url + "/metrics", timeout=10).text
    assert f'qwen_deploy_model_queue_depth{{model="ghost",part="interactive"}} {CAP}.0' in metrics
    assert client.submit("x", model="tiny", max_new_tokens=2)["status"] in ("queued", "running")  # others go on
    for job in queued:  # nothing serves them: cancel (a queued job's cancel is final at once)
        assert client.cancel(job["id"])["status"] == "canceled"
    assert pools.redis.zcard(f"{pools.settings.key_prefix}:pending:interactive:ghost") == 0
    assert client.submit("x", model="ghost", max_new_tokens=2)["status"] == "queued"  # room again


def reference_logprobs(handler: ModelHandler, ids: list[int]) -> tuple[list[float], list[float]]:
    """log p(ids[i] | ids[:i]) for i >= 1, then the log probability of the greedy next token; and the most
    likely token's log probability at each of those positions: one forward of the model alone in this process
    (`log_softmax` of its logits)."""
    with torch.no_grad():
        lp = torch.log_softmax(handler.model(torch.tensor([ids])).logits[0].float(), dim=-1)
    best = lp.max(-1).values.tolist()
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))] + [best[-1]], best


def test_echo_logprobs_equal_an_in_process_forward(pools: Stack, local: dict[str, ModelHandler]) -> None:
    """What lm-evaluation-harness sends for a multiple-choice task (token-id prompts of different lengths in one
    request, echo, logprobs 1, max_tokens 1) scores every prompt token as a forward of the fp32 model alone does,
    through the OpenAI route and through a batch of /v1/jobs lines (max_new_tokens 0: scores only)."""
    tok = local["tiny"].tokenizer
    ids = [tok(p)["input_ids"] for p in ("Beautiful is better than ugly.", "Errors should never pass silently.")]
    ids.append(ids[0][:3])
    assert len({len(i) for i in ids}) == 3  # left padding in the engine's prefill
    want = [reference_logprobs(local["tiny"], i) for i in ids]
    oai = openai.OpenAI(base_url=pools.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    done = oai.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    for choice, prompt, (expected, best) in zip(done.choices, ids, want):
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + 1
        assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        assert [max(top.values()) for top in lp.top_logprobs[1:]] == pytest.approx(best, abs=1e-4)
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy, as lm-eval checks
    client = Client(pools.url, timeout=60)
    body = {"max_new_tokens": 0, "echo": True, "logprobs": True, "model": "tiny"}
    batch = client.create_batch([{"custom_id": f"r{i}", "body": {"prompt": p, **body}} for i, p in enumerate(ids)])
    wait_until(lambda: client.batch(batch["id"])["status"] == "completed", 60, 0.2, "the batch")
    results = {r["custom_id"]: r["response"]["body"]["output"] for r in client.batch_results(batch["id"])}
    for i, (expected, _) in enumerate(want):
        choice = results[f"r{i}"]["choices"][0]
        assert choice["text"] == "" and choice["echo"] == tok.decode(ids[i])
        scores = [t["logprob"] for t in choice["prompt_logprobs"]]
        assert scores[0] is None and scores[1:] == pytest.approx(expected[:-1], abs=1e-4)
