"""The submit path's hand-written fast paths against the plain library code, in CPU per submit.

    uv run python bench/web_fastpaths_bench.py [--submit-us 340] [--number 2000] [--repeat 7]

In-process, on the real objects: a Flask app from `web.create_app` (its request class, the body read under
`TimedInput` as `before_request` sets it up) and the real envelope function. Each figure is the best of
`--repeat` runs of `--number` calls, in thread CPU time. A piece pays when it saves at least 3 % of the CPU a
submit costs in all (`--submit-us`: the per-request CPU across gunicorn and redis-server that
`bench/submit_bench.py --duration 5 --rounds 1` prints); the verdict column says whether a fast path would pay.
Each side not in the product lives here, so the comparison can be run again:

  - response: the product's `web.jobs._job_response` (a `Response` whose WSGI headers are final as set) vs a
    plain `Response`, built and run through the WSGI call;
  - body: the product's `web.schemas._body` (a declared length read straight from `wsgi.input`) vs
    `request.get_data(cache=False)` with its length checked, on a fresh request each call (the request's own
    cost is measured alone and taken off both);
  - envelope: a template rendered once per task and queue, then filled in (here only), vs the product's
    `qwen_deploy.queues.task_message` (the whole message dict written as JSON), checked to give the same message
    first.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import io
import json
import os
import re
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask import Request, Response  # noqa: E402
from werkzeug.exceptions import ClientDisconnected  # noqa: E402

from qwen_deploy.config import load_settings  # noqa: E402
from qwen_deploy.jsontext import dumpb  # noqa: E402
from qwen_deploy.queues import GENERATE_TASK, Lane, task_message  # noqa: E402
from web import create_app  # noqa: E402
from web.body_reads import TimedInput  # noqa: E402
from web.jobs import _job_response  # noqa: E402
from web.schemas import _body  # noqa: E402

BODY = b'{"prompt": "Beautiful is better than", "max_new_tokens": 8}'  # submit_bench.py's body
JOB_ID = "job_01JF8Z3V7W6K9Q2M4N5P8R0T1X"
JOB = {
    "id": JOB_ID,
    "object": "job",
    "type": "generation",
    "status": "queued",
    "model": "demo",
    "created_at": 1765080000.123,
    "started_at": None,
    "finished_at": None,
    "result": None,
    "error": None,
    "usage": None,
    "metadata": {},
    "priority": "normal",
    "deadline": None,
    "retry_of": None,
    "queue_position": None,
}


def library_body(request: Request) -> bytes:
    """The body by the library: the whole stream, a stream that ends before its declared length a client gone."""
    raw = request.get_data(cache=False)
    if request.content_length is not None and len(raw) != request.content_length:
        raise ClientDisconnected()
    return raw


_PLAIN = re.compile(r"[A-Za-z0-9_.:-]+").fullmatch  # written the same by json.dumps, repr and as text
_BODY_TAIL = ', {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'


def _uuid4() -> str:
    bits = (int.from_bytes(os.urandom(16)) & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@functools.lru_cache(maxsize=256)
def _envelope(task: str, queue: str, limits: tuple[float, float]) -> list[Any]:
    """The message with @@name@@ holes, split as [text, (name, text), ...]."""
    message = json.loads(task_message(task, "@@id@@", queue, [], *limits))
    message["body"], message["headers"]["argsrepr"] = "@@body@@", "@@argsrepr@@"
    message["properties"]["delivery_tag"] = "@@tag@@"
    pieces = re.split(r"(@@[a-z]+@@)", json.dumps(message))
    return [pieces[0], *zip(pieces[1::2], pieces[2::2])]


def template_message(task: str, task_id: str, queue: str, args: list[object], limits: tuple[float, float]) -> str:
    """The envelope fast path: the template filled in (a job id written as it is)."""
    if args == [task_id] and _PLAIN(task_id):
        body = '[["' + task_id + '"]' + _BODY_TAIL
        quoted, argsrepr = task_id, "['" + task_id + "']"
    else:
        body = "[" + json.dumps(args) + _BODY_TAIL
        quoted, argsrepr = json.dumps(task_id)[1:-1], json.dumps(repr(args))[1:-1]
    fill = {
        "@@body@@": binascii.b2a_base64(body.encode(), newline=False).decode(),
        "@@id@@": quoted,
        "@@argsrepr@@": argsrepr,
        "@@tag@@": _uuid4(),
    }
    head, *parts = _envelope(task, queue, limits)
    return head + "".join(fill[name] + text for name, text in parts)


def best_us(call: Callable[[], object], number: int, repeat: int) -> float:
    """Thread CPU µs per call, the best of `repeat` runs."""
    timer = timeit.Timer(call, timer=time.thread_time)
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def response_pieces(environ: dict[str, Any]) -> tuple[Callable[[], object], Callable[[], object]]:
    headers = {"Location": f"/v1/jobs/{JOB_ID}"}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        return None

    def fast() -> object:
        return list(_job_response(JOB, 202, **headers)(environ, start_response))

    def library() -> object:
        response = Response(dumpb(JOB), status=202, headers=headers, content_type="application/json")
        return list(response(environ, start_response))

    return fast, library


def body_pieces(app: Any, base: dict[str, Any]) -> tuple[Callable[[], object], ...]:
    """Each call builds the request as the submit route sees it: `wsgi.input` under `TimedInput`."""
    cls = app.request_class

    def request() -> Any:
        environ = dict(base)
        environ["wsgi.input"] = TimedInput(io.BytesIO(BODY), None, 30.0, len(BODY), lambda: None)
        req = cls(environ)
        req.max_content_length = app.config["MAX_CONTENT_LENGTH"]  # what Flask's request reads from the app
        return req

    assert _body(request()) == library_body(request()) == BODY
    return request, lambda: _body(request()), lambda: library_body(request())


def envelope_pieces() -> tuple[Callable[[], object], Callable[[], object]]:
    queue, limits = Lane.INTERACTIVE.queue, (60.0, 55.0)
    fast = json.loads(template_message(GENERATE_TASK, JOB_ID, queue, [JOB_ID], limits))
    library = json.loads(task_message(GENERATE_TASK, JOB_ID, queue, [JOB_ID], *limits))
    for message in (fast, library):  # the same message but for its random tag (the body: the same JSON)
        message["properties"].pop("delivery_tag")
        message["body"] = json.loads(base64.b64decode(message["body"]))
    assert fast == library, "the two envelopes differ"
    return (
        lambda: template_message(GENERATE_TASK, JOB_ID, queue, [JOB_ID], limits),
        lambda: task_message(GENERATE_TASK, JOB_ID, queue, [JOB_ID], *limits),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--submit-us", type=float, default=340.0, help="CPU µs per submit (bench/submit_bench.py)")
    ap.add_argument("--number", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    app = create_app(load_settings(environ={}))
    with app.test_request_context(
        "/v1/jobs", method="POST", data=BODY, content_type="application/json", headers={"Authorization": "Bearer k"}
    ) as ctx:
        environ = dict(ctx.request.environ)
    environ.pop("werkzeug.request", None)
    request, body_fast, body_library = body_pieces(app, environ)
    pieces = {
        "response (headers final)": response_pieces(environ),
        "body (raw wsgi.input)": (body_fast, body_library),
        "envelope (template)": envelope_pieces(),
    }
    base = best_us(request, args.number, args.repeat)
    print(" ".join(["uv run python bench/web_fastpaths_bench.py", *sys.argv[1:]]))
    print(f"submit CPU: {args.submit_us:.0f} µs per request; a fast path is kept when it saves >= 3 % of it")
    print(f"{'piece':26} {'fast µs':>8} {'library µs':>10} {'saving µs':>9} {'% submit':>8}  verdict")
    total = 0.0
    for name, (fast, library) in pieces.items():
        off = base if name.startswith("body") else 0.0
        mine, theirs = best_us(fast, args.number, args.repeat) - off, best_us(library, args.number, args.repeat) - off
        saving = theirs - mine
        total += saving
        share = 100 * saving / args.submit_us
        verdict = "pays (>= 3 %)" if share >= 3 else "under 3 % in-process"
        print(f"{name:26} {mine:8.2f} {theirs:10.2f} {saving:9.2f} {share:7.2f}%  {verdict}")
    print(f"{'all three':26} {'':8} {'':10} {total:9.2f} {100 * total / args.submit_us:7.2f}%")
    print(f"(body figures have the request's own {base:.2f} µs taken off)")


if __name__ == "__main__":
    main()
