"""Test helpers: a whole stack (redis-server, Celery worker processes, web server) on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from werkzeug.serving import make_server

from qwen_deploy import keys, registry
from qwen_deploy.cli.launch import celery_command, worker_argv
from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.client import Client
from qwen_deploy.config import Settings, load_settings
from qwen_deploy.connections import connect
from qwen_deploy.queues import CONVERT_WORKER_QUEUES, GENERATION_QUEUES

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Stack:
    """One isolated deployment: its own redis-server (or REDIS_URL + db), worker and web server."""

    def __init__(self, tmp: Path, model_dir: Path, config: dict[str, Any] | None = None,
                 redis_url: str | None = None, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.redis_server: RedisServer | None = None
        if redis_url is None:
            self.redis_server = RedisServer(data_dir=tmp / "redis").start()
            redis_url = self.redis_server.url
        self.redis_url = redis_url
        cfg = {"model": {"name_or_path": str(model_dir), "threads": 1},
               "worker": {"heartbeat_interval": 1.0}, **(config or {})}
        # device cpu unless the config names one: never CUDA or MPS by accident, whatever the machine has.
        if "models" in cfg:  # several models: `models` replaces the single `model` section
            del cfg["model"]
            cfg["models"] = [{"device": "cpu", **entry} for entry in cfg["models"]]
        else:
            cfg["model"] = {"device": "cpu", **cfg["model"]}
        self.config_path = tmp / "config.yml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.env = {**os.environ, "QWEN_DEPLOY_CONFIG": str(self.config_path), "REDIS_URL": redis_url,
                    "QWEN_DEPLOY_ENV_FILE": str(tmp / "no.env"), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.settings: Settings = load_settings(environ=self.env)
        self.redis = connect(redis_url, self.settings.redis_master_name)
        self.worker: subprocess.Popen[bytes] | None = None
        self.others: list[subprocess.Popen[bytes]] = []
        self.log_path = tmp / "worker.log"
        self._server: Any = None
        self.url = ""

    # -- worker -------------------------------------------------------------------------------
    def start_worker(self, wait: bool = True) -> subprocess.Popen[bytes]:
        argv = celery_command(worker_argv(GENERATION_QUEUES, f"gen{os.getpid()}", "INFO"))
        log = open(self.log_path, "ab")
        self.worker = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        if wait:
            self.wait_ready()
        return self.worker

    def start_model_worker(self, alias: str) -> subprocess.Popen[bytes]:
        """A generation worker for one alias of `models:` on that model's queues, as `qwen-deploy worker
        --model ALIAS` starts it (not waited for; see wait_model_ready)."""
        from qwen_deploy.served import find_model

        served = find_model(self.settings, alias)
        assert served is not None, alias
        argv = celery_command(worker_argv(served.queues, f"gen-{alias}{os.getpid()}", "INFO"))
        log = open(self.tmp / f"worker-{alias}.log", "ab")
        proc = subprocess.Popen(argv, env={**self.env, "QWEN_DEPLOY_WORKER__MODEL": alias}, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.others.append(proc)
        return proc

    def wait_model_ready(self, alias: str, timeout: float = 90.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            found = [w for w in self.workers() if w["state"] == "ready" and w.get("alias") == alias]
            return found[0] if found else None
        return wait_until(ready, timeout, 0.1, f"a ready worker for {alias}")

    def start_convert_worker(self) -> subprocess.Popen[bytes]:
        argv = celery_command(worker_argv(CONVERT_WORKER_QUEUES, f"convert{os.getpid()}", "INFO"))
        log = open(self.tmp / "convert-worker.log", "ab")
        proc = subprocess.Popen(argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
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
        """SIGTERM to every worker at once (each takes seconds to shut down), then wait for them all."""
        running = [proc for proc in [self.worker, *self.others] if proc and proc.poll() is None]
        for proc in running:
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.worker, self.others = None, []

    # -- web ----------------------------------------------------------------------------------
    def start_web(self) -> str:
        from web import create_app

        app = create_app(self.settings)
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        return self.url

    def app(self) -> Any:
        from web import create_app

        return create_app(self.settings)

    def client(self) -> Client:
        return Client(self.url, timeout=60)

    def stop(self) -> None:
        self.stop_worker()
        if self._server:
            self._server.shutdown()
        if self.redis_server:
            self.redis_server.stop()

    def record(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(keys.JobKeys(self.settings.key_prefix).key(job_id))


