"""`qwen-deploy healthcheck worker`: exit 0 once this host's generation worker has loaded its model."""

from __future__ import annotations

import argparse
import socket

import redis

from qwen_deploy import registry
from qwen_deploy.cli.common import settings
from qwen_deploy.connections import settings_client

REDIS_TIMEOUT_S = 2.0


def worker_ready() -> int:
    """0 when a generation worker on this host has loaded its model (the container healthcheck)."""
    config, host = settings(), socket.gethostname()
    client = settings_client(config, socket_timeout=REDIS_TIMEOUT_S)
    try:
        mine = [w for w in registry.workers(client, config.key_prefix) if w.get("hostname") == host]
    except redis.RedisError as exc:
        print(f"{host}: Redis unavailable: {exc}")
        return 1
    print(f"{host}: {[w.get('state') for w in mine] or 'no worker registered'}")
    return 0 if any(w.get("state") == "ready" for w in mine) else 1


def cmd_healthcheck(args: argparse.Namespace) -> int:
    return {"worker": worker_ready}[args.what]()


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `healthcheck`."""
    check = sub.add_parser("healthcheck")  # no help: container healthchecks, kept off the user command list
    check.add_argument("what", choices=["worker"], help="worker: this host's generation worker has loaded its model")
    check.set_defaults(func=cmd_healthcheck)
