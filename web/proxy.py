"""Which addressing a request may claim: forwarded headers, and the service's public URL.

Absolute URLs (``url_for(..., _external=True)``, ``request.url_root``) are built from the WSGI
environ's scheme and ``Host``. This module is the one place that decides them: ``ser web`` tells
gunicorn to trust no forwarded header itself (``--forwarded-allow-ips ''``), because gunicorn's
default rewrites the scheme from ``X-Forwarded-Proto`` for any client on its allow list.

- ``SER_TRUSTED_PROXIES=n`` (0: none) applies werkzeug's ``ProxyFix`` to ``X-Forwarded-For``,
  ``-Proto`` and ``-Host``: of each header's comma-separated values, the n-th from the right
  is taken, the one the outermost trusted proxy appended. Values a client sent ahead of those are
  never read. ``X-Forwarded-Port`` and ``-Prefix`` are ignored: the shipped nginx passes the port
  inside ``Host``, and a path prefix is not supported.
- ``SER_PUBLIC_URL`` (``https://ser.example.com``) fixes the scheme and host for every request,
  whatever ``Host`` and forwarded headers say; ``ProxyFix`` then only sets the client address.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from werkzeug.middleware.proxy_fix import ProxyFix

from ser_shared.settings import Settings

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


class PublicURL:
    """WSGI middleware: every request is addressed as ``base`` (scheme and host[:port])."""

    def __init__(self, app: WSGIApplication, base: str) -> None:
        parts = urlsplit(base)
        self.app, self.scheme, self.host = app, parts.scheme, parts.netloc

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["wsgi.url_scheme"] = self.scheme
        environ["HTTP_HOST"] = self.host
        return self.app(environ, start_response)


def wrap(app: WSGIApplication, settings: Settings) -> WSGIApplication:
    """``app`` behind the addressing the settings allow (unchanged with neither setting)."""
    if settings.public_url:
        app = PublicURL(app, settings.public_url)
    hops = settings.trusted_proxies
    if hops:
        # Outermost, so that it runs first and the public URL, when set, overrides what it set.
        app = ProxyFix(app, x_for=hops, x_proto=hops, x_host=hops, x_port=0, x_prefix=0)
    return app
