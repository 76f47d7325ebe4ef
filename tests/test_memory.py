"""The allocator tuning that worker processes apply (glibc's mallopt)."""

from __future__ import annotations

import platform

import pytest

from ser_ml import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_applies_once() -> None:
    assert allocator.tune_malloc() is True
    assert allocator.tune_malloc() is True  # idempotent
