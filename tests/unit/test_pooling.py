"""Embeddings in the worker: the pooling read from a model's sentence-transformers files, and the engine's
batched, left-padded forward against one unpadded forward per input of the same model in this process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from tests.unit.test_handler import make_handler
from worker.engine.pooling import Pooling, read_pooling
from worker.handler import GenerationRequest, InvalidRequest
from worker.random_model import build_random_model

TEXTS = ["Beautiful is better than ugly.", "Errors", "Errors should never pass silently.", "Now is better"]


def files(found: dict[str, Any]) -> Any:
    return lambda name: found.get(name)


def st_modules(*kinds: str) -> list[dict[str, Any]]:
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    return [{"idx": i, "type": f"sentence_transformers.models.{k}", "path": paths[k]} for i, k in enumerate(kinds)]


def test_pooling_comes_from_the_sentence_transformers_files() -> None:
    assert read_pooling(files({})) == Pooling("lasttoken", True)  # a decoder LM without them
    qwen3 = {  # Qwen3-Embedding's files
        "modules.json": st_modules("Transformer", "Pooling", "Normalize"),
        "1_Pooling/config.json": {"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False},
    }
    assert read_pooling(files(qwen3)) == Pooling("lasttoken", True)
    mean = {
        "modules.json": st_modules("Transformer", "Pooling"),
        "1_Pooling/config.json": {"pooling_mode_mean_tokens": True},
    }
    assert read_pooling(files(mean)) == Pooling("mean", False)  # no Normalize module: not normalized
    both = {**mean, "1_Pooling/config.json": {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}}
    with pytest.raises(ValueError, match="several modes"):
        read_pooling(files(both))


@pytest.fixture(scope="module")
def mean_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The tiny random Qwen2 with sentence-transformers files asking for mean pooling, normalized."""
    path = build_random_model("qwen2", "tiny", tmp_path_factory.mktemp("mean") / "model", tokenizer_dir=demo_model)
    (path / "modules.json").write_text(json.dumps(st_modules("Transformer", "Pooling", "Normalize")))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return path


def test_mean_pooled_vectors_of_a_batch_equal_each_input_alone(mean_model: Path) -> None:
    handler = make_handler(str(mean_model), model={"name_or_path": str(mean_model), "dtype": "fp32", "task": "embed"})
    assert handler.pooling == Pooling("mean", True)
    req = {"prompt": TEXTS, "embed": True, "max_new_tokens": 0, "dimensions": 16}
    result = handler.generate(GenerationRequest.from_dict(req))
    model = AutoModel.from_pretrained(mean_model, dtype=torch.float32).eval()
    ids = [handler.tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(i) for i in ids}) == len(ids)  # every row padded differently in the engine's one forward
    assert result.prompt_tokens == sum(map(len, ids)) and [c["index"] for c in result.choices] == [0, 1, 2, 3]
    for choice, row in zip(result.choices, ids, strict=True):
        with torch.no_grad():
            mean = model(torch.tensor([row])).last_hidden_state[0].mean(0)
        want = F.normalize(F.normalize(mean, dim=-1)[:16], dim=-1)  # Matryoshka: the head, normalized again
        assert torch.tensor(choice["embedding"]) == pytest.approx(want, abs=1e-5)
    [refused] = handler.generate_batch([GenerationRequest.from_dict({"prompt": "x", "max_new_tokens": 2})])
    assert isinstance(refused, InvalidRequest) and "embeddings only" in str(refused)
