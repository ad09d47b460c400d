"""A tiny Qwen2 causal LM that has memorised the Zen of Python, built locally and cached.

Tests and demos use it instead of a hub download: it loads with ``AutoModelForCausalLM`` /
``AutoTokenizer``, continues any Zen line greedily, answers ChatML prompts and stops at EOS.
Building takes well under a minute on two CPU cores and needs no network.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

from qwen_deploy.config import default_cache_dir
from worker.builders.cache import cached_build

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

DEMO_MODEL_VERSION = 1
KIND = "demo-model"  # names the lock and scratch folders beside the output
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SEED = 1234
VOCAB_SIZE = 384


class _Shape(TypedDict):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


MODEL_SHAPE: _Shape = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
}
WINDOW = 128  # tokens per plain-text training window
LEARNING_RATE = 3e-3
MAX_STEPS = 400
EVAL_EVERY = 10
BUCKET = 24  # examples per length bucket
THREADS = 1  # torch threads while training: robust when other jobs share the cores

Log = Callable[[str], Any]
Example = tuple[list[int], int, int]  # token ids, first trained target, first checked target
Batch = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the current demo model version lives under ``cache_dir``."""
    return (cache_dir or default_cache_dir()) / f"demo-model-v{DEMO_MODEL_VERSION}"


def zen_text() -> str:
    """The Zen of Python, decoded from the ``this`` module without printing it."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return "".join(this.d.get(c, c) for c in this.s)


def zen_prompts(text: str) -> list[tuple[str, str]]:
    """(prompt, rest of line) per non-empty line; prompts are the shortest unique prefix of
    at least three words (fewer only for shorter lines)."""
    lines = [line for line in text.splitlines() if line.strip()]
    words = [line.split(" ") for line in lines]
    out = []
    for line, ws in zip(lines, words, strict=True):
        k = min(3, len(ws) - 1)
        while k < len(ws) - 1 and sum(o[:k] == ws[:k] for o in words) > 1:
            k += 1
        prompt = " ".join(ws[:k])
        out.append((prompt, line[len(prompt) :]))
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' logging, progress bars and Python warnings inside the block."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerBase:
    """Byte-level BPE over `corpus` and the chat scaffolding, wrapped for transformers (the demo model's
    specials and chat template; the random models train theirs with it too).

    AutoTokenizer loads any qwen2 checkpoint as Qwen2Tokenizer, which rebuilds its own NFC
    normalizer and split-then-byte-level pre-tokenizer; training with exactly those keeps
    the saved tokenizer.json and the loaded tokenizer in agreement."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, "user\nassistant\nsystem\n"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=EOT,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def _examples(tok: PreTrainedTokenizerBase, text: str) -> list[Example]:
    """Plain windows (first WINDOW tokens) from every line to the end of the poem, checked
    after the line's prompt; chat turns splitting every line after its prompt, after four
    words and before its last word, trained and checked on the answer."""

    def enc(s: str) -> list[int]:
        return list(tok.encode(s, add_special_tokens=False))

    out: list[Example] = []
    offsets, pos = [], 0
    for line in text.splitlines(keepends=True):
        offsets += [pos] if line.strip() else []
        pos += len(line)
    for offset, (prompt, _) in zip(offsets, zen_prompts(text), strict=True):
        ids = enc(text[offset:] + EOT)[:WINDOW]
        out.append((ids, 1, len(enc(prompt))))
    for prompt, rest in zen_prompts(text):
        line = prompt + rest
        ws = line.split(" ")
        first = len(prompt.split(" "))
        for k in sorted({first, max(first, min(4, len(ws) - 1)), len(ws) - 1}):
            user, answer = " ".join(ws[:k]), " ".join(ws[k:])
            head = enc(f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n")
            ids = head + enc(answer + IM_END)
            out.append((ids, len(head), len(head)))
    return out


def _batches(examples: list[Example], pad_id: int) -> list[Batch]:
    """Right-padded (ids, loss mask, check mask) buckets of similar length; masks cover
    targets, i.e. positions 1.. of the ids."""
    import torch

    ordered = sorted(examples, key=lambda e: len(e[0]))
    out = []
    for lo in range(0, len(ordered), BUCKET):
        group = ordered[lo : lo + BUCKET]
        width = len(group[-1][0])
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        loss = torch.zeros((len(group), width), dtype=torch.bool)
        check = torch.zeros_like(loss)
        for row, (toks, first_loss, first_check) in enumerate(group):
            ids[row, : len(toks)] = torch.tensor(toks)
            loss[row, first_loss : len(toks)] = True
            check[row, first_check : len(toks)] = True
        out.append((ids, loss[:, 1:], check[:, 1:]))
    return out


def _make_model(tok: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    """A freshly initialised tiny Qwen2 with the demo generation config."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    # one token each: one id each (a list of tokens would give a list)
    eos, pad = cast(int, tok.convert_tokens_to_ids(IM_END)), cast(int, tok.convert_tokens_to_ids(EOT))
    config = Qwen2Config(
        vocab_size=len(tok),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        **MODEL_SHAPE,
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos, pad], pad_token_id=pad, bos_token_id=None, do_sample=False
    )
    return model


def _failures(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, text: str) -> list[str]:
    """Greedy checks the finished model must pass; returns what failed."""
    import torch

    prompts = zen_prompts(text)
    checks = [(p, r + "\n") for p, r in prompts[:-1]] + [(prompts[-1][0], prompts[-1][1] + EOT)]
    user = [{"role": "user", "content": "Beautiful is better than"}]
    chat = cast(str, tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False))  # tokenize=False: text
    checks.append((chat, "ugly." + IM_END))
    bad = []
    for prompt, want in checks:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        n = len(tok.encode(want, add_special_tokens=False)) + 2
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n)
        got = cast(str, tok.decode(new[0, ids.shape[1] :], skip_special_tokens=False))  # one sequence: one text
        if not got.startswith(want) or (want.endswith((EOT, IM_END)) and got != want):
            bad.append(f"{prompt!r} -> {got!r} (want {want!r})")
    return bad


def _train(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerBase, text: str, log: Log) -> int:
    """Full-batch AdamW until every check passes; returns the number of steps."""
    import torch

    batches = _batches(_examples(tok, text), tok.pad_token_id)
    total = sum(int(mask.sum()) for _, mask, _ in batches)
    optim = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    failures = ["not evaluated"]
    for step in range(1, MAX_STEPS + 1):
        model.train()
        optim.zero_grad(set_to_none=True)
        for ids, mask, _ in batches:
            logits = model(input_ids=ids).logits[:, :-1][mask]
            loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][mask], reduction="sum")
            (loss / total).backward()
        optim.step()
        if step % EVAL_EVERY:
            continue
        model.eval()
        with torch.no_grad():  # teacher-forced argmax right everywhere => greedy output right
            preds = [model(input_ids=ids).logits[:, :-1].argmax(-1) for ids, _, _ in batches]
        wrong = sum(int(((p != ids[:, 1:]) & c).sum()) for p, (ids, _, c) in zip(preds, batches, strict=True))
        log(f"demo model: step {step}, {wrong} checked tokens wrong")
        if wrong == 0:
            failures = _failures(model, tok, text)
            if not failures:
                return step
    raise RuntimeError(f"demo model did not converge in {MAX_STEPS} steps; failing checks: {failures[:5]}")


def _build_into(path: Path, log: Log) -> dict[str, Any]:
    """Train and save tokenizer, model and generation config into ``path``; what the marker records."""
    import torch

    started = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(THREADS, threads)))
    try:
        with _quiet(), torch.random.fork_rng(devices=[]):
            text = zen_text()
            tok = train_tokenizer([text])
            model = _make_model(tok)
            log(f"demo model: {sum(p.numel() for p in model.parameters())} parameters")
            steps = _train(model, tok, text, log)
            model.eval()
            model.save_pretrained(path, safe_serialization=True)
            tok.save_pretrained(path)
    finally:
        torch.set_num_threads(threads)
    seconds = round(time.monotonic() - started, 2)
    log(f"demo model: trained in {steps} steps, {seconds} s")
    return {"steps": steps, "build_seconds": seconds}


def build_demo_model(out: Path | None = None, *, force: bool = False, log: Log = print) -> Path:
    """Build the demo model into ``out`` (default ``demo_model_dir()``) unless it is there."""
    out = Path(out) if out is not None else demo_model_dir()
    return cached_build(
        out,
        lambda tmp: _build_into(tmp, log),
        kind=KIND,
        stamp={"version": DEMO_MODEL_VERSION},
        force=force,
        log=log,
        label="demo model",
    )
