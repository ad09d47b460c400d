"""Broken or unsafe inputs fail with a clear ConversionError and leave no output behind."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from conversion import ConversionError, export_checkpoint
from tests.unit.conversion.layouts import Tiny, deepspeed_dir, peft_model


class Marker:
    """Unpickling this would create ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def fails(checkpoint: Path, tiny: Tiny, tmp_path: Path, *needles: str, **kwargs: Any) -> ConversionError:
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        export_checkpoint(checkpoint, tiny.base_dir, out, **kwargs)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    return info.value


def test_missing_shard(untied: Tiny, tmp_path: Path) -> None:
    untied.trained.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    gone = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    gone.unlink()
    err = fails(tmp_path / "ckpt", untied, tmp_path, "missing shard file(s)", gone.name)
    assert err.code == "missing_shard"


def test_wrong_shape(untied: Tiny, tmp_path: Path) -> None:
    state = untied.state_dict()
    state["model.layers.1.self_attn.q_proj.weight"] = state["model.layers.1.self_attn.q_proj.weight"][:16]
    torch.save(state, tmp_path / "bad.pt")
    fails(
        tmp_path / "bad.pt",
        untied,
        tmp_path,
        "wrong shape",
        "model.layers.1.self_attn.q_proj.weight: checkpoint [16, 32] vs base [32, 32]",
    )


def test_missing_and_unexpected_keys_listed(untied: Tiny, tmp_path: Path) -> None:
    state = {k: v for k, v in untied.state_dict().items() if ".layers.1.mlp." not in k}
    state["model.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pt")
    fails(
        tmp_path / "bad.pt",
        untied,
        tmp_path,
        "3 missing",
        "model.layers.1.mlp.down_proj.weight",
        "1 unexpected",
        "model.extra.weight",
    )


@pytest.mark.parametrize("as_zip", [True, False], ids=["torch-save", "raw-pickle"])
def test_unsafe_pickle_never_runs(untied: Tiny, tmp_path: Path, as_zip: bool) -> None:
    marker = tmp_path / "pwned"
    payload = untied.state_dict() | {"extra": Marker(marker)}
    if as_zip:
        torch.save(payload, tmp_path / "evil.pt")
    else:
        (tmp_path / "evil.pt").write_bytes(pickle.dumps(payload))
    err = fails(tmp_path / "evil.pt", untied, tmp_path, "unsafe pickle refused")
    assert err.code == "unsafe_pickle" and not marker.exists()


def test_untied_lm_head_under_tied_config(tied: Tiny, tmp_path: Path) -> None:
    state = tied.state_dict()
    state["lm_head.weight"] = state["lm_head.weight"] + 0.1
    torch.save(state, tmp_path / "untied.pt")
    fails(tmp_path / "untied.pt", tied, tmp_path, "tie_word_embeddings", "lm_head.weight differs")


def test_zero3_placeholders(untied: Tiny, tmp_path: Path) -> None:
    module = {k: torch.empty(0, dtype=torch.bfloat16) for k in untied.state_dict()}
    deepspeed_dir(tmp_path / "ds", module, {})
    err = fails(tmp_path / "ds", untied, tmp_path, "ZeRO-3", "zero_to_fp32.py")
    assert err.code == "zero3_checkpoint"


def test_lora_alpha_zero(untied: Tiny, tmp_path: Path) -> None:
    peft_model(untied).save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"lora_alpha": 0}))
    fails(tmp_path / "adapter", untied, tmp_path, "lora_alpha is 0", "pass lora_alpha=")


def test_in_dict_lora_without_config(untied: Tiny, tmp_path: Path) -> None:
    torch.save(peft_model(untied).state_dict(), tmp_path / "actor.pt")
    fails(tmp_path / "actor.pt", untied, tmp_path, "no adapter_config.json")


def test_checkpoint_identical_to_base(untied: Tiny, tmp_path: Path) -> None:
    fails(untied.base_dir, untied, tmp_path, "every exported tensor equals the base model's")


def test_output_not_empty(untied: Tiny, tmp_path: Path) -> None:
    untied.trained.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        export_checkpoint(tmp_path / "ckpt", untied.base_dir, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_unknown_layout(untied: Tiny, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("nothing here")
    fails(tmp_path / "ckpt", untied, tmp_path, "unrecognised checkpoint layout")


def test_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(ConversionError("bad thing", "bad_code")))
    assert (str(err), err.code, err.args) == ("bad thing", "bad_code", ("bad thing", "bad_code"))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "a/../../x.safetensors", "..\\x.bin", 5])
def test_a_shard_index_naming_a_file_outside_the_checkpoint_is_refused(
    untied: Tiny, tmp_path: Path, shard: Any
) -> None:
    untied.trained.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    (tmp_path / "outside.safetensors").write_bytes(b"not read")
    err = fails(tmp_path / "ckpt", untied, tmp_path, "refusing to read outside the checkpoint", repr(shard))
    assert err.code == "unsafe_path"


@pytest.mark.parametrize("tag", ["../elsewhere/global_step7", "{abs}", "global_step7/../../elsewhere/global_step7"])
def test_a_deepspeed_latest_tag_outside_the_checkpoint_is_refused(untied: Tiny, tmp_path: Path, tag: str) -> None:
    module = {k: v.clone() for k, v in untied.trained.state_dict().items()}
    deepspeed_dir(tmp_path / "elsewhere", module, {})  # a loadable checkpoint beside it: never read
    ckpt = deepspeed_dir(tmp_path / "ckpt", module, {})
    tag = tag.format(abs=tmp_path / "elsewhere" / "global_step7")
    (ckpt / "latest").write_text(tag)
    err = fails(ckpt, untied, tmp_path, "refusing to read outside the checkpoint", repr(tag))
    assert err.code == "unsafe_path"
