"""The submit path's own Redis protocol code (qwen_deploy/resp.py) against a real redis-server: every reply
type a script returns, in RESP2 and RESP3, decoded and not, long and odd values, and error replies."""

from __future__ import annotations

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.group_commit import GroupCommit
from qwen_deploy.resp import pack_evalsha

KINDS = """
local kind = ARGV[1]
if kind == 'int' then return 42 end
if kind == 'negative' then return -7 end
if kind == 'nil' then return false end
if kind == 'status' then return {ok = 'FINE'} end
if kind == 'error' then return redis.error_reply('ERR something is wrong') end
if kind == 'nested' then return {'a', 1, {'b', {'c'}}, false} end
if kind == 'empty' then return {} end
return ARGV[2]
"""

ODD = ["", "line\r\nbreak", "$3\r\nfoo", "*1\r\n", "zażółć gęślą jaźń ✓ 🚀", "x" * 300_000]


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    return int(request.param)


def client(server: RedisServer, protocol: int, decode: bool) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=decode, protocol=protocol)


@pytest.mark.parametrize("decode", [True, False])
def test_every_reply_type_reads_as_redis_py_reads_it(server: RedisServer, protocol: int, decode: bool) -> None:
    r = client(server, protocol, decode)
    script = r.register_script(KINDS)
    commit = GroupCommit(r)
    for kind in ["int", "negative", "nil", "status", "nested", "empty"]:
        assert commit(script, [], [kind]) == script(keys=[], args=[kind]), kind
    for value in ODD:
        expected = value if decode else value.encode()
        assert commit(script, [], ["text", value]) == expected
    with pytest.raises(redis.ResponseError, match="something is wrong"):
        commit(script, [], ["error"])
    assert commit(script, [], ["int"]) == 42  # the connection is in step after an error reply


def test_arguments_arrive_byte_for_byte(server: RedisServer, protocol: int) -> None:
    r = client(server, protocol, False)
    script = r.register_script("return {KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]}")
    assert GroupCommit(r)(script, ["k:ü"], [7, 0.1, b"\x00\xffraw\r\n", "✓"]) == [
        "k:ü".encode(),
        b"7",
        b"0.1",
        b"\x00\xffraw\r\n",
        "✓".encode(),
    ]


def test_a_packed_call_is_the_command_redis_py_sends(server: RedisServer) -> None:
    r = redis.Redis.from_url(server.url)
    packed = pack_evalsha("a" * 40, ["k1", "k2"], ["v", 3, 1.5])
    assert packed == b"".join(
        r.connection_pool.make_connection().pack_command("EVALSHA", "a" * 40, 2, "k1", "k2", "v", 3, 1.5)
    )
    with pytest.raises(redis.DataError):
        pack_evalsha("a" * 40, [], [True])  # as redis-py: a bool is not an argument
