"""Request bodies are read under a deadline and a per-key cap, so that clients which announce a body and never
finish it cannot hold the web process's connections (and with them `/livez` and every other key's submit).

- `web.body_timeout`: seconds from the start of a request to the end of its body. Past it the read stops with
  408 `body_timeout` and the connection closes (the body was cut off, so it cannot be reused). Under
  gevent (the default) the deadline covers the whole body; under gthread each wait for data is bounded.
- `web.max_body_reads_per_key`: bodies one key may have in transit at once in one web process; past it 429
  `too_many_body_reads` before any byte of the body is read, and the connection closes. All keys together may
  have three quarters of the process's connections (gevent) or threads (gthread) in transit, so probes and
  bodiless reads always find one.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, g, request

from qwen_deploy.config import Settings
from qwen_deploy.errors import AppError, TooManyRequests
from web.auth import current_owner


class BodyTimeout(AppError):
    status_code, code = 408, "body_timeout"


@functools.cache
def _gevent_timeout() -> Any:
    """gevent's Timeout when gevent patched the sockets (gunicorn's gevent worker), else None."""
    try:
        from gevent import Timeout, monkey  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    return Timeout if monkey.is_module_patched("socket") else None


def close_after(stream: Any, sock: Any) -> None:
    """Have gunicorn close the connection after this response instead of draining the unread body first (for
    up to its keep-alive time, holding a connection): it closes one whose body read `failed`. Under gthread its
    close lingers (on its one main thread, up to 2 s) for the client to close first unless nothing more can be
    read, so the read side is shut down too."""
    if hasattr(stream, "failed"):
        stream.failed = True
    if sock is not None and _gevent_timeout() is None:
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already gone


class Slots:
    """Bodies in transit per owner in this process, and in all."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key, self.total, self.held = per_key, total, 0
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def take(self, owner: str) -> str | None:
        """None when a slot was taken, else why not."""
        with self.lock:
            held = self.counts.get(owner, 0)
            if held >= self.per_key:
                return f"this key has {held} request bodies in transit; finish one first"
            if self.held >= self.total:
                return "the server is receiving too many request bodies; try again shortly"
            self.counts[owner], self.held = held + 1, self.held + 1
            return None

    def give(self, owner: str) -> None:
        with self.lock:
            self.held -= 1
            left = self.counts.get(owner, 0) - 1
            if left > 0:
                self.counts[owner] = left
            else:
                self.counts.pop(owner, None)


class TimedInput:
    """`wsgi.input` read under a deadline; `done` is called once, when the body has been read or failed."""

    def __init__(self, stream: Any, sock: Any, timeout: float, length: int | None, done: Callable[[], None]) -> None:
        self.stream, self.sock, self.timeout, self.left = stream, sock, timeout, length
        self.deadline = time.monotonic() + timeout
        self.done: Callable[[], None] | None = done
        self.gevent_timeout = _gevent_timeout()

    def _finish(self) -> None:
        done, self.done = self.done, None
        if done is not None:
            done()

    def _call(self, method: str, size: int) -> Any:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._late()
        read = getattr(self.stream, method)
        try:
            if self.gevent_timeout is not None:
                with self.gevent_timeout(remaining, False):
                    return self._count(read(size))
                raise TimeoutError
            if self.sock is None:
                return self._count(read(size))
            before = self.sock.gettimeout()
            self.sock.settimeout(remaining)
            try:
                return self._count(read(size))
            finally:
                self.sock.settimeout(before)
        except TimeoutError:
            raise self._late() from None
        except BaseException:
            self._finish()
            raise

    def _late(self) -> BodyTimeout:
        self._finish()
        close_after(self.stream, self.sock)
        return BodyTimeout(
            f"the request body did not arrive within {self.timeout:g} s (web.body_timeout)", param="body"
        )

    def _count(self, data: Any) -> Any:
        size = sum(map(len, data)) if isinstance(data, list) else len(data)
        if self.left is not None:
            self.left -= size
        if not size or (self.left is not None and self.left <= 0):
            self._finish()
        return data

    def read(self, size: int | None = -1) -> bytes:
        return bytes(self._call("read", -1 if size is None else size))

    def readline(self, size: int | None = -1) -> bytes:
        return bytes(self._call("readline", -1 if size is None else size))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(self._call("readlines", -1 if hint is None else hint))

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


def _has_body() -> bool:
    length = request.content_length
    return bool(length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def register(app: Flask, settings: Settings) -> None:
    """After the key check: a body to come takes one of the owner's slots and is read under the deadline."""
    web = settings.web
    room = web.worker_connections if web.worker_class == "gevent" else web.threads
    slots = Slots(web.max_body_reads_per_key, max(1, room * 3 // 4))

    @app.before_request
    def _guard_body() -> None:
        if not _has_body():
            return
        owner = current_owner()
        refusal = slots.take(owner)
        if refusal is not None:
            close_after(request.environ["wsgi.input"], request.environ.get("gunicorn.socket"))
            raise TooManyRequests(refusal, code="too_many_body_reads", headers={"Retry-After": "1"})
        g.body_slot = owner

        def release() -> None:
            if g.pop("body_slot", None) is not None:
                slots.give(owner)

        environ = request.environ
        environ["wsgi.input"] = TimedInput(
            environ["wsgi.input"],
            environ.get("gunicorn.socket"),
            web.body_timeout,
            request.content_length,
            release,
        )

    @app.teardown_request
    def _release_body(_exc: BaseException | None) -> None:
        owner = g.pop("body_slot", None)
        if owner is not None:
            slots.give(owner)
