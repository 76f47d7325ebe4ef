"""The allocator tuning that worker processes apply (glibc's mallopt), seen in what malloc does."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from ser_shared.settings import REPO_ROOT

# Run in a fresh interpreter: the tuning is process-wide and cannot be undone, and in this process
# glibc's own dynamic threshold may already have moved (it rises when a large mmapped block is freed).
PROBE = """
import ctypes, ctypes.util, json
from ser_ml import allocator

libc = ctypes.CDLL(ctypes.util.find_library("c"))

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mmapped_by(size):
    before = libc.mallinfo2().hblkhd  # bytes in mmapped blocks
    return libc.malloc(size), libc.mallinfo2().hblkhd - before

MB = 1 << 20
_, untuned = mmapped_by(24 * MB)  # kept, never freed: a free would raise glibc's dynamic threshold
applied = [allocator.tune_malloc(), allocator.tune_malloc()]
block, tuned = mmapped_by(24 * MB)
_, large = mmapped_by(48 * MB)
libc.free(block)
print(json.dumps({"applied": applied, "untuned": untuned, "tuned": tuned, "large": large,
                  "heap_after_free": libc.mallinfo2().arena}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tuned_malloc_keeps_mid_sized_blocks_on_the_heap() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout)
    mb = 1 << 20
    assert seen["applied"] == [True, True]  # and a second call is harmless
    assert seen["untuned"] >= 24 * mb  # glibc's default: a fresh mmap for a 24 MB block
    assert seen["tuned"] == 0  # tuned: the same size from the heap, reused by the next recording
    assert seen["large"] >= 48 * mb  # above the 32 MB threshold, long recordings' arrays still use mmap
    assert seen["heap_after_free"] >= 24 * mb  # and a freed block is not trimmed back to the kernel
