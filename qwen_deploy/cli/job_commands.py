"""Commands over jobs that already exist or run in bulk: `jobs`, `status`, `watch`, `cancel`, `batch`; and
`model_job`, which runs a download or export here or as a convert-queue job that it follows."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_deploy.cli.common import client, print_progress
from qwen_deploy.client import APIError, Client
from qwen_deploy.states import BATCH_TERMINAL, JOB_STATES, JOB_TERMINAL

URL_HELP = "the API's address (default: http://{web.host}:{web.port} from the config, http://127.0.0.1:8000)"


def _row(job: dict[str, Any]) -> str:
    created = time.strftime("%H:%M:%S", time.localtime(job.get("created_at") or 0))
    output = job.get("output") or {}
    text = (output.get("text") or (job.get("error") or {}).get("message") or "").replace("\n", " ")
    return f"{job['id']}  {job['status']:<9}  {created}  {text[:60]}"


def cmd_jobs(args: argparse.Namespace) -> int:
    page = client(args.url).list_jobs(status=args.status, limit=args.limit)
    if args.json:
        print(json.dumps(page["data"], indent=2))
        return 0
    for job in page["data"]:
        print(_row(job))
    if not page["data"]:
        print("no jobs" + (f" with status {args.status}" if args.status else ""), file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    job = client(args.url).get(args.id)
    print(json.dumps(job, indent=2))
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Print a job's tokens as they are generated, then its final status."""
    return follow(client(args.url), args.id)


def follow(api: Client, job_id: str) -> int:
    """Stream a job's text to stdout; exit 0 when it succeeded."""
    job: dict[str, Any] = {}
    for event, data in api.stream(job_id):
        if event == "token" and not data.get("index"):
            print(data.get("text", ""), end="", flush=True)
        elif event == "done":
            job = data
    print()
    if job.get("status") != "succeeded":
        reason = (job.get("error") or {}).get("message") or job.get("status")
        print(f"qwen-deploy: job {job_id} {job.get('status')}: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = client(args.url).cancel(args.id)
    print(f"{job['id']} {job['status']}")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Submit a JSONL file as one batch, show its progress, write its result lines to a file."""
    source = Path(args.file)
    data = source.read_bytes()  # the server checks every line (a bad one goes to the batch's error file)
    api = client(args.url)
    batch = api.create_batch_jsonl(data)
    out = Path(args.out) if args.out else source.with_suffix(".results.jsonl")
    print(f"batch {batch['id']}: {(batch.get('request_counts') or {}).get('total')} lines", file=sys.stderr)
    while batch["status"] not in BATCH_TERMINAL:
        counts = batch.get("request_counts") or {}
        print_progress({"batch": batch["id"], "status": batch["status"], **counts})
        time.sleep(args.poll)
        batch = api.batch(batch["id"])
    results: list[dict[str, Any]] = []
    while chunk := api.batch_results(batch["id"], after=len(results)):  # pages of batches.max_results
        results.extend(chunk)
    with out.open("w", encoding="utf-8") as fh:
        for line in results:
            fh.write(json.dumps(line) + "\n")
    counts = batch.get("request_counts") or {}
    print(f"\nbatch {batch['id']} {batch['status']}: {counts}; {len(results)} result lines in {out}", file=sys.stderr)
    return 0 if batch["status"] == "completed" and not counts.get("failed") else 1


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the job commands."""
    ls = sub.add_parser("jobs", help="list your jobs, newest first", epilog="example: qwen-deploy jobs --status failed")
    ls.add_argument("--status", choices=JOB_STATES, help="only jobs in this state")
    ls.add_argument("--limit", type=int, default=20, help="how many (1-100, default 20)")
    ls.add_argument("--json", action="store_true", help="print the job objects as JSON")
    ls.add_argument("--url", help=URL_HELP)
    ls.set_defaults(func=cmd_jobs)
    for name, func, text in (
        ("status", cmd_status, "print one job as JSON"),
        ("watch", cmd_watch, "print a job's tokens live, then exit 0 if it succeeded"),
        ("cancel", cmd_cancel, "cancel a queued or running job"),
    ):
        cmd = sub.add_parser(name, help=text, epilog=f"example: qwen-deploy {name} job_0123abcd...")
        cmd.add_argument("id", help="the job id (job_…)")
        cmd.add_argument("--url", help=URL_HELP)
        cmd.set_defaults(func=func)
    bat = sub.add_parser(
        "batch",
        help="submit a JSONL file as one batch, show progress, write the results",
        epilog='each line: {"custom_id": "a", "body": {"prompt": "…", "max_new_tokens": 32}} '
        "(OpenAI Batch lines work too). example: qwen-deploy batch lines.jsonl --out results.jsonl",
    )
    bat.add_argument("file", help="the request lines (JSONL)")
    bat.add_argument("--out", help="where the result lines go (default: FILE.results.jsonl)")
    bat.add_argument("--poll", type=float, default=1.0, help="seconds between progress reads (default 1)")
    bat.add_argument("--url", help=URL_HELP)
    bat.set_defaults(func=cmd_batch)


def model_job(args: argparse.Namespace, kind: str, body: dict[str, Any], local: Callable[[], dict[str, Any]]) -> int:
    """Run `local()` in this process, or (with --queue) submit `body` as a convert-queue job and follow it;
    print the result as JSON."""
    from conversion.errors import ConversionError

    if args.queue:
        api = client(args.url)
        try:
            job = api.submit_model_job(kind, {k: v for k, v in body.items() if v is not None})
            while job["status"] not in JOB_TERMINAL:
                print_progress(job["progress"])
                job = api.get(job["id"], wait=2)
        except APIError as exc:
            sys.exit(f"qwen-deploy: {exc}")
        if job["status"] != "succeeded":
            sys.exit(f"\nqwen-deploy: {kind} {job['status']}: {job['error']['message']}")
        result = job["output"]
    else:
        try:
            result = local()
        except ConversionError as exc:
            sys.exit(f"\nqwen-deploy: {kind} failed ({exc.code}): {exc}")
    print(file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0
