"""Logging set-up, called once per entry point."""

from __future__ import annotations

import logging
import os


def configure(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # TensorFlow's C++ banner is noise in service logs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
