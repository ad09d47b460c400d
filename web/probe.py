"""A liveness listener outside the web server's connection pool: `web.probe_port`.

`/livez` on the main port shares its accept queue and event loop with every client, so a flood of connections
(thousands of slow bodies arriving at once) delays it by the time the loop needs to accept them all. A kubelet
that restarts a process after a few slow probes would then restart a healthy server under attack. With
`web.probe_port` set, each web process also answers `GET /livez` on that port from an operating-system thread of
its own (a real thread even under gevent's monkey patching), with its own listening socket (`SO_REUSEPORT`, so
every process of the server binds it). The answer does not wait for the event loop, yet still says whether the
loop is alive: under gevent a greenlet ticks every second, and the probe answers 503 `event_loop_stalled` when
the last tick is older than `stale_after` seconds.

One connection at a time, a request line and headers of at most 4 KiB within 2 s, `Connection: close`: put the
port on an interface only the orchestrator reaches.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

STALE_AFTER = 30.0  # seconds without an event-loop tick before the probe answers 503
_READ_TIMEOUT = 2.0
_MAX_HEAD = 4096


class Beat:
    """When the event loop last ran a tick (monotonic seconds); None: no loop to watch (threads)."""

    def __init__(self) -> None:
        self.last: float | None = None

    def stalled_for(self) -> float:
        return 0.0 if self.last is None else max(0.0, time.monotonic() - self.last)


def answer(head: bytes, beat: Beat, stale_after: float = STALE_AFTER) -> bytes:
    """The whole HTTP response to a request whose line and headers are `head`."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        return _response(400, {"error": {"message": "not an HTTP request", "code": "bad_request"}})
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != b"/livez":
        return _response(404, {"error": {"message": "this port answers GET /livez only", "code": "not_found"}})
    if method not in (b"GET", b"HEAD"):
        return _response(405, {"error": {"message": "use GET", "code": "method_not_allowed"}})
    stalled = beat.stalled_for()
    if stalled > stale_after:
        message = f"the web process's event loop has not run for {stalled:.0f} s"
        return _response(503, {"error": {"message": message, "code": "event_loop_stalled"}})
    return _response(200, {"status": "ok"})


def _response(status: int, body: dict[str, Any]) -> bytes:
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def _originals() -> tuple[Any, Any, bool]:
    """The socket module's `socket` class and `_thread.start_new_thread` as they were before gevent patched them,
    and whether gevent patched them."""
    import _thread
    import socket

    try:
        from gevent import monkey  # type: ignore[import-untyped]
    except ImportError:
        return socket.socket, _thread.start_new_thread, False
    if not monkey.is_module_patched("socket"):
        return socket.socket, _thread.start_new_thread, False
    return monkey.get_original("socket", "socket"), monkey.get_original("_thread", "start_new_thread"), True


def _serve(listener: Any, beat: Beat, stale_after: float) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the listener was closed
        try:
            conn.settimeout(_READ_TIMEOUT)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                chunk = conn.recv(_MAX_HEAD)
                if not chunk:
                    break
                head += chunk
            if head:
                conn.sendall(answer(head, beat, stale_after))
        except OSError:
            pass
        finally:
            conn.close()


def _tick(beat: Beat) -> None:
    import gevent

    while True:
        beat.last = time.monotonic()
        gevent.sleep(1.0)


def start(host: str, port: int, stale_after: float = STALE_AFTER) -> Any:
    """Listen on `host`:`port` and answer probes from a thread of its own; the listening socket."""
    import socket as socket_module

    socket_cls, start_thread, patched = _originals()
    family = socket_module.AF_INET6 if ":" in host else socket_module.AF_INET
    listener = socket_cls(family, socket_module.SOCK_STREAM)
    listener.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
    if hasattr(socket_module, "SO_REUSEPORT"):
        listener.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEPORT, 1)
    listener.bind((host.strip("[]"), port))
    listener.listen(64)
    beat = Beat()
    if patched:
        import gevent

        beat.last = time.monotonic()
        gevent.spawn(_tick, beat)
    start_thread(_serve, (listener, beat, stale_after))
    log.info("probe.listening host=%s port=%d", host, port)
    return listener
