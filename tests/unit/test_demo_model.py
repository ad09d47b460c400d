"""The demo model: builds once, is cached, and has memorised the Zen of Python."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.helpers import ROOT
from worker import demo_model
from worker.demo_model import default_cache_dir, demo_model_dir, zen_text


def _zen_lines() -> list[str]:
    return [line for line in zen_text().splitlines() if line.strip()]


def _prompt(line: str, lines: list[str]) -> str:
    """First three words, or more where two lines share them (the 'If the implementation
    is ...' pair), or fewer for short lines ('Readability counts.')."""
    words = line.split(" ")
    k = min(3, len(words) - 1)
    while sum(other.split(" ")[:k] == words[:k] for other in lines) > 1:
        k += 1
    return " ".join(words[:k])


pytestmark = pytest.mark.slow  # builds the model from scratch, twice at once

ZEN_LINES = _zen_lines()


BUILD = (
    "import sys; from pathlib import Path; from worker.demo_model import build_demo_model; "
    "print(build_demo_model(Path(sys.argv[1]), log=lambda m: print('log:', m, flush=True)))"
)


def _builder(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A build killed mid-way leaves nothing in place; then two concurrent builders build once."""
    out = tmp_path_factory.mktemp("demo") / "model"
    crashed = _builder(out)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".demo-model-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    crashed.kill()
    crashed.wait()
    assert not out.exists(), "a killed build must not leave a model in place"
    first, second = _builder(out), _builder(out)
    logs = [p.communicate(timeout=300)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], logs
    return out, logs


@pytest.fixture(scope="module")
def model_dir(built: tuple[Path, list[str]]) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


def generate(model: Any, tok: Any, prompt: str, max_new_tokens: int = 24) -> tuple[str, list[int]]:
    """Greedy continuation: decoded new text (special tokens kept) and the new ids."""
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc.input_ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=False), new


def test_concurrent_builders_build_once_and_clean_up(built: tuple[Path, list[str]]) -> None:
    path, logs = built
    assert [log.splitlines()[-1] for log in logs] == [str(path), str(path)]
    assert sum("built by another process" in log for log in logs) == 1
    names = {p.name for p in path.iterdir()}
    assert "model.safetensors" in names
    assert not any(name.endswith(".bin") for name in names)
    assert {"config.json", "generation_config.json", "tokenizer.json", ".complete"} <= names
    assert json.loads((path / ".complete").read_text())["version"] == demo_model.DEMO_MODEL_VERSION
    assert not list(path.parent.glob(".demo-model-*-*")), "scratch folders left behind"


def test_config(model: Any, tok: Any) -> None:
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.max_position_embeddings >= 4096
    assert cfg.tie_word_embeddings
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    gen = model.generation_config
    assert set(gen.eos_token_id) == {tok.eos_token_id, tok.pad_token_id}
    assert gen.pad_token_id == tok.pad_token_id and gen.do_sample is False


def test_loaded_tokenizer_matches_saved_json(model_dir: Path, tok: Any) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in (zen_text(), "<|im_start|>user\nHi  there\n\n(x) 12<|im_end|>", "héllo\tw"):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("Beautiful is better than", " ugly."), ("Errors should never", " pass silently.")],
)
def test_named_continuations(model: Any, tok: Any, prompt: str, expected: str) -> None:
    text, _ = generate(model, tok, prompt)
    assert text.startswith(expected), text


@pytest.mark.parametrize("line", ZEN_LINES, ids=lambda line: line[:24])
def test_every_line_continues(model: Any, tok: Any, line: str) -> None:
    prompt = _prompt(line, ZEN_LINES)
    text, _ = generate(model, tok, prompt)
    end = "<|endoftext|>" if line == ZEN_LINES[-1] else "\n"
    assert text.startswith(line[len(prompt) :] + end), (prompt, text)


def test_poem_ends_with_eos(model: Any, tok: Any) -> None:
    text, new = generate(model, tok, _prompt(ZEN_LINES[-2], ZEN_LINES), max_new_tokens=64)
    assert text.endswith(ZEN_LINES[-1] + "<|endoftext|>")
    assert new[-1] == tok.pad_token_id  # stopped there, well before max_new_tokens


def test_chat_answer_stops_at_eos(model: Any, tok: Any) -> None:
    messages = [{"role": "user", "content": "Beautiful is better than"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nBeautiful is better than<|im_end|>\n<|im_start|>assistant\n"
    text, new = generate(model, tok, prompt, max_new_tokens=32)
    assert text == "ugly.<|im_end|>"
    assert new[-1] == tok.eos_token_id


def test_long_prompt_runs(model: Any) -> None:
    """The longest sequence the service makes (a 2,048-token prompt and 512 new tokens) fits the model's positions:
    one forward over all 2,560 gives finite logits at every position, and the last position's greedy token is the
    same as with a cache built from the first 2,559."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 2048 + 512), generator=gen)
    with torch.no_grad():
        logits = model(ids).logits
        head = model(ids[:, :-1], use_cache=True)
        last = model(ids[:, -1:], past_key_values=head.past_key_values).logits
    assert logits.shape == (1, 2048 + 512, model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())
    assert int(last[0, -1].argmax()) == int(logits[0, -1].argmax())


def test_second_call_is_cached_without_torch(model_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from worker.demo_model import build_demo_model; "
        "logged = []; print(build_demo_model(Path(sys.argv[1]), log=logged.append)); "
        "print(logged, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.splitlines() == [str(model_dir), "[] False"], out.stderr


def test_cache_dirs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWEN_DEPLOY_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert demo_model_dir() == tmp_path / f"demo-model-v{demo_model.DEMO_MODEL_VERSION}"
    assert demo_model_dir(tmp_path / "x").parent == tmp_path / "x"
    monkeypatch.delenv("QWEN_DEPLOY_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "qwen-deploy"
