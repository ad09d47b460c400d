"""Test helpers: a whole stack (redis-server, Celery worker processes, gunicorn web server) on loopback."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from qwen_deploy import keys, registry
from qwen_deploy.cli.deployment import Deployment
from qwen_deploy.cli.redis_server import RedisServer, free_port
from qwen_deploy.client import Client
from qwen_deploy.config import Settings, load_settings
from qwen_deploy.connections import connect
from qwen_deploy.served import find_model

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def group_alive(pgid: int) -> bool:
    """Whether any process of this process group is left."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


class Stack:
    """One isolated deployment: its own redis-server (or REDIS_URL + db), workers and web server (gunicorn),
    assembled by `qwen_deploy.cli.deployment.Deployment` as `up` assembles it; each child in its own process group,
    logging to a file in `tmp`.

    The web tier runs one gunicorn process (`web.workers: 1` unless the config sets it), with `up`'s worker
    class and settings otherwise: one process is what the in-process server of earlier tests was, and it
    starts in about a second."""

    def __init__(
        self,
        tmp: Path,
        model_dir: Path,
        config: dict[str, Any] | None = None,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.deployment = Deployment(logs=tmp, cwd=ROOT, session=True, quick_stop=True)
        if redis_url is None:
            redis_url = self.deployment.start_redis(data_dir=tmp / "redis").url
        self.redis_url = redis_url
        config = config or {}
        cfg = {
            "worker": {"heartbeat_interval": 1.0},
            **config,
            # the stack's model, with what the config says of it on top (e.g. its dtype)
            "model": {"name_or_path": str(model_dir), "threads": 1, **config.get("model", {})},
        }
        cfg["web"] = {"workers": 1, **cfg.get("web", {})}
        # device cpu unless the config names one: never CUDA or MPS by accident, whatever the machine has.
        if "models" in cfg:  # several models: `models` replaces the single `model` section
            del cfg["model"]
            cfg["models"] = [{"device": "cpu", **entry} for entry in cfg["models"]]
        else:
            cfg["model"] = {"device": "cpu", **cfg["model"]}
        self.config_path = tmp / "config.yml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.env = self.deployment.env  # what every child gets
        self.env.update(
            {
                "QWEN_DEPLOY_CONFIG": str(self.config_path),
                "REDIS_URL": redis_url,
                "QWEN_DEPLOY_ENV_FILE": str(tmp / "no.env"),
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            }
        )
        self.settings: Settings = load_settings(environ=self.env)
        self.redis = connect(redis_url, self.settings.redis_master_name)
        self.worker: subprocess.Popen[bytes] | None = None
        self.others: list[subprocess.Popen[bytes]] = []
        self.log_path = tmp / "worker.log"
        self.url = ""

    @property
    def redis_server(self) -> RedisServer | None:
        """The redis-server started for this stack (None on a given REDIS_URL); a test may replace it."""
        return self.deployment.redis

    @redis_server.setter
    def redis_server(self, server: RedisServer | None) -> None:
        self.deployment.redis = server

    # -- worker -------------------------------------------------------------------------------
    def start_worker(self, wait: bool = True) -> subprocess.Popen[bytes]:
        """A generation worker for the default model (logging to `log_path`)."""
        self.worker = self.deployment.start_worker(None, f"gen{os.getpid()}", "worker", "INFO")
        if wait:
            self.wait_ready()
        return self.worker

    def start_model_worker(self, alias: str) -> subprocess.Popen[bytes]:
        """A generation worker for one alias of `models:` on that model's queues, as `qwen-deploy worker
        --model ALIAS` starts it (not waited for; see wait_model_ready)."""
        served = find_model(self.settings, alias)
        assert served is not None, alias
        proc = self.deployment.start_worker(served, f"gen-{alias}{os.getpid()}", f"worker-{alias}", "INFO")
        self.others.append(proc)
        return proc

    def wait_model_ready(self, alias: str, timeout: float = 90.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            found = [w for w in self.workers() if w["state"] == "ready" and w.get("alias") == alias]
            return found[0] if found else None

        return wait_until(ready, timeout, 0.1, f"a ready worker for {alias}")

    def start_convert_worker(self) -> subprocess.Popen[bytes]:
        proc = self.deployment.start_convert_worker(f"convert{os.getpid()}", "convert-worker", "INFO")
        self.others.append(proc)
        return proc

    def workers(self) -> list[dict[str, Any]]:
        return registry.workers(self.redis, self.settings.key_prefix)

    def wait_ready(self, timeout: float = 90.0, exclude_pid: int | None = None) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.worker is not None and self.worker.poll() is not None:
                raise AssertionError(f"worker exited: {self.log_path.read_text()[-3000:]}")
            found = [w for w in self.workers() if w["state"] == "ready" and w["pid"] != exclude_pid]
            return found[0] if found else None

        return wait_until(ready, timeout, 0.1, "a ready worker")

    def child_pid(self) -> int:
        return int(self.wait_ready()["pid"])

    def model_loads(self) -> int:
        return int(self.redis.get(keys.model_loads_key(self.settings.key_prefix)) or 0)

    def stop_worker(self) -> None:
        """SIGTERM to every worker's process group at once (each takes seconds to shut down), then wait for
        them all (SIGKILL after 20 s)."""
        self.deployment.stop_processes([proc for proc in [self.worker, *self.others] if proc])
        self.worker, self.others = None, []

    # -- web ----------------------------------------------------------------------------------
    def start_web(self) -> str:
        """The web tier as `up` runs it (gunicorn, web.wsgi:app) on a free loopback port, once /livez answers;
        its access log and errors in `tmp/web.log`."""
        self.deployment.start_web("127.0.0.1", free_port())
        self.url = self.deployment.wait_web()
        return self.url

    def app(self) -> Any:
        from web import create_app

        return create_app(self.settings)

    def client(self) -> Client:
        return Client(self.url, timeout=60)

    def stop(self) -> None:
        """Every process this stack started: the workers, the web server, the redis-server."""
        self.stop_worker()
        self.deployment.stop()

    def record(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(keys.JobKeys(self.settings.key_prefix).key(job_id))
