"""Standard Webhooks: signing, the address checks that keep deliveries off internal networks, one HTTP attempt.

No Redis and no torch here; `qwen_deploy.webhook_store` keeps the deliveries and runs the dispatcher.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from qwen_deploy.errors import Unprocessable

EVENTS = ("start", "output", "completed")
DEFAULT_FILTER = ("completed",)
# Addresses that are globally routable yet internal by convention (cloud metadata services).
METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("100.100.100.200"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)
USER_AGENT = "qwen-deploy-webhooks/1"
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 8215 local-use NAT64: where the IPv4 address sits depends on the operator's prefix length.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


class WebhookRefused(Exception):
    """The URL may not be called (scheme, host or address)."""


class Unresolvable(WebhookRefused):
    """The host has no address right now (retried at delivery, refused at submit)."""


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` header value: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    raw = secret.removeprefix("whsec_")
    key = base64.b64decode(raw + "=" * (-len(raw) % 4))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def embedded(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, which a gateway or tunnel may hand on to.

    IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::a.b.c.d``, 6to4
    ``2002:AABB:CCDD::`` and Teredo (server and client) addresses.
    """
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in _COMPATIBLE or ip in _NAT64:  # the last 32 bits
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local, shared, reserved, multicast and metadata addresses.

    An IPv6 address that embeds an IPv4 address is judged by that one too, and local-use NAT64 is refused.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL or any(blocked(v4) for v4 in embedded(ip)):
            return True
        if ip.ipv4_mapped is not None:
            return False  # judged above as the IPv4 address it is
    return ip in METADATA or not ip.is_global or ip.is_multicast


def _host_port(url: str) -> tuple[str, str, int]:
    if any(c <= " " or c == "\x7f" for c in url):  # urlsplit would drop tabs and newlines silently
        raise WebhookRefused("the webhook URL may not contain spaces or control characters (percent-encode them)")
    try:
        parts = urlsplit(url)
        explicit = parts.port
    except ValueError:
        raise WebhookRefused("the webhook URL has an invalid host or port") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("the webhook must be an http or https URL")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise WebhookRefused("the webhook URL needs a host and no user name or password")
    if explicit == 0:
        raise WebhookRefused("the webhook URL has an invalid port")
    if not (parts.path + parts.query).isascii():
        raise WebhookRefused("the webhook URL's path and query must be ASCII (percent-encode the rest)")
    return parts.scheme, parts.hostname.lower().rstrip("."), explicit or (443 if parts.scheme == "https" else 80)


def resolve(url: str, allowed_hosts: list[str] | tuple[str, ...] = ()) -> tuple[str, str, int, str]:
    """(scheme, host, port, address to connect to) once every address of the host passed the check."""
    scheme, host, port = _host_port(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unresolvable(f"cannot resolve the webhook host {host!r}: {exc}") from None
    addresses = [str(info[4][0]).split("%")[0] for info in infos]
    if host not in {h.lower().rstrip(".") for h in allowed_hosts}:
        bad = [a for a in addresses if blocked(ipaddress.ip_address(a))]
        if bad:
            raise WebhookRefused(
                f"the webhook host {host!r} resolves to a non-public address ({bad[0]}); "
                "list it in webhooks.allowed_hosts to allow it"
            )
    return scheme, host, port, addresses[0]


def check_request(url: Any, events: Any, settings: Any) -> dict[str, str]:
    """The record fields for a submitted webhook and filter; 422 `invalid_webhook` when they may not be used."""
    if url is None:
        if events is not None:
            raise Unprocessable("webhook_events_filter needs a webhook", code="invalid_webhook", param="webhook")
        return {}
    if settings.webhooks.secret is None:
        raise Unprocessable(
            "webhooks are not enabled here (webhooks.secret is not set)", code="invalid_webhook", param="webhook"
        )
    if len(url) > 2048:
        raise Unprocessable("the webhook URL is longer than 2048 characters", code="invalid_webhook", param="webhook")
    try:
        resolve(url, settings.webhooks.allowed_hosts)
    except WebhookRefused as exc:
        raise Unprocessable(str(exc), code="invalid_webhook", param="webhook") from None
    return {"webhook": url, "webhook_events_filter": json.dumps(sorted(set(events or DEFAULT_FILTER)))}


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt (the response body is not kept)."""

    status_code: int | None
    duration_ms: float
    error: str | None = None
    retry_after: float | None = None


def destination(url: str) -> str:
    """``host:port`` of a webhook URL (what the per-receiver limit counts); "" when it cannot be sent."""
    try:
        _, host, port = _host_port(url)
    except WebhookRefused:
        return ""
    return f"{host}:{port}"


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to an address checked beforehand (no second DNS lookup to rebind)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, connect_timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address, self._connect_timeout = address, min(timeout, connect_timeout)

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self._connect_timeout)
        self.sock.settimeout(self.timeout)


class _PinnedTLS(_Pinned):
    def connect(self) -> None:
        super().connect()
        self.sock = ssl.create_default_context().wrap_socket(self.sock, server_hostname=self.host)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def post(
    url: str,
    body: str,
    headers: dict[str, str],
    timeout: float,
    allowed_hosts: list[str],
    connect_timeout: float = 3.0,
) -> Attempt:
    """One POST, no redirects followed; the address is checked again right before connecting. `timeout`
    bounds the whole attempt, `connect_timeout` the opening of the connection."""
    started = time.monotonic()

    def took() -> float:
        return round((time.monotonic() - started) * 1000, 1)

    try:
        scheme, host, port, address = resolve(url, allowed_hosts)
    except Unresolvable as exc:
        return Attempt(None, took(), f"dns: {exc}")
    except WebhookRefused as exc:
        return Attempt(None, took(), f"refused: {exc}")
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = (_PinnedTLS if scheme == "https" else _Pinned)(host, port, address, timeout, connect_timeout)
    watchdog = threading.Timer(timeout, _cut, (conn,))  # the whole attempt, not only each socket read
    watchdog.start()
    try:
        conn.request(
            "POST",
            target,
            body=body.encode(),
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers},
        )
        response = conn.getresponse()
        response.read(65536)  # drained, never stored
        return Attempt(response.status, took(), None, _retry_after(response.getheader("Retry-After")))
    except (OSError, http.client.HTTPException) as exc:
        if getattr(conn, "cut", False):
            return Attempt(None, took(), f"timeout: no complete answer within {timeout:g} s")
        kind = "timeout" if isinstance(exc, TimeoutError | socket.timeout) else "connection"
        return Attempt(None, took(), f"{kind}: {exc.__class__.__name__}: {exc}"[:300])
    finally:
        watchdog.cancel()
        conn.close()


def _cut(conn: http.client.HTTPConnection) -> None:
    conn.cut = True  # type: ignore[attr-defined]
    try:
        if conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def next_delay(attempt: Attempt, attempts_made: int, schedule: list[float]) -> float | None:
    """Seconds before the next try, or None when the delivery is over (delivered, or not to be retried)."""
    code = attempt.status_code
    if code is not None and 200 <= code < 300:
        return None
    retriable = (
        code is None
        and not (attempt.error or "").startswith("refused")
        or code == 429
        or (code is not None and code >= 500)
    )
    if not retriable or attempts_made > len(schedule):
        return None
    delay = schedule[attempts_made - 1]
    if code == 429 and attempt.retry_after is not None:
        delay = min(attempt.retry_after, max(schedule))
    return delay
