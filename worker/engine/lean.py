"""A lean decoder forward for the Llama, Qwen2 and Qwen3 families: the model's own modules and weights, without
transformers' per-layer generality.

transformers' forward builds a mask for every layer, dispatches attention through an interface table, runs
output hooks and wraps every result in a dataclass: at the few rows of a decode step that Python is most of the
step on a CPU (a step of a SmolLM2-135M-shaped model took ~20-40 ms where its weights take ~6.5 ms to read in
bf16). Here one step is: the embedding, the rotary cos/sin once (the model's own rotary module), per layer an
RMSNorm, the q/k/v projections (called as modules: other code wraps them; one matmul where they are packed as one,
plus what a wrapper adds), RoPE, the cache update, one
`scaled_dot_product_attention` under one mask built once per step (no mask at all when no row is padded and one
position is fed; in a decode step the query heads that share a kv head are that head's query positions: torch's
CPU attention kernel took 1.3 ms for 32 rows of 9 heads over 40 positions in bf16 with `enable_gqa`, 0.36 ms
grouped so; a decode step in bf16 on a CPU with AVX-512 BF16 runs the C kernel of `worker/cpu_attention.py`
instead, on the [B, kv] mask itself, which writes the [B, 1, heads * d] rows the output projection takes: ~6x
less than that grouped call), the output projection, a second RMSNorm and the gated MLP; then the final norm and the
lm_head on the last position only (or on every position when asked).

Anything else (another architecture, a sliding window, an unexpected module layout) keeps transformers' forward.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch
import torch.nn.functional as F

from worker import cpu_attention, cpu_kernels
from worker.cpu_kernels import add_rms_norm, norm_usable, rope_kv, rope_kv_usable, silu_mul, silu_mul_usable
from worker.lora_kernel import kernel_here

log = logging.getLogger(__name__)

FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODES = ("auto", "off")
SILU = ("SiLUActivation", "SiLU")  # transformers' and torch's SiLU modules
C_ACT_MIN = 16_384  # elements from which the C activation pays (see `_act_mul`)


def lean_forward_for(model: Any, mode: str = "auto") -> LeanForward | None:
    """The lean forward of `model`, or None (mode `off`, or a model it does not cover: transformers' forward)."""
    if mode not in MODES:
        raise ValueError(f"engine.lean_forward must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return None
    reason = unsupported(model)
    if reason:
        log.info("lean forward off: %s", reason)
        return None
    return LeanForward(model)


def unsupported(model: Any) -> str | None:
    """Why the lean forward cannot run this model (None: it can)."""
    name = type(model).__name__
    if name not in FAMILIES:
        return f"{name} is not one of {', '.join(FAMILIES)}"
    config = model.config
    types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in types) or (
        getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)
    ):
        return "sliding-window attention"
    base = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or any(not hasattr(base, n) for n in needed) or not hasattr(model, "lm_head"):
        return "an unexpected module layout"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
        if attn is None or mlp is None or any(not _is_rms_norm(n) for n in norms):
            return "an unexpected decoder layer"
        if any(not hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
            return "an unexpected attention module"
        if any(not hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "an unexpected MLP"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
        if hasattr(attn, "q_norm") and not (_is_rms_norm(attn.q_norm) and _is_rms_norm(attn.k_norm)):
            return "an unexpected q/k norm"
    if not _is_rms_norm(base.norm):
        return "an unexpected final norm"
    return None


def _is_rms_norm(module: Any) -> bool:
    return module is not None and hasattr(module, "weight") and hasattr(module, "variance_epsilon")


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """transformers' RMSNorm (`norm`: its weight and epsilon): normalized in fp32, cast back, then scaled by the
    weight in the input's dtype."""
    weight, eps = norm
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def _add_norm(
    h: torch.Tensor, add: torch.Tensor | None, norm: tuple[torch.Tensor, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + add, its RMSNorm): one C call for bf16 rows on a CPU where the kernel runs (worker/cpu_kernels.py),
    else the torch operations (the same roundings)."""
    weight, eps = norm
    if h.device.type == "cpu" and h.dtype == torch.bfloat16:
        if not h.is_contiguous():
            h = h.contiguous()
        if add is not None and not add.is_contiguous():
            add = add.contiguous()
        if norm_usable(h, add, weight):
            return add_rms_norm(h, add, weight, eps)
    if add is not None:
        h = h + add
    return h, _rms_norm(h, norm)


def _norm(module: Any) -> tuple[torch.Tensor, float]:
    return module.weight, float(module.variance_epsilon)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, q, d], as transformers' `apply_rotary_pos_emb`: x * cos + rotate_half(x) *
    sin, with the sign of rotate_half's first half moved into `signed_sin` (computed once per step)."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), -1), signed_sin)


def _act_mul(act: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up: one C call for SiLU on bf16 CPU rows where the kernel runs (worker/cpu_kernels.py), else the
    two torch operations (the same roundings). Below `C_ACT_MIN` elements torch's two calls cost less than the
    checks (at 32 rows of 1536 here: ~30 us in C against 0.3-1 ms for torch's bf16 silu and mul)."""
    if gate.numel() >= C_ACT_MIN and type(act).__name__ in SILU and silu_mul_usable(gate, up):
        return silu_mul(gate, up)
    return act(gate) * up


def _rope_into(
    layer: Any, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, rows: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A decode step's RoPE and cache write in one C call (q, k, v [B, heads * d], `rows` the step's cos and
    signed sin [B, d]): q rotated [B, heads, 1, d] and the layer's keys and values with the new position, or None
    where the layer or the tensors do not take it (torch's operations then)."""
    reserve = getattr(layer, "reserve", None)
    if reserve is None or getattr(layer, "keys", None) is None:
        return None
    kbuf, vbuf, at = reserve(1)
    cos, sin = rows
    if not rope_kv_usable([qs, ks, vs, cos, sin], kbuf, vbuf):
        return None
    q = rope_kv(qs, ks, vs, cos, sin, kbuf, vbuf, at)
    keys, values = layer.advance(1)
    return q, keys, values


def _delta(module: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out`, a fused projection's share of `x`, plus what a wrapper of that projection adds (a LoRA adapter's
    delta: `add_deltas`); `out` as it is for a plain projection."""
    add = getattr(module, "add_deltas", None)
    return out if add is None else add(x, out)


def step_mask(mask: torch.Tensor, q: int) -> torch.Tensor:
    """The attention mask of one forward [B, 1, q, kv] (True: attend) from the 2-D mask [B, kv] (1: a real
    position, the last `q` columns the fed ones): causal, real keys only. A fed padding position attends to itself
    alone, so its keys and values stay finite (nothing real ever attends to them)."""
    kv = mask.shape[1]
    cols = torch.arange(kv, device=mask.device)
    own = torch.arange(kv - q, kv, device=mask.device)[:, None]  # the column of each fed position
    allowed = (cols <= own)[None] & (mask[:, None, :].bool() | (cols == own)[None])
    return allowed[:, None]


class LeanForward:
    """One model's lean forward (see the module's docstring)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        base = model.model
        self.base = base
        attn = base.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        config = model.config
        self.gqa = config.num_attention_heads != config.num_key_value_heads
        self.qk_norm = hasattr(attn, "q_norm")
        # Per layer: its attention and MLP modules (their projections are looked up at every call: other code may
        # wrap them), and the weight and epsilon of its norms (input, post-attention, q and k).
        self.layers = [
            (
                layer.self_attn,
                layer.mlp,
                _norm(layer.input_layernorm),
                _norm(layer.post_attention_layernorm),
                _norm(layer.self_attn.q_norm) if self.qk_norm else None,
                _norm(layer.self_attn.k_norm) if self.qk_norm else None,
            )
            for layer in base.layers
        ]
        self.norm = _norm(base.norm)

    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: Any,
        *,
        padded: bool = True,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits of the last fed position [B, vocab] (every fed position [B, q, vocab] with `all_logits`).

        ids [B, q] (left-padded), mask [B, kv] over the cache and the fed positions (1: real), pos [B, q] the
        position ids, cache a transformers cache (`cache.update(k, v, layer)` per layer); `padded`: whether any
        column of `mask` is 0 (False lets a one-position step skip the mask)."""
        base = self.base
        b, q = ids.shape
        h = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(h, pos)
        half = sin.shape[-1] // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), -1)[:, None]
        # torch's attention under one mask built once per step, none where no row is padded and one position is
        # fed or the prefill is plainly causal; a decode step in bf16 on a CPU attends in C instead
        # (worker/cpu_attention.py), reading the [B, kv] mask itself.
        plain = not padded and (q == 1 or mask.shape[1] == q)
        attn_mask: torch.Tensor | None = None
        kernel = q == 1 and h.device.type == "cpu" and h.dtype == torch.bfloat16
        kernel = kernel and cpu_attention.available(self.head_dim)
        kernel_mask = None if plain else mask
        if kernel and kernel_mask is not None and (kernel_mask.dtype != torch.int64 or kernel_mask.stride(-1) != 1):
            kernel_mask = kernel_mask.to(torch.int64).contiguous()
        # a decode step in bf16 on a CPU: RoPE of q and k and the cache write in one C call per layer, into the
        # room a chunked cache layer reserves (worker/cpu_kernels.py `rope_kv`)
        rows = (cos.view(b, -1), sin.view(b, -1)) if kernel and cpu_kernels.kernel() is not None else None
        shape = (b, q, -1, self.head_dim)
        pending: torch.Tensor | None = None  # the last MLP's output, not yet added to the residual h
        step = _FusedStep.start(self, h, rows, kernel_mask) if rows is not None else None
        for i, (attn, mlp, in_norm, post_norm, q_norm, k_norm) in enumerate(self.layers):
            if step is not None and i < len(cache.layers) and step.run(i, attn, mlp, h, pending, cache.layers[i]):
                pending = step.pending  # the whole layer ran in one C call (`_FusedStep`)
                continue
            h, x = _add_norm(h, pending, in_norm)
            qkv = getattr(attn, "fused_qkv", None)
            if qkv is not None:  # q/k/v packed as one matrix (worker/cpu_weights.py): one matmul, then split
                qs, ks, vs = qkv.split(qkv(x))
                qs, ks, vs = _delta(attn.q_proj, x, qs), _delta(attn.k_proj, x, ks), _delta(attn.v_proj, x, vs)
            else:
                qs, ks, vs = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            qs, ks, vs = qs.view(shape), ks.view(shape), vs.view(shape)
            if q_norm is not None and k_norm is not None:
                qs, ks = _rms_norm(qs, q_norm), _rms_norm(ks, k_norm)
            layer = cache.layers[i] if rows is not None and i < len(cache.layers) else None
            written = _rope_into(layer, qs.view(b, -1), ks.view(b, -1), vs.view(b, -1), rows) if layer else None
            if written is not None:
                qs, ks, vs = written
            else:
                qs = _rope(qs.transpose(1, 2), cos, sin)
                ks = _rope(ks.transpose(1, 2), cos, sin)
                ks, vs = cache.update(ks, vs.transpose(1, 2), i)
            if kernel and cpu_attention.usable(qs, ks, vs, kernel_mask):
                out = cpu_attention.decode_attention(qs, ks, vs, kernel_mask, self.scaling)  # [B, 1, heads * d]
                h, x = _add_norm(h, attn.o_proj(out), post_norm)
            else:
                if not plain and attn_mask is None:
                    attn_mask = step_mask(mask, q)
                out = self._sdpa(qs, ks, vs, attn_mask, plain and q > 1)
                h, x = _add_norm(h, attn.o_proj(out.transpose(1, 2).reshape(b, q, -1)), post_norm)
            gate_up = getattr(mlp, "fused_gate_up", None)
            if gate_up is not None:
                gate, up = gate_up.split(gate_up(x))
                gate, up = _delta(mlp.gate_proj, x, gate), _delta(mlp.up_proj, x, up)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            pending = mlp.down_proj(_act_mul(mlp.act_fn, gate, up))  # added to h by the next norm
        if not all_logits:
            h, pending = h[:, -1], None if pending is None else pending[:, -1]
        return self.model.lm_head(_add_norm(h, pending, self.norm)[1])

    def fused_layers(self) -> list[FusedLayer | None]:
        """Each layer's constants for the one-call decode layer (None where a layer does not qualify), built once."""
        found = self.__dict__.get("_fused")
        if found is None:
            found = self.__dict__["_fused"] = [
                FusedLayer.build(attn, mlp, in_norm, post_norm, self.scaling, self.head_dim) if q_norm is None else None
                for attn, mlp, in_norm, post_norm, q_norm, _ in self.layers
            ]
        return found

    def _sdpa(
        self, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """torch's attention [B, heads, q, d] of qs [B, heads, q, d] over the cached ks / vs [B, kv_heads, kv, d]."""
        b, _, q, d = qs.shape
        if q == 1 and self.gqa:  # decode: each kv head's group of query heads as its query positions
            return F.scaled_dot_product_attention(
                qs.view(b, ks.shape[1], -1, d), ks, vs, attn_mask=attn_mask, scale=self.scaling
            ).view(b, -1, 1, d)
        return F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=attn_mask, is_causal=causal, scale=self.scaling, enable_gqa=self.gqa
        )


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FusedLayer:
    """One decoder layer's constants for `decode_layer_bf16` (worker/cpu_kernels.py): the packed weights' and
    biases' addresses, the norms' weights, the shapes; the modules it was built from (a LoRA wrapper's base), so a
    layer whose projections were since replaced runs the per-operation path instead; LoRA rows of a step go into
    the call through `lora`."""

    def __init__(self, modules: dict[str, Any], args: Any, floats: Any, keep: list[torch.Tensor]) -> None:
        self.modules = modules
        self.args, self.floats, self.keep = args, floats, keep
        # (where a module holds its weight: its parameters, buffers or attributes; the packed weight whose address
        # `args` holds)
        self.weights: list[tuple[dict[str, Any], torch.Tensor]] = []
        self.lora_desc = (ctypes.c_int64 * (3 + 4 * len(PROJECTIONS)))()
        self.bases = [(name, modules[name]) for name in PROJECTIONS]
        self.hidden, self.heads, self.kv_heads, self.d, self.inter = (
            int(args[cpu_kernels.DL[k]]) for k in ("hidden", "heads", "kv_heads", "d", "inter")
        )

    @classmethod
    def build(
        cls,
        attn: Any,
        mlp: Any,
        in_norm: tuple[torch.Tensor, float],
        post_norm: tuple[torch.Tensor, float],
        scale: float,
        head_dim: int,
    ) -> FusedLayer | None:
        """The layer's constants, or None when a part of it is not what the C layer runs: q/k/v and gate/up packed
        as one tile matrix each, o and down packed as tiles, SiLU, bf16 norms, a head dim the attention takes."""
        qkv, gate_up = getattr(attn, "fused_qkv", None), getattr(mlp, "fused_gate_up", None)
        o, down = _unwrapped(getattr(attn, "o_proj", None)), _unwrapped(getattr(mlp, "down_proj", None))
        parts = [qkv, o, gate_up, down]
        packs = [None if p is None else p.__dict__.get("packing") for p in parts]
        if any(p is None or not p.tiles for p in packs) or type(mlp.act_fn).__name__ not in SILU:
            return None
        if head_dim not in cpu_attention.HEAD_DIMS or qkv is None or gate_up is None:
            return None
        norms = (in_norm[0], post_norm[0])
        hidden = int(norms[0].shape[-1])
        if any(n.dtype != torch.bfloat16 or not n.is_contiguous() for n in norms) or hidden > cpu_kernels.MAX_DIM:
            return None
        heads = int(qkv.sizes[0]) // head_dim
        kv_heads = int(qkv.sizes[1]) // head_dim
        inter = int(gate_up.sizes[0])
        assert o is not None and down is not None
        shapes_ok = (
            len(qkv.sizes) == 3
            and qkv.sizes[1] == qkv.sizes[2]
            and heads * head_dim == qkv.sizes[0]
            and heads % max(kv_heads, 1) == 0
            and len(gate_up.sizes) == 2
            and gate_up.sizes[1] == inter
            and inter % 16 == 0
            and tuple(qkv.weight.shape) == (qkv.sizes[0] + 2 * qkv.sizes[1], hidden)
            and tuple(o.weight.shape) == (hidden, heads * head_dim)
            and tuple(gate_up.weight.shape) == (2 * inter, hidden)
            and tuple(down.weight.shape) == (hidden, inter)
        )
        if not shapes_ok:
            return None
        args = (ctypes.c_int64 * len(cpu_kernels.DL))()
        keep: list[torch.Tensor] = [*norms]
        for key, module, packing in zip(("qkv", "o", "gu", "down"), parts, packs, strict=True):
            assert module is not None and packing is not None
            args[cpu_kernels.DL[f"{key}_w"]] = module.weight.data_ptr()
            keep.append(module.weight)
            if packing.bias is not None:
                args[cpu_kernels.DL[f"{key}_b"]] = packing.bias.data_ptr()
                keep.append(packing.bias)
        args[cpu_kernels.DL["in_w"]], args[cpu_kernels.DL["post_w"]] = (n.data_ptr() for n in norms)
        for key, value in (("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads), ("d", head_dim)):
            args[cpu_kernels.DL[key]] = value
        args[cpu_kernels.DL["inter"]] = inter
        floats = (ctypes.c_float * 3)(in_norm[1], post_norm[1], scale)
        modules = {name: _unwrapped(getattr(attn if name in PROJECTIONS[:4] else mlp, name)) for name in PROJECTIONS}
        modules |= {"fused_qkv": qkv, "fused_gate_up": gate_up}
        plan = cls(modules, args, floats, keep)
        plan.weights = [(_holder(p), p.weight) for p in (qkv, o, gate_up, down)]
        return plan

    def current(self, attn: Any, mlp: Any) -> bool:
        """Whether the layer still holds the modules this was built from (a LoRA wrapper counts as its base: its
        deltas are added by `lora`)."""
        for name, module in self.modules.items():
            now = (attn if name in ("q_proj", "k_proj", "v_proj", "o_proj", "fused_qkv") else mlp)._modules.get(name)
            if now is module:
                continue
            if getattr(now, "context", None) is None or getattr(now, "base", None) is not module:
                return False
        return all(holder.get("weight") is weight for holder, weight in self.weights)

    def lora(self, attn: Any, mlp: Any, rows: int) -> int | None:
        """The step's LoRA descriptor for `decode_layer_bf16` (DL_LORA, see `dl_lora` in worker/cpu_kernels.py): 0
        when no adapter has rows in the step; None when one has and the LoRA kernel does not take its projections
        here (the per-operation path adds them then)."""
        a, m = attn._modules, mlp._modules
        wrapped = [
            (p, now) for p, (name, base) in enumerate(self.bases) if (now := (a if p < 4 else m)[name]) is not base
        ]
        if not wrapped:
            return 0
        desc, bound = self.lora_desc, None
        for p in range(len(PROJECTIONS)):
            desc[3 + 4 * p] = 0
        for p, now in wrapped:  # LoRA wrappers (`current` checked them)
            context, entry = now.context, 3 + 4 * p
            if not context.groups:
                continue
            if not context.keys:
                return None  # rows bound without the kernel's grouping (its torch path runs)
            if not any(key in now.deltas for key in context.keys):
                continue
            if bound is None:
                starts = context.slot_starts
                if kernel_here() is None or context.rows != rows or context.slot_rows is None or starts is None:
                    return None
                bound = context
                desc[0], desc[1] = context.slot_rows.data_ptr(), starts.data_ptr()
                desc[2] = len(context.keys)
            elif context is not bound:
                return None
            table = now.kernel_table()
            if table is None:
                return None
            desc[entry], desc[entry + 1], desc[entry + 2] = table.pointers
            desc[entry + 3] = table.wbf16
        return 0 if bound is None else ctypes.addressof(desc)

    def scratch_size(self, rows: int) -> int:
        nqkv = (self.heads + 2 * self.kv_heads) * self.d
        return rows * (2 * self.hidden + nqkv + 2 * self.heads * self.d + 3 * self.inter)


def _holder(module: Any) -> dict[str, Any]:
    """The dict a module keeps its `weight` in (a parameter, a buffer or a plain attribute): a lookup in it is ~10x
    cheaper than `module.weight` through `nn.Module.__getattr__`, and sees a replaced weight all the same."""
    for holder in (module.__dict__.get("_parameters"), module.__dict__.get("_buffers"), module.__dict__):
        if holder is not None and "weight" in holder:
            return holder
    return module.__dict__


def _unwrapped(module: Any) -> Any:
    """The projection a LoRA wrapper (worker/lora.py) wraps, else the module itself."""
    return module.base if getattr(module, "context", None) is not None and hasattr(module, "base") else module


class _FusedStep:
    """A decode step's layers in one C call each where they qualify (`FusedLayer`): the step's scratch, the
    residual h updated in place, the MLP output handed to the next layer in `pending`."""

    def __init__(self, layers: list[FusedLayer | None], h: torch.Tensor, rows: Any, mask: torch.Tensor | None) -> None:
        self.layers = layers
        self.b = int(h.shape[0])
        first = next(p for p in layers if p is not None)
        self.scratch = torch.empty(first.scratch_size(self.b), dtype=torch.bfloat16)
        self.pending = torch.empty_like(h)
        self.lib = cpu_kernels.kernel()
        cos, sin = rows
        self.common = {
            "b": self.b,
            "cos": cos.data_ptr(),
            "ssin": sin.data_ptr(),
            "ldc": cos.stride(0),
            "mask": 0 if mask is None else mask.data_ptr(),
            "mask_ld": 0 if mask is None else mask.stride(0),
            "scratch": self.scratch.data_ptr(),
            "pending_out": self.pending.data_ptr(),
        }

    @classmethod
    def start(cls, lean: LeanForward, h: torch.Tensor, rows: Any, mask: torch.Tensor | None) -> _FusedStep | None:
        """The step's state when some layer runs in one call and the step's tensors allow it, else None."""
        layers = lean.fused_layers()
        cos, sin = rows
        if not any(layers) or not h.is_contiguous() or h.shape[1] != 1:
            return None
        if cos.stride(-1) != 1 or sin.stride() != cos.stride() or cos.shape[-1] != lean.head_dim:
            return None
        return cls(layers, h, rows, mask)

    def run(self, i: int, attn: Any, mlp: Any, h: torch.Tensor, pending: torch.Tensor | None, layer: Any) -> bool:
        """Layer i in one call (h updated in place, its MLP output in `self.pending`); False where it does not
        qualify this step (nothing done: the per-operation path runs it)."""
        plan = self.layers[i]
        reserve = getattr(layer, "reserve", None)
        if plan is None or reserve is None or getattr(layer, "keys", None) is None or not plan.current(attn, mlp):
            return False
        lora = plan.lora(attn, mlp, self.b)
        if lora is None:
            return False
        if pending is not None and (not pending.is_contiguous() or pending.dtype != torch.bfloat16):
            return False
        kbuf, vbuf, at = reserve(1)
        if kbuf.stride() != vbuf.stride() or kbuf.stride(-1) != 1 or kbuf.stride(2) != plan.d:
            return False
        if kbuf.dtype != torch.bfloat16 or kbuf.shape[1] != plan.kv_heads or kbuf.shape[0] != self.b:
            return False
        args, dl = plan.args, cpu_kernels.DL
        for key, value in self.common.items():
            args[dl[key]] = value
        args[dl["h"]] = h.data_ptr()
        args[dl["pending"]] = 0 if pending is None else pending.data_ptr()
        args[dl["kbuf"]], args[dl["vbuf"]] = kbuf.data_ptr(), vbuf.data_ptr()
        args[dl["sb"]], args[dl["sh"]], args[dl["at"]] = kbuf.stride(0), kbuf.stride(1), at
        args[dl["lora"]] = lora
        assert self.lib is not None
        if self.lib.decode_layer_bf16(args, plan.floats):
            raise MemoryError("decode layer: no scratch memory")
        layer.advance(1)
        return True
