"""Sentinel failover figures: kill -9 of the master during a burst of submits through the real stack.

    uv run python bench/failover_bench.py [--rounds 1] [--down-after-ms 1000]

Starts a master, a replica and three sentinels on loopback (quorum 2), a Celery worker on the demo model
and the web app, all on the sentinel:// URL (a submit WAITs for 1 replica, the default behind Sentinel). Prints, per round: seconds from
the kill to the promotion and to the first accepted submit, submits refused (all 503 + Retry-After), jobs
accepted and lost (goal 0). Then the cost of the WAIT after a submit (store level, with a replica).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.connections import connect  # noqa: E402
from qwen_deploy.job_records import new_job_id  # noqa: E402
from qwen_deploy.jobs import JobStore  # noqa: E402
from qwen_deploy.queues import Lane  # noqa: E402
from tests.helpers import Stack  # noqa: E402
from tests.sentinel_group import SentinelGroup, failover_burst  # noqa: E402
from worker.demo_model import build_demo_model  # noqa: E402

INTERACTIVE_QUEUE = Lane.INTERACTIVE.queue


def wait_cost(url: str, n: int = 500) -> dict[str, float]:
    """Median and p99 submit time (ms) without and with WAIT 1 (JobStore.submit on the master)."""
    store = JobStore(connect(url), "bench")
    out: dict[str, float] = {}
    for replicas in (0, 1):
        store.wait_replicas, store.wait_ms = replicas, 200
        times = []
        for _ in range(n):
            t = time.perf_counter()
            store.submit(new_job_id(), INTERACTIVE_QUEUE + ".bench", "{}", {"request": "{}"}, 100_000)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        out[f"wait{replicas}_p50_ms"] = round(statistics.median(times), 3)
        out[f"wait{replicas}_p99_ms"] = round(times[int(0.99 * n)], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--down-after-ms", type=int, default=1000)
    args = parser.parse_args()
    model = build_demo_model(log=lambda msg: None)
    tmp = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    group = SentinelGroup(tmp / "sentinel", down_after_ms=args.down_after_ms).start()
    config = {
        "redis_wait_ms": 200,
        "limits": {"reap_after": 3, "reap_grace": 1, "reap_interval": 0.5},
        "engine": {"lease_seconds": 3},
    }
    stack = Stack(tmp / "stack", model, config, redis_url=group.url)
    try:
        stack.start_worker()
        stack.start_web()
        print(f"WAIT cost: {wait_cost(group.url)}")
        for i in range(args.rounds):
            if i:  # the killed node comes back as a replica of the new master before the next round
                group.restart_killed()
            run = failover_burst(group, stack.url, {"prompt": "Beautiful is better than", "max_new_tokens": 8})
            print(f"round {i + 1} (down-after {args.down_after_ms} ms): {run.figures()}")
    finally:
        stack.stop()
        group.stop()


if __name__ == "__main__":
    main()
