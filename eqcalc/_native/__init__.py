"""Compiled CPU kernels, loaded with ctypes when they were built: the cell list
(``celllist.c``, :func:`cell_list`) and the edge tensor product (``tensor_product.c``,
:func:`tensor_product_library`, used through :mod:`potentials.fused`).

``pip install`` builds them as plain shared libraries (no Python or torch headers, seconds to
compile). Where no C compiler was available the torch implementations (:mod:`eqcalc.neighbors`,
:class:`potentials.o3.EdgeTensorProduct`) serve alone, with the same results.
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


def _load(stem: str) -> Optional[ctypes.CDLL]:
    for path in sorted(Path(__file__).parent.glob(f"{stem}.*so")):
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


def _cpu_flags() -> set:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The loaded cell list, or ``None`` when it was not built."""
    lib = _load("_celllist")
    if lib is not None:
        lib.eqcalc_cell_list.restype = ctypes.c_int64
        lib.eqcalc_cell_list.argtypes = [ctypes.c_int64, _F64, _I64, _F64, _I32, _I64, _I64,
                                         _I64, ctypes.c_int64, ctypes.c_double, ctypes.c_int32, ctypes.c_int64,
                                         _I64, _I64, _I64]
        lib.eqcalc_edge_pairs.restype = ctypes.c_int64
        lib.eqcalc_edge_pairs.argtypes = [ctypes.c_int64, ctypes.c_int64, _I64, _I64, _F64, _I64, _I64]
    return lib


@functools.lru_cache(maxsize=1)
def tensor_product_library() -> Optional[ctypes.CDLL]:
    """The loaded edge tensor product kernels (``eqcalc_tp_{forward,backward}_{f32,f64}``, raw
    pointers as integers; the AVX2 + FMA build where the CPU has both), or ``None`` when they
    were not built."""
    return (tensor_product_build("_tensor_product_avx2") if {"avx2", "fma"} <= _cpu_flags() else None) \
        or tensor_product_build("_tensor_product")


class PathLayout(ctypes.Structure):
    """``Path`` of ``tensor_product.c``: one path of a layer (sizes, element offsets, pointers)."""
    _fields_ = [(name, ctypes.c_int64) for name in ("M1", "M3", "C", "h_off", "gh_off", "r_off", "out_off")] + \
               [(name, ctypes.c_void_p) for name in ("F", "out", "g", "grad_F")]


@functools.lru_cache(maxsize=None)
def tensor_product_build(stem: str) -> Optional[ctypes.CDLL]:
    """One build of the kernels (``_tensor_product``: baseline CPU; ``_tensor_product_avx2``)."""
    lib = _load(stem)
    if lib is not None:
        n, p = ctypes.c_int64, ctypes.c_void_p
        # atoms, edges, paths (n, PathLayout[n]), h, its strides, r, its row stride, its rows, r_row, i, j
        shape = [n, n, n, ctypes.POINTER(PathLayout), p, n, n, p, n, n, p, p, p]
        for suffix in ("_f32", "_f64"):
            forward, backward = getattr(lib, "eqcalc_tp_forward" + suffix), getattr(lib, "eqcalc_tp_backward" + suffix)
            forward.restype = backward.restype = ctypes.c_int64
            forward.argtypes = shape + [ctypes.c_int32, n]  # threads, private_bytes
            backward.argtypes = shape + [p, n, n, p, n, ctypes.c_int32, n]  # dL/dh, its strides, dL/dr, its stride
    return lib


def _ptr(array: np.ndarray, kind):
    return array.ctypes.data_as(kind)


def cell_list(systems, cutoff: float, self_interaction: bool, capacity: int
              ) -> Tuple[np.ndarray, np.ndarray]:
    """Pairs of a batch: ``edge_index`` ``(2, n_edges)`` and ``shifts`` ``(n_edges, 3)``, int64.

    ``systems``: one tuple per system of ``(offset, positions (n, 3) float64 wrapped along
    periodic directions, bins (n, 3) int64, wrap (n, 3) int64 or None, cell (3, 3), periodic (3,),
    n_bins (3,), search (3,))``; ``|pos[j] - pos[i] + shift @ cell| < cutoff`` with shifts
    for the unwrapped positions. ``capacity`` is a first guess of the pair count.
    """
    lib = library()
    prepared = []
    for offset, pos, bins, wrap, cell, periodic, n_bins, search in systems:
        prepared.append((offset, np.ascontiguousarray(pos, np.float64), np.ascontiguousarray(bins, np.int64),
                         None if wrap is None else np.ascontiguousarray(wrap, np.int64),
                         np.ascontiguousarray(cell, np.float64), np.ascontiguousarray(periodic, np.int32),
                         np.ascontiguousarray(n_bins, np.int64), np.ascontiguousarray(search, np.int64)))
    while True:
        edge_index, shifts = np.empty((2, capacity), np.int64), np.empty((capacity, 3), np.int64)
        total = 0
        for offset, pos, bins, wrap, cell, periodic, n_bins, search in prepared:
            room = max(capacity - total, 0)
            count = lib.eqcalc_cell_list(
                len(pos), _ptr(pos, _F64), _ptr(bins, _I64), _ptr(cell, _F64), _ptr(periodic, _I32),
                _ptr(n_bins, _I64), _ptr(search, _I64), None if wrap is None else _ptr(wrap, _I64),
                offset, float(cutoff), int(self_interaction), room,
                _ptr(edge_index[0, total:], _I64), _ptr(edge_index[1, total:], _I64),
                _ptr(shifts[total:], _I64))
            if count < 0:
                raise MemoryError("the compiled cell list ran out of memory")
            total += count
        if total <= capacity:
            # Contiguous, so no consumer (torch.export guards on strides) sees the buffer size.
            return np.ascontiguousarray(edge_index[:, :total]), shifts[:total]
        capacity = total  # the exact size: the second pass fits


def edge_pairs(n_atoms: int, i: np.ndarray, j: np.ndarray, shifts: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(first, pair)`` of :func:`eqcalc.neighbors.edge_pairs` by ``celllist.c`` (int64 arrays),
    or ``None`` for an atom index outside ``0..n_atoms-1``."""
    i, j = np.ascontiguousarray(i, np.int64), np.ascontiguousarray(j, np.int64)
    shifts = np.ascontiguousarray(shifts, np.float64)
    pair, first = np.empty(len(i), np.int64), np.empty(len(i), np.int64)
    n_pairs = library().eqcalc_edge_pairs(n_atoms, len(i), _ptr(i, _I64), _ptr(j, _I64), _ptr(shifts, _F64),
                                          _ptr(pair, _I64), _ptr(first, _I64))
    if n_pairs == -1:
        raise MemoryError("the compiled pair search ran out of memory")
    return None if n_pairs < 0 else (first[:n_pairs].copy(), pair)
