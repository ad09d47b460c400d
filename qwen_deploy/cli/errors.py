"""User mistakes and unreachable services as one sentence each, never a traceback.

`main` runs every command through `explain`: an exception it knows becomes `qwen-deploy: <what is
wrong and what to do>` on stderr and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import requests

from qwen_deploy.client import APIError

_progress = {"shown": False}


def progress_shown() -> bool:
    """Whether a command wrote a progress line (an error then starts on a new line)."""
    return _progress["shown"]


def mark_progress() -> None:
    _progress["shown"] = True


def _unreachable(exc: BaseException) -> str:
    url = _request_url(exc)
    return (
        f"cannot reach the API at {url}: is `qwen-deploy up` running there? "
        "Start it, or pass --url http://HOST:PORT of a running server."
    )


def _bad_url(exc: BaseException) -> str:
    return f"{exc}. Pass --url as http://HOST:PORT (for example http://127.0.0.1:8000)."


def _timeout(exc: BaseException) -> str:
    return f"the API at {_request_url(exc)} did not answer in time; it may be overloaded. Try again later."


def _missing_file(exc: BaseException) -> str:
    assert isinstance(exc, OSError)
    return f"{exc.filename}: {exc.strerror or exc}"


def _hub_id(exc: BaseException) -> str:
    return f"not a Hugging Face repo id or local directory: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _model_load(exc: BaseException, name: str) -> str:
    if looks_like_path(name) and not Path(name).expanduser().is_dir():
        why = f"the model directory {name} does not exist"
    else:
        why = f"the model {name} could not be loaded ({_first_line(exc)})"
    return (
        f"{why}. Download it first (`qwen-deploy download ORG/NAME`), point model.name_or_path at a local "
        "model directory, or try the demo model (`qwen-deploy up --demo`)."
    )


def looks_like_path(name: str) -> bool:
    """A model name meant as a directory (`/…`, `./…`, `~/…`, or one that exists) rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def _api(exc: BaseException) -> str:
    return str(exc)


def _request_url(exc: BaseException) -> str:
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None) or "the configured address"
    return str(url).split("/v1/", 1)[0].rstrip("/") if "://" in str(url) else str(url)


class ModelLoadError(Exception):
    """A model that cannot be loaded in this process (raised by the in-process commands)."""


def _by_name(*names: str) -> Callable[[BaseException], bool]:
    """Matches an exception class by name anywhere in its MRO (huggingface_hub stays a lazy import)."""
    return lambda exc: any(cls.__name__ in names for cls in type(exc).__mro__)


# First match wins: (test, sentence).
_KNOWN: list[tuple[Callable[[BaseException], bool], Callable[[BaseException], str]]] = [
    (lambda e: isinstance(e, APIError), _api),
    (lambda e: isinstance(e, ModelLoadError), lambda e: str(e)),
    (
        lambda e: isinstance(
            e, (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL)
        ),
        _bad_url,
    ),
    (lambda e: isinstance(e, requests.exceptions.ConnectionError), _unreachable),
    (lambda e: isinstance(e, requests.exceptions.Timeout), _timeout),
    (_by_name("HFValidationError"), _hub_id),
    (
        lambda e: isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)),
        _missing_file,
    ),
]


def explain(exc: BaseException) -> str | None:
    """The sentence for a known failure, or None (a bug: let its traceback show)."""
    for matches, sentence in _KNOWN:
        if matches(exc):
            return sentence(exc)
    return None


def run(command: Callable[[], int]) -> int:
    """Run a command; known failures print one line and exit 1, Ctrl-C exits 130."""
    try:
        return command()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as exc:
        message = explain(exc)
        if message is None:
            raise
        print(("\n" if progress_shown() else "") + f"qwen-deploy: {message}", file=sys.stderr)
        return 1


def model_load_error(exc: BaseException, name: str) -> ModelLoadError:
    """The one-sentence error for the model `name` that failed to load in this process."""
    return ModelLoadError(_model_load(exc, name))


def normalize_url(url: str) -> str:
    """`localhost:8000` → `http://localhost:8000` (a URL without a scheme is what people type)."""
    url = url.strip()
    return url if "://" in url else f"http://{url}"
