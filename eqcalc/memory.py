"""How this process's C allocator treats the large tensors of a step, on CPU.

A model step on a few hundred atoms makes per-edge temporaries of tens to hundreds of MB. glibc
serves each allocation above its mmap threshold (at most 32 MB, adjusted at run time) with a fresh
``mmap`` and unmaps it when freed, so every step page-faults (and zeroes) that memory again: on
this project's 2-core machine that is about half of a float64 NequIP step at 864 atoms.
:func:`reuse_freed_memory` raises the threshold to 1 GiB and the trim threshold to 2 GiB, so
freed blocks stay in the heap and the next step reuses them; the process keeps its peak memory
instead of handing it back between steps (what a GPU caching allocator does too).

This is process-wide allocator state, so the library never sets it on its own: the ``eqcalc``
command does (its process is a simulation), and Python users who run long simulations call it
once. Numbers are unchanged; only where the memory comes from.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's malloc.h parameter numbers
MMAP_THRESHOLD_BYTES = 2 ** 30
TRIM_THRESHOLD_BYTES = 2 ** 31 - 1                # mallopt takes an int
_applied = False


def reuse_freed_memory() -> bool:
    """Keep freed CPU memory up to ~2 GiB in the process for reuse (see the module doc). Returns
    True when set (Linux with glibc), False where there is no glibc ``mallopt`` (nothing
    changed). Idempotent."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    _applied = ok
    log.debug("freed memory kept for reuse: %s", ok)
    return ok
