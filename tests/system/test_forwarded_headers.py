"""Forwarded headers are believed only from configured proxies; SER_PUBLIC_URL beats them all.

Against real gunicorn started with ``ser web``'s command line, since gunicorn's own forwarded
handling was half of the bug: with ``--forwarded-allow-ips '*'`` any client's
``X-Forwarded-Proto: https`` turned up in ``batch_url``. Behind nginx the shipped config
(``deploy/nginx/ser.conf.template``) is the proxy, so the hop counting is tested as deployed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import ValidationError

from ser_shared.settings import Settings
from tests.conftest import private_database
from tests.proxy_tools import Gunicorn, Nginx, tone_wav

WAV = tone_wav()
# Everything a client can write to steer the URLs the service hands back.
HOSTILE = {"Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil-forwarded.example",
           "X-Forwarded-Port": "444", "X-Forwarded-Prefix": "/evil", "X-Forwarded-For": "203.0.113.66"}


@pytest.fixture(scope="module")
def web_settings(pg_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Postgres and Redis, a database of its own; no worker listens on the queue."""
    data = tmp_path_factory.mktemp("forwarded")
    with private_database(pg_settings, data_dir=data, storage_dir=data / "uploads",
                          default_queue="forwarded-headers-test") as settings:
        yield settings


def upload(port: int, headers: dict[str, str]) -> dict[str, Any]:
    resp = requests.post(f"http://127.0.0.1:{port}/api/v1/jobs", files={"file": ("tone.wav", WAV, "audio/wav")},
                         headers=headers, timeout=30)
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    return body


def absolute_urls(body: dict[str, Any]) -> list[str]:
    return [body["batch_url"], *(job["url"] for job in body["jobs"])]


def logged_clients(gunicorn: Gunicorn) -> set[str]:
    """The client addresses in gunicorn's access log (its first field, REMOTE_ADDR after the app)."""
    return {line.split(" ", 1)[0] for line in gunicorn.log_text().splitlines() if '"POST /api/v1/jobs' in line}


def test_gunicorn_alone_believes_no_forwarded_header(web_settings: Settings, tmp_path: Path) -> None:
    web = Gunicorn(web_settings, tmp_path)
    try:
        urls = absolute_urls(upload(web.port, HOSTILE))
    finally:
        web.stop()
    # The Host header is all there is to go on without SER_PUBLIC_URL; the forwarded scheme, host,
    # port and prefix are not believed (the scheme was https before: gunicorn trusted anyone).
    assert all(url.startswith("http://evil.example/api/v1/") for url in urls), urls
    assert logged_clients(web) == {"127.0.0.1"}


def test_behind_nginx_only_the_proxys_own_values_count(web_settings: Settings, tmp_path: Path) -> None:
    web = Gunicorn(web_settings, tmp_path, {"SER_TRUSTED_PROXIES": "1"})
    try:
        proxy = Nginx(web.port, tmp_path)
        try:
            urls = absolute_urls(upload(proxy.port, HOSTILE))
        finally:
            proxy.stop()
    finally:
        web.stop()
    # nginx appended its own scheme (http) and host to the client's claims; one hop is trusted.
    assert all(url.startswith("http://evil.example/api/v1/") for url in urls), urls
    assert logged_clients(web) == {"127.0.0.1"}  # the address nginx saw, not the claimed 203.0.113.66


def test_two_trusted_hops_take_the_outer_proxys_values(web_settings: Settings, tmp_path: Path) -> None:
    """A TLS load balancer in front of nginx: the test plays it, appending to a client's claims."""
    web = Gunicorn(web_settings, tmp_path, {"SER_TRUSTED_PROXIES": "2"})
    outer_lb = {"Host": "public.example", "X-Forwarded-Proto": "http, https",
                "X-Forwarded-Host": "evil-forwarded.example, public.example",
                "X-Forwarded-For": "203.0.113.66, 198.51.100.7"}
    try:
        proxy = Nginx(web.port, tmp_path)
        try:
            urls = absolute_urls(upload(proxy.port, outer_lb))
        finally:
            proxy.stop()
    finally:
        web.stop()
    assert all(url.startswith("https://public.example/api/v1/") for url in urls), urls
    assert logged_clients(web) == {"198.51.100.7"}


def test_public_url_wins_over_host_and_forwarded_headers(web_settings: Settings, tmp_path: Path) -> None:
    web = Gunicorn(web_settings, tmp_path, {"SER_TRUSTED_PROXIES": "1", "SER_PUBLIC_URL": "https://ser.example.com/"})
    try:
        proxy = Nginx(web.port, tmp_path)
        try:
            urls = absolute_urls(upload(proxy.port, HOSTILE))
            docs = requests.get(f"http://127.0.0.1:{proxy.port}/docs/api", headers=HOSTILE, timeout=30)
        finally:
            proxy.stop()
    finally:
        web.stop()
    assert all(url.startswith("https://ser.example.com/api/v1/") for url in urls), urls
    assert docs.status_code == 200
    assert "https://ser.example.com/api/v1/jobs" in docs.text and "evil" not in docs.text


@pytest.mark.parametrize("value,expected", [("https://ser.example.com/", "https://ser.example.com"),
                                            ("http://10.0.0.5:8000", "http://10.0.0.5:8000"), ("", None)])
def test_public_url_is_an_origin(value: str, expected: str | None) -> None:
    assert Settings(public_url=value).public_url == expected


@pytest.mark.parametrize("value", ["ser.example.com", "ftp://ser.example.com", "https://ser.example.com/ser",
                                   "https://user:pw@ser.example.com", "https://ser.example.com/?a=1"])
def test_public_url_refuses_anything_but_an_origin(value: str) -> None:
    with pytest.raises(ValidationError, match="SER_PUBLIC_URL"):
        Settings(public_url=value)


def test_trusted_proxies_defaults_to_none() -> None:
    assert Settings().trusted_proxies == 0
    with pytest.raises(ValidationError):
        Settings(trusted_proxies=-1)
