"""The generation request as a job record and a batch line store it: one type that web validates into
(`web/schemas.py` `parse_job`) and the worker reads (`GenerationRequest.from_dict`).

The stored form is JSON (`stored()`): `max_new_tokens` and the fields set to other than their default.
Web builds it from a validated body and refuses any field this type lacks (`parse_job`). A reader meets a
key this type does not know only in a record written by another version of the service: with
`generation.strict_requests` (the test suite turns it on) that fails the job, else the key is logged once
and ignored, so the record still runs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from qwen_deploy.states import ErrorCode

log = logging.getLogger(__name__)
_FLOATS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")
_warned: set[str] = set()

Prompt = str | list[int] | list[str] | list[list[int]]


class InvalidRequest(ValueError):
    """A request this model cannot run, or a stored request that does not parse (the job fails with this
    code and message)."""

    code = ErrorCode.INVALID_REQUEST


@dataclass(kw_only=True)
class GenerationRequest:
    """A validated generation request: a prompt (or prompts) or chat messages, and its settings."""

    prompt: Prompt | None = None
    messages: list[dict[str, Any]] | None = None
    model: str | None = None  # the served model's alias: a job record keeps it as a field, a batch line here
    adapter: str | None = None  # a LoRA adapter of the model (its name), else the base
    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a decimal string, as JSON keys are) -> bias
    min_p: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    response_format: dict[str, Any] | None = None
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    echo: bool = False
    return_token_ids: bool = False
    embed: bool = False  # each prompt's pooled vector instead of a generation (a model with task: embed)
    dimensions: int | None = None  # embed: the vectors' first components only (Matryoshka)
    encoding_format: str = "float"  # embed: float | base64

    @classmethod
    def fields(cls) -> frozenset[str]:
        """The keys a stored request may hold."""
        return _FIELDS

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = False) -> GenerationRequest:
        """A stored request (or a validated body); None values count as absent. An unknown key raises
        InvalidRequest when `strict` (`generation.strict_requests`), else is logged once and ignored."""
        known = {k: v for k, v in data.items() if v is not None}
        unknown = known.keys() - _FIELDS
        if unknown:
            if strict:
                raise InvalidRequest(f"the stored request has unknown fields: {', '.join(sorted(unknown))}")
            for key in unknown - _warned:
                _warned.add(key)
                log.warning("a stored request holds the unknown field %r; ignored", key)
            known = {k: v for k, v in known.items() if k in _FIELDS}
        for name in _FLOATS:
            if name in known:  # JSON integers are fine here
                known[name] = float(known[name])
        return cls(**known)

    def stored(self, *, model: bool = True) -> dict[str, Any]:
        """The JSON form: `max_new_tokens` and the fields set to other than their default (`model`: keep the
        model's alias, as a batch line does; a job record keeps it as a field of its own)."""
        values = self.__dict__
        out = {"max_new_tokens": self.max_new_tokens}
        for name in _OPTIONAL:
            if values[name] is not None:
                out[name] = values[name]
        for name, default in _DEFAULTS:
            if values[name] != default:
                out[name] = values[name]
        if not model:
            out.pop("model", None)
        return out

    def prompts(self) -> list[str | list[int] | None]:
        """The request's prompts: one for messages, a text or a token-id list; several for a list of them."""
        if self.messages is not None:
            return [None]
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]  # a text or one token-id list
        return list(prompt)  # several texts or token-id lists

    def tool_fields(self) -> dict[str, Any]:
        """The request's tool fields as qwen_deploy.tool_calls reads them."""
        fields: dict[str, Any] = {"tools": self.tools, "tool_choice": self.tool_choice or "auto"}
        if self.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = self.parallel_tool_calls
        return fields

    def check_token_ids(self, vocab_size: int) -> None:
        """logit_bias and stop_token_ids name ids of this model's vocabulary (the web tier cannot know it)."""
        for param, ids in (
            ("logit_bias", [int(k) for k in self.logit_bias or {}]),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequest(
                    f"{param}: token id {bad[0]} is not in this model's vocabulary (0 to {vocab_size - 1})"
                )


_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationRequest))
_OPTIONAL = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.default is None)  # absent: None
# (name, default) of the other fields but max_new_tokens, which the stored form always holds
_DEFAULTS = tuple(
    (f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    for f in dataclasses.fields(GenerationRequest)
    if f.default is not None and f.name != "max_new_tokens"
)
