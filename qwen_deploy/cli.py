"""The `qwen-deploy` command."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from qwen_deploy.client import Client
from qwen_deploy.config import ConfigError, Settings, load_settings
from qwen_deploy.launcher import Supervisor, celery_command, web_command, worker_argv
from qwen_deploy.queues import CONVERT_WORKER_QUEUES, GENERATION_QUEUES

MODEL_ENV = "QWEN_DEPLOY_MODEL__NAME_OR_PATH"


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        sys.exit(f"qwen-deploy: {exc}")


def _client(url: str | None) -> Client:
    """An API client for `url`, or for this host's configured web address, with the configured key."""
    settings = _settings()
    return Client(url or f"http://{settings.web.host}:{settings.web.port}", api_key=settings.client_key)


def _use_demo_model() -> str:
    """Build (or reuse) the demo model and point this process and its children at it."""
    from worker.demo_model import build_demo_model

    path = str(build_demo_model(log=lambda msg: print(f"demo-model: {msg}", file=sys.stderr)))
    os.environ[MODEL_ENV] = path
    return path


def cmd_up(args: argparse.Namespace) -> int:
    from qwen_deploy.redis_server import RedisServer, reachable

    if args.demo:
        _use_demo_model()
    if args.port is not None:
        os.environ["PORT"] = str(args.port)
    settings = _settings()
    host = args.host or settings.web.host
    web_cmd = _web_command(settings, host, settings.web.port)
    server = None
    if not reachable(settings.redis_url):
        data_dir = Path(os.environ.get("QWEN_DEPLOY_CACHE", Path.home() / ".cache" / "qwen-deploy")) / "redis"
        server = RedisServer(data_dir=data_dir).start()
        os.environ["REDIS_URL"] = server.url
        print(f"qwen-deploy: started redis-server at {server.url} (data in {data_dir})", file=sys.stderr)
    sup = Supervisor()
    try:
        sup.start("worker", celery_command(worker_argv(GENERATION_QUEUES, "gen", settings.log_level)))
        sup.start("convert-worker", celery_command(worker_argv(CONVERT_WORKER_QUEUES, "convert", settings.log_level)))
        sup.start("web", web_cmd)
        print(f"qwen-deploy: serving {settings.model.name_or_path} at http://{host}:{settings.web.port} "
              f"(Ctrl-C to stop)", file=sys.stderr)
        return sup.wait()
    finally:
        sup.stop()
        if server:
            server.stop()


def cmd_web(args: argparse.Namespace) -> int:
    settings = _settings()
    host, port = args.host or settings.web.host, args.port or settings.web.port
    os.execv(sys.executable, _web_command(settings, host, port))


def _web_command(settings: Settings, host: str, port: int) -> list[str]:
    """gunicorn's command line, after refusing an open non-loopback bind (the app checks it again)."""
    from web.auth import check_bind

    try:
        check_bind(settings, host)
    except ConfigError as exc:
        sys.exit(f"qwen-deploy: {exc}")
    os.environ["QWEN_DEPLOY_WEB__HOST"] = host  # the app's Host check and bind check see the real bind
    web = settings.web
    return web_command(host, port, web.workers, web.threads, web.worker_class, web.worker_connections)


def _run_worker(args: argparse.Namespace, queues: tuple[str, ...] | list[str], name: str) -> int:
    if getattr(args, "demo", False):
        _use_demo_model()
    settings = _settings()
    os.execv(sys.executable, celery_command(worker_argv(queues, name, settings.log_level)))


def cmd_worker(args: argparse.Namespace) -> int:
    return _run_worker(args, GENERATION_QUEUES, "gen")


def cmd_convert_worker(args: argparse.Namespace) -> int:
    return _run_worker(args, CONVERT_WORKER_QUEUES, "convert")


def cmd_demo_model(args: argparse.Namespace) -> int:
    from worker.demo_model import build_demo_model

    out = Path(args.out) if args.out else None
    print(build_demo_model(out, force=args.force, log=lambda m: print(m, file=sys.stderr)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.local:
        return _generate_local(args.prompt, params)
    from qwen_deploy.client import APIError

    try:
        job = _client(args.url).generate(args.prompt, **params)
    except APIError as exc:
        sys.exit(f"qwen-deploy: {exc}")
    print(job["output"]["text"])
    return 0 if job["status"] == "succeeded" else 1


def _generate_local(prompt: str, params: dict[str, object]) -> int:
    from worker.handler import GenerationRequest, ModelHandler

    settings = _settings()
    handler = ModelHandler(settings)
    handler.setup()
    n = params["max_new_tokens"] or settings.generation.default_max_new_tokens
    if n > settings.generation.max_new_tokens_cap:
        sys.exit(f"qwen-deploy: max_new_tokens is {n}; the maximum is {settings.generation.max_new_tokens_cap}")
    started = time.perf_counter()
    result = handler.generate(GenerationRequest(prompt=prompt, max_new_tokens=n, temperature=params["temperature"]))
    print(result.text)
    print(f"[{result.completion_tokens} tokens, {result.finish_reason}, "
          f"{(time.perf_counter() - started) * 1000:.0f} ms]", file=sys.stderr)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from analysis.base import LocalRunner, QueueRunner, run_analysis
    from analysis.records import count_records, done_keys, load_analyzer, read_records

    settings = _settings()
    source, out = Path(args.input), Path(args.out)
    analyzer = load_analyzer(args.analyzer)
    if args.local:
        from worker.handler import ModelHandler

        handler = ModelHandler(settings)
        handler.setup()
        runner: object = LocalRunner(handler, settings.batches.micro_batch_size)
    else:
        runner = QueueRunner(_client(args.url))
    done = done_keys(out)
    total = count_records(source)
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


def _print_progress(progress: dict[str, object]) -> None:
    parts = [f"{k}={v}" for k, v in progress.items()]
    print("\r" + " ".join(parts)[:150].ljust(150), end="", file=sys.stderr, flush=True)


def _queue(kind: str, body: dict[str, object], url: str | None) -> int:
    """Submit a download/export job, show its progress, print its result."""
    import json

    from qwen_deploy.client import APIError

    client = _client(url)
    try:
        job = client.submit_model_job(kind, {k: v for k, v in body.items() if v is not None})
        while job["status"] not in ("succeeded", "failed", "canceled", "timed_out"):
            _print_progress(job["progress"])
            job = client.get(job["id"], wait=2)
    except APIError as exc:
        sys.exit(f"qwen-deploy: {exc}")
    print(file=sys.stderr)
    if job["status"] != "succeeded":
        sys.exit(f"qwen-deploy: {kind} {job['status']}: {job['error']['message']}")
    print(json.dumps(job["output"], indent=2))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import json

    if args.queue:
        return _queue("download", {"repo_id": args.repo_id, "revision": args.revision, "out": args.out}, args.url)
    from conversion.download import DownloadError, download_model

    try:
        result = download_model(args.repo_id, revision=args.revision, out=Path(args.out) if args.out else None,
                                token=_settings().token, progress=_print_progress)
    except DownloadError as exc:
        sys.exit(f"\nqwen-deploy: download failed ({exc.code}): {exc}")
    print(file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    if args.queue:
        body = {"checkpoint": args.checkpoint, "base": args.base, "out": args.out, "dtype": args.dtype,
                "max_shard_size": args.max_shard_size}
        return _queue("export", body, args.url)
    from conversion import ConversionError, export_checkpoint

    try:
        report = export_checkpoint(Path(args.checkpoint), Path(args.base), Path(args.out), dtype=args.dtype,
                                   max_shard_size=args.max_shard_size,
                                   progress=lambda stage, f: _print_progress({"phase": stage, "fraction": f"{f:.2f}"}))
    except ConversionError as exc:
        sys.exit(f"\nqwen-deploy: export failed: {exc}")
    print(file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from qwen_deploy import doctor

    return doctor.run(as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-deploy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start redis (if needed), a worker, a convert worker and the web server")
    up.add_argument("--demo", action="store_true", help="serve the built-in demo model")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.set_defaults(func=cmd_up)

    web = sub.add_parser("web", help="run the web server (gunicorn)")
    web.add_argument("--host")
    web.add_argument("--port", type=int)
    web.set_defaults(func=cmd_web)

    for name, func, doc in (("worker", cmd_worker, "a generation worker (prefork, concurrency 1)"),
                            ("convert-worker", cmd_convert_worker, "a worker for the convert queue")):
        p = sub.add_parser(name, help=doc)
        p.add_argument("--demo", action="store_true", help="serve the built-in demo model")
        p.set_defaults(func=func)

    demo = sub.add_parser("demo-model", help="build (once) the demo model and print its directory")
    demo.add_argument("--out")
    demo.add_argument("--force", action="store_true")
    demo.set_defaults(func=cmd_demo_model)

    gen = sub.add_parser("generate", help="one job through the API (or in-process with --local)")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    where = gen.add_mutually_exclusive_group()
    where.add_argument("--url")
    where.add_argument("--local", action="store_true")
    gen.set_defaults(func=cmd_generate)

    ana = sub.add_parser("analyze", help="bulk analysis of a JSONL/CSV file, resumable")
    ana.add_argument("input")
    ana.add_argument("--out", required=True)
    ana.add_argument("--analyzer", default="analysis.example_analyzer:SentimentAnalyzer",
                     help="module:Class of an Analyzer subclass")
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

    ex = sub.add_parser("export", help="training/RL checkpoint -> validated HF safetensors directory")
    ex.add_argument("checkpoint")
    ex.add_argument("--base", required=True, help="base HF model directory (config, tokenizer)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    ex.add_argument("--max-shard-size", default="2GB")
    ex.add_argument("--queue", action="store_true", help="run it as a job on the convert queue (paths relative "
                    "to paths.checkpoints_root / paths.models_root)")
    ex.add_argument("--url")
    ex.set_defaults(func=cmd_export)

    doc = sub.add_parser("doctor", help="pre-deployment checks; non-zero exit when a blocking check fails")
    doc.add_argument("--json", action="store_true", help="print the checks as JSON")
    doc.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
