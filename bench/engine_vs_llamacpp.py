"""The service beside in-process `generate` and llama.cpp, on one model, in one run: aggregate sampled tokens/s
(temperature 0.8, no top-k/top-p/min-p, 64 new tokens, EOS ignored) at 1 / 8 / 32 concurrent clients.

- the service through HTTP: redis-server, gunicorn web and one Celery generation worker (one child, one torch
  thread), started as the other benches start it, with the default config (so `model.dtype: auto`: bf16 on a CPU
  with native bf16, else fp32);
- in-process fp32 `generate`: one padded batch of the same requests (batch 1 / 8 / 32), one thread;
- llama.cpp's `llama-server` (continuous batching, one thread, as many slots as clients) on GGUFs of the same
  weights (`--gguf bf16 q8_0 f32`, default bf16), the same prompt token ids, through HTTP. Needs a llama.cpp build
  (`--llama-cpp-dir DIR`: the source tree with `build/bin/llama-server`, `convert_hf_to_gguf.py` and `gguf-py`);
  without one that column is skipped.

No real weights can be downloaded here, so the model is a random Llama of SmolLM2-135M's shape (134.5 M
parameters, its 49k-token vocabulary a BPE trained locally); speed does not depend on the weights' values.

    uv run python bench/engine_vs_llamacpp.py [--llama-cpp-dir DIR] [--gguf bf16 q8_0] [--clients 1 8 32]
        [--lean auto off] [--repeat 3]

Each cell is the median of `--repeat` measurements (3 by default), taken one after the other.

`--lean auto off` runs the service twice, with the engine's lean forward and with transformers' forward
(`engine.lean_forward`), one client count after the other on both, for an A/B in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import System  # noqa: E402
from qwen_deploy.cli.redis_server import free_port  # noqa: E402
from qwen_deploy.config import default_cache_dir  # noqa: E402

TEMPERATURE, NEW_TOKENS = 0.8, 64
GENERATE = "in-process `generate` fp32, one padded batch"
SAMPLING = {"temperature": TEMPERATURE, "top_p": 1.0, "top_k": 0}
# the default config but for its time limits: 32 x 64 tokens on a busy 2-core box outlast the 50 s budget
LIMITS = {"hard_time_limit": 900, "soft_time_limit": 890, "generation_budget": 880}
# convert_hf_to_gguf.py on the random model: its BPE tokenizer has Qwen2's pre-tokenizer but not Qwen2's ids (the
# converter knows pre-tokenizers by a hash of ids) and no sentencepiece model (the Llama converter tries it first).
CONVERT = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base as base
def _no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = _no_sentencepiece
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def prompt(i: int) -> str:
    words = ["Beautiful", "Explicit", "Simple", "Complex", "Flat", "Sparse", "Readability", "Errors"]
    return f"{words[i % len(words)]} is better than {i} things, and"


def body(i: int) -> dict[str, Any]:
    return {"prompt": prompt(i), "max_new_tokens": NEW_TOKENS, "ignore_eos": True, **SAMPLING}


def aggregate(call: Any, n: int) -> float:
    """Completion tokens/s of n clients, one request each, all sent at once (`call(i)` returns its tokens)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(call, range(n)))
    return tokens / (time.perf_counter() - started)


class Generate:
    """transformers' `generate`, fp32, one thread, one left-padded batch per call."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def ids(self, i: int) -> list[int]:
        return list(self.tok(prompt(i))["input_ids"])

    def tokens_s(self, n: int) -> float:
        torch, pad = self.torch, self.tok.pad_token_id
        rows = [self.ids(i) for i in range(n)]
        width = max(map(len, rows))
        x = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=True,
                temperature=TEMPERATURE,
                top_k=0,
                top_p=1.0,
                eos_token_id=self.tok.eos_token_id,
                pad_token_id=pad,
            )
        return (out.shape[1] - width) * n / (time.perf_counter() - started)


def gguf(llama_dir: Path, model_dir: Path, outtype: str) -> Path:
    """The model converted by llama.cpp's own converter, cached beside the other built models."""
    out = default_cache_dir() / "gguf" / f"{model_dir.name}-{outtype}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        args = [str(llama_dir), str(model_dir), "--outtype", outtype, "--outfile", str(tmp)]
        subprocess.run([sys.executable, "-c", CONVERT, *args], check=True, capture_output=True)
        tmp.rename(out)
    return out


class LlamaServer:
    """llama-server on one GGUF: one thread, `slots` parallel sequences, continuous batching."""

    def __init__(self, llama_dir: Path, model: Path, slots: int, log: Path) -> None:
        self.port = free_port()
        binary = llama_dir / "build" / "bin" / "llama-server"
        ctx = slots * 128  # each slot: a ~12-token prompt and 64 new tokens
        argv = [str(binary), "-m", str(model), "-t", "1", "-tb", "1", "-np", str(slots), "-c", str(ctx)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "-ngl", "0", "--cont-batching"]
        self.log = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-5:]
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {tail}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama-server did not become healthy in 300 s")

    def complete(self, ids: list[int]) -> int:
        req = {"prompt": ids, "n_predict": NEW_TOKENS, "ignore_eos": True, "cache_prompt": False}
        req.update(temperature=TEMPERATURE, top_k=0, top_p=1.0, min_p=0.0)
        r = requests.post(self.url + "/completion", json=req, timeout=600)
        r.raise_for_status()
        return int(r.json()["tokens_predicted"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def median_of(repeat: int, measure: Any) -> float:
    return statistics.median(measure() for _ in range(repeat))


def llama_cpp(
    llama_dir: Path, model_dir: Path, ref: Generate, outtype: str, clients: list[int], repeat: int
) -> dict[int, float]:
    path = gguf(llama_dir, model_dir, outtype)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in clients:  # a server per level: its slots match the clients, as the service's batch does
            server = LlamaServer(llama_dir, path, n, Path(tmp) / "server.log")
            try:
                server.complete(ref.ids(0)[:4])  # warm-up
                out[n] = median_of(repeat, lambda s=server, n=n: aggregate(lambda i: s.complete(ref.ids(i)), n))
            finally:
                server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp-dir", type=Path, help="llama.cpp source tree with build/bin/llama-server")
    parser.add_argument("--gguf", nargs="+", default=["bf16"], choices=["f32", "bf16", "q8_0"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--lean", nargs="+", default=["auto"], choices=["auto", "off"], help="engine.lean_forward")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per cell (the median is shown)")
    args = parser.parse_args()
    print(f"$ uv run python bench/engine_vs_llamacpp.py {' '.join(sys.argv[1:])}")
    from worker.builders.random import build_random_model

    model_dir = build_random_model("llama", "135m", log=lambda msg: print(f"  {msg}", file=sys.stderr))
    ref = Generate(model_dir)
    ref.tokens_s(1)  # warm-up
    rows: dict[str, dict[int, float]] = {
        GENERATE: {n: median_of(args.repeat, lambda n=n: ref.tokens_s(n)) for n in args.clients}
    }
    systems: dict[str, System] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for lean in args.lean:
                (Path(tmp) / lean).mkdir()
                system = systems[lean] = System(Path(tmp) / lean, model_dir, LIMITS, {"lean_forward": lean})
                system.concurrent([body(0) | {"max_new_tokens": 4}])  # warm-up
            for n in args.clients:  # interleaved: each count on every variant before the next count
                for lean, system in systems.items():
                    info = requests.get(system.url + "/v1/model", timeout=30).json()
                    variant = f", lean_forward {lean}" if len(args.lean) > 1 else ""
                    label = f"this service ({info.get('dtype')}{variant}), HTTP"
                    bodies = [body(i) for i in range(n)]
                    rows.setdefault(label, {})[n] = median_of(args.repeat, lambda s=system, b=bodies: s.concurrent(b))
        finally:
            for system in systems.values():
                system.stop()
    skipped = ""
    server = args.llama_cpp_dir and args.llama_cpp_dir / "build" / "bin" / "llama-server"
    if server and server.exists():
        for outtype in args.gguf:  # one that fails (a build's kernel the CPU refuses) leaves the others standing
            try:
                rows[f"llama.cpp `llama-server` {outtype}, HTTP"] = llama_cpp(
                    args.llama_cpp_dir, model_dir, ref, outtype, args.clients, args.repeat
                )
            except (RuntimeError, OSError, subprocess.CalledProcessError, requests.RequestException) as exc:
                skipped += f"llama.cpp {outtype} failed: {str(exc)[:300]}\n"
    else:
        skipped = f"llama.cpp skipped: no llama-server under {args.llama_cpp_dir or '(no --llama-cpp-dir)'}"
    base = rows[GENERATE]
    print(
        f"\nrandom Llama of SmolLM2-135M's shape, 1 thread, {NEW_TOKENS} new tokens, T {TEMPERATURE}, tokens/s, median of {args.repeat}"
    )
    print("| | " + " | ".join(f"{n} client{'s' if n > 1 else ''}" for n in args.clients) + " |")
    print("|---|" + "---|" * len(args.clients))
    for label, got in rows.items():
        cells = [f"{got[n]:.0f} ({got[n] / base[n]:.2f}x)" for n in args.clients]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if skipped:
        print(skipped.strip())
    print("(x: over in-process fp32 `generate` at the same count)")
    print("\n" + json.dumps({k: {str(n): round(v, 2) for n, v in r.items()} for k, r in rows.items()}))


if __name__ == "__main__":
    main()
