"""bf16 linear layers on a CPU: weights packed once instead of laid out again on every call.

Where the C matmul runs (`worker/cpu_kernels.py`: AVX-512 BF16, a C compiler, one torch thread; `model.cpu_kernel`),
every bf16 `nn.Linear` weight is packed into its tile layout and the layer calls it: one kernel for a lone decode
step (bandwidth-bound: the weight streams once, sequentially), a batched step and a prefill (compute-bound, at the
CPU's `vdpbf16ps` throughput). A layer whose out features are not a multiple of 16 (or in features odd) and every
layer elsewhere use oneDNN's packed matmul instead.

oneDNN: `torch.nn.functional.linear` in bf16 on CPU reorders the plain weight into oneDNN's blocked layout on every
call; for the few rows of a decode step that reorder is most of the work. Packing each weight once
(`torch.ops.mkldnn._reorder_linear_weight`, what inductor's CPU weight prepacking uses) measured, for a
1536 x 576 layer (1 thread): 133 -> 63 us at 8 rows, 156 -> 101 us at 32, 557 -> 412 us at 300 (a prefill).

Either packed weight replaces the plain one as the layer's parameter (a tensor of the same shape, dtype and count:
memory does not double); a weight shared with another module (a tied lm_head: the embedding reads it) stays plain
and the layer uses a packed copy beside it. Without either packing, or on another device or dtype, nothing changes.

With `fuse`, the projections that read the same input (q/k/v, and an MLP's gate/up) are packed as one matrix
(`fuse_projections`): one matmul instead of three (two) per layer. For the few rows of a decode step that is fewer
calls and a better-shaped kernel (30 layers of SmolLM2-135M's shape in oneDNN: 16.7 -> 15.0 ms at 1 row, 19.2 ->
16.9 ms at 32 rows). The lean forward runs the fused matmul and splits its output; each projection module becomes
a `FusedSlice` (its columns of the fused output; alone, it runs the whole matmul), so memory does not grow and a
LoRA wrapper still finds a layer with its in and out features.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

from worker import cpu_kernels

log = logging.getLogger(__name__)


def packing_available() -> bool:
    """Whether this torch can pack linear weights for oneDNN on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def tiles_available() -> bool:
    """Whether linear layers can run the C matmul here: its kernels run on this CPU and torch runs one thread (the
    kernel is single-threaded; with more threads oneDNN's matmul uses them)."""
    return torch.get_num_threads() == 1 and cpu_kernels.kernel() is not None


class Packing:
    """How one weight is packed: `tiles` (the C matmul's layout, worker/cpu_kernels.py) or oneDNN's blocked one."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, tiles: bool) -> None:
        self.tiles = tiles and cpu_kernels.matmul_usable(weight)
        if self.tiles:
            self.weight = cpu_kernels.pack(weight)
            self.bias = None if bias is None else bias.detach().float().contiguous()  # added in fp32
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            self.bias = bias

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T + bias for `weight` packed as this says (the module's parameter, or the copy beside it)."""
        if self.tiles:
            return cpu_kernels.matmul(x, weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.__dict__["packing"](x, self.weight, self.bias)


def _packed_copy_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return self.__dict__["packing"](x, self.packed_weight, self.bias)


def pack_linear_weights(model: Any, rows: int = 32, fuse: bool = False, kernel: bool = True) -> int:
    """Pack every bf16 `nn.Linear` of a CPU model once (`kernel`: for the C matmul where it runs, see
    `tiles_available`, else for oneDNN, tuned for `rows`; `fuse`: q/k/v and gate/up packed as one matrix each, see
    `fuse_projections`); returns how many layers were packed (0 when the model is not bf16 on a CPU or neither
    packing is available)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype != torch.bfloat16:
        return 0
    tiles = kernel and tiles_available()
    if not tiles and not packing_available():
        return 0
    shared = _shared_weights(model)
    packed = fuse_projections(model, rows, shared, tiles) if fuse else 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.dtype != torch.bfloat16:
            continue
        try:
            packing = Packing(module.weight, module.bias, rows, tiles)
        except RuntimeError as exc:  # this oneDNN build refuses the layer: it keeps the plain path
            log.info("linear layer not packed: %s", exc)
            continue
        module.__dict__["packing"] = packing
        if id(module.weight) in shared:  # a tied lm_head: the embedding reads the plain weight, the copy is extra
            module.register_buffer("packed_weight", packing.weight, persistent=False)
            module.forward = types.MethodType(_packed_copy_forward, module)  # type: ignore[method-assign]
        else:  # same shape, dtype and count: memory does not double
            module.weight = torch.nn.Parameter(packing.weight, requires_grad=False)
            module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
        packed += 1
    return packed


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

    def __init__(self, modules: list[torch.nn.Linear], rows: int, tiles: bool = False) -> None:
        super().__init__()
        biases = [m.bias for m in modules]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases if b is not None])
        packing = Packing(torch.cat([m.weight.detach() for m in modules]), bias, rows, tiles)
        self.__dict__["packing"] = packing
        self.weight = torch.nn.Parameter(packing.weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.sizes = [m.out_features for m in modules]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__["packing"](x, self.weight, self.bias)

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


def fuse_projections(model: Any, rows: int, shared: set[int] | None = None, tiles: bool = False) -> int:
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
                group = Fused(modules, rows, tiles)  # type: ignore[arg-type]
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
