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

from worker.engine.detok import Detokenizer

INTERACTIVE, BULK = 0, 1  # priority classes: each has its own lane (waiting queue, running rows, KV batch)


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
    seed: int | None = None
    generator: random.Random | None = field(default=None, repr=False)  # this sequence's own stream

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
    priority: int = INTERACTIVE
    tag: Any = None  # the owner's handle (job id and sample index, batch line, ...)
    out: list[int] = field(default_factory=list)  # generated ids (non-empty when resuming)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None  # eos | length | stop | time_limit | canceled | error
    canceled: bool = False
    deadline: float = math.inf
    text: str = ""  # kept current for sequences with stop strings; final once finished
    stop_sequence: str | None = None  # the stop string that ended it (the one found first in the text)
    cached: int = 0  # leading context tokens whose KV came from a reused prefix (prefix cache)
    status: SeqStatus = SeqStatus.WAITING
    detok: Detokenizer = field(default_factory=Detokenizer, repr=False)
    adapter: str | None = None  # the LoRA adapter this sample runs (None: the base model)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def context(self) -> list[int]:
        return self.prompt + self.out
