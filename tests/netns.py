"""Hosts on one machine: network namespaces joined by veth pairs, made and deleted by the caller.

`Hosts(tag).create()` makes `{tag}-r` (Redis and web) and one namespace per worker host (`{tag}-w1`, …),
each joined to `{tag}-r` by its own veth pair on a /24 of its own; traffic stays between these
namespaces. `cut(host)` downs the Redis side of the host's pair (its packets vanish: a silent
partition), `heal(host)` brings it back. `delete()` kills every process left in them and deletes them.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"qdprobe{os.getpid()}"
    try:
        made = ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip` is not usable: {exc}"
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


class Hosts:
    def __init__(self, tag: str | None = None, workers: int = 2) -> None:
        self.tag = tag or f"qd{os.getpid() % 100000}"
        self.net = random.randint(20, 250)  # 10.{net}.{i}.0/24 per worker host
        self.redis_ns = f"{self.tag}-r"
        self.hosts = [f"w{i}" for i in range(1, workers + 1)]
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def redis_addr(self, host: str) -> str:
        """Redis's address on the link to `host`."""
        return f"10.{self.net}.{self.hosts.index(host) + 1}.1"

    def _veth(self, host: str) -> str:
        return f"{self.tag}{host}"[:15]

    def create(self) -> Hosts:
        for ns in [self.redis_ns, *map(self.ns, self.hosts)]:
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for i, host in enumerate(self.hosts, 1):
            veth = self._veth(host)
            ip(
                "link",
                "add",
                veth,
                "netns",
                self.redis_ns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.ns(host),
            )
            ip("-n", self.redis_ns, "addr", "add", f"10.{self.net}.{i}.1/24", "dev", veth)
            ip("-n", self.ns(host), "addr", "add", f"10.{self.net}.{i}.2/24", "dev", "eth0")
            ip("-n", self.redis_ns, "link", "set", veth, "up")
            ip("-n", self.ns(host), "link", "set", "eth0", "up")
        return self

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run in the host's namespace under its own hostname (so worker names differ per host)."""
        name = f"{self.tag}-{host}"
        return [
            "ip",
            "netns",
            "exec",
            self.ns(host),
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {name} && exec "$@"',
            "sh",
            *argv,
        ]

    def hostname(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def cut(self, host: str) -> None:
        ip("-n", self.redis_ns, "link", "set", self._veth(host), "down")

    def heal(self, host: str) -> None:
        ip("-n", self.redis_ns, "link", "set", self._veth(host), "up")

    def kill_all(self, host: str) -> int:
        """SIGKILL every process in the host's namespace; how many there were."""
        pids = [int(p) for p in ip("netns", "pids", self.ns(host), check=False).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def delete(self) -> None:
        for ns in reversed(self.made):
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", ns, check=False)
        self.made.clear()
