"""Out of memory in a prefill or a decode step shrinks the batch and goes on: every row still gets exactly its
one-at-a-time text, and only a sequence that cannot fit even alone fails. The error is injected at the runner's
model forward (torch.OutOfMemoryError, as CUDA raises it; the lean forward or transformers') on a real tiny
model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.unit.test_engine import LENGTHS, PROMPTS, reference, tiny
from tests.unit.test_handler import make_handler
from worker.engine import runner
from worker.handler import GenerationRequest, ModelHandler


@pytest.fixture(scope="module")
def handler(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelHandler:
    """In fp32, as the engine tests pin the random models: bf16 rounds the engine's forward and `generate`'s
    differently, which flips this random model's near-tied tokens."""
    return make_handler(str(tiny("qwen2", tmp_path_factory.mktemp("qwen2"), demo_model)), dtype="fp32")


@contextmanager
def memory(model: Any, too_big: Callable[[torch.Tensor], bool]) -> Iterator[list[int]]:
    """Forwards of `model` whose input is `too_big` raise as CUDA does; yields the row counts of the failed
    forwards."""
    real, failed = runner.forward, []

    def forward(m: Any, lean: Any, ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if m is model and too_big(ids):
            failed.append(int(ids.shape[0]))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(m, lean, ids, *args, **kwargs)

    runner.forward = forward  # type: ignore[assignment]
    try:
        yield failed
    finally:
        runner.forward = real  # type: ignore[assignment]


def run(handler: ModelHandler, reqs: list[GenerationRequest], join_every: int = 0) -> list[Any]:
    engine = handler.engine()
    seqs = [handler.sequences(r, str(i), budget=60)[0][0] for i, r in enumerate(reqs)]
    pending, steps = list(seqs), 0
    while pending or len(engine):
        if pending and (not join_every or steps % join_every == 0):
            for seq in pending if not join_every else pending[:1]:
                engine.add(seq)
            pending = [] if not join_every else pending[1:]
        engine.step()
        steps += 1
    return seqs


@pytest.mark.parametrize("join_every", [0, 2])
def test_a_batch_that_does_not_fit_shrinks_and_every_row_matches(handler: ModelHandler, join_every: int) -> None:
    reqs = [GenerationRequest(prompt=p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, LENGTHS)]
    expected = [reference(handler, r) for r in reqs]
    with memory(handler.model, lambda ids: ids.shape[0] > 3) as failed:  # room for 3 rows
        seqs = run(handler, reqs, join_every)
    assert failed  # prefills of 8 (or 4) and decode steps of 4+ rows ran out, and were shrunk
    assert [s.finish_reason for s in seqs] == ["length"] * len(reqs)
    assert [s.text for s in seqs] == expected


def test_only_a_sequence_that_cannot_fit_alone_fails(handler: ModelHandler) -> None:
    long = GenerationRequest(prompt=" ".join(PROMPTS * 3), max_new_tokens=8, ignore_eos=True)
    reqs = [GenerationRequest(prompt=p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS[:3]]
    expected = [reference(handler, r) for r in reqs]
    with memory(handler.model, lambda ids: ids.shape[1] > 60) as failed:  # no prompt of 60+ tokens fits
        seqs = run(handler, [*reqs, long])
    assert failed
    assert [s.finish_reason for s in seqs] == ["length", "length", "length", "error"]
    assert [s.text for s in seqs[:3]] == expected
