"""Commands that run the service: `up`, `web`, `worker`, `convert-worker`, `demo-model`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from qwen_deploy.cli.common import MODEL_ENV, child_environ, demo_env, settings
from qwen_deploy.cli.deployment import WEB_HOST_ENV, WORKER_MODEL_ENV, Deployment, node_name, web_argv
from qwen_deploy.cli.launch import celery_command, worker_argv
from qwen_deploy.cli.load_watch import LoadWatch
from qwen_deploy.cli.ready import ReadyWatch, home, port_in_use
from qwen_deploy.cli.up_state import read_state, remove_state, write_state
from qwen_deploy.config import Settings, default_cache_dir
from qwen_deploy.queues import CONVERT_WORKER_QUEUES
from qwen_deploy.served import Served, served_models


def cmd_up(args: argparse.Namespace) -> int:
    """Redis (unless configured), a generation worker per model, the convert worker and gunicorn, until
    one of them exits or a stop signal arrives."""
    logs = None if args.verbose else default_cache_dir() / "logs"
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    deployment = Deployment({"PORT": str(args.port)} if args.port is not None else {}, logs=logs)
    deployment.env.pop(WORKER_MODEL_ENV, None)  # each generation worker gets its own alias; the others none
    try:
        config = deployment.settings()
        host = args.host or config.web.host
        if port_in_use(host, config.web.port):
            sys.exit(f"qwen-deploy: port {config.web.port} is in use: pass --port or set PORT")
        redis = deployment.embedded_redis()
        if args.demo:
            deployment.env.update(demo_env())
        elif getattr(args, "model", None):
            deployment.env[MODEL_ENV] = args.model  # a hub id or a local directory, instead of config's `model`
        config = deployment.settings()
        deployment.bind(host)  # before any process starts: an open non-loopback bind is refused
        models = served_models(config)
        for served in models:  # one generation worker per model
            deployment.start_worker(served)
        deployment.start_convert_worker()
        web = deployment.start_web(host, config.web.port)
        pids = {"web": web.pid, **({"redis": redis.proc.pid} if redis and redis.proc else {})}
        write_state(deployment.url, config.redis_url, pids, [m.alias for m in models])  # what `doctor` checks
        print(
            f"qwen-deploy: starting {', '.join(m.alias for m in models)} at {deployment.url} (loading the model…)",
            file=sys.stderr,
        )
        data = f"Redis AOF in {home(redis.data_dir)}" if redis and redis.data_dir else "Redis at REDIS_URL"
        ready = ReadyWatch(deployment.url, config.client_key, data, logs)
        loads = LoadWatch(config, models)

        def check() -> int | None:
            code = loads()
            return code if code is not None else ready()

        return deployment.wait(check)
    finally:
        try:
            deployment.stop()
        finally:
            remove_state()


def cmd_web(args: argparse.Namespace) -> NoReturn:
    config = settings()
    host, port = args.host or config.web.host, args.port or config.web.port
    argv = web_argv(config, host, port)
    os.environ[WEB_HOST_ENV] = host  # the app's Host check and bind check see the real bind
    os.execv(sys.executable, argv)


def _run_worker(queues: tuple[str, ...] | list[str], name: str, extra: dict[str, str]) -> NoReturn:
    env = child_environ(extra)
    os.execve(sys.executable, celery_command(worker_argv(queues, name, settings(env).log_level)), env)


def cmd_worker(args: argparse.Namespace) -> NoReturn:
    """A generation worker for one model (`--model ALIAS`, default: the first, or one that `export --serve-as`
    registered) on that model's queues; with no Redis URL set, on the Redis of the `up` running here."""
    extra = demo_env() if args.demo else {}
    config = settings(child_environ(extra))
    running = read_state() if "redis_url" not in config.model_fields_set else None
    if running and running.get("redis_url"):
        print("qwen-deploy: joining the Redis of the `qwen-deploy up` running here (up.json)", file=sys.stderr)
        extra = {**extra, "REDIS_URL": str(running["redis_url"])}
        config = settings(child_environ(extra))
    models = served_models(config)
    served = next((m for m in models if args.model in (None, m.alias)), None)
    if served is None:
        served = _registered_model(config, args.model)
    if served is None:
        sys.exit(
            f"qwen-deploy: no model with alias {args.model!r} in the config (models: "
            f"{', '.join(m.alias for m in models)}) nor registered at runtime (export --serve-as)"
        )
    _run_worker(served.queues, node_name(served), {**extra, WORKER_MODEL_ENV: served.alias})


def _registered_model(config: Settings, alias: str) -> Served | None:
    """A model that `export --serve-as` registered under `alias` (None when none is, or Redis is unreachable)."""
    import redis

    from qwen_deploy.connections import redis_client
    from qwen_deploy.runtime_models import find_runtime

    try:
        return find_runtime(redis_client(config), config, alias)
    except redis.RedisError as exc:
        print(f"qwen-deploy: could not read the models registered at runtime: {exc}", file=sys.stderr)
        return None


def cmd_convert_worker(args: argparse.Namespace) -> NoReturn:
    _run_worker(CONVERT_WORKER_QUEUES, "convert", demo_env() if args.demo else {})


def cmd_demo_model(args: argparse.Namespace) -> int:
    from worker.demo_model import build_demo_model

    out = Path(args.out) if args.out else None
    print(build_demo_model(out, force=args.force, log=lambda m: print(m, file=sys.stderr)))
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the serving commands."""
    up = sub.add_parser(
        "up", help="start redis (unless REDIS_URL is set), a worker, a convert worker and the web server"
    )
    which = up.add_mutually_exclusive_group()
    which.add_argument("--demo", action="store_true", help="serve the built-in demo model")
    which.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="serve this model (a hub id or a local directory) instead of config.yml's `model`",
    )
    up.add_argument("--host", help="the address to bind (default: web.host, 127.0.0.1)")
    up.add_argument("--port", type=int, help="the port (default: web.port or PORT, 8000)")
    up.add_argument(
        "--verbose", action="store_true", help="show the workers' and web server's logs here (default: a log folder)"
    )
    up.set_defaults(func=cmd_up)

    web = sub.add_parser("web", help="run the web server (gunicorn)")
    web.add_argument("--host")
    web.add_argument("--port", type=int)
    web.set_defaults(func=cmd_web)

    for name, func, doc in (
        ("worker", cmd_worker, "a generation worker (prefork, concurrency 1)"),
        ("convert-worker", cmd_convert_worker, "a worker for the convert queue"),
    ):
        p = sub.add_parser(name, help=doc)
        p.add_argument("--demo", action="store_true", help="serve the built-in demo model")
        if name == "worker":
            p.add_argument(
                "--model",
                metavar="ALIAS",
                help="the alias (in `models:`, or registered by `export --serve-as`) this worker serves; "
                "default: the first model",
            )
        p.set_defaults(func=func)

    demo = sub.add_parser("demo-model", help="build (once) the demo model and print its directory")
    demo.add_argument("--out")
    demo.add_argument("--force", action="store_true")
    demo.set_defaults(func=cmd_demo_model)
