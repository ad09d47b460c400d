"""The runner: every model forward and every KV-cache touch. A running batch of sequences on one KV cache:
grouped prefill, left-padded merge, decode, row removal.

Rows are right-aligned: each row's cache holds `T` positions of which the leading ones may be padding
(mask 0). Position ids are counted per row from its first real token, as `generate` does, so a row that
joins mid-flight sees exactly the positions it would see alone.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from worker.engine.lean import LeanForward
from worker.engine.pooling import Pooling, pool
from worker.engine.prefix_cache import Prefix

# Positions a layer's keys and values grow by at once, per device type (0: a `torch.cat` every step, as
# `DynamicCache` does). A `torch.cat` copies every layer's whole cache on every step: on this CPU at 32 rows of
# SmolLM2-135M's shape (30 layers, 3 kv heads) growing from 40 to 104 positions that was 6.7-11.7 ms a step
# against 0.9-1.3 ms in chunks of 64 (bench/step_bench.py --kv-chunk); on a GPU it is a full copy per step.
KV_CHUNK: dict[str, int] = {"cuda": 256, "cpu": 64}


@functools.cache
def cache_keyword(model_cls: Any) -> str:
    """The forward keyword for the KV cache (`cache` in transformers 5.x, `past_key_values` before)."""
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _lpad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Left-pad `x` with zeros along `dim` (from the end) to `length`."""
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(x, pad)


class ChunkedLayer(DynamicLayer):
    """A cache layer with spare room: a step writes its new positions into it instead of copying the whole layer;
    `keys` / `values` stay views of the filled positions. Anything that replaces `keys` (a merge, a row removal,
    a crop) just makes the next step move into a fresh buffer (the layer knows the views it handed out)."""

    chunk = 64
    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _kview: torch.Tensor | None = None
    _vview: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert key_states.dim() == 4
        n = key_states.shape[-2]
        kbuf, vbuf, filled = self.reserve(n, key_states, value_states)
        kbuf[:, :, filled : filled + n] = key_states
        vbuf[:, :, filled : filled + n] = value_states
        return self.advance(n)

    def reserve(
        self, n: int, key_like: torch.Tensor | None = None, value_like: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The buffers [B, kv_heads, room, d] with room for `n` more positions after the filled ones, and the index
        of the first free one; the caller writes there, then `advance(n)`. `key_like` / `value_like`: the batch,
        heads and dim of a fresh buffer (the filled keys and values themselves when None)."""
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        filled = keys.shape[-2] if keys.dim() == 4 else 0
        kbuf, vbuf = self._kbuf, self._vbuf
        if (
            kbuf is None
            or vbuf is None
            or keys is not self._kview
            or values is not self._vview
            or filled + n > kbuf.shape[-2]
        ):
            spare = n + self.chunk
            kbuf = _room(keys, keys if key_like is None else key_like, filled, spare)
            vbuf = _room(values, values if value_like is None else value_like, filled, spare)
            self._kbuf, self._vbuf = kbuf, vbuf
        return kbuf, vbuf, filled

    def advance(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values with the `n` positions written after `reserve` counted in."""
        assert self._kbuf is not None and self._vbuf is not None and self.keys is not None
        filled = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        self.keys = self._kview = self._kbuf[:, :, : filled + n]
        self.values = self._vview = self._vbuf[:, :, : filled + n]
        return self.keys, self.values


def _room(cur: torch.Tensor, new: torch.Tensor, filled: int, spare: int) -> torch.Tensor:
    """A fresh buffer of `filled + spare` positions holding `cur`'s `filled` ones (new's batch, heads and dim)."""
    b, h, _, d = new.shape
    buf = new.new_empty(b, h, filled + spare, d)
    if filled:
        buf[:, :, :filled] = cur
    return buf


def new_cache(device: torch.device) -> Any:
    """The cache for a prefill: full layers everywhere (sliding-window layers are masked, not cropped), grown
    in chunks where `KV_CHUNK` says so for this device."""
    chunk = KV_CHUNK.get(device.type, 0)
    if not chunk:
        return DynamicCache()
    cache = DynamicCache()
    Cache.__init__(cache, layer_class_to_replicate=_chunked(chunk))
    return cache


@functools.cache
def _chunked(chunk: int) -> type[ChunkedLayer]:
    return type("ChunkedLayer", (ChunkedLayer,), {"chunk": chunk})


class KVBatch:
    """The cache, mask, last token and next position of every row of one batch."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] long, 1 = real position
        self.last: torch.Tensor | None = None  # [B] the token to feed next (not yet in the cache)
        self.pos: torch.Tensor | None = None  # [B] position id of that token
        self.padded = False  # whether any column of `mask` is 0 (a step without padding needs no attention mask)

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def reset(self) -> None:
        self.cache = self.mask = self.last = self.pos = None
        self.padded = False

    def merge(self, other: KVBatch) -> None:
        """Append the rows of `other` (left-padding the shorter cache)."""
        if other.rows == 0:
            return
        if self.rows == 0:
            self.cache, self.mask, self.last, self.pos = other.cache, other.mask, other.last, other.pos
            self.padded = other.padded
            return
        assert self.mask is not None and other.mask is not None
        width = max(self.width, other.width)
        # read before the merge: the narrower side's rows get padding columns (a wider arrival pads the batch)
        self.padded = self.padded or other.padded or self.width != other.width
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_lpad(mine.keys, width, -2), _lpad(theirs.keys, width, -2)], 0)
            mine.values = torch.cat([_lpad(mine.values, width, -2), _lpad(theirs.values, width, -2)], 0)
        self.mask = torch.cat([_lpad(self.mask, width, -1), _lpad(other.mask, width, -1)], 0)
        self.last = torch.cat([self.last, other.last])  # type: ignore[list-item]
        self.pos = torch.cat([self.pos, other.pos])  # type: ignore[list-item]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop cache columns that are padding in every row left."""
        if not rows:
            self.reset()
            return
        if rows == list(range(self.rows)):
            return
        assert self.mask is not None and self.last is not None and self.pos is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        lead = int(mask.any(0).int().argmax())  # leading columns with no real position in any row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, lead:]
            layer.values = layer.values[index, :, lead:]
        self.mask = mask[:, lead:]
        self.last, self.pos = self.last[index], self.pos[index]
        self.padded = self.padded and not bool(self.mask.all())  # rows left: once per leave, not per step

    def crop(self, width: int) -> None:
        """Undo a partly applied forward (an exception mid-step): cut every layer back to `width`."""
        if self.cache is None:
            return
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.shape[-2] > width:
                layer.keys = layer.keys[:, :, :width]
                layer.values = layer.values[:, :, :width]
        if self.mask is not None and self.mask.shape[1] > width:
            self.mask = self.mask[:, :width]


def forward(
    model: Any,
    lean: LeanForward | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    cache: Any,
    padded: bool = True,
    all_logits: bool = False,
) -> torch.Tensor:
    """One forward of the fed ids [B, q] over `cache` (the lean forward when there is one, else transformers');
    returns the last position's logits [B, vocab], or every fed position's [B, q, vocab] with `all_logits`.
    `padded`: whether any column of `mask` is 0."""
    if lean is not None:
        return lean(ids, mask, pos, cache, padded=padded, all_logits=all_logits)
    keyword = cache_keyword(type(model))  # type: ignore[arg-type]  # a class is hashable; mypy's type[Any] is not
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        logits_to_keep=0 if all_logits else 1,
        **{keyword: cache},
    )
    return out.logits if all_logits else out.logits[:, -1]


def prefill(
    model: Any,
    prompts: list[list[int]],
    pad_id: int,
    prefix: Prefix | None = None,
    lean: LeanForward | None = None,
    all_logits: bool = False,
) -> tuple[KVBatch, torch.Tensor]:
    """Run the prompts as one left-padded forward; return their batch and last-position logits [B, vocab]
    (`all_logits`: every position's, [B, width, vocab], for rows that score their prompt).

    With a `prefix` (prefix cache), every prompt continues its KV: the rows' cache is the prefix, then each
    row's own tokens left-padded (the padding between them is masked; positions count real tokens only)."""
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    cache = new_cache(device)
    skip = 0
    if prefix is not None:  # prefix cache hook: every row continues the prefix's KV
        skip = prefix.length
        cache = new_cache(device)
        for i, (keys, values) in enumerate(prefix.layers(len(prompts))):
            cache.update(keys, values, i)
        mask = torch.cat([mask.new_ones(len(prompts), skip), mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -width:]
    padded = any(len(p) != width for p in prompts)
    logits = forward(model, lean, ids, mask, pos, cache, padded, all_logits)
    batch = KVBatch()
    batch.cache, batch.mask, batch.padded = cache, mask, padded
    batch.pos = torch.tensor([skip + len(p) for p in prompts], device=device)
    return batch, logits


def embed(model: Any, prompts: list[list[int]], pad_id: int, pooling: Pooling) -> torch.Tensor:
    """One left-padded forward of the prompts without a KV cache or logits; their pooled vectors [B, H] (float32).
    `model` is a base model (its last hidden states), or a causal LM whose `base_model` is one."""
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    body = getattr(model, "base_model", model)
    out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return pool(out.last_hidden_state, mask, pooling)


def repeat_rows(batch: KVBatch, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Expand a prefilled batch to `rows` (indices into its rows, repeats allowed: n samples or equal prompts
    share one prefill); return the matching logits."""
    assert batch.mask is not None and batch.pos is not None  # prefill sets both
    index = torch.tensor(rows, device=logits.device)
    for layer in batch.cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    batch.mask, batch.pos = batch.mask[index], batch.pos[index]
    return logits[index]


def decode(model: Any, batch: KVBatch, lean: LeanForward | None = None) -> torch.Tensor:
    """Feed each row its last chosen token; return the next-token logits [B, vocab]."""
    assert batch.mask is not None and batch.pos is not None and batch.last is not None
    width = batch.width
    mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
    try:
        logits = forward(model, lean, batch.last[:, None], mask, batch.pos[:, None], batch.cache, batch.padded)
    except BaseException:
        batch.crop(width)
        raise
    batch.mask, batch.pos = mask, batch.pos + 1
    return logits
