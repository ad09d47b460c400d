"""What the OpenAI layer adds: p50 of `POST /v1/chat/completions` vs `POST /v1/jobs` + long-poll, same request.

One system (gunicorn web, Redis, one Celery prefork worker, the demo model, 1 thread); requests one at a
time, alternating the routes so that drift in the machine's load hits both alike; plus the official SDK.

    uv run python bench/openai_overhead.py [--runs 30] [--tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

from job_overhead import System, pct  # noqa: E402

MESSAGES = [{"role": "user", "content": "Errors should never"}]


def timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    from worker.demo_model import build_demo_model

    demo = build_demo_model(log=lambda m: None)
    with tempfile.TemporaryDirectory() as tmp:
        system = System(Path(tmp), demo)
        try:
            http = requests.Session()
            sdk = openai.OpenAI(base_url=system.url + "/v1", api_key="unused", max_retries=0)
            model = sdk.models.list().data[0].id
            chat_body = {"model": model, "messages": MESSAGES, "max_tokens": args.tokens, "ignore_eos": True}
            job_body = {"messages": MESSAGES, "max_new_tokens": args.tokens, "ignore_eos": True}

            def chat() -> None:
                reply = http.post(system.url + "/v1/chat/completions", json=chat_body, timeout=60).json()
                assert reply["usage"]["completion_tokens"] == args.tokens, reply

            def job() -> None:
                job_id = http.post(system.url + "/v1/jobs", json=job_body, timeout=60).json()["id"]
                done = http.get(f"{system.url}/v1/jobs/{job_id}", params={"wait": 30}, timeout=60).json()
                assert done["output"]["usage"]["completion_tokens"] == args.tokens, done

            def with_sdk() -> None:
                reply = sdk.chat.completions.create(
                    model=model, messages=MESSAGES, max_tokens=args.tokens, extra_body={"ignore_eos": True}
                )
                assert reply.usage.completion_tokens == args.tokens

            for call in (chat, job, with_sdk):  # warm-up
                call()
            times: dict[str, list[float]] = {"jobs": [], "chat": [], "sdk": []}
            for _ in range(args.runs):
                times["jobs"].append(timed(job))
                times["chat"].append(timed(chat))
                times["sdk"].append(timed(with_sdk))
        finally:
            system.stop()
    print(f"$ uv run python bench/openai_overhead.py --runs {args.runs} --tokens {args.tokens}")
    print(f"demo model, {args.tokens} new tokens, {args.runs} requests per route, one at a time")
    base = statistics.median(times["jobs"])
    labels = {
        "jobs": "POST /v1/jobs + GET ?wait",
        "chat": "POST /v1/chat/completions",
        "sdk": "openai SDK chat.completions",
    }
    for key, label in labels.items():
        p50 = statistics.median(times[key])
        print(f"{label:>30}: p50 {p50:7.1f} ms  p95 {pct(times[key], 0.95):7.1f} ms  (p50 {p50 - base:+.1f} ms)")


if __name__ == "__main__":
    main()
