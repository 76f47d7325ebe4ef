"""Security headers on every response: the pages, the API, static files and errors alike.

The pages load only their own scripts, styles, images and audio, so the policy allows nothing
else: no inline script or style (the templates keep theirs in ``static/``, bars are SVG), no
framing, no plugins, forms that post only here. A response that sets its own policy (the served
recordings, see ``web.media``) keeps it.
"""

from __future__ import annotations

from flask import Flask, Response

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "media-src 'self'",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # A response is what its Content-Type says, never what a browser guesses from its bytes.
    "X-Content-Type-Options": "nosniff",
    # frame-ancestors for the browsers that read only this.
    "X-Frame-Options": "DENY",
    # Job and batch ids in page addresses stay on this site.
    "Referrer-Policy": "same-origin",
}


def register(app: Flask) -> None:
    app.after_request(add_security_headers)


def add_security_headers(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response
