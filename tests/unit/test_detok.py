"""The incremental detokenizer on the demo model's byte-level tokenizer: characters split across tokens wait
until complete, stop strings split across tokens are found and cut exactly, and concatenated stream deltas
(stable text) always equal the final text."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from worker.engine import Seq, stable_text
from worker.engine.detok import Detokenizer, final_text, stop_reached

TEXT = "héllo 😀 wörld, Beautiful is better than ugly. Now is better than never."


@pytest.fixture(scope="module")
def tok(demo_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def decoder(tok: Any) -> Any:
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def test_multi_byte_characters_split_across_tokens_wait_until_complete(tok: Any) -> None:
    ids = tok(TEXT)["input_ids"]
    decode, d = decoder(tok), Detokenizer()
    deltas = []
    for n in range(1, len(ids) + 1):
        deltas.append(d.update(ids[:n], decode))
        assert "\ufffd" not in d.text and decode(ids[:n]).startswith(d.text)
    assert "".join(deltas) == d.text == decode(ids) == TEXT
    emoji = [i for i, t in enumerate(deltas) if "😀" in t]
    assert len(emoji) == 1 and deltas[emoji[0] - 1] == ""  # its first byte tokens gave no text


def test_random_ids_concatenate_to_the_full_decode(tok: Any) -> None:
    """Arbitrary ids (bytes that never form a character too): the text is always a prefix of the full decode."""
    decode, rng = decoder(tok), random.Random(5)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(40)]
        d = Detokenizer()
        for n in range(1, len(ids) + 1):
            d.update(ids[:n], decode)
            assert decode(ids[:n]).startswith(d.text)
        full = decode(ids)
        assert d.text == full or full.endswith("\ufffd")


@pytest.mark.parametrize("stop", [["ugly"], ["han ug"], [".", "zzz"], ["ly. N"]])
def test_stop_strings_split_across_tokens_cut_as_a_full_decode_does(tok: Any, stop: list[str]) -> None:
    ids = tok(TEXT)["input_ids"]
    decode = decoder(tok)
    seq = Seq("k", [1], 100, stop=stop)
    stopped_at = None
    for tok_id in ids:
        seq.out.append(tok_id)
        if stop_reached(seq, decode):
            stopped_at = len(seq.out)
            break
    full = TEXT
    first = min(full.find(s) for s in stop if s in full)
    end = min(full.find(s) + len(s) for s in stop if s in full)
    assert stopped_at is not None and len(decode(ids[: stopped_at - 1])) < end <= len(decode(ids[:stopped_at]))
    which = min((full.find(s), s) for s in stop if s in full)[1]
    assert final_text(seq, "stop", decode) == (full[:first], which)


def test_stream_deltas_equal_the_final_text(tok: Any) -> None:
    """What a stream sends (stable text at each flush, then the rest of the final text) is the final text, with
    stop strings split across tokens and flushes that see several new tokens at once."""
    decode = decoder(tok)
    ids = tok(TEXT)["input_ids"]
    for stop, every in [(["ugly"], 1), (["better than n"], 3), ([], 2)]:
        seq = Seq("k", [1], 100, stop=stop)
        sent = ""
        for i, tok_id in enumerate(ids):
            seq.out.append(tok_id)
            if stop and stop_reached(seq, decode):
                break
            if i % every == 0:
                text = stable_text(seq, decode)
                assert text.startswith(sent)
                sent = text
        final, _ = final_text(seq, "stop" if stop else "length", decode)
        assert final.startswith(sent) and sent + final[len(sent) :] == final
        assert final == (TEXT[: TEXT.find(stop[0])] if stop else TEXT)


def test_a_text_shorter_than_a_stop_string_is_held_whole(tok: Any) -> None:
    """Stop "ugly", text "ug": nothing is stable yet (a negative slice once sent "u", which the final "" lacks)."""
    decode = decoder(tok)
    seq = Seq("k", [1], 100, stop=["ugly"], out=tok("ug")["input_ids"])
    assert stable_text(seq, decode) == ""
