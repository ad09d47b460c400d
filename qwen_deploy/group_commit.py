"""Group commit: script calls that many request handlers make at the same time reach Redis in one write.

A caller that finds no round trip in flight yields once (one turn of gevent's loop, or of the GIL) and
sends its call with those that joined meanwhile, so a lone request waits for nothing. Calls that arrive
while a round trip is in flight queue up; when it returns, the first of them sends all of them in one
write. Under load this turns N round trips (N sends and reads here, N wake-ups and
socket reads in Redis, all on the same cores) into one, without a timer. Each call is still its own
script run, atomic on its own; only the transport is shared. Works with threads and with gevent's
patched `threading` (gunicorn's gevent worker) alike.

The round trips go over one connection of the group's own (only the leader of a round trip uses it), with
redis-py's public pipelining calls (`pack_commands`, `send_packed_command`, `read_response`; replies parsed by
hiredis), not its per-command path, which costs more CPU than the round trip itself. (A hand-written RESP
packer and reader measured the same: bench/submit_bench.py, 2,968-3,160 against 2,976-3,056 submits/s.)
A script Redis no longer has (NOSCRIPT) and a demoted master (READONLY) take redis-py's
path for that call; a lost connection fails the calls of its round trip as redis-py's errors, and a lone
call is tried again only where redis-py would have (a client configured with retries).
"""

from __future__ import annotations

import builtins
import os
import threading
import time
from typing import Any

from redis.exceptions import (
    ConnectionError,
    DataError,
    InvalidResponse,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
)

IDLE_S = 25.0  # a connection unused this long is made again before the next round trip


class _Call:
    __slots__ = ("script", "keys", "args", "done", "result", "error", "lead")

    def __init__(self, script: Any, keys: list[Any], args: list[Any]) -> None:
        self.script, self.keys, self.args = script, keys, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.lead = False  # woken to send the next group, not with a result


class GroupCommit:
    """Runs registered redis-py scripts (`client.register_script`) for concurrent callers, grouped."""

    def __init__(self, client: Any, max_group: int = 64) -> None:
        self.client = client
        self.max_group = max_group
        self._lock = threading.Lock()
        self._queue: list[_Call] = []
        self._busy = False
        self.calls = self.groups = self.largest = 0  # how well it groups (for tests and benchmarks)
        self._conn: Any = None
        self._pid = 0
        self._used = 0.0

    def __call__(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        call = _Call(script, keys, args)
        with self._lock:
            self._queue.append(call)
            lead = not self._busy
            self._busy = True
        try:
            if lead:
                time.sleep(0)  # one turn of the loop: callers ready in it join this round trip
            else:
                call.done.wait()
        except BaseException:  # killed before its call was sent: neither the call nor the lead is left behind
            self._withdraw(call, lead)
            raise
        if lead or call.lead:
            self._lead()
        if call.error is not None:
            raise call.error
        return call.result

    def _withdraw(self, call: _Call, leading: bool) -> None:
        """A caller killed while it waited or yielded: its call, if not yet taken into a round trip, leaves
        the queue (so the lead is never handed to it), and a leader hands the lead to the next waiter."""
        with self._lock:
            if call in self._queue:
                self._queue.remove(call)
            if not (leading or call.lead):
                return
            following = self._next_leader()
        if following is not None:
            following.done.set()

    def _next_leader(self) -> _Call | None:
        """With the lock held: the first queued call, marked to lead the next round trip (None: idle)."""
        following = self._queue[0] if self._queue else None
        self._busy = following is not None
        if following is not None:
            following.lead = True  # under the lock: a caller withdrawing sees it
        return following

    def _lead(self) -> None:
        """Send the queued calls (the leader's own among them), then hand over to the next waiter."""
        with self._lock:
            group, self._queue = self._queue[: self.max_group], self._queue[self.max_group :]
            self.calls, self.groups = self.calls + len(group), self.groups + 1
            self.largest = max(self.largest, len(group))
        try:
            self._send(group)
        except BaseException:  # killed mid-send (a greenlet's exit): nobody waits for an answer forever
            for call in group:
                if call.result is None and call.error is None:
                    call.error = ConnectionError("the round trip carrying this call was interrupted")
            raise
        finally:
            with self._lock:
                following = self._next_leader()
            for call in group:
                call.done.set()
            if following is not None:
                following.done.set()

    def _connection(self) -> Any:
        """The connection only the leader of a round trip uses (one per process: made after a fork). One
        idle for IDLE_S is made again first (redis-py checks a pooled one after 30 s idle the same way), so
        a connection Redis or a proxy dropped while idle never fails a submit."""
        now = time.monotonic()
        if self._conn is None or self._pid != os.getpid():
            self._conn, self._pid = self.client.connection_pool.make_connection(), os.getpid()
        elif now - self._used > IDLE_S:
            self._conn.disconnect()
        self._conn.connect()  # a no-op while connected
        self._used = now
        return self._conn

    def _send(self, group: list[_Call]) -> None:
        """Every call's EVALSHA in one write, then one reply per call, on the leaders' own connection."""
        conn = None
        try:
            conn = self._connection()
            commands = [("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args) for c in group]
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            for call in group:
                try:
                    call.result = conn.read_response()
                except ResponseError as reply:  # this call's error (NOSCRIPT, READONLY, a script's own)
                    call.error = reply
        except BaseException as raw:  # a reply may be left unread: the connection carries no other round trip
            if conn is not None:
                conn.disconnect()
            if not isinstance(raw, (ConnectionError, TimeoutError, InvalidResponse, DataError, OSError)):
                raise  # killed mid-read (a greenlet's exit), or a reply that does not parse
            exc = _as_redis_error(raw)  # what redis-py raises: the web answers those 503
            if len(group) == 1 and _retried(self.client, exc):  # as redis-py would: again, with the client's retries
                group[0].error = None
                self._plain(group[0])
                return
            for call in group:  # as a failed pipeline: every call of the group fails
                if call.result is None and call.error is None:
                    call.error = exc
            return
        for call in group:
            if isinstance(call.error, NoScriptError | ReadOnlyError):  # scripts flushed; a master demoted
                if isinstance(call.error, ReadOnlyError):
                    conn.disconnect()  # the next round trip asks for the master again
                call.error = None
                self._plain(call)

    @staticmethod
    def _plain(call: _Call) -> None:
        """redis-py's own script call: loads a missing script, retries as the client is configured."""
        try:
            call.result = call.script(keys=call.keys, args=call.args)
        except Exception as exc:
            call.error = exc


def _retried(client: Any, exc: BaseException) -> bool:
    """Whether redis-py's own call would have tried again after `exc` (a client configured with retries)."""
    retry = client.get_retry() or client.connection_pool.connection_kwargs.get("retry")
    return bool(retry and retry.get_retries() > 0 and isinstance(exc, (ConnectionError, TimeoutError)))


def _as_redis_error(exc: BaseException) -> BaseException:
    """A socket error as redis-py's exception for it (a timeout, a lost connection)."""
    if not isinstance(exc, OSError):
        return exc
    if isinstance(exc, builtins.TimeoutError):
        return TimeoutError(f"Timeout reading from Redis: {exc}")
    return ConnectionError(f"Error talking to Redis: {exc}")
