"""bf16 linear layers on a CPU with AMX / AVX-512 BF16: weights packed once for oneDNN instead of every call.

`torch.nn.functional.linear` in bf16 on CPU runs oneDNN's matmul, which reorders the plain weight into its
blocked layout on every call: for the few rows of a decode step that reorder is most of the work. Packing
each weight once (`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU weight prepacking uses) and
calling the packed matmul measured, for a 1536 x 576 layer here (1 thread): 133 → 63 µs at 8 rows, 156 → 101 µs
at 32, 557 → 412 µs at 300 (a prefill), the same at 1 row. The results equal the unpacked ones except at 1 row,
where another kernel sums in another order (bf16 rounding).

The packed weight replaces the plain one as the layer's parameter (an opaque oneDNN tensor of the same shape,
dtype and count: memory does not double); a weight shared with another module (a tied lm_head: the embedding
reads it) stays plain and the layer uses a packed copy beside it.
Without the oneDNN ops, or on another device or dtype, nothing changes.

With `fuse`, the projections that read the same input (q/k/v, and an MLP's gate/up) are packed as one matrix
(`fuse_projections`): one matmul instead of three (two) per layer. For the few rows of a decode step that is fewer
calls and a better-shaped kernel: 30 layers of SmolLM2-135M's shape took 16.7 -> 15.0 ms at 1 row and 19.2 -> 16.9
ms at 32 rows here. The lean forward runs the fused matmul and splits its output; each projection module becomes
a `FusedSlice` (its columns of the fused output; alone, it runs the whole matmul), so memory does not grow and a
LoRA wrapper still finds a layer with its in and out features.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any

import torch

from worker.cpu_kernels import gemv, usable

log = logging.getLogger(__name__)
ONE_ROW_RAM_SHARE = 8  # plain copies for the one-row kernel only while they take at most RAM / 8


def packing_available() -> bool:
    """Whether this torch can pack linear weights for oneDNN on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    plain = self.__dict__.get("plain_weight")
    if plain is not None and x.numel() == x.shape[-1]:  # one row: the one-row kernel on the plain copy
        return gemv(x, plain, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _packed_copy_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.__dict__.get("one_row") and x.numel() == x.shape[-1]:  # the shared plain weight is there already
        return gemv(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linear_weights(model: Any, rows: int = 32, fuse: bool = False, one_row: bool = False) -> int:
    """Pack every bf16 `nn.Linear` of a CPU model for oneDNN (`rows`: the batch the packing is tuned for; `fuse`:
    q/k/v and gate/up packed as one matrix each, see `fuse_projections`; `one_row`: keep a plain copy for the
    one-row kernel where it runs and the copies fit, see `keeps_one_row_copies`); returns how many layers were
    packed (0 when the model is not bf16 on a CPU or packing is unavailable)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype != torch.bfloat16 or not packing_available():
        return 0
    one_row = one_row and keeps_one_row_copies(model)
    shared = _shared_weights(model)
    packed = fuse_projections(model, rows, shared, one_row) if fuse else 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.dtype != torch.bfloat16:
            continue
        try:
            weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)
        except RuntimeError as exc:  # this oneDNN build refuses the layer: it keeps the plain path
            log.info("linear layer not packed: %s", exc)
            continue
        if id(module.weight) in shared:  # a tied lm_head: the embedding reads the plain weight, the copy is extra
            module.register_buffer("packed_weight", weight, persistent=False)
            module.__dict__["one_row"] = one_row and usable(module.weight)
            module.forward = types.MethodType(_packed_copy_forward, module)  # type: ignore[method-assign]
        else:
            if one_row and usable(module.weight):  # not a buffer: the model's tensors stay the packed ones
                module.__dict__["plain_weight"] = module.weight.detach().contiguous()
            module.weight = torch.nn.Parameter(weight, requires_grad=False)  # same shape, dtype and count
            module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
        packed += 1
    return packed


def keeps_one_row_copies(model: Any) -> bool:
    """Whether the one-row kernel runs here and plain copies of the model's linear weights fit in RAM / 8."""
    if not usable(torch.empty(1, 32, dtype=torch.bfloat16)):
        return False
    linear = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return False
    return linear <= ram // ONE_ROW_RAM_SHARE


def _shared_weights(model: Any) -> set[int]:
    """Ids of parameters that more than one module holds (a tied lm_head and embedding)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


class Fused(torch.nn.Module):
    """Projections of one input packed as one matrix: `(x)` gives every projection's output side by side, `split`
    them apart (`sizes`: each projection's out features, in order). Its weight and bias are the model's parameters
    in place of the projections' own."""

    def __init__(self, modules: list[torch.nn.Linear], rows: int, one_row: bool = False) -> None:
        super().__init__()
        weight = torch.cat([m.weight.detach() for m in modules])
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.__dict__["plain_weight"] = weight if one_row and usable(weight) else None  # the one-row kernel's
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        biases = [m.bias for m in modules]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.sizes = [m.out_features for m in modules]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.__dict__["plain_weight"]
        if plain is not None and x.numel() == x.shape[-1]:
            return gemv(x, plain, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return out.split(self.sizes, -1)


class FusedSlice(torch.nn.Module):
    """One projection of a `Fused` matmul: its columns of the fused output (alone, it runs the whole matmul; the
    lean forward runs it once for every projection of the group)."""

    fused: Fused

    def __init__(self, fused: Fused, index: int, in_features: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the parent module holds it once
        self.index = index
        self.in_features, self.out_features = in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.split(self.fused(x))[self.index]


GROUPS = {
    "self_attn": ("fused_qkv", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("fused_gate_up", ("gate_proj", "up_proj")),
}


def fuse_projections(model: Any, rows: int, shared: set[int] | None = None, one_row: bool = False) -> int:
    """In every decoder layer, pack q/k/v (and gate/up) as one matrix: the parent module gets a `Fused` under
    `fused_qkv` (`fused_gate_up`) and each projection becomes its `FusedSlice`. Groups with another layer type, a
    shared weight, mixed biases or in features are left as they are. Returns how many projections were fused."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    shared = _shared_weights(model) if shared is None else shared
    fused = 0
    for layer in layers:
        for parent_name, (attr, names) in GROUPS.items():
            parent = getattr(layer, parent_name, None)
            modules = [getattr(parent, n, None) for n in names]
            if parent is None or not _fusable(modules, shared):
                continue
            try:
                group = Fused(modules, rows, one_row)  # type: ignore[arg-type]
            except RuntimeError as exc:  # this oneDNN build refuses it: the projections stay as they are
                log.info("projections not fused: %s", exc)
                continue
            setattr(parent, attr, group)
            for i, name in enumerate(names):
                setattr(parent, name, FusedSlice(group, i, modules[i].in_features))  # type: ignore[union-attr]
            fused += len(names)
    return fused


def _fusable(modules: list[Any], shared: set[int]) -> bool:
    if any(type(m) is not torch.nn.Linear or m.weight.dtype != torch.bfloat16 for m in modules):
        return False
    if any(id(m.weight) in shared for m in modules) or len({m.in_features for m in modules}) != 1:
        return False
    return len({m.bias is None for m in modules}) == 1
