"""One cap on open streams per key for every streaming route: job events, Responses streams (created or
replayed) and chat/text completion streams (real redis-server, a threaded WSGI server, no worker, a cap
of 3)."""

from __future__ import annotations

import threading

import redis
import requests
from werkzeug.serving import make_server

from qwen_deploy.cli.redis_server import RedisServer
from tests.helpers import wait_until
from tests.store.test_tenants import K1, K2, auth, make_app
from web.auth import owner_of
from web.openai_api.translate import model_id


def test_every_streaming_route_counts_against_one_cap(server: RedisServer) -> None:
    db = redis.Redis.from_url(server.url, decode_responses=True)
    db.flushdb()
    app = make_app(
        server.url, web={"api_keys": [K1, K2]}, limits={"max_streams_per_key": 3, "max_queued_unserved": 100}
    )
    model, slots = model_id(app.extensions["qwen_deploy"].settings), f"qd:owner:{owner_of(K1)}:streams"
    web = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{web.server_port}"

    def call(method: str, path: str, key: str = K1, body: object = None) -> requests.Response:
        return requests.request(method, base + path, json=body, headers=auth(key), stream=True, timeout=30)

    opened: list[requests.Response] = []
    try:
        job = call("POST", "/v1/jobs", body={"prompt": "x"}).json()
        resp_id = "resp_" + job["id"].removeprefix("job_")
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        opened += [
            call("GET", f"/v1/responses/{resp_id}?stream=true"),
            call("POST", "/v1/chat/completions", body=chat),
            call("GET", f"/v1/jobs/{job['id']}/events"),
        ]
        assert [s.status_code for s in opened] == [200, 200, 200]
        assert db.zcard(slots) == 3
        jobs = len(db.keys("qd:job:*"))
        for method, path, body in (
            ("GET", f"/v1/responses/{resp_id}?stream=true", None),
            ("GET", f"/v1/jobs/{job['id']}/events", None),
            ("POST", "/v1/chat/completions", chat),
            ("POST", "/v1/completions", {"model": model, "prompt": "x", "stream": True}),
            ("POST", "/v1/responses", {"model": model, "input": "x", "stream": True}),
        ):
            refused = call(method, path, body=body)
            assert refused.status_code == 429, (path, refused.text[:200])
            assert refused.json()["error"]["code"] == "too_many_streams"
        assert len(db.keys("qd:job:*")) == jobs  # a refused stream made no job
        opened.append(call("POST", "/v1/chat/completions", K2, chat))
        assert opened[-1].status_code == 200  # K2's cap is its own
        call("POST", f"/v1/jobs/{job['id']}/cancel").close()
        assert b"event: response.failed" in b"".join(opened[0].iter_content(None))  # the replay ends with its job
        wait_until(lambda: db.zcard(slots) == 1, 10, what="the replay's and the events' slots freed")
        again = call("POST", "/v1/responses", body={"model": model, "input": "x", "stream": True})
        opened.append(again)
        assert again.status_code == 200
    finally:
        for stream in opened:
            stream.close()
        web.shutdown()
