"""Which sequences run next: one lane per priority class (interactive, bulk), each with its waiting queue, its
running rows and their KV batch; admission under the row, token and prefill budgets; the bulk interleave.

The scheduler decides; the runner (`worker.engine.runner`) runs forwards and touches caches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from qwen_deploy.queues import Lane
from worker.engine.runner import KVBatch
from worker.engine.sequence import Seq, SeqStatus

CALM_STEPS = 16


class LaneState:
    """One priority class: waiting sequences, running rows (in KV-batch row order) and their batch."""

    def __init__(self, priority: Lane) -> None:
        self.priority = priority
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.batch = KVBatch()
        self.cap: int | None = None  # fewer rows than `max_batch` since a step ran out of memory
        self.calm = 0  # steps since then without running out

    def limit(self, max_batch: int) -> int:
        return max_batch if self.cap is None else min(self.cap, max_batch)

    def out_of_memory(self) -> None:
        """Admit no more rows than run now; the cap grows back by one row every `CALM_STEPS` good steps."""
        self.cap, self.calm = max(1, len(self.running)), 0

    def stepped(self, max_batch: int) -> None:
        if self.cap is not None:
            self.calm += 1
            if self.calm >= CALM_STEPS:
                self.cap, self.calm = (self.cap + 1 if self.cap + 1 < max_batch else None), 0

    def reserved(self) -> int:
        """Prompt + max_new_tokens over the running rows (the KV positions they may grow to)."""
        return sum(len(s.prompt) + s.max_new_tokens for s in self.running)

    def push_back(self, seqs: list[Seq]) -> None:
        """Return sequences to the front of the queue, in order (an interrupted or shrunk prefill)."""
        for seq in seqs:
            seq.status = SeqStatus.WAITING
        self.waiting.extendleft(reversed(seqs))

    def join(self, seqs: list[Seq]) -> None:
        for seq in seqs:
            seq.status = SeqStatus.RUNNING
        self.running.extend(seqs)

    def drop(self, leaving: list[Seq]) -> None:
        """Remove rows from the running set and from the KV batch."""
        gone = set(map(id, leaving))
        keep = [i for i, s in enumerate(self.running) if id(s) not in gone]
        self.batch.keep(keep)
        self.running = [self.running[i] for i in keep]

    def clear(self) -> list[Seq]:
        """Empty the lane; return every sequence it held."""
        held = [*self.running, *self.waiting]
        self.running, self.waiting = [], deque()
        self.batch.reset()
        return held


class Scheduler:
    """Lanes and the budgets that decide who joins, who waits and when bulk rows take a step."""

    def __init__(
        self,
        max_batch: int,
        max_batch_tokens: int,
        bulk_every: int,
        max_prefill_tokens: int,
        uncached: Callable[[Seq, list[Seq]], int] | None = None,
    ) -> None:
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.bulk_every, self.max_prefill_tokens = max(1, bulk_every), max_prefill_tokens
        self.lanes = {lane: LaneState(lane) for lane in Lane}
        # What an arrival's prefill computes (the prefix cache serves the rest); default: its whole context.
        self.uncached = uncached or (lambda seq, joining: len(seq.context()))

    def add(self, seq: Seq) -> None:
        seq.status = SeqStatus.WAITING
        self.lanes[seq.priority].waiting.append(seq)

    def sequences(self) -> list[Seq]:
        return [s for lane in self.lanes.values() for s in (*lane.running, *lane.waiting)]

    def __len__(self) -> int:
        return sum(len(lane.running) + len(lane.waiting) for lane in self.lanes.values())

    def rows(self, priority: Lane | None = None) -> int:
        classes = tuple(self.lanes) if priority is None else (priority,)
        return sum(len(self.lanes[p].running) for p in classes)

    def room(self, priority: Lane = Lane.INTERACTIVE) -> int:
        """How many more sequences of a class fit (waiting ones count): each class has `max_batch` rows,
        so a full micro-batch never keeps an interactive job out."""
        return max(0, self.max_batch - self.rows(priority) - len(self.lanes[priority].waiting))

    def bulk_turn(self, step: int) -> bool:
        """While interactive rows run, bulk rows (their prefills too) get one step in `bulk_every`."""
        return not self.lanes[Lane.INTERACTIVE].running or step % self.bulk_every == 0

    def expired(self, lane: LaneState, now: float) -> tuple[list[tuple[Seq, str]], list[Seq]]:
        """Canceled or late sequences: (seq, reason) to finish, and which of them were running rows."""
        ended: list[tuple[Seq, str]] = []
        for seq in list(lane.waiting):
            if seq.canceled or (seq.budget <= 0):
                lane.waiting.remove(seq)
                ended.append((seq, "canceled" if seq.canceled else "time_limit"))
        stopped = []
        for seq in lane.running:
            reason = "canceled" if seq.canceled else "time_limit" if now >= seq.deadline else None
            if reason and len(seq.out) < seq.max_new_tokens:
                ended.append((seq, reason))
                stopped.append(seq)
        return ended, stopped

    def admit(self, lane: LaneState, now: float) -> tuple[list[Seq], list[Seq]]:
        """Take arrivals off the queue within the budgets: the sequences joining (the engine groups them for
        prefill), and the resumed sequences that have nothing left to generate (to finish with "length")."""
        waiting = lane.waiting
        joining: list[Seq] = []
        complete: list[Seq] = []
        tokens, reserved = 0, lane.reserved()
        while waiting and len(lane.running) + len(joining) < lane.limit(self.max_batch):
            seq = waiting[0]
            need = len(seq.prompt) + seq.max_new_tokens
            cost = self.uncached(seq, joining)
            if joining and (tokens + cost > self.max_prefill_tokens or reserved + need > self.max_batch_tokens):
                break
            waiting.popleft()
            if seq.deadline == math.inf:  # a row pushed back to wait keeps its deadline
                seq.deadline = now + seq.budget
            # nothing left to do (resumed after its last token, or max_new_tokens 0) unless it scores or embeds
            # its prompt
            if len(seq.out) >= seq.max_new_tokens and seq.prompt_logprobs < 0 and seq.pooling is None:
                complete.append(seq)
                continue
            joining.append(seq)
            tokens += cost
            reserved += need
        return joining, complete


def by_length(seqs: list[Seq], skip: int = 0) -> list[list[Seq]]:
    """Arrivals split into prefill groups whose padding stays small (a long prompt does not make
    every short one pay for its width); lengths count past a reused prefix of `skip` tokens."""

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
