"""WSGI entry point for gunicorn: ``gunicorn web.wsgi:app``."""

from ser_shared import logs
from ser_shared.settings import get_settings
from web import create_app

logs.configure(get_settings().log_level, get_settings().log_format)
app = create_app()
