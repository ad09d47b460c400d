"""LoRA adapters per request in the engine's step: rows of several adapters and of the base share one forward.

Each adapted projection (q/k/v/o, gate/up/down) is wrapped once, whatever module is there (a plain or a packed
bf16 `Linear`): the wrapper runs the base module, then adds `scale * B_a(A_a(x))` to the rows of each adapter
`a` present in the batch (grouped by adapter; base rows get nothing). Which row runs which adapter is read from
a context the engine sets before every forward (`AdapterSet.bind`), so the decoder's own forward code is
untouched. A forward with only base rows costs one attribute check per projection. On a CPU where the C kernel
runs (one torch thread), all of a projection's deltas are one call that adds them in place
(worker/lora_kernel.py; a bf16 model's A and B are then kept in bf16); elsewhere, or for tensors it does not
take, torch ops per adapter.

At most `max_adapters` adapters are resident (on the model's device), least recently used first out; more can
be registered (name -> directory) and are loaded on demand when a sequence needs them. An adapter in use by a
running or joining sequence is never evicted. Files are read with safetensors only (no pickle).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from qwen_deploy.adapters import AdapterError, check_base, read_adapter
from worker.lora_kernel import DTYPES, Table, kernel_here, lora_add, row_stride, takes

log = logging.getLogger(__name__)


class LoraContext:
    """The per-row adapter assignment of the next forward: (adapter id, row index or None for every row)."""

    def __init__(self) -> None:
        self.rows = 0
        self.groups: list[tuple[int, torch.Tensor | None]] = []
        # rows of several adapters: their rows adapter by adapter (`order`) and each adapter's span in it
        self.order: torch.Tensor | None = None
        self.spans: list[tuple[int, int, int]] = []  # (adapter id, start, end) in `order`
        # what the C kernel reads (worker/lora_kernel.py): the adapters bound ("slots"), the rows that run one
        # grouped by slot (int32), each slot's first entry in them and one past the last
        self.keys: tuple[int, ...] = ()
        self.slot_rows: torch.Tensor | None = None
        self.slot_starts: torch.Tensor | None = None


class LoraLinear(torch.nn.Module):
    """A projection plus the LoRA deltas of the adapters of the rows that run one."""

    def __init__(self, base: torch.nn.Module, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features = int(getattr(base, "in_features", 0))
        self.out_features = int(getattr(base, "out_features", 0))
        self.deltas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter id -> (A [r, in], (scale * B).T)
        self.tables: dict[tuple[int, ...], Table | None] = {}  # the kernel's tables per set of adapters bound

    def set_delta(self, key: int, a: torch.Tensor, bt: torch.Tensor) -> None:
        self.deltas[key] = (a, bt)
        self.tables.clear()

    def drop_delta(self, key: int) -> None:
        self.deltas.pop(key, None)
        self.tables.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_deltas(x, self.base(x))

    def add_deltas(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """`out` (the base projection of `x`) plus the deltas of the rows' adapters."""
        ctx = self.context
        if not ctx.groups or not self.deltas:
            return out
        if ctx.keys and self._kernel_add(x, out):
            return out
        if ctx.order is not None and x.shape[0] == ctx.rows:
            return self._add_spans(x, out, ctx.order, ctx.spans)
        for key, index in ctx.groups:
            pair = self.deltas.get(key)
            if pair is None:
                continue
            a, b = pair
            if index is None:  # every row runs this adapter
                out = out + (F.linear(x.to(a.dtype), a) @ b).to(out.dtype)
                continue
            if x.shape[0] != ctx.rows:  # rows flattened with their positions: [rows * T, in]
                per = x.shape[0] // ctx.rows
                index = (index[:, None] * per + torch.arange(per, device=index.device)).reshape(-1)
            delta = F.linear(x.index_select(0, index).to(a.dtype), a) @ b
            out.index_add_(0, index, delta.to(out.dtype))
        return out

    def _kernel_add(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """Every bound row's delta added to `out` in place by one C call (worker/lora_kernel.py); False where the
        kernel does not take these tensors (the torch path runs then)."""
        ctx = self.context
        fn = kernel_here()
        if fn is None or x.dtype not in DTYPES or out.dtype != x.dtype or x.device.type != "cpu" or out.requires_grad:
            return False
        rows = x.numel() // max(1, x.shape[-1])
        if rows != out.numel() // max(1, out.shape[-1]) or rows % max(1, ctx.rows):
            return False
        x_stride, out_stride = row_stride(x), row_stride(out)
        if x_stride is None or out_stride is None or ctx.slot_rows is None or ctx.slot_starts is None:
            return False
        table = self.kernel_table()
        if table is None or (table.wbf16 and x.dtype != torch.bfloat16):
            return False
        lora_add(fn, x, out, ctx.slot_rows, ctx.slot_starts, table, rows // ctx.rows, (x_stride, out_stride))
        return True

    def kernel_table(self) -> Table | None:
        """The kernel's table of this projection's deltas for the adapters bound now (None: it does not take them)."""
        keys = self.context.keys
        if keys not in self.tables:
            pairs = [self.deltas.get(key) for key in keys]
            self.tables[keys] = Table(pairs) if takes(pairs) else None
        return self.tables[keys]

    def _add_spans(
        self, x: torch.Tensor, out: torch.Tensor, order: torch.Tensor, spans: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """Rows of several adapters: one gather of their rows adapter by adapter, each adapter's matmuls on its
        contiguous span, one scatter-add back (a gather and a scatter per adapter cost more)."""
        first = next(iter(self.deltas.values()))[0]
        xs = x.index_select(0, order).to(first.dtype)
        parts = []
        for key, lo, hi in spans:
            pair = self.deltas.get(key)
            if pair is None:  # this adapter leaves this projection alone
                parts.append(xs.new_zeros(hi - lo, *out.shape[1:]))
                continue
            a, b = pair
            parts.append(F.linear(xs[lo:hi], a) @ b)
        out.index_add_(0, order, torch.cat(parts).to(out.dtype))
        return out


class Resident:
    """A loaded adapter: its id (new at every load, so a prefix cached under an old load is never reused)."""

    def __init__(self, key: int, modules: list[str], seconds: float) -> None:
        self.key, self.modules, self.seconds = key, modules, seconds


class AdapterSet:
    """The adapters of one model in one process: registered ones (name -> directory), resident ones (LRU)."""

    def __init__(self, model: Any, max_resident: int, base_names: Iterable[str] = ()) -> None:
        self.model, self.max_resident = model, max(1, max_resident)
        self.base_names = [n for n in base_names if n]
        self.context = LoraContext()
        self.paths: dict[str, str] = {}
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self.wrapped: dict[str, LoraLinear] = {}
        self.loads = 0
        self.names: tuple[str, ...] = ()  # the resident adapters, for other threads (the heartbeat) to read
        # held by the thread stepping the engine; the heartbeat syncs an idle worker's adapters under it
        self.lock = threading.RLock()
        self._keys = itertools.count(1)

    # -- registry ------------------------------------------------------------------------------------
    def register(self, name: str, path: str) -> None:
        """Serve `name` from `path` (a changed path drops the resident copy: the next use loads the new one)."""
        if self.paths.get(name) not in (None, path):
            self._evict(name)
        self.paths[name] = path

    def unregister(self, name: str) -> None:
        """Stop serving `name`; its weights go once no sequence uses them (see `release`)."""
        self.paths.pop(name, None)

    def sync(self, wanted: dict[str, str], busy: set[str]) -> None:
        """Make the registered set `wanted` (from config and Redis); drop resident adapters no longer
        registered and not in use, and load new ones while there is room (eager, as `load_lora_adapter` asks)."""
        for name in [n for n in self.paths if n not in wanted]:
            self.unregister(name)
        fresh = [n for n in wanted if n not in self.paths or self.paths[n] != wanted[n]]
        for name in fresh:
            self.register(name, wanted[name])
        self.release(busy)
        for name in fresh:
            if len(self.resident) < self.max_resident:
                try:
                    self.ensure(name, busy)
                except AdapterError as exc:
                    log.error("adapter %s cannot be served: %s", name, exc)

    def known(self, name: str) -> bool:
        return name in self.paths

    def release(self, busy: set[str]) -> None:
        """Drop resident adapters that are no longer registered and that no sequence uses."""
        for name in [n for n in self.resident if n not in self.paths and n not in busy]:
            self._evict(name)

    # -- residency -----------------------------------------------------------------------------------
    def key(self, name: str | None) -> int:
        """The resident adapter's id (0: the base), as the prefix cache namespaces prefixes."""
        return 0 if name is None else self.resident[name].key

    def ensure(self, name: str, busy: set[str]) -> bool:
        """Make `name` resident (loading it, evicting the least recently used adapter not in `busy`); False
        when every resident adapter is in use. AdapterError when it is unknown or does not load."""
        found = self.resident.get(name)
        if found is not None:
            self.resident.move_to_end(name)
            return True
        if name not in self.paths:
            raise AdapterError(f"the adapter {name!r} is not loaded on this worker")
        while len(self.resident) >= self.max_resident:
            victim = next((n for n in self.resident if n not in busy), None)
            if victim is None:
                return False
            self._evict(victim)
        self._load(name, Path(self.paths[name]))
        return True

    def _load(self, name: str, path: Path) -> None:
        started = time.perf_counter()
        files = read_adapter(path)
        check_base(files, self.model.config.to_dict(), self.base_names)
        device, dtype = self.model.device, self.model.dtype
        # On a CPU the deltas' rank-r matmuls run in fp32: oneDNN's bf16 matmul costs 2.5x fp32's at these sizes
        # (8 rows x 576 -> 16 -> 1536: 75 vs 30 us), and the delta is rounded once, where it is added. Where the C
        # kernel runs, a bf16 model's A and B are kept in bf16 (its sums stay fp32): half the bytes to read at every
        # step, and a quarter less kernel time in bench/lora_bench.py's mixed batch; an error far below the bf16
        # rounding of the base output (or of a bf16 merge of the adapter into the base).
        delta_dtype = torch.float32 if device.type == "cpu" else dtype
        if device.type == "cpu" and dtype == torch.bfloat16 and kernel_here() is not None:
            delta_dtype = dtype
        targets: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt", device="cpu") as f:
            for m in files.modules:
                module = self._module(m.path)
                if (module.in_features, module.out_features) != (m.in_features, m.out_features):
                    raise AdapterError(
                        f"{m.path}: the adapter maps {m.in_features} -> {m.out_features}; the model's layer maps "
                        f"{module.in_features} -> {module.out_features}"
                    )
                a = f.get_tensor(m.a_key).to(device=device, dtype=torch.float32)
                bt = f.get_tensor(m.b_key).to(device=device, dtype=torch.float32).T * m.scale
                targets.append((m.path, a.to(delta_dtype).contiguous(), bt.to(delta_dtype).contiguous()))
        key = next(self._keys)
        for path_, a, bt in targets:
            self._wrap(path_).set_delta(key, a, bt)
        seconds = time.perf_counter() - started
        self.resident[name] = Resident(key, [t[0] for t in targets], seconds)
        self.names = tuple(sorted(self.resident))
        self.loads += 1
        log.info("adapter %s loaded in %.3f s (%d projections)", name, seconds, len(targets))

    def _module(self, path: str) -> Any:
        """The projection at `path` (its wrapper's base when already wrapped)."""
        if path in self.wrapped:
            return self.wrapped[path]
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise AdapterError(f"{path}: no such module in the base model") from None
        if not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            raise AdapterError(f"{path} is not a linear layer in the base model")
        return module

    def _wrap(self, path: str) -> LoraLinear:
        found = self.wrapped.get(path)
        if found is None:
            parent_path, _, child = path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            found = LoraLinear(getattr(parent, child), self.context)
            setattr(parent, child, found)
            self.wrapped[path] = found
        return found

    def _evict(self, name: str) -> None:
        gone = self.resident.pop(name, None)
        if gone is None:
            return
        for path in gone.modules:
            self.wrapped[path].drop_delta(gone.key)
        self.names = tuple(sorted(self.resident))
        log.info("adapter %s evicted", name)

    # -- the next forward ------------------------------------------------------------------------------
    def bind(self, names: list[str | None]) -> None:
        """The adapter of each row of the next forward (None: the base)."""
        ctx = self.context
        ctx.rows = len(names)
        ctx.order, ctx.spans = None, []
        ctx.keys, ctx.slot_rows, ctx.slot_starts = (), None, None
        if not any(names):
            ctx.groups = []
            return
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                rows.setdefault(name, []).append(i)
        device = self.model.device
        keys = [self.resident[n].key for n in rows]
        order = [i for r in rows.values() for i in r]  # the rows adapter by adapter
        starts = list(itertools.accumulate((len(r) for r in rows.values()), initial=0))
        if device.type == "cpu" and kernel_here() is not None:
            ctx.keys = tuple(keys)
            ctx.slot_rows = torch.tensor(order, dtype=torch.int32)
            ctx.slot_starts = torch.tensor(starts, dtype=torch.int32)
        first = names[0]
        if first is not None and len(rows) == 1 and len(rows[first]) == len(names):  # every row runs one adapter
            ctx.groups = [(keys[0], None)]
            return
        ctx.groups = [(key, torch.tensor(r, device=device)) for key, r in zip(keys, rows.values(), strict=True)]
        if len(rows) > 1:
            ctx.spans = [(key, starts[j], starts[j + 1]) for j, key in enumerate(keys)]
            ctx.order = torch.tensor(order, device=device)

    def clear(self) -> None:
        self.context.groups = []
        self.context.order, self.context.spans = None, []
        self.context.keys, self.context.slot_rows, self.context.slot_starts = (), None, None
