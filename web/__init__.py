"""The web tier: Flask app factory, JSON API and server-rendered pages. Never imports TensorFlow."""

from web.app import create_app

__all__ = ["create_app"]
