"""A Redis Sentinel group on loopback for tests and benches: one master, one replica, three sentinels.

Both data nodes run with AOF (`appendonly yes`, `appendfsync everysec`), as docs/RELIABILITY.md requires.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

from qwen_deploy.cli.redis_server import free_port, redis_server_binary

MASTER_NAME = "mymaster"
TERMINAL = ("succeeded", "failed", "canceled", "timed_out")


def _wait(predicate: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()  # type: ignore[operator]
        except (redis.RedisError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class SentinelGroup:
    """`start()` then `url` (kombu's sentinel:// form); `kill_master()` is a `kill -9` of the master."""

    def __init__(
        self, tmp: Path, down_after_ms: int = 1000, failover_timeout_ms: int = 2000, host: str = "127.0.0.1"
    ) -> None:
        self.tmp, self.host = tmp, host
        tmp.mkdir(parents=True, exist_ok=True)
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.data_ports = [free_port(), free_port()]  # master first, then the replica
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://{self.host}:{p}" for p in self.sentinel_ports)

    def _spawn(self, port: int, conf: str, *extra: str) -> None:
        path = self.tmp / f"node-{port}.conf"
        path.write_text(conf)
        (self.tmp / f"data-{port}").mkdir(parents=True, exist_ok=True)
        log = open(self.tmp / f"node-{port}.log", "ab")
        self.procs[port] = subprocess.Popen(
            [redis_server_binary(), str(path), *extra], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _data_conf(self, port: int) -> str:
        return (
            f"port {port}\nbind {self.host}\ndir {self.tmp / f'data-{port}'}\nappendonly yes\n"
            'appendfsync everysec\nsave ""\nmaxmemory-policy noeviction\nloglevel warning\n'
        )

    def start(self, timeout: float = 20.0) -> SentinelGroup:
        master, replica = self.data_ports
        self._spawn(master, self._data_conf(master))
        self._spawn(replica, self._data_conf(replica) + f"replicaof {self.host} {master}\n")
        for port in self.sentinel_ports:
            self._spawn(
                port,
                (
                    f"port {port}\nbind {self.host}\ndir {self.tmp}\nloglevel warning\n"
                    f"sentinel monitor {MASTER_NAME} {self.host} {master} 2\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}\n"
                    f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                ),
                "--sentinel",
            )
        _wait(
            lambda: self.node(replica).info("replication").get("master_link_status") == "up",
            timeout,
            "the replica's link to the master",
        )
        _wait(self._settled, timeout, "every sentinel to see the replica and the other two sentinels")
        return self

    def _settled(self) -> bool:
        for port in self.sentinel_ports:
            state = self.node(port).sentinel_master(MASTER_NAME)
            if int(state.get("num-slaves", 0)) < 1 or int(state.get("num-other-sentinels", 0)) < 2:
                return False
        return True

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=port, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0
        )

    def master_port(self) -> int | None:
        """The master as the sentinels name it (the first that answers)."""
        for port in self.sentinel_ports:
            try:
                found = self.node(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except (redis.RedisError, OSError):
                continue
            if found:
                return int(found[1])
        return None

    def kill_master(self) -> int:
        """SIGKILL the current master's process; returns its port."""
        port = self.master_port()
        assert port is not None, "no master known"
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()
        return port

    def wait_promoted(self, old: int, timeout: float = 30.0) -> int:
        """The new master's port, once the sentinels name another node and it answers as a master."""

        def promoted() -> int | None:
            port = self.master_port()
            if port is None or port == old:
                return None
            return port if self.node(port).info("replication").get("role") == "master" else None

        return int(_wait(promoted, timeout, "a promoted replica"))  # type: ignore[call-overload]

    def restart_killed(self, timeout: float = 30.0) -> None:
        """Start the killed nodes again (AOF reloads them) and wait until each is a replica in sync."""
        for port, proc in list(self.procs.items()):
            if proc.poll() is None or port not in self.data_ports:
                continue
            log = open(self.tmp / f"node-{port}.log", "ab")
            self.procs[port] = subprocess.Popen(
                [redis_server_binary(), str(self.tmp / f"node-{port}.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            _wait(
                lambda p=port: self.node(p).info("replication").get("master_link_status") == "up",
                timeout,
                f"node {port} back as a replica",
            )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


@dataclass
class Submit:
    at: float  # seconds since the kill (negative: before it)
    status: int  # HTTP status, 0 when no answer came
    job_id: str | None = None
    retry_after: str | None = None
    code: str | None = None


@dataclass
class FailoverRun:
    submits: list[Submit] = field(default_factory=list)
    promotion_s: float | None = None
    first_ok_s: float | None = None  # the first accepted submit after the first refused one
    finals: dict[str, str] = field(default_factory=dict)  # job id -> final status

    @property
    def accepted(self) -> list[str]:
        return [s.job_id for s in self.submits if s.job_id]

    @property
    def refused(self) -> list[Submit]:
        return [s for s in self.submits if not 200 <= s.status < 300]

    @property
    def lost(self) -> list[str]:
        return [i for i in self.accepted if self.finals.get(i) not in TERMINAL]

    def figures(self) -> dict[str, object]:
        done = sum(1 for i in self.accepted if self.finals.get(i) == "succeeded")
        return {
            "promotion_s": None if self.promotion_s is None else round(self.promotion_s, 2),
            "first_ok_s": None if self.first_ok_s is None else round(self.first_ok_s, 2),
            "submits": len(self.submits),
            "refused": len(self.refused),
            "refused_codes": sorted({f"{s.status}:{s.code}" for s in self.refused}),
            "accepted": len(self.accepted),
            "succeeded": done,
            "lost": len(self.lost),
        }


def failover_burst(
    group: SentinelGroup,
    base_url: str,
    body: dict[str, object],
    before: float = 2.0,
    after_ok: int = 20,
    deadline: float = 30.0,
    interval: float = 0.02,
    finish_timeout: float = 60.0,
) -> FailoverRun:
    """Submit `body` to POST /v1/jobs in a loop; `before` seconds in, kill -9 the master; go on until
    `after_ok` submits in a row were accepted after the outage (or `deadline`); then wait for every
    accepted job to end. Promotion is timed by a thread that polls the sentinels."""
    run, session = FailoverRun(), requests.Session()
    start = time.monotonic()
    killed_at: list[float] = []

    def watch() -> None:
        old = group.kill_master()
        killed_at.append(time.monotonic())
        group.wait_promoted(old, timeout=deadline)
        run.promotion_s = time.monotonic() - killed_at[0]

    watcher = threading.Thread(target=watch, daemon=True)
    streak, outage = 0, False
    while time.monotonic() - start < deadline:
        if not watcher.is_alive() and not killed_at and time.monotonic() - start >= before:
            watcher.start()
            while not killed_at and watcher.is_alive():
                time.sleep(0.001)
        t0 = time.monotonic()
        at = t0 - killed_at[0] if killed_at else t0 - start - before
        try:
            resp = session.post(base_url + "/v1/jobs", json=body, timeout=10)
        except requests.RequestException:
            run.submits.append(Submit(at, 0))
            outage, streak = True, 0
            continue
        error = resp.json().get("error", {}) if resp.status_code >= 400 else {}
        run.submits.append(
            Submit(
                at,
                resp.status_code,
                resp.json()["id"] if resp.status_code < 300 else None,
                resp.headers.get("Retry-After"),
                error.get("code"),
            )
        )
        if resp.status_code >= 300:
            outage, streak = True, 0
        elif killed_at:
            if outage and run.first_ok_s is None:
                run.first_ok_s = time.monotonic() - killed_at[0]
            streak += 1
            if outage and streak >= after_ok and run.promotion_s is not None:
                break
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    watcher.join(timeout=max(0.0, deadline - (time.monotonic() - start)))
    end = time.monotonic() + finish_timeout
    for job_id in run.accepted:
        run.finals[job_id] = _final(session, base_url, job_id, end)
    return run


def _final(session: requests.Session, base_url: str, job_id: str, end: float) -> str:
    """The job's status once terminal (long-polled), or the last status seen at `end`."""
    status = "unknown"
    while time.monotonic() < end:
        try:
            resp = session.get(
                f"{base_url}/v1/jobs/{job_id}", params={"wait": min(5.0, max(0.1, end - time.monotonic()))}, timeout=15
            )
        except requests.RequestException:
            time.sleep(0.1)
            continue
        status = resp.json().get("status", f"http {resp.status_code}")
        if status in TERMINAL:
            return status
    return status
