"""Every supported layout exports, validates, and reloads with the source model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.unit.conversion.layouts import (
    Tiny,
    WithValueHead,
    check_export,
    deepspeed_dir,
    logits,
    peft_model,
    without_weights,
)


def test_hf_sharded_safetensors_resharded_with_index(untied: Tiny, tmp_path: Path) -> None:
    untied.trained.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    progress: list[tuple[str, float]] = []
    report = check_export(
        tmp_path / "ckpt",
        untied,
        tmp_path / "out",
        logits(untied.trained),
        max_shard_size="30KB",
        progress=lambda s, f: progress.append((s, f)),
    )
    assert report["source"]["format"] == "hf" and len(report["shards"]) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(report["shards"])
    assert report["checks"]["differs_from_base"]["ok"]
    fractions = [f for _, f in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_hf_pytorch_bin_with_tied_lm_head_dropped(tied: Tiny, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    torch.save(tied.state_dict(), tmp_path / "ckpt" / "pytorch_model.bin")
    report = check_export(tmp_path / "ckpt", tied, tmp_path / "out", logits(tied.trained))
    assert report["normalisation"]["lm_head"].startswith("tied (dropped lm_head.weight")
    assert report["shards"] == ["model.safetensors"]


def test_torch_compile_prefix_nested_file_cast_to_bf16(untied: Tiny, tmp_path: Path) -> None:
    compiled = torch.compile(untied.trained)  # lazy: nothing compiles until a forward
    state = {k: v.detach().clone() for k, v in compiled.state_dict().items()}
    assert next(iter(state)).startswith("_orig_mod.")
    torch.save({"state_dict": state, "step": 12}, tmp_path / "compiled.pt")
    report = check_export(
        tmp_path / "compiled.pt", untied, tmp_path / "out", logits(untied.trained, torch.bfloat16), dtype="bf16"
    )
    assert report["dtype"] == "bfloat16" and report["source"]["nested_under"] == ["state_dict"]
    assert report["normalisation"]["removed_wrappers"] == ["_orig_mod."]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dataparallel_prefix_safetensors_file(tied: Tiny, tmp_path: Path) -> None:
    state = {k: v.detach().clone() for k, v in torch.nn.DataParallel(tied.trained).state_dict().items()}
    save_file(state, tmp_path / "dp.safetensors")
    report = check_export(tmp_path / "dp.safetensors", tied, tmp_path / "out", logits(tied.trained))
    assert report["normalisation"]["stripped_prefixes"] == ["module."]


@pytest.mark.parametrize("openrlhf", [False, True], ids=["deepspeed", "openrlhf"])
def test_deepspeed_zero2_bf16(tied: Tiny, untied: Tiny, tmp_path: Path, openrlhf: bool) -> None:
    tiny = tied if openrlhf else untied
    prefix = "model." if openrlhf else ""  # OpenRLHF's Actor wraps the HF model as .model
    module = {prefix + k: v.to(torch.bfloat16) for k, v in tiny.state_dict().items()}
    shared = {}
    if tiny.tied:  # DeepSpeed records the tied head in shared_params, not in module
        del module[prefix + "lm_head.weight"]
        shared = {prefix + "lm_head.weight": prefix + "model.embed_tokens.weight"}
    deepspeed_dir(tmp_path / "ds", module, shared)
    report = check_export(tmp_path / "ds", tiny, tmp_path / "out", logits(tiny.trained, torch.bfloat16))
    assert report["dtype"] == "bfloat16" and report["source"]["format"] == "deepspeed"
    assert report["normalisation"]["stripped_prefixes"] == (["model."] if openrlhf else [])
    assert report["source"]["shared_params"] == shared


def test_trl_value_head_dropped(untied: Tiny, tmp_path: Path) -> None:
    torch.save(WithValueHead(untied.trained).state_dict(), tmp_path / "ppo.pt")
    report = check_export(tmp_path / "ppo.pt", untied, tmp_path / "out", logits(untied.trained))
    assert report["normalisation"]["stripped_prefixes"] == ["pretrained_model."]
    assert report["normalisation"]["dropped"] == {"value head": ["v_head.summary.bias", "v_head.summary.weight"]}


def test_peft_adapter_dir_merged(untied: Tiny, tmp_path: Path) -> None:
    model = peft_model(untied, modules_to_save=["lm_head"])
    model.save_pretrained(tmp_path / "adapter")
    report = check_export(tmp_path / "adapter", untied, tmp_path / "out", logits(model), atol=1e-5)
    assert report["source"]["format"] == "peft-adapter"
    assert report["lora"]["modules"] == 2 * 6 and report["lora"]["scale"] == [2.0]


def test_in_dict_lora_with_modules_to_save(untied: Tiny, tmp_path: Path) -> None:
    model = peft_model(untied, modules_to_save=["lm_head"])
    torch.save(model.state_dict(), tmp_path / "actor.pt")
    model.peft_config["default"].save_pretrained(tmp_path)
    report = check_export(tmp_path / "actor.pt", untied, tmp_path / "out", logits(model), atol=1e-5)
    assert report["lora"]["modules_to_save"] == ["base_model.model.lm_head.modules_to_save.default.weight"]
    assert report["lora"]["dropped_original_modules"] == ["base_model.model.lm_head.original_module.weight"]


def test_in_dict_lora_rslora_with_config_beside(tied: Tiny, tmp_path: Path) -> None:
    model = peft_model(tied, use_rslora=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert any(".base_layer.weight" in k for k in state) and any("lora_A.default" in k for k in state)
    torch.save(state, tmp_path / "actor.pt")
    model.peft_config["default"].save_pretrained(tmp_path)
    report = check_export(tmp_path / "actor.pt", tied, tmp_path / "out", logits(model), atol=1e-5)
    assert report["lora"]["use_rslora"] and report["lora"]["scale"] == [4.0]  # 8 / sqrt(4)
    assert report["normalisation"]["stripped_prefixes"] == ["base_model.model."]


def test_in_dict_lora_alpha_given_when_config_says_zero(untied: Tiny, tmp_path: Path) -> None:
    model = peft_model(untied)
    torch.save(model.state_dict(), tmp_path / "actor.pt")
    model.peft_config["default"].save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | {"lora_alpha": 0}))  # as verl writes it
    report = check_export(tmp_path / "actor.pt", untied, tmp_path / "out", logits(model), atol=1e-5, lora_alpha=8)
    assert report["lora"]["alpha_from"] == "the lora_alpha argument"


def test_base_without_weights_uses_meta_model_keys(untied: Tiny, tmp_path: Path) -> None:
    untied.trained.save_pretrained(tmp_path / "ckpt")
    bare = without_weights(untied, tmp_path / "bare-base")
    from conversion import export_checkpoint

    report = export_checkpoint(tmp_path / "ckpt", bare, tmp_path / "out")
    assert report["checks"]["differs_from_base"] == {"status": "skipped", "reason": "the base has no weights"}
    assert report["checks"]["logits_match"]["max_abs_diff"] == 0.0


def test_wrapper_segments_actor_prefix_and_stale_buffers(untied: Tiny, tmp_path: Path) -> None:
    def wrapped(key: str) -> str:  # FSDP1 + activation checkpointing names, under an actor wrapper
        return "actor." + key.replace("layers.0.", "layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.")

    state = {wrapped(k): v for k, v in untied.state_dict().items()}
    state["actor.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older transformers saved it
    torch.save(state, tmp_path / "actor.bin")
    report = check_export(tmp_path / "actor.bin", untied, tmp_path / "out", logits(untied.trained))
    norm = report["normalisation"]
    assert norm["removed_wrappers"] == ["_fsdp_wrapped_module.", "_checkpoint_wrapped_module."]
    assert norm["stripped_prefixes"] == ["actor."]
    assert norm["dropped"] == {"rotary buffer": ["model.layers.0.self_attn.rotary_emb.inv_freq"]}


def test_auto_dtype_mixed_falls_back_to_config(untied: Tiny, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    state = {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in untied.state_dict().items()}
    torch.save(state, tmp_path / "mixed.pt")
    expected = AutoModelForCausalLM.from_config(untied.trained.config).eval()
    expected.load_state_dict(state)  # copies into float32 parameters
    report = check_export(tmp_path / "mixed.pt", untied, tmp_path / "out", logits(expected))
    assert report["dtype"] == "float32"  # the base config's dtype
