"""The model runtime: `setup()` once per process, `generate()` per job (LitServe/Cog-style contract)."""

from __future__ import annotations

import logging
import os
import warnings
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from qwen_deploy.config import Settings
from worker.device import pick_device, pick_dtype

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """A validated request, as stored in the job record."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float | None = None
    ignore_eos: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and v is not None}
        return cls(**known)


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # eos | length | stop | time_limit | canceled
    prompt_tokens: int
    completion_tokens: int
    prompt_truncated: bool

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "prompt_truncated": self.prompt_truncated}


class ProgressSink(Protocol):
    def __call__(self, tokens: int, text: str) -> bool:
        """Receive partial output; return True to cancel the generation."""


class JobMonitor(StoppingCriteria):
    """One stopping criterion for a job: time budget, stop strings, cancel flag and progress."""

    def __init__(self, handler: ModelHandler, prompt_len: int, stop: list[str], budget: float,
                 sink: ProgressSink | None, interval: float, max_new_tokens: int) -> None:
        self.handler, self.prompt_len, self.stop = handler, prompt_len, stop
        self.max_new_tokens = max_new_tokens
        self.deadline = time.monotonic() + budget
        self.sink, self.interval = sink, interval
        self.next_flush = time.monotonic() + interval
        self.reason: str | None = None
        self.text = ""
        self.tokens = 0
        # Text that may be the start of a stop string is held back from the stream.
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = self._check(input_ids[0, self.prompt_len:])
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def _check(self, new_ids: torch.Tensor) -> bool:
        now = time.monotonic()
        self.tokens = int(new_ids.shape[0])
        flush = self.sink is not None and now >= self.next_flush
        if self.stop or flush:
            self.text = self.handler.decode(new_ids.tolist())
        if self.stop and any(s in self.text for s in self.stop):
            self.reason = "stop"
            return True
        if flush:
            self.next_flush = now + self.interval
            if self.sink(self.tokens, self.stream_text):
                self.reason = "canceled"
                return True
        if now >= self.deadline and self.tokens < self.max_new_tokens:  # a finished job is not late
            self.reason = "time_limit"
            return True
        return False


    @property
    def stream_text(self) -> str:
        """The part of the text that is final: no partial character, no possible stop-string start."""
        text = _stable(self.text)
        return text[: len(text) - self.holdback] if self.holdback else text


def _stable(text: str) -> str:
    """Text without a trailing partial UTF-8 character (decoded as U+FFFD)."""
    return text.rstrip("\ufffd")


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


class ModelHandler:
    """Loads one causal LM and generates with the service's caps."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: Any = None
        self.tokenizer: Any = None
        self.info: ModelInfo | None = None

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
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **common)
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, **common)
        self.model = model.to(device).eval()
        self.eos_ids = _eos_ids(model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.info = ModelInfo(
            name=cfg.name_or_path,
            revision=_resolved_revision(cfg.name_or_path, common) or cfg.revision,
            device=str(device), dtype=str(dtype).removeprefix("torch."),
            parameters=sum(p.numel() for p in model.parameters()),
            loaded_at=time.time(), load_seconds=round(time.perf_counter() - started, 3), threads=threads,
        )
        log.info("model loaded: %s", asdict(self.info))
        return self.info

    def preload_modules(self) -> None:
        """Import the model's and tokenizer's code without loading weights or touching a device
        (called in the worker parent, so forked children skip transformers' lazy imports)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = self.settings.model
        token = self.settings.token
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, token=token,
                                            trust_remote_code=cfg.trust_remote_code)
        AutoModelForCausalLM._model_mapping[type(config)]  # noqa: B018  (imports the modeling module)
        AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision, token=token,
                                      trust_remote_code=cfg.trust_remote_code)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode(self, req: GenerationRequest) -> tuple[list[int], bool]:
        """Token ids of the prompt (chat template for messages), keeping the last N tokens."""
        if req.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model has no chat template; send a prompt instead of messages")
            text = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        else:
            text = req.prompt or ""
        ids = self.tokenizer(text, add_special_tokens=req.messages is None)["input_ids"]
        limit = self.settings.generation.max_prompt_tokens
        return (ids[-limit:], True) if len(ids) > limit else (ids, False)

    def generate(self, req: GenerationRequest, sink: ProgressSink | None = None,
                 budget: float | None = None, monitor_out: list[JobMonitor] | None = None) -> GenerationResult:
        """Run one generation; stops at EOS, length, a stop string, the time budget or a cancel."""
        assert self.info is not None, "setup() first"
        ids, truncated = self.encode(req)
        if not ids:
            ids = [self.eos_ids[0]]
        gen = self.settings.generation
        monitor = JobMonitor(self, len(ids), req.stop, budget or self.settings.limits.generation_budget,
                             sink, gen.progress_interval_ms / 1000, req.max_new_tokens)
        if monitor_out is not None:
            monitor_out.append(monitor)
        input_ids = torch.tensor([ids], device=self.model.device)
        if req.seed is not None:
            torch.manual_seed(req.seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids),
                stopping_criteria=StoppingCriteriaList([monitor]),
                **self.sampling_kwargs(req),
            )
        new_ids = out[0, len(ids):].tolist()
        text = self.decode(new_ids)
        reason = monitor.reason
        if reason == "stop":
            text = _cut_at_stop(text, req.stop)
        elif reason is None:
            reason = "eos" if new_ids and new_ids[-1] in self.eos_ids else "length"
        return GenerationResult(text, reason, len(ids), len(new_ids), truncated)

    def sampling_kwargs(self, req: GenerationRequest) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": req.max_new_tokens, "eos_token_id": self.eos_ids,
                                  "pad_token_id": self.pad_id}
        if req.temperature:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p or 1.0,
                          top_k=req.top_k or 0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.repetition_penalty:
            kwargs["repetition_penalty"] = req.repetition_penalty
        if req.ignore_eos:  # EOS is masked until max_new_tokens (benchmarks, load tests)
            kwargs["min_new_tokens"] = req.max_new_tokens
        return kwargs


def _resolved_revision(name: str, common: dict[str, Any]) -> str | None:
    """The commit a hub model was loaded at (from its snapshot path); None for a local directory."""
    if Path(name).is_dir():
        return None
    from transformers.utils import cached_file

    path = Path(cached_file(name, "config.json", revision=common["revision"], token=common["token"]))
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def _quiet_transformers() -> None:
    """No progress bars or advisory warnings in the worker log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids:
        raise ValueError("the model defines no EOS token")
    return ids


def _cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
