"""Group commit on a real redis-server: concurrent script calls share round trips, each gets its own answer."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from qwen_deploy import group_commit
from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.group_commit import GroupCommit
from tests.helpers import wait_until

ECHO = """
if ARGV[1] == 'bad' then return redis.error_reply('ERR bad argument') end
redis.call('RPUSH', KEYS[1], ARGV[1])
return ARGV[1]
"""


@pytest.fixture()
def client(server: RedisServer) -> redis.Redis:
    r = redis.Redis.from_url(server.url, decode_responses=True)
    r.flushdb()
    return r


def run_together(
    commit: GroupCommit, script: Any, client: redis.Redis, values: list[str], pause_ms: int = 1000
) -> dict[str, Any]:
    """One call is in flight while Redis is paused; the others queue meanwhile, then run."""
    answers: dict[str, Any] = {}

    def one(value: str) -> None:
        try:
            answers[value] = commit(script, ["out"], [value])
        except Exception as exc:
            answers[value] = exc

    client.client_pause(pause_ms)  # Redis holds every command: the first call stays in flight
    first = threading.Thread(target=one, args=("first",))
    first.start()
    wait_until(lambda: commit._busy, 10, 0.001, "the first call in flight")
    threads = [threading.Thread(target=one, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in [first, *threads]:
        t.join(timeout=60)
    return answers


def test_calls_made_during_a_round_trip_go_together_and_each_gets_its_answer(client: redis.Redis) -> None:
    commit = GroupCommit(client)
    script = client.register_script(ECHO)
    values = [f"v{i}" for i in range(12)]
    answers = run_together(commit, script, client, values)
    assert answers == {"first": "first", **{v: v for v in values}}
    assert sorted(client.lrange("out", 0, -1)) == sorted(["first", *values])
    assert commit.calls == 13 and commit.groups <= 4 and commit.largest >= 6, (commit.groups, commit.largest)


def test_an_error_reaches_only_its_caller(client: redis.Redis) -> None:
    commit = GroupCommit(client)
    script = client.register_script(ECHO)
    answers = run_together(commit, script, client, ["a", "bad", "b"])
    assert answers["first"] == "first" and answers["a"] == "a" and answers["b"] == "b"
    assert isinstance(answers["bad"], redis.ResponseError) and "bad argument" in str(answers["bad"])
    assert sorted(client.lrange("out", 0, -1)) == ["a", "b", "first"]


def test_scripts_flushed_from_redis_are_loaded_again(client: redis.Redis) -> None:
    commit = GroupCommit(client)
    script = client.register_script(ECHO)
    assert commit(script, ["out"], ["warm"]) == "warm"
    client.script_flush()
    answers = run_together(commit, script, client, ["x", "y", "z"])
    assert answers == {"first": "first", "x": "x", "y": "y", "z": "z"}
    assert commit.largest >= 2  # the grouped path met NOSCRIPT, not only the lone one


def test_a_lost_connection_fails_every_call_of_its_group_and_the_next_call_works(server: RedisServer) -> None:
    r = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=0.5)
    r.flushdb()
    commit = GroupCommit(r)
    script = r.register_script(ECHO)
    # paused for 3 s: the first call's round trip and the next one's both outlast the 0.5 s socket timeout
    answers = run_together(commit, script, r, ["p", "q"], pause_ms=3000)
    assert all(isinstance(a, redis.RedisError) for a in answers.values()), answers

    def awake() -> bool:
        try:
            return bool(r.ping())
        except redis.RedisError:  # still paused: a ping times out too
            return False

    wait_until(awake, 20, 0.05, "Redis awake")
    assert commit(script, ["out"], ["after"]) == "after" and not commit._busy


class _Interrupted(BaseException):
    """What a greenlet's kill raises inside a read."""


def test_a_round_trip_interrupted_mid_read_never_hands_its_reply_to_the_next_call(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = GroupCommit(client)
    script = client.register_script(ECHO)
    assert commit(script, ["out"], ["warm"]) == "warm"

    def interrupted(*_: Any, **__: Any) -> Any:
        raise _Interrupted

    monkeypatch.setattr(commit._conn, "read_response", interrupted)  # the leader's connection, made above
    with pytest.raises(_Interrupted):
        commit(script, ["out"], ["first"])  # sent, its reply left unread on the connection
    monkeypatch.undo()
    assert commit(script, ["out"], ["second"]) == "second" and not commit._busy
    assert client.lrange("out", 0, -1) == ["warm", "first", "second"]


def test_a_connection_redis_dropped_while_idle_is_made_again(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(group_commit, "IDLE_S", 0.05)
    commit = GroupCommit(client)
    script = client.register_script(ECHO)
    assert commit(script, ["out"], ["before"]) == "before"
    killed = client.client_kill_filter(_type="normal", skipme=True)  # what a server `timeout` does to idle clients
    assert killed >= 1
    time.sleep(0.1)  # idle past IDLE_S
    assert commit(script, ["out"], ["after"]) == "after"
    assert client.lrange("out", 0, -1) == ["before", "after"]


def test_a_leader_interrupted_before_sending_hands_the_lead_to_the_next_caller(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader yields once before it sends; killed there, its call is withdrawn (never sent) and a caller
    that queued behind it sends its own call instead of waiting forever."""
    commit = GroupCommit(client)
    script = client.register_script(ECHO)
    answers: dict[str, Any] = {}
    behind = threading.Thread(target=lambda: answers.update(behind=commit(script, ["out"], ["behind"])))

    real_sleep = time.sleep

    def interrupted_yield(seconds: float) -> None:
        if seconds:  # wait_until's polls
            return real_sleep(seconds)
        behind.start()
        wait_until(lambda: len(commit._queue) == 2, 10, 0.001, "a second caller queued")
        raise _Interrupted

    monkeypatch.setattr(group_commit.time, "sleep", interrupted_yield)
    with pytest.raises(_Interrupted):
        commit(script, ["out"], ["withdrawn"])
    monkeypatch.undo()
    behind.join(timeout=30)
    assert answers == {"behind": "behind"} and not commit._busy and commit._queue == []
    assert client.lrange("out", 0, -1) == ["behind"]
    assert commit(script, ["out"], ["next"]) == "next"


def test_a_caller_interrupted_while_queued_leaves_the_queue_and_the_group_goes_on(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller killed while its call waits for the round trip in flight is taken out of the queue: the
    lead is never handed to it, and the caller behind it is served."""

    class Event(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            if threading.current_thread().name == "interrupted":
                raise _Interrupted
            return super().wait(timeout)

    monkeypatch.setattr(group_commit.threading, "Event", Event)
    commit = GroupCommit(client)
    script = client.register_script(ECHO)
    answers: dict[str, Any] = {}

    def one(value: str) -> None:
        try:
            answers[value] = commit(script, ["out"], [value])
        except _Interrupted:
            answers[value] = "interrupted"

    client.client_pause(1000)  # the first call stays in flight while the others queue
    first = threading.Thread(target=one, args=("first",))
    first.start()
    wait_until(lambda: commit._busy, 10, 0.001, "the first call in flight")
    interrupted = threading.Thread(target=one, args=("interrupted",), name="interrupted")
    interrupted.start()
    interrupted.join(timeout=10)
    behind = threading.Thread(target=one, args=("behind",))
    behind.start()
    for t in (first, behind):
        t.join(timeout=30)
    assert answers == {"first": "first", "interrupted": "interrupted", "behind": "behind"}
    assert sorted(client.lrange("out", 0, -1)) == ["behind", "first"] and not commit._busy
