"""API keys (`Authorization: Bearer` or `X-Api-Key`), owners, admin routes and the Host check.

With keys configured every route but the probes and the console page needs one; the caller's owner
(`flask.g.owner`) is a hash of its key, recorded on every job and batch it creates. Without keys
the owner is "anonymous". Admin keys (`web.admin_keys`) are also needed for downloads, exports and
/metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from flask import Flask, g, request
from werkzeug.sansio.utils import host_is_trusted

from qwen_deploy.config import ConfigError, Settings
from qwen_deploy.errors import AppError, Forbidden, Unauthorized

ANONYMOUS = "anonymous"
PROBE_PATHS = frozenset({"/livez", "/readyz"})  # open for load balancers and kubelets: no secrets in them
OPEN_PATHS = PROBE_PATHS | {"/"}  # the console page holds no data; its API calls send the key
OPEN_PREFIXES = ("/static/",)
ADMIN_ROUTES = frozenset(
    {
        ("POST", "/v1/models/downloads"),
        ("POST", "/v1/models/exports"),
        ("GET", "/metrics"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/v1/register_model"),
        ("POST", "/v1/unregister_model"),
    }
)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "localhost.localdomain")


def owner_of(key: str) -> str:
    """The owner recorded for a key: the first 16 hex digits of its SHA-256 (the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def current_owner() -> str:
    """The owner of the request in progress ("anonymous" when auth is off)."""
    return str(g.get("owner", ANONYMOUS))


def require_admin() -> None:
    """403 `admin_required` unless the request carries an admin key (or keys are off)."""
    if not g.get("admin", False):
        raise Forbidden("this route needs an admin key (web.admin_keys)", code="admin_required", param="Authorization")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings, host: str | None = None) -> None:
    """Refuse a non-loopback bind without API keys unless `web.allow_unauthenticated` says so."""
    host = host or settings.web.host
    if not settings.web.keyed and not is_loopback(host) and not settings.web.allow_unauthenticated:
        raise ConfigError(
            f"refusing to serve {host} without API keys: set web.api_keys "
            "(QWEN_DEPLOY_WEB__API_KEYS) or web.allow_unauthenticated: true"
        )


def trusted_hosts(settings: Settings) -> list[str] | None:
    """Host header names served (None: any); defaults to the loopback names and the bind host."""
    hosts = settings.web.trusted_hosts
    if hosts is None:
        hosts = [*LOOPBACK_NAMES, "[::1]", settings.web.host]
    return None if "*" in hosts else hosts


def _match(given: bytes, keys: list[bytes]) -> bool:
    """Constant-time over every key, so timing does not tell which one nearly matched."""
    matched = False
    for key in keys:
        matched |= bool(given) and hmac.compare_digest(given, key)
    return matched


def _given_key() -> str:
    """The key of `Authorization: Bearer <key>`, else of `X-Api-Key` (as Anthropic's clients send it)."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header.removeprefix("Bearer ").strip()
    return request.headers.get("X-Api-Key", "").strip()


def register(app: Flask, settings: Settings) -> None:
    check_bind(settings)
    admin = [k.get_secret_value().encode() for k in settings.web.admin_keys]
    keys = [k.get_secret_value().encode() for k in settings.web.api_keys] + admin
    hosts = trusted_hosts(settings)
    seen: dict[str, bool] = {}  # Host header -> trusted (werkzeug IDNA-encodes on every check)

    def trusted(host: str) -> bool:
        if host not in seen:
            if len(seen) >= 256:
                seen.clear()
            seen[host] = host_is_trusted(host, hosts)
        return seen[host]

    @app.before_request
    def _check_request() -> None:
        """The Host check (not for the probes), then the key (not for the open paths)."""
        path = request.path
        if hosts is not None and path not in PROBE_PATHS and not trusted(request.host):
            raise AppError(
                "this Host is not served here (web.trusted_hosts)", code="untrusted_host", param="Host", status_code=400
            )
        g.owner, g.admin = ANONYMOUS, not keys
        if not keys or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return
        given = _given_key()
        raw = given.encode("utf-8", "surrogateescape")
        if not _match(raw, keys):
            raise Unauthorized(
                "missing or invalid API key (send Authorization: Bearer <key> or X-Api-Key: <key>)",
                param="Authorization",
            )
        g.owner, g.admin = owner_of(given), _match(raw, admin)
        method = "GET" if request.method == "HEAD" else request.method  # HEAD runs the GET view
        if (method, path) in ADMIN_ROUTES and not g.admin:
            raise Forbidden(
                "this route needs an admin key (web.admin_keys)", code="admin_required", param="Authorization"
            )
