"""Ids to text for running sequences, incrementally: stop strings and stream deltas from the new tokens only.

vLLM's incremental detokenization: each sequence keeps two offsets into its ids, `prefix` (a few tokens back,
for context: byte-level pieces and word-initial spaces decode right only after their neighbours) and `read`
(the end of the text so far). A step decodes `ids[prefix:]` and `ids[prefix:read]` and appends the difference;
while the new text ends in a partial character (U+FFFD) it waits for more tokens. The finished text is one full
decode, cut before the first stop string, exactly as a one-shot decode would give.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.engine.sequence import Seq

Decode = Callable[[list[int]], str]


class Detokenizer:
    """One sequence's text so far and where in its ids the next step starts."""

    __slots__ = ("prefix", "read", "text", "_prefix_text")

    def __init__(self) -> None:
        self.prefix = self.read = 0
        self.text = ""  # decoded ids[:read], no trailing partial character
        self._prefix_text: str | None = ""  # decode(ids[prefix:read]); None: not computed yet

    def update(self, ids: list[int], decode_ids: Decode) -> str:
        """Take in the ids past `read` (one step's token or many); return the new text."""
        if self.read >= len(ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = decode_ids(ids[self.prefix : self.read])
        new_text = decode_ids(ids[self.prefix :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd"):
            return ""  # a partial character (or nothing visible yet): wait for the next token
        delta = new_text[len(self._prefix_text) :]
        self.text += delta
        self.prefix, self.read, self._prefix_text = self.read, len(ids), None
        return delta


def stop_reached(seq: Seq, decode_ids: Decode) -> bool:
    """Take in the sequence's new tokens; say whether one of its stop strings appeared (searched only where the
    new text could complete one)."""
    before = len(seq.detok.text)
    if not seq.detok.update(seq.out, decode_ids):
        return False
    seq.text = text = seq.detok.text
    start = max(0, before - max(len(s) for s in seq.stop) + 1)
    return any(s in text[start:] for s in seq.stop)


def final_text(seq: Seq, reason: str, decode_ids: Decode) -> tuple[str, str | None]:
    """The finished sequence's text, cut before the first stop string when it stopped on one, and that stop
    string (the one found first in the text; None when it did not stop on one). A stop token id is left out."""
    text = decode_ids(seq.out[:-1] if seq.stop_token is not None else seq.out)
    if reason == "stop" and seq.stop:
        cuts = [(text.find(s), i) for i, s in enumerate(seq.stop) if s in text]
        if cuts:
            at, which = min(cuts)
            return text[:at], seq.stop[which]
    return text, None


def stable_text(seq: Seq, decode_ids: Decode) -> str:
    """The part of a running sequence's text that is final: no partial character, no possible start of
    a stop string (so concatenated stream deltas always equal the final text). Incremental: only the ids
    since the last call are decoded."""
    seq.detok.update(seq.out, decode_ids)
    text = seq.detok.text
    hold = max((len(s) for s in seq.stop), default=1) - 1
    return text[: max(0, len(text) - hold)]  # (a text shorter than `hold` holds all of it)
