"""The batching engine through the whole system vs in-process batched generation, on random 128 M-parameter
Llama and Qwen2 models (1 torch thread, CPU), in one run:

- aggregate tokens/s of 1, 4, 8, 16 concurrent HTTP clients (32 tokens each) vs a static padded
  `generate` batch of the same requests in-process (goal >= 0.9x);
- 8 clients with mixed lengths 8-64 tokens vs the static batch of the same 8 (goal >= 1.3x), with short
  prompts (~12 tokens) and with document-sized prompts (~130-370 tokens); beside it the same 8 through the
  engine in-process, and the most any scheduler can gain on this hardware: the static batch's step cost
  over the sum of the step costs of a batch whose rows leave when done (decode steps measured at 1..8 rows);
- one job alone: HTTP submit -> result vs in-process `generate` (goal <= 1.05x);
- time to first token of a job arriving while 15 others decode;
- an interactive job during a 64-line batch vs the same job alone (goal <= 3x);
- peak RSS of the worker child.

    uv run python bench/engine_bench.py [--arch llama qwen2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.cli.deployment import Deployment  # noqa: E402
from qwen_deploy.cli.redis_server import free_port  # noqa: E402
from qwen_deploy.client import Client  # noqa: E402

WORDS = [
    "Beautiful",
    "Explicit",
    "Simple",
    "Complex",
    "Flat",
    "Sparse",
    "Readability",
    "Special",
    "Errors",
    "Now",
    "Namespaces",
    "Although",
    "If",
    "There",
    "In",
    "Unless",
]


def build_model(arch: str) -> Path:
    """A random 128 M-parameter model (hidden 768, 12 layers, a 32k-token BPE trained locally); cached."""
    from worker.builders.random import build_random_model

    return build_random_model(arch, "128m", log=lambda msg: print(f"  {msg}", file=sys.stderr))


def body(i: int, tokens: int, ignore_eos: bool = True, document: int = 0) -> dict[str, Any]:
    """A short prompt, or (document > 0) one that quotes `document` sentences of text first."""
    text = (" ".join(WORDS) + ". ") * document
    return {
        "prompt": f"{text}{WORDS[i % len(WORDS)]} is better than {i} things, and",
        "max_new_tokens": tokens,
        "ignore_eos": ignore_eos,
    }


def mixed(document: int = 0) -> list[dict[str, Any]]:
    """8 requests of 8, 16, ..., 64 tokens, EOS on."""
    return [body(i, 8 + 8 * i, ignore_eos=False, document=document and document + 2 * i) for i in range(8)]


class InProcess:
    """The reference: transformers' `generate` on a left-padded static batch, 1 thread."""

    def __init__(self, model_dir: Path) -> None:
        import torch

        from qwen_deploy.config import load_settings
        from worker.handler import GenerationRequest, ModelHandler

        torch.set_num_threads(1)
        self.torch, self.Req = torch, GenerationRequest
        self.h = ModelHandler(load_settings(overrides={"model": {"name_or_path": str(model_dir), "threads": 1}}))
        self.h.setup()
        self.params = self.h.info.parameters  # type: ignore[union-attr]

    def static(self, bodies: list[dict[str, Any]]) -> float:
        """Useful tokens/s of one padded generate call (rows are cut at their own max_new_tokens)."""
        torch, h = self.torch, self.h
        ids = [h.encode(self.Req.from_dict(b))[0] for b in bodies]
        width = max(map(len, ids))
        x = torch.tensor([[h.pad_id] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        n = max(b["max_new_tokens"] for b in bodies)
        extra = {"min_new_tokens": n} if all(b["ignore_eos"] for b in bodies) else {}
        started = time.perf_counter()
        with torch.inference_mode():
            h.model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=h.eos_ids,
                pad_token_id=h.pad_id,
                **extra,
            )
        return sum(b["max_new_tokens"] for b in bodies) / (time.perf_counter() - started)

    def engine(self, bodies: list[dict[str, Any]]) -> float:
        """Useful tokens/s of the same requests through the batching engine in this process."""
        engine = self.h.engine()
        for i, b in enumerate(bodies):
            for seq in self.h.sequences(self.Req.from_dict(b), str(i), budget=600.0)[0]:
                engine.add(seq)
        started, tokens = time.perf_counter(), 0
        while len(engine):
            tokens += sum(len(s.out) for s in engine.step())
        return tokens / (time.perf_counter() - started)

    def bound(self, bodies: list[dict[str, Any]]) -> float:
        """The most leaving rows can gain over the static batch: c(B) * max(L) / sum over steps of c(rows),
        with c(k) a measured decode step at k rows (prefill and overheads left out)."""
        from worker.engine.runner import decode, prefill

        torch, h = self.torch, self.h
        ids = [h.encode(self.Req.from_dict(b))[0] for b in bodies]
        cost = {}
        with torch.inference_mode():
            for k in range(1, len(ids) + 1):
                batch, logits = prefill(h.model, ids[:k], h.pad_id)
                batch.last = logits.argmax(-1)
                decode(h.model, batch)
                started = time.perf_counter()
                for _ in range(4):
                    batch.last = decode(h.model, batch).argmax(-1)
                cost[k] = (time.perf_counter() - started) / 4
        lengths = [b["max_new_tokens"] for b in bodies]
        leaving = sum(cost[sum(1 for n in lengths if n > t)] for t in range(max(lengths)))
        return cost[len(ids)] * max(lengths) / leaving

    def lone_ms(self, b: dict[str, Any]) -> float:
        torch, h = self.torch, self.h
        ids = torch.tensor([h.encode(self.Req.from_dict(b))[0]])
        started = time.perf_counter()
        with torch.inference_mode():
            h.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=b["max_new_tokens"],
                min_new_tokens=b["max_new_tokens"],
                do_sample=False,
                eos_token_id=h.eos_ids,
                pad_token_id=h.pad_id,
            )
        return (time.perf_counter() - started) * 1000


class System:
    """redis-server + gunicorn web + one Celery generation worker (prefork, 1 child, 1 thread)."""

    def __init__(
        self, tmp: Path, model_dir: Path, limits: dict[str, Any] | None = None, engine: dict[str, Any] | None = None
    ) -> None:
        config = {
            "model": {"name_or_path": str(model_dir), "threads": 1},
            "limits": {"max_queue_depth": 100_000, **(limits or {})},
            "web": {"workers": 2, "threads": 32},
            "engine": engine or {},
        }
        (tmp / "config.yml").write_text(yaml.safe_dump(config))
        self.deployment = Deployment(
            {"QWEN_DEPLOY_CONFIG": str(tmp / "config.yml"), "QWEN_DEPLOY_ENV_FILE": str(tmp / "none.env")}, cwd=ROOT
        )
        self.redis = self.deployment.start_redis(data_dir=tmp / "redis", appendonly=False)
        self.deployment.start_web("127.0.0.1", free_port(), "/dev/null", ["--error-logfile", "/dev/null"])
        self.deployment.start_worker(node="bench", loglevel="WARNING")
        self.url = self.deployment.url
        self.client = Client(self.url, timeout=300)
        self.deployment.wait_web(180, "/readyz")  # a worker is ready too

    def _pid(self) -> int:
        import redis

        from qwen_deploy import registry

        found = registry.workers(redis.Redis.from_url(self.redis.url, decode_responses=True), "qd")
        return int(found[0]["pid"])

    def concurrent(self, bodies: list[dict[str, Any]]) -> float:
        """Aggregate completion tokens/s of one client thread per body, all submitting at once."""

        def run(b: dict[str, Any]) -> int:
            job = Client(self.url, timeout=300).generate(**b)
            assert job["status"] == "succeeded", job
            return int(job["output"]["usage"]["completion_tokens"])

        started = time.perf_counter()
        with ThreadPoolExecutor(len(bodies)) as pool:
            tokens = sum(pool.map(run, bodies))
        return tokens / (time.perf_counter() - started)

    def lone_ms(self, b: dict[str, Any]) -> float:
        started = time.perf_counter()
        job = self.client.generate(**b)
        assert job["status"] == "succeeded", job
        return (time.perf_counter() - started) * 1000

    def first_token_ms(self, b: dict[str, Any]) -> float:
        """Submit, then read the SSE stream until the first token event."""
        started = time.perf_counter()
        job = self.client.submit(**b)
        with requests.get(f"{self.url}/v1/jobs/{job['id']}/events", stream=True, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith(b"event: token"):
                    return (time.perf_counter() - started) * 1000
        raise RuntimeError("no token event")

    def batch(self, bodies: list[dict[str, Any]]) -> str:
        lines = [{"custom_id": f"l{i}", "body": b} for i, b in enumerate(bodies)]
        return requests.post(self.url + "/v1/batches", json={"requests": lines}, timeout=60).json()["id"]

    def batch_status(self, batch_id: str) -> dict[str, Any]:
        return requests.get(f"{self.url}/v1/batches/{batch_id}", timeout=30).json()

    def stop(self) -> None:
        self.deployment.stop()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench(arch: str, quick: bool) -> dict[str, Any]:
    model_dir = build_model(arch)
    ref = InProcess(model_dir)
    out: dict[str, Any] = {"arch": arch, "parameters_m": round(ref.params / 1e6, 1)}
    levels = [1, 4, 8] if quick else [1, 4, 8, 16]
    ref.static([body(0, 4)])  # warm-up
    out["ref_tokens_s"] = {n: round(ref.static([body(i, 32) for i in range(n)]), 2) for n in levels}
    for name, work in (("mixed", mixed()), ("mixed_doc", mixed(document=4))):
        out[f"ref_{name}_tokens_s"] = round(median([ref.static(work) for _ in range(2)]), 2)
        out[f"engine_{name}_tokens_s"] = round(median([ref.engine(work) for _ in range(2)]), 2)
        out[f"bound_{name}"] = round(ref.bound(work), 3)
        out[f"{name}_prompt_tokens"] = [len(ref.h.encode(ref.Req.from_dict(b))[0]) for b in work]
    lone = body(3, 32)
    out["ref_lone_ms"] = round(median([ref.lone_ms(lone) for _ in range(3)]), 1)
    del ref
    with tempfile.TemporaryDirectory() as tmp:
        system = System(Path(tmp), model_dir)
        try:
            system.lone_ms(body(0, 4))  # warm-up
            out["http_lone_ms"] = round(median([system.lone_ms(lone) for _ in range(3)]), 1)
            out["http_tokens_s"] = {n: round(system.concurrent([body(i, 32) for i in range(n)]), 2) for n in levels}
            for name, work in (("mixed", mixed()), ("mixed_doc", mixed(document=4))):
                out[f"http_{name}_tokens_s"] = round(median([system.concurrent(work) for _ in range(2)]), 2)
            # time to first token of a job arriving while 15 others decode
            busy = [system.client.submit(**body(i, 96)) for i in range(15)]
            time.sleep(1.0)
            out["ttft_ms_under_15"] = round(system.first_token_ms(body(20, 8)), 1)
            for job in busy:
                system.client.wait(job["id"], timeout=600)
            out["ttft_ms_alone"] = round(system.first_token_ms(body(20, 8)), 1)
            # an interactive job during a 64-line batch
            probe = body(21, 32)
            alone = median([system.lone_ms(probe) for _ in range(2)])
            batch_id = system.batch([body(i, 32) for i in range(64)])
            time.sleep(3.0)  # the first micro-batch (32 lines) is prefilled and decoding
            during = system.lone_ms(probe)
            while system.batch_status(batch_id)["status"] not in ("completed", "failed", "cancelled"):
                time.sleep(0.5)
            out["interactive_alone_ms"], out["interactive_during_batch_ms"] = round(alone, 1), round(during, 1)
            out["child_peak_rss_mb"] = round(peak_rss_mb(system._pid()), 1)
        finally:
            system.stop()
    return out


def lone_only(arch: str, runs: int) -> None:
    """Lone-job latency only: in-process `generate` and HTTP, `runs` each, interleaved in time."""
    import gc

    model_dir = build_model(arch)
    ref = InProcess(model_dir)
    lone = body(3, 32)
    ref.lone_ms(lone)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        system = System(Path(tmp), model_dir)
        try:
            system.lone_ms(body(0, 4))
            pairs = []
            for _ in range(runs):
                gc.collect()
                pairs.append((ref.lone_ms(lone), system.lone_ms(lone)))
        finally:
            system.stop()
    local, http = median([a for a, _ in pairs]), median([b for _, b in pairs])
    print(
        f"{arch}: lone job (32 tokens), {runs} interleaved runs: in-process p50 {local:.1f} ms, "
        f"HTTP p50 {http:.1f} ms, ratio {http / local:.3f}"
    )


def report(r: dict[str, Any]) -> None:
    print(f"\n## {r['arch']} ({r['parameters_m']} M parameters, random weights, 1 torch thread)")
    print("| clients | in-process static batch tok/s | through HTTP tok/s | ratio |")
    print("|---|---|---|---|")
    for n, ref in r["ref_tokens_s"].items():
        got = r["http_tokens_s"][n]
        print(f"| {n} x 32 tokens | {ref} | {got} | {got / ref:.2f} |")
    for name, label in (
        ("mixed", "8 mixed 8-64 tokens, short prompts"),
        ("mixed_doc", "8 mixed 8-64 tokens, documents"),
    ):
        ref, got = r[f"ref_{name}_tokens_s"], r[f"http_{name}_tokens_s"]
        print(f"| {label} | {ref} | {got} | {got / ref:.2f} |")
    for name in ("mixed", "mixed_doc"):
        ref = r[f"ref_{name}_tokens_s"]
        prompts = r[f"{name}_prompt_tokens"]
        print(
            f"{name} (prompts {min(prompts)}-{max(prompts)} tokens): engine in-process "
            f"{r[f'engine_{name}_tokens_s'] / ref:.2f}x static, HTTP {r[f'http_{name}_tokens_s'] / ref:.2f}x; "
            f"bound from measured step costs {r[f'bound_{name}']:.2f}x"
        )
    print(
        f"lone job (32 tokens): in-process {r['ref_lone_ms']} ms, HTTP {r['http_lone_ms']} ms, "
        f"ratio {r['http_lone_ms'] / r['ref_lone_ms']:.3f}"
    )
    print(f"time to first token: alone {r['ttft_ms_alone']} ms, while 15 others decode {r['ttft_ms_under_15']} ms")
    print(
        f"interactive job during a 64-line batch: {r['interactive_during_batch_ms']} ms vs "
        f"{r['interactive_alone_ms']} ms alone ({r['interactive_during_batch_ms'] / r['interactive_alone_ms']:.2f}x)"
    )
    print(f"worker child peak RSS: {r['child_peak_rss_mb']} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["llama", "qwen2"], choices=["llama", "qwen2"])
    parser.add_argument("--quick", action="store_true", help="1, 4 and 8 clients only")
    parser.add_argument("--lone-only", type=int, metavar="RUNS", help="only the lone-job latency, RUNS each")
    args = parser.parse_args()
    if args.lone_only:
        for arch in args.arch:
            lone_only(arch, args.lone_only)
        return
    print(f"$ uv run python bench/engine_bench.py --arch {' '.join(args.arch)}{' --quick' if args.quick else ''}")
    results = [bench(arch, args.quick) for arch in args.arch]
    for r in results:
        report(r)
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
