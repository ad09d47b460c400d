"""Several models in one deployment: three worker pools (the demo model, a tiny random Qwen2, and the same
random model served with `task: embed`, each a real Celery prefork worker on its own queues) on one redis-server,
plus a configured model no worker serves.

Jobs, OpenAI routes and batches reach the worker of the model they name and return that model's
one-at-a-time greedy text; /v1/models lists every model with its workers; an unknown model is a 404; the
unserved model takes a few jobs, then answers 503 model_unavailable, and /readyz?model= says why. On the fp32
model, echoed prompt logprobs equal an in-process forward."""

from __future__ import annotations

import base64
import functools
import json
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
from transformers import AutoModel, AutoTokenizer

from qwen_deploy.client import APIError, Client
from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until
from tests.unit.test_handler import make_handler
from worker.handler import GenerationRequest, ModelHandler
from worker.random_model import build_random_model

CAP = 3  # limits.max_queued_unserved
EMBED_DIMENSIONS = [16, 32]  # the embed model's models[].embed_dimensions (its vectors have 64)
PROMPTS = ["Beautiful is better than", "Errors should never", "Simple is better than"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    return build_random_model("qwen2", "tiny", tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir=demo_model)


@pytest.fixture(scope="module")
def pools(stack_factory: StackFactory, demo_model: Path, tiny_model: Path) -> Stack:
    embed = {"task": "embed", "embed_dimensions": EMBED_DIMENSIONS}
    models: list[dict[str, Any]] = [
        {"alias": "demo", "name_or_path": str(demo_model), "threads": 1},
        {"alias": "tiny", "name_or_path": str(tiny_model), "threads": 1, "dtype": "fp32"},
        {"alias": "ghost", "name_or_path": str(tiny_model), "threads": 1},  # configured, never started
        {"alias": "embed", "name_or_path": str(tiny_model), "threads": 1, "dtype": "fp32", **embed},
    ]  # the random model in fp32, where batching never changes its near-tied argmax
    stack = stack_factory({"models": models, "limits": {"max_queued_unserved": CAP}}, name="pools")
    stack.start_model_worker("demo")
    stack.start_model_worker("tiny")
    stack.start_model_worker("embed")
    stack.start_web()
    for alias in ("demo", "tiny", "embed"):
        stack.wait_model_ready(alias)
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
    assert [m.id for m in oai.models.list().data] == ["demo", "tiny", "ghost", "embed"]
    listed = {m["id"]: m for m in requests.get(pools.url + "/v1/models", timeout=10).json()["data"]}
    assert {k: (v["workers"], v["ready"], v["reason"], v["task"]) for k, v in listed.items()} == {
        "demo": (1, True, None, "generate"),
        "tiny": (1, True, None, "generate"),
        "ghost": (0, False, "no_worker", "generate"),
        "embed": (1, True, None, "embed"),
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


def reference_vector(tiny_model: Path, ids: list[int]) -> torch.Tensor:
    """The documented pooling, by hand: the fp32 base model alone in this process on one unpadded input, its last
    token's hidden state, L2-normalized (the tiny model has no sentence-transformers files)."""
    model = _base_model(tiny_model)
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0, -1].float()
    return hidden / hidden.norm()


@functools.cache
def _base_model(path: Path) -> Any:
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def test_openai_sdk_embeddings_equal_an_in_process_forward(pools: Stack, tiny_model: Path) -> None:
    """Texts of different lengths in one request (left padding in one batched forward), in order; the SDK's
    default base64, floats, token ids, Matryoshka dimensions, and OpenAI's usage."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["Beautiful is better than ugly.", "Errors", "Errors should never pass silently.", "Now is better"]
    ids = [tok(t)["input_ids"] for t in texts]
    want = [reference_vector(tiny_model, i) for i in ids]
    oai = openai.OpenAI(base_url=pools.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    for extra in ({}, {"encoding_format": "float"}):  # the SDK asks for base64 and decodes it unless told otherwise
        answer = oai.embeddings.create(model="embed", input=texts, **extra)  # type: ignore[arg-type]
        assert [d.index for d in answer.data] == [0, 1, 2, 3] and answer.model == "embed"
        for data, expected in zip(answer.data, want, strict=True):
            assert torch.tensor(data.embedding) == pytest.approx(expected, abs=1e-5)
        assert answer.usage.prompt_tokens == answer.usage.total_tokens == sum(map(len, ids))
    raw = requests.post(
        pools.url + "/v1/embeddings",
        json={"model": "embed", "input": texts[0], "encoding_format": "base64"},
        timeout=60,
    ).json()
    packed = base64.b64decode(raw["data"][0]["embedding"])
    assert torch.tensor(struct.unpack("<64f", packed)) == pytest.approx(want[0], abs=1e-5)  # little-endian float32
    by_ids = oai.embeddings.create(model="embed", input=[ids[2], ids[0]])
    assert torch.tensor(by_ids.data[0].embedding) == pytest.approx(want[2], abs=1e-5)
    assert torch.tensor(by_ids.data[1].embedding) == pytest.approx(want[0], abs=1e-5)
    one = oai.embeddings.create(model="embed", input=ids[1], dimensions=16)  # one token-id list: one input
    short = want[1][:16] / want[1][:16].norm()
    assert len(one.data) == 1 and torch.tensor(one.data[0].embedding) == pytest.approx(short, abs=1e-5)


def test_embedding_and_generation_refuse_each_others_models_and_bad_input(pools: Stack) -> None:
    oai = openai.OpenAI(base_url=pools.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    cases: list[tuple[Callable[[], Any], str, str | None]] = [
        (lambda: oai.embeddings.create(model="tiny", input="x"), "wrong_model_task", "model"),
        (lambda: oai.completions.create(model="embed", prompt="x", max_tokens=2), "wrong_model_task", "model"),
        (lambda: oai.embeddings.create(model="embed", input=""), "invalid_value", "input"),
        (lambda: oai.embeddings.create(model="embed", input=[]), "invalid_value", "input"),
        (lambda: oai.embeddings.create(model="embed", input=["a", ""]), "invalid_value", "input.1"),
        (lambda: oai.embeddings.create(model="embed", input=[[1, 2], [-1]]), "invalid_value", "input.1"),
        (lambda: oai.embeddings.create(model="embed", input="x", dimensions=20), "invalid_value", "dimensions"),
        (lambda: oai.embeddings.create(model="embed", input=[5] * 2049), "invalid_prompt", "input"),  # 2048 max
        (lambda: oai.embeddings.create(model="embed", input=[10**6]), "invalid_prompt", "input"),  # vocabulary
        (
            lambda: oai.embeddings.create(model="embed", input="x", extra_body={"truncate": True}),
            "unsupported_parameter",
            "truncate",
        ),
    ]
    for call, code, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            call()
        assert (err.value.code, err.value.body["param"]) == (code, param), err.value.body  # type: ignore[index]
    job = requests.post(pools.url + "/v1/jobs", json={"prompt": "x", "model": "embed"}, timeout=10)
    assert job.status_code == 400 and job.json()["error"]["code"] == "wrong_model_task"
    counted = requests.post(pools.url + "/tokenize", json={"model": "embed", "prompt": "Errors"}, timeout=60)
    assert counted.status_code == 200 and counted.json()["count"] >= 1  # token counts work on an embed model


def test_a_batch_of_embedding_lines(pools: Stack, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    oai = openai.OpenAI(base_url=pools.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    inputs: list[Any] = [PROMPTS[0], PROMPTS[1:], tok(PROMPTS[2])["input_ids"]]
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "embed", "input": x}}
        for i, x in enumerate(inputs)
    ]
    lines.append({**lines[0], "custom_id": "generate", "body": {"model": "tiny", "input": "x"}})
    upload = oai.files.create(file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_until(lambda: oai.batches.retrieve(batch.id).status == "completed", 60, 0.2, "the batch")
    done = oai.batches.retrieve(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)  # type: ignore[union-attr]
    out = [json.loads(x) for x in oai.files.content(done.output_file_id).text.splitlines()]  # type: ignore[arg-type]
    bodies = {x["custom_id"]: x["response"]["body"] for x in out}
    texts = [[PROMPTS[0]], PROMPTS[1:], [PROMPTS[2]]]
    for i, group in enumerate(texts):
        body = bodies[f"r{i}"]
        assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(group)))
        for data, text in zip(body["data"], group, strict=True):
            want = reference_vector(tiny_model, tok(text)["input_ids"])
            assert torch.tensor(data["embedding"]) == pytest.approx(want, abs=1e-5)
    errors = [json.loads(x) for x in oai.files.content(done.error_file_id).text.splitlines()]  # type: ignore[arg-type]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("generate", "wrong_model_task")]
