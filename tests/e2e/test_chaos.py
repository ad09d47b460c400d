"""Nothing lost, nobody in: kill things and count. Each test records its figure (bench/reliability_bench.py prints
them; see docs/RELIABILITY.md)."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.client import APIError, Client
from qwen_deploy.keys import JobKeys
from qwen_deploy.queues import GENERATE_TASK, Lane
from tests.conftest import StackFactory
from tests.helpers import Stack, wait_until

INTERACTIVE_QUEUE = Lane.INTERACTIVE.queue


pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "canceled", "timed_out")
LONG = {
    "prompt": "Simple is better than complex. " * 400 + "Beautiful is better than",
    "max_new_tokens": 512,
    "ignore_eos": True,
}
KILLABLE = {"prompt": "Beautiful is better than", "max_new_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def chaos(stack_factory: StackFactory) -> Stack:
    limits = {
        "max_queue_depth": 100_000,
        "reap_after": 3,
        "reap_grace": 1,
        "reap_interval": 0.5,
        "generation_budget": 10,
        "soft_time_limit": 12,
        "hard_time_limit": 15,
    }
    # fp32: a resumed greedy job equals an uninterrupted run exactly (in bf16, the prefill of prompt + partial
    # output rounds differently from step-by-step decoding and can flip a near-tied token of the demo model).
    s = stack_factory({"limits": limits, "model": {"dtype": "fp32"}}, name="chaos")
    s.start_worker()
    s.start_web()
    return s


Figure = Callable[..., None]


@pytest.fixture
def figure(record_property: Callable[[str, object], None]) -> Figure:
    """Record a reliability figure of the test (bench/reliability_bench.py collects them from the JUnit XML)."""

    def record(name: str, **values: object) -> None:
        record_property(f"reliability:{name}", json.dumps(values))

    return record


def finals(client: Client, ids: list[str], timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    return [client.wait(i, timeout=max(1.0, deadline - time.monotonic())) for i in ids]


def test_burst_of_500_jobs_from_16_threads(chaos: Stack, figure: Figure) -> None:
    client = chaos.client()
    with ThreadPoolExecutor(16) as pool:
        ids = list(
            pool.map(lambda i: Client(chaos.url).submit("Errors should never", max_new_tokens=2)["id"], range(500))
        )
    assert len(set(ids)) == 500
    done = finals(client, ids)
    statuses = [d["status"] for d in done]
    duplicates = sum(1 for d in done if d["attempts"] > 1)
    figure(
        "burst", jobs=500, terminal=sum(s in TERMINAL for s in statuses), lost=500 - len(done), duplicates=duplicates
    )
    assert statuses == ["succeeded"] * 500
    assert duplicates <= 1  # ≤ 0.2 %


def test_child_killed_8_times(chaos: Stack, figure: Figure) -> None:
    client = chaos.client()
    ids, recoveries = [], []
    for _ in range(8):
        job = client.submit(**KILLABLE)
        wait_until(lambda j=job: client.get(j["id"])["progress"]["tokens"] > 0, 60, 0.005, "the job to run")
        pid = int(chaos.record(job["id"])["worker"].rsplit(":", 1)[1])
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        ids.append(job["id"])
        client.wait(job["id"], timeout=60)
        recoveries.append(time.monotonic() - killed_at)
    done = finals(client, ids)
    stuck = sum(d["status"] not in TERMINAL for d in done)
    figure(
        "child_sigkill",
        runs=8,
        terminal=8 - stuck,
        rerun_ok=sum(d["status"] == "succeeded" for d in done),
        stuck=stuck,
        recovery_p50_s=round(sorted(recoveries)[4], 2),
    )
    assert stuck == 0
    assert all(d["status"] == "succeeded" and d["attempts"] == 2 for d in done)
    assert client.generate("Errors should never", max_new_tokens=6)["output"]["text"].startswith(" pass silently.")


def kill_child_when_running(stack: Stack, client: Client, job_id: str, attempt: int) -> None:
    def running() -> bool:
        job = client.get(job_id)
        return job["attempts"] == attempt and job["status"] == "running" and job["progress"]["tokens"] > 0

    wait_until(running, 60, 0.005, f"attempt {attempt} running")
    os.kill(int(stack.record(job_id)["worker"].rsplit(":", 1)[1]), signal.SIGKILL)


def test_poison_pill_fails_after_max_deliveries_and_others_flow(chaos: Stack, figure: Figure) -> None:
    client = chaos.client()
    job = client.submit(**KILLABLE)
    kill_child_when_running(chaos, client, job["id"], attempt=1)
    kill_child_when_running(chaos, client, job["id"], attempt=2)
    done = client.wait(job["id"], timeout=60)
    figure(
        "poison_pill",
        deliveries_allowed=chaos.settings.limits.max_deliveries,
        runs=done["attempts"] - 1,
        status=done["status"],
    )
    assert done["status"] == "failed" and done["error"]["code"] == "worker_lost"
    # failed either by the next claim (a third run refused) or by the reaper (its lease ran out first)
    assert "2 time(s)" in done["error"]["message"] and done["attempts"] in (2, 3)
    assert client.generate("Beautiful is better than", max_new_tokens=6)["output"]["text"].startswith(" ugly.")


def test_parent_and_child_killed_with_jobs_in_flight_and_queued(chaos: Stack, figure: Figure) -> None:
    client = chaos.client()
    running = client.submit(**LONG)
    queued = [client.submit("Errors should never", max_new_tokens=4)["id"] for _ in range(10)]
    wait_until(lambda: client.get(running["id"])["progress"]["tokens"] > 0, 60, 0.005, "the job to run")
    os.killpg(chaos.worker.pid, signal.SIGKILL)
    chaos.worker.wait()
    killed_at = time.monotonic()
    # While no worker runs, a job's message vanishes (popped by a consumer that died): the reaper pushes
    # it again; a waiting job beside it keeps its one message and runs once.
    lost = client.submit("Errors should never", max_new_tokens=6)["id"]
    waiting = client.submit("Errors should never", max_new_tokens=6)["id"]
    assert chaos.redis.lrem(f"qd:{INTERACTIVE_QUEUE}", 1, chaos.record(lost)["message"]) == 1
    chaos.start_worker()
    done = finals(client, [running["id"], *queued])
    figure(
        "parent_and_child_sigkill",
        jobs=11,
        completed=sum(d["status"] == "succeeded" for d in done),
        lost=sum(d["status"] not in TERMINAL for d in done),
        recovery_s=round(time.monotonic() - killed_at, 1),
    )
    assert [d["status"] for d in done] == ["succeeded"] * 11
    found, other = finals(client, [lost, waiting])
    figure(
        "lost_message",
        lost=1,
        recovered=int(found["status"] == "succeeded"),
        waiting_left_alone=int(other["attempts"] == 1),
    )
    assert [found["status"], other["status"]] == ["succeeded", "succeeded"]
    assert found["attempts"] == other["attempts"] == 1
    assert found["output"]["text"].startswith(" pass silently.")


def test_sigterm_lets_the_running_job_finish(chaos: Stack, figure: Figure) -> None:
    client = chaos.client()
    job = client.submit("Beautiful is better than", max_new_tokens=300, ignore_eos=True)
    wait_until(lambda: client.get(job["id"])["progress"]["tokens"] > 0, 60, 0.005, "the job to run")
    os.kill(chaos.worker.pid, signal.SIGTERM)  # warm shutdown: finish the task, then exit
    chaos.worker.wait(timeout=60)
    done = client.get(job["id"])
    figure("sigterm", jobs=1, finished=int(done["status"] == "succeeded"), attempts=done["attempts"])
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["output"]["usage"]["completion_tokens"] == 300
    chaos.start_worker()


def test_pickled_message_is_refused_and_never_runs(chaos: Stack, tmp_path: Path, figure: Figure) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    task_id = str(uuid.uuid4())
    body = base64.b64encode(pickle.dumps(((Evil(),), {}, {}))).decode()
    message = {
        "body": body,
        "content-encoding": "binary",
        "content-type": "application/x-python-serialize",
        "headers": {
            "lang": "py",
            "task": GENERATE_TASK,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": INTERACTIVE_QUEUE},
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    chaos.redis.lpush(f"qd:{INTERACTIVE_QUEUE}", json.dumps(message))
    client = chaos.client()
    after = client.generate("Errors should never", max_new_tokens=6)  # queued behind it: the worker moved on
    time.sleep(0.5)
    figure("pickle_message", pushed=1, executions=int(marker.exists()))
    assert after["status"] == "succeeded"
    assert not marker.exists()
    assert chaos.redis.llen(f"qd:{INTERACTIVE_QUEUE}") == 0 and chaos.redis.hlen("qd:unacked") == 0
    assert "disallowed" in chaos.log_path.read_text().lower()


def test_redis_killed_with_100_jobs_queued(chaos: Stack, figure: Figure) -> None:
    """kill -9 of redis-server (AOF on); the worker and the web server are not restarted."""
    client = chaos.client()
    busy = client.submit(**LONG)["id"]  # in flight when Redis dies
    ids = [client.submit("Errors should never", max_new_tokens=4)["id"] for _ in range(100)]

    def written() -> bool:  # in the AOF file (a kill -9 keeps it): nothing buffered, no fsync pending
        info = chaos.redis.info("persistence")
        return info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0

    wait_until(written, 30, 0.05, "the AOF to hold every submit")
    server = chaos.redis_server
    assert server is not None
    server.kill()
    with pytest.raises(APIError) as err:
        client.submit("Errors should never", max_new_tokens=4)
    assert (err.value.status, err.value.code) == (503, "redis_unavailable")
    ready = requests.get(chaos.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "redis_unavailable"
    time.sleep(2)
    down_at = time.monotonic()
    chaos.redis_server = RedisServer(data_dir=server.data_dir, port=server.port).start()
    done = finals(client, [busy, *ids], timeout=240)  # generous: a loaded machine recovers slowly
    ok = sum(d["status"] == "succeeded" for d in done)
    figure(
        "redis_kill_9",
        queued=100,
        in_flight=1,
        completed=ok,
        lost=101 - ok,
        recovery_s=round(time.monotonic() - down_at, 1),
    )
    assert ok == 101


def test_every_route_but_the_probes_needs_the_key(tmp_path: Path, demo_model: Path, figure: Figure) -> None:
    stack = Stack(tmp_path / "stack", demo_model, {"web": {"api_keys": ["k-chaos-1"]}})
    stack.start_web()
    try:
        doc = requests.get(
            stack.url + "/openapi.json", headers={"Authorization": "Bearer k-chaos-1"}, timeout=10
        ).json()
        routes = [
            (m.upper(), p.replace("{job_id}", "job_x").replace("{batch_id}", "batch_x"))
            for p, ops in doc["paths"].items()
            for m in ops
        ]
        routes += [("GET", "/openapi.json"), ("GET", "/docs")]
        refused = 0
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}):
                response = requests.request(method, stack.url + path, headers=headers, json={}, timeout=10)
                if path in ("/livez", "/readyz"):  # open for probes; no secrets in them
                    assert response.status_code in (200, 503) and "k-chaos-1" not in response.text
                elif path == "/":  # the console page holds no data: its script sends the key typed in
                    assert response.status_code == 200 and "k-chaos-1" not in response.text
                else:
                    assert response.status_code == 401, (method, path, headers, response.status_code)
                    refused += 1
        figure("auth", routes=len(routes), refused=refused)
        log = stack.tmp / "worker.log"
        assert not log.exists() or "k-chaos-1" not in log.read_text()
    finally:
        stack.stop()


def test_child_killed_with_16_co_batched_jobs_resumes_them_all(chaos: Stack, figure: Figure) -> None:
    """SIGKILL of the engine's child: the replacement takes over every job it held and resumes each from the
    text already streamed (greedy: the final text is what one uninterrupted run gives)."""
    client = chaos.client()
    bodies = [
        {"prompt": p, "max_new_tokens": 300, "ignore_eos": True}
        for p in ("Beautiful is better than", "Errors should never", "Simple is", "Flat is better than")
    ] * 4
    ids = [client.submit(**b)["id"] for b in bodies]

    def all_streaming() -> bool:
        records = [chaos.record(i) for i in ids]
        return all(r.get("status") == "running" and int(r.get("tokens") or 0) > 0 for r in records)

    wait_until(all_streaming, 60, 0.005, "16 jobs streaming in one engine")
    holders = {chaos.record(i)["worker"] for i in ids}
    before = {i: chaos.record(i)["text"] for i in ids}
    assert len(holders) == 1
    killed_at = time.monotonic()
    os.kill(int(holders.pop().rsplit(":", 1)[1]), signal.SIGKILL)
    done = finals(client, ids)
    figure(
        "engine_child_sigkill",
        jobs=16,
        terminal=sum(d["status"] in TERMINAL for d in done),
        resumed=sum(d["attempts"] == 2 for d in done),
        recovery_s=round(time.monotonic() - killed_at, 1),
    )
    assert [d["status"] for d in done] == ["succeeded"] * 16
    assert all(d["attempts"] == 2 for d in done)
    for i, d in zip(ids, done):
        assert d["output"]["text"].startswith(before[i])
        assert d["output"]["usage"]["completion_tokens"] == 300
        stream = chaos.redis.xrange(JobKeys(chaos.settings.key_prefix).events_key(i))
        assert "".join(f.get("text", "") for _, f in stream if f["type"] == "token") == d["output"]["text"]
    expected = {b["prompt"]: client.generate(**b)["output"]["text"] for b in bodies[:4]}
    assert [d["output"]["text"] for d in done] == [expected[b["prompt"]] for b in bodies]


def children(proc: object) -> list[str]:
    pid = proc.pid  # type: ignore[attr-defined]
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def test_two_workers_share_the_work_without_running_a_job_twice(chaos: Stack, figure: Figure) -> None:
    """Two engines on one Redis: each job is claimed once (one attempt, one holder), none is lost."""
    import subprocess

    from qwen_deploy.cli.launch import celery_command, worker_argv
    from qwen_deploy.queues import GENERATION_QUEUES
    from tests.helpers import ROOT

    log = open(chaos.tmp / "second-worker.log", "ab")
    second = subprocess.Popen(
        celery_command(worker_argv(GENERATION_QUEUES, f"second{os.getpid()}", "INFO")),
        env=chaos.env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def both_ready() -> bool:  # each one's own child: a killed child's record lingers for its TTL
            assert second.poll() is None, (chaos.tmp / "second-worker.log").read_text()[-3000:]
            ready = {str(w["pid"]) for w in chaos.workers() if w["state"] == "ready"}
            return all(ready & set(children(proc)) for proc in (chaos.worker, second))

        wait_until(both_ready, 90, 0.2, "two ready workers")
        client = chaos.client()
        ids = [client.submit("Beautiful is better than", max_new_tokens=60, ignore_eos=True)["id"] for _ in range(48)]
        done = finals(client, ids)
        holders = {chaos.record(i)["worker"] for i in ids}
        figure(
            "two_workers",
            jobs=48,
            succeeded=sum(d["status"] == "succeeded" for d in done),
            reruns=sum(d["attempts"] > 1 for d in done),
            engines_used=len(holders),
        )
        assert [d["status"] for d in done] == ["succeeded"] * 48
        assert all(d["attempts"] == 1 and d["output"]["usage"]["completion_tokens"] == 60 for d in done)
        assert len({d["output"]["text"] for d in done}) == 1
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=30)
