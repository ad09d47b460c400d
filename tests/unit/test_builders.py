"""The build cache behind the demo and random models: a killed or partial build is never reused, a
finished one is; random Qwen2 and Llama models load, tokenize and generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.builders.cache import MARKER, cached_build
from worker.random_model import build_random_model


def writer(calls: list[Path], fail: bool = False):  # type: ignore[no-untyped-def]
    def build(tmp: Path) -> dict[str, int]:
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("killed mid-way")
        (tmp / "weights").write_text("w")
        return {"files": 2}

    return build


def test_cache_reuses_only_finished_builds_of_the_same_stamp(tmp_path: Path) -> None:
    out, calls = tmp_path / "m", []
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a killed save_pretrained leaves: config, no weights
    (tmp_path / ".thing-tmp-crashed").mkdir()  # a scratch folder of a killed builder
    assert cached_build(out, writer(calls), kind="thing", stamp={"v": 1}, log=lambda m: None) == out
    assert len(calls) == 1 and (out / "weights").read_text() == "w"
    assert json.loads((out / MARKER).read_text()) == {"files": 2, "v": 1}
    assert not list(tmp_path.glob(".thing-*-*")), "scratch folders left behind"

    logged: list[str] = []
    assert cached_build(out, writer(calls), kind="thing", stamp={"v": 1}, log=logged.append) == out
    assert len(calls) == 1 and logged == []  # a hit: nothing built, nothing said

    with pytest.raises(RuntimeError, match="killed mid-way"):
        cached_build(out, writer(calls, fail=True), kind="thing", stamp={"v": 2}, log=lambda m: None)
    assert json.loads((out / MARKER).read_text())["v"] == 1, "a failed build must not replace the old one"
    assert not list(tmp_path.glob(".thing-*-*"))
    cached_build(out, writer(calls), kind="thing", stamp={"v": 2}, log=lambda m: None)
    assert len(calls) == 3 and json.loads((out / MARKER).read_text())["v"] == 2


@pytest.mark.parametrize(("arch", "model_class"), [("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_random_models_load_and_generate(tmp_path: Path, demo_model: Path, arch: str, model_class: str) -> None:
    out = tmp_path / arch
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "half-written"}')
    path = build_random_model(arch, "tiny", out, tokenizer_dir=demo_model)  # type: ignore[arg-type]
    assert path == out and (out / MARKER).is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == model_class and model.config.vocab_size == len(tok)
    ids = tok("Beautiful is better than", return_tensors="pt")
    assert tok.decode(ids.input_ids[0]) == "Beautiful is better than"
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert new.shape[1] == ids.input_ids.shape[1] + 5
    logged: list[str] = []
    assert build_random_model(arch, "tiny", out, tokenizer_dir=demo_model, log=logged.append) == out  # type: ignore[arg-type]
    assert logged == []
