"""Throughput with 1 and 2 generation worker processes on CPU-bound work, through HTTP and Redis.

    uv run python bench/scaleout_bench.py [--jobs 32] [--tokens 64] [--max-batch 8] [--rounds 2] [--arch qwen2]

Each run starts redis-server, the gunicorn web app and 1 or 2 Celery generation workers (prefork, one
child, 1 torch thread each) on the random 38m model of `worker/builders`, then `--jobs` client threads
each POST /v1/generate at once (greedy, `ignore_eos`, `--tokens` new tokens). Prints completion tokens/s
for 1 and 2 workers (alternating, `--rounds` each), the ratio, how the jobs spread over the workers,
and the load average (the box may be shared). `engine.max_batch` caps the rows one engine takes: an
engine claims every waiting job up to its room, so with `--max-batch` ≥ `--jobs` one process takes them all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import System, body  # noqa: E402
from qwen_deploy import registry  # noqa: E402
from qwen_deploy.connections import connect  # noqa: E402
from qwen_deploy.keys import JobKeys  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (from /proc)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run(model: Path, workers: int, jobs: int, tokens: int) -> tuple[float, list[int], float]:
    """Completion tokens/s of `jobs` concurrent jobs on `workers` worker processes, jobs per worker, and
    the cores the worker children got meanwhile (CPU seconds / wall seconds: below `workers` when the
    machine is shared)."""
    system = System(Path(tempfile.mkdtemp(prefix="scaleout-")), model)
    try:
        for k in range(1, workers):
            system.deployment.start_worker(node=f"bench{k}", name=f"worker{k}", loglevel="WARNING")
        client = connect(system.redis.url)
        deadline = time.monotonic() + 180
        while sum(1 for w in registry.workers(client, "qd") if w.get("state") == "ready") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers did not become ready")
            time.sleep(0.2)
        system.concurrent([body(i, 8) for i in range(2 * workers)])  # warm up every engine
        client.delete(*client.keys(JobKeys("qd").key("job_*")) or ["none"])
        children = [int(w["pid"]) for w in registry.workers(client, "qd")]
        cpu0, t0 = cpu_seconds(children), time.monotonic()
        tps = system.concurrent([body(i, tokens) for i in range(jobs)])
        cores = (cpu_seconds(children) - cpu0) / (time.monotonic() - t0)
        by_worker = Counter(
            client.hget(k, "worker") for k in client.keys(JobKeys("qd").key("job_*")) if not k.endswith(":ev")
        )
        return tps, sorted(by_worker.values(), reverse=True), cores
    finally:
        system.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8, help="engine.max_batch of each worker")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arch", default="qwen2")
    args = parser.parse_args()
    from worker.builders.random import build_random_model

    model = build_random_model(args.arch, "38m")
    os.environ["QWEN_DEPLOY_ENGINE__MAX_BATCH"] = str(args.max_batch)  # the children inherit it
    figures: dict[int, list[float]] = {1: [], 2: []}
    print(f"load average before: {os.getloadavg()}")
    for r in range(args.rounds):
        for workers in (1, 2):
            tps, spread, cores = run(model, workers, args.jobs, args.tokens)
            figures[workers].append(tps)
            print(
                f"round {r + 1}: {workers} worker(s): {tps:.1f} tokens/s, jobs per worker {spread}, worker "
                f"children got {cores:.2f} cores ({tps / max(cores, 1e-9):.1f} tokens per CPU-second), "
                f"load {os.getloadavg()[0]:.2f}"
            )
    one, two = statistics.median(figures[1]), statistics.median(figures[2])
    print(
        f"median: 1 worker {one:.1f} tokens/s, 2 workers {two:.1f} tokens/s, ratio {two / one:.2f}x "
        f"({args.jobs} jobs x {args.tokens} tokens, engine.max_batch {args.max_batch}, {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
