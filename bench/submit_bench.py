"""Submit throughput with wrk: this service's POST /v1/jobs against a naive Flask + Celery `send_task` app.

    uv run python bench/submit_bench.py [--duration 10] [--connections 16] [--rounds 2]

Both run under the same gunicorn settings (the launcher's: gevent, `web.workers` processes) on the
same redis-server, one after the other, alternating for `--rounds` (after a 2 s warm-up of each); wrk
(Debian package `wrk`) posts the same JSON body. Prints req/s and latency percentiles for each, the ratio, and the CPU time each
request cost the app's gunicorn processes and redis-server (from /proc: on a machine shared with other
work, req/s moves with the load while CPU per request stays comparable).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.cli.launch import web_command  # noqa: E402
from qwen_deploy.cli.redis_server import RedisServer, free_port  # noqa: E402
from qwen_deploy.config import load_settings  # noqa: E402

POST_LUA = """wrk.method = "POST"
wrk.body = '{"prompt": "Beautiful is better than", "max_new_tokens": 8}'
wrk.headers["Content-Type"] = "application/json"
"""


def start(app: str, env: dict[str, str], probe: str) -> tuple[subprocess.Popen[bytes], str]:
    settings = load_settings(environ=env)
    port = free_port()
    argv = web_command(
        "127.0.0.1",
        port,
        settings.web.workers,
        settings.web.threads,
        settings.web.worker_class,
        settings.web.worker_connections,
    )
    argv = [a for a in argv if a not in ("--access-logfile", "-")]
    argv[-1] = app
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.post(url + probe, json={"prompt": "x"}, timeout=1)
            return proc, url
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (gunicorn's workers), from /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url + "/v1/jobs"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    figures = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "90", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        figures[f"p{pct}"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    figures["non2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="submit-bench-"))
    script = tmp / "post.lua"
    script.write_text(POST_LUA)
    server = RedisServer(data_dir=tmp, appendonly=False).start()
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "QWEN_DEPLOY_ENV_FILE": "no.env",
        "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml"),
        "QWEN_DEPLOY_LOG_LEVEL": "WARNING",
        "QWEN_DEPLOY_LIMITS__MAX_QUEUE_DEPTH": "100000000",
        "QWEN_DEPLOY_LIMITS__MAX_INFLIGHT_PER_KEY": "100000000",
        "QWEN_DEPLOY_LIMITS__MAX_QUEUED_UNSERVED": "100000000",
    }
    apps = {
        "qwen-deploy": start("web.wsgi:app", env, "/v1/jobs"),
        "naive": start("bench.naive_app:app", env, "/v1/jobs"),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in apps}
    redis_pid = server.proc.pid if server.proc else 0
    try:
        for _, url in apps.values():  # both gunicorn workers of each app past their first requests
            wrk(url, script, 2, args.connections)
        for _ in range(args.rounds):
            for name, (proc, url) in apps.items():
                before, redis_before = cpu_seconds(proc.pid), cpu_seconds(redis_pid)
                figures = wrk(url, script, args.duration, args.connections)
                done = figures["rps"] * args.duration
                figures["web_us"] = (cpu_seconds(proc.pid) - before) / done * 1e6
                figures["redis_us"] = (cpu_seconds(redis_pid) - redis_before) / done * 1e6
                results[name].append(figures)
    finally:
        for proc, _ in apps.values():
            proc.terminate()
            proc.wait(timeout=30)
        server.stop()
    print(
        f"$ uv run python bench/submit_bench.py --duration {args.duration} --connections {args.connections} "
        f"--rounds {args.rounds}   (wrk -t2 -c{args.connections}, {os.cpu_count()} CPUs)"
    )
    best, median = {}, {}
    for name, runs in results.items():
        for i, f in enumerate(runs, 1):
            print(
                f"{name:12s} round {i}: {f['rps']:8.0f} req/s  p50 {f['p50']:6.1f} ms  p90 {f['p90']:6.1f} ms  "
                f"p99 {f['p99']:6.1f} ms  non-2xx {f['non2xx']:.0f}  CPU/request: web {f['web_us']:5.0f} us, "
                f"redis {f['redis_us']:4.0f} us"
            )
        best[name] = max(f["rps"] for f in runs)
        median[name] = sorted(f["rps"] for f in runs)[len(runs) // 2]
    print(
        f"ratio: best round {best['qwen-deploy'] / best['naive']:.2f}x, median round "
        f"{median['qwen-deploy'] / median['naive']:.2f}x the naive app's req/s; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    cost = {name: sorted(f["web_us"] + f["redis_us"] for f in runs)[len(runs) // 2] for name, runs in results.items()}
    print(
        f"CPU per request (web + redis, median round): qwen-deploy {cost['qwen-deploy']:.0f} us, naive "
        f"{cost['naive']:.0f} us: the naive app spends {cost['naive'] / cost['qwen-deploy']:.2f}x as much"
    )
    if any(f["non2xx"] for runs in results.values() for f in runs):
        print("WARNING: some answers were not 2xx; these figures do not measure accepted submits")


if __name__ == "__main__":
    main()
