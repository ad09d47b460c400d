"""Start the pieces of the service as child processes and stop them all together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

WORKER_ARGS = ["--pool", "prefork", "--concurrency", "1", "--without-mingle", "--without-gossip"]


def worker_argv(queues: Sequence[str], name: str, loglevel: str = "INFO") -> list[str]:
    """Arguments for `celery -A tasks worker` serving `queues` (in priority order)."""
    return ["worker", "-Q", ",".join(queues), "-n", f"{name}@%h", "--loglevel", loglevel, *WORKER_ARGS]


def celery_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks", *argv]


def web_command(host: str, port: int, workers: int, threads: int, worker_class: str = "gevent",
                connections: int = 2000) -> list[str]:
    """gunicorn: gevent (default; a long-poll or SSE stream is a greenlet, not a thread, and gunicorn
    does the monkey patching) or gthread (each stream holds one of `threads`)."""
    per_worker = ["--worker-connections", str(connections)] if worker_class == "gevent" else ["--threads", str(threads)]
    return [sys.executable, "-m", "gunicorn", "--bind", f"{host}:{port}", "--workers", str(workers),
            "--worker-class", worker_class, *per_worker, "--timeout", "120",
            "--graceful-timeout", "10", "--access-logfile", "-", "web.wsgi:app"]


class Supervisor:
    """Children started here are stopped on exit, Ctrl-C or SIGTERM (TERM, then KILL)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command, env=self.env)
        self.children.append((name, proc))
        return proc

    def wait(self) -> int:
        """Block until a child exits or a stop signal arrives; return an exit code."""
        stop = {"signal": 0}

        def _on_signal(signum: int, _frame: object) -> None:
            stop["signal"] = signum

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        while not stop["signal"]:
            for name, proc in self.children:
                if proc.poll() is not None:
                    print(f"qwen-deploy: {name} exited with {proc.returncode}; stopping", file=sys.stderr)
                    return proc.returncode or 1
            time.sleep(0.2)
        return 0

    def stop(self, timeout: float = 20.0) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.children):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
