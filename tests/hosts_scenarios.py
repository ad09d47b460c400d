"""Host loss and partitions, run inside the Redis namespace of `tests.netns.Hosts`:

    ip netns exec {tag}-r python -m tests.hosts_scenarios --tag T --net N --model DIR --tmp DIR --out FILE

Starts redis-server and the web app in the Redis namespace, one Celery generation worker per worker host
(its own namespace and hostname, reaching Redis over its veth), then runs the cases in order and writes
their figures as JSON: `busy_partition` (the host running a job is cut for `--cut` seconds, then healed),
`idle_partition` (an idle host is cut right after jobs were enqueued), `host_kill` (kill -9 of every
process of the host running a job). The caller (tests/e2e/test_hosts.py, bench/hosts_bench.py) judges them.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_deploy.cli.launch import celery_command, worker_argv
from qwen_deploy.cli.redis_server import reachable, redis_server_binary
from qwen_deploy.client import Client
from qwen_deploy.keys import JobKeys
from qwen_deploy.queues import GENERATION_QUEUES
from tests.helpers import ROOT, Stack, wait_until
from tests.netns import Hosts, ip, unavailable

TERMINAL = ("succeeded", "failed", "canceled", "timed_out")
LEASE = 4.0
LONG = {"prompt": "Beautiful is better than", "max_new_tokens": 200, "ignore_eos": True}  # ~7 s on one core


class Cluster:
    def __init__(self, hosts: Hosts, model: Path, tmp: Path) -> None:
        self.hosts, self.tmp = hosts, tmp
        (tmp / "redis").mkdir(parents=True, exist_ok=True)
        self.redis = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                "6379",
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(tmp / "redis"),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: reachable("redis://127.0.0.1:6379/0", 0.2), 10, what="redis-server")
        config = {
            "engine": {"lease_seconds": LEASE},
            "limits": {"reap_after": 3, "reap_grace": 1, "reap_interval": 0.5},
            "worker": {"heartbeat_interval": 0.5},
        }
        self.stack = Stack(tmp / "stack", model, config, redis_url="redis://127.0.0.1:6379/0")
        self.stack.start_web()
        self.client = Client(self.stack.url, timeout=30)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start_worker(self, host: str) -> None:
        env = {**self.stack.env, "REDIS_URL": f"redis://{self.hosts.redis_addr(host)}:6379/0"}
        argv = celery_command(worker_argv(GENERATION_QUEUES, host, "INFO"))
        log = open(self.tmp / f"worker-{host}.log", "ab")
        self.workers[host] = subprocess.Popen(
            self.hosts.exec_argv(host, argv), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def ready_hosts(self) -> set[str]:
        names = {self.hosts.hostname(h): h for h in self.hosts.hosts}
        return {
            names[w["hostname"]]
            for w in self.stack.workers()
            if w.get("state") == "ready" and w.get("hostname") in names
        }

    def wait_ready(self, hosts: list[str], timeout: float = 120) -> None:
        wait_until(lambda: set(hosts) <= self.ready_hosts(), timeout, 0.1, f"ready workers on {hosts}")

    def host_of(self, job_id: str) -> str | None:
        """The worker host whose engine holds the job now (from the record's `worker`)."""
        holder = self.stack.record(job_id).get("worker", "")
        return next((h for h in self.hosts.hosts if holder.startswith(self.hosts.hostname(h) + ":")), None)

    def wait_running(self, job_id: str, tokens: int = 20, timeout: float = 60) -> str:
        def running() -> str | None:
            rec = self.stack.record(job_id)
            return (
                self.host_of(job_id)
                if rec.get("status") == "running" and int(rec.get("tokens") or 0) >= tokens
                else None
            )

        return str(wait_until(running, timeout, 0.02, f"{job_id} running"))

    def done_events(self, job_id: str) -> int:
        """`done` events in the job's stream: a second one would be a second completion seen by clients."""
        entries = self.stack.redis.xrange(JobKeys(self.stack.settings.key_prefix).events_key(job_id))
        return sum(1 for _, fields in entries if fields.get("type") == "done")

    def streamed_text(self, job_id: str) -> str:
        """The token deltas of the job's event stream, joined: the text an SSE client was shown."""
        entries = self.stack.redis.xrange(JobKeys(self.stack.settings.key_prefix).events_key(job_id))
        return "".join(fields.get("text", "") for _, fields in entries if fields.get("type") == "token")

    def final(self, job_id: str, timeout: float) -> dict[str, Any]:
        return self.client.wait(job_id, timeout=timeout)

    def stop(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.kill()
        self.stack.stop()
        self.redis.kill()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.monotonic()
    return fn(), time.monotonic() - t


def busy_partition(c: Cluster, cut_s: float) -> dict[str, Any]:
    job = c.client.submit(**LONG)["id"]
    victim = c.wait_running(job)
    text_before = c.stack.record(job).get("text", "")
    c.hosts.cut(victim)
    t0 = time.monotonic()
    try:  # the other host takes it over once the lease runs out; on a slow machine that run takes longer
        done = c.final(job, timeout=max(cut_s, 90.0))
        finished_during_cut = done["status"] in TERMINAL
        taken_s = time.monotonic() - t0
    finally:
        left = cut_s - (time.monotonic() - t0)
        time.sleep(max(0.0, left))  # the cut lasts at least `cut_s`, and until the job ended (or 90 s)
        c.hosts.heal(victim)
    healed = time.monotonic()
    before = c.stack.record(job)
    # After the heal the partitioned run's blocked writes reach Redis; they must be refused: give them time.
    wait_until(lambda: c.ready_hosts() == set(c.hosts.hosts), 60, 0.2, "both workers ready after the heal")
    log = c.tmp / f"worker-{victim}.log"
    try:  # the partitioned run learns at its first write after the heal that the job is not its own
        wait_until(lambda: f"job.dropped id={job}" in log.read_text(errors="replace"), 30, 0.2, "the drop")
        dropped = True
    except AssertionError:
        dropped = False
    after = c.stack.record(job)
    final = c.final(job, 30)
    return {
        "victim": victim,
        "finished_during_cut": finished_during_cut,
        "finish_s": round(taken_s, 2),
        "status": final["status"],
        "attempts": final["attempts"],
        "finished_by": c.host_of(job),
        "unchanged_after_heal": {k: before.get(k) for k in ("status", "text", "worker", "completed_at")}
        == {k: after.get(k) for k in ("status", "text", "worker", "completed_at")},
        "late_run_dropped": dropped,
        "done_events": c.done_events(job),
        "resumed": final["output"]["text"].startswith(text_before),
        "stream_equals_text": c.streamed_text(job) == final["output"]["text"],
        "tokens": final["progress"]["tokens"],
        "heal_to_ready_s": round(time.monotonic() - healed, 2),
    }


def idle_partition(c: Cluster, cut_s: float, jobs: int = 4) -> dict[str, Any]:
    idle = c.hosts.hosts[0]
    ids = [c.client.submit("Errors should never", max_new_tokens=60, ignore_eos=True)["id"] for _ in range(jobs)]
    c.hosts.cut(idle)
    t0 = time.monotonic()
    try:
        finals = [c.final(i, timeout=max(1.0, cut_s - (time.monotonic() - t0))) for i in ids]
        during = sum(1 for f in finals if f["status"] in TERMINAL)
        all_s = time.monotonic() - t0
    finally:
        time.sleep(max(0.0, cut_s - (time.monotonic() - t0)))
        c.hosts.heal(idle)
    finals = [c.final(i, timeout=60) for i in ids]
    wait_until(lambda: c.ready_hosts() == set(c.hosts.hosts), 60, 0.2, "both workers ready after the heal")
    return {
        "jobs": jobs,
        "ended_during_cut": during,
        "all_ended_s": round(all_s, 2),
        "lost": sum(1 for f in finals if f["status"] not in TERMINAL),
        "succeeded": sum(1 for f in finals if f["status"] == "succeeded"),
        "done_events": [c.done_events(i) for i in ids],
        "attempts": [f["attempts"] for f in finals],
    }


def host_kill(c: Cluster) -> dict[str, Any]:
    job = c.client.submit(**LONG)["id"]
    victim = c.wait_running(job)
    killed = c.hosts.kill_all(victim)
    t0 = time.monotonic()
    other = wait_until(lambda: (h := c.host_of(job)) != victim and h, LEASE + 30, 0.02, "a takeover")
    taken_s = time.monotonic() - t0
    final = c.final(job, timeout=60)
    return {
        "victim": victim,
        "processes_killed": killed,
        "taken_over_by": other,
        "takeover_s": round(taken_s, 2),
        "finish_s": round(time.monotonic() - t0, 2),
        "status": final["status"],
        "attempts": final["attempts"],
        "lease_s": LEASE,
        "done_events": c.done_events(job),
    }


class NamespacesUnavailable(RuntimeError):
    """This machine cannot make the namespaces or their links (not root, no veth, …)."""


def run_in_namespaces(
    tmp: Path, cut: float = 15.0, idle_cut: float = 10.0, cases: str = "", timeout: float = 240.0
) -> dict[str, Any]:
    """Make the namespaces, run the cases inside the Redis one, delete them with every process left; the
    figures by case (a case that could not run says `error`). Raises when namespaces are unavailable."""
    from worker.builders.random import build_random_model

    reason = unavailable()
    if reason:
        raise NamespacesUnavailable(reason)
    model = build_random_model("qwen2", "38m")
    hosts, out = Hosts(), tmp / "results.json"
    try:
        try:
            hosts.create()
        except subprocess.CalledProcessError as exc:
            raise NamespacesUnavailable(f"cannot make the hosts: {' '.join(exc.cmd)}: {exc.stderr.strip()}") from exc
        argv = [
            "ip",
            "netns",
            "exec",
            hosts.redis_ns,
            sys.executable,
            "-m",
            "tests.hosts_scenarios",
            "--tag",
            hosts.tag,
            "--net",
            str(hosts.net),
            "--model",
            str(model),
            "--tmp",
            str(tmp),
            "--out",
            str(out),
            "--cut",
            str(cut),
            "--idle-cut",
            str(idle_cut),
            *(["--cases", cases] if cases else []),
        ]
        try:
            subprocess.run(argv, cwd=ROOT, timeout=timeout, check=False, stdout=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        return dict(json.loads(out.read_text())) if out.exists() else {}
    finally:
        hosts.delete()
        left = [ns for ns in ip("netns", "list").stdout.split() if ns.startswith(hosts.tag + "-")]
        if left:
            raise RuntimeError(f"namespaces left behind: {left}")


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--tag", "--model", "--tmp", "--out"):
        parser.add_argument(name, required=True)
    parser.add_argument("--net", type=int, required=True)
    parser.add_argument("--cut", type=float, default=15.0, help="seconds the busy host is cut off")
    parser.add_argument("--idle-cut", type=float, default=10.0, help="seconds the idle host is cut off")
    parser.add_argument("--cases", default="host_kill,busy_partition,idle_partition")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    hosts = Hosts(args.tag)
    hosts.net = args.net
    cluster = Cluster(hosts, Path(args.model), Path(args.tmp))
    results: dict[str, Any] = {}
    try:
        for host in hosts.hosts:
            cluster.start_worker(host)
        cluster.wait_ready(hosts.hosts)
        for case in args.cases.split(","):
            try:
                if case == "host_kill":
                    results[case] = host_kill(cluster)
                    victim = results[case]["victim"]
                    cluster.start_worker(victim)  # the host comes back for the next case
                    cluster.wait_ready(hosts.hosts)
                elif case == "busy_partition":
                    results[case] = busy_partition(cluster, args.cut)
                else:
                    results[case] = idle_partition(cluster, args.idle_cut)
            except Exception as exc:  # report it and go on with the next case
                results[case] = {"error": f"{type(exc).__name__}: {exc}"}
            Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        cluster.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
