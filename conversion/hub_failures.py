"""How a hub download fails: the request (its description, the token scrubbed from every message),
which failures are transient (retried with backoff, then served from the local cache) and which are
permanent (a :class:`DownloadError` with a code and a sentence)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from conversion.errors import DownloadError

log = logging.getLogger("conversion.download")  # the download's own logger, as before the split
_RETRY_STATUS = {408, 429}
T = TypeVar("T")


@dataclass(frozen=True)
class HubRequest:
    """What `download_model` was asked for; `scrub` and `error` keep the token out of every message."""

    repo_id: str
    revision: str | None
    out: Path | None
    cache_dir: Path | None
    token: str | None
    allow: list[str] | None
    ignore: list[str] | None
    endpoint: str | None

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text

    def error(self, message: str, code: str, permanent: bool) -> DownloadError:
        return DownloadError(self.scrub(message), code, permanent)

    @property
    def hub(self) -> str:
        return (self.endpoint or constants.ENDPOINT).rstrip("/")

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision or constants.DEFAULT_REVISION}"


def retrying(attempt: Callable[[], T], req: HubRequest, retries: int, backoff: float) -> T:
    """Run ``attempt`` up to ``retries`` times while it fails transiently; re-raise the last failure."""
    attempts = max(1, retries)
    for i in range(attempts):
        try:
            return attempt()
        except Exception as exc:
            if not is_transient(exc) or i + 1 == attempts:
                raise
            delay = backoff * 2**i
            log.warning(
                "download of %s failed (%s); attempt %d/%d in %.2fs",
                req.where,
                req.scrub(summary(exc)),
                i + 2,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) if isinstance(exc, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """Network trouble worth retrying: transport errors, timeouts, 408/429/5xx, a file the hub didn't serve."""
    if isinstance(exc, (httpx2.TransportError, TimeoutError, ConnectionError, LocalEntryNotFoundError)):
        return True
    status = _status(exc)
    return status is not None and (status in _RETRY_STATUS or status >= 500)


def _is(*types: type[BaseException]) -> Callable[[BaseException], bool]:
    return lambda exc: isinstance(exc, types)


def _has_status(code: int) -> Callable[[BaseException], bool]:
    return lambda exc: _status(exc) == code


# Permanent failures, first match wins: code -> (test, message). GatedRepoError subclasses
# RepositoryNotFoundError and the hub answers 401 for private repos, so the order matters.
_PERMANENT: dict[str, tuple[Callable[[BaseException], bool], str]] = {
    "gated": (
        _is(GatedRepoError),
        "{where} is a gated repo: accept its licence at {page} with your account, "
        "then set HF_TOKEN to a read token of that account ({auth}).",
    ),
    "bad_revision": (_is(RevisionNotFoundError), "revision {revision!r} does not exist in {repo}."),
    "unauthorized": (
        _has_status(401),
        "the hub refused access to {where} (401; {auth}). A private or gated "
        "repo needs HF_TOKEN set to a token with read access.",
    ),
    "not_found": (
        _is(RepositoryNotFoundError, RemoteEntryNotFoundError),
        "{where} was not found on the hub (check the name; a private repo also needs HF_TOKEN; {auth}).",
    ),
    "disabled": (_is(DisabledRepoError), "{where} has been disabled on the hub."),
    "forbidden": (_has_status(403), "the hub forbids access to {where} (403; {auth})."),
}


def classify(exc: BaseException, req: HubRequest) -> DownloadError | None:
    """The permanent :class:`DownloadError` for ``exc``, or None when it is not a known hub error."""
    auth = "a token was given" if req.token else "no token was given"
    page = f"{req.hub}/{req.repo_id}"
    for code, (matches, template) in _PERMANENT.items():
        if matches(exc):
            text = template.format(where=req.where, repo=req.repo_id, revision=req.revision, auth=auth, page=page)
            return req.error(text, code, True)
    return None


def summary(exc: BaseException) -> str:
    """The exception's type and first line, for a log line (scrub it: it may hold the token)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
