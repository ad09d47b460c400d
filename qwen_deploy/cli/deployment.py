"""The whole system assembled from one environment: the redis-server (embedded when asked), a generation
worker per served model, the convert worker and the web server (gunicorn), each a child process of a
`Supervisor`. `up` runs it; the tests' `Stack` and the scripts in `bench/` start their deployments here
too, so all three run the same command lines with the same settings."""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from qwen_deploy.cli.common import redacted, settings
from qwen_deploy.cli.launch import Supervisor, celery_command, web_command, worker_argv
from qwen_deploy.cli.redis_server import DataDirBusy, RedisServer, reachable
from qwen_deploy.config import ConfigError, Settings, default_cache_dir
from qwen_deploy.queues import CONVERT_WORKER_QUEUES
from qwen_deploy.served import Served, served_models

WORKER_MODEL_ENV = "QWEN_DEPLOY_WORKER__MODEL"
WEB_HOST_ENV = "QWEN_DEPLOY_WEB__HOST"


def node_name(served: Served) -> str:
    """The Celery node name of a model's worker (its engine queue is named after it): `gen`, `gen-{alias}`."""
    return "gen" if served.default else f"gen-{served.alias}"


def check_bind(config: Settings, host: str) -> None:
    """Exit when `host` is an open non-loopback bind (the app checks it again at start)."""
    from web.auth import check_bind as check

    try:
        check(config, host)
    except ConfigError as exc:
        sys.exit(f"qwen-deploy: {exc}")


def web_argv(config: Settings, host: str, port: int, access_log: str | None = "-") -> list[str]:
    """gunicorn's command line with the configured web settings, after refusing an open non-loopback bind."""
    check_bind(config, host)
    web = config.web
    return web_command(host, port, web.workers, web.threads, web.worker_class, web.worker_connections, access_log)


class Deployment:
    """One deployment's processes, configured by this process's environment plus `env` (the config file,
    REDIS_URL, `QWEN_DEPLOY_*` overrides), which every child inherits; `settings()` reads the same.

    `logs`: a folder; each child's stdout and stderr are appended to `{logs}/{name}.log` instead of going
    to this process's. `cwd` and `session`: as in `Supervisor`. `quick_stop`: the web server stops with
    gunicorn's quick shutdown (SIGINT: open streams are cut, not waited for up to the graceful timeout).
    The defaults are `up`'s."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        logs: Path | None = None,
        cwd: Path | None = None,
        session: bool = False,
        quick_stop: bool = False,
    ) -> None:
        self.supervisor = Supervisor(env, cwd=cwd, session=session)
        self.logs = logs
        self.quick_stop = quick_stop
        self.redis: RedisServer | None = None
        self.web: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def env(self) -> dict[str, str]:
        """The environment of every child (changes apply to children started later)."""
        return self.supervisor.env

    def settings(self) -> Settings:
        """The settings of `env` (exits naming the bad key)."""
        return settings(self.env)

    # -- Redis --------------------------------------------------------------------------------
    def start_redis(self, **options: Any) -> RedisServer:
        """A private redis-server on loopback (`options` as `RedisServer` takes them); the children get its
        URL in REDIS_URL."""
        self.redis = RedisServer(**options).start()
        self.env["REDIS_URL"] = self.redis.url
        return self.redis

    def embedded_redis(self) -> RedisServer | None:
        """`up`'s Redis: a private password-protected redis-server when no Redis URL was configured, else
        None. An explicitly configured Redis that does not answer is an error, never a reason to start another."""
        config = self.settings()
        if "redis_url" in config.model_fields_set:
            if not reachable(config.redis_url, master_name=config.redis_master_name):
                sys.exit(
                    f"qwen-deploy: Redis at {redacted(config.redis_url)} does not answer: start it, or unset "
                    "REDIS_URL (and redis_url in config.yml) to let `up` start its own"
                )
            return None
        data_dir = default_cache_dir() / "redis"
        try:
            server = self.start_redis(data_dir=data_dir, password=secrets.token_urlsafe(24), disable_config=True)
        except DataDirBusy as exc:  # a second `up` here: one AOF, one writer
            sys.exit(f"qwen-deploy: {exc}")
        print(
            f"qwen-deploy: started redis-server at {redacted(server.url)} (data in {data_dir}; "
            "the password reaches the children in REDIS_URL)",
            file=sys.stderr,
        )
        return server

    # -- workers ------------------------------------------------------------------------------
    def start_worker(
        self,
        served: Served | None = None,
        node: str | None = None,
        name: str | None = None,
        loglevel: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """A generation worker for `served` (default: the default model) on its queues, as `qwen-deploy worker
        --model ALIAS` starts it. `node`: its Celery node name (default `node_name`); `name`: its name here
        (default `worker ALIAS`); `loglevel`: default `log_level`."""
        config = self.settings()
        served = served or served_models(config)[0]
        argv = worker_argv(served.queues, node or node_name(served), loglevel or config.log_level)
        return self._start(name or f"worker {served.alias}", celery_command(argv), {WORKER_MODEL_ENV: served.alias})

    def start_convert_worker(
        self, node: str = "convert", name: str = "convert-worker", loglevel: str | None = None
    ) -> subprocess.Popen[bytes]:
        """The worker for the convert queue (it also sends webhooks)."""
        argv = worker_argv(CONVERT_WORKER_QUEUES, node, loglevel or self.settings().log_level)
        return self._start(name, celery_command(argv))

    # -- web ----------------------------------------------------------------------------------
    def bind(self, host: str) -> None:
        """Refuse an open non-loopback bind; the app's Host check and bind check see the real bind."""
        check_bind(self.settings(), host)
        self.env[WEB_HOST_ENV] = host

    def start_web(
        self, host: str | None = None, port: int | None = None, access_log: str | None = "-", extra: Sequence[str] = ()
    ) -> subprocess.Popen[bytes]:
        """gunicorn with the configured worker class, processes and connections (`web.*`), on `host`:`port`
        (default: `web.host`, `web.port`); `extra`: more gunicorn options. Not waited for: see wait_web."""
        config = self.settings()
        host = host or config.web.host
        port = config.web.port if port is None else port
        self.bind(host)
        self.web = self._start(
            "web",
            [*web_argv(config, host, port, access_log), *extra],
            stop_signal=signal.SIGINT if self.quick_stop else signal.SIGTERM,
        )
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        return self.web

    def wait_web(self, timeout: float = 60.0, probe: str = "/livez") -> str:
        """Poll `probe` until it answers 200 (a deadline poll: refused, reset and slow answers are retried);
        the web server's URL. Raises when the server exits or the deadline passes."""
        assert self.web is not None, "start_web first"
        deadline = time.monotonic() + timeout
        while True:
            if self.web.poll() is not None:
                raise RuntimeError(f"the web server exited with {self.web.returncode}{self._log_tail('web')}")
            try:
                if requests.get(self.url + probe, timeout=2).status_code == 200:
                    return self.url
            except requests.RequestException:  # refused, reset or a read timeout on a loaded machine
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the web server did not answer {probe} within {timeout:g} s{self._log_tail('web')}")
            time.sleep(0.1)

    # -- all ----------------------------------------------------------------------------------
    def wait(self, check: Callable[[], int | None] | None = None) -> int:
        """Block until a child exits, a stop signal arrives or `check` returns an exit code (see
        `Supervisor.wait`)."""
        return self.supervisor.wait(check)

    def stop_processes(self, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
        """Stop these children together (a stop signal at once, KILL after `timeout`)."""
        self.supervisor.stop(procs, timeout)
        if self.web in procs:
            self.web = None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every child (the last started first), then the redis-server started here."""
        self.supervisor.stop(timeout=timeout)
        self.web = None
        if self.redis:
            self.redis.stop()

    def _start(
        self, name: str, command: list[str], env: Mapping[str, str] | None = None, stop_signal: int = signal.SIGTERM
    ) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name.replace(' ', '-')}.log" if self.logs else None
        return self.supervisor.start(name, command, env=env, log=log, stop_signal=stop_signal)

    def _log_tail(self, name: str) -> str:
        log = self.logs / f"{name}.log" if self.logs else None
        return f": {log.read_text(errors='replace')[-3000:]}" if log and log.exists() else ""
