"""Open SSE streams against the launched web server: /livez and submit latency, and web RSS.

    uv run python bench/streams_bench.py [--streams 1000] [--workers 2] [--worker-class gevent]

Starts its own redis-server and gunicorn (the launcher's command line, no generation worker, so the
streamed job stays queued), opens N streams on one job, then times sequential `GET /livez` and
`POST /v1/jobs` on a keep-alive connection while every stream stays open.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import subprocess
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


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    pids = [pid] + [
        int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    ]
    total = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def open_streams(port: int, job_id: str, n: int, timeout: float = 120.0) -> list[socket.socket]:
    """N sockets, each past its response headers and first event comment."""
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, b"")
        socks.append(s)
    pending, deadline = n, time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            data = key.data + key.fileobj.recv(4096)
            if b"stream of job events" in data:
                assert data.startswith(b"HTTP/1.1 200"), data[:200]
                sel.unregister(key.fileobj)
                pending -= 1
            else:
                sel.modify(key.fileobj, selectors.EVENT_READ, data)
    if pending:
        raise SystemExit(f"{pending} of {n} streams got no answer within {timeout:g} s")
    return socks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-class", default="gevent")
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="streams-bench-"))
    env = {
        "QWEN_DEPLOY_ENV_FILE": "no.env",
        "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml"),
        "QWEN_DEPLOY_LIMITS__MAX_STREAMS_PER_KEY": "100000",
        "QWEN_DEPLOY_LIMITS__MAX_STREAM": "900",
        "QWEN_DEPLOY_LIMITS__MAX_QUEUE_DEPTH": "100000",
        "QWEN_DEPLOY_LIMITS__MAX_INFLIGHT_PER_KEY": "100000",
        "QWEN_DEPLOY_LOG_LEVEL": "WARNING",
        "QWEN_DEPLOY_WEB__WORKERS": str(args.workers),
        "QWEN_DEPLOY_WEB__THREADS": "16",
        "QWEN_DEPLOY_WEB__WORKER_CLASS": args.worker_class,
        "QWEN_DEPLOY_WEB__WORKER_CONNECTIONS": str(args.streams + 500),
    }
    deployment = Deployment(env, logs=tmp, cwd=ROOT, quick_stop=True)  # quick: streams blocked in XREAD
    server = deployment.start_redis(data_dir=tmp, appendonly=False)
    port = free_port()
    web = deployment.start_web("127.0.0.1", port, access_log=None)
    try:
        url = deployment.wait_web(60)
        idle_rss = rss_mib(web.pid)
        job = requests.post(url + "/v1/jobs", json={"prompt": "x"}, timeout=10).json()
        started = time.monotonic()
        socks = open_streams(port, job["id"], args.streams)
        open_s = time.monotonic() - started
        session = requests.Session()
        livez, submit = [], []
        for _ in range(args.samples):
            t = time.perf_counter()
            assert session.get(url + "/livez", timeout=10).status_code == 200
            livez.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert (
                session.post(url + "/v1/jobs", json={"prompt": "y", "max_new_tokens": 1}, timeout=10).status_code == 202
            )
            submit.append(time.perf_counter() - t)
        rss = rss_mib(web.pid)
        clients = redis.Redis.from_url(server.url).info("clients")["connected_clients"]
        alive = sum(1 for s in socks if s.fileno() != -1)
        print(
            f"$ uv run python bench/streams_bench.py --streams {args.streams} --workers {args.workers} "
            f"--worker-class {args.worker_class}"
        )
        print(f"streams open: {alive} (opened in {open_s:.1f} s), {args.samples} samples each")
        print(f"GET /livez    p50 {statistics.median(livez) * 1000:.1f} ms  p99 {pct(livez, 0.99):.1f} ms")
        print(f"POST /v1/jobs p50 {statistics.median(submit) * 1000:.1f} ms  p99 {pct(submit, 0.99):.1f} ms")
        print(
            f"web RSS (master + {args.workers} workers): idle {idle_rss:.0f} MiB, with streams {rss:.0f} MiB"
            + f"; redis clients {clients}"
        )
        for s in socks:
            s.close()
    finally:
        deployment.stop(timeout=30)


if __name__ == "__main__":
    main()
