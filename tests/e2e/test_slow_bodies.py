"""Clients that announce a request body and never finish it cannot freeze the web server: past the per-key cap
they get 429 at once, within it 408 at the body deadline, and meanwhile /livez (on the main port and on the
reserved `web.probe_port`) and another key's submit answer
(gunicorn as `up` runs it, with either worker class; real redis-server, no worker)."""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from qwen_deploy.cli.redis_server import free_port
from tests.conftest import StackFactory
from tests.helpers import Stack

K1, K2 = "k-slow-one", "k-slow-two"
CONNECTIONS = 200  # gevent connections of the one web process (gthread: 16 threads)
SLOW = 300  # more than it has: without a deadline and a cap they would hold every one
PER_KEY, BODY_TIMEOUT = 10, 3.0


@pytest.fixture(scope="module", params=["gevent", "gthread"])
def web(stack_factory: StackFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    config = {
        "web": {
            "api_keys": [K1, K2],
            "worker_class": request.param,
            "worker_connections": CONNECTIONS,
            "body_timeout": BODY_TIMEOUT,
            "max_body_reads_per_key": PER_KEY,
            "probe_port": free_port(),
        }
    }
    stack = stack_factory(config, name=f"slow-bodies-{request.param}")
    stack.start_web()
    yield stack


def slow_request(url: str) -> socket.socket:
    """A submit that announces 1000 bytes of body and sends 12."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {K1}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"prompt": "')
    sock.setblocking(False)
    return sock


def answers(socks: list[socket.socket], timeout: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it (or the deadline passed)."""
    got = {sock: b"" for sock in socks}
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    open_ = len(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if chunk:
                got[sock] += chunk
            else:
                selector.unregister(sock)
                open_ -= 1
    selector.close()
    return got


def test_slow_bodies_leave_livez_and_other_keys_answering(web: Stack) -> None:
    socks = [slow_request(web.url) for _ in range(SLOW)]
    try:
        assert requests.get(web.url + "/livez", timeout=20).status_code == 200
        # the reserved probe port answers from a thread of each web process, outside the flooded pool
        probe_port = web.deployment.settings().web.probe_port
        reserved = requests.get(f"http://127.0.0.1:{probe_port}/livez", timeout=20)
        assert (reserved.status_code, reserved.json()) == (200, {"status": "ok"})
        submitted = requests.post(
            web.url + "/v1/jobs", json={"prompt": "x"}, headers={"Authorization": f"Bearer {K2}"}, timeout=20
        )
        assert submitted.status_code == 202, submitted.text
        got = answers(socks, BODY_TIMEOUT + 60)
    finally:
        for sock in socks:
            sock.close()
    statuses = [raw.split(b" ", 2)[1].decode() if raw.startswith(b"HTTP/1.1 ") else "closed" for raw in got.values()]
    assert set(statuses) <= {"408", "429", "closed"}, statuses
    assert statuses.count("408") >= 1 and statuses.count("429") >= 1, statuses
    timed_out = next(raw for raw in got.values() if raw.startswith(b"HTTP/1.1 408"))
    assert b'"code":"body_timeout"' in timed_out.replace(b" ", b"")
    capped = next(raw for raw in got.values() if raw.startswith(b"HTTP/1.1 429"))
    assert b'"code":"too_many_body_reads"' in capped.replace(b" ", b"")
    # a body that arrives whole is still read
    ok = requests.post(
        web.url + "/v1/jobs", json={"prompt": "y"}, headers={"Authorization": f"Bearer {K1}"}, timeout=20
    )
    assert ok.status_code == 202, ok.text
