"""What `up` tells its user: a busy port at once, and one block once the system is ready (the web
server answers `/readyz`: a worker has loaded its model) with where everything is and how to stop."""

from __future__ import annotations

import errno
import socket
import sys
import time
from pathlib import Path

import requests


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (checked before anything starts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def home(path: Path) -> str:
    """A path with the home directory written `~` (shorter, and no user name on screen)."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


class ReadyWatch:
    """Called from `up`'s wait loop: polls `/readyz` and prints the ready block once; never stops `up`."""

    def __init__(self, url: str, api_key: str | None, data: str, logs: Path | None, every: float = 0.5) -> None:
        self.url, self.data, self.logs, self.every = url, data, logs, every
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.shown = False
        self.next_look = 0.0

    def __call__(self) -> int | None:
        now = time.monotonic()
        if self.shown or now < self.next_look:
            return None
        self.next_look = now + self.every
        try:
            if self.session.get(self.url + "/readyz", timeout=2).status_code != 200:
                return None
            model = self.session.get(self.url + "/v1/model", timeout=5).json()
            listed = self.session.get(self.url + "/v1/models", timeout=5).json().get("data") or []
        except (requests.RequestException, ValueError):  # not up yet, or slow: look again
            return None
        self.shown = True
        ids = [str(m.get("id")) for m in listed if isinstance(m, dict)]
        print(self.block(model, ids), file=sys.stderr, flush=True)
        return None

    def block(self, model: dict[str, object], ids: list[str]) -> str:
        """The ready block: `model` is GET /v1/model (device, dtype), `ids` the served ids of /v1/models."""
        running = f"{', '.join(ids) or model.get('name')} on {model.get('device')} ({model.get('dtype')})"
        lines = [
            "",
            "qwen-deploy is ready",
            f"  API       {self.url}/v1   (OpenAI SDK: base_url {self.url}/v1; Anthropic SDK: {self.url})",
            f"  console   {self.url}/",
            f"  API docs  {self.url}/docs",
            f"  model     {running}",
            f"  data      {self.data}",
        ]
        if self.logs is not None:
            lines.append(f"  logs      {home(self.logs)}   (--verbose shows them here)")
        lines += ["  stop      Ctrl-C", ""]
        return "\n".join(lines)
