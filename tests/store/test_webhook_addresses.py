"""Webhook URLs: IPv6 forms that embed an IPv4 address are judged by that address, and URLs that could
never be sent are refused at submit with 422 (real redis-server, the web app in-process)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import redis

from qwen_deploy.cli.redis_server import RedisServer
from qwen_deploy.config import load_settings
from qwen_deploy.webhooks import WebhookRefused, blocked, embedded, resolve
from web import create_app

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEY = "k-webhook-addresses"

EMBEDDING_PRIVATE = {
    "IPv4-mapped": "::ffff:10.0.0.1",
    "IPv4-compatible loopback": "::127.0.0.1",
    "IPv4-compatible private": "::192.168.1.1",
    "IPv4-compatible metadata": "::169.254.169.254",
    "NAT64 loopback": "64:ff9b::127.0.0.1",
    "NAT64 private": "64:ff9b::10.1.2.3",
    "NAT64 local-use": "64:ff9b:1:7f00:1::",
    "6to4 loopback": "2002:7f00:1::1",
    "6to4 private": "2002:c0a8:101::",
    "Teredo, client 127.0.0.1": "2001:0:4136:e378:8000:63bf:80ff:fffe",
}


@pytest.mark.parametrize("address", EMBEDDING_PRIVATE.values(), ids=EMBEDDING_PRIVATE.keys())
def test_ipv6_embedding_a_private_ipv4_is_refused(address: str) -> None:
    assert blocked(ipaddress.ip_address(address))
    with pytest.raises(WebhookRefused, match="non-public"):
        resolve(f"http://[{address}]:8080/hook")


def test_embedded_addresses_and_public_ones_pass() -> None:
    six = ipaddress.IPv6Address
    assert embedded(six("::127.0.0.1")) == [ipaddress.IPv4Address("127.0.0.1")]
    assert embedded(six("64:ff9b::8.8.8.8")) == [ipaddress.IPv4Address("8.8.8.8")]
    assert embedded(six("2002:808:808::1")) == [ipaddress.IPv4Address("8.8.8.8")]
    assert embedded(six("2606:4700::1111")) == []
    for public in ("::8.8.8.8", "64:ff9b::8.8.8.8", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111"):
        assert not blocked(ipaddress.ip_address(public)), public
    assert resolve("http://[64:ff9b::8.8.8.8]/hook")[3] == "64:ff9b::808:808"


@pytest.fixture()
def http(server: RedisServer) -> Any:
    redis.Redis.from_url(server.url).flushdb()
    hooks = {"secret": SECRET, "allowed_hosts": ["127.0.0.1"]}
    sections = {"web": {"api_keys": [KEY]}, "limits": {"max_queued_unserved": 1000}, "webhooks": hooks}
    environ = {"REDIS_URL": server.url, "QWEN_DEPLOY_ENV_FILE": "no.env"}
    return create_app(load_settings(environ=environ, overrides=sections)).test_client()


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://127.0.0.1/a hook", "spaces or control"),
        ("http://127.0.0.1/a\nhook", "spaces or control"),
        ("http://127.0.0.1/a\thook", "spaces or control"),
        ("http://127.0.0.1/a\x7fhook", "spaces or control"),
        ("http://127.0.0.1:0/hook", "invalid port"),
        ("http://127.0.0.1:70000/hook", "invalid host or port"),
        ("http://127.0.0.1:8o/hook", "invalid host or port"),
        ("http://[::1/hook", "invalid host or port"),
        ("http://127.0.0.1/h\u00e9", "ASCII"),
        ("http://[::127.0.0.1]/hook", "non-public"),
        ("http://[64:ff9b::10.0.0.1]/hook", "non-public"),
        ("http://[2002:a00:1::]/hook", "non-public"),
    ],
)
def test_unsendable_urls_get_422_at_submit(http: Any, server: RedisServer, url: str, needle: str) -> None:
    answer = http.post("/v1/jobs", json={"prompt": "x", "webhook": url}, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 422, answer.get_data(as_text=True)
    error = answer.get_json()["error"]
    assert (error["code"], error["param"]) == ("invalid_webhook", "webhook") and needle in error["message"]
    assert not redis.Redis.from_url(server.url).keys("*:job:*")  # nothing was queued


def test_a_loopback_receiver_in_allowed_hosts_still_passes(http: Any) -> None:
    answer = http.post(
        "/v1/jobs",
        json={"prompt": "x", "webhook": "http://127.0.0.1:8080/hook?a=1"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert answer.status_code == 202, answer.get_data(as_text=True)
