"""Embedding jobs on a model served with `task: embed`: its pooling, its inputs as engine rows that embed their
prompt (one batched forward per group, no generation), and their vectors as the job's choices."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

from qwen_deploy.queues import Lane
from worker.engine import Seq
from worker.engine.pooling import Pooling, read_pooling, shorten


class EmbedInputError(ValueError):
    """An input this model cannot embed (too long, a token id outside its vocabulary): a bad request."""

    code = "invalid_prompt"


def model_pooling(name: str, common: dict[str, Any]) -> Pooling:
    """The pooling of a local model directory or a hub model (its sentence-transformers files, if any)."""

    def read_json(file: str) -> Any:
        local = Path(name).expanduser()
        if local.is_dir():
            path: Path | None = local / file
        else:
            from transformers.utils import cached_file

            found = cached_file(
                name,
                file,
                revision=common.get("revision"),
                token=common.get("token"),
                local_files_only=common.get("local_files_only", False),
                _raise_exceptions_for_missing_entries=False,
            )
            path = Path(found) if found else None
        if path is None or not path.is_file():
            return None
        return json.loads(path.read_text())

    return read_pooling(read_json)


def input_ids(handler: Any, index: int, prompt: str | list[int]) -> list[int]:
    """One input's token ids, whole: an input over `max_prompt_tokens` is refused rather than cut (a vector of
    part of a text would pass for the text's)."""
    limit = handler.settings.generation.max_prompt_tokens
    where = f"input {index}" if index else "input"
    if isinstance(prompt, list):
        bad = next((t for t in prompt if not 0 <= t < handler.vocab_size), None)
        if bad is not None:
            raise EmbedInputError(f"{where}: token id {bad} is not in the vocabulary (0 to {handler.vocab_size - 1})")
        ids = list(prompt)
    else:
        ids = handler.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) > limit:
        raise EmbedInputError(f"{where} is {len(ids)} tokens; the most is {limit} (max_prompt_tokens)")
    return ids or [handler.eos_ids[0]]


def embed_sequences(
    handler: Any, prompts: list[Any], dimensions: int | None, key: str, budget: float, priority: Lane, tag: Any
) -> tuple[list[Seq], int, bool]:
    """One engine row per input (in order); also the prompt tokens (never truncated)."""
    hidden = handler.hidden_size
    if dimensions is not None and dimensions > hidden:
        raise EmbedInputError(f"dimensions is {dimensions}; this model's vectors have {hidden}")
    seqs: list[Seq] = []
    for i, prompt in enumerate(prompts):
        ids = input_ids(handler, i if len(prompts) > 1 else 0, prompt)
        seq = Seq(f"{key}#{i}", ids, 0, budget=budget, priority=priority, tag=(tag, i))
        seq.pooling = handler.pooling
        seqs.append(seq)
    return seqs, sum(len(s.prompt) for s in seqs), False


def embedding_choices(seqs: list[Seq], dimensions: int | None, encoding: str) -> list[dict[str, Any]]:
    """Each input's vector as a choice `{index, embedding}`: floats, or base64 of little-endian float32 (OpenAI's
    `encoding_format`). A row that did not finish with its vector (canceled, out of time) has none."""
    choices: list[dict[str, Any]] = []
    for i, seq in enumerate(seqs):
        vector: Any = None
        if seq.embedding is not None:
            short = shorten(seq.embedding, dimensions, seq.pooling)
            floats = short.float().tolist()  # float32 values, exact as Python floats
            if encoding == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(floats)}f", *floats)).decode()
            else:
                vector = floats
        choices.append({"index": i, "text": "", "embedding": vector, "finish_reason": seq.finish_reason})
    return choices
