"""The compiled CPU cell list (``celllist.c``), loaded with ctypes when it was built.

``pip install`` builds it as a plain shared library (no Python or torch headers, seconds to
compile). Where no C compiler was available the torch implementation in
:mod:`eqcalc.neighbors` serves alone, with the same results.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

_I64 = ctypes.POINTER(ctypes.c_int64)
_F64 = ctypes.POINTER(ctypes.c_double)
_I32 = ctypes.POINTER(ctypes.c_int32)


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The loaded library, or ``None`` when it was not built."""
    for path in sorted(Path(__file__).parent.glob("_celllist*.so")):
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        lib.eqcalc_cell_list.restype = ctypes.c_int64
        lib.eqcalc_cell_list.argtypes = [ctypes.c_int64, _F64, _I64, _F64, _I32, _I64, _I64,
                                         ctypes.c_double, ctypes.c_int32, ctypes.c_int64,
                                         _I64, _I64, _I64]
        return lib
    return None


def _ptr(array: np.ndarray, kind):
    return array.ctypes.data_as(kind)


def cell_list(positions: np.ndarray, bins: np.ndarray, cell: np.ndarray, periodic: np.ndarray,
              n_bins: np.ndarray, search: np.ndarray, cutoff: float, self_interaction: bool,
              capacity: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, shift)`` of one system with ``|pos[j] - pos[i] + shift @ cell| < cutoff``.

    ``positions`` ``(n, 3)`` float64 (wrapped along periodic directions), ``bins`` ``(n, 3)``
    int64 bin of each atom, ``n_bins`` ``(3,)``, ``search`` ``(3,)`` bins to scan on each side.
    """
    lib = library()
    args = [np.ascontiguousarray(positions, dtype=np.float64), np.ascontiguousarray(bins, dtype=np.int64),
            np.ascontiguousarray(cell, dtype=np.float64), np.ascontiguousarray(periodic, dtype=np.int32),
            np.ascontiguousarray(n_bins, dtype=np.int64), np.ascontiguousarray(search, dtype=np.int64)]
    for _ in range(2):  # the second pass has the exact size
        i, j, s = (np.empty(capacity, np.int64), np.empty(capacity, np.int64),
                   np.empty((capacity, 3), np.int64))
        count = lib.eqcalc_cell_list(len(positions), _ptr(args[0], _F64), _ptr(args[1], _I64),
                                     _ptr(args[2], _F64), _ptr(args[3], _I32), _ptr(args[4], _I64),
                                     _ptr(args[5], _I64), float(cutoff), int(self_interaction),
                                     capacity, _ptr(i, _I64), _ptr(j, _I64), _ptr(s, _I64))
        if count < 0:
            raise MemoryError("the native cell list ran out of memory")
        if count <= capacity:
            return i[:count], j[:count], s[:count]
        capacity = count
    raise RuntimeError("native cell list: pair count changed between passes")  # unreachable
