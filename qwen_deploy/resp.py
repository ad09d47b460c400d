"""The Redis protocol, both ways, for the one hot call (a submit's EVALSHA): packing a command and reading
its replies straight off a redis-py connection's socket. redis-py's own path spends more instructions on a
call than the round trip costs Redis; this one spends a fraction. RESP2 and RESP3 replies; bulk strings
decoded as the connection's client decodes them; error replies as redis-py's exception classes.
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError, DataError, InvalidResponse, ResponseError

CRLF = b"\r\n"


def encode(value: Any) -> bytes:
    """An argument as redis-py encodes it: bytes as they are, str as UTF-8, int and float by repr."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise DataError(f"invalid argument {type(value).__name__}: bytes, str, int or float only")


def pack_evalsha(sha: str, keys: list[Any], args: list[Any]) -> bytes:
    """EVALSHA sha numkeys key... arg... as one RESP array (str, the common case, encoded inline)."""
    parts = [p.encode() if p.__class__ is str else encode(p) for p in (*keys, *args)]
    count = b"%d" % len(keys)
    head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n$%d\r\n%b\r\n" % (len(parts) + 3, sha.encode(), len(count), count)
    return b"".join([head, *[b"$%d\r\n%b\r\n" % (len(p), p) for p in parts]])


class Replies:
    """Replies read off a connected redis-py connection's socket, one `next()` per command sent."""

    def __init__(self, conn: Any) -> None:
        self.sock = conn._sock
        self.decode = conn.encoder.decode_responses
        self.parse_error = conn._parser.parse_error
        self.buf = b""
        self.pos = 0

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("Redis closed the connection")
        self.buf = self.buf[self.pos :] + chunk
        self.pos = 0

    def _line(self) -> bytes:
        while (end := self.buf.find(CRLF, self.pos)) < 0:
            self._fill()
        line, self.pos = self.buf[self.pos : end], end + 2
        return line

    def _raw(self, size: int) -> bytes:
        while len(self.buf) - self.pos < size + 2:
            self._fill()
        data, self.pos = self.buf[self.pos : self.pos + size], self.pos + size + 2
        return data

    def _text(self, data: bytes) -> Any:
        return data.decode() if self.decode else data

    def next(self) -> Any:
        """The next reply: str/bytes, int, float, bool, None, list, dict, or a ResponseError (not raised)."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$" or kind == b"=":  # bulk string; verbatim string (RESP3) keeps its "txt:" prefix
            size = int(rest)
            return None if size < 0 else self._text(self._raw(size))
        if kind in (b"*", b"~", b">"):
            size = int(rest)
            return None if size < 0 else [self.next() for _ in range(size)]
        if kind == b":" or kind == b"(":  # integer; big number (RESP3)
            return int(rest)
        if kind == b"+":
            return self._text(rest)
        if kind == b"-" or kind == b"!":  # error; blob error (RESP3)
            message = rest if kind == b"-" else self._raw(int(rest))
            error: ResponseError = self.parse_error(message.decode(errors="replace"))
            return error
        if kind == b"_":
            return None
        if kind == b",":
            return float(rest)
        if kind == b"#":
            return rest == b"t"
        if kind == b"%":
            return {self.next(): self.next() for _ in range(int(rest))}
        raise InvalidResponse(f"unexpected reply type {kind!r}")
