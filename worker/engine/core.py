"""The batching engine: one continuously batched decode loop over every sequence of a worker child.

Sequences join between decode steps (arrivals of one step are prefilled together, identical prompts
once, then merged into the running batch) and leave the moment they finish. Interactive and bulk
sequences run as two batches on their own caches, each of up to `max_batch` rows: while interactive
work is active, the bulk batch (and its prefills) takes one step in every `bulk_every`, so an
interactive job is never stuck behind a micro-batch.
A job is a batch of one: the same code path serves a lone job, n samples and a 32-line micro-batch.

The scheduler (`scheduler.py`) decides who runs, the runner (`runner.py`) runs the forwards, the sampler
(`sampler.py`) picks tokens and the detokenizer (`detok.py`) turns them into text and finds stop strings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from qwen_deploy.adapters import AdapterError
from qwen_deploy.queues import Lane
from worker.engine import detok
from worker.engine.lean import lean_forward_for
from worker.engine.prefix_cache import Prefix, prefix_cache_for, remember, row_kv
from worker.engine.runner import KVBatch, decode, embed, prefill, repeat_rows
from worker.engine.sampler import RowPlan, choose
from worker.engine.scheduler import LaneState, Scheduler, by_length
from worker.engine.scoring import prompt_scores
from worker.engine.sequence import Seq, SeqStatus
from worker.lora import AdapterSet

log = logging.getLogger(__name__)

Groups = list[tuple[Prefix | None, list[Seq]]]  # prefill groups, each continuing one reused prefix (or none)
SCORING_POSITIONS = 4096  # padded positions of one prefill that keeps every position's logits ([positions, vocab])


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
        lean_forward: str = "auto",
        adapters: AdapterSet | None = None,
    ) -> None:
        self.model, self.decode_ids = model, decode_ids
        self.adapters = adapters  # LoRA adapters per row (None: every row runs the base)
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.prefix_cache = prefix_cache_for(model, prefix_cache_tokens)  # None: no prefix cache
        self.lean = lean_forward_for(model, lean_forward)  # None: transformers' own forward
        uncached = self._uncached if self.prefix_cache is not None else None
        self.scheduler = Scheduler(max_batch, max_batch_tokens, bulk_every, max_prefill_tokens, uncached)
        self.steps = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        """Queue a sequence; it joins at the next step (a finished resume finishes at once)."""
        self.scheduler.add(seq)

    def sequences(self) -> list[Seq]:
        return self.scheduler.sequences()

    def __len__(self) -> int:
        return len(self.scheduler)

    def rows(self, priority: Lane | None = None) -> int:
        return self.scheduler.rows(priority)

    def room(self, priority: Lane = Lane.INTERACTIVE) -> int:
        return self.scheduler.room(priority)

    # -- the loop ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Seq]:
        """Admit arrivals, take one decode step, and return the sequences that finished."""
        finished: list[Seq] = []
        now = time.monotonic()
        lanes = self.scheduler.lanes
        for lane in lanes.values():
            self._sweep(lane, now, finished)
        self._admit(lanes[Lane.INTERACTIVE], now, finished)
        bulk_turn = self.scheduler.bulk_turn(self.steps)
        if bulk_turn:
            self._admit(lanes[Lane.BULK], now, finished)
        for p, lane in lanes.items():
            if lane.running and (p == Lane.INTERACTIVE or bulk_turn):
                self._decode(lane, finished)
        self.steps += 1
        return finished

    def _sweep(self, lane: LaneState, now: float, finished: list[Seq]) -> None:
        """End canceled or late sequences, waiting or running, without a forward."""
        ended, stopped = self.scheduler.expired(lane, now)
        for seq, reason in ended:
            self._finish(seq, reason, finished)
        if stopped:
            lane.drop(stopped)

    def _admit(self, lane: LaneState, now: float, finished: list[Seq]) -> None:
        if not lane.waiting:
            return
        joining, complete = self.scheduler.admit(lane, now)
        for seq in complete:
            self._finish(seq, "length", finished)
        if self.adapters is not None:
            joining = self._resident(lane, joining, finished)
        if not joining:
            return
        planned = self._with_prefixes(lane, joining)
        for i, (prefix, group) in enumerate(planned):
            try:
                self._prefill_fitting(lane, group, finished, prefix)
            except BaseException:  # the groups not prefilled yet wait for the next step too
                for _, rest in reversed(planned[i + 1 :]):
                    lane.push_back(rest)
                raise

    # -- LoRA hooks: which adapter each row of a forward runs ----------------------------------------
    def _resident(self, lane: LaneState, joining: list[Seq], finished: list[Seq]) -> list[Seq]:
        """The arrivals whose adapter is resident (loaded now if needed); those whose adapter has no room
        (every resident one in use) wait; one whose adapter does not load fails."""
        assert self.adapters is not None
        busy = {s.adapter for part in self.scheduler.lanes.values() for s in part.running if s.adapter}
        ready, later = [], []
        for seq in joining:
            if seq.adapter is not None:
                try:
                    if not self.adapters.ensure(seq.adapter, busy):
                        later.append(seq)
                        continue
                except AdapterError as exc:
                    log.error("sequence %s: adapter %s: %s", seq.key, seq.adapter, exc)
                    self._finish(seq, "error", finished)
                    continue
                busy.add(seq.adapter)
            ready.append(seq)
        if later:
            lane.push_back(later)
        return ready

    def _bind(self, seqs: list[Seq]) -> None:
        if self.adapters is not None:
            self.adapters.bind([s.adapter for s in seqs])

    def _ns(self, seq: Seq) -> int:
        """The prefix cache's namespace of a sequence's adapter (-1: not resident yet, matches nothing)."""
        if seq.adapter is None or self.adapters is None:
            return 0
        found = self.adapters.resident.get(seq.adapter)
        return found.key if found is not None else -1

    # -- prefix cache hooks: what an arrival's prefill computes, and the prefix it starts from ------
    def _uncached(self, seq: Seq, joining: list[Seq]) -> int:
        assert self.prefix_cache is not None
        if seq.prompt_logprobs >= 0 or seq.pooling is not None:  # its whole prompt: no reused prefix
            return len(seq.context())
        beside = joining[-1].context() if joining and joining[-1].adapter == seq.adapter else None
        return self.prefix_cache.uncached(seq.context(), beside, self._ns(seq))

    def _with_prefixes(self, lane: LaneState, joining: list[Seq]) -> Groups:
        """Prefill groups, each continuing one reused prefix (cached, or shared by several arrivals and computed
        once here) under one adapter; without a prefix cache, the groups by length alone. Rows that score their
        prompt (echo with logprobs) compute every position: groups of their own, with no prefix; so do rows that
        embed their prompt."""
        scoring: Groups = [(None, g) for g in _bounded(by_length([s for s in joining if s.prompt_logprobs >= 0]))]
        scoring += [(None, g) for g in by_length([s for s in joining if s.pooling is not None])]
        plain = [s for s in joining if s.prompt_logprobs < 0 and s.pooling is None]
        if self.prefix_cache is None or not plain:
            unprefixed: Groups = [(None, g) for g in by_length(plain)]
            return unprefixed + scoring
        by_adapter: dict[str | None, list[Seq]] = {}
        for seq in plain:
            by_adapter.setdefault(seq.adapter, []).append(seq)
        parts: dict[int, tuple[Prefix | None, list[Seq]]] = {}
        try:
            for adapter, seqs in by_adapter.items():
                ns = self._ns(seqs[0])

                def compute(ids: tuple[int, ...], base: Prefix | None, adapter: str | None = adapter) -> torch.Tensor:
                    return self._forward_prefix(ids, base, adapter)

                found = self.prefix_cache.prefixes([s.context() for s in seqs], compute, ns)
                for seq, prefix in zip(seqs, found):
                    parts.setdefault(id(prefix) if prefix else -ns - 1, (prefix, []))[1].append(seq)
        except BaseException:  # interrupted or failed: they all wait for the next step
            lane.push_back(joining)
            raise
        groups = [
            (prefix, g) for prefix, part in parts.values() for g in by_length(part, prefix.length if prefix else 0)
        ]
        return groups + scoring

    def _forward_prefix(self, ids: tuple[int, ...], base: Prefix | None, adapter: str | None = None) -> torch.Tensor:
        """The KV of a shared prefix, continuing `base`: [layers, 2, kv_heads, len(ids), head_dim]."""
        if self.adapters is not None:
            self.adapters.bind([adapter])
        batch, _ = prefill(self.model, [list(ids[base.length if base else 0 :])], self.pad_id, base, self.lean)
        return row_kv(batch.cache.layers, 0, 0, len(ids))

    def _prefill_fitting(
        self, lane: LaneState, group: list[Seq], finished: list[Seq], prefix: Prefix | None = None
    ) -> None:
        """Prefill; out of memory, halve the group and try each half. A lone sequence that still does not fit
        waits while other rows hold memory, and fails alone when nothing else runs."""
        try:
            self._prefill(lane, group, finished, prefix)
        except torch.OutOfMemoryError:
            _release_memory()
            if len(group) > 1:
                half = len(group) // 2
                try:
                    self._prefill_fitting(lane, group[:half], finished, prefix)
                except BaseException:
                    lane.push_back(group[half:])
                    raise
                self._prefill_fitting(lane, group[half:], finished, prefix)
            elif self.rows():
                lane.push_back(group)
                lane.out_of_memory()
            else:
                self._finish(group[0], "error", finished)

    def _prefill(self, lane: LaneState, joining: list[Seq], finished: list[Seq], prefix: Prefix | None = None) -> None:
        """One left-padded forward for sequences of similar length (continuing one reused prefix), then merge
        them into the batch."""
        if joining[0].pooling is not None:  # embedding rows (grouped apart): pooled, then done
            self._embed(lane, joining, finished)
            return
        unique: dict[tuple[str | None, tuple[int, ...]], int] = {}  # (adapter, prompt): one prefill row each
        rows = [unique.setdefault((s.adapter, tuple(s.context() or [self.eos_ids[0]])), len(unique)) for s in joining]
        skip = prefix.length if prefix is not None else 0
        scoring = any(s.prompt_logprobs >= 0 for s in joining)  # (such rows are grouped apart, with no prefix)
        try:
            prompts = [list(k) for _, k in unique]
            if self.adapters is not None:
                self.adapters.bind([a for a, _ in unique])
            group, logits = prefill(
                self.model, [k[skip:] for k in prompts], self.pad_id, prefix, self.lean, all_logits=scoring
            )
            if self.prefix_cache is not None:  # prefix cache hook: keep the new full blocks of each prompt
                # (with a prefix cache, a prefill group runs one adapter: see _with_prefixes)
                remember(self.prefix_cache, group.cache.layers, prompts, skip, self._ns(joining[0]))
            if scoring:  # each prompt token's logprob, from this same forward
                width = logits.shape[1]
                for seq, row in zip(joining, rows):
                    if seq.prompt_logprobs >= 0:
                        start = width - len(prompts[row])  # left padding
                        positions = logits[row, start : start + len(seq.prompt)]
                        seq.prompt_scores = prompt_scores(positions, seq.prompt, seq.prompt_logprobs)
                logits = logits[:, -1]
        except torch.OutOfMemoryError:  # the caller shrinks the group
            raise
        except BaseException:  # interrupted or failed: they wait for the next step
            lane.push_back(joining)
            raise
        for seq in joining:
            seq.cached = skip
        live = [i for i, s in enumerate(joining) if len(s.out) < s.max_new_tokens]
        if len(live) < len(joining):  # scoring only (max_new_tokens 0): done with the prefill
            for i in sorted(set(range(len(joining))) - set(live)):
                self._finish(joining[i], "length", finished)
            if not live:
                return
            joining, rows = [joining[i] for i in live], [rows[i] for i in live]
        if rows != list(range(len(unique))):  # n samples (or equal prompts) share one prefill
            logits = repeat_rows(group, logits, rows)
        self._advance(joining, group, logits, finished)
        kept = [i for i, s in enumerate(joining) if not s.done]
        group.keep(kept)
        lane.batch.merge(group)
        lane.join([joining[i] for i in kept])

    def _embed(self, lane: LaneState, joining: list[Seq], finished: list[Seq]) -> None:
        """One forward of the rows' prompts, no KV kept: each row's pooled vector, and the row is finished."""
        try:
            vectors = embed(self.model, [s.prompt for s in joining], self.pad_id, joining[0].pooling).cpu()
        except torch.OutOfMemoryError:  # the caller shrinks the group
            raise
        except BaseException:  # interrupted or failed: they wait for the next step
            lane.push_back(joining)
            raise
        for seq, vector in zip(joining, vectors):
            seq.embedding = vector
            self._finish(seq, "length", finished)

    def _decode(self, lane: LaneState, finished: list[Seq]) -> None:
        while True:
            try:
                self._bind(lane.running)
                logits = decode(self.model, lane.batch, self.lean)  # out of memory, the batch is as it was before
                break
            except torch.OutOfMemoryError:
                _release_memory()
                if not self._shrink(lane, finished):
                    return
        lane.stepped(self.scheduler.max_batch)
        seqs = lane.running
        self._advance(seqs, lane.batch, logits, finished)
        done = [s for s in seqs if s.done]
        if done:
            lane.drop(done)

    def _shrink(self, lane: LaneState, finished: list[Seq]) -> bool:
        """Out of memory in a decode step: the newest half of the rows go back to wait (their tokens kept: they
        rejoin with a prefill of prompt + output); a lone row that does not fit fails alone."""
        rows = lane.running
        if len(rows) == 1:
            lane.drop(rows)
            self._finish(rows[0], "error", finished)
            return False
        back = rows[len(rows) // 2 :]
        lane.drop(back)
        lane.push_back(back)
        lane.out_of_memory()
        return True

    def _advance(self, seqs: list[Seq], batch: KVBatch, logits: torch.Tensor, finished: list[Seq]) -> None:
        """Choose each row's next token, append it and decide whether the row is done."""
        plans = [self._plan(s) for s in seqs]
        batch.last, tokens, logprobs = choose(logits, plans)
        for seq, tok, lp in zip(seqs, tokens, logprobs):
            seq.out.append(tok)
            if lp is not None:
                seq.logprobs.append((tok, *lp))
            if seq.constraint is not None:
                seq.constraint.accept(tok)
            reason = self._reason(seq, tok)
            if reason:
                self._finish(seq, reason, finished)

    def _plan(self, seq: Seq) -> RowPlan:
        sampling = seq.sampling
        banned = self.eos_ids if seq.ignore_eos else []
        if len(seq.out) < seq.min_tokens:
            banned = [*self.eos_ids, *seq.stop_token_ids]
        return RowPlan(
            sampling,
            seq.distinct_context() if sampling.repetition_penalty != 1.0 else [],
            banned,
            seq.constraint,
            seq.top_logprobs,
            seq.output_counts() if sampling.presence_penalty or sampling.frequency_penalty else None,
        )

    def _reason(self, seq: Seq, tok: int) -> str | None:
        if len(seq.out) < seq.min_tokens:  # no EOS, stop token or stop string before min_tokens (vLLM's rule)
            if seq.constraint is not None and seq.constraint.is_done():
                return "stop"  # a complete grammar has nothing more to give
            return "length" if len(seq.out) >= seq.max_new_tokens else None
        if tok in self.eos_ids and not seq.ignore_eos:
            return "eos"
        if tok in seq.stop_token_ids:
            seq.stop_token = tok
            return "stop"
        if seq.constraint is not None and seq.constraint.is_done():
            return "stop"
        if seq.stop and detok.stop_reached(seq, self.decode_ids):
            return "stop"
        if len(seq.out) >= seq.max_new_tokens:
            return "length"
        return None

    def _finish(self, seq: Seq, reason: str, finished: list[Seq]) -> None:
        seq.finish_reason = reason
        seq.status = SeqStatus.FINISHED
        seq.text, seq.stop_sequence = detok.final_text(seq, reason, self.decode_ids)
        finished.append(seq)

    def fail_all(self, reason: str = "error") -> list[Seq]:
        """End every sequence (the model raised mid-step); the engine is empty afterwards."""
        finished: list[Seq] = []
        for lane in self.scheduler.lanes.values():
            for seq in lane.clear():
                self._finish(seq, reason, finished)
        return finished


def _bounded(groups: list[list[Seq]]) -> list[list[Seq]]:
    """Scoring groups split so that one prefill keeps the logits of at most `SCORING_POSITIONS` padded positions
    (a lone longer row still runs alone)."""
    out: list[list[Seq]] = []
    for group in groups:
        part: list[Seq] = []
        for seq in group:
            width = max(len(s.context()) for s in (*part, seq))
            if part and width * (len(part) + 1) > SCORING_POSITIONS:
                out.append(part)
                part = []
            part.append(seq)
        out.append(part)
    return out


def _release_memory() -> None:
    """After an out-of-memory error: hand cached blocks back so a smaller batch can fit."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
