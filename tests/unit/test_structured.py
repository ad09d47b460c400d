"""Structured output on real models: a plain decode loop with the constraint gives JSON that validates.

The demo model only knows the Zen of Python, so without the constraint it never writes JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from worker.structured import ConstraintError, compile_constraint, mask_batch, warm

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["happy", "sad", "neutral"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "$defs": {
        "point": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -9, "maximum": 9},
                "y": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "kind": {"const": "path"},
        "closed": {"type": "boolean"},
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 2, "maxItems": 3},
        "label": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
        "meta": {
            "type": "object",
            "properties": {"level": {"enum": [1, 2, 3]}},
            "required": ["level"],
            "additionalProperties": False,
        },
    },
    "required": ["kind", "closed", "points", "label", "meta"],
    "additionalProperties": False,
}
PROMPT = "Beautiful is better than"


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def demo(demo_model: Path) -> Iterator[tuple[Any, Any]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model: one thread is fastest, and robust on a shared machine
    yield AutoModelForCausalLM.from_pretrained(demo_model).eval(), AutoTokenizer.from_pretrained(demo_model)
    torch.set_num_threads(threads)


def decode(
    model: Any, tok: Any, constraint: Any, eos: list[int], temperature: float = 0.0, max_tokens: int = 200
) -> tuple[str, str]:
    """Greedy (or sampled) decoding with the constraint; (text, why it stopped)."""
    ids = torch.tensor([tok.encode(PROMPT)])
    gen = torch.Generator().manual_seed(7)
    out: list[int] = []
    cache = None
    with torch.inference_mode():
        for _ in range(max_tokens):
            result = model(input_ids=ids, cache=cache, use_cache=True)
            cache, logits = result["cache"], result.logits[0, -1].float().clone()
            if constraint is not None:
                constraint.mask(logits)
            if temperature:
                token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
            else:
                token = int(logits.argmax())
            if constraint is not None:
                constraint.accept(token)
            if token in eos:
                return tok.decode(out), "eos"
            out.append(token)
            if constraint is not None and constraint.is_done():
                return tok.decode(out), "done"
            ids = torch.tensor([[token]])
    return tok.decode(out), "length"


@pytest.mark.parametrize("schema", [PERSON, NESTED], ids=["person", "nested"])
def test_demo_model_writes_json_that_validates(demo: tuple[Any, Any], schema: dict[str, Any]) -> None:
    model, tok = demo
    free, _ = decode(model, tok, None, [2, 0], max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(free)  # the model alone writes the Zen, not JSON
    for temperature in (0.0, 1.0):
        c = compile_constraint(fmt(schema), tok, model.config.vocab_size, eos_token_ids=[2, 0])
        text, why = decode(model, tok, c, [2, 0], temperature=temperature)
        assert why in ("done", "eos"), text
        jsonschema.validate(json.loads(text), schema)
        assert c.is_done() and c.error is None


def test_json_object(demo: tuple[Any, Any]) -> None:
    model, tok = demo
    c = compile_constraint({"type": "json_object"}, tok, model.config.vocab_size, eos_token_ids=[2, 0])
    text, why = decode(model, tok, c, [2, 0], temperature=1.0)
    assert why in ("done", "eos"), text
    assert isinstance(json.loads(text), dict)
    any_object = c.fork()  # any JSON object is allowed, however nested; a top-level array is not
    for token in tok.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False):
        logits = torch.zeros(384)
        any_object.mask(logits)
        assert logits[token] == 0
        any_object.accept(token)
    assert any_object.is_done() and any_object.error is None
    logits = torch.zeros(384)
    c.fork().mask(logits)
    assert logits[tok.encode("[", add_special_tokens=False)[0]] == float("-inf")


def test_text_and_absent_mean_no_constraint(demo: tuple[Any, Any]) -> None:
    _, tok = demo
    assert compile_constraint(None, tok, 384) is None
    assert compile_constraint({"type": "text"}, tok, 384) is None


def test_eos_only_when_complete_and_padded_vocab_never(demo: tuple[Any, Any]) -> None:
    _, tok = demo
    c = compile_constraint(
        fmt(
            {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
                "additionalProperties": False,
            }
        ),
        tok,
        400,
        eos_token_ids=[2, 0],
    )
    steps = tok.encode('{"ok": true}', add_special_tokens=False)
    for token in steps:
        logits = torch.zeros(400)
        c.mask(logits)
        assert logits[token] == 0 and logits[2] == float("-inf") and logits[0] == float("-inf")
        assert bool((logits[384:] == float("-inf")).all())
        assert not c.is_done()
        c.accept(token)
    assert c.is_done()
    logits = torch.zeros(400)
    c.mask(logits)
    assert (logits == 0).nonzero().flatten().tolist() == [0, 2]  # only the EOS ids remain


def test_fork_is_independent_and_batched_mask_matches(demo: tuple[Any, Any]) -> None:
    _, tok = demo
    a = compile_constraint(fmt(PERSON), tok, 384)
    assert a is not None
    for token in tok.encode('{"name": "Tim", "age": 4', add_special_tokens=False):
        a.accept(token)
    b = a.fork()
    single = [torch.zeros(384), torch.zeros(384)]
    a.mask(single[0])
    b.mask(single[1])
    assert not torch.equal(single[0], single[1])  # a is inside the object, b at its start
    assert (single[1] == 0).nonzero().flatten().tolist() == tok.encode("{", add_special_tokens=False)
    batch = torch.zeros(3, 384)
    mask_batch([a, None, b], batch)
    assert torch.equal(batch[0], single[0]) and torch.equal(batch[2], single[1])
    assert bool((batch[1] == 0).all())
    a.accept(2)  # EOS where the grammar refuses it
    assert a.error and a.is_done() and b.error is None and not b.is_done()


def test_compiled_grammar_is_cached_and_bad_schemas_raise(demo: tuple[Any, Any]) -> None:
    _, tok = demo
    warm(tok, 384)
    a, b = compile_constraint(fmt(PERSON), tok, 384), compile_constraint(fmt(dict(PERSON)), tok, 384)
    assert a is not None and b is not None and a._template is b._template
    reordered = fmt({"properties": PERSON["properties"], **PERSON})  # same keywords, other order: own grammar
    assert compile_constraint(reordered, tok, 384)._template is not a._template
    with pytest.raises(ConstraintError) as err:
        compile_constraint(fmt({"type": "array", "uniqueItems": True}), tok, 384)
    assert err.value.code == "unsupported_schema" and "uniqueItems" in err.value.message


def test_random_llama_with_padded_vocabulary(demo: tuple[Any, Any]) -> None:
    """Another architecture, a model vocabulary larger than the tokenizer's, sampled tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = demo
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=448,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    for temperature in (0.0, 1.0):
        c = compile_constraint(fmt(PERSON), tok, 448, eos_token_ids=[2])
        text, why = decode(model, tok, c, [2], temperature=temperature)
        assert why in ("done", "eos"), text
        jsonschema.validate(json.loads(text), PERSON)


def test_every_format_the_web_accepts_compiles(demo: tuple[Any, Any]) -> None:
    """The web's keyword whitelist and the grammar compiler agree."""
    from tests.response_formats import GOOD
    from web.response_format import KEYWORDS

    _, tok = demo
    for response_format in GOOD:
        c = compile_constraint(response_format, tok, 384)
        assert (c is None) == (response_format["type"] == "text")
    every = json.dumps(GOOD[-1])
    assert all(f'"{key}"' in every for key in KEYWORDS)


def test_a_plain_number_cannot_run_on_forever(demo: tuple[Any, Any]) -> None:
    """A model that always prefers another digit is stopped by the grammar: at most 16 integer digits and
    6 decimals for an unbounded `number` (a bound of the schema's own wins), so the value always ends."""
    _, tok = demo
    schema = {
        "type": "object",
        "properties": {"x": {"type": "number"}, "y": {"type": "integer", "maximum": 10**12}},
        "required": ["x", "y"],
        "additionalProperties": False,
    }
    digit = tok.convert_tokens_to_ids("4")
    assert tok.decode([digit]) == "4"

    def digits_allowed(text: str) -> int:
        """How many more "4" tokens the grammar allows after `text`, when the model always wants one."""
        c = compile_constraint(fmt(schema), tok, len(tok))
        for token in tok.encode(text, add_special_tokens=False):
            c.accept(token)
        n = 0
        while n < 40:
            logits = torch.zeros(len(tok))
            c.mask(logits)
            if logits[digit] != 0:
                break
            c.accept(digit)
            n += 1
        return n

    assert digits_allowed('{"x": ') == 15  # |x| <= 10**15: fifteen 4s (sixteen would pass the bound)
    assert digits_allowed('{"x": 1.') == 6  # decimals
    assert digits_allowed('{"x": 1, "y": ') == 12  # the schema's own maximum (10**12) wins
