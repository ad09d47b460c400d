"""Webhook delivery: latency after completion, and a burst of jobs with webhooks (no loss, no extra copies).

Starts redis-server, a generation worker, a convert worker (which sends webhooks) and gunicorn on the
demo model, plus a loopback receiver that answers 503 to the first attempt of every 10th delivery
(forced retries) and 200 otherwise. Latency is the receiver's arrival time minus the job's
`completed_at` (same host clock).

    uv run python bench/webhook_bench.py [--jobs 500] [--sequential 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.cli.deployment import Deployment  # noqa: E402
from qwen_deploy.cli.redis_server import free_port  # noqa: E402

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """Records (webhook-id, arrival, payload); 503 on the first attempt of every `fail_every`-th message."""

    def __init__(self, fail_every: int = 10) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, float, dict[str, Any]]] = []
        self.seen: dict[str, int] = {}
        self.forced: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                arrived = time.time()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                msg = self.headers["webhook-id"]
                with receiver.lock:
                    n = receiver.seen[msg] = receiver.seen.get(msg, 0) + 1
                    fail = n == 1 and len(receiver.seen) % fail_every == 0
                    if fail:
                        receiver.forced.add(msg)
                    receiver.calls.append((msg, arrived, body))
                self.send_response(503 if fail else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def done(self, total: int) -> bool:
        """Every message seen, and every forced failure retried."""
        with self.lock:
            return len(self.seen) >= total and all(self.seen[m] >= 2 for m in self.forced)

    def delivered(self) -> dict[str, tuple[float, dict[str, Any]]]:
        """Per message id, the last arrival (the one answered 200)."""
        with self.lock:
            return {msg: (t, body) for msg, t, body in self.calls}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def wait_for(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def latencies(receiver: Receiver, ids: set[str], forced_ids: set[str]) -> list[float]:
    return [
        (t - body["data"]["completed_at"]) * 1000
        for msg, (t, body) in receiver.delivered().items()
        if body["data"]["id"] in ids and msg not in forced_ids
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--sequential", type=int, default=30)
    args = parser.parse_args()
    from worker.demo_model import build_demo_model

    model = build_demo_model(log=lambda m: None)
    tmp = Path(tempfile.mkdtemp(prefix="webhook-bench-"))
    config = {
        "model": {"name_or_path": str(model), "threads": 1},
        "limits": {"max_queue_depth": 100_000},
        "webhooks": {"secret": SECRET, "allowed_hosts": ["127.0.0.1"], "retry_schedule": [0.5, 1, 2, 5]},
    }
    (tmp / "config.yml").write_text(yaml.safe_dump(config))
    deployment = Deployment(
        {"QWEN_DEPLOY_CONFIG": str(tmp / "config.yml"), "QWEN_DEPLOY_ENV_FILE": str(tmp / "none.env")}, cwd=ROOT
    )
    deployment.start_redis(data_dir=tmp / "redis")
    receiver = Receiver()
    try:
        deployment.start_worker(name="worker", loglevel="WARNING")
        deployment.start_convert_worker(name="convert", loglevel="WARNING")
        deployment.start_web("127.0.0.1", free_port(), "/dev/null")
        base = deployment.wait_web(180, "/readyz")
        job = {"prompt": "Beautiful is better than", "max_new_tokens": 2, "webhook": receiver.url}

        def submit(_: int) -> str:
            return requests.post(base + "/v1/jobs", json=job, timeout=60).json()["id"]

        seq_ids = set()
        for i in range(args.sequential):  # one at a time: the idle latency
            seq_ids.add(submit(i))
            wait_for(lambda: receiver.done(len(seq_ids)), 30)
        idle = latencies(receiver, seq_ids, receiver.forced)
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            burst_ids = set(pool.map(submit, range(args.jobs)))
        submitted = time.monotonic() - started
        total = args.sequential + args.jobs
        ok = wait_for(lambda: receiver.done(total), 600)
        elapsed = time.monotonic() - started
        time.sleep(2.0)  # let any late extra copy arrive before counting
        with receiver.lock:
            requests_seen = len(receiver.calls)
            forced = len(receiver.forced)
            burst_msgs = {m for m, _, b in receiver.calls if b["data"]["id"] in burst_ids}
        burst = latencies(receiver, burst_ids, receiver.forced)
        print(f"command: uv run python bench/webhook_bench.py --jobs {args.jobs} --sequential {args.sequential}")
        print(
            f"idle: {len(idle)} jobs one at a time; delivery latency after completed_at "
            f"p50 {pct(idle, 0.5):.0f} ms, p95 {pct(idle, 0.95):.0f} ms"
        )
        print(
            f"burst: {args.jobs} jobs submitted in {submitted:.1f} s; all delivered: {ok}, "
            f"{len(burst_msgs)} distinct webhook ids in {elapsed:.1f} s; latency (first-try deliveries) "
            f"p50 {pct(burst, 0.5):.0f} ms, p95 {pct(burst, 0.95):.0f} ms"
        )
        extra = requests_seen - len(receiver.seen) - forced
        print(
            f"requests received {requests_seen} = {len(receiver.seen)} messages + {forced} forced retries "
            f"+ {extra} duplicates"
        )
    finally:
        deployment.stop()
        receiver.server.shutdown()


if __name__ == "__main__":
    main()
