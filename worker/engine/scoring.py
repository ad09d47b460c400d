"""Prompt logprobs (echo): each prompt token's log probability under the logits of the position before it, from
the prefill's own forward (the runner keeps every position's logits for the rows that ask)."""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 256  # positions scored at once: a [CHUNK, vocab] float32 log-softmax at a time


def prompt_scores(logits: torch.Tensor, ids: list[int], k: int) -> list[Any]:
    """(id, logprob, [(alt id, alt logprob)] * k) for every token of `ids`; the first token has no logprob (None)
    and no alternatives. `logits` [len(ids), vocab] are the positions of `ids` (row i predicts token i + 1)."""
    if not ids:
        return []
    scores: list[Any] = [(ids[0], None, [])]
    targets = torch.tensor(ids[1:], device=logits.device)
    for start in range(0, len(ids) - 1, CHUNK):
        tgt = targets[start : start + CHUNK]
        lp = torch.log_softmax(logits[start : start + len(tgt)].float(), dim=-1)
        parts = [lp.gather(1, tgt[:, None])[:, 0].double()]
        if k > 0:
            top = torch.topk(lp, k)
            parts += [top.indices.double().flatten(), top.values.double().flatten()]
        flat = torch.cat(parts).tolist()  # one transfer per chunk
        m = len(tgt)
        alt_ids, alt_lps = flat[m : m + m * k], flat[m + m * k :]
        for j in range(m):
            alts = [(int(alt_ids[j * k + a]), alt_lps[j * k + a]) for a in range(k)]
            scores.append((ids[start + j + 1], flat[j], alts))
    return scores
