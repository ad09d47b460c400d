"""Webhook receivers are isolated: one tenant's deliveries stuck at a receiver that never answers hold at most
`webhooks.per_destination` senders, and another tenant's delivery goes out meanwhile (real redis-server,
generation and convert workers, gunicorn)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.test_webhooks import SECRET, Receiver, verified, webhook_stack
from tests.helpers import Stack, wait_until

KA, KB = "k-hooks-tenant-a", "k-hooks-tenant-b"
STUCK = 24


class Tarpit:
    """A loopback server that accepts every connection and never answers (holding each one open)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, stack: Stack) -> Iterator[Stack]:
    """The shared stack's Redis and generation worker; a web server with two keys and a convert worker whose
    attempts last up to a minute (a delivery at the tarpit stays stuck for the whole test)."""
    config = {
        "web": {"api_keys": [KA, KB]},
        "webhooks": {"secret": SECRET, "allowed_hosts": ["127.0.0.1"], "timeout": 120.0, "per_destination": 2},
    }
    yield from webhook_stack(tmp_path_factory.mktemp("hook-tenants"), demo_model, stack, config)


def submit(stack: Stack, key: str, webhook: str) -> str:
    answer = requests.post(
        stack.url + "/v1/jobs",
        json={"prompt": "Flat is better than", "max_new_tokens": 1, "webhook": webhook},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def attempts(stack: Stack, key: str, job_id: str) -> list[dict[str, Any]]:
    answer = requests.get(
        f"{stack.url}/v1/jobs/{job_id}/webhooks", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


def test_a_stuck_receiver_holds_up_only_its_own_deliveries(tenants: Stack) -> None:
    tarpit, receiver = Tarpit(), Receiver()
    try:
        stuck = [submit(tenants, KA, f"http://127.0.0.1:{tarpit.port}/a{i}") for i in range(STUCK)]
        wait_until(lambda: len(tarpit.conns) >= 2, 60, what="A's deliveries stuck at the tarpit")
        theirs = submit(tenants, KB, receiver.url("/b"))
        calls = wait_until(lambda: receiver.at("/b"), 60, what="B's delivery while A's are stuck")
        assert verified(calls[0])["data"]["id"] == theirs
        # A's are all still stuck: not one attempt has ended, and only two ever reached the tarpit
        assert all(attempts(tenants, KA, job_id) == [] for job_id in stuck)
        assert len(tarpit.conns) == 2
        due = tenants.redis.zrange("qd:webhooks:due", 0, -1)
        assert all(any(m.startswith(f"msg_{job_id}_completed") for m in due) for job_id in stuck)
        assert [a["status_code"] for a in attempts(tenants, KB, theirs)] == [200]
    finally:
        tarpit.close()
        receiver.stop()
