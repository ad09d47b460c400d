"""download_model against a hand-built hub cache and a loopback HTTP stand-in for the hub."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub import constants

from conversion.download import download_model
from conversion.errors import DownloadError

COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40
TOKEN = "hf_SECRETtoken123"
ROOT = Path(__file__).resolve().parents[3]


def safetensors_bytes() -> bytes:
    """A valid one-tensor safetensors file (float32[2, 2])."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def tiny_files(bin_only: bool = False) -> dict[str, bytes]:
    files = {
        "config.json": b'{"model_type": "qwen2"}',
        "tokenizer.json": b'{"version": "1.0"}',
        "pytorch_model.bin": b"pickled weights" * 50,
        ".gitattributes": b"*.bin filter=lfs\n",
    }
    if not bin_only:
        files["model.safetensors"] = safetensors_bytes() * 1000  # big enough to cut in half
    return files


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    status: int | None = None  # answer every request for this repo with this status...
    error_code: str | None = None  # ...and this X-Error-Code


@dataclass
class Hub:
    """What the stand-in serves, what it should break, and what it saw."""

    repos: dict[str, Repo] = field(default_factory=dict)
    info_503: int = 0  # answer the first N repo-info requests with 503 (-1: always)
    get_500: dict[str, int] = field(default_factory=dict)  # file -> N GETs answered 500
    truncate: set[str] = field(default_factory=set)  # files whose first GET is cut short
    seen: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)  # method, path, auth, range
    url: str = ""

    def count(self, method: str, fragment: str) -> int:
        return sum(1 for m, path, _, _ in self.seen if m == method and fragment in path)

    def infos(self) -> int:
        """Repo-info requests (``model_info``/``repo_info``), the first call of every attempt."""
        return sum(1 for _, path, _, _ in self.seen if path.startswith("/api/") and "/tree/" not in path)


class Handler(BaseHTTPRequestHandler):
    """Just the routes snapshot_download and model_info use."""

    server: ThreadingHTTPServer

    @property
    def hub(self) -> Hub:
        return self.server.hub  # type: ignore[attr-defined,no-any-return]

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self.route(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self.route(body=True)

    def route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.seen.append((self.command, path, self.headers.get("Authorization"), self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) in (4, 6):  # info without a revision: main
            kind, revision = parts[4:6] if len(parts) == 6 else ("revision", "main")
            return self.api(f"{parts[2]}/{parts[3]}", kind, revision)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
        self.fail(404, "EntryNotFound")

    def fail(self, status: int, code: str | None = None) -> None:
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def check(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self.fail(404, "RepoNotFound")
        elif repo.status is not None:
            self.fail(repo.status, repo.error_code)
        elif revision not in ("main", repo.commit):
            self.fail(404, "RevisionNotFound")
        else:
            return repo
        return None

    def send_json(self, data: object) -> None:
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def api(self, repo_id: str, kind: str, revision: str) -> None:
        if kind == "revision" and self.hub.info_503:
            self.hub.info_503 -= 1
            return self.fail(503)
        repo = self.check(repo_id, revision)
        if repo is None:
            return None
        if kind == "revision":
            siblings = [{"rfilename": n, "size": len(b)} for n, b in repo.files.items()]
            return self.send_json({"id": repo_id, "sha": repo.commit, "siblings": siblings})
        return self.send_json(
            [{"type": "file", "path": n, "size": len(b), "oid": etag(b)} for n, b in repo.files.items()]
        )

    def resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self.check(repo_id, revision)
        if repo is None:
            return
        if name not in repo.files:
            return self.fail(404, "EntryNotFound")
        if body and self.hub.get_500.get(name, 0):
            self.hub.get_500[name] -= 1
            return self.fail(500)
        data, start = repo.files[name], 0
        if body and (spec := self.headers.get("Range")):
            start = int(spec.removeprefix("bytes=").split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{etag(data)}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if name in self.hub.truncate:
            self.hub.truncate.discard(name)
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data[start:])


def etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def hub_library_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process tests run with offline mode off, whatever HF_HUB_OFFLINE the caller exported."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture()
def hub() -> Iterator[Hub]:
    state = Hub(
        repos={
            "org/tiny": Repo(COMMIT, tiny_files()),
            "org/gated": Repo(COMMIT, {}, 403, "GatedRepo"),
            "org/private": Repo(COMMIT, {}, 401),
            "org/old": Repo(OTHER_COMMIT, tiny_files(True)),
        }
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.hub = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture()
def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def build_cache(cache: Path, repo_id: str = "org/cached", commit: str = COMMIT) -> dict[str, bytes]:
    """A hub cache as huggingface_hub lays it out: refs/main -> snapshots/<commit>/files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = {"config.json": b'{"model_type": "qwen2"}', "model.safetensors": safetensors_bytes()}
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return files


def test_offline_cache_when_hub_unreachable(tmp_path: Path, closed_port: str) -> None:
    files = build_cache(tmp_path)
    events: list[dict] = []
    result = download_model(
        "org/cached", cache_dir=tmp_path, endpoint=closed_port, retries=2, backoff=0.01, progress=events.append
    )
    assert result["offline"] is True and result["commit"] == COMMIT and result["revision"] is None
    assert result["files"] == sorted(files) and result["bytes"] == sum(map(len, files.values()))
    assert Path(result["path"]) == tmp_path / "models--org--cached" / "snapshots" / COMMIT
    assert (events[0]["phase"], events[-1]["phase"], events[-1]["files_done"]) == ("listing", "done", 2)
    json.dumps(result)


def test_offline_cache_by_commit_hash(tmp_path: Path, closed_port: str) -> None:
    build_cache(tmp_path, commit=OTHER_COMMIT)
    (tmp_path / "models--org--cached" / "refs" / "main").unlink()  # a pinned commit needs no ref
    result = download_model("org/cached", revision=OTHER_COMMIT, cache_dir=tmp_path, endpoint=closed_port, retries=1)
    assert (result["offline"], result["commit"], result["revision"]) == (True, OTHER_COMMIT, OTHER_COMMIT)


def test_unreachable_and_not_cached_is_transient(tmp_path: Path, closed_port: str) -> None:
    with pytest.raises(DownloadError) as info:
        download_model("org/missing", cache_dir=tmp_path, endpoint=closed_port, retries=2, backoff=0.01)
    assert (info.value.code, info.value.permanent) == ("network", False)
    assert "not (completely) in the local cache" in str(info.value)


def test_hf_hub_offline_env(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE is read at import, hence a fresh interpreter."""
    build_cache(tmp_path)
    script = (
        "import json, sys\nfrom pathlib import Path\nfrom conversion.download import download_model\n"
        "from conversion.errors import DownloadError\n"
        "cache = Path(sys.argv[1])\nout = {'hit': download_model('org/cached', cache_dir=cache)}\n"
        "try:\n    download_model('org/other', cache_dir=cache)\n"
        "except DownloadError as e:\n    out['miss'] = [e.code, e.permanent, str(e)]\nprint(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["hit"]["offline"] is True and out["hit"]["commit"] == COMMIT
    assert out["miss"][:2] == ["offline_not_cached", False] and "HF_HUB_OFFLINE" in out["miss"][2]


def test_download_from_stand_in(tmp_path: Path, hub: Hub) -> None:
    events: list[dict] = []
    result = download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url, progress=events.append)
    files = tiny_files()
    assert result["offline"] is False and result["commit"] == COMMIT
    assert result["files"] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert result["bytes"] == sum(len(files[n]) for n in result["files"])
    path = Path(result["path"])
    assert path == tmp_path / "models--org--tiny" / "snapshots" / COMMIT
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (path / "pytorch_model.bin").exists() and hub.count("GET", "pytorch_model.bin") == 0
    assert events[0]["phase"] == "listing"
    assert {
        "phase": "downloading",
        "files_done": 0,
        "files_total": 3,
        "bytes_done": 0,
        "bytes_total": result["bytes"],
    } in events
    assert events[-1] == {
        "phase": "done",
        "files_done": 3,
        "files_total": 3,
        "bytes_done": result["bytes"],
        "bytes_total": result["bytes"],
    }
    assert max(e["bytes_done"] for e in events if e["phase"] == "downloading") == result["bytes"]
    again = download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url)
    assert again == result and hub.count("GET", "/resolve/") == 3  # nothing fetched twice


def test_hf_endpoint_env_is_honoured(tmp_path: Path, hub: Hub) -> None:
    """HF_ENDPOINT is read at import, hence a fresh interpreter; no ``endpoint`` argument."""
    script = (
        "import json, sys\nfrom pathlib import Path\nfrom conversion.download import download_model\n"
        "print(json.dumps(download_model('org/tiny', cache_dir=Path(sys.argv[1]))))\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    env.pop("HF_HUB_OFFLINE", None), env.pop("TRANSFORMERS_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["commit"] == COMMIT and result["offline"] is False and hub.count("GET", "/resolve/") == 3


def test_bin_only_repo_falls_back_to_bin(tmp_path: Path, hub: Hub) -> None:
    result = download_model("org/old", out=tmp_path / "out", endpoint=hub.url, cache_dir=tmp_path / "c")
    assert result["files"] == ["config.json", "pytorch_model.bin", "tokenizer.json"]
    assert result["commit"] == OTHER_COMMIT and result["path"] == str(tmp_path / "out")
    assert (tmp_path / "out" / "pytorch_model.bin").read_bytes() == tiny_files()["pytorch_model.bin"]


def test_local_dir_then_offline(tmp_path: Path, hub: Hub, closed_port: str) -> None:
    online = download_model("org/tiny", out=tmp_path / "out", cache_dir=tmp_path / "c", endpoint=hub.url)
    offline = download_model(
        "org/tiny", out=tmp_path / "out", cache_dir=tmp_path / "c", endpoint=closed_port, retries=1
    )
    assert offline == {**online, "offline": True}


@pytest.mark.parametrize(
    ("repo_id", "revision", "code"),
    [
        ("org/gated", None, "gated"),
        ("org/nope", None, "not_found"),
        ("org/tiny", "v9", "bad_revision"),
        ("org/private", None, "unauthorized"),
    ],
)
def test_permanent_errors_are_not_retried(
    tmp_path: Path, hub: Hub, repo_id: str, revision: str | None, code: str
) -> None:
    with pytest.raises(DownloadError) as info:
        download_model(repo_id, revision=revision, cache_dir=tmp_path, endpoint=hub.url, retries=3, backoff=0.01)
    assert (info.value.code, info.value.permanent) == (code, True)
    assert len(hub.seen) == 1
    if code == "gated":
        assert "licence" in str(info.value) and "HF_TOKEN" in str(info.value)


def test_503_twice_then_success(tmp_path: Path, hub: Hub) -> None:
    hub.info_503 = 2
    result = download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url, retries=3, backoff=0.01)
    assert result["commit"] == COMMIT and not result["offline"]
    assert hub.info_503 == 0 and hub.infos() == 4  # 2 x 503, then model_info + snapshot_download's repo_info


def test_always_503_is_a_transient_network_error(tmp_path: Path, hub: Hub) -> None:
    hub.info_503 = -1
    with pytest.raises(DownloadError) as info:
        download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url, retries=3, backoff=0.01)
    assert (info.value.code, info.value.permanent) == ("network", False)
    assert hub.infos() == 3


def test_partial_snapshot_is_completed_by_the_next_call(tmp_path: Path, hub: Hub) -> None:
    hub.get_500["model.safetensors"] = 1
    with pytest.raises(DownloadError) as info:
        download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url, retries=1)
    assert info.value.code == "network"
    result = download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url, retries=1)
    assert len(result["files"]) == 3 and hub.count("GET", "config.json") == 1  # kept from the first call
    assert hub.count("GET", "model.safetensors") == 2


def test_cut_transfer_resumes_with_range(tmp_path: Path, hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub resumes a cut transfer with a Range request (after sleeping 1 s)."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # so the half that arrived is written
    hub.truncate.add("model.safetensors")
    result = download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url, retries=1)
    data = tiny_files()["model.safetensors"]
    assert (Path(result["path"]) / "model.safetensors").read_bytes() == data
    ranges = [r for m, p, _, r in hub.seen if m == "GET" and p.endswith("model.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(data) // 2  # whole chunks received before the cut are kept


def test_token_is_sent_but_never_shown(tmp_path: Path, hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    result = download_model("org/tiny", cache_dir=tmp_path, endpoint=hub.url, token=TOKEN)
    assert {auth for _, _, auth, _ in hub.seen} == {f"Bearer {TOKEN}"}
    assert TOKEN not in json.dumps(result)
    errors = []
    for repo_id in ("org/gated", "org/nope", "org/private"):
        with pytest.raises(DownloadError) as info:
            download_model(repo_id, cache_dir=tmp_path, endpoint=hub.url, token=TOKEN)
        errors.append(info.value)
    hub.info_503 = -1
    with pytest.raises(DownloadError) as info:
        download_model("org/other", cache_dir=tmp_path, endpoint=hub.url, token=TOKEN, retries=2, backoff=0.01)
    errors.append(info.value)
    for error in errors:
        assert TOKEN not in f"{error} {error!r} {error.args} {error.message}"
    assert TOKEN not in caplog.text


def test_error_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(DownloadError("gone", "not_found", True)))
    assert (str(error), error.code, error.permanent) == ("gone", "not_found", True)
