"""Start the pieces of the service as child processes and stop them all together."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

WORKER_ARGS = ["--pool", "prefork", "--concurrency", "1", "--without-mingle", "--without-gossip"]


def worker_argv(queues: Sequence[str], name: str, loglevel: str = "INFO") -> list[str]:
    """Arguments for `celery -A tasks worker` serving `queues` (in priority order)."""
    return ["worker", "-Q", ",".join(queues), "-n", f"{name}@%h", "--loglevel", loglevel, *WORKER_ARGS]


def celery_command(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks", *argv]


def web_command(
    host: str,
    port: int,
    workers: int,
    threads: int,
    worker_class: str = "gevent",
    connections: int = 2000,
    access_log: str | None = "-",
) -> list[str]:
    """gunicorn: gevent (default; a long-poll or SSE stream is a greenlet, not a thread, and gunicorn
    does the monkey patching) or gthread (each stream holds one of `threads`). `access_log`: where the
    access log goes (`-`: stdout; None: none is written)."""
    per_worker = ["--worker-connections", str(connections)] if worker_class == "gevent" else ["--threads", str(threads)]
    logs = ["--access-logfile", access_log] if access_log is not None else []
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        *per_worker,
        "--timeout",
        "120",
        "--graceful-timeout",
        "10",
        *logs,
        *_no_control_socket(),
        "web.wsgi:app",
    ]


@functools.cache
def _no_control_socket() -> list[str]:
    """gunicorn 27 opens a control socket at one path per user (~/.gunicorn/gunicorn.ctl), so two servers
    on a host (two deployments, a test's stacks) take it from each other; nothing here uses it."""
    try:
        major = int(metadata.version("gunicorn").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return []
    return ["--no-control-socket"] if major >= 27 else []


class Supervisor:
    """Children started here are stopped on exit, Ctrl-C or SIGTERM (their stop signal, then KILL).

    `cwd`: the children's working directory (default: this one). `session`: each child in its own session,
    signalled as a process group, so that a stop reaches what it forked (prefork children, gunicorn
    workers) even when it dies first; without it (`up`), Ctrl-C at a terminal reaches them all at once."""

    def __init__(self, env: Mapping[str, str] | None = None, cwd: Path | None = None, session: bool = False) -> None:
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.session = session
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stop_signals: dict[int, int] = {}

    def start(
        self,
        name: str,
        command: list[str],
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> subprocess.Popen[bytes]:
        """Start `command` with this supervisor's environment plus `env`; its stdout and stderr appended to
        `log` when given (else this process's)."""
        child_env = {**self.env, **env} if env else self.env
        with open(log, "ab") if log else contextlib.nullcontext() as out:
            proc = subprocess.Popen(
                command,
                env=child_env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=self.session,
            )
        self.children.append((name, proc))
        self.stop_signals[proc.pid] = stop_signal
        return proc

    def wait(self, check: Callable[[], int | None] | None = None) -> int:
        """Block until a child exits, a stop signal arrives or `check()` (called each turn) returns an exit
        code; return an exit code."""
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
            code = check() if check is not None else None
            if code is not None:
                return code
            time.sleep(0.2)
        return 0

    def stop(self, procs: Sequence[subprocess.Popen[bytes]] | None = None, timeout: float = 20.0) -> None:
        """Signal the children (`procs`, default all; the last started first) at once, wait up to `timeout`
        for them together, then KILL what is left. Stopped children are forgotten."""
        chosen = [proc for _, proc in reversed(self.children) if procs is None or proc in procs]
        for proc in chosen:
            if proc.poll() is None:
                self._signal(proc, self.stop_signals.get(proc.pid, signal.SIGTERM))
        deadline = time.monotonic() + timeout
        for proc in chosen:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait()
        self.children = [(name, proc) for name, proc in self.children if proc not in chosen]

    def _signal(self, proc: subprocess.Popen[bytes], signum: int) -> None:
        try:
            if self.session:
                os.killpg(proc.pid, signum)
            else:
                proc.send_signal(signum)
        except ProcessLookupError:  # already gone, with its whole group
            pass
