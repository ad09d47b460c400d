"""Slow unfinished request bodies against the launched web server: /livez and another key's submit latency.

    uv run python bench/slow_bodies_bench.py [--slow 4100] [--workers 2] [--body-timeout 10]

Starts its own redis-server and gunicorn (the launcher's command line with config.yml's web settings, API keys
on, no generation worker), opens N connections with one key that each announce a 1000-byte submit body and send
12 bytes, then for `--body-timeout` + 5 s times `GET /livez` on the reserved probe port (`web.probe_port`) and on
the main port, and another key's `POST /v1/jobs`, each on a new connection (as a probe makes them), and counts how
the slow connections were answered.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.cli.deployment import Deployment  # noqa: E402
from qwen_deploy.cli.redis_server import free_port  # noqa: E402

SLOW_KEY, OTHER_KEY = "k-bench-slow", "k-bench-other"


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def slow(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SLOW_KEY}\r\n"
        'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": "'.encode()
    )
    sock.setblocking(False)
    return sock


def outcomes(socks: list[socket.socket], started: float, until: float) -> tuple[dict[str, int], list[float]]:
    """How each slow connection was answered (status or `open`/`closed`), and when each was closed."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ, b"")
    status = {s: "open" for s in socks}
    closed: list[float] = []
    while len(closed) < len(socks) and time.monotonic() < until:
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 "):
                status[sock] = data.split(b" ", 2)[1].decode()
            if not data:
                if status[sock] == "open":
                    status[sock] = "closed"
                closed.append(time.monotonic() - started)
                sel.unregister(sock)
    counts: dict[str, int] = {}
    for value in status.values():
        counts[value] = counts.get(value, 0) + 1
    return counts, closed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slow", type=int, default=4100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--body-timeout", type=float, default=10.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slow-bodies-bench-"))
    env = {
        "QWEN_DEPLOY_ENV_FILE": "no.env",
        "QWEN_DEPLOY_CONFIG": str(ROOT / "config.yml"),
        "QWEN_DEPLOY_LOG_LEVEL": "WARNING",
        "QWEN_DEPLOY_WEB__WORKERS": str(args.workers),
        "QWEN_DEPLOY_WEB__API_KEYS": f'["{SLOW_KEY}", "{OTHER_KEY}"]',
        "QWEN_DEPLOY_WEB__BODY_TIMEOUT": str(args.body_timeout),
        "QWEN_DEPLOY_LIMITS__MAX_QUEUED_UNSERVED": "100000",
        "QWEN_DEPLOY_LIMITS__MAX_INFLIGHT_PER_KEY": "100000",
    }
    probe_port = free_port()
    env["QWEN_DEPLOY_WEB__PROBE_PORT"] = str(probe_port)
    deployment = Deployment(env, logs=tmp, cwd=ROOT, quick_stop=True)
    deployment.start_redis(data_dir=tmp, appendonly=False)
    port = free_port()
    deployment.start_web("127.0.0.1", port, access_log=None)
    socks: list[socket.socket] = []
    try:
        url = deployment.wait_web(60)
        started = time.monotonic()
        socks = [slow(port) for _ in range(args.slow)]
        opened = time.monotonic() - started
        until = started + args.body_timeout + 5
        probe_livez: list[float] = []
        livez: list[float] = []
        submit: list[float] = []
        late: list[str] = []  # when (seconds after the first slow connection) a probe took over 100 ms
        failures: list[str] = []

        def probe() -> None:
            while time.monotonic() < until:
                for samples, call in (
                    (probe_livez, lambda: requests.get(f"http://127.0.0.1:{probe_port}/livez", timeout=30)),
                    (livez, lambda: requests.get(url + "/livez", timeout=30)),
                    (
                        submit,
                        lambda: requests.post(
                            url + "/v1/jobs",
                            json={"prompt": "y", "max_new_tokens": 1},
                            headers={"Authorization": f"Bearer {OTHER_KEY}"},
                            timeout=30,
                        ),
                    ),
                ):
                    t = time.perf_counter()
                    try:
                        code = call().status_code
                    except requests.RequestException as exc:
                        failures.append(type(exc).__name__)
                        continue
                    samples.append(time.perf_counter() - t)
                    if samples[-1] > 0.1:
                        name = "probe port" if samples is probe_livez else "main port" if samples is livez else "submit"
                        late.append(f"{name} {time.monotonic() - started:.1f} s: {samples[-1] * 1000:.0f} ms")
                    if code not in (200, 202):
                        failures.append(str(code))
                time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        counts, closed = outcomes(socks, started, until + 5)
        prober.join()
        print(
            f"$ uv run python bench/slow_bodies_bench.py --slow {args.slow} --workers {args.workers} "
            f"--body-timeout {args.body_timeout:g}"
        )
        print(
            f"slow connections: {args.slow} opened in {opened:.1f} s; answered {counts}; "
            f"last closed {max(closed, default=0):.1f} s after the first opened"
        )
        for name, samples in (
            ("GET /livez, probe port (web.probe_port)", probe_livez),
            ("GET /livez, main port", livez),
            ("POST /v1/jobs (other key)", submit),
        ):
            if samples:
                print(
                    f"{name}: {len(samples)} on new connections, p50 {statistics.median(samples) * 1000:.1f} ms  "
                    f"p99 {pct(samples, 0.99):.1f} ms  max {max(samples) * 1000:.1f} ms"
                )
        print(f"probe failures: {failures or 'none'}; probes over 100 ms: {late or 'none'}")
    finally:
        for s in socks:
            s.close()
        deployment.stop(timeout=30)


if __name__ == "__main__":
    main()
