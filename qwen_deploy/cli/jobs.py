"""Commands that do work: `generate`, `analyze` (through the API or in-process), `download`, `export`
(in-process or as a convert-queue job)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_deploy.cli.common import client, demo_env, print_progress, settings
from qwen_deploy.cli.errors import model_load_error
from qwen_deploy.cli.export import add_export_parser
from qwen_deploy.cli.hub import prepare_hub_model
from qwen_deploy.cli.job_commands import URL_HELP, follow, model_job
from qwen_deploy.config import Settings
from qwen_deploy.states import JOB_TERMINAL

if TYPE_CHECKING:
    from worker.handler import ModelHandler

TERMINAL = JOB_TERMINAL
DEMO_MODEL_MARK = "demo-model-v"  # the demo model's directory name (worker/builders/demo.py)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.local:
        return _generate_local(args)
    body: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "model": args.model,
    }
    if args.chat or args.system:
        system = [{"role": "system", "content": args.system}] if args.system else []
        body["messages"] = [*system, {"role": "user", "content": args.prompt}]
    else:
        body["prompt"] = args.prompt
    api = client(args.url)
    if args.stream:
        job = api.submit(**{k: v for k, v in body.items() if v is not None})
        return follow(api, job["id"])
    job = api.generate(**body)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        print(job["output"]["text"] if job["status"] == "succeeded" else "")
    if job["status"] != "succeeded":
        reason = (job.get("error") or {}).get("message") or job["status"]
        print(f"qwen-deploy: job {job['id']} {job['status']}: {reason}", file=sys.stderr)
        return 1
    return 0


def _local_handler(config: Settings) -> ModelHandler:
    """The configured model loaded in this process, or one sentence saying why it cannot be."""
    prepare_hub_model(config.model.name_or_path, config.model.revision)  # no hub: the cache at once, or why not
    from worker.handler import ModelHandler

    handler = ModelHandler(config)
    try:
        handler.setup()
    except (OSError, ValueError, ImportError) as exc:  # no such directory or repo, no hub, not a model
        raise model_load_error(exc, config.model.name_or_path) from None
    return handler


def _generate_local(args: argparse.Namespace) -> int:
    config = settings({**os.environ, **demo_env()} if args.demo else None)
    handler = _local_handler(config)  # before torch is imported: a model that cannot load is said at once
    from worker.handler import GenerationRequest

    prompt, max_new_tokens, temperature = args.prompt, args.max_new_tokens, args.temperature
    n = max_new_tokens or config.generation.default_max_new_tokens
    if n > config.generation.max_new_tokens_cap:
        sys.exit(f"qwen-deploy: max_new_tokens is {n}; the maximum is {config.generation.max_new_tokens_cap}")
    started = time.perf_counter()
    if args.chat or args.system:
        system = [{"role": "system", "content": args.system}] if args.system else []
        req = GenerationRequest(
            messages=[*system, {"role": "user", "content": prompt}], max_new_tokens=n, temperature=temperature
        )
    else:
        req = GenerationRequest(prompt=prompt, max_new_tokens=n, temperature=temperature)
    req.seed = args.seed
    result = handler.generate(req)
    print(result.text)
    print(
        f"[{result.completion_tokens} tokens, {result.finish_reason}, {(time.perf_counter() - started) * 1000:.0f} ms]",
        file=sys.stderr,
    )
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from analysis.base import LocalRunner, QueueRunner, run_analysis
    from analysis.records import count_records, done_keys, load_analyzer, read_records

    config = settings()
    source, out = Path(args.input), Path(args.out)
    analyzer = load_analyzer(args.analyzer)
    try:
        total, missing = count_records(source, analyzer.required_fields)
    except ValueError as exc:  # a line that is not a JSON object
        sys.exit(f"qwen-deploy: {exc}")
    if missing:
        fields = ", ".join(f"`{f}`" for f in analyzer.required_fields)
        print(
            f"qwen-deploy: warning: {missing} of {total} records lack {fields}; they are analysed as empty",
            file=sys.stderr,
        )
    runner: LocalRunner | QueueRunner
    if args.local:
        runner = LocalRunner(_local_handler(config), config.batches.micro_batch_size)
        model = config.model.name_or_path
    else:
        api = client(args.url)
        runner, model = QueueRunner(api), str(api.model().get("name", ""))
    if DEMO_MODEL_MARK in model:
        print(
            "qwen-deploy: note: the demo model only knows the Zen of Python, so its answers are no real analysis; "
            "serve a chat model (`qwen-deploy up --model Qwen/Qwen2.5-0.5B-Instruct`) for useful results",
            file=sys.stderr,
        )
    done = done_keys(out)
    bar = tqdm(total=total, initial=min(len(done), total), unit="rec", desc="analyze", file=sys.stderr)
    analysed = 0
    with out.open("a", encoding="utf-8") as fh:
        for line in run_analysis(analyzer, read_records(source), runner, done, chunk=args.chunk):
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            analysed += 1
            bar.update(1)
    bar.close()
    print(f"{len(done)} already done, {analysed} analysed, results in {out}", file=sys.stderr)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    def local() -> dict[str, Any]:
        from conversion.download import download_model

        return download_model(
            args.repo_id,
            revision=args.revision,
            out=Path(args.out) if args.out else None,
            token=settings().token,
            progress=print_progress,
        )

    return model_job(args, "download", {"repo_id": args.repo_id, "revision": args.revision, "out": args.out}, local)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the work commands."""
    gen = sub.add_parser(
        "generate",
        help="one job through the API (or in-process with --local)",
        epilog='examples: qwen-deploy generate "Beautiful is better than" --stream; '
        'qwen-deploy generate "Say hi" --chat --system "Be brief" --json; '
        'qwen-deploy generate "Beautiful is" --local --demo',
    )
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate (default 64, at most 512)")
    gen.add_argument("--temperature", type=float, help="0 or absent: greedy")
    gen.add_argument("--seed", type=int, help="a sampled run with the same seed gives the same text")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--system", help="a system message (implies --chat)")
    gen.add_argument("--model", help="a served model's id or alias (default: the default model)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--json", action="store_true", help="print the whole job object as JSON")
    gen.add_argument("--demo", action="store_true", help="with --local: the demo model (built on first use)")
    where = gen.add_mutually_exclusive_group()
    where.add_argument("--url", help=URL_HELP)
    where.add_argument("--local", action="store_true", help="load the model in this process instead")
    gen.set_defaults(func=cmd_generate)

    ana = sub.add_parser(
        "analyze",
        help="bulk analysis of a JSONL/CSV file, resumable",
        description="Each record is a JSON object per line (or a CSV row with a header). The default analyzer "
        "labels the sentiment of each record's `text` field; an `id` field, when present, is what a re-run "
        "skips by. Results are appended to --out as they finish.",
        epilog='example: echo \'{"id": 1, "text": "I loved it"}\' > in.jsonl; '
        "qwen-deploy analyze in.jsonl --out out.jsonl",
    )
    ana.add_argument("input", help="JSONL (one object per line) or CSV with a header row")
    ana.add_argument("--out", required=True, help="results, one JSON object per line (appended; re-runs resume)")
    ana.add_argument(
        "--analyzer", default="analysis.example_analyzer:SentimentAnalyzer", help="module:Class of an Analyzer subclass"
    )
    ana.add_argument("--chunk", type=int, default=256, help="records per batch (written together)")
    where = ana.add_mutually_exclusive_group()
    where.add_argument("--url")
    where.add_argument("--local", action="store_true")
    ana.set_defaults(func=cmd_analyze)

    dl = sub.add_parser("download", help="Hugging Face snapshot download (in-process, or --queue)")
    dl.add_argument("repo_id")
    dl.add_argument("--revision")
    dl.add_argument("--out", help="local directory (with --queue: relative to paths.models_root)")
    dl.add_argument("--queue", action="store_true", help="run it as a job on the convert queue")
    dl.add_argument("--url")
    dl.set_defaults(func=cmd_download)

    add_export_parser(sub)
