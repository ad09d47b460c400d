"""GET /v1/jobs latency with 100,000 jobs stored for one key, plus a second key's 1,000.

    uv run python bench/list_bench.py [--jobs 100000] [--requests 300]

The records are written straight into a fresh redis-server with a pipeline, in the shape finished jobs
leave them (90 % succeeded, 5 % failed, 5 % canceled; each with its request and ~200 characters of
text) and indexed under their owner as the submit script does; the newest 50 of the first key are
queued in the engine's pending set, so its first page also computes queue positions. The web app runs
under gunicorn as `up` starts it (`qwen_deploy/cli/deployment.py`); requests are sequential
over one keep-alive connection. Prints p50/p95 per case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.cli.deployment import Deployment  # noqa: E402
from qwen_deploy.cli.redis_server import free_port  # noqa: E402
from qwen_deploy.job_records import new_job_id  # noqa: E402
from qwen_deploy.jobs import PRIORITY_RANK, JobStore  # noqa: E402
from web.auth import owner_of  # noqa: E402

KEY_A, KEY_B = "bench-key-a", "bench-key-b"
TEXT = "Beautiful is better than ugly. Explicit is better than implicit. " * 3


def fill(store: JobStore, owner: str, count: int, queued_newest: int = 0) -> list[str]:
    ids = [new_job_id() for _ in range(count)]
    ids.sort()
    now = time.time()
    pipe = store.client.pipeline(transaction=False)
    for i, job_id in enumerate(ids):
        status = "succeeded" if i % 20 < 18 else "failed" if i % 20 == 18 else "canceled"
        queued = i >= count - queued_newest
        record = {
            "id": job_id,
            "status": "queued" if queued else status,
            "type": "generation",
            "queue": "interactive",
            "owner": owner,
            "created_at": repr(now),
            "priority": "normal",
            "deliveries": "0" if queued else "1",
            "request": json.dumps({"prompt": "Beautiful is better than", "max_new_tokens": 64}),
            "max_new_tokens": "64",
            "tokens": "0" if queued else "64",
        }
        if not queued:
            record.update(
                started_at=repr(now),
                completed_at=repr(now),
                text=TEXT,
                finish_reason="length",
                usage=json.dumps({"prompt_tokens": 6, "completion_tokens": 64, "prompt_truncated": False}),
            )
            if status == "failed":
                record["error"] = json.dumps({"code": "generation_error", "message": "bench"})
        else:
            pipe.zadd(store.pending_key(), {job_id: PRIORITY_RANK["normal"] * 1e10 + now + i * 1e-6})
        pipe.hset(store.key(job_id), mapping=record)
        pipe.zadd(store.index_key(owner), {job_id: 0})
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    return ids


def measure(session: requests.Session, url: str, key: str, n: int) -> tuple[float, float, int]:
    times = []
    size = 0
    for _ in range(n):
        t = time.perf_counter()
        r = session.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        times.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        size = len(r.json()["data"])
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="list-bench-"))
    deployment = Deployment(
        {
            "QWEN_DEPLOY_ENV_FILE": "no.env",
            "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml"),
            "QWEN_DEPLOY_LOG_LEVEL": "WARNING",
            "QWEN_DEPLOY_WEB__API_KEYS": json.dumps([KEY_A, KEY_B]),
        },
        logs=tmp,
        cwd=ROOT,
    )
    server = deployment.start_redis(data_dir=tmp, appendonly=False)
    store = JobStore(redis.Redis.from_url(server.url, decode_responses=True))
    t = time.perf_counter()
    ids_a = fill(store, owner_of(KEY_A), args.jobs, queued_newest=50)
    fill(store, owner_of(KEY_B), 1000)
    filled = time.perf_counter() - t
    memory = store.client.info("memory")["used_memory_human"]
    deployment.start_web("127.0.0.1", free_port(), access_log=None)
    base = deployment.wait_web(60)
    middle = ids_a[len(ids_a) // 2]
    cases = [
        ("key A, first page (20, with 20 queued positions)", KEY_A, "/v1/jobs"),
        ("key A, limit=100", KEY_A, "/v1/jobs?limit=100"),
        ("key A, after= the 50,000th id", KEY_A, f"/v1/jobs?after={middle}"),
        ("key A, status=failed (1 in 20)", KEY_A, "/v1/jobs?status=failed"),
        ("key A, status=timed_out (none: 2,000 scanned)", KEY_A, "/v1/jobs?status=timed_out"),
        ("key B (1,000 jobs), first page", KEY_B, "/v1/jobs"),
    ]
    try:
        session = requests.Session()
        measure(session, base + "/v1/jobs", KEY_A, 20)  # warm up every gunicorn worker's connections
        print(f"$ uv run python bench/list_bench.py --jobs {args.jobs} --requests {args.requests}")
        print(
            f"stored: {args.jobs} jobs for key A + 1000 for key B in {filled:.1f} s; redis used_memory {memory}; "
            f"{os.cpu_count()} CPUs"
        )
        for name, key, path in cases:
            p50, p95, size = measure(session, base + path, key, args.requests)
            print(f"{name:48s} p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  ({size} jobs per page)")
        print(f"load average {os.getloadavg()[0]:.1f}")
    finally:
        deployment.stop(timeout=30)


if __name__ == "__main__":
    main()
