"""A prefix cache across jobs: the KV of prompt prefixes this engine already computed, kept in blocks.

A prompt is cut into blocks of `BLOCK` tokens. Block i is stored under (the id of block i-1's node, its token
ids), so a key names its whole prefix exactly (no hash collision can hand out another prompt's KV). A node
holds its block's keys and values for every layer as one tensor [layers, 2, kv_heads, BLOCK, head_dim]. RoPE
positions of a prefix are 0..P-1 whatever follows it, so a cached prefix is reused verbatim.

Prefixes computed under a LoRA adapter differ from the base's: each adapter load has its own namespace `ns`
(the first block's parent id is `-ns`; the base's is 0), so its blocks never match another's.

A lookup reuses the longest chain of cached blocks strictly shorter than the prompt (the last prompt token is
always computed: its logits choose the first new token). Memory holds at most `max_tokens` tokens of blocks;
when full, the least recently used leaf goes. A chain is touched deepest first, so every node is older than its
ancestors and eviction never cuts a chain in the middle. Everything handed out is a copy: evicting a block
never changes a prefix that a prefill is using.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BLOCK = 16


@dataclass(eq=False)
class Prefix:
    """The KV of the first `length` tokens of some prompts: [layers, 2, kv_heads, length, head_dim]."""

    ids: tuple[int, ...]
    kv: torch.Tensor

    @property
    def length(self) -> int:
        return len(self.ids)

    def layers(self, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [rows, kv_heads, length, head_dim], views of this prefix."""
        return [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.kv[:, :, None].unbind(0)]


class _Node:
    __slots__ = ("children", "id", "key", "kv", "parent")

    def __init__(self, node_id: int, key: tuple[int, tuple[int, ...]], kv: torch.Tensor, parent: _Node | None):
        self.id, self.key, self.kv, self.parent, self.children = node_id, key, kv, parent, 0


class PrefixCache:
    """Block-granular LRU cache of prompt-prefix KV, bounded to `max_tokens` tokens."""

    def __init__(self, max_tokens: int, block: int = BLOCK) -> None:
        self.block, self.capacity = block, max(0, max_tokens) // block
        self.nodes: OrderedDict[tuple[int, tuple[int, ...]], _Node] = OrderedDict()
        self._ids = itertools.count(1)
        self.hit_tokens = self.stored_tokens = self.evicted_tokens = 0

    @property
    def tokens(self) -> int:
        """Tokens held (whole blocks); never above the bound."""
        return len(self.nodes) * self.block

    def _walk(self, ids: Sequence[int], blocks: int, ns: int = 0) -> list[_Node]:
        """The cached chain of the first `blocks` blocks of `ids` (as far as it goes) in namespace `ns`."""
        chain: list[_Node] = []
        b = self.block
        for i in range(blocks):
            node = self.nodes.get((chain[-1].id if chain else -ns, tuple(ids[i * b : (i + 1) * b])))
            if node is None:
                break
            chain.append(node)
        return chain

    def _touch(self, chain: list[_Node]) -> None:
        for node in reversed(chain):  # ancestors end up more recent than their descendants
            self.nodes.move_to_end(node.key)

    def match(self, ids: Sequence[int], ns: int = 0) -> int:
        """How many leading tokens of a prompt the cache can serve (whole blocks, fewer than the prompt)."""
        return len(self._walk(ids, (len(ids) - 1) // self.block, ns)) * self.block

    def get(self, ids: Sequence[int], ns: int = 0) -> Prefix | None:
        """The longest cached prefix of a prompt, shorter than it (a copy), or None."""
        chain = self._walk(ids, (len(ids) - 1) // self.block, ns)
        if not chain:
            return None
        self._touch(chain)
        length = len(chain) * self.block
        self.hit_tokens += length
        return Prefix(tuple(ids[:length]), torch.cat([n.kv for n in chain], 3))

    def put(self, ids: Sequence[int], fetch: Callable[[int, int], torch.Tensor], ns: int = 0) -> int:
        """Store the full blocks of `ids` that are missing; `fetch(start, end)` gives the KV of tokens
        [start, end) as [layers, 2, kv_heads, end - start, head_dim]. Returns the blocks stored (as many
        as fit when least recently used leaves of other prompts are evicted)."""
        blocks = min(len(ids) // self.block, self.capacity)
        chain = self._walk(ids, blocks, ns)
        self._touch(chain)
        start = len(chain)
        keep = {n.key for n in chain}
        while len(self.nodes) + (blocks - start) > self.capacity and self._evict(keep):
            pass
        count = min(blocks - start, self.capacity - len(self.nodes))
        if count <= 0:
            return 0
        b = self.block
        kv = fetch(start * b, (start + count) * b)
        for i in range(start, start + count):
            parent = chain[-1] if chain else None
            key = (parent.id if parent else -ns, tuple(ids[i * b : (i + 1) * b]))
            node = _Node(next(self._ids), key, kv[:, :, :, (i - start) * b : (i - start + 1) * b].clone(), parent)
            self.nodes[key] = node
            if parent is not None:
                parent.children += 1
            chain.append(node)
        self._touch(chain)
        self.stored_tokens += count * b
        return count

    def _evict(self, keep: set[tuple[int, tuple[int, ...]]]) -> bool:
        """Drop the least recently used leaf outside `keep`; False when there is none."""
        for key, node in self.nodes.items():
            if not node.children and key not in keep:
                del self.nodes[key]
                if node.parent is not None:
                    node.parent.children -= 1
                self.evicted_tokens += self.block
                return True
        return False

    def uncached(self, ids: Sequence[int], beside: Sequence[int] | None = None, ns: int = 0) -> int:
        """The prompt tokens a prefill computes: beyond the cached prefix, or beyond the prefix shared with
        the arrival `beside` (computed once for both)."""
        shared = _shared_blocks(ids, beside, self.block) if beside is not None else 0
        return len(ids) - max(self.match(ids, ns), shared)

    def prefixes(
        self,
        contexts: list[list[int]],
        compute: Callable[[tuple[int, ...], Prefix | None], torch.Tensor],
        ns: int = 0,
    ) -> list[Prefix | None]:
        """The prefix each arrival's prefill starts from: the longest cached one, or one that several arrivals
        share, computed once here by `compute(ids, base)` (the KV of all of `ids`, continuing `base`) and
        stored. Arrivals given the same prefix get the same object."""
        fresh: list[Prefix] = []
        for ids in shared_prefixes(contexts, [self.match(c, ns) for c in contexts], self.block):
            if len(self._walk(ids, len(ids) // self.block, ns)) * self.block == len(ids):
                continue  # a shorter shared prefix computed just now completed it
            base = _longest(fresh, ids, self.match(ids, ns)) or self.get(ids, ns)
            kv = compute(ids, base)
            self.put(ids, functools.partial(_columns, kv), ns)
            fresh.append(Prefix(ids, kv))
        found: dict[tuple[int, ...], Prefix | None] = {}
        out: list[Prefix | None] = []
        for ctx in contexts:
            cached = self.match(ctx, ns)
            mine = _longest(fresh, ctx, cached)
            if mine is None and cached:
                key = tuple(ctx[:cached])
                mine = found[key] if key in found else found.setdefault(key, self.get(ctx, ns))
            out.append(mine)
        return out


def _columns(kv: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return kv[:, :, :, start:end]


def _longest(prefixes: list[Prefix], ids: Sequence[int], floor: int) -> Prefix | None:
    """The longest of `prefixes` that starts `ids`, is at least `floor` long and shorter than `ids`."""
    fits = [p for p in prefixes if floor <= p.length < len(ids) and tuple(ids[: p.length]) == p.ids]
    return max(fits, key=lambda p: p.length, default=None)


def _shared_blocks(a: Sequence[int], b: Sequence[int], block: int) -> int:
    """Leading tokens two prompts share, in whole blocks, fewer than either prompt."""
    limit, n = min(len(a), len(b)) - 1, 0
    while n + block <= limit and a[n : n + block] == b[n : n + block]:
        n += block
    return n


def shared_prefixes(contexts: list[list[int]], cached: list[int], block: int) -> list[tuple[int, ...]]:
    """Prefixes (whole blocks) that two or more of these prompts share beyond what is cached for them:
    each is worth computing once. Shortest first, so a longer one can continue a shorter one."""
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    best = [0] * len(contexts)
    for a, b in itertools.pairwise(order):
        if contexts[a] == contexts[b]:
            continue  # equal prompts (n samples) share one prefill anyway
        n = _shared_blocks(contexts[a], contexts[b], block)
        best[a], best[b] = max(best[a], n), max(best[b], n)
    wanted = {tuple(contexts[i][: best[i]]) for i in range(len(contexts)) if best[i] > cached[i]}
    return sorted(wanted, key=len)


def row_kv(layers: Any, row: int, start: int, end: int) -> torch.Tensor:
    """Columns [start, end) of one row of a cache's layers as [layers, 2, kv_heads, end - start, head_dim]."""
    return torch.stack(
        [torch.stack([layer.keys[row, :, start:end], layer.values[row, :, start:end]]) for layer in layers]
    )


def remember(cache: PrefixCache, layers: Any, prompts: list[list[int]], skip: int, ns: int = 0) -> None:
    """Store the full blocks of each prompt of a prefill just run: row r's cache is the shared first `skip`
    columns, padding, then the rest of its prompt right-aligned."""
    width = int(layers[0].keys.shape[-2])
    for row, ids in enumerate(prompts):
        gap = width - len(ids)  # padding columns between the prefix and the row's own tokens

        def fetch(start: int, end: int, row: int = row, gap: int = gap) -> torch.Tensor:
            if start >= skip:
                return row_kv(layers, row, start + gap, end + gap)
            if end <= skip:
                return row_kv(layers, row, start, end)
            return torch.cat([row_kv(layers, row, start, skip), row_kv(layers, row, skip + gap, end + gap)], 3)

        cache.put(ids, fetch, ns)


def sliding_window(config: Any) -> bool:
    """Whether a model attends through a window somewhere (a prefix with padding after it would shift it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types:
        return any(t != "full_attention" for t in types)
    return getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True) is not False


def prefix_cache_for(model: Any, max_tokens: int) -> PrefixCache | None:
    """The engine's prefix cache, or None: disabled (`max_tokens` under one block) or a sliding-window model."""
    if max_tokens < BLOCK or sliding_window(model.config):
        return None
    return PrefixCache(max_tokens)
