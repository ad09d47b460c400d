"""`up`'s watch on its models' loads: a model whose workers cannot load it is reported once, plainly,
with what to do; when none of the served models can load, `up` stops with a non-zero exit."""

from __future__ import annotations

import sys
import time

import redis

from qwen_deploy import registry
from qwen_deploy.config import Settings
from qwen_deploy.connections import connect
from qwen_deploy.served import Served

HINT = (
    "download it first (`qwen-deploy download {name}`), or point --model (or model.name_or_path in "
    "config.yml) at a local directory that holds the model's files"
)


class LoadWatch:
    """Called from `up`'s wait loop: None while serving is possible, else the exit code."""

    def __init__(self, config: Settings, models: list[Served], every: float = 1.0) -> None:
        self.client = connect(config.redis_url, config.redis_master_name)
        self.prefix, self.models, self.every = config.key_prefix, models, every
        self.failed: set[str] = set()
        self.next_look = 0.0

    def __call__(self) -> int | None:
        now = time.monotonic()
        if now < self.next_look:
            return None
        self.next_look = now + self.every
        try:
            found = registry.workers(self.client, self.prefix)
        except redis.RedisError:  # Redis is someone else's to report; look again later
            return None
        for served in self.models:
            reason = registry.load_failure(found, served.alias, served.default)
            if reason and served.alias not in self.failed:
                self.failed.add(served.alias)
                hint = HINT.format(name=served.model.name_or_path)
                print(f"qwen-deploy: {reason}\nqwen-deploy: {hint}", file=sys.stderr)
        if len(self.failed) == len(self.models):
            print("qwen-deploy: no model could be loaded; stopping", file=sys.stderr)
            return 1
        return None
