"""The LoRA deltas of a projection, by the C kernel (worker/lora_kernel.py) and by the torch path it replaces on a
CPU: each equals x @ A.T @ B.T * scale added to the adapter's rows in fp32 and rounded once (bf16 within a rounding),
base rows and rows of an adapter that leaves the projection alone untouched, on shapes with every tail of the
kernel, decode and prefill rows, and into some columns of a wider output (a fused projection's share)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker.lora import AdapterSet
from worker.lora_kernel import lora_kernel, row_stride

# name: (rank, targets); 'b' and 'c' leave most projections alone
ADAPTERS = {"a": (6, None), "b": (3, ["q_proj", "down_proj"]), "c": (5, ["v_proj"])}
PATHS = ("kernel", "torch")
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-4}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 0.06}}


def tiny_llama() -> torch.nn.Module:
    """One layer; hidden 72, kv heads of 18, intermediate 152: K and N off the kernel's 16 and 64 widths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=72,
        intermediate_size=152,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=18,
    )
    return LlamaForCausalLM(config).eval()


def write_adapters(model: torch.nn.Module, root: Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """PEFT adapter directories under root; returns name -> module path -> (A, scale * B) in fp32 (scale 2: a power
    of two, so scale * B rounds as B does)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, (rank, targets) in ADAPTERS.items():
        tensors, deltas = {}, {}
        for path, module in model.named_modules():
            if path.rsplit(".", 1)[-1] in (targets or every):
                a = torch.randn(rank, module.in_features, generator=gen)
                b = torch.randn(module.out_features, rank, generator=gen) / 16  # deltas of a few units
                tensors[f"base_model.model.{path}.lora_A.weight"] = a
                tensors[f"base_model.model.{path}.lora_B.weight"] = b
                deltas[path] = (a, b * 2.0)  # lora_alpha 2 * rank
        (root / name).mkdir()
        save_file(tensors, str(root / name / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets or every}
        (root / name / "adapter_config.json").write_text(json.dumps(config))
        out[name] = deltas
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The kernel runs with one torch thread (`kernel_here`), as a worker configured with `threads: 1`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lora_kernel_setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, AdapterSet, dict]:
    """The adapters loaded on an fp32 model, and on a bf16 one (bf16 A and B where the kernel runs)."""
    model = tiny_llama().to(request.param)
    root = tmp_path_factory.mktemp("lora-kernel")
    deltas = write_adapters(model, root)
    adapters = AdapterSet(model, len(ADAPTERS))
    for name in ADAPTERS:
        adapters.register(name, str(root / name))
        assert adapters.ensure(name, set())
    return model, adapters, deltas


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("positions", [1, 3])
@pytest.mark.parametrize(
    "names",
    [["a", None, "b", "a", "c", "a", "a", "a", "b"], ["a"] * 6, [None, "b", None]],
    ids=["mixed", "one-adapter", "one-adapter-and-base"],
)
def test_deltas_equal_the_low_rank_product(
    lora_kernel_setup: tuple,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    positions: int,
    names: list,
) -> None:
    model, adapters, deltas = lora_kernel_setup
    dtype = model.dtype
    if path == "kernel" and lora_kernel() is None:
        pytest.skip("no AVX-512 BF16 or no C compiler here")
    if path == "torch":
        monkeypatch.setattr("worker.lora.kernel_here", lambda: None)
    gen = torch.Generator().manual_seed(len(names) + positions)
    adapters.bind(names)
    with torch.inference_mode():
        for module_path, wrapper in adapters.wrapped.items():
            x = torch.randn(len(names), positions, wrapper.in_features, generator=gen).to(dtype)
            base = wrapper.base(x)
            want = base.float().clone()
            for i, name in enumerate(names):
                if name is not None and module_path in deltas[name]:
                    a, b = deltas[name][module_path]
                    stored = wrapper.deltas[adapters.key(name)][0].dtype  # as the adapter set keeps them
                    want[i] += (x[i].float() @ a.to(stored).float().T) @ b.to(stored).float().T
            want = want.to(dtype)
            # into columns 5.. of a wider output, as the lean forward adds a fused projection's share
            wide = torch.randn(len(names), positions, wrapper.out_features + 9, generator=gen).to(dtype)
            outside = wide.clone()
            share = wide[..., 5 : 5 + wrapper.out_features]
            share.copy_(base)
            if path == "kernel":
                assert row_stride(share) == wrapper.out_features + 9
            got = wrapper.add_deltas(x, share)
            got_plain = wrapper(x)
            for out in (got, got_plain):  # bf16: the torch path rounds the delta (and with bf16 A and B, x @ A.T)
                torch.testing.assert_close(out, want, **TOLERANCE[dtype])
            for i, name in enumerate(names):
                if name is None or module_path not in deltas[name]:
                    assert torch.equal(got[i], base[i]) and torch.equal(got_plain[i], base[i])
            if path == "kernel":  # in place, and the columns around untouched
                assert got.data_ptr() == share.data_ptr()
                assert torch.equal(wide[..., :5], outside[..., :5]) and torch.equal(wide[..., -4:], outside[..., -4:])
    adapters.clear()


def test_row_stride() -> None:
    t = torch.zeros(4, 3, 10)
    assert row_stride(t) == 10 and row_stride(t[..., 2:7]) == 10 and row_stride(t[:, 1:2]) == 30
    assert row_stride(t[:, :2]) is None and row_stride(t.transpose(1, 2)) is None
    assert row_stride(torch.zeros(1, 1, 7)) == 7
