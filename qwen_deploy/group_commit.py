"""Group commit: script calls that many request handlers make at the same time reach Redis as one pipeline.

A caller that finds no round trip in flight sends its call at once, so a lone request waits for nothing.
Calls that arrive while a round trip is in flight queue up; when it returns, the first of them sends all
of them in one pipeline. Under load this turns N round trips (N sends and reads here, N wake-ups and
socket reads in Redis, all on the same cores) into one, without a timer. Each call is still its own
script run, atomic on its own; only the transport is shared. Works with threads and with gevent's
patched `threading` (gunicorn's gevent worker) alike.
"""

from __future__ import annotations

import threading
from typing import Any

from redis.exceptions import NoScriptError


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

    def __call__(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        call = _Call(script, keys, args)
        with self._lock:
            self._queue.append(call)
            lead = not self._busy
            self._busy = True
        if not lead:
            call.done.wait()
        if lead or call.lead:
            self._lead()
        if call.error is not None:
            raise call.error
        return call.result

    def _lead(self) -> None:
        """Send the queued calls (the leader's own among them), then hand over to the next waiter."""
        with self._lock:
            group, self._queue = self._queue[:self.max_group], self._queue[self.max_group:]
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
                following = self._queue[0] if self._queue else None
                self._busy = following is not None
            for call in group:
                call.done.set()
            if following is not None:
                following.lead = True
                following.done.set()

    def _send(self, group: list[_Call]) -> None:
        if len(group) == 1:  # a lone call: the plain path (redis-py loads a missing script itself)
            one = group[0]
            try:
                one.result = one.script(keys=one.keys, args=one.args)
            except Exception as exc:
                one.error = exc
            return
        pipe = self.client.pipeline(transaction=False)
        for call in group:
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        try:
            replies = pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every call of the group fails as a lone one would
            for call in group:
                call.error = exc
            return
        for call, reply in zip(group, replies):
            if isinstance(reply, NoScriptError):  # Redis restarted or flushed its scripts: the plain path
                try:
                    reply = call.script(keys=call.keys, args=call.args)
                except Exception as exc:
                    reply = exc
            if isinstance(reply, Exception):
                call.error = reply
            else:
                call.result = reply
