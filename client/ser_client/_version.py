"""The installed distribution's version (one place to change it: client/pyproject.toml)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ser-client")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
