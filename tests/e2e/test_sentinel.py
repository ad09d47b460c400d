"""Redis Sentinel: kill -9 of the master during a burst of submits (real sentinels, worker and web server).

The web answers 503 + Retry-After (never a 500) while no master is reachable, the sentinels promote the
replica, web and worker follow it, and every job accepted before or after the failover ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from qwen_deploy.cli.redis_server import free_port, reachable
from qwen_deploy.connections import connect
from tests.conftest import StackFactory
from tests.helpers import ROOT, Stack
from tests.sentinel_group import SentinelGroup, failover_burst


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path_factory.mktemp("sentinel"))
    try:
        yield g.start()
    finally:
        g.stop()


@pytest.fixture(scope="module")
def deployment(group: SentinelGroup, stack_factory: StackFactory) -> Stack:
    config = {
        "redis_wait_ms": 200,  # and WAIT 1, the default behind Sentinel
        "limits": {"reap_after": 3, "reap_grace": 1, "reap_interval": 0.5},
        "engine": {"lease_seconds": 3},
    }
    s = stack_factory(config, redis_url=group.url, name="sentinel-stack")
    s.start_worker()
    s.start_web()
    return s


def test_a_client_finds_the_master_through_the_sentinels(group: SentinelGroup) -> None:
    client = connect(group.url)
    client.set("probe", "1")
    assert client.wait(1, 1000) == 1
    assert client.info("server")["tcp_port"] == group.master_port()
    assert reachable(group.url) and not reachable(f"sentinel://127.0.0.1:{free_port()}", 0.3)  # what `up` checks


def test_a_dead_sentinel_listed_first_is_passed_over(group: SentinelGroup) -> None:
    started = time.monotonic()
    client = connect(f"sentinel://127.0.0.1:{free_port()};{group.url}")
    assert client.ping()
    print(f"\nfound the master past a dead sentinel in {time.monotonic() - started:.2f} s")


def test_master_killed_mid_burst_then_every_accepted_job_ends(deployment: Stack, group: SentinelGroup) -> None:
    old = group.master_port()
    run = failover_burst(group, deployment.url, {"prompt": "Beautiful is better than", "max_new_tokens": 8})
    print(f"\nRELIABILITY sentinel failover: {run.figures()}")
    assert run.promotion_s is not None and group.master_port() != old
    assert [s for s in run.submits if s.at < 0 and s.job_id], "no job was accepted before the kill"
    after = [s for s in run.submits if s.at > (run.first_ok_s or 1e9) and s.job_id]
    assert after, "no job was accepted on the new master"
    refused = run.refused
    assert refused, "the outage was not seen (the master was killed?)"
    assert all(s.status == 503 and s.retry_after and s.code == "redis_unavailable" for s in refused), refused[:5]
    assert not run.lost, f"accepted jobs that did not end: {run.lost}"
    succeeded = [i for i in run.accepted if run.finals[i] == "succeeded"]
    assert len(succeeded) >= 0.9 * len(run.accepted), run.finals
    # The worker follows too: a job submitted now runs on the promoted master.
    job = deployment.client().submit("Errors should never", max_new_tokens=4)
    assert deployment.client().wait(job["id"], timeout=30)["status"] == "succeeded"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`qwen-deploy ARGS` with `env`, its output captured."""
    command = [sys.executable, "-m", "qwen_deploy.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_doctor_and_healthcheck_follow_the_failover(deployment: Stack, group: SentinelGroup) -> None:
    """Run after the failover: both find the promoted master through the sentinels."""
    env = {**deployment.env, "QWEN_DEPLOY_REDIS_MASTER_NAME": "mymaster"}
    doctor = _cli(env, "doctor", "--json")
    rows = {row["name"]: row for row in json.loads(doctor.stdout[doctor.stdout.index("{") :])["checks"]}
    assert rows["redis"]["status"] == "pass", rows["redis"]
    assert f":{group.master_port()}," in rows["redis"]["detail"]
    assert rows["redis_persistence"]["status"] == "pass", rows["redis_persistence"]
    health = _cli(env, "healthcheck", "worker")
    assert health.returncode == 0, health.stdout + health.stderr
