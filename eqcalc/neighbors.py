"""Periodic neighbor lists in pure torch (any device), an ASE drop-in, and Verlet skin reuse.

Conventions are those of :mod:`eqcalc.keys`: cell rows are lattice vectors and for edge ``e``
with ``i, j = edge_index[:, e]``::

    r_ij = positions[j] - positions[i] + shifts[e] @ cell[system[i]]

Lists are full (both directions), hold every pair with ``|r_ij| < cutoff`` (no caps) and are
sorted by ``i`` (deterministic order within ``i``).

Public API
----------
``compute_neighbors(positions, cell, pbc, cutoff, system=None, self_interaction=False)``
    torch tensors in, ``(edge_index, shifts)`` out, on the device of ``positions``.
``neighbor_list(quantities, atoms, cutoff, self_interaction=False)``
    drop-in for :func:`ase.neighborlist.neighbor_list` (quantities from ``"ijdDS"``).
``NeighborList(cutoff, skin=0.5)``
    Verlet list with skin reuse: ``update(positions, cell, pbc, system=None, numbers=None)``.

Algorithm and paths (measured on the busy 2-core CPU of the development machine, torch 2.13)
------------------------------------------------------------------------------------------
Every system gets an *effective cell*: periodic lattice vectors as given; each open direction
gets a unit vector orthogonal to the periodic ones (from an SVD), so open directions may have
zero or arbitrary cell vectors and fractional coordinates along them are in Å. Positions are
wrapped along periodic directions only; the wrap is folded back into ``S`` so ``r_ij`` is right
for the unwrapped input. Image ranges follow from the perpendicular heights
``h_k = V / |a_i x a_j|`` (computed as ``1 / |column k of cell^-1|``).

* **compiled cell list** (CPU, default where it was built): :mod:`eqcalc._native`, plain C
  loaded with ctypes, built by ``pip install`` (optional: without a compiler the torch paths
  below serve). Python prepares the wrapped positions, bins (about one cutoff thick: 27
  neighbour bins, measured faster in C than half-cutoff bins) and search ranges; C sorts atoms
  into bins, scans neighbour bins and writes pairs with their final shifts straight into the
  output buffer, one system after another. Quiet 2-core machine, fcc Cu, cutoff 5 Å
  (``eqcalc bench --what neighbors``): 1.9-3.1 / 5.6 / 20.7 ms at 864 / 4000 / 16384 atoms,
  0.8-1.7x vesin (1.9 / 6.0 / 25.5 ms in the same run), 3-5x faster than matscipy; the torch
  cell list below took 6.0 / 22 / 140 ms there. Also used for open systems.
* **cell list** (torch; every device, and CPU without the compiled library): bins ``~cutoff/2`` thick (fractional parallelepipeds along periodic
  directions, Å slabs along open ones; sparse systems get coarser bins, at most
  ``4 n_atoms + 64`` per system), atoms sorted by bin. Each atom is expanded over the
  ``(2m+1)^3`` neighbour-bin offsets (``m = ceil(cutoff / bin height)``, 2 for large cells, more
  images for cells smaller than the cutoff) using separable per-direction tables (linear bin,
  image, shift vector: an outer sum, no per-entry division), candidate ranges are expanded with
  a ``bincount``/``cumsum`` trick (5x faster than ``repeat_interleave`` on CPU) and filtered by
  distance in structure-of-arrays form. Bins of ``cutoff/2`` beat ``cutoff`` and ``cutoff/3``:
  fcc Cu 4000 atoms, 1 thread: 29 / 30 / 40 ms; 16384 atoms: 338 / 120 / 169 ms.
  Atoms are processed in blocks of at most ``_BLOCK_ENTRIES`` (atom, offset) entries and
  candidates in chunks of at most ``_MAX_CANDIDATES``, so a cutoff far larger than
  the cell gives the right answer in bounded memory.
* **all pairs** (single system with ``n_atoms**2 * n_images <= _ALL_PAIRS_MAX``): one broadcast
  distance tensor, no binning. Measured (1 thread, all pairs vs cell list): 10-atom molecule
  0.67 vs 1.9 ms, 80-atom molecule (6400) 1.0 vs 2.7 ms, 32-atom Cu cell with 27 images
  (27648) 1.8 vs 2.3 ms, 108-atom Cu cell (314928) 11.2 vs 3.2 ms: crossover ~4e4.
* **torch_cluster** (optional, imported lazily): when the compiled library is missing, used for
  fully non-periodic systems on CPU with
  at least ``_TORCH_CLUSTER_MIN_ATOMS`` atoms, where it measured faster than the torch cell list
  (random gas, 1 thread: 30 atoms 0.13 vs 0.75 ms, 1000 atoms 4.6 vs 7.4 ms, 16000 atoms 103
  vs 115 ms; its edges are re-filtered to ``< cutoff`` and sorted). It is never used on GPU
  (brute force there) or for periodic systems (no images); without it the torch path gives the
  same edges.

Performance against vesin (``benchmarks/bench_neighbors.py``, fcc Cu, cutoff 5 Å, machine
loaded by other jobs, so vesin itself ran at 2.8 / 11 / 43 ms): with one intra-op thread the
torch path takes 6.6 / 25 / 101 ms at 864 / 4000 / 16384 atoms, 2.3x vesin and on par with
matscipy; the cost is ~15 elementwise/gather passes over ~45 candidate pairs per atom (vesin
runs one fused C++ loop) plus ~100 op launches at small sizes. With torch's default 2 OpenMP
threads on that loaded 2-core machine each parallel op can wait a scheduler slice for its
second thread, which made calls 10-100x slower; smaller cache-sized blocks (2**15 entries,
slightly faster on one thread) multiply the number of parallel ops, so atoms are not blocked
unless memory requires it. Library code never changes ``torch.set_num_threads``.

Order: edges are sorted by ``i`` (atoms in input order); within one ``i`` the order is
deterministic (by neighbour bin, then position in the bin), not by ``j``. The torch_cluster
path is sorted by ``i`` then ``j``.
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

import numpy as np
import torch

from eqcalc import _native as native
from eqcalc.atoms import to_ase
from eqcalc.errors import CellError, InvalidAtomsError, InvalidOptionError

__all__ = ["compute_neighbors", "neighbor_list", "NeighborList", "compute_edge_vectors"]

# relative safety margin on the cutoff when sizing bins and image ranges
_EPS = 1e-8
# bins per cutoff length (bin edge ~ cutoff / _BINS_PER_CUTOFF); measured, see module docstring
_BINS_PER_CUTOFF = 2
# the compiled loop takes one-cutoff bins from this many atoms on (see _search)
_NATIVE_FINE_BINS_BELOW = 2048
# at most this many bins per atom (+64) per system: sparse systems get larger bins
_MAX_BINS_PER_ATOM = 4
# candidate pairs per chunk (each candidate costs ~100 bytes transiently)
_MAX_CANDIDATES = 1 << 23
# single-system all-pairs path when n_atoms**2 * n_images is at most this (measured crossover)
_ALL_PAIRS_MAX = 40000
# atom blocks of at most this many (atom, bin offset) entries (memory bound)
_BLOCK_ENTRIES = 1 << 21


# non-periodic CPU systems with at least this many atoms use torch_cluster when importable
_TORCH_CLUSTER_MIN_ATOMS = 32
# a periodic direction needing more images than this (cutoff / perpendicular height) is refused:
# such a cell (height < 5e-3 Å at a 5 Å cutoff) is not physical, and the search over its images
# would run for minutes inside compiled code that Ctrl-C cannot stop
MAX_IMAGES = 1000

# ----------------------------------------------------------------------------------------------
# input handling and validation
# ----------------------------------------------------------------------------------------------
def _prepare(positions, cell, pbc, cutoff, system):
    if not isinstance(positions, torch.Tensor):
        positions = torch.as_tensor(np.asarray(positions, dtype=np.float64))
    if not positions.is_floating_point():
        positions = positions.to(torch.float64)
    device, dtype = positions.device, positions.dtype
    if positions.dim() != 2 or positions.shape[1] != 3:
        raise InvalidAtomsError(
            f"positions must have shape (n_atoms, 3), got {tuple(positions.shape)}; "
            "pass one row of Cartesian coordinates (Å) per atom")
    cell = torch.as_tensor(cell, dtype=dtype, device=device)
    pbc = torch.as_tensor(pbc, device=device).to(torch.bool)
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    if pbc.dim() == 1:
        pbc = pbc.unsqueeze(0)
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise InvalidAtomsError(
            f"cell must have shape (n_systems, 3, 3) or (3, 3), got {tuple(cell.shape)}; "
            "rows are lattice vectors in Å")
    if pbc.shape != (cell.shape[0], 3):
        raise InvalidAtomsError(
            f"pbc must have shape (n_systems, 3) matching cell {tuple(cell.shape)}, got "
            f"{tuple(pbc.shape)}; give three booleans per system")
    n_systems = cell.shape[0]
    n_atoms = positions.shape[0]
    unsorted = False
    if system is None:
        if n_systems != 1:
            raise InvalidAtomsError(
                f"system is None but cell holds {n_systems} systems; pass system (n_atoms,) "
                "with the index of the system of each atom")
    else:
        system = torch.as_tensor(system, device=device).to(torch.int64)
        if system.shape != (n_atoms,):
            raise InvalidAtomsError(
                f"system must have shape (n_atoms,) = ({n_atoms},), got {tuple(system.shape)}")
        if n_systems == 1:
            if n_atoms and bool((system != 0).any()):
                raise InvalidAtomsError("system indexes a system beyond cell (1 system); "
                                        "system values must lie in [0, n_systems)")
            system = None
        elif n_atoms:
            lo, hi, unsorted = torch.stack([system.min(), system.max(),
                                            (system[1:] < system[:-1]).any().to(torch.int64)]).tolist()
            if lo < 0 or hi >= n_systems:
                raise InvalidAtomsError(
                    f"system holds values outside [0, {n_systems}) (cell holds {n_systems} systems); "
                    "give each atom the index of its system")
    try:
        if isinstance(cutoff, bool):
            raise TypeError
        cutoff = float(cutoff)
    except (TypeError, ValueError):
        raise InvalidAtomsError(f"cutoff must be a positive number in Å, got {cutoff!r}") from None
    if not (math.isfinite(cutoff) and cutoff > 0):
        raise InvalidAtomsError(
            f"cutoff must be a positive finite number in Å, got {cutoff!r}; pass e.g. cutoff=5.0")
    return positions, cell, pbc, cutoff, system, n_systems, bool(unsorted)


def _effective_cell(positions, cell, pbc, system, cutoff):
    """Validate, then give the effective cell (open rows replaced by an orthonormal complement
    of the periodic rows), its inverse and whether any direction is periodic."""
    if not bool(torch.isfinite(positions).all()):
        bad = torch.nonzero(~torch.isfinite(positions).all(1)).flatten()[:10].tolist()
        raise InvalidAtomsError(
            f"positions contain NaN or inf (atoms {bad}); fix the structure (e.g. the last "
            "optimisation/MD step diverged) before computing neighbors")
    if cell.device.type != "cpu":
        return _cell_geometry(cell, pbc, cutoff)
    # MD and relaxations at a fixed cell rebuild the list for the same cell every step
    key = (cell.detach().numpy().tobytes(), pbc.numpy().tobytes(), str(cell.dtype), float(cutoff))
    with _GEOMETRY_LOCK:
        found = _GEOMETRY.get(key)
    if found is None:
        found = _cell_geometry(cell.detach(), pbc, cutoff)  # raises for a bad cell: nothing kept
        with _GEOMETRY_LOCK:
            while len(_GEOMETRY) >= _GEOMETRY_SIZE:
                _GEOMETRY.pop(next(iter(_GEOMETRY)))
            _GEOMETRY[key] = found
    return found


#: :func:`_cell_geometry` of the last few CPU cells, by value (validated cells only; the
#: tensors are only read).
_GEOMETRY: dict = {}
_GEOMETRY_SIZE = 8
_GEOMETRY_LOCK = threading.Lock()


def _cell_geometry(cell, pbc, cutoff):
    """Checks of ``cell`` (``(B, 3, 3)``) and ``pbc`` for ``cutoff`` (one host sync), then the
    effective cell ``(B, 3, 3)``, its inverse and whether any direction is periodic."""
    n_systems = cell.shape[0]
    per_rows = cell * pbc.unsqueeze(-1).to(cell.dtype)
    norms = torch.linalg.norm(per_rows, dim=-1)                                   # (B, 3)
    cell_finite = torch.isfinite(cell).all()
    safe_rows = torch.where(torch.isfinite(per_rows), per_rows, torch.zeros_like(per_rows))
    _, sv, vh = torch.linalg.svd(safe_rows)                                      # rows of vh
    n_per = pbc.sum(1)                                                            # (B,)
    smallest = sv.gather(1, (n_per - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    singular = (n_per > 0) & (smallest <= 1e-10 * sv[:, 0])
    zero_vec = pbc & (norms <= 1e-10)
    checks = torch.stack([
        cell_finite.logical_not(),
        zero_vec.any(),
        singular.any(),
        pbc.any(),
    ]).tolist()
    if checks[0]:
        raise InvalidAtomsError(
            "cell contains NaN or inf; give finite lattice vectors (use zeros along "
            "non-periodic directions)")
    if checks[1]:
        s, k = torch.nonzero(zero_vec)[0].tolist()
        raise CellError(
            f"cell vector {k} of system {s} is zero but pbc[{k}] is True; set a nonzero lattice "
            f"vector for that direction or make it non-periodic (pbc[{k}]=False)")
    if checks[2]:
        s = int(torch.nonzero(singular)[0])
        raise CellError(
            f"the periodic cell vectors of system {s} are linearly dependent (singular cell: "
            f"{cell[s].tolist()}); give independent lattice vectors or mark the degenerate "
            "direction non-periodic")
    # open direction k gets the (rank among open directions)-th null-space vector of the
    # periodic rows; the null space is spanned by vh rows n_per..2 (singular values sorted)
    open_rank = torch.cumsum((~pbc).to(torch.int64), dim=1) - 1
    idx = (n_per.unsqueeze(1) + open_rank).clamp(0, 2)
    comp = vh.gather(1, idx.unsqueeze(-1).expand(n_systems, 3, 3))
    eff = torch.where(pbc.unsqueeze(-1), cell, comp)
    inv = torch.linalg.inv(eff)
    if checks[3]:
        _check_heights(inv, pbc, cutoff)
    return eff, inv, bool(checks[3])


def _check_heights(inv, pbc, cutoff):
    """:class:`CellError` for a periodic direction thinner than ``cutoff / MAX_IMAGES``."""
    heights = 1.0 / torch.linalg.norm(inv, dim=1)                                 # (B, 3)
    images = torch.where(pbc, cutoff / heights, torch.zeros_like(heights))
    worst = images.flatten().argmax()
    if float(images.flatten()[worst]) > MAX_IMAGES:
        s, k = divmod(int(worst), 3)
        raise CellError(
            f"the cell of system {s} is only {float(heights[s, k]):.3g} Å thick along periodic "
            f"direction {k}: a cutoff of {cutoff:g} Å would need {float(images[s, k]):.3g} periodic "
            f"images (at most {MAX_IMAGES}). No physical cell is this flat; check the cell (units? a "
            f"missing or nearly parallel vector?), make direction {k} open (pbc[{k}]=False), or "
            "reduce a skewed cell (ase.build.niggli_reduce)")


def _atom_matmul(x, mats, system):
    """x (N, 3) @ mats[system] (N, 3, 3); mats (B, 3, 3)."""
    if system is None:
        return x @ mats[0]
    return torch.bmm(x.unsqueeze(1), mats[system]).squeeze(1)


def _segment_minmax(values, system, n_systems):
    if system is None:
        return values.amin(0, keepdim=True), values.amax(0, keepdim=True)
    idx = system.unsqueeze(1).expand_as(values)
    big = torch.full((n_systems, 3), float("inf"), dtype=values.dtype, device=values.device)
    lo = big.scatter_reduce(0, idx, values, "amin", include_self=True)
    hi = (-big).scatter_reduce(0, idx, values, "amax", include_self=True)
    # systems without atoms
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    return lo, hi


# ----------------------------------------------------------------------------------------------
# the torch neighbor search
# ----------------------------------------------------------------------------------------------
def compute_neighbors(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor,
                      cutoff: float, system: Optional[torch.Tensor] = None,
                      self_interaction: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full neighbor list ``(edge_index, shifts)`` of one system or a batch of systems.

    Args:
        positions: ``(n_atoms, 3)`` float64, Å, not necessarily wrapped into the cell.
        cell: ``(n_systems, 3, 3)`` (or ``(3, 3)`` for one system), rows are lattice vectors;
            vectors of open directions may be zero or arbitrary.
        pbc: ``(n_systems, 3)`` (or ``(3,)``) bool.
        cutoff: Å, pairs with ``|r_ij| < cutoff`` are edges.
        system: ``(n_atoms,)`` int64 in ``[0, n_systems)``; ``None`` for one system. Sorted
            (atoms of a system contiguous) is fastest; other orders are sorted here.
        self_interaction: keep the pair ``i == i`` with zero shift.

    Returns:
        ``edge_index`` ``(2, n_edges)`` int64 (``[0]`` centre ``i``, ``[1]`` neighbor ``j``, global
        atom indices) and ``shifts`` ``(n_edges, 3)`` int64 with
        ``r_ij = positions[j] - positions[i] + shifts @ cell[system[i]]``. Sorted by ``i``
        (deterministic within ``i``). Self-images (``i == j``, ``S != 0``) are included when the cell is small.

    Raises:
        InvalidAtomsError: bad shapes, NaN/inf positions or cell, non-positive cutoff.
        CellError: a periodic direction with a zero cell vector, a singular periodic cell, or
            one thinner than ``cutoff / MAX_IMAGES``.
    """
    positions, cell, pbc, cutoff, system, n_systems, unsorted = _prepare(
        positions, cell, pbc, cutoff, system)
    device = positions.device
    n_atoms = positions.shape[0]
    if n_atoms == 0:
        return (torch.zeros((2, 0), dtype=torch.int64, device=device),
                torch.zeros((0, 3), dtype=torch.int64, device=device))
    if unsorted:
        return _unsorted(positions, cell, pbc, cutoff, system, self_interaction)
    eff, inv, any_pbc = _effective_cell(positions, cell, pbc, system, cutoff)
    if (not any_pbc and device.type == "cpu" and n_atoms >= _TORCH_CLUSTER_MIN_ATOMS
            and not self_interaction and native.library() is None):
        edge_index = _torch_cluster_radius(positions, cutoff, system)
        if edge_index is not None:
            return edge_index, torch.zeros((edge_index.shape[1], 3), dtype=torch.int64,
                                           device=device)
    return _search(positions, eff, inv, pbc, cutoff, system, n_systems, self_interaction)


def _unsorted(positions, cell, pbc, cutoff, system, self_interaction):
    """Atoms of a system not contiguous: search the sorted batch, map indices back (edges never
    join two systems), sorted by ``i`` again."""
    perm = torch.argsort(system, stable=True)
    edge_index, shifts = compute_neighbors(positions[perm], cell, pbc, cutoff, system[perm],
                                           self_interaction)
    edge_index = perm[edge_index]
    order = torch.argsort(edge_index[0], stable=True)
    return edge_index[:, order], shifts[order]


def _bins(frac, heights, pbc, system, n_systems, n_atoms, cut, per_cutoff):
    """Bins: parallelepipeds of the (effective) cell about ``cut / per_cutoff`` thick.

    Returns bins per direction ``nb`` ``(n_systems, 3)``, the search range ``m`` ``(n_systems, 3)``
    (bins to scan on each side) and each atom's bin ``(n_atoms, 3)``, all int64.
    """
    dtype, device, i64 = frac.dtype, frac.device, torch.int64
    lo, hi = _segment_minmax(frac, system, n_systems)
    lo = torch.where(pbc, torch.zeros_like(lo), lo)
    extent = torch.where(pbc, heights, hi - lo)
    nb = torch.floor(extent * per_cutoff / cut).clamp(min=1)
    if system is None:
        n_per_system = torch.full((1,), float(n_atoms), dtype=dtype, device=device)
    else:
        n_per_system = torch.bincount(system, minlength=n_systems).to(dtype)
    limit = n_per_system * _MAX_BINS_PER_ATOM + 64
    for _ in range(3):  # sparse systems get fewer, larger bins (each pass only lowers nb)
        factor = (nb.prod(1) / limit).clamp(min=1.0) ** (1.0 / 3.0)
        nb = torch.floor(nb / factor.unsqueeze(1) + 1e-9).clamp(min=1)
    # bin edge along each direction (fractional units along periodic, Å along open ones)
    binlen = torch.where(pbc, 1.0 / nb, (extent / nb * (1 + 1e-9) + 1e-12).clamp(
        min=cut / per_cutoff))
    nb = torch.where(pbc, nb, torch.floor(extent / binlen).clamp(min=0) + 1)
    # search range in bins: the perpendicular bin height times m must exceed the cutoff
    m = torch.ceil(cut / (binlen * heights) - 1e-12)
    m = torch.where(pbc, m, torch.minimum(m, nb - 1)).clamp(min=0)
    nb_i, m_i = nb.to(i64), m.to(i64)
    lo_a, scale_a, nb_a = (lo, 1.0 / binlen, nb_i) if system is None else (
        lo[system], (1.0 / binlen)[system], nb_i[system])
    bcoord = torch.floor((frac - lo_a) * scale_a).to(i64)
    return nb_i, m_i, torch.minimum(bcoord.clamp(min=0), nb_a - 1)


def _search(positions, eff, inv, pbc, cutoff, system, n_systems, self_interaction):
    device, dtype = positions.device, positions.dtype
    n_atoms = positions.shape[0]
    i64 = torch.int64
    frac = _atom_matmul(positions, inv, system)                                   # (N, 3)
    pbc_atom = pbc[0] if system is None else pbc[system]
    wrap = torch.where(pbc_atom, torch.floor(frac), torch.zeros_like(frac))       # (N, 3)
    frac = frac - wrap
    pos_w = positions - _atom_matmul(wrap, eff, system)
    wrap_i = wrap.to(i64)
    heights = 1.0 / torch.linalg.norm(inv, dim=1)                                 # (B, 3)
    cut = cutoff * (1.0 + _EPS)

    if system is None:
        n_img = torch.where(pbc[0], torch.ceil(cut / heights[0]), torch.zeros_like(heights[0]))
        n_images = int(torch.prod(2 * n_img + 1))
        if n_atoms * n_atoms * n_images <= _ALL_PAIRS_MAX:
            return _all_pairs(pos_w, wrap_i, eff[0], n_img.to(i64), cutoff, self_interaction)

    # The compiled loop is fastest with bins of about one cutoff on large systems (27 neighbour
    # bins, fewer visits: 5324 atoms 6.0 vs 6.6 ms) but half-cutoff bins on small cells, whose
    # one-cutoff bins round down to a whole cell side (108 atoms, 11.7 Å cell, 6 Å: 0.53 vs 0.77
    # ms); the torch path always takes half-cutoff bins (fewer candidates per atom).
    native_cpu = device.type == "cpu" and native.library() is not None
    nb_i, m_i, bcoord = _bins(frac, heights, pbc, system, n_systems, n_atoms, cut,
                              1 if native_cpu and n_atoms >= _NATIVE_FINE_BINS_BELOW else _BINS_PER_CUTOFF)
    n_bins_sys = nb_i.prod(1)
    host = torch.cat([n_bins_sys, nb_i.reshape(-1), m_i.reshape(-1),
                      wrap_i.abs().max().reshape(1)]).tolist()                  # one sync
    if host[-1] >= (1 << 18):
        raise InvalidAtomsError(
            f"positions lie {host[-1]} cell lengths outside the cell; wrap them into the cell "
            "(ase: atoms.wrap()) before computing neighbors")
    if native_cpu:
        return _native_search(pos_w, bcoord, wrap_i, eff, pbc, host, cutoff, system, n_systems,
                              self_interaction)
    nb_a = nb_i if system is None else nb_i[system]
    bin_base = torch.cumsum(n_bins_sys, 0) - n_bins_sys
    strides = torch.stack([nb_i[:, 1] * nb_i[:, 2], nb_i[:, 2], torch.ones_like(nb_i[:, 2])], 1)
    lin = (bcoord * (strides if system is None else strides[system])).sum(1)
    if system is not None:
        lin = lin + bin_base[system]
    total_bins = int(sum(host[:n_systems]))
    m_h = host[4 * n_systems:7 * n_systems]
    m_max = [max(m_h[d::3]) for d in range(3)]
    order = torch.argsort(lin, stable=True)
    sentinel = torch.zeros(1, dtype=i64, device=device)
    counts = torch.cat([torch.bincount(lin, minlength=total_bins), sentinel])
    starts = torch.cumsum(counts, 0) - counts

    # ---- per direction, per atom: linear-bin term, image and shift vector of each offset ---
    # the neighbour bin of offset (o0, o1, o2) is sum_d lin_d[o_d]; invalid (outside an open
    # direction or beyond the system's range) terms are total_bins (an empty sentinel bin)
    lin_terms, img_terms = [], []
    for d in range(3):
        o = torch.arange(-m_max[d], m_max[d] + 1, device=device)                  # (W,)
        c = bcoord[:, d:d + 1] + o                                                # (N, W)
        nbd = nb_a[:, d:d + 1]
        img = torch.div(c, nbd, rounding_mode="floor")
        per = (pbc[0:1] if system is None else pbc_atom)[:, d:d + 1]
        ok = per | (img == 0)
        if system is not None:
            ok = ok & (o.abs() <= m_i[system, d:d + 1])
        img = img * per
        term = (c - img * nbd) * (strides[0, d] if system is None else strides[system, d:d + 1])
        if d == 0 and system is not None:
            term = term + bin_base[system].unsqueeze(1)
        lin_terms.append(torch.where(ok, term, torch.full_like(term, total_bins)))
        img_terms.append(img)
    cell_a = eff if system is None else eff[system]                               # (N|1, 3, 3)
    cut2 = cutoff * cutoff
    w0, w1, w2 = (t.shape[1] for t in lin_terms)
    k_tot = w0 * w1 * w2
    # shift-vector terms minus the centre position, per Cartesian component
    sv_terms = []
    for x in range(3):
        sv_terms.append([img_terms[d].to(dtype) * cell_a[:, d, x:x + 1]
                         - (pos_w[:, x:x + 1] if d == 0 else 0.0) for d in range(3)])
    # packed shift code: 21 bits per component (offset 2**20), the centre wrap folded in, so a
    # hit needs one gather (and the neighbour's packed wrap) to recover S = img + w_i - w_j
    wcode = (wrap_i[:, 0] << 42) + (wrap_i[:, 1] << 21) + wrap_i[:, 2]               # (N,)
    code_terms = [(img_terms[d] + (1 << 20)) << (21 * (2 - d)) for d in range(3)]
    code_terms[0] = code_terms[0] + wcode.unsqueeze(1)
    zero_code = sum((1 << 20) << (21 * (2 - d)) for d in range(3))
    unpack = torch.tensor([42, 21, 0], dtype=i64, device=device)

    pos_sorted = pos_w.index_select(0, order).t().contiguous()                    # (3, N)
    px, py, pz = pos_sorted[0], pos_sorted[1], pos_sorted[2]
    block = max(1, min(_MAX_CANDIDATES // 4, _BLOCK_ENTRIES) // k_tot)
    out_i, out_j, out_s = [], [], []

    def outer(t, a0, a1):
        return (t[0][a0:a1, :, None, None] + t[1][a0:a1, None, :, None]
                + t[2][a0:a1, None, None, :]).reshape(-1)

    for a0 in range(0, n_atoms, block):
        a1 = min(n_atoms, a0 + block)
        nlin = outer(lin_terms, a0, a1).clamp_(max=total_bins)                    # (E,)
        cnt = counts.index_select(0, nlin)
        csum = torch.cumsum(cnt, 0)
        base = starts.index_select(0, nlin) - (csum - cnt)
        q = [outer(sv_terms[x], a0, a1) for x in range(3)]
        code = outer(code_terms, a0, a1)
        n_cand = int(csum[-1])
        if n_cand == 0:
            continue
        if n_cand <= _MAX_CANDIDATES:
            bounds = [0, cnt.shape[0]]
        else:
            cuts = torch.searchsorted(csum, torch.arange(_MAX_CANDIDATES, n_cand, _MAX_CANDIDATES,
                                                         device=device), right=True).tolist()
            bounds = sorted(set([0] + cuts + [cnt.shape[0]]))
        ends = torch.cat([sentinel, csum])[torch.tensor(bounds, device=device)].tolist()
        for t in range(len(bounds) - 1):
            e0, e1, p0, p1 = bounds[t], bounds[t + 1], ends[t], ends[t + 1]
            if p1 == p0:
                continue
            # entry of each candidate: count entry ends (bincount + cumsum beats repeat_interleave)
            ent = torch.bincount(csum[e0:e1] - p0, minlength=p1 - p0 + 1)[:p1 - p0]
            ent = torch.cumsum(ent, 0).add_(e0)
            idx = base.index_select(0, ent).add_(torch.arange(p0, p1, device=device))
            dx = px.index_select(0, idx).add_(q[0].index_select(0, ent))
            dy = py.index_select(0, idx).add_(q[1].index_select(0, ent))
            dz = pz.index_select(0, idx).add_(q[2].index_select(0, ent))
            d2 = dx.mul_(dx).addcmul_(dy, dy).addcmul_(dz, dz)
            hit = torch.nonzero(d2 < cut2).squeeze(1)
            eh = ent.index_select(0, hit)
            jj = order.index_select(0, idx.index_select(0, hit))
            ii = torch.div(eh, k_tot, rounding_mode="floor").add_(a0)
            ch = code.index_select(0, eh).sub_(wcode.index_select(0, jj))
            if not self_interaction:
                keep = torch.nonzero((ii != jj) | (ch != zero_code)).squeeze(1)
                if keep.shape[0] != ii.shape[0]:
                    ii, jj, ch = ii[keep], jj[keep], ch[keep]
            ss = ((ch.unsqueeze(1) >> unpack) & 0x1FFFFF).sub_(1 << 20)
            out_i.append(ii)
            out_j.append(jj)
            out_s.append(ss)
    if not out_i:
        return (torch.zeros((2, 0), dtype=i64, device=device),
                torch.zeros((0, 3), dtype=i64, device=device))
    if len(out_i) == 1:
        return torch.stack([out_i[0], out_j[0]]), out_s[0]
    return torch.stack([torch.cat(out_i), torch.cat(out_j)]), torch.cat(out_s)


def _native_search(pos_w, bcoord, wrap_i, eff, pbc, host, cutoff, system, n_systems,
                   self_interaction):
    """The compiled cell list (:mod:`eqcalc._native`) over the bins of :func:`_bins`; wraps are
    folded back into the shifts as in the torch path."""
    nb = np.asarray(host[n_systems:4 * n_systems], dtype=np.int64).reshape(n_systems, 3)
    m = np.asarray(host[4 * n_systems:7 * n_systems], dtype=np.int64).reshape(n_systems, 3)
    pos, bins, cells, periodic = pos_w.numpy(), bcoord.numpy(), eff.numpy(), pbc.numpy()
    wrap = wrap_i.numpy() if host[-1] > 0 else None  # atoms inside the cell need no fix-up
    bounds = [0, len(pos)] if system is None else np.searchsorted(
        system.numpy(), np.arange(n_systems + 1)).tolist()
    systems = [(a, pos[a:b], bins[a:b], None if wrap is None else wrap[a:b], cells[k], periodic[k],
                nb[k], m[k]) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    # ~4/3 pi rc^3 * 0.1 atoms/Å^3 neighbours per atom as a first guess of the size
    edge_index, shifts = native.cell_list(systems, cutoff, self_interaction,
                                          len(pos) * int(0.42 * cutoff ** 3 + 8))
    return torch.from_numpy(edge_index), torch.from_numpy(shifts)


def _all_pairs(pos_w, wrap_i, cell, n_img, cutoff, self_interaction):
    """Single system, every (i, j, image) at once; output ordered by i, j, image."""
    device, dtype = pos_w.device, pos_w.dtype
    ranges = [torch.arange(-int(n), int(n) + 1, device=device) for n in n_img.tolist()]
    images = torch.cartesian_prod(*ranges).reshape(-1, 3)                         # (K, 3)
    vec = images.to(dtype) @ cell
    diff = (pos_w.unsqueeze(0) - pos_w.unsqueeze(1)).unsqueeze(2) + vec           # (N, N, K, 3)
    d2 = (diff * diff).sum(-1)
    hit = d2 < cutoff * cutoff
    if not self_interaction:
        n = pos_w.shape[0]
        zero = int(((images == 0).all(1)).nonzero()[0])
        eye = torch.eye(n, dtype=torch.bool, device=device)
        hit[:, :, zero] &= ~eye
    ii, jj, kk = torch.nonzero(hit, as_tuple=True)
    shifts = images[kk] + wrap_i[ii] - wrap_i[jj]
    return torch.stack([ii, jj]), shifts


def _torch_cluster_radius(positions, cutoff, system=None):
    """Non-periodic radius graph with torch_cluster (optional), or None when it is missing.

    Returns ``edge_index`` (2, n_edges) sorted by ``i`` then ``j``, exactly ``|r_ij| < cutoff``.
    """
    try:
        from torch_cluster import radius_graph
    except Exception:  # ImportError, or a broken binary build
        return None
    n_atoms = positions.shape[0]
    ei = radius_graph(positions, r=float(cutoff) * (1 + _EPS), batch=system, loop=False,
                      max_num_neighbors=max(n_atoms, 1), flow="target_to_source")
    ii, jj = ei[0], ei[1]
    d = positions.index_select(0, jj) - positions.index_select(0, ii)
    keep = torch.nonzero((d * d).sum(1) < cutoff * cutoff).squeeze(1)
    ii, jj = ii[keep], jj[keep]
    perm = torch.argsort(ii * n_atoms + jj)
    return torch.stack([ii[perm], jj[perm]])


def compute_edge_vectors(positions, cell, edge_index, shifts, system=None):
    """``r_ij = positions[j] - positions[i] + shifts @ cell[system[i]]``, ``(n_edges, 3)``."""
    from eqcalc.derivatives import edge_vectors

    cell = cell if cell.dim() == 3 else cell.unsqueeze(0)
    if system is None:
        system = torch.zeros(positions.shape[0], dtype=torch.int64, device=positions.device)
    return edge_vectors(positions, cell.to(positions.dtype), edge_index, shifts.to(positions.dtype), system)


def edge_pairs(edge_index: torch.Tensor, shifts: torch.Tensor, n_atoms: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unordered pairs of a neighbor list: ``first`` ``(n_pairs,)``, the lowest edge of each
    pair, and ``pair`` ``(n_edges,)``, the pair of each edge (int64).

    Edge ``(i, j, S)`` and its reverse ``(j, i, -S)`` form one pair. Their vectors are exact
    negatives of each other, as functions of positions and cell (:func:`edge_vectors` rounds
    both the same way), so anything computed from the length and symmetrically from the two
    species is the same on both, values and derivatives: ``f(x[first])[pair]`` is ``f(x)``
    at half the work. An edge whose reverse is not in the list is a pair of its own.
    """
    i, j = edge_index[0], edge_index[1]
    n_edges = i.shape[0]
    if i.device.type == "cpu" and native.library() is not None:  # the same pairs, one pass in C
        found = native.edge_pairs(n_atoms, i.numpy(), j.numpy(), shifts.detach().numpy())
        if found is None:
            raise InvalidAtomsError(f"edge_index names an atom outside 0..{n_atoms - 1}: the neighbor list "
                                    "does not belong to these atoms")
        return torch.from_numpy(found[0]), torch.from_numpy(found[1])
    return _edge_pairs_torch(edge_index, shifts, n_atoms)


def _edge_pairs_torch(edge_index: torch.Tensor, shifts: torch.Tensor, n_atoms: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`edge_pairs` in torch operations (any device; the reference of the compiled one)."""
    i, j = edge_index[0], edge_index[1]
    n_edges = i.shape[0]
    s = shifts.round().to(torch.int64)
    span = 2 * int(s.abs().max()) + 1 if n_edges > 0 else 1
    if float(n_atoms) ** 2 * float(span) ** 3 >= 2.0 ** 62:  # the key below would overflow: no pairs
        every = torch.arange(n_edges, device=i.device)
        return every, every
    code = (s[:, 0] * span + s[:, 1]) * span + s[:, 2]
    flip = (i > j) | ((i == j) & (code < 0))  # each pair's own orientation: i < j, or i == j and S > 0
    a, b = torch.where(flip, j, i), torch.where(flip, i, j)
    key = (a * n_atoms + b) * span ** 3 + torch.where(flip, -code, code) + span ** 3 // 2
    keys, pair = torch.unique(key, return_inverse=True)
    first = torch.full((keys.shape[0],), n_edges, dtype=torch.int64, device=i.device).scatter_reduce(
        0, pair, torch.arange(n_edges, device=i.device), "amin")
    return first, pair


# ----------------------------------------------------------------------------------------------
# ASE drop-in
# ----------------------------------------------------------------------------------------------
def neighbor_list(quantities: str, atoms, cutoff: float, self_interaction: bool = False):
    """Drop-in for :func:`ase.neighborlist.neighbor_list` with a single float cutoff.

    ``quantities`` is any combination of ``i`` (centre, int), ``j`` (neighbor, int), ``D``
    (``r_ij`` vector, float, Å), ``d`` (distance, float, Å) and ``S`` (cell shift, int), in any
    order; one letter returns one array, several return a tuple in that order.
    """
    if not isinstance(quantities, str) or not quantities or any(q not in "ijdDS"
                                                                  for q in quantities):
        raise InvalidOptionError(
            f"quantities={quantities!r} is not valid; use letters from 'ijdDS' "
            "(i, j indices, d distance, D vector, S shift), e.g. 'ijS'")
    if isinstance(cutoff, (dict, list, tuple, np.ndarray)):
        raise InvalidOptionError(
            "cutoff must be a single float (Å) here; per-element or per-atom cutoffs are not "
            "supported, use ase.neighborlist.neighbor_list for those")
    atoms = to_ase(atoms)  # a pymatgen Structure is accepted wherever Atoms is
    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    cell = np.ascontiguousarray(np.asarray(atoms.cell), dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool)
    pos_t = torch.from_numpy(positions)
    edge_index, shifts = compute_neighbors(pos_t, torch.from_numpy(cell), torch.from_numpy(pbc),
                                           cutoff, self_interaction=self_interaction)
    i = edge_index[0].numpy()
    j = edge_index[1].numpy()
    S = shifts.numpy()
    D = None
    out = []
    for q in quantities:
        if q == "i":
            out.append(i)
        elif q == "j":
            out.append(j)
        elif q == "S":
            out.append(S)
        else:
            if D is None:
                D = positions[j] - positions[i] + S @ cell
            out.append(D if q == "D" else np.sqrt((D * D).sum(1)))
    return out[0] if len(out) == 1 else tuple(out)


# ----------------------------------------------------------------------------------------------
# Verlet list with skin
# ----------------------------------------------------------------------------------------------
class NeighborList:
    """Neighbor list built with ``cutoff + skin`` and reused while no atom moved more than
    ``skin / 2`` since the last build and cell, pbc, numbers, n_atoms and system are unchanged.

    A reused list holds every pair within ``cutoff`` (Verlet guarantee) and possibly some edges
    longer than ``cutoff`` (up to ``cutoff + skin``): models must mask edges by length.
    ``skin=0`` rebuilds on every call. ``n_builds`` counts rebuilds, ``n_calls`` calls.
    Moving an atom across a periodic boundary by wrapping counts as a large move (rebuild).
    """

    def __init__(self, cutoff: float, skin: float = 0.5, self_interaction: bool = False):
        if not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff > 0):
            raise InvalidAtomsError(f"cutoff must be a positive finite number in Å, got {cutoff!r}")
        if not (isinstance(skin, (int, float)) and math.isfinite(skin) and skin >= 0):
            raise InvalidOptionError(f"skin must be a finite number >= 0 (Å), got {skin!r}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.self_interaction = self_interaction
        self.n_builds = 0
        self.n_calls = 0
        self.edge_index: Optional[torch.Tensor] = None
        self.shifts: Optional[torch.Tensor] = None
        self._ref = None

    def reset(self) -> None:
        """Forget the stored list: the next update rebuilds."""
        self._ref = None

    @staticmethod
    def _same(a, b) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))

    def _reusable(self, positions, cell, pbc, system, numbers) -> bool:
        ref = self._ref
        if ref is None or self.skin <= 0:
            return False
        pos0, cell0, pbc0, sys0, num0 = ref
        if pos0.shape != positions.shape or pos0.device != positions.device:
            return False
        if not (self._same(cell0, cell) and self._same(pbc0, pbc) and self._same(sys0, system)
                and self._same(num0, numbers)):
            return False
        disp2 = ((positions - pos0) ** 2).sum(1).max()
        return bool(disp2 <= (0.5 * self.skin) ** 2)

    def update(self, positions, cell, pbc, system=None, numbers=None):
        """Return ``(edge_index, shifts)`` for ``cutoff + skin``, rebuilt only when needed."""
        self.n_calls += 1
        positions = torch.as_tensor(positions)
        if not positions.is_floating_point():
            positions = positions.to(torch.float64)
        cell = torch.as_tensor(cell, dtype=positions.dtype, device=positions.device)
        pbc = torch.as_tensor(pbc, device=positions.device).to(torch.bool)
        if cell.dim() == 2:
            cell = cell.unsqueeze(0)
        if pbc.dim() == 1:
            pbc = pbc.unsqueeze(0)
        system = None if system is None else torch.as_tensor(system, device=positions.device)
        numbers = None if numbers is None else torch.as_tensor(numbers, device=positions.device)
        if self._reusable(positions, cell, pbc, system, numbers):
            return self.edge_index, self.shifts
        self.edge_index, self.shifts = compute_neighbors(
            positions, cell, pbc, self.cutoff + self.skin, system=system,
            self_interaction=self.self_interaction)
        self.n_builds += 1
        self._ref = (positions.detach().clone(), cell.detach().clone(), pbc.clone(),
                     None if system is None else system.clone(),
                     None if numbers is None else numbers.clone())
        return self.edge_index, self.shifts
