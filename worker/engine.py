"""The batching engine: one continuously batched decode loop over every sequence of a worker child.

Sequences join between decode steps (arrivals of one step are prefilled together, identical prompts
once, then merged into the running batch) and leave the moment they finish. Interactive and bulk
sequences run as two batches on their own caches, each of up to `max_batch` rows: while interactive
work is active, the bulk batch (and its prefills) takes one step in every `bulk_every`, so an
interactive job is never stuck behind a micro-batch.
A job is a batch of one: the same code path serves a lone job, n samples and a 32-line micro-batch.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.kv import KVBatch, decode, prefill
from worker.prefix_cache import Prefix, prefix_cache_for, remember, row_kv
from worker.sampling import RowPlan, Sampling, choose

INTERACTIVE, BULK = 0, 1


@dataclass(eq=False)
class Seq:
    """One generated sample and everything that decides when it stops."""

    key: str
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    budget: float = math.inf  # seconds of generation from admission
    top_logprobs: int = -1  # -1 none; else the chosen token's logprob and this many alternatives
    constraint: Any = None
    priority: int = INTERACTIVE
    tag: Any = None  # the owner's handle (job id and sample index, batch line, ...)
    out: list[int] = field(default_factory=list)  # generated ids (non-empty when resuming)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None  # eos | length | stop | time_limit | canceled | error
    canceled: bool = False
    deadline: float = math.inf
    text: str = ""  # kept current for sequences with stop strings; final once finished
    cached: int = 0  # leading context tokens whose KV came from a reused prefix (prefix cache)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def context(self) -> list[int]:
        return self.prompt + self.out


class Engine:
    """Owns the model's decode loop; not thread-safe (one driver calls `step`)."""

    def __init__(
        self,
        model: Any,
        decode_ids: Callable[[list[int]], str],
        eos_ids: list[int],
        pad_id: int,
        *,
        max_batch: int = 32,
        max_batch_tokens: int = 65536,
        bulk_every: int = 4,
        max_prefill_tokens: int = 8192,
        prefix_cache_tokens: int = 0,
    ) -> None:
        self.model, self.decode_ids = model, decode_ids
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.bulk_every, self.max_prefill_tokens = max(1, bulk_every), max_prefill_tokens
        self.waiting: dict[int, deque[Seq]] = {INTERACTIVE: deque(), BULK: deque()}
        self.running: dict[int, list[Seq]] = {INTERACTIVE: [], BULK: []}
        self.batches: dict[int, KVBatch] = {INTERACTIVE: KVBatch(), BULK: KVBatch()}
        self.steps = 0
        self.prefix_cache = prefix_cache_for(model, prefix_cache_tokens)  # None: no prefix cache

    # -- bookkeeping ---------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        """Queue a sequence; it joins at the next step (a finished resume finishes at once)."""
        self.waiting[seq.priority].append(seq)

    def sequences(self) -> list[Seq]:
        return [s for p in (INTERACTIVE, BULK) for s in (*self.running[p], *self.waiting[p])]

    def __len__(self) -> int:
        return sum(len(self.running[p]) + len(self.waiting[p]) for p in (INTERACTIVE, BULK))

    def rows(self, priority: int | None = None) -> int:
        classes = (INTERACTIVE, BULK) if priority is None else (priority,)
        return sum(len(self.running[p]) for p in classes)

    def room(self, priority: int = INTERACTIVE) -> int:
        """How many more sequences of a class fit (waiting ones count): each class has `max_batch` rows,
        so a full micro-batch never keeps an interactive job out."""
        return max(0, self.max_batch - self.rows(priority) - len(self.waiting[priority]))

    def _reserved(self, priority: int) -> int:
        return sum(len(s.prompt) + s.max_new_tokens for s in self.running[priority])

    # -- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Seq]:
        """Admit arrivals, take one decode step, and return the sequences that finished."""
        finished: list[Seq] = []
        now = time.monotonic()
        for p in (INTERACTIVE, BULK):
            self._sweep(p, now, finished)
        self._admit(INTERACTIVE, now, finished)
        # While interactive rows run, bulk rows (their prefills too) get one step in `bulk_every`.
        bulk_turn = not self.running[INTERACTIVE] or self.steps % self.bulk_every == 0
        if bulk_turn:
            self._admit(BULK, now, finished)
        for p in (INTERACTIVE, BULK):
            if self.running[p] and (p == INTERACTIVE or bulk_turn):
                self._decode(p, finished)
        self.steps += 1
        return finished

    def _sweep(self, p: int, now: float, finished: list[Seq]) -> None:
        """End canceled or late sequences, waiting or running, without a forward."""
        for seq in list(self.waiting[p]):
            if seq.canceled or (seq.budget <= 0):
                self.waiting[p].remove(seq)
                self._finish(seq, "canceled" if seq.canceled else "time_limit", finished)
        stopped = []
        for seq in self.running[p]:
            reason = "canceled" if seq.canceled else "time_limit" if now >= seq.deadline else None
            if reason and len(seq.out) < seq.max_new_tokens:
                self._finish(seq, reason, finished)
                stopped.append(seq)
        if stopped:
            self._drop(p, stopped)

    def _admit(self, p: int, now: float, finished: list[Seq]) -> None:
        waiting = self.waiting[p]
        if not waiting:
            return
        joining: list[Seq] = []
        tokens, reserved = 0, self._reserved(p)
        while waiting and self.rows(p) + len(joining) < self.max_batch:
            seq = waiting[0]
            need = len(seq.prompt) + seq.max_new_tokens
            cost = self._uncached(seq, joining)
            if joining and (tokens + cost > self.max_prefill_tokens or reserved + need > self.max_batch_tokens):
                break
            waiting.popleft()
            seq.deadline = now + seq.budget
            if len(seq.out) >= seq.max_new_tokens:  # resumed after its last token: nothing left to do
                self._finish(seq, "length", finished)
                continue
            joining.append(seq)
            tokens += cost
            reserved += need
        if not joining:
            return
        groups = [(prefix, g) for prefix, part in self._prefixes(p, joining) for g in _by_length(part, prefix)]
        for i, (prefix, group) in enumerate(groups):
            try:
                self._prefill(p, group, finished, prefix)
            except BaseException:  # the groups not prefilled yet wait for the next step too
                for _, rest in reversed(groups[i + 1 :]):
                    self.waiting[p].extendleft(reversed(rest))
                raise

    # -- prefix cache hooks: what an arrival's prefill computes, and the prefix it starts from ------
    def _uncached(self, seq: Seq, joining: list[Seq]) -> int:
        if self.prefix_cache is None:
            return len(seq.context())
        return self.prefix_cache.uncached(seq.context(), joining[-1].context() if joining else None)

    def _prefixes(self, p: int, joining: list[Seq]) -> list[tuple[Prefix | None, list[Seq]]]:
        """Arrivals grouped by the prefix they reuse: cached, or shared by several and computed once here."""
        if self.prefix_cache is None:
            return [(None, joining)]
        try:
            found = self.prefix_cache.prefixes([s.context() for s in joining], self._forward_prefix)
        except BaseException:  # interrupted or failed: they wait for the next step
            self.waiting[p].extendleft(reversed(joining))
            raise
        groups: dict[int, tuple[Prefix | None, list[Seq]]] = {}
        for seq, prefix in zip(joining, found):
            groups.setdefault(id(prefix), (prefix, []))[1].append(seq)
        return list(groups.values())

    def _forward_prefix(self, ids: tuple[int, ...], base: Prefix | None) -> torch.Tensor:
        """The KV of a shared prefix, continuing `base`: [layers, 2, kv_heads, len(ids), head_dim]."""
        batch, _ = prefill(self.model, [list(ids[base.length if base else 0 :])], self.pad_id, base)
        return row_kv(batch.cache.layers, 0, 0, len(ids))

    # -- prefill and decode ------------------------------------------------------------------------
    def _prefill(self, p: int, joining: list[Seq], finished: list[Seq], prefix: Prefix | None = None) -> None:
        """One left-padded forward for sequences of similar length (continuing one reused prefix), then merge
        them into the batch."""
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(s.context() or [self.eos_ids[0]]), len(unique)) for s in joining]
        skip = prefix.length if prefix is not None else 0
        try:
            prompts = [list(k) for k in unique]
            group, logits = prefill(self.model, [k[skip:] for k in prompts], self.pad_id, prefix)
            if self.prefix_cache is not None:  # prefix cache hook: keep the new full blocks of each prompt
                remember(self.prefix_cache, group.cache.layers, prompts, skip)
        except BaseException:  # interrupted or failed: they wait for the next step
            self.waiting[p].extendleft(reversed(joining))
            raise
        if len(unique) < len(joining):  # n samples (or equal prompts) share one prefill
            assert group.mask is not None and group.pos is not None  # prefill sets both
            index = torch.tensor(rows, device=logits.device)
            for layer in group.cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            group.mask, group.pos, logits = group.mask[index], group.pos[index], logits[index]
        for seq in joining:
            seq.cached = skip
        self._advance(joining, group, logits, finished)
        kept = [i for i, s in enumerate(joining) if not s.done]
        group.keep(kept)
        self.batches[p].merge(group)
        self.running[p].extend(joining[i] for i in kept)

    def _decode(self, p: int, finished: list[Seq]) -> None:
        batch = self.batches[p]
        logits = decode(self.model, batch)
        seqs = self.running[p]
        self._advance(seqs, batch, logits, finished)
        done = [s for s in seqs if s.done]
        if done:
            self._drop(p, done)

    def _drop(self, p: int, leaving: list[Seq]) -> None:
        gone = set(map(id, leaving))
        keep = [i for i, s in enumerate(self.running[p]) if id(s) not in gone]
        self.batches[p].keep(keep)
        self.running[p] = [self.running[p][i] for i in keep]

    def _advance(self, seqs: list[Seq], batch: KVBatch, logits: torch.Tensor, finished: list[Seq]) -> None:
        """Choose each row's next token, append it and decide whether the row is done."""
        plans = [
            RowPlan(s.sampling, s.context(), self.eos_ids if s.ignore_eos else [], s.constraint, s.top_logprobs)
            for s in seqs
        ]
        tokens, logprobs = choose(logits, plans)
        batch.last = torch.tensor(tokens, device=logits.device)
        for seq, tok, lp in zip(seqs, tokens, logprobs):
            seq.out.append(tok)
            if lp is not None:
                seq.logprobs.append((tok, *lp))
            if seq.constraint is not None:
                seq.constraint.accept(tok)
            reason = self._reason(seq, tok)
            if reason:
                self._finish(seq, reason, finished)

    def _reason(self, seq: Seq, tok: int) -> str | None:
        if tok in self.eos_ids and not seq.ignore_eos:
            return "eos"
        if seq.constraint is not None and seq.constraint.is_done():
            return "stop"
        if seq.stop:
            seq.text = self.decode_ids(seq.out)
            if any(s in seq.text for s in seq.stop):
                return "stop"
        if len(seq.out) >= seq.max_new_tokens:
            return "length"
        return None

    def _finish(self, seq: Seq, reason: str, finished: list[Seq]) -> None:
        seq.finish_reason = reason
        seq.text = self.decode_ids(seq.out)
        if reason == "stop" and seq.stop:
            cuts = [seq.text.find(s) for s in seq.stop if s in seq.text]
            seq.text = seq.text[: min(cuts)] if cuts else seq.text
        finished.append(seq)

    def fail_all(self, reason: str = "error") -> list[Seq]:
        """End every sequence (the model raised mid-step); the engine is empty afterwards."""
        finished: list[Seq] = []
        for p in (INTERACTIVE, BULK):
            for seq in (*self.running[p], *self.waiting[p]):
                self._finish(seq, reason, finished)
            self.running[p], self.waiting[p] = [], deque()
            self.batches[p].reset()
        return finished


def _by_length(seqs: list[Seq], prefix: Prefix | None = None) -> list[list[Seq]]:
    """Arrivals split into prefill groups whose padding stays small (a long prompt does not make
    every short one pay for its width); lengths count past a reused prefix."""
    skip = prefix.length if prefix is not None else 0

    def length(s: Seq) -> int:
        return len(s.context()) - skip

    groups: list[list[Seq]] = []
    for seq in sorted(seqs, key=length):
        group = groups[-1] if groups else None
        width = length(seq)
        if group is not None and width * (len(group) + 1) <= 1.25 * sum(length(s) for s in (*group, seq)) + 64:
            group.append(seq)
        else:
            groups.append([seq])
    return groups


def stable_text(seq: Seq, decode_ids: Callable[[list[int]], str]) -> str:
    """The part of a running sequence's text that is final: no partial character, no possible start of
    a stop string (so concatenated stream deltas always equal the final text)."""
    text = decode_ids(seq.out).rstrip("\ufffd")
    hold = max((len(s) for s in seq.stop), default=1) - 1
    return text[: len(text) - hold] if hold else text
