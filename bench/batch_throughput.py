"""Bulk throughput: one batch vs sequential single jobs, the queue vs in-process batching, and the
latency of an interactive job while a 1,000-line batch runs. Bench model: random Qwen2, ~38 M params.

    uv run python bench/batch_throughput.py [--prompts 256] [--single 64] [--tokens 32] [--threads 1]

Sequential single jobs are timed on the first --single prompts (their throughput, jobs/s, is what
is compared); the batch runs all --prompts in micro-batches of 32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_overhead import ROOT, System, build_bench_model  # noqa: E402

PROMPTS = ["Beautiful is better than", "Errors should never", "Now is better than", "Simple is better than"]


def bodies(n: int, tokens: int) -> list[dict[str, object]]:
    return [{"prompt": f"{PROMPTS[i % 4]} {i}", "max_new_tokens": tokens, "ignore_eos": True} for i in range(n)]


def in_process_batched(model_dir: Path, n: int, tokens: int, size: int, threads: int) -> float:
    """Requests per second of padded batched generate calls in this process."""
    from qwen_deploy.config import load_settings
    from worker.handler import GenerationRequest, ModelHandler

    handler = ModelHandler(load_settings(overrides={"model": {"name_or_path": str(model_dir), "threads": threads}}))
    handler.setup()
    reqs = [GenerationRequest.from_dict(b) for b in bodies(n, tokens)]
    handler.generate_batch(reqs[:size], max_batch=size)  # warm-up
    started = time.perf_counter()
    handler.generate_batch(reqs, max_batch=size)
    return n / (time.perf_counter() - started)


def run_batch(system: System, n: int, tokens: int) -> tuple[float, str]:
    client = system.client
    lines = [{"custom_id": str(i), "body": b} for i, b in enumerate(bodies(n, tokens))]
    started = time.perf_counter()
    batch = client.create_batch(lines)
    while client.batch(batch["id"])["status"] != "completed":
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    assert client.batch(batch["id"])["request_counts"]["completed"] == n
    return n / elapsed, batch["id"]


def run_singles(system: System, n: int, tokens: int) -> tuple[float, list[float]]:
    client = system.client
    times = []
    started = time.perf_counter()
    for body in bodies(n, tokens):
        t0 = time.perf_counter()
        job = client.submit(**body)
        assert client.get(job["id"], wait=30)["status"] == "succeeded"
        times.append(time.perf_counter() - t0)
    return n / (time.perf_counter() - started), times


def interactive_during_batch(system: System, tokens: int) -> tuple[float, float, float]:
    """(latency of an interactive job submitted mid-batch, one micro-batch's time, the job alone)."""
    client = system.client
    lines = [{"custom_id": str(i), "body": b} for i, b in enumerate(bodies(1000, tokens))]
    batch = client.create_batch(lines)
    counts = lambda: client.batch(batch["id"])["request_counts"]["completed"]  # noqa: E731
    while counts() < 32:
        time.sleep(0.01)
    first_done = time.perf_counter()
    while counts() < 64:
        time.sleep(0.01)
    micro = time.perf_counter() - first_done
    started = time.perf_counter()
    job = client.submit(**bodies(1, tokens)[0])
    done = client.wait(job["id"], timeout=120)
    latency = time.perf_counter() - started
    assert done["status"] == "succeeded"
    client.cancel_batch(batch["id"])
    alone = done["completed_at"] - done["started_at"]
    return latency, micro, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--single", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from worker.demo_model import build_demo_model, default_cache_dir

    model = build_bench_model(build_demo_model(log=lambda m: None), default_cache_dir() / "bench-model-qwen2-38m")
    local = in_process_batched(model, args.prompts, args.tokens, 32, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        system = System(Path(tmp), model, threads=args.threads)
        try:
            batch_rate, _ = run_batch(system, args.prompts, args.tokens)
            single_rate, single_times = run_singles(system, args.single, args.tokens)
            latency, micro, alone = interactive_during_batch(system, args.tokens)
            loads = system.loads()
        finally:
            system.stop()
    print(
        f"$ uv run python bench/batch_throughput.py --prompts {args.prompts} --single {args.single} "
        f"--tokens {args.tokens} --threads {args.threads}   (cwd {ROOT.name})"
    )
    print(f"bench model ~38M params, {args.tokens} new tokens per request, micro-batch 32, {args.threads} thread(s)")
    print(f"sequential single jobs : {single_rate:7.2f} req/s  (p50 {statistics.median(single_times) * 1000:.0f} ms)")
    print(f"one batch of {args.prompts:<9} : {batch_rate:7.2f} req/s  -> {batch_rate / single_rate:.2f}x single jobs")
    print(f"in-process batched     : {local:7.2f} req/s  -> queue reaches {batch_rate / local:.2f} of it")
    print(
        f"interactive job during a 1000-line batch: {latency * 1000:.0f} ms "
        f"(one micro-batch {micro * 1000:.0f} ms + the job alone {alone * 1000:.0f} ms = "
        f"{(micro + alone) * 1000:.0f} ms budget)"
    )
    print(f"model loads: {loads}")


if __name__ == "__main__":
    main()
