"""One generated sample: its request settings (`Sampling`, stop strings, limits), its runtime state and its
status in the engine (`SeqStatus`)."""

from __future__ import annotations

import enum
import math
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

from qwen_deploy.queues import Lane
from worker.engine.detok import Detokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # queued (or pushed back after an interrupted prefill)
    RUNNING = "running"  # a row of its lane's KV batch
    FINISHED = "finished"  # `finish_reason` says why


@dataclass
class Sampling:
    """How one sequence picks its next token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every id generated so far
    frequency_penalty: float = 0.0  # OpenAI's: times the number of times the id was generated so far
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (after temperature)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> value added to its logit
    seed: int | None = None
    generator: random.Random | None = field(default=None, repr=False)  # this sequence's own stream
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def bias_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """logit_bias as (ids, values) tensors on `device`, made once."""
        if self._bias is None or self._bias[0].device != device:
            ids = torch.tensor(list(self.logit_bias), dtype=torch.long, device=device)
            self._bias = ids, torch.tensor(list(self.logit_bias.values()), dtype=torch.float32, device=device)
        return self._bias

    @property
    def greedy(self) -> bool:
        return not self.temperature or self.temperature <= 0

    def make_generator(self, device: torch.device | None = None, offset: int = 0) -> None:
        """A random stream of its own: seeded from `seed` (+ the sample index), else from the OS. Host-side
        (one number per sampled token), so `device` does not matter."""
        if self.greedy:
            return
        seed = secrets.randbits(63) if self.seed is None else (self.seed + offset * 1_000_003) % 2**63
        self.generator = random.Random(seed)

    def uniform(self) -> float:
        """The next draw in [0, 1) of this sequence's stream."""
        if self.generator is None:
            self.make_generator()
        assert self.generator is not None
        return self.generator.random()


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
    priority: Lane = Lane.INTERACTIVE
    tag: Any = None  # the owner's handle (job id and sample index, batch line, ...)
    out: list[int] = field(default_factory=list)  # generated ids (non-empty when resuming)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None  # eos | length | stop | time_limit | canceled | error
    canceled: bool = False
    deadline: float = math.inf
    text: str = ""  # kept current for sequences with stop strings; final once finished
    stop_sequence: str | None = None  # the stop string that ended it (the one found first in the text)
    cached: int = 0  # leading context tokens whose KV came from a reused prefix (prefix cache)
    prompt_logprobs: int = -1  # -1 none; else each prompt token's logprob and this many alternatives (echo)
    prompt_scores: list[Any] = field(default_factory=list)  # (id, logprob or None for the first, alternatives)
    echo: str | None = None  # the prompt's text, returned with the output (echo)
    status: SeqStatus = SeqStatus.WAITING
    detok: Detokenizer = field(default_factory=Detokenizer, repr=False)
    min_tokens: int = 0  # EOS and stop_token_ids are banned, and no stop ends it, before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end it (left out of its text)
    stop_token: int | None = None  # the id of stop_token_ids that ended it
    _seen: list[int] = field(default_factory=list, repr=False)  # distinct ids of prompt + out[:_seen_upto]
    _seen_set: set[int] = field(default_factory=set, repr=False)
    _seen_upto: int = field(default=-1, repr=False)  # -1: the prompt not taken in yet
    _counts: dict[int, int] = field(default_factory=dict, repr=False)  # ids of out[:_counted] and how often
    _counted: int = field(default=0, repr=False)
    adapter: str | None = None  # the LoRA adapter this sample runs (None: the base model)
    pooling: Any = None  # an embedding row (engine.pooling.Pooling): its prompt's pooled vector, no generation
    embedding: Any = None  # that vector once computed ([H] float32 on the CPU)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def context(self) -> list[int]:
        return self.prompt + self.out

    def distinct_context(self) -> list[int]:
        """The distinct ids of prompt and output (the repetition penalty's), kept up to date incrementally."""
        if self._seen_upto < 0:
            self._seen_set = set(self.prompt)
            self._seen, self._seen_upto = list(self._seen_set), 0
        for tok in self.out[self._seen_upto :]:
            if tok not in self._seen_set:
                self._seen_set.add(tok)
                self._seen.append(tok)
        self._seen_upto = len(self.out)
        return self._seen

    def output_counts(self) -> dict[int, int]:
        """Each generated id and how often (presence and frequency penalties), kept up to date incrementally."""
        counts = self._counts
        for tok in self.out[self._counted :]:
            counts[tok] = counts.get(tok, 0) + 1
        self._counted = len(self.out)
        return counts
