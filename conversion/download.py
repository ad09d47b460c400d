"""Download a model snapshot from the Hugging Face hub as a plain function: pick the files, retry
transient failures, fall back to the local cache, classify errors, report progress. The token never
appears in results, messages or logs. Which failures are retried and how each is worded: hub_failures.py."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, is_offline_mode, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from tqdm.auto import tqdm as base_tqdm

from conversion.hub_failures import HubRequest, classify, is_transient, retrying, summary

log = logging.getLogger(__name__)

DEFAULT_ALLOW = [
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "*.safetensors",
    "*.safetensors.index.json",
    "README.md",
    "LICENSE*",
]
BIN_FALLBACK = ["*.bin", "*.bin.index.json"]  # only for repos without safetensors
DEFAULT_IGNORE = ["consolidated*.safetensors", "original/*"]  # duplicate non-HF weights (Mistral, Llama)
API_TIMEOUT_S = 30.0
PROGRESS_INTERVAL_S = 0.25
_COMMIT = re.compile(r"[0-9a-f]{40}")


class _Progress:
    """Turns snapshot_download's tqdm bars into ``progress(dict)`` calls (thread-safe, throttled)."""

    def __init__(self, callback: Callable[[dict], None] | None) -> None:
        self.callback = callback
        self.lock = threading.Lock()
        self.files_total = self.bytes_total = 0
        self.bars: list[Any] = []
        self.last = 0.0

    def emit(self, phase: str, files_done: int = 0, bytes_done: int = 0) -> None:
        if self.callback is not None:
            self.callback(
                {
                    "phase": phase,
                    "files_done": files_done,
                    "files_total": self.files_total,
                    "bytes_done": bytes_done,
                    "bytes_total": self.bytes_total,
                }
            )

    def start(self, files_total: int, bytes_total: int) -> None:
        with self.lock:
            self.files_total, self.bytes_total, self.bars = files_total, bytes_total, []
            self.emit("downloading")

    def on_update(self, force: bool) -> None:
        with self.lock:
            now = time.monotonic()
            if not force and now - self.last < PROGRESS_INTERVAL_S:
                return
            self.last = now
            files = sum(int(b.n) for b in self.bars if not b.counts_bytes)
            size = max((int(b.n) for b in self.bars if b.counts_bytes), default=0)
            self.emit("downloading", files, size)

    def tqdm_class(self) -> type[base_tqdm]:
        """A silent tqdm whose updates feed this reporter (file bar: unit "it"; byte bars: unit "B")."""
        progress = self

        class _Bar(base_tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.counts_bytes = kwargs.get("unit") == "B"
                kwargs.pop("name", None)
                super().__init__(*args, **{**kwargs, "disable": True})
                with progress.lock:
                    progress.bars.append(self)

            def update(self, n: float | None = 1) -> bool | None:
                self.n += n or 0  # a disabled tqdm does not count by itself
                progress.on_update(force=not self.counts_bytes)
                return None

        return _Bar


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    out: Path | None = None,
    cache_dir: Path | None = None,
    token: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
    progress: Callable[[dict], None] | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    endpoint: str | None = None,
) -> dict:
    """Download ``repo_id`` at ``revision`` into the hub cache (or ``out``) and describe the result.

    ``retries`` is the number of attempts for transient failures (network, timeouts, 408/429/5xx),
    sleeping ``backoff * 2**i`` between them; then the local cache is tried. ``progress`` may be
    called from download threads. Raises :class:`DownloadError`.
    """
    req = HubRequest(repo_id, revision, out, cache_dir, token, allow_patterns, ignore_patterns, endpoint)
    report = _Progress(progress)
    report.emit("listing")
    if is_offline_mode():  # HF_HUB_OFFLINE=1 (read by huggingface_hub at import)
        return _from_cache(req, report, cause=None)
    try:
        return retrying(lambda: _from_hub(req, report), req, retries, backoff)
    except Exception as exc:
        if is_transient(exc):
            return _from_cache(req, report, cause=exc)
        error = classify(exc, req)
        if error is None:
            raise
        raise error from None  # the hub's exception stays out of tracebacks and logs


def _from_hub(req: HubRequest, report: _Progress) -> dict:
    """List the repo, choose the files, download them (resuming what is already there)."""
    info = HfApi(endpoint=req.endpoint, token=req.token).model_info(
        req.repo_id, revision=req.revision, files_metadata=True, timeout=API_TIMEOUT_S
    )
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) or 0 for s in info.siblings or []}
    allow, ignore = _patterns(list(sizes), req)
    chosen = list(filter_repo_objects(sorted(sizes), allow_patterns=allow, ignore_patterns=ignore))
    report.start(len(chosen), sum(sizes[name] for name in chosen))
    path = snapshot_download(
        req.repo_id,
        revision=req.revision,
        cache_dir=req.cache_dir,
        local_dir=req.out,
        token=req.token,
        allow_patterns=allow,
        ignore_patterns=ignore,
        endpoint=req.endpoint,
        tqdm_class=report.tqdm_class(),
    )
    return _result(req, report, Path(path), _commit_of(Path(path), req) or info.sha, chosen, offline=False)


def _from_cache(req: HubRequest, report: _Progress, cause: Exception | None) -> dict:
    """Serve the snapshot from the local cache (or ``out``) without the network."""
    try:
        path = Path(
            snapshot_download(
                req.repo_id,
                revision=req.revision,
                cache_dir=req.cache_dir,
                local_dir=req.out,
                local_files_only=True,
                allow_patterns=DEFAULT_ALLOW if req.allow is None else req.allow,
                ignore_patterns=_patterns([], req)[1],
            )
        )
    except LocalEntryNotFoundError:  # includes IncompleteSnapshotError
        if cause is None:
            raise req.error(
                f"HF_HUB_OFFLINE is set and {req.where} is not (completely) in the local cache; "
                "download it once with network access.",
                "offline_not_cached",
                False,
            ) from None
        log.warning(
            "download of %s: the hub failed (%s) and the cache cannot serve it", req.where, req.scrub(summary(cause))
        )  # the detail goes to the log; the job gets a code and a sentence
        raise req.error(
            f"the hub at {req.hub} is unreachable or failing and {req.where} is not "
            "(completely) in the local cache; try again later.",
            "network",
            False,
        ) from None
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    on_disk = [n for n in on_disk if not n.startswith(".cache/")]
    allow, ignore = _patterns(on_disk, req)
    names = list(filter_repo_objects(on_disk, allow_patterns=allow, ignore_patterns=ignore))
    return _result(req, report, path, _commit_of(path, req), names, offline=True)


def _patterns(names: list[str], req: HubRequest) -> tuple[list[str], list[str] | None]:
    """The caller's patterns, or the defaults: safetensors when the repo has any, else ``*.bin``."""
    if req.allow is not None:
        return req.allow, req.ignore
    ignore = req.ignore if req.ignore is not None else DEFAULT_IGNORE
    kept = filter_repo_objects(names, ignore_patterns=ignore)
    has_safetensors = any(name.endswith(".safetensors") for name in kept)
    return (DEFAULT_ALLOW if has_safetensors else DEFAULT_ALLOW + BIN_FALLBACK), ignore


def _commit_of(path: Path, req: HubRequest) -> str | None:
    """The commit of a cache snapshot (its folder name) or of a ``local_dir`` download (its metadata)."""
    if req.revision and _COMMIT.fullmatch(req.revision):
        return req.revision
    if req.out is None:
        return path.name if _COMMIT.fullmatch(path.name) else None
    for meta in sorted((path / ".cache" / "huggingface" / "download").rglob("*.metadata")):
        first = meta.read_text(errors="replace").split("\n", 1)[0].strip()
        if _COMMIT.fullmatch(first):
            return first
    return None


def _result(
    req: HubRequest, report: _Progress, path: Path, commit: str | None, names: list[str], offline: bool
) -> dict:
    files = [name for name in names if (path / name).is_file()]
    size = sum((path / name).stat().st_size for name in files)
    report.files_total, report.bytes_total = len(files), size
    report.emit("done", len(files), size)
    return {
        "repo_id": req.repo_id,
        "revision": req.revision,
        "commit": commit,
        "path": str(path),
        "files": files,
        "bytes": size,
        "offline": offline,
    }
