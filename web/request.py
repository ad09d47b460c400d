"""The request class: a body of unknown length (chunked, the server ends the stream) over the limit is a
413, never a body cut at the limit and accepted as if it were whole."""

from __future__ import annotations

from typing import IO

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream, get_content_length


class CappedStream(LimitedStream):
    """Reads up to one byte past `cap`: that byte is the proof of a body over the limit (werkzeug's own
    maximum stops at the limit and reads no further, so it cannot tell a body of exactly `cap` bytes from a
    longer one)."""

    def __init__(self, stream: IO[bytes], cap: int) -> None:
        super().__init__(stream, cap + 1, is_max=True)
        self.cap = cap

    def readinto(self, b: bytearray) -> int | None:  # type: ignore[override]
        n = super().readinto(b)
        if self._pos > self.cap:
            raise RequestEntityTooLarge()
        return n


class CappedRequest(Request):
    @cached_property
    def stream(self) -> IO[bytes]:
        environ, cap = self.environ, self.max_content_length
        if (
            self.shallow
            or cap is None
            or "wsgi.input_terminated" not in environ
            or get_content_length(environ) is not None
        ):
            return super().stream  # werkzeug's checks: a declared length, no limit, or a shallow request
        return CappedStream(environ["wsgi.input"], cap)  # type: ignore[return-value]
