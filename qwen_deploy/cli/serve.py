"""Commands that run the service: `up`, `web`, `worker`, `convert-worker`, `demo-model`."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path
from typing import NoReturn

from qwen_deploy.cli.common import child_environ, redacted, settings
from qwen_deploy.cli.launch import Supervisor, celery_command, web_command, worker_argv
from qwen_deploy.cli.redis_server import RedisServer, reachable
from qwen_deploy.config import ConfigError, Settings, default_cache_dir
from qwen_deploy.queues import CONVERT_WORKER_QUEUES
from qwen_deploy.served import Served, served_models

MODEL_ENV = "QWEN_DEPLOY_MODEL__NAME_OR_PATH"
WORKER_MODEL_ENV = "QWEN_DEPLOY_WORKER__MODEL"


def demo_env() -> dict[str, str]:
    """Build (or reuse) the demo model; the environment that points a child process at it."""
    from worker.demo_model import build_demo_model

    path = build_demo_model(log=lambda msg: print(f"demo-model: {msg}", file=sys.stderr))
    return {MODEL_ENV: str(path)}


def embedded_redis(config: Settings) -> RedisServer | None:
    """A private password-protected redis-server when no Redis URL was configured, else None.

    An explicitly configured Redis that does not answer is an error, never a reason to start another."""
    if "redis_url" in config.model_fields_set:
        if not reachable(config.redis_url, master_name=config.redis_master_name):
            sys.exit(f"qwen-deploy: Redis at {redacted(config.redis_url)} does not answer: start it, or unset "
                     "REDIS_URL (and redis_url in config.yml) to let `up` start its own")
        return None
    data_dir = default_cache_dir() / "redis"
    server = RedisServer(data_dir=data_dir, password=secrets.token_urlsafe(24), disable_config=True).start()
    print(f"qwen-deploy: started redis-server at {redacted(server.url)} (data in {data_dir}; "
          "the password reaches the children in REDIS_URL)", file=sys.stderr)
    return server


def cmd_up(args: argparse.Namespace) -> int:
    extra = {"PORT": str(args.port)} if args.port is not None else {}
    server = embedded_redis(settings(child_environ(extra)))
    try:
        if server:
            extra["REDIS_URL"] = server.url
        if args.demo:
            extra.update(demo_env())
        elif getattr(args, "model", None):
            extra[MODEL_ENV] = args.model  # a hub id or a local directory, instead of config's `model`
        config = settings(child_environ(extra))
        host = args.host or config.web.host
        web_cmd = web_argv(config, host, config.web.port)
        extra["QWEN_DEPLOY_WEB__HOST"] = host  # the app's Host check and bind check see the real bind
        sup = Supervisor(env=extra)
        try:
            for served in served_models(config):  # one generation worker per model
                sup.env[WORKER_MODEL_ENV] = served.alias
                sup.start(f"worker {served.alias}", celery_command(worker_argv(served.queues, node_name(served),
                                                                               config.log_level)))
            sup.env.pop(WORKER_MODEL_ENV, None)
            sup.start("convert-worker", celery_command(worker_argv(CONVERT_WORKER_QUEUES, "convert",
                                                                   config.log_level)))
            sup.start("web", web_cmd)
            aliases = ", ".join(m.alias for m in served_models(config))
            print(f"qwen-deploy: serving {aliases} at http://{host}:{config.web.port} (Ctrl-C to stop)",
                  file=sys.stderr)
            return sup.wait()
        finally:
            sup.stop()
    finally:
        if server:
            server.stop()


def web_argv(config: Settings, host: str, port: int) -> list[str]:
    """gunicorn's command line, after refusing an open non-loopback bind (the app checks it again)."""
    from web.auth import check_bind

    try:
        check_bind(config, host)
    except ConfigError as exc:
        sys.exit(f"qwen-deploy: {exc}")
    web = config.web
    return web_command(host, port, web.workers, web.threads, web.worker_class, web.worker_connections)


def cmd_web(args: argparse.Namespace) -> NoReturn:
    config = settings()
    host, port = args.host or config.web.host, args.port or config.web.port
    argv = web_argv(config, host, port)
    os.environ["QWEN_DEPLOY_WEB__HOST"] = host  # the app's Host check and bind check see the real bind
    os.execv(sys.executable, argv)


def node_name(served: Served) -> str:
    """The Celery node name of a model's worker (its engine queue is named after it): `gen`, `gen-{alias}`."""
    return "gen" if served.default else f"gen-{served.alias}"


def _run_worker(queues: tuple[str, ...] | list[str], name: str, extra: dict[str, str]) -> NoReturn:
    env = child_environ(extra)
    os.execve(sys.executable, celery_command(worker_argv(queues, name, settings(env).log_level)), env)


def cmd_worker(args: argparse.Namespace) -> NoReturn:
    """A generation worker for one model (`--model ALIAS`, default: the first) on that model's queues."""
    extra = demo_env() if args.demo else {}
    models = served_models(settings(child_environ(extra)))
    served = next((m for m in models if args.model in (None, m.alias)), None)
    if served is None:
        sys.exit(f"qwen-deploy: no model with alias {args.model!r} in the config (models: "
                 f"{', '.join(m.alias for m in models)})")
    _run_worker(served.queues, node_name(served), {**extra, WORKER_MODEL_ENV: served.alias})


def cmd_convert_worker(args: argparse.Namespace) -> NoReturn:
    _run_worker(CONVERT_WORKER_QUEUES, "convert", demo_env() if args.demo else {})


def cmd_demo_model(args: argparse.Namespace) -> int:
    from worker.demo_model import build_demo_model

    out = Path(args.out) if args.out else None
    print(build_demo_model(out, force=args.force, log=lambda m: print(m, file=sys.stderr)))
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the serving commands."""
    up = sub.add_parser("up", help="start redis (unless REDIS_URL is set), a worker, a convert worker and the web "
                        "server")
    which = up.add_mutually_exclusive_group()
    which.add_argument("--demo", action="store_true", help="serve the built-in demo model")
    which.add_argument("--model", metavar="NAME_OR_PATH",
                       help="serve this model (a hub id or a local directory) instead of config.yml's `model`")
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
        if name == "worker":
            p.add_argument("--model", metavar="ALIAS", help="the alias (in `models:`) this worker serves; "
                           "default: the first model")
        p.set_defaults(func=func)

    demo = sub.add_parser("demo-model", help="build (once) the demo model and print its directory")
    demo.add_argument("--out")
    demo.add_argument("--force", action="store_true")
    demo.set_defaults(func=cmd_demo_model)
