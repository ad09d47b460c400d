"""The reserved liveness listener (`web.probe_port`): its answers, and a real listener on a loopback port."""

from __future__ import annotations

import json
import socket
import time

from qwen_deploy.cli.redis_server import free_port
from web import probe


def _status(raw: bytes) -> tuple[int, dict[str, object]]:
    head, body = raw.split(b"\r\n\r\n", 1)
    return int(head.split(b" ")[1]), json.loads(body)


def test_answers_livez_and_nothing_else() -> None:
    beat = probe.Beat()
    assert _status(probe.answer(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n", beat)) == (200, {"status": "ok"})
    assert _status(probe.answer(b"GET /livez?x=1 HTTP/1.0\r\n\r\n", beat))[0] == 200
    code, body = _status(probe.answer(b"GET /v1/jobs HTTP/1.1\r\n\r\n", beat))
    assert code == 404 and body["error"]["code"] == "not_found"  # type: ignore[index]
    assert _status(probe.answer(b"POST /livez HTTP/1.1\r\n\r\n", beat))[0] == 405
    assert _status(probe.answer(b"\x16\x03\x01 garbage", beat))[0] == 400


def test_a_stalled_event_loop_fails_the_probe() -> None:
    beat = probe.Beat()
    beat.last = time.monotonic() - 45
    code, body = _status(probe.answer(b"GET /livez HTTP/1.1\r\n\r\n", beat, stale_after=30))
    assert code == 503 and body["error"]["code"] == "event_loop_stalled"  # type: ignore[index]
    beat.last = time.monotonic()
    assert _status(probe.answer(b"GET /livez HTTP/1.1\r\n\r\n", beat, stale_after=30))[0] == 200


def test_a_listener_answers_on_its_port() -> None:
    port = free_port()
    listener = probe.start("127.0.0.1", port)
    try:
        for _ in range(2):  # one connection after another
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                raw = b""
                while chunk := conn.recv(4096):
                    raw += chunk
            assert _status(raw) == (200, {"status": "ok"})
    finally:
        listener.close()
