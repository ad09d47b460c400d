"""Ids to text for running sequences: stop strings, the final (cut) text and the stable text a stream may send."""

from __future__ import annotations

from collections.abc import Callable

from worker.engine.sequence import Seq

Decode = Callable[[list[int]], str]


def stop_reached(seq: Seq, decode_ids: Decode) -> bool:
    """Keep `seq.text` current and say whether one of its stop strings appeared."""
    seq.text = decode_ids(seq.out)
    return any(s in seq.text for s in seq.stop)


def final_text(seq: Seq, reason: str, decode_ids: Decode) -> str:
    """The finished sequence's text, cut before the first stop string when it stopped on one."""
    text = decode_ids(seq.out)
    if reason == "stop" and seq.stop:
        cuts = [text.find(s) for s in seq.stop if s in text]
        text = text[: min(cuts)] if cuts else text
    return text


def stable_text(seq: Seq, decode_ids: Decode) -> str:
    """The part of a running sequence's text that is final: no partial character, no possible start of
    a stop string (so concatenated stream deltas always equal the final text)."""
    text = decode_ids(seq.out).rstrip("\ufffd")
    hold = max((len(s) for s in seq.stop), default=1) - 1
    return text[: len(text) - hold] if hold else text
