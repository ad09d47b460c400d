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
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

log = logging.getLogger(__name__)


def packing_available() -> bool:
    """Whether this torch can pack linear weights for oneDNN on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _packed_copy_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linear_weights(model: Any, rows: int = 32) -> int:
    """Pack every bf16 `nn.Linear` of a CPU model for oneDNN (`rows`: the batch the packing is tuned for);
    returns how many layers were packed (0 when the model is not bf16 on a CPU or packing is unavailable)."""
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype != torch.bfloat16 or not packing_available():
        return 0
    shared = _shared_weights(model)
    packed = 0
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
            module.forward = types.MethodType(_packed_copy_forward, module)  # type: ignore[method-assign]
        else:
            module.weight = torch.nn.Parameter(weight, requires_grad=False)  # same shape, dtype and count
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
