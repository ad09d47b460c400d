"""n samples and logprobs through the OpenAI routes (need the generation engine that writes `output.choices`)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import requests
from transformers import AutoTokenizer

from tests.helpers import Stack

pytest.importorskip("worker.engine")
CHAT = [{"role": "user", "content": "Errors should never"}]


@pytest.fixture(scope="module")
def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(oai: openai.OpenAI) -> str:
    return oai.models.list().data[0].id


def test_n_samples_with_a_seed(oai: openai.OpenAI, model: str) -> None:
    def run() -> openai.types.chat.ChatCompletion:
        return oai.chat.completions.create(
            model=model, messages=CHAT, n=3, temperature=1.0, seed=11, max_tokens=8, logprobs=True
        )

    done = run()
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason in ("stop", "length") for c in done.choices)
    assert done.usage.completion_tokens == sum(len(c.logprobs.content) for c in done.choices)
    assert [c.message.content for c in run().choices] == [c.message.content for c in done.choices]  # seeded


def test_chat_logprobs(oai: openai.OpenAI, model: str) -> None:
    done = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=3)
    choice = done.choices[0]
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert choice.message.content.startswith("pass")
    for t in tokens:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        alts = [a.logprob for a in t.top_logprobs]
        assert alts == sorted(alts, reverse=True) and all(a <= 0 for a in alts)
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert list(t.token.encode()) == t.bytes


def test_completion_logprobs(oai: openai.OpenAI, model: str) -> None:
    done = oai.completions.create(model=model, prompt="Beautiful is better than", max_tokens=6, logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and done.choices[0].text.startswith(" ugly.")
    assert all(x <= 0 for x in lp.token_logprobs) and all(len(alts) == 2 for alts in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_stream_with_n(oai: openai.OpenAI, model: str) -> None:
    chunks = list(oai.chat.completions.create(model=model, messages=CHAT, n=2, max_tokens=8, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    greedy = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=8).choices[0].message.content
    assert texts == {0: greedy, 1: greedy} and finished == {0, 1}


def test_every_sample_streams_as_it_is_generated(client) -> None:  # type: ignore[no-untyped-def]
    """With n > 1 every sample's text arrives as it is generated (events carry its `index`), as often as the
    first sample's, and each sample's events concatenate to its final text."""
    job = client.submit(prompt="Errors should never", n=2, max_new_tokens=160, ignore_eos=True)
    streamed = {0: "", 1: ""}
    events = {0: 0, 1: 0}
    for kind, data in client.stream(job["id"]):
        if kind == "token":
            i = int(data.get("index", 0))
            streamed[i] += data["text"]
            events[i] += 1
        elif kind == "done":
            job = data
    texts = [c["text"] for c in job["output"]["choices"]]
    assert job["status"] == "succeeded" and texts[0] == texts[1] == job["output"]["text"]
    assert streamed[0] == texts[0]  # the first sample's events concatenate to output.text, as before
    assert streamed[1] == texts[1] and events[1] == events[0] >= 1, events


def test_the_sampling_set(oai: openai.OpenAI, model: str, demo_model: Path) -> None:
    """logit_bias, stop_token_ids and min_tokens change the greedy answer exactly; penalties and min_p run
    seeded; best_of is taken only equal to n; bad values are 400s naming the parameter."""
    prompt = "Beautiful is better than"
    greedy = oai.completions.create(model=model, prompt=prompt, max_tokens=6).choices[0].text
    tok = AutoTokenizer.from_pretrained(demo_model)
    first = tok.encode(greedy, add_special_tokens=False)[0]
    avoided = oai.completions.create(model=model, prompt=prompt, max_tokens=6, logit_bias={str(first): -100})
    assert avoided.choices[0].text and not greedy.startswith(avoided.choices[0].text[:3])
    stopped = oai.completions.create(model=model, prompt=prompt, max_tokens=6, extra_body={"stop_token_ids": [first]})
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("", "stop")
    assert stopped.usage.completion_tokens == 1
    late = oai.completions.create(
        model=model, prompt=prompt, max_tokens=6, extra_body={"stop_token_ids": [first], "min_tokens": 3}
    )
    runner_up = tok.decode(tok.encode(avoided.choices[0].text, add_special_tokens=False)[:3])
    assert late.usage.completion_tokens >= 3 and late.choices[0].text.startswith(runner_up)  # banned 3 tokens

    def sampled() -> str | None:
        return (
            oai.chat.completions.create(
                model=model,
                messages=CHAT,
                max_tokens=8,
                temperature=1.0,
                seed=5,
                presence_penalty=1.5,
                frequency_penalty=0.5,
                extra_body={"min_p": 0.1, "min_tokens": 4},
            )
            .choices[0]
            .message.content
        )

    assert sampled() == sampled()
    two = oai.completions.create(model=model, prompt=prompt, max_tokens=2, n=2, extra_body={"best_of": 2})
    assert len(two.choices) == 2
    for kw, param in [
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"12": 101}}, "logit_bias.12"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"extra_body": {"min_p": 1.5}}, "min_p"),
        ({"extra_body": {"min_tokens": 7}}, "min_tokens"),
        ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids.0"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            oai.completions.create(model=model, prompt=prompt, max_tokens=6, **kw)  # type: ignore[arg-type]
        assert err.value.status_code == 400 and err.value.param == param


def tokenize(stack: Stack, **body: object) -> list[int]:
    answer = requests.post(stack.url + "/tokenize", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["count"] == len(data["tokens"]) and data["max_model_len"] == 2048
    return list(data["tokens"])


def test_token_id_and_list_prompts(oai: openai.OpenAI, model: str, stack: Stack) -> None:
    """Token ids are the same prompt as their text; several prompts give one choice per prompt and sample,
    prompt-major, each the text its prompt gives alone."""
    prompts = ["Beautiful is better than", "Errors should never"]
    alone = [oai.completions.create(model=model, prompt=p, max_tokens=6).choices[0].text for p in prompts]
    assert alone[0].startswith(" ugly") and alone[1].startswith(" pass")
    ids = [tokenize(stack, prompt=p, model=model) for p in prompts]
    one = oai.completions.create(model=model, prompt=ids[0], max_tokens=6)
    assert one.choices[0].text == alone[0] and one.usage.prompt_tokens == len(ids[0])
    for prompt in (prompts, ids):
        done = oai.completions.create(model=model, prompt=prompt, max_tokens=6, n=2)
        assert [c.index for c in done.choices] == [0, 1, 2, 3]
        assert [c.text for c in done.choices] == [alone[0], alone[0], alone[1], alone[1]]
        assert done.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    job = stack.client().generate(prompt=[ids[1], ids[0]], max_new_tokens=6, return_token_ids=True)  # /v1/jobs
    output = job["output"]
    assert [c["text"] for c in output["choices"]] == [alone[1], alone[0]] and output["text"] == alone[1]
    assert [c["prompt_token_ids"] for c in output["choices"]] == [ids[1], ids[0]]
    assert all(len(c["token_ids"]) == 6 for c in output["choices"])  # no stop string: every generated token


def test_tokenize_and_detokenize(stack: Stack, model: str) -> None:
    ids = tokenize(stack, model=model, prompt="Errors should never")
    chat = tokenize(stack, messages=[{"role": "user", "content": "Errors should never"}])
    assert len(chat) > len(ids)  # the chat template's tokens around the text
    answer = requests.post(stack.url + "/v1/detokenize", json={"model": model, "tokens": ids}, timeout=60)
    assert answer.status_code == 200 and answer.json() == {"prompt": "Errors should never"}
    bad = requests.post(stack.url + "/detokenize", json={"tokens": [ids[0], 10**6]}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens", bad.text
    assert bad.json()["error"]["message"].startswith("token id 1000000 is not in the vocabulary")
    negative = requests.post(stack.url + "/v1/detokenize", json={"tokens": [-1]}, timeout=60).json()["error"]
    assert negative["param"] == "tokens" and negative["message"].startswith("tokens: token ids are not negative")
    refused = requests.post(stack.url + "/tokenize", json={"prompt": "x", "add_special_tokens": False}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "add_special_tokens"


def test_echo_scores_the_prompt(oai: openai.OpenAI, model: str, stack: Stack) -> None:
    """echo with logprobs: the prompt's tokens (the first with a null logprob) then the generated ones;
    max_tokens 0 scores the prompt only; with a stop string the lists end where the text ends."""
    prompt = "Beautiful is better than"
    ids = tokenize(stack, prompt=prompt)
    scored = oai.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    c = scored.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and scored.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    by_ids = oai.completions.create(model=model, prompt=ids, max_tokens=4, echo=True, logprobs=1)
    g = by_ids.choices[0]
    assert g.text.startswith(prompt + " ugly") and len(g.logprobs.tokens) == len(ids) + 4
    assert g.logprobs.token_logprobs[: len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-3, nan_ok=True)
    assert g.logprobs.text_offset[len(ids)] == len(prompt)
    stopped = oai.completions.create(model=model, prompt=prompt, max_tokens=8, echo=True, logprobs=0, stop=["."])
    s = stopped.choices[0]
    assert s.text == prompt + " ugly" and s.finish_reason == "stop"
    assert "".join(s.logprobs.tokens) == s.text  # the stop string's token is cut with the text
    plain = oai.completions.create(model=model, prompt=[prompt, "Errors should never"], max_tokens=2, echo=True)
    assert [x.text[: len(p)] for x, p in zip(plain.choices, [prompt, "Errors should never"])] == [
        prompt,
        "Errors should never",
    ]
    assert all(x.logprobs is None for x in plain.choices)


def test_prompt_errors_name_the_param(oai: openai.OpenAI, model: str) -> None:
    cases = [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt.1"),
        ({"prompt": [3, -1]}, "prompt"),
        ({"prompt": ["a", 1]}, "prompt"),
        ({"prompt": [5, 10**6]}, "prompt"),  # not in the vocabulary: found by the worker, still a 400
        ({"prompt": ["x"] * 9, "n": 8}, "prompt"),  # more than 64 choices
        ({"prompt": "x", "echo": True, "stream": True}, "echo"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            oai.completions.create(model=model, **body)  # type: ignore[call-overload]
        assert err.value.status_code == 400 and err.value.param == param, (body, err.value.message)
