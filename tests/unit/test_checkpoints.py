"""Whether a model directory can replace the served weights, from its headers: each refusal says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from qwen_deploy.checkpoints import CheckpointError, check_checkpoint

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 8, "hidden_size": 4}
TENSORS = {"model.embed_tokens.weight": (8, 4), "lm_head.weight": (8, 4)}


def model_dir(
    path: Path, config: dict[str, Any] | None = None, tensors: dict[str, tuple[int, ...]] | None = None
) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    save_file(
        {k: torch.zeros(shape) for k, shape in (TENSORS if tensors is None else tensors).items()},
        path / "model.safetensors",
    )
    return path


@pytest.fixture()
def served(tmp_path: Path) -> Path:
    return model_dir(tmp_path / "served")


def test_a_checkpoint_of_the_same_model_passes(served: Path, tmp_path: Path) -> None:
    assert check_checkpoint(model_dir(tmp_path / "new"), str(served))["model_type"] == "qwen2"
    # a key one side leaves to its default is not compared
    lean = {k: v for k, v in CONFIG.items() if k != "hidden_size"}
    assert check_checkpoint(model_dir(tmp_path / "lean", lean), str(served)) == lean
    # a served hub id (nothing on disk to compare with): only the directory itself is checked
    assert check_checkpoint(tmp_path / "new", "Qwen/Qwen2.5-0.5B-Instruct")["vocab_size"] == 8


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.write_text("x"), "not a directory"),
        (lambda p: p.mkdir(), "no config.json"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{oops")), "cannot be read as JSON"),
        (
            lambda p: (p.mkdir(), (p / "config.json").write_text("{}"), (p / "pytorch_model.bin").write_text("")),
            "pickle",
        ),
        (lambda p: model_dir(p, {**CONFIG, "architectures": ["LlamaForCausalLM"]}), "LlamaForCausalLM"),
        (lambda p: model_dir(p, {**CONFIG, "vocab_size": 9}), "vocab_size is 9; the served model's is 8"),
        (lambda p: model_dir(p, tensors={"model.embed_tokens.weight": (8, 4)}), "lacks 1 of the served model's"),
        (lambda p: model_dir(p, tensors={**TENSORS, "extra.weight": (1,)}), "tensors the served model does not"),
        (lambda p: model_dir(p, tensors={**TENSORS, "lm_head.weight": (8, 5)}), "lm_head.weight has shape [8, 5]"),
    ],
)
def test_refusals_say_why(served: Path, tmp_path: Path, make: Any, words: str) -> None:
    make(tmp_path / "new")
    with pytest.raises(CheckpointError, match=words.replace("[", r"\[").replace("]", r"\]")):
        check_checkpoint(tmp_path / "new", str(served))


def test_a_header_that_is_not_safetensors(served: Path, tmp_path: Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(served, new)
    (new / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file"):
        check_checkpoint(new, str(served))
