"""Embeddings: how a model's last hidden states become one vector per input (sentence-transformers' modules).

A model directory that holds `modules.json` names its pooling module's folder (`1_Pooling/config.json`:
`pooling_mode_lasttoken`, `pooling_mode_mean_tokens`, `pooling_mode_cls_token`) and whether a `Normalize`
module follows; Qwen3-Embedding ships last-token pooling then L2 normalization. Without those files a decoder
LM gets the same: last token, normalized."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MODES = ("lasttoken", "mean", "cls")  # sentence-transformers' pooling_mode_* flags, in the order they are read
FLAGS = {"lasttoken": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


@dataclass(frozen=True)
class Pooling:
    mode: str = "lasttoken"  # lasttoken | mean | cls
    normalize: bool = True  # L2, as a `Normalize` module does


def read_pooling(read_json: Callable[[str], Any]) -> Pooling:
    """The model's pooling from its sentence-transformers files; `read_json(name)` answers a file of the model
    directory parsed, or None when it has no such file. No files: last token, normalized."""
    modules = read_json("modules.json")
    if not isinstance(modules, list):
        return Pooling()
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    mode = "lasttoken"
    found = kinds.get("Pooling")
    config = read_json(f"{found.get('path', '')}/config.json".lstrip("/")) if found else None
    if isinstance(config, dict):
        flagged = [m for m in MODES if config.get(FLAGS[m])]
        if not flagged:
            raise ValueError(f"pooling config names no supported mode ({', '.join(FLAGS.values())})")
        if len(flagged) > 1:
            raise ValueError(f"pooling config names several modes ({', '.join(flagged)}); one is supported")
        mode = flagged[0]
    return Pooling(mode, "Normalize" in kinds)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, T, H] hidden states of left-padded rows (mask [B, T], 0 on padding) → [B, H] float32 vectors."""
    hidden = hidden.float()
    if pooling.mode == "lasttoken":  # left padding: every row's last token is the last column
        vectors = hidden[:, -1]
    elif pooling.mode == "cls":  # the first real token of each row
        first = (mask == 0).sum(-1)
        vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    else:
        keep = mask.unsqueeze(-1).bool()
        total = torch.where(keep, hidden, torch.zeros((), device=hidden.device)).sum(1)
        vectors = total / mask.sum(-1, keepdim=True).clamp(min=1).to(total.dtype)
    return F.normalize(vectors, p=2, dim=-1) if pooling.normalize else vectors


def shorten(vector: torch.Tensor, dimensions: int | None, pooling: Pooling) -> torch.Tensor:
    """A Matryoshka vector's first `dimensions` components (normalized again when the model normalizes)."""
    if dimensions is None or dimensions >= vector.shape[-1]:
        return vector
    head = vector[..., :dimensions]
    return F.normalize(head, p=2, dim=-1) if pooling.normalize else head
