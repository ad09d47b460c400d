"""The model runtime in-process: caps, truncation, stop strings, sampling, hub-id loading (offline cache)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from qwen_deploy.config import load_settings
from tests.helpers import ROOT
from tests.unit.test_tool_calls import QWEN_TOOLS_TEMPLATE, THINK_TEMPLATE, TIME, WEATHER
from worker.device import cpu_has_native_bf16
from worker.handler import PROMPT_CHARS_PER_TOKEN, GenerationRequest, ModelHandler


def make_handler(name: str, dtype: str = "auto", **overrides: object) -> ModelHandler:
    """A loaded handler; ``dtype`` as `model.dtype` (auto: bf16 on a CPU with native bf16, else fp32)."""
    settings = load_settings(
        environ={"QWEN_DEPLOY_ENV_FILE": "none.env"},
        overrides={"model": {"name_or_path": name, "threads": 1, "dtype": dtype}, **overrides},
    )
    handler = ModelHandler(settings)
    handler.setup()
    return handler


@pytest.fixture(scope="module")
def handler(demo_model: Path) -> ModelHandler:
    return make_handler(str(demo_model))


def test_greedy_zen_and_usage(handler: ModelHandler) -> None:
    result = handler.generate(GenerationRequest(prompt="Errors should never", max_new_tokens=5))
    assert result.text.startswith(" pass silently")
    assert (result.finish_reason, result.completion_tokens, result.prompt_truncated) == ("length", 5, False)
    assert result.prompt_tokens == len(handler.tokenizer("Errors should never")["input_ids"])


def test_info_describes_the_loaded_model(handler: ModelHandler, demo_model: Path) -> None:
    info = handler.info
    assert info is not None and info.name == str(demo_model)
    default = "bfloat16" if cpu_has_native_bf16() else "float32"  # model.dtype: auto on this CPU
    assert (info.device, info.dtype, info.threads) == ("cpu", default, 1)
    assert next(handler.model.parameters()).dtype == getattr(torch, default)
    assert info.parameters == sum(p.numel() for p in handler.model.parameters())


def test_bf16_keeps_every_greedy_answer_of_fp32(demo_model: Path) -> None:
    """The CPU's bf16 (the `auto` default where the CPU has native bf16) answers each of the demo model's chat
    prompts with fp32's greedy text, the line it was trained on (bench/dtype_agreement.py measures more)."""
    from worker.builders.demo import zen_prompts, zen_text

    bf16, fp32 = make_handler(str(demo_model), "bf16"), make_handler(str(demo_model), "fp32")
    assert (bf16.info.dtype, fp32.info.dtype) == ("bfloat16", "float32")
    pairs = zen_prompts(zen_text())
    for prompt, rest in pairs:
        chat = fp32.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        texts = [h.generate(GenerationRequest(prompt=chat, max_new_tokens=32)).text for h in (bf16, fp32)]
        assert texts == [rest.strip()] * 2, prompt
    assert len(pairs) == 20


def test_truncation_keeps_the_last_tokens(demo_model: Path) -> None:
    small = make_handler(str(demo_model), generation={"max_prompt_tokens": 6})
    prompt = "Simple is better than complex. " * 5 + "Errors should never"
    ids, truncated = small.encode(GenerationRequest(prompt=prompt))
    full = small.tokenizer(prompt)["input_ids"]
    assert truncated and len(full) > 6 and ids == full[-6:]
    assert small.tokenizer.decode(ids).endswith("should never")


def test_stop_strings_and_ignore_eos(handler: ModelHandler) -> None:
    stopped = handler.generate(
        GenerationRequest(prompt="Beautiful is better than", max_new_tokens=64, stop=["\n", "zzz"])
    )
    assert (stopped.text, stopped.finish_reason) == (" ugly.", "stop")
    chat = [{"role": "user", "content": "Beautiful is better than"}]
    full = handler.generate(GenerationRequest(messages=chat, max_new_tokens=40, ignore_eos=True))
    assert full.completion_tokens == 40 and full.finish_reason == "length"


def test_sampling_is_reproducible_with_a_seed(handler: ModelHandler) -> None:
    req = GenerationRequest(prompt="Now is better than", max_new_tokens=20, temperature=1.5, seed=7)
    assert handler.generate(req).text == handler.generate(req).text


def test_loads_a_hub_id_from_the_local_cache_offline(demo_model: Path, tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--zen--demo"
    shutil.copytree(demo_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # The hub library reads HF_HUB_OFFLINE at import: run in a fresh process, as a worker would.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "from tests.unit.test_handler import make_handler; from worker.handler import GenerationRequest; "
        "h = make_handler('zen/demo'); print(h.info.revision); "
        "print(repr(h.generate(GenerationRequest(prompt='Errors should never', max_new_tokens=3)).text))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    revision, text = out.stdout.splitlines()[-2:]
    assert revision == commit
    assert text.startswith("' pass")


class _SeenTokenizer:
    """The demo model's tokenizer, noting the length of every text it is asked to tokenize."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[int] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.seen.append(len(text))
        return self.inner(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_megabyte_prompt_is_tokenized_from_its_tail(handler: ModelHandler) -> None:
    zen = "Simple is better than complex. "
    prompt = zen * (1_000_000 // len(zen)) + "Errors should never"
    bound = handler.settings.generation.max_prompt_tokens * PROMPT_CHARS_PER_TOKEN
    full = handler.tokenizer(prompt)["input_ids"][-handler.settings.generation.max_prompt_tokens :]
    spy = _SeenTokenizer(handler.tokenizer)
    handler.tokenizer = spy
    try:
        big = handler.generate(GenerationRequest(prompt=prompt, max_new_tokens=5))
        assert spy.seen and max(spy.seen) <= bound  # never the megabyte
        assert handler.encode(GenerationRequest(prompt=prompt)) == (full, True)
        cut = handler.generate(GenerationRequest(prompt=prompt[-bound:], max_new_tokens=5))
        assert big == cut and big.prompt_truncated and big.prompt_tokens == len(full)
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        spy.seen.clear()
        ids, truncated = handler.encode(GenerationRequest(messages=chat))
        assert spy.seen and max(spy.seen) <= bound and truncated
        tail = [chat[0], {"role": "user", "content": prompt[-bound:]}]
        assert ids == handler.encode(GenerationRequest(messages=tail))[0]
    finally:
        handler.tokenizer = spy.inner


# Tools and reasoning: rendering through the chat template, forced calls under the grammar.

ROUND_TRIP = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


def test_tool_round_trip_renders_through_the_models_template(handler: ModelHandler) -> None:
    req = GenerationRequest(messages=ROUND_TRIP, tools=[WEATHER])
    saved = handler.tokenizer.chat_template
    try:
        handler.tokenizer.chat_template = QWEN_TOOLS_TEMPLATE
        text = handler.render(ROUND_TRIP, req)
    finally:
        handler.tokenizer.chat_template = saved
    assert '"name": "get_weather"' in text and "<tools>" in text  # the tool's definition
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_template_without_tools_gets_the_fallback(handler: ModelHandler) -> None:
    assert "tools" not in handler.tokenizer.chat_template  # the demo model's plain template
    text = handler.render(ROUND_TRIP, GenerationRequest(messages=ROUND_TRIP, tools=[WEATHER]))
    assert text.startswith("<|im_start|>system\nYou may call one or more functions")
    assert json.dumps(WEATHER) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}\n</tool_call><|im_end|>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>" in text


def test_chat_template_kwargs_and_reasoning_detection(handler: ModelHandler) -> None:
    msgs = [{"role": "user", "content": "2+2?"}]
    saved = handler.tokenizer.chat_template
    try:
        handler.tokenizer.chat_template = THINK_TEMPLATE
        off = GenerationRequest(messages=msgs, chat_template_kwargs={"enable_thinking": False})
        assert handler.render(msgs, off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert handler.render(msgs, GenerationRequest(messages=msgs)).endswith("<|im_start|>assistant\n")
        assert handler.reasoning(off)  # the template has a think block
    finally:
        handler.tokenizer.chat_template = saved
    assert not handler.reasoning(GenerationRequest(messages=msgs))
    assert handler.reasoning(GenerationRequest(messages=msgs, chat_template_kwargs={"enable_thinking": True}))


@pytest.mark.parametrize(
    "choice, parallel",
    [({"type": "function", "function": {"name": "get_weather"}}, None), ("required", True), ("required", False)],
)
def test_forced_calls_validate_on_the_demo_model(handler: ModelHandler, choice: Any, parallel: bool | None) -> None:
    req = GenerationRequest(
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER, TIME],
        tool_choice=choice,
        parallel_tool_calls=parallel,
        max_new_tokens=512,
        temperature=1.0,
        seed=3,
    )
    result = handler.generate(req)
    calls = result.choices[0]["tool_calls"]
    assert result.finish_reason in ("eos", "stop") and calls and result.choices[0]["content"] is None
    if parallel is False or isinstance(choice, dict):
        assert len(calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    if isinstance(choice, dict):
        assert calls[0]["function"]["name"] == "get_weather"


def test_a_prompt_that_opens_the_think_block_makes_the_sample_reasoning(handler: ModelHandler) -> None:
    """A template that writes `<think>\\n` into the prompt (as Qwen3's thinking models do): the model's text
    up to `</think>` is reasoning; the demo model never closes the block, so all of it is."""
    msgs = [{"role": "user", "content": "Errors should never"}]
    saved = handler.tokenizer.chat_template
    try:
        handler.tokenizer.chat_template = THINK_TEMPLATE.replace("assistant\\n' }}", "assistant\\n<think>\\n' }}")
        assert handler.render(msgs, GenerationRequest(messages=msgs)).endswith("<think>\n")
        result = handler.generate(GenerationRequest(messages=msgs, max_new_tokens=6))
        off = handler.generate(
            GenerationRequest(messages=msgs, max_new_tokens=6, chat_template_kwargs={"enable_thinking": False})
        )
    finally:
        handler.tokenizer.chat_template = saved
    choice = result.choices[0]
    assert choice["text"] and choice["reasoning_content"] == choice["text"].strip("\n") and choice["content"] == ""
    closed = off.choices[0]  # enable_thinking false: the prompt holds an empty, closed block
    assert closed["reasoning_content"] is None and closed["content"] == closed["text"] != ""
