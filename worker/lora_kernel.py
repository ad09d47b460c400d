"""The LoRA deltas of one projection in one C call on a CPU: `lora_add` of worker/cpu_kernels.py.

At a decode step each adapted projection adds, to the rows of each adapter in the batch, `(x @ A.T) @ (scale *
B).T`: a few hundred thousand flops, which torch spreads over about a hundred calls per projection (gather, casts,
two matmuls per adapter, concatenation, scatter-add), several microseconds each. The kernel does the whole
projection in one call: for each adapter its rows (the binding's `order`, grouped by adapter), each row's rank-r
product and its B product in fp32, rounded once where added to the base output in place (bf16 or fp32 rows; the
output may be a fused projection's columns). A per-projection table of the resident adapters' A and B.T addresses
is kept per set of adapters bound, so a call passes pointers only. It runs where the CPU kernels run (AVX-512 BF16,
a C compiler), with one torch thread, and where `lora_add` matches torch on a self-check; otherwise worker/lora.py
runs its torch path.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from worker.cpu_kernels import checked_function

MAX_RANK = 1024  # LORA_MAX_RANK of the C source: the kernel's stack buffer of one row's rank-r product
DTYPES = {torch.bfloat16: 1, torch.float32: 0}  # x and output dtypes the kernel takes -> its `bf16` flag


class Table:
    """One projection's A and B.T addresses per slot of a binding (0: no delta here), as the kernel reads them;
    `wbf16`: they are bf16 (else fp32)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        self.wbf16 = int(any(p is not None and p[0].dtype == torch.bfloat16 for p in pairs))
        self.a = torch.tensor([0 if p is None else p[0].data_ptr() for p in pairs], dtype=torch.int64)
        self.bt = torch.tensor([0 if p is None else p[1].data_ptr() for p in pairs], dtype=torch.int64)
        self.rank = torch.tensor([0 if p is None else p[0].shape[0] for p in pairs], dtype=torch.int32)
        self.slots = len(pairs)
        self.pointers = (self.a.data_ptr(), self.bt.data_ptr(), self.rank.data_ptr())


def takes(pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> bool:
    """Whether the kernel takes these (A [r, K], B.T [r, N]) pairs: all fp32 or all bf16, contiguous, on the CPU,
    rank <= MAX_RANK."""
    found = [p for p in pairs if p is not None]
    dtypes = {t.dtype for p in found for t in p}
    return (dtypes == {torch.float32} or dtypes == {torch.bfloat16}) and all(
        t.device.type == "cpu" and t.is_contiguous() and a.shape[0] == bt.shape[0] <= MAX_RANK
        for a, bt in found
        for t in (a, bt)
    )


def row_stride(t: torch.Tensor) -> int | None:
    """The distance in elements between consecutive rows of `t` seen as [-1, last dim] without a copy (None when
    its rows are not evenly spaced or its last dim is strided)."""
    if t.is_contiguous():
        return t.shape[-1]
    if t.dim() < 2 or t.stride(-1) != 1:
        return None
    step, span = None, 1
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if step is None:
            step = stride
        elif stride != step * span:
            return None
        span *= size
    return t.shape[-1] if step is None else step


@functools.cache
def lora_kernel() -> Any | None:
    """The `lora_add` C function, or None where it does not run here (see the module's docstring)."""
    args = (
        [ctypes.c_void_p] * 2
        + [ctypes.c_int64] * 5
        + [ctypes.c_int32] * 2
        + [ctypes.c_void_p] * 2
        + [ctypes.c_int64]
        + [ctypes.c_void_p] * 3
    )
    return checked_function("lora_add", None, args, _self_check, "LoRA kernel")


def kernel_here() -> Any | None:
    """`lora_kernel()` where this process runs it: with one torch thread, as the one-row matmul (the kernel is
    single-threaded; with more threads the torch path runs, as before it)."""
    return lora_kernel() if torch.get_num_threads() == 1 else None


def lora_add(
    fn: Any,
    x: torch.Tensor,
    out: torch.Tensor,
    order: torch.Tensor,
    starts: torch.Tensor,
    table: Table,
    per: int,
    strides: tuple[int, int],
) -> None:
    """out[rows] += (x[rows] @ A.T) @ B.T in place, slot by slot (see the C source): `order` (int32) the bound rows
    grouped by slot, `starts` (int32) each slot's first entry in it, `per` rows of x per bound row. bf16 weights
    take bf16 rows only."""
    fn(
        x.data_ptr(),
        out.data_ptr(),
        strides[0],
        strides[1],
        x.shape[-1],
        out.shape[-1],
        per,
        DTYPES[x.dtype],
        table.wbf16,
        order.data_ptr(),
        starts.data_ptr(),
        table.slots,
        *table.pointers,
    )


def _self_check(fn: Any) -> bool:
    """Three adapter slots on 7, 2 and 1 rows (every block size of the kernel: 4, 3, 2, 1) and one slot without a
    delta, into 90 columns of a wider output, one row left alone; K = 72 and N = 90 (every vector width and tail);
    rows and weights in fp32, rows in bf16 with fp32 and with bf16 weights; against torch."""
    gen = torch.Generator().manual_seed(0)
    fp32 = [(torch.randn(r, 72, generator=gen), torch.randn(r, 90, generator=gen)) for r in (6, 3)]
    order = torch.tensor([3, 0, 5, 1, 8, 10, 6, 2, 4, 9, 11], dtype=torch.int32)
    starts = torch.tensor([0, 7, 8, 10, 11], dtype=torch.int32)
    slots = {0: [3, 0, 5, 1, 8, 10, 6], 2: [4, 9], 3: [11]}  # slot -> rows (row 2: no delta here, row 7: none)
    for dtype, wdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16,) * 2):
        pairs = [(a.to(wdtype), bt.to(wdtype)) for a, bt in fp32]
        bound = [pairs[0], None, pairs[1], pairs[0]]
        x = torch.randn(12, 72, generator=gen).to(dtype)
        wide = torch.randn(12, 100, generator=gen).to(dtype)
        ref = wide.float().clone()
        for slot, rows in slots.items():
            a, bt = bound[slot]  # type: ignore[misc]
            ref[rows, 5:95] += (x[rows].float() @ a.float().T) @ bt.float()
        lora_add(fn, x, wide[:, 5:95], order, starts, Table(bound), 1, (72, 100))
        if not torch.allclose(wide.float(), ref.to(dtype).float(), rtol=0.02, atol=0.02):
            return False
    return True
