"""Pre-deployment checks (`qwen-deploy doctor`): each says pass, warn or fail, and how to fix it.

The checks are small functions in the ``CHECKS`` registry; a ``fail`` is blocking (exit code 1), a
``warn`` is not. Torch is imported lazily, by the memory check only. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import redis
import requests

from qwen_deploy import registry
from qwen_deploy.config import ConfigError, Settings, default_cache_dir, load_settings
from qwen_deploy.queues import BULK, CONVERT, INTERACTIVE

Status = Literal["pass", "warn", "fail"]
Outcome = tuple[Status, str, str]  # status, detail, fix
MIN_PYTHON = (3, 11)
PROJECT = "qwen-deploy"
KEY_PACKAGES = ("torch", "transformers", "celery", "kombu", "redis", "flask")
QUEUES = (INTERACTIVE, BULK, CONVERT)
REDIS_TIMEOUT_S = 2.0
HUB_TIMEOUT_S = 3.0
GIB = 1024**3
DISK_WARN_BYTES = 5 * GIB
DISK_FAIL_BYTES = 500 * 1024**2
MEMORY_MARGIN = 1.25  # weights plus room for activations, KV cache and the runtime
QUEUE_WARN_FRACTION = 0.8  # of limits.max_queue_depth
LOAD_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FIX_REDIS = "start Redis or set REDIS_URL (qwen-deploy up starts an embedded one)"
FIX_CONFIG = "fix the key named in the config row (config.yml, .env or the environment)"
SKIP_FIX = {"config": FIX_CONFIG, "redis": FIX_REDIS}


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def passed(detail: str) -> Outcome:
    return "pass", detail, ""


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _redacted(url: str) -> str:
    """The URL with its password replaced by ***."""
    head, sep, tail = url.rpartition("@")
    if not sep or "://" not in head:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{tail}"


class Context:
    """What the checks share, computed once: settings, Redis, where the model is, what the hub says."""

    @cached_property
    def config(self) -> tuple[Settings | None, str]:
        try:
            return load_settings(), ""
        except ConfigError as exc:
            return None, str(exc)

    @property
    def settings(self) -> Settings:
        """The valid settings (the runner skips checks that need them when they are invalid)."""
        if self.config[0] is None:
            raise RuntimeError("configuration invalid")
        return self.config[0]

    @cached_property
    def redis_url(self) -> str:
        """From the settings, or (when they are invalid) from REDIS_URL or the default."""
        if self.config[0]:
            return self.config[0].redis_url
        return os.environ.get("REDIS_URL") or str(Settings.model_fields["redis_url"].default)

    @cached_property
    def connection(self) -> tuple[redis.Redis | None, str]:
        try:
            client = redis.Redis.from_url(self.redis_url, decode_responses=True,
                                          socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
            client.ping()
            return client, ""
        except (redis.RedisError, OSError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    @property
    def redis(self) -> redis.Redis:
        client, error = self.connection
        if client is None:
            raise RuntimeError(error)
        return client

    @cached_property
    def model(self) -> tuple[str, Path | None]:
        """("local" | "cache" | "hub", the directory with the model files when there is one)."""
        name, revision = self.settings.model.name_or_path, self.settings.model.revision
        path = Path(name).expanduser()
        if path.is_dir() or name.startswith(("/", ".", "~")):
            return "local", path
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
        return ("cache", Path(found).parent) if isinstance(found, str) else ("hub", None)

    @cached_property
    def hub(self) -> tuple[int | None, dict[str, Any], str]:
        """(HTTP status, model info, error) from the hub API for the configured model."""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return None, {}, "HF_HUB_OFFLINE is set"
        model, token = self.settings.model, self.settings.hf_token
        url = f"{constants.ENDPOINT}/api/models/{model.name_or_path}"
        url += f"/revision/{model.revision}" if model.revision else ""
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
        try:
            resp = requests.get(url, headers=headers, timeout=HUB_TIMEOUT_S)
            info = resp.json() if resp.ok else {}
        except requests.RequestException as exc:
            return None, {}, f"hub unreachable: {type(exc).__name__}"
        except ValueError:
            info = {}
        return resp.status_code, info if isinstance(info, dict) else {}, ""


def check_python(ctx: Context) -> Outcome:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info >= MIN_PYTHON:
        return passed(version)
    return "fail", f"{version} < {'.'.join(map(str, MIN_PYTHON))}", "use Python 3.11 or newer"


def _specifiers() -> dict[str, Any]:
    """The project's own version specifiers by package name (empty when it is not installed)."""
    try:
        from packaging.requirements import Requirement

        return {(r := Requirement(line)).name.lower(): r.specifier for line in metadata.requires(PROJECT) or []}
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return {}


def check_packages(ctx: Context) -> Outcome:
    specs, found, problems = _specifiers(), [], []
    for name in KEY_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name} missing")
            continue
        found.append(f"{name} {version}")
        if name in specs and not specs[name].contains(version, prereleases=True):
            problems.append(f"{name} {version} does not satisfy {specs[name]}")
    if problems:
        return "fail", "; ".join(problems), "uv sync (or pip install -r requirements.txt)"
    return passed(", ".join(found))


def check_config(ctx: Context) -> Outcome:
    settings, error = ctx.config
    if settings is None:
        return "fail", error, "fix that key in config.yml, .env or the environment"
    return passed(f"valid; model {settings.model.name_or_path}")


def check_redis(ctx: Context) -> Outcome:
    client, error = ctx.connection
    if client is None:
        return "fail", f"{_redacted(ctx.redis_url)} unreachable: {error}", FIX_REDIS
    return passed(f"{_redacted(ctx.redis_url)} (redis {client.info('server').get('redis_version', '?')})")


def _config_get(client: redis.Redis, key: str) -> str | None:
    try:
        return str(client.config_get(key).get(key, ""))
    except redis.ResponseError:  # CONFIG disabled or renamed (managed Redis)
        return None


def check_persistence(ctx: Context) -> Outcome:
    aof, save = _config_get(ctx.redis, "appendonly"), _config_get(ctx.redis, "save")
    if aof is None:
        return "warn", "cannot read CONFIG (disabled?): check persistence by hand", "enable appendonly yes"
    if aof == "yes":
        return passed("AOF on (appendonly yes)")
    if save:
        return passed(f"RDB snapshots (save {save}); AOF would lose less")
    return ("warn", "no AOF and no RDB snapshots: jobs can be lost on restart",
            "run redis-server --appendonly yes (or CONFIG SET appendonly yes, then CONFIG REWRITE)")


def check_eviction(ctx: Context) -> Outcome:
    policy = _config_get(ctx.redis, "maxmemory-policy")
    if policy == "noeviction":
        return passed("maxmemory-policy noeviction")
    return "warn", f"maxmemory-policy {policy or 'unknown'}: jobs can be evicted", "set maxmemory-policy noeviction"


def check_workers(ctx: Context) -> Outcome:
    found = registry.workers(ctx.redis, ctx.settings.key_prefix)
    ready = [w for w in found if w.get("state") == "ready"]
    if ready:
        return passed(f"{len(ready)} ready, serving {ready[0].get('model', {}).get('name')}")
    detail = f"{len(found)} loading, none ready" if found else "no generation worker seen"
    return "warn", detail, "start one: qwen-deploy worker (or docker compose up -d worker)"


def check_queues(ctx: Context) -> Outcome:
    lengths = {q: int(ctx.redis.llen(q)) for q in QUEUES}
    detail = ", ".join(f"{q} {n}" for q, n in lengths.items())
    if lengths[INTERACTIVE] >= QUEUE_WARN_FRACTION * ctx.settings.limits.max_queue_depth:
        return "warn", f"{detail}: near limits.max_queue_depth", "add workers or raise limits.max_queue_depth"
    return passed(detail)


def check_model(ctx: Context) -> Outcome:
    name = ctx.settings.model.name_or_path
    kind, path = ctx.model
    if kind == "local":
        if path and (path / "config.json").is_file():
            return passed(f"local directory {path}")
        return "fail", f"{name}: no such directory, or no config.json in it", "set model.name_or_path"
    if kind == "cache":
        return passed(f"{name} in the local Hugging Face cache ({path})")
    status, _, error = ctx.hub
    if status == 404:
        return "fail", f"{name} not found on the hub (or private)", "check the id; set HF_TOKEN if private"
    return ("warn", f"{name} not in the local cache; {error or f'hub answered {status}'}",
            f"pre-fetch it: qwen-deploy download {name} (else the worker downloads it at start)")


def _weights(directory: Path) -> tuple[int, int]:
    """(parameters counted from the safetensors headers, bytes of weight files) in a model directory."""
    params, stored = 0, 0
    for file in sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin")):
        stored += file.stat().st_size
        if file.suffix == ".safetensors":
            with file.open("rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
            params += sum(math.prod(meta["shape"]) for key, meta in header.items() if key != "__metadata__")
    return params, stored


def _ram_available() -> int | None:
    """MemAvailable, capped by a cgroup v2 memory limit (containers)."""
    found: list[int] = []
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        found.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        try:  # no /proc (macOS): what sysconf knows, where it knows it
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _device(preference: str) -> tuple[str, int | None, str]:
    """(device, bytes free on it, problem) for model.device, the way the worker picks it."""
    try:
        import torch
    except ImportError:
        return "cpu", _ram_available(), "torch is not installed"
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda", int(torch.cuda.mem_get_info()[0]), ""
    mps = getattr(torch.backends, "mps", None)
    if preference in ("auto", "mps") and mps is not None and mps.is_available():
        return "mps", _ram_available(), ""
    if preference in ("cuda", "mps"):
        return preference, None, f"model.device is {preference} but torch cannot use it here"
    return "cpu", _ram_available(), ""


def check_memory(ctx: Context) -> Outcome:
    device, free, problem = _device(ctx.settings.model.device)
    if problem:
        return ("fail" if free is None else "warn"), problem, "set model.device: auto, or install a torch build for it"
    _, path = ctx.model
    if path is None or not path.is_dir():
        return ("warn", f"{device}: {_size(free or 0)} free; model size unknown (no local files)",
                "pre-fetch the model (qwen-deploy download) to check its size")
    params, stored = _weights(path)
    dtype = ctx.settings.model.dtype
    per_param = LOAD_DTYPE_BYTES[dtype] if dtype != "auto" else (4 if device == "cpu" else 2)
    need = params * per_param if params else stored
    detail = f"{device}: model ~{_size(need)} ({params / 1e6:.1f}M parameters), {_size(free or 0)} free"
    if free is None:
        return "warn", f"{detail}; free memory unknown", "check free memory by hand"
    if free < need * MEMORY_MARGIN:
        return "warn", f"{detail}: does not fit with a {MEMORY_MARGIN}x margin", "use a GPU, bf16 or a smaller model"
    return passed(detail)


def check_disk(ctx: Context) -> Outcome:
    from huggingface_hub import constants

    free_by_path = {}
    for path in (default_cache_dir(), Path(constants.HF_HUB_CACHE)):
        existing = next(p for p in (path, *path.parents) if p.exists())
        free_by_path[path] = shutil.disk_usage(existing).free
    path = min(free_by_path, key=free_by_path.__getitem__)
    detail, fix = f"{_size(free_by_path[path])} free for {path}", "free space or move HF_HOME / QWEN_DEPLOY_CACHE"
    if free_by_path[path] < DISK_FAIL_BYTES:
        return "fail", detail, fix
    return ("warn", detail, fix) if free_by_path[path] < DISK_WARN_BYTES else passed(detail)


def check_hf_token(ctx: Context) -> Outcome:
    token = "set" if ctx.settings.hf_token else "not set"
    kind, _ = ctx.model
    if kind == "local":
        return passed(f"n/a (local directory); HF_TOKEN {token}")
    status, info, error = ctx.hub
    if status is None:
        if kind == "cache" or token == "set":
            return passed(f"HF_TOKEN {token}; {error}" + ("; the model is in the cache" if kind == "cache" else ""))
        return ("warn", f"HF_TOKEN not set; cannot tell whether the model is gated ({error})",
                "set HF_TOKEN in .env if the model is gated or private")
    if status in (401, 403):
        return ("fail", f"HF_TOKEN {token}; the hub refused access ({status})",
                "set a valid HF_TOKEN and accept the model's license on its hub page")
    gated = bool(info.get("gated")) or bool(info.get("private"))
    if gated and token == "not set":
        return "fail", "the model is gated or private and HF_TOKEN is not set", "set HF_TOKEN in .env"
    return passed(f"HF_TOKEN {token}; the model is {'gated' if gated else 'public'}")


# (row name, what the check needs: "config" valid and/or "redis" reachable, check)
CHECKS: list[tuple[str, tuple[str, ...], Callable[[Context], Outcome]]] = [
    ("python", (), check_python),
    ("packages", (), check_packages),
    ("config", (), check_config),
    ("redis", (), check_redis),
    ("redis_persistence", ("redis",), check_persistence),
    ("redis_eviction", ("redis",), check_eviction),
    ("workers", ("config", "redis"), check_workers),
    ("queues", ("config", "redis"), check_queues),
    ("model", ("config",), check_model),
    ("memory", ("config",), check_memory),
    ("disk", (), check_disk),
    ("hf_token", ("config",), check_hf_token),
]


def run_checks() -> list[Check]:
    """Every check in order; one whose needs are unmet, or that crashes, becomes a warn row."""
    ctx, results = Context(), []
    for name, needs, check in CHECKS:
        unmet = {"config": ctx.config[0] is None, "redis": ctx.connection[0] is None}
        missing = [need for need in needs if unmet[need]]
        if missing:
            outcome: Outcome = "warn", f"skipped: {' and '.join(missing)} unavailable", SKIP_FIX[missing[0]]
        else:
            try:
                outcome = check(ctx)
            except Exception as exc:  # one broken check must not hide the others
                outcome = "warn", f"check crashed: {type(exc).__name__}: {exc}", "report this as a bug"
        results.append(Check(name, *outcome))
    return results


def format_table(results: list[Check]) -> str:
    width = max(len(c.name) for c in results) + 2
    lines = [f"{'check':<{width}}{'status':<8}detail"]
    for c in results:
        lines.append(f"{c.name:<{width}}{c.status:<8}{c.detail}")
        if c.status != "pass" and c.fix:
            lines.append(f"{'':<{width + 8}}fix: {c.fix}")
    counts = {s: sum(c.status == s for c in results) for s in ("pass", "warn", "fail")}
    return "\n".join([*lines, ", ".join(f"{n} {s}" for s, n in counts.items())])


def run(as_json: bool = False) -> int:
    """Print the checks (a table, or JSON); 1 when a blocking check failed."""
    results = run_checks()
    ok = not any(c.status == "fail" for c in results)
    if as_json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in results]}, indent=2))
    else:
        print(format_table(results))
    return 0 if ok else 1


def worker_ready() -> int:
    """0 when a generation worker on this host has loaded its model (the container healthcheck)."""
    settings, host = load_settings(), socket.gethostname()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=REDIS_TIMEOUT_S)
    try:
        mine = [w for w in registry.workers(client, settings.key_prefix) if w.get("hostname") == host]
    except redis.RedisError as exc:
        print(f"{host}: Redis unavailable: {exc}")
        return 1
    print(f"{host}: {[w.get('state') for w in mine] or 'no worker registered'}")
    return 0 if any(w.get("state") == "ready" for w in mine) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_deploy.doctor", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--worker-ready", action="store_true", help="only: is this host's worker ready?")
    args = parser.parse_args(argv)
    return worker_ready() if args.worker_ready else run(args.json)


if __name__ == "__main__":
    sys.exit(main())
