"""The batching engine on a GPU, beside transformers' `generate` (static padded batch) and `generate_batch`
(its paged continuous batching), on the same requests in the same run: random-weight models of Qwen2.5-0.5B's
and Qwen2.5-7B's shapes (config only, initialised on the device, bf16, no weights read), greedy, EOS ignored,
short random prompts (8-24 tokens).

Per model and row count: tokens/s of each arm, and for the engine and `generate` the share of a step's wall
time the host spends outside the model's forward (a separate pass with the device synchronised around every
forward); the engine's ids are compared with `generate`'s. Rows 1 / 64 / 256 x 64 new tokens for 0.5B; the 7B
is capped at 1 / 64 / 128 rows x 32 tokens so the whole run stays under 5 minutes on one H100. A cell that
would start after --deadline seconds is skipped (and says so); an arm that fails prints its error and the
run goes on.

Needs only torch, transformers and the engine package, `worker/engine/` (no Redis, no web).

    python bench/engine_gpu.py                       # on a CUDA machine
    python bench/engine_gpu.py --tiny                # tiny shapes, any device (CPU: fp32): a smoke run
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.engine import Engine, Seq, runner  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "hidden_size": 3584,
        "intermediate_size": 18_944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152_064,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "tie_word_embeddings": True,
    },
}
# (rows, new tokens) per model: the 7B capped to keep the run under 5 minutes on one H100
PLANS: dict[str, tuple[list[int], int]] = {
    "qwen2.5-0.5b": ([1, 64, 256], 64),
    "qwen2.5-7b": ([1, 64, 128], 32),
    "tiny": ([1, 8, 32], 16),
}
PAD = 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A random model of `name`'s shape, initialised directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        **SHAPES[name], max_position_embeddings=32_768, eos_token_id=None, bos_token_id=None, pad_token_id=PAD
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def prompts(rows: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (rows,), generator=gen).tolist()
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


class ForwardClock:
    """Wall time inside the model's forward calls (transformers' forward, or the engine runner's forward: the
    lean one never calls the model's own), the device synchronised on entry and exit; nested calls count once."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model, self.device, self.inside, self._t, self._depth = model, device, 0.0, 0.0, 0
        self._hooks: list[Any] = []
        self._forward = runner.forward

    def _before(self, *_: Any, **__: Any) -> None:
        if not self._depth:
            sync(self.device)
            self._t = time.perf_counter()
        self._depth += 1

    def _after(self, *_: Any, **__: Any) -> None:
        self._depth -= 1
        if not self._depth:
            sync(self.device)
            self.inside += time.perf_counter() - self._t

    def __enter__(self) -> ForwardClock:
        real = self._forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._before()
            try:
                return real(*args, **kwargs)
            finally:
                self._after()

        runner.forward = timed  # type: ignore[assignment]
        self._hooks = [
            self.model.register_forward_pre_hook(self._before),
            self.model.register_forward_hook(self._after),
        ]
        return self

    def __exit__(self, *_: object) -> None:
        runner.forward = self._forward  # type: ignore[assignment]
        for hook in self._hooks:
            hook.remove()


def run_engine(model: Any, batch: list[list[int]], new: int, lean: str = "auto") -> list[list[int]]:
    rows = len(batch)
    engine = Engine(
        model,
        lambda ids: "",
        [model.config.vocab_size - 1],
        PAD,
        max_batch=max(rows, 1),
        max_batch_tokens=rows * (new + 64),
        max_prefill_tokens=rows * 32,
        lean_forward=lean,
    )
    seqs = [Seq(str(i), p, new, ignore_eos=True) for i, p in enumerate(batch)]
    for seq in seqs:
        engine.add(seq)
    while len(engine):
        engine.step()
    return [s.out for s in seqs]


def run_generate(model: Any, batch: list[list[int]], new: int) -> list[list[int]]:
    width = max(map(len, batch))
    device = model.device
    x = torch.tensor([[PAD] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=model.config.vocab_size - 1,
            pad_token_id=PAD,
        )
    return out[:, width:].tolist()


def run_generate_batch(model: Any, batch: list[list[int]], new: int) -> list[list[int]]:
    """transformers' paged continuous batching; its cache kept small off CUDA (its default takes most of RAM)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=PAD)
    accepted = inspect.signature(model.generate_batch).parameters
    extra: dict[str, Any] = {}
    if "progress_bar" in accepted:
        extra["progress_bar"] = False
    if model.device.type != "cuda":
        small = {"block_size": 64, "num_blocks": 64, "max_batch_tokens": 512}
        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:
            for key, value in small.items():  # older releases read these from the generation config
                setattr(config, key, value)
        else:
            if "continuous_batching_config" in accepted:
                fields = inspect.signature(ContinuousBatchingConfig).parameters
                renamed = {
                    ("page_size" if k == "block_size" and "page_size" in fields else k): v for k, v in small.items()
                }
                sizes: dict[str, Any] = {k: v for k, v in renamed.items() if k in fields}
                extra["continuous_batching_config"] = ContinuousBatchingConfig(**sizes)
    # not under inference_mode: its thread updates in place tensors that would then be inference tensors
    results = model.generate_batch(inputs=batch, generation_config=config, **extra)
    outs = list(results.values())
    if len(outs) != len(batch):
        raise RuntimeError(f"generate_batch returned {len(outs)} of {len(batch)} requests")
    return [list(r.generated_tokens) for r in outs]


Arm = Callable[[Any, list[list[int]], int], list[list[int]]]
ARMS: dict[str, Arm] = {"engine": run_engine, "generate": run_generate, "generate_batch": run_generate_batch}
# the engine on transformers' forward (engine.lean_forward: off): an A/B of the lean forward, not run by default
EXTRA_ARMS: dict[str, Arm] = {"engine_hf": lambda model, batch, new: run_engine(model, batch, new, "off")}


def timed(arm: Arm, model: Any, batch: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """(useful tokens/s, the ids) of one call; raises if any row got other than `new` tokens."""
    sync(model.device)
    started = time.perf_counter()
    out = arm(model, batch, new)
    sync(model.device)
    elapsed = time.perf_counter() - started
    if sorted(len(o) for o in out) != [new] * len(batch):
        raise RuntimeError(f"rows got {sorted({len(o) for o in out})} tokens, not {new}")
    return len(batch) * new / elapsed, out


def host_share(arm: Arm, model: Any, batch: list[list[int]], new: int) -> float:
    """The share of the call's wall time spent outside the model's forward (device synchronised around it)."""
    with ForwardClock(model, model.device) as clock:
        sync(model.device)
        started = time.perf_counter()
        arm(model, batch, new)
        sync(model.device)
        total = time.perf_counter() - started
    return 1 - clock.inside / total


def cell(model: Any, rows: int, new: int, arms: list[str]) -> dict[str, Any]:
    batch = prompts(rows, model.config.vocab_size)
    out: dict[str, Any] = {"rows": rows, "new_tokens": new}
    ids: dict[str, list[list[int]]] = {}
    for name in arms:
        arm = {**ARMS, **EXTRA_ARMS}[name]
        try:
            out[name], ids[name] = timed(arm, model, batch, new)
            if name != "generate_batch":
                out[f"{name}_host"] = host_share(arm, model, batch, new)
        except Exception as exc:  # one failing arm leaves the others standing
            out[name] = f"failed: {type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
    if "engine" in ids and "generate" in ids:
        out["engine_equals_generate"] = sum(a == b for a, b in zip(ids["engine"], ids["generate"]))
    return out


def bench(name: str, device: torch.device, dtype: torch.dtype, arms: list[str], deadline: float) -> dict[str, Any]:
    """`arms` at each row count of the model's plan; no cell starts after `deadline` (a perf_counter time)."""
    rows_list, new = PLANS[name]
    model = build(name, device, dtype)
    result: dict[str, Any] = {"model": name, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6)}
    warm = prompts(2, model.config.vocab_size, seed=1)
    for name_ in arms:  # first-call costs (kernels, allocator, CB manager) out of the timings
        try:
            {**ARMS, **EXTRA_ARMS}[name_](model, warm, 4)
        except Exception as exc:
            print(f"warm-up of {name_} failed: {exc}", file=sys.stderr)
    result["cells"] = []
    for rows in rows_list:
        if time.perf_counter() > deadline:
            result["cells"].append({"rows": rows, "new_tokens": new, "skipped": "past the deadline"})
            continue
        result["cells"].append(cell(model, rows, new, arms))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def fmt(value: Any, pct: bool = False) -> str:
    if isinstance(value, float):
        return f"{100 * value:.0f} %" if pct else f"{value:,.0f}"
    return "-" if value is None else str(value)


def report(results: list[dict[str, Any]]) -> None:
    print(
        "\n| model | rows x new tokens | engine tok/s | engine host share | generate tok/s | generate host share "
        "| generate_batch tok/s | engine ids = generate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for c in r["cells"]:
            label = f"{r['model']} ({r['parameters_m']} M)"
            if "skipped" in c:
                print(f"| {label} | {c['rows']} x {c['new_tokens']} | {c['skipped']} | | | | | |")
                continue
            print(
                f"| {label} | {c['rows']} x {c['new_tokens']} | {fmt(c.get('engine'))} | "
                f"{fmt(c.get('engine_host'), True)} | {fmt(c.get('generate'))} | {fmt(c.get('generate_host'), True)} | "
                f"{fmt(c.get('generate_batch'))} | {c.get('engine_equals_generate', '-')}/{c['rows']} |"
            )
            if "engine_hf" in c:
                hf, hf_host = fmt(c["engine_hf"]), fmt(c.get("engine_hf_host"), True)
                print(
                    f"| {label}, engine on transformers' forward | {c['rows']} x {c['new_tokens']} | {hf} | {hf_host} |"
                )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (runs anywhere; fp32 on a CPU)")
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), help="default: the two Qwen2.5 shapes")
    parser.add_argument("--rows", nargs="+", type=int, help="row counts (default: per model)")
    parser.add_argument("--tokens", type=int, help="new tokens per row (default: per model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arms", nargs="+", choices=[*ARMS, *EXTRA_ARMS], default=list(ARMS))
    parser.add_argument("--deadline", type=float, default=240.0, help="start no cell after this many seconds")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = args.models or (["tiny"] if args.tiny else ["qwen2.5-0.5b", "qwen2.5-7b"])
    for name in models:
        rows, new = PLANS[name]
        PLANS[name] = (args.rows or rows, args.tokens or new)
    print(f"$ python bench/engine_gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {gpu}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}")
    results = [bench(name, device, dtype, args.arms, started + args.deadline) for name in models]
    report(results)
    print(f"\nwall {time.perf_counter() - started:.0f} s")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
