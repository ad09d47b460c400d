"""The model runtime: `setup()` once per process; requests become engine sequences (LitServe/Cog-style contract)."""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from qwen_deploy import tool_calls
from qwen_deploy.config import Settings
from qwen_deploy.queues import Lane
from qwen_deploy.requests import GenerationRequest, InvalidRequest
from worker.cpu_weights import pack_linear_weights
from worker.device import pick_device, pick_dtype
from worker.embedding import embed_sequences, embedding_choices, model_pooling
from worker.engine import Engine, Sampling, Seq
from worker.engine.lean import unsupported
from worker.engine.pooling import Pooling
from worker.hub_access import load_options
from worker.lora import AdapterSet
from worker.structured import compile_constraint

log = logging.getLogger(__name__)
PROMPT_CHARS_PER_TOKEN = 16  # characters of prompt tail tokenized per token kept (`max_prompt_tokens`)


def request_sampling(req: GenerationRequest) -> Sampling:
    """The engine's sampling settings of a request (absent ones: greedy, no penalties)."""
    return Sampling(
        temperature=req.temperature or 0.0,
        top_p=req.top_p or 1.0,
        top_k=req.top_k or 0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        min_p=req.min_p or 0.0,
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        seed=req.seed,
    )


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # eos | length | stop | time_limit | canceled
    prompt_tokens: int
    completion_tokens: int
    prompt_truncated: bool
    choices: list[dict[str, Any]] = field(default_factory=list)
    stop_sequence: str | None = None  # the stop string that ended choice 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (prefix cache)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_truncated": self.prompt_truncated,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass
class ModelInfo:
    name: str
    revision: str | None
    device: str
    dtype: str
    parameters: int
    loaded_at: float
    load_seconds: float
    threads: int


class PromptError(ValueError):
    """A prompt this model cannot take (a token id outside its vocabulary): the job fails as a bad request."""

    code = "invalid_prompt"


class ModelHandler:
    """Loads one causal LM and generates with the service's caps."""

    def __init__(
        self, settings: Settings, tokenizer_path: str | None = None, strict: bool = False, names: tuple[str, ...] = ()
    ) -> None:
        """`tokenizer_path`: where the tokenizer is when the weights' directory has none (a checkpoint saved
        without it); `strict`: the weights must hold exactly the model's tensors (transformers alone only warns
        about missing ones and makes them up); `names`: other names of the base, for adapters' checks."""
        self.settings = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.tokenizer_path = tokenizer_path or settings.model.name_or_path
        self.strict, self.names = strict, names
        self.info: ModelInfo | None = None
        self.adapters: AdapterSet | None = None
        self.pooling: Pooling | None = None  # task embed: how hidden states become a vector

    def setup(self) -> ModelInfo:
        """Load tokenizer and model once; safe to call again (no-op)."""
        if self.info is not None:
            return self.info
        cfg = self.settings.model
        threads = cfg.threads or max(1, (os.cpu_count() or 2) - 1)
        torch.set_num_threads(threads)
        started = time.perf_counter()
        _quiet_transformers()
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
        token = self.settings.token
        common = {"revision": cfg.revision, "token": token, "trust_remote_code": cfg.trust_remote_code}
        common |= load_options(cfg.name_or_path, cfg.revision)  # fails at once when the hub cannot serve it
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, **common)
        loader = AutoModel if cfg.task == "embed" else AutoModelForCausalLM  # embed: the base model, no LM head
        model = self._load_weights(loader, cfg.name_or_path, dtype, common)
        self.pooling = model_pooling(cfg.name_or_path, common) if cfg.task == "embed" else None
        self.hidden_size = int(model.config.get_text_config().hidden_size)
        self.model = model.to(device).eval()
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.info = ModelInfo(
            name=cfg.name_or_path,
            revision=_resolved_revision(cfg.name_or_path, common) or cfg.revision,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            parameters=sum(p.numel() for p in model.parameters()),
            loaded_at=time.time(),
            load_seconds=round(time.perf_counter() - started, 3),
            threads=threads,
        )
        if cfg.pack_cpu_weights:  # bf16 on a CPU: linear weights packed once (a no-op elsewhere)
            lean = self.settings.engine.lean_forward == "auto" and unsupported(self.model) is None
            packed = pack_linear_weights(self.model, self.settings.engine.max_batch, fuse=lean, kernel=cfg.cpu_kernel)
            if packed:
                log.info("packed %d linear layers for the CPU's bf16 matmul", packed)
        if cfg.task == "embed":  # embeddings run no adapter, reuse no prefix and need no lean decode
            log.info("model loaded: %s (embeddings: %s)", asdict(self.info), self.pooling)
            return self.info
        self.adapters = AdapterSet(self.model, self.settings.engine.max_adapters, [cfg.name_or_path, *self.names])
        root = self.settings.paths.models_root.expanduser()
        for name, path in cfg.adapters.items():  # registered now, loaded when first used
            self.adapters.register(name, str(root / path))
        log.info("model loaded: %s", asdict(self.info))
        return self.info

    def _load_weights(self, loader: Any, path: str, dtype: Any, common: dict[str, Any]) -> Any:
        if not self.strict:
            return loader.from_pretrained(path, dtype=dtype, **common)
        loaded: Any = loader.from_pretrained(path, dtype=dtype, output_loading_info=True, **common)
        model, info = loaded
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            found = sorted(map(str, info.get(kind) or ()))
            if found:
                raise ValueError(
                    f"{kind.replace('_', ' ')} in the weights: {', '.join(found[:3])}"
                    + (f" and {len(found) - 3} more" if len(found) > 3 else "")
                )
        return model

    def preload_modules(self) -> None:
        """Import the model's and tokenizer's code without loading weights or touching a device
        (called in the worker parent, so forked children skip transformers' lazy imports)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = self.settings.model
        common = {"revision": cfg.revision, "token": self.settings.token, "trust_remote_code": cfg.trust_remote_code}
        common |= load_options(cfg.name_or_path, cfg.revision)
        config = AutoConfig.from_pretrained(cfg.name_or_path, **common)
        AutoModelForCausalLM._model_mapping[type(config)]  # noqa: B018  (imports the modeling module)
        AutoTokenizer.from_pretrained(cfg.name_or_path, **common)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_prompt(self, ids: list[int]) -> str:
        """A prompt's text as given (special tokens kept: they were part of it)."""
        return self.tokenizer.decode(ids)

    def encode(self, req: GenerationRequest, prompt: str | list[int] | None = None) -> tuple[list[int], bool]:
        """Token ids of the prompt (chat template for messages), keeping the last N tokens.

        Only the last `PROMPT_CHARS_PER_TOKEN` x N characters of the text (and of each message) are
        tokenized: far more than N tokens' worth, so the ids kept are the same, and a megabyte prompt costs
        the engine loop no more than one at the bound."""
        limit = self.settings.generation.max_prompt_tokens
        bound = limit * PROMPT_CHARS_PER_TOKEN
        if prompt is None and req.messages is None:
            prompt = req.prompts()[0]
        if req.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model has no chat template; send a prompt instead of messages")
            messages = [_tail_content(m, bound) for m in req.messages]
            text = self.render(messages, req)
            cut = messages != req.messages
        elif isinstance(prompt, list):  # token ids: checked against the vocabulary, then cut as a text's are
            bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise PromptError(f"prompt token id {bad} is not in the vocabulary (0 to {self.vocab_size - 1})")
            return (list(prompt[-limit:]), True) if len(prompt) > limit else (list(prompt), False)
        else:
            text, cut = prompt or "", False
        cut = cut or len(text) > bound
        ids = self.tokenizer(text[-bound:], add_special_tokens=req.messages is None)["input_ids"]
        return (ids[-limit:], True) if len(ids) > limit else (ids, cut)

    def render(self, messages: list[dict[str, Any]], req: GenerationRequest) -> str:
        """The chat template applied to the messages, with the request's tools and template variables.

        A template that never mentions `tools` gets them (and the calls and results in the messages) in
        Qwen's text convention instead (tool_calls.fallback_messages)."""
        prefill = req.continue_final_message
        template = self.tokenizer.chat_template
        extra: dict[str, Any] = dict(req.chat_template_kwargs or {})
        if isinstance(template, str) and "tools" not in template:
            messages = tool_calls.fallback_messages(messages, req.tools)
        else:
            messages = tool_calls.template_arguments(messages)
            if req.tools:
                extra["tools"] = req.tools
        return str(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=not prefill, continue_final_message=prefill, tokenize=False, **extra
            )
        )

    def reasoning(self, req: GenerationRequest) -> bool:
        """Whether samples are split into reasoning and content: the chat template has a `<think>` block,
        or the request asks for thinking (`chat_template_kwargs.enable_thinking`)."""
        if req.messages is None:
            return False
        template = self.tokenizer.chat_template
        asked = (req.chat_template_kwargs or {}).get("enable_thinking") is True
        return asked or (isinstance(template, str) and tool_calls.THINK_OPEN in template)

    def engine(self, **limits: int) -> Engine:
        """A batching engine on this model (one per process; `limits` override `engine.*` settings)."""
        assert self.info is not None, "setup() first"
        cfg = {**self.settings.engine.model_dump(), **limits}
        if self.pooling is not None:
            cfg.update(prefix_cache_tokens=0, lean_forward="off")
        return Engine(
            self.model,
            self.decode,
            self.eos_ids,
            self.pad_id,
            max_batch=cfg["max_batch"],
            max_batch_tokens=cfg["max_batch_tokens"],
            bulk_every=cfg["bulk_every"],
            max_prefill_tokens=cfg["max_prefill_tokens"],
            prefix_cache_tokens=cfg["prefix_cache_tokens"],
            lean_forward=cfg["lean_forward"],
            adapters=self.adapters,
        )

    def sequences(
        self,
        req: GenerationRequest,
        key: str,
        *,
        budget: float,
        priority: Lane = Lane.INTERACTIVE,
        tag: Any = None,
        resume: list[int] | None = None,
    ) -> tuple[list[Seq], int, bool]:
        """The request's samples as engine sequences; also (prompt tokens, prompt truncated)."""
        if req.adapter is not None and (self.adapters is None or not self.adapters.known(req.adapter)):
            raise AdapterNotFound(f"the adapter {req.adapter!r} is not loaded for this model")
        req.check_token_ids(self.vocab_size)
        prompts = req.prompts()
        if req.embed != (self.pooling is not None) and (req.embed or req.max_new_tokens or req.logprobs):
            task = "embeddings only" if self.pooling is not None else "text generation only"
            raise InvalidRequest(f"this model serves {task} (models[].task)")
        if req.embed:
            return embed_sequences(self, prompts, req.dimensions, key, budget, priority, tag)
        n = max(1, req.n)
        seqs: list[Seq] = []
        prompt_tokens, truncated = 0, False
        for p, prompt in enumerate(prompts):
            ids, cut = self.encode(req, prompt)
            if not ids:
                ids = [self.eos_ids[0]]
            prompt_tokens, truncated = prompt_tokens + len(ids), truncated or cut
            echo = None
            if req.echo:  # the prompt as given, or the text of the tokens kept
                echo = prompt if isinstance(prompt, str) and not cut else self.decode_prompt(ids)
            for s in range(n):
                i = p * n + s  # choices are prompt-major
                sampling = request_sampling(req)
                sampling.make_generator(self.model.device, offset=i)
                constraint = compile_constraint(
                    self.response_format(req), self.tokenizer, self.vocab_size, eos_token_ids=self.eos_ids
                )
                seq = Seq(
                    f"{key}#{i}",
                    ids,
                    req.max_new_tokens,
                    sampling,
                    list(req.stop),
                    req.ignore_eos,
                    budget,
                    req.top_logprobs if req.logprobs else -1,
                    constraint,
                    priority,
                    tag=(tag, i),
                    out=list(resume or []) if len(prompts) * n == 1 else [],
                    min_tokens=req.min_tokens,
                    stop_token_ids=list(req.stop_token_ids),
                    adapter=req.adapter,
                )
                seq.prompt_logprobs = req.top_logprobs if req.echo and req.logprobs else -1
                seq.echo = echo
                seqs.append(seq)
        return seqs, prompt_tokens, truncated

    @staticmethod
    def response_format(req: GenerationRequest) -> dict[str, Any] | None:
        """The grammar of a sample: a forced tool call's schema, else the request's response_format."""
        schema = tool_calls.forced_schema(req.tool_fields())
        if schema is None:
            return req.response_format
        return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}

    def result(self, seqs: list[Seq], prompt_tokens: int, truncated: bool, req: GenerationRequest) -> GenerationResult:
        """The job's result from its finished samples (choice 0 is `text`); with tools or reasoning each
        choice also holds `content`, `tool_calls` and `reasoning_content` (qwen_deploy.tool_calls)."""
        if req.embed:
            choices = embedding_choices(seqs, req.dimensions, req.encoding_format)
            ended = next((s.finish_reason for s in seqs if s.finish_reason != "length"), None)  # canceled, ...
            return GenerationResult("", ended or "length", prompt_tokens, 0, False, choices)
        split = self.reasoning(req)
        parse = split or tool_calls.mode(req.tool_fields()) != "none"
        opened = split and self._prompt_opens_think(req)
        choices = [self.choice(i, s, req) for i, s in enumerate(seqs)]
        if parse:
            for choice, s in zip(choices, seqs, strict=True):
                choice.update(tool_calls.parse_sample(s.text, req.tool_fields(), split, opened))
        first = seqs[0]
        return GenerationResult(
            first.text,
            first.finish_reason or "length",
            prompt_tokens,
            sum(len(s.out) for s in seqs),
            truncated,
            choices if (len(seqs) > 1 or req.logprobs or req.echo or req.return_token_ids or parse) else [],
            first.stop_sequence,
            min(first.cached, prompt_tokens),
        )

    def _prompt_opens_think(self, req: GenerationRequest) -> bool:
        """Whether the rendered prompt ends inside an open `<think>` block (the model writes only `</think>`)."""
        assert req.messages is not None
        text = self.render(req.messages, req).rstrip()
        return text.endswith(tool_calls.THINK_OPEN)

    def choice(self, index: int, seq: Seq, req: GenerationRequest) -> dict[str, Any]:
        """One finished sample as an output choice; with a stop string its logprobs and token ids end with the
        token that reaches the end of its text."""
        kept = self.tokens_in_text(seq)
        choice: dict[str, Any] = {
            "index": index,
            "text": seq.text,
            "finish_reason": seq.finish_reason,
            "logprobs": self.logprobs(seq, kept) if req.logprobs else None,
        }
        if req.echo:
            choice["echo"] = seq.echo
            if req.logprobs:
                choice["prompt_logprobs"] = self.entries(seq.prompt_scores, self.decode_prompt)
        if req.return_token_ids:
            choice.update(prompt_token_ids=list(seq.prompt), token_ids=seq.out[:kept])
        return choice

    def tokens_in_text(self, seq: Seq) -> int:
        """How many generated tokens the returned text covers: all of them, except after a stop string (the
        tokens up to the one that reaches the end of the text; the stop string's own tokens are cut)."""
        if seq.stop_sequence is None:
            return len(seq.out)
        low, high = 0, len(seq.out)  # the fewest tokens whose text is at least the returned text's length
        while low < high:
            mid = (low + high) // 2
            if len(self.decode(seq.out[:mid])) >= len(seq.text):
                high = mid
            else:
                low = mid + 1
        return low

    def logprobs(self, seq: Seq, kept: int | None = None) -> dict[str, Any]:
        """OpenAI's chat logprobs shape for the sequence's tokens (its first `kept`)."""
        return {"content": self.entries(seq.logprobs[:kept], self.decode)}

    @staticmethod
    def entries(scores: list[Any], decode: Any) -> list[dict[str, Any]]:
        """(token, logprob, alternatives) triples as logprob entries; a logprob of None (a prompt's first token)
        stays None."""

        def entry(tok: int, lp: float | None) -> dict[str, Any]:
            text = decode([tok])  # generated special tokens (EOS) are no text, as in the output
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return [{**entry(tok, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]} for tok, lp, alts in scores]

    def generate(self, req: GenerationRequest, budget: float | None = None) -> GenerationResult:
        """Run one request to the end in-process (a batch of one; CLI --local, tests)."""
        return self.generate_batch([req], budget)[0]  # type: ignore[return-value]

    def generate_batch(
        self, reqs: list[GenerationRequest], budget: float | None = None, max_batch: int | None = None
    ) -> list[GenerationResult | Exception]:
        """Run requests together through one engine; one result (or the request's exception) each."""
        engine = self.engine(**({"max_batch": max_batch} if max_batch else {}))
        budget = budget or self.settings.limits.generation_budget
        jobs: list[tuple[list[Seq], int, bool] | Exception] = []
        for i, req in enumerate(reqs):
            try:
                jobs.append(self.sequences(req, str(i), budget=budget))
            except Exception as exc:  # a bad request fails alone
                jobs.append(exc)
        for job in jobs:
            if not isinstance(job, Exception):
                for seq in job[0]:
                    engine.add(seq)
        while len(engine):
            engine.step()
        return [job if isinstance(job, Exception) else self.result(*job, req) for job, req in zip(jobs, reqs)]


class AdapterNotFound(LookupError):
    """A request names an adapter this worker does not serve (unloaded since it was queued)."""

    code = "model_not_found"


def _resolved_revision(name: str, common: dict[str, Any]) -> str | None:
    """The commit a hub model was loaded at (from its snapshot path); None for a local directory."""
    if Path(name).is_dir():
        return None
    from transformers.utils import cached_file

    found = cached_file(
        name,
        "config.json",
        revision=common["revision"],
        token=common["token"],
        local_files_only=common.get("local_files_only", False),
    )
    if found is None:  # not cached and not downloadable: no commit to name
        return None
    path = Path(found)
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _quiet_transformers() -> None:
    """No progress bars or advisory warnings in the worker log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def _tail_content(message: dict[str, Any], bound: int) -> dict[str, Any]:
    """The message with only the last `bound` characters of a text content."""
    content = message.get("content")
    return {**message, "content": content[-bound:]} if isinstance(content, str) and len(content) > bound else message


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # a base model has none
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("the model defines no EOS token")
    return ids
