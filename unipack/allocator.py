"""Ask the C allocator to reuse freed large blocks instead of handing them back to the kernel.

A merge or a load makes and frees many arrays of a whole tensor (a member read, widened to
float64, its delta, the quantizer's work array...). glibc's malloc serves every block above its
mmap threshold (128 KiB, raised dynamically up to 32 MiB) with a fresh ``mmap`` and unmaps it on
``free``: each new array then pays a page fault per 4 KiB page, and the kernel zeroes every page
first. On tensors of tens of MB that is most of the time numpy spends: measured on this machine,
a loop that reads an 11.7M-element float32 tensor, widens it and scales it ran 5.5x faster with
the blocks kept in the heap, and a default merge of 14 real MiniLM fine-tunes' embedding (30522
x 384) went from 82.7 to 51.7 s, bytes identical (``tools/bench_speed.py`` has the whole-merge
figures). Peak memory is the same: a freed block is reused by the next array of its size.

The settings are process-wide (``mallopt``); unipack applies them, once, when it merges, adds or
loads. ``UNIPACK_MALLOC=default`` in the environment leaves the allocator as it is. Nothing is
done where the C library has no glibc ``mallopt`` (macOS, Windows); musl's accepts and ignores
them.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap and return to it when freed; the heap's free top
#: above this size goes back to the kernel, so a long-lived process that loaded a large member
#: keeps at most this much of it.
HEAP_LIMIT = 1 << 30
#: The largest mmap threshold some glibc versions accept (half their 64 MiB heap size): used
#: where HEAP_LIMIT is refused, still covering most tensors' blocks.
OLD_GLIBC_LIMIT = 32 << 20
#: The environment variable that turns this off.
ENV = "UNIPACK_MALLOC"

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Apply the settings above once per process; whether they are in effect."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(ENV, "").strip().lower() in ("default", "off", "0", "no"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Both are needed: a high mmap threshold alone sends freed blocks to the heap's top, which
    # free() then trims back to the kernel; a high trim threshold alone keeps mmap'd blocks out.
    if not (mallopt(M_MMAP_THRESHOLD, HEAP_LIMIT) or mallopt(M_MMAP_THRESHOLD, OLD_GLIBC_LIMIT)):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, HEAP_LIMIT))
