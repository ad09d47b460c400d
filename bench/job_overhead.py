"""What the queue adds to a generation: in-process `generate` vs HTTP submit→result, and front-end throughput.

Runs, side by side, on the demo model and on a randomly initialised ~38 M-parameter Qwen2 bench model:
the same request in-process (ModelHandler, 1 thread) and through the whole system (gunicorn web,
Redis, Celery prefork worker with one child, 1 thread), plus jobs/s with one worker and the number of
model loads; then POST /v1/jobs throughput with wrk (2 gunicorn workers, no worker consuming).

    uv run python bench/job_overhead.py [--runs 30] [--no-wrk]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.cli.deployment import Deployment  # noqa: E402
from qwen_deploy.cli.redis_server import free_port  # noqa: E402
from qwen_deploy.client import Client  # noqa: E402

PROMPT = "Beautiful is better than"


def build_bench_model(demo: Path, out: Path) -> Path:
    """A random-weight Qwen2 (~38 M parameters) that uses the demo model's tokenizer."""
    from worker.random_model import build_random_qwen2

    return build_random_qwen2(demo, out, hidden=512, intermediate=2048, layers=10, heads=8, kv_heads=2)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def in_process(model_dir: Path, tokens: int, runs: int) -> list[float]:
    """Milliseconds per generate() call, in this process, 1 thread."""
    from qwen_deploy.config import load_settings
    from worker.handler import GenerationRequest, ModelHandler

    handler = ModelHandler(load_settings(overrides={"model": {"name_or_path": str(model_dir), "threads": 1}}))
    handler.setup()
    req = GenerationRequest(prompt=PROMPT, max_new_tokens=tokens, ignore_eos=True)
    handler.generate(req)  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        handler.generate(req)
        times.append((time.perf_counter() - started) * 1000)
    return times


class System:
    """redis-server + gunicorn web + one Celery worker, configured by one YAML file."""

    def __init__(self, tmp: Path, model_dir: Path, worker: bool = True, threads: int = 1, dtype: str = "auto") -> None:
        config = {
            "model": {"name_or_path": str(model_dir), "threads": threads, "dtype": dtype},
            "limits": {"max_queue_depth": 10_000_000},
            "web": {"workers": 2, "threads": 16},
        }
        (tmp / "config.yml").write_text(yaml.safe_dump(config))
        self.deployment = Deployment(
            {"QWEN_DEPLOY_CONFIG": str(tmp / "config.yml"), "QWEN_DEPLOY_ENV_FILE": str(tmp / "none.env")}, cwd=ROOT
        )
        self.redis = self.deployment.start_redis(data_dir=tmp / "redis", appendonly=False)
        self.deployment.start_web("127.0.0.1", free_port(), "/dev/null", ["--error-logfile", "/dev/null"])
        if worker:
            self.deployment.start_worker(node="bench", loglevel="WARNING")
        self.url = self.deployment.url
        self.client = Client(self.url)
        self.deployment.wait_web(120, "/readyz" if worker else "/livez")  # /readyz: a worker is ready too

    def loads(self) -> int:
        import redis

        from qwen_deploy.keys import model_loads_key

        return int(redis.Redis.from_url(self.redis.url).get(model_loads_key("qd")) or 0)

    def stop(self) -> None:
        self.deployment.stop()


def over_http(system: System, tokens: int, runs: int) -> list[float]:
    """Milliseconds from POST /v1/jobs to the finished job (long-poll), one job at a time."""
    client = system.client
    client.wait(client.submit(PROMPT, max_new_tokens=tokens, ignore_eos=True)["id"])  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        job = client.submit(PROMPT, max_new_tokens=tokens, ignore_eos=True)
        done = client.get(job["id"], wait=30)
        times.append((time.perf_counter() - started) * 1000)
        assert done["status"] == "succeeded", done
    return times


def throughput(system: System, tokens: int, jobs: int) -> float:
    """Jobs per second with one worker: submit `jobs` at once, wait for the last."""
    client = system.client
    started = time.perf_counter()
    ids = [client.submit(PROMPT, max_new_tokens=tokens, ignore_eos=True)["id"] for _ in range(jobs)]
    for job_id in ids:
        assert client.wait(job_id)["status"] == "succeeded"
    return jobs / (time.perf_counter() - started)


def run_model(name: str, model_dir: Path, tokens: int, runs: int, jobs: int) -> dict[str, object]:
    local = in_process(model_dir, tokens, runs)
    with tempfile.TemporaryDirectory() as tmp:
        system = System(Path(tmp), model_dir)
        try:
            remote = over_http(system, tokens, runs)
            rate = throughput(system, tokens, jobs)
            loads = system.loads()
        finally:
            system.stop()
    p50_l, p50_r = statistics.median(local), statistics.median(remote)
    return {
        "model": name,
        "tokens": tokens,
        "runs": runs,
        "inproc_p50": p50_l,
        "inproc_p95": pct(local, 0.95),
        "http_p50": p50_r,
        "http_p95": pct(remote, 0.95),
        "overhead_ms_p50": p50_r - p50_l,
        "overhead_ms_p95": pct(remote, 0.95) - pct(local, 0.95),
        "ratio_p50": p50_r / p50_l,
        "jobs_per_s": rate,
        "model_loads": loads,
    }


def run_wrk(model_dir: Path, seconds: int) -> str:
    if not shutil.which("wrk"):
        return "wrk not installed (apt-get install wrk): skipped"
    script = (
        "wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\n"
        'wrk.body = \'{"prompt": "Beautiful is better than", "max_new_tokens": 8}\'\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "post.lua").write_text(script)
        system = System(Path(tmp), model_dir, worker=False)
        try:
            cmd = [
                "wrk",
                "-t2",
                "-c32",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(Path(tmp) / "post.lua"),
                system.url + "/v1/jobs",
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        finally:
            system.stop()
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return (
        f"POST /v1/jobs, wrk -t2 -c32 -d{seconds}s, 2 gunicorn gthread workers: "
        f"{rps.group(1) if rps else '?'} req/s, p99 {p99.group(1) if p99 else '?'}, "
        f"non-2xx {non2xx.group(1) if non2xx else 0}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-wrk", action="store_true")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--only-wrk", action="store_true")
    args = parser.parse_args()
    from worker.demo_model import build_demo_model, default_cache_dir

    demo = build_demo_model(log=lambda m: None)
    # The front-end figure first, before this process has loaded any model.
    wrk = "wrk: skipped (--no-wrk)" if args.no_wrk else run_wrk(demo, args.wrk_seconds)
    if args.only_wrk:
        print(wrk)
        return
    bench = build_bench_model(demo, default_cache_dir() / "bench-model-qwen2-38m")
    rows = [run_model("demo", demo, 64, args.runs, 100), run_model("bench-38M", bench, 32, max(10, args.runs // 3), 10)]
    print(f"$ uv run python bench/job_overhead.py --runs {args.runs}")
    head = (
        "model",
        "new tok",
        "inproc p50",
        "inproc p95",
        "http p50",
        "http p95",
        "+ms p50",
        "+ms p95",
        "ratio p50",
        "jobs/s",
        "loads",
    )
    print(" | ".join(f"{h:>10}" for h in head))
    for r in rows:
        cells = (
            r["model"],
            r["tokens"],
            f"{r['inproc_p50']:.1f}",
            f"{r['inproc_p95']:.1f}",
            f"{r['http_p50']:.1f}",
            f"{r['http_p95']:.1f}",
            f"{r['overhead_ms_p50']:.1f}",
            f"{r['overhead_ms_p95']:.1f}",
            f"{r['ratio_p50']:.3f}",
            f"{r['jobs_per_s']:.1f}",
            r["model_loads"],
        )
        print(" | ".join(f"{c:>10}" for c in cells))
    print(wrk)


if __name__ == "__main__":
    main()
