"""The batch caps hold under concurrent creates: the per-key open-batch cap and the bulk queue depth are
checked and taken in one step (real redis-server, a threaded WSGI server, no worker)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import redis
import requests
from werkzeug.serving import make_server

from qwen_deploy.cli.redis_server import RedisServer
from tests.store.test_tenants import K1, K2, auth, make_app

BODY = {"requests": [{"custom_id": "a", "body": {"prompt": "x"}}]}


def burst(server: RedisServer, n: int, **limits: int) -> list[int]:
    """`n` batch creates at once from K1; their status codes."""
    redis.Redis.from_url(server.url).flushdb()
    app = make_app(server.url, web={"api_keys": [K1, K2]}, limits=limits)
    web = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{web.server_port}/v1/batches"
    start = threading.Barrier(n)

    def create(_: int) -> int:
        with requests.Session() as session:
            session.get(url.replace("/v1/batches", "/livez"), timeout=30)  # connected before the barrier
            start.wait(timeout=30)
            return session.post(url, json=BODY, headers=auth(K1), timeout=30).status_code

    try:
        with ThreadPoolExecutor(n) as pool:
            return sorted(pool.map(create, range(n)))
    finally:
        web.shutdown()


def test_concurrent_creates_never_pass_the_open_batch_cap(server: RedisServer) -> None:
    for _ in range(3):
        codes = burst(server, 12, max_inflight_per_key=2)
        assert codes == [202] * 2 + [429] * 10, codes


def test_concurrent_creates_never_pass_the_bulk_queue_depth(server: RedisServer) -> None:
    for _ in range(3):
        codes = burst(server, 12, max_bulk_depth=3)
        assert codes == [202] * 3 + [429] * 9, codes
        assert redis.Redis.from_url(server.url).llen("qd:bulk") == 3
