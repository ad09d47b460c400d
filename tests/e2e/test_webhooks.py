"""Webhooks: signed (checked with the standardwebhooks library), retried, durable, refused for internal hosts."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from tests.helpers import Stack, wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SCHEDULE = [0.3, 0.6, 1.5, 3.0]


class Receiver:
    """A loopback HTTP server that records every request and answers from a per-path script."""

    def __init__(self, port: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.plans: dict[str, list[int]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                plan = receiver.plans.get(self.path, [])
                code = plan.pop(0) if len(plan) > 1 else (plan[0] if plan else 200)
                receiver.calls.append({"path": self.path, "headers": dict(self.headers), "body": body, "code": code})
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["path"] == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, stack: Stack) -> Iterator[Stack]:
    """The shared stack's Redis and generation worker, with a web server and convert worker set up for webhooks."""
    config = {
        "webhooks": {
            "secret": SECRET,
            "allowed_hosts": ["127.0.0.1"],
            "retry_schedule": SCHEDULE,
            "output_interval": 0.2,
        }
    }
    yield from webhook_stack(tmp_path_factory.mktemp("webhooks"), demo_model, stack, config)


def webhook_stack(tmp: Path, demo_model: Path, stack: Stack, config: dict[str, Any]) -> Iterator[Stack]:
    """A web server and convert worker (the sender) with `config`, on the shared stack's Redis and worker."""
    s = Stack(tmp, demo_model, config, redis_url=stack.redis_url)
    s.start_convert_worker()
    s.start_web()
    yield s
    s.stop()
    s.redis.delete("qd:webhooks:due", "qd:webhooks:watch")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def submit(stack: Stack, **body: Any) -> dict[str, Any]:
    answer = requests.post(
        stack.url + "/v1/jobs", json={"prompt": "Beautiful is better than", "max_new_tokens": 4, **body}, timeout=30
    )
    assert answer.status_code == 202, answer.text
    return answer.json()


def attempts(stack: Stack, job_id: str, n: int) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        data = requests.get(f"{stack.url}/v1/jobs/{job_id}/webhooks", timeout=10).json()["data"]
        return data if len(data) >= n else None

    return wait_until(enough, 30, 0.05, f"{n} webhook attempts")


def verified(call: dict[str, Any]) -> dict[str, Any]:
    return Webhook(SECRET).verify(call["body"], call["headers"])


def test_retried_after_503_and_signed(hooks: Stack, receiver: Receiver) -> None:
    receiver.plans["/flaky"] = [503, 200]
    job = submit(hooks, webhook=receiver.url("/flaky"))
    calls = wait_until(
        lambda: receiver.at("/flaky") if len(receiver.at("/flaky")) >= 2 else None, 30, what="two attempts"
    )
    assert [c["code"] for c in calls] == [503, 200]
    assert len({c["headers"]["webhook-id"] for c in calls}) == 1
    assert calls[0]["body"] == calls[1]["body"]
    payload = verified(calls[1])
    assert payload["type"] == "job.completed"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    assert payload["data"]["output"]["text"] == hooks.client().get(job["id"])["output"]["text"] != ""
    with pytest.raises(Exception):
        Webhook("whsec_" + "A" * 32).verify(calls[1]["body"], calls[1]["headers"])
    log = attempts(hooks, job["id"], 2)
    assert [a["status_code"] for a in log] == [503, 200]
    assert [a["attempt"] for a in log] == [1, 2] and log[0]["time"] < log[1]["time"]
    assert all(a["event"] == "job.completed" and a["duration_ms"] >= 0 for a in log)


def test_receiver_down_then_started_mid_schedule(hooks: Stack) -> None:
    with socket.socket() as probe:  # a free port: nothing listens there yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = submit(hooks, webhook=f"http://127.0.0.1:{port}/late")
    first = attempts(hooks, job["id"], 1)
    assert first[0]["status_code"] is None and first[0]["error"].startswith("connection")
    late = Receiver(port)
    try:
        calls = wait_until(lambda: late.at("/late"), 30, what="the delivery once the receiver is up")
        assert verified(calls[0])["data"]["id"] == job["id"]
        log = attempts(hooks, job["id"], 2)
        assert log[-1]["status_code"] == 200 and all(a["status_code"] is None for a in log[:-1])
        assert len({a["webhook_id"] for a in log}) == 1
    finally:
        late.stop()


def test_pending_delivery_survives_a_convert_worker_restart(hooks: Stack) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = submit(hooks, webhook=f"http://127.0.0.1:{port}/restart")
    assert attempts(hooks, job["id"], 1)[0]["status_code"] is None
    hooks.stop_worker()  # the convert worker, the only sender
    late = Receiver(port)
    try:
        hooks.start_convert_worker()
        calls = wait_until(lambda: late.at("/restart"), 60, what="the delivery after the restart")
        assert verified(calls[0])["data"]["id"] == job["id"]
        assert attempts(hooks, job["id"], 2)[-1]["status_code"] == 200
    finally:
        late.stop()


def test_gone_stops_retrying(hooks: Stack, receiver: Receiver) -> None:
    receiver.plans["/gone"] = [410]
    job = submit(hooks, webhook=receiver.url("/gone"))
    log = attempts(hooks, job["id"], 1)
    assert log[0]["status_code"] == 410
    msg = log[0]["webhook_id"]
    assert hooks.redis.hget(f"qd:webhook:{msg}", "state") == "failed"
    assert hooks.redis.zscore("qd:webhooks:due", msg) is None


def test_start_and_completed_events(hooks: Stack, receiver: Receiver) -> None:
    job = submit(hooks, webhook=receiver.url("/both"), webhook_events_filter=["start", "completed"])
    calls = wait_until(
        lambda: receiver.at("/both") if len(receiver.at("/both")) >= 2 else None,
        30,
        what="start and completed deliveries",
    )
    payloads = sorted((verified(c) for c in calls), key=lambda p: p["timestamp"])
    assert [p["type"] for p in payloads] == ["job.started", "job.completed"]
    assert [p["data"]["status"] for p in payloads] == ["running", "succeeded"]
    assert {p["data"]["id"] for p in payloads} == {job["id"]}
    assert len({c["headers"]["webhook-id"] for c in calls}) == 2
    record = hooks.record(job["id"])
    assert record["webhook"] == receiver.url("/both")
    assert json.loads(record["webhook_events_filter"]) == ["completed", "start"]
    assert "webhook" not in json.loads(record["request"])  # the worker's request carries no webhook


def test_output_events_while_running(hooks: Stack, receiver: Receiver) -> None:
    job = submit(
        hooks,
        webhook=receiver.url("/out"),
        webhook_events_filter=["output", "completed"],
        max_new_tokens=200,
        ignore_eos=True,
    )
    done = wait_until(
        lambda: [c for c in receiver.at("/out") if verified(c)["type"] == "job.completed"],
        60,
        what="the completed delivery",
    )
    outputs = [verified(c) for c in receiver.at("/out") if verified(c)["type"] == "job.output"]
    final = verified(done[0])["data"]
    assert final["progress"]["tokens"] == 200
    duration = final["completed_at"] - final["started_at"]
    assert len(outputs) <= duration / 0.2 + 2  # at most one per output_interval
    for p in outputs:
        assert p["data"]["status"] == "running" and p["data"]["id"] == job["id"]
        assert 0 < p["data"]["progress"]["tokens"] <= 200
    if duration > 0.8:  # long enough for the watcher to have seen it running
        assert outputs


def test_batch_completed(hooks: Stack, receiver: Receiver) -> None:
    body = {
        "requests": [{"custom_id": f"r{i}", "body": {"prompt": "Simple is", "max_new_tokens": 3}} for i in range(2)],
        "webhook": receiver.url("/batch"),
    }
    batch = requests.post(hooks.url + "/v1/batches", json=body, timeout=30).json()
    calls = wait_until(lambda: receiver.at("/batch"), 60, what="batch.completed")
    payload = verified(calls[0])
    assert payload["type"] == "batch.completed"
    assert payload["data"]["id"] == batch["id"] and payload["data"]["status"] == "completed"
    assert payload["data"]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    log = wait_until(
        lambda: requests.get(f"{hooks.url}/v1/batches/{batch['id']}/webhooks", timeout=10).json()["data"],
        10,
        what="the batch attempt log",
    )
    assert log[0]["status_code"] == 200 and log[0]["event"] == "batch.completed"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://10.1.2.3/hook", "non-public"),
        ("http://localhost:9/hook", "non-public"),
        ("http://[::1]:9/hook", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::ffff:192.168.0.1]/", "non-public"),
        ("ftp://127.0.0.1/hook", "http or https"),
        ("http://user:pw@127.0.0.1/", "user name"),
    ],
)
def test_internal_addresses_refused_at_submit(hooks: Stack, url: str, needle: str) -> None:
    http = hooks.app().test_client()
    answer = http.post("/v1/jobs", json={"prompt": "x", "webhook": url})
    assert answer.status_code == 422
    error = answer.get_json()["error"]
    assert (error["code"], error["param"]) == ("invalid_webhook", "webhook") and needle in error["message"]


def test_refused_for_exports_batch_lines_and_without_a_secret(hooks: Stack, http: Any) -> None:
    own = hooks.app().test_client()
    answer = own.post("/v1/models/downloads", json={"repo_id": "a/b", "webhook": "http://192.168.1.1/"})
    assert answer.status_code == 422 and answer.get_json()["error"]["code"] == "invalid_webhook"
    answer = own.post(
        "/v1/batches", json={"requests": [{"custom_id": "a", "body": {"prompt": "x"}}], "webhook": "http://10.0.0.1/"}
    )
    assert answer.status_code == 422 and answer.get_json()["error"]["param"] == "webhook"
    line = {"custom_id": "a", "body": {"prompt": "x", "webhook": "http://127.0.0.1/"}}
    batch = own.post("/v1/batches", json={"requests": [line]}).get_json()
    out = own.get(f"/v1/batches/{batch['id']}/results").get_data(as_text=True)
    assert json.loads(out)["error"]["param"] == "body.webhook"
    answer = http.post("/v1/jobs", json={"prompt": "x", "webhook": "http://127.0.0.1/"})  # no secret there
    assert answer.status_code == 422 and "not enabled" in answer.get_json()["error"]["message"]


def test_retry_rules() -> None:
    from qwen_deploy.webhooks import Attempt, next_delay

    schedule = [5.0, 30.0, 120.0]
    assert next_delay(Attempt(204, 1.0), 1, schedule) is None
    assert next_delay(Attempt(503, 1.0), 1, schedule) == 5.0
    assert next_delay(Attempt(None, 1.0, "timeout: TimeoutError"), 2, schedule) == 30.0
    assert next_delay(Attempt(None, 1.0, "dns: cannot resolve"), 3, schedule) == 120.0
    assert next_delay(Attempt(500, 1.0), 4, schedule) is None  # schedule used up
    assert next_delay(Attempt(429, 1.0, None, 7.0), 1, schedule) == 7.0  # Retry-After wins
    assert next_delay(Attempt(429, 1.0, None, 99999.0), 1, schedule) == 120.0  # capped
    for final in (410, 404, 400, 301):
        assert next_delay(Attempt(final, 1.0), 1, schedule) is None
    assert next_delay(Attempt(None, 1.0, "refused: private address"), 1, schedule) is None


def test_signature_matches_the_reference_library() -> None:
    from datetime import UTC, datetime

    from qwen_deploy.webhooks import sign

    ours = sign(SECRET, "msg_1", 1700000000, '{"a": 1}')
    assert ours == Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(1700000000, UTC), '{"a": 1}')


def test_a_slow_answer_is_cut_at_the_timeout() -> None:
    from qwen_deploy.webhooks import post

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def drip() -> None:  # one byte of the status line at a time: no socket read ever times out
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\n":
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        return
                    threading.Event().wait(0.1)

        threading.Thread(target=drip, daemon=True).start()
        attempt = post(f"http://127.0.0.1:{server.getsockname()[1]}/", "{}", {}, 0.5, ["127.0.0.1"])
    assert attempt.status_code is None and attempt.error is not None and attempt.error.startswith("timeout")
    assert 400 <= attempt.duration_ms < 1500


def test_https_verifies_the_certificate(tmp_path: Path) -> None:
    import ssl
    import subprocess

    from qwen_deploy.webhooks import post

    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(tmp_path / "k.pem"),
            "-out",
            str(tmp_path / "c.pem"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    r = Receiver()
    r.server.socket = context.wrap_socket(r.server.socket, server_side=True)
    try:
        attempt = post(f"https://127.0.0.1:{r.port}/tls", "{}", {}, 5.0, ["127.0.0.1"])
    finally:
        r.stop()
    assert attempt.status_code is None and "CERTIFICATE_VERIFY_FAILED" in (attempt.error or "")
