"""Triplets of a neighbor list, for angular message passing (DimeNet++, GemNet).

Edge ``e`` with ``edge_index[:, e] = (i, j)`` and shift ``S`` is the pair ``r_ij`` of
:mod:`eqcalc.keys`; its message flows from the neighbor ``j`` to the centre ``i`` ("edge j→i").
A triplet pairs an edge ``j→i`` with an edge ``k→j`` (centre ``j``, the neighbor of ``j→i``),
for every ``k`` except the image of ``i`` that ``j→i`` came from: edges are identified by
(atom, shift), so another periodic image of atom ``i`` is a different ``k`` and counts (cells
smaller than the cutoff have many). That excluded edge is the reverse of ``j→i``: edge
``(j, i, -S)``, present exactly once in a full list.

Index tensors are built with sort, cumsum and repeat_interleave: no Python loop over atoms or
edges, no ``.item()``, no data-dependent Python branch, so TorchScript and
``make_fx(tracing_mode="symbolic")`` (AOTInductor) take them; the triplet count is a size known
only at run time. :func:`plan` estimates the memory of a batch's triplets before a model
allocates it and splits the batch into pieces that fit.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
from torch import Tensor

from eqcalc.atoms import consecutive_ranges
from eqcalc.errors import SystemTooLargeError


def _degrees(centre: Tensor, n_atoms: int) -> Tensor:
    """Edges per centre atom ``(n_atoms,)`` int64 (index_add, not bincount: its size would
    depend on the data)."""
    return torch.zeros(n_atoms, dtype=torch.int64, device=centre.device).index_add(
        0, centre, torch.ones_like(centre))


def triplets(edge_index: Tensor, shifts: Tensor, n_atoms: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Triplets ``(kj, ji)`` and the reverse edge of every edge.

    ``edge_index`` ``(2, n_edges)`` (a full list), ``shifts`` ``(n_edges, 3)`` (integer values),
    ``n_atoms`` the number of atoms. Returns ``kj`` and ``ji`` ``(n_triplets,)`` int64, the edge
    ``k→j`` and the edge ``j→i`` of each triplet, grouped by ``ji`` in increasing order, and
    ``reverse`` ``(n_edges,)``: the index of edge ``(j, i, -S)`` for edge ``(i, j, S)``.
    """
    centre, neighbor = edge_index[0], edge_index[1]
    n_edges = centre.shape[0]
    degree = _degrees(centre, n_atoms)
    by_centre = torch.argsort(centre, stable=True)              # edges grouped by centre atom
    first = torch.cumsum(degree, 0) - degree                    # where each atom's group starts
    count = degree[neighbor]                                    # candidates k→j for each j→i
    ji = torch.repeat_interleave(torch.arange(n_edges, device=centre.device), count)
    rank = torch.arange(ji.shape[0], device=centre.device) - (torch.cumsum(count, 0) - count)[ji]
    kj = by_centre[first[neighbor[ji]] + rank]
    # k→j runs back along j→i when k is atom i in the image j→i came from: same atom, shift -S.
    back = (neighbor[kj] == centre[ji]) & (shifts[kj] + shifts[ji] == 0).all(1)
    turned = torch.nonzero(back).squeeze(1)
    reverse = torch.arange(n_edges, device=centre.device).scatter(0, ji[turned], kj[turned])
    keep = torch.nonzero(~back).squeeze(1)
    return kj[keep], ji[keep], reverse


def count(edge_index: Tensor, n_atoms: int) -> int:
    """Number of triplets :func:`triplets` returns for a full list ``edge_index``, without
    building them: ``sum over edges j→i of (degree(j) - 1)``."""
    degree = _degrees(edge_index[0], n_atoms)
    return int(degree[edge_index[1]].sum()) - int(edge_index.shape[1])


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation can get on ``device``: free CUDA memory plus what torch's caching
    allocator holds unused; on the CPU the kernel's MemAvailable (Linux), else free pages."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


#: Largest piece of a batch evaluated at once on the CPU: its throughput is flat well below this,
#: and a smaller peak leaves memory to whatever else runs on the machine.
CPU_PIECE_BYTES = 2 * 2**30


def plan(edge_index: Tensor, system: Tensor, n_systems: int, bytes_per_triplet: float,
         device: torch.device) -> List[Tuple[int, int]]:
    """Consecutive system ranges ``[(first, stop), ...]`` whose triplets each fit in half the
    available memory (at most :data:`CPU_PIECE_BYTES` on the CPU), estimated from the triplet
    count before anything is allocated. One range when the batch fits. Raises
    :class:`SystemTooLargeError`, naming the sizes, when a single system needs more than the
    available memory."""
    n_atoms = int(system.shape[0])
    degree = _degrees(edge_index[0], n_atoms)
    per_edge = (degree[edge_index[1]] - 1).to(torch.float64)
    per_system = torch.zeros(n_systems, dtype=torch.float64, device=per_edge.device).index_add(
        0, system[edge_index[0]], per_edge).tolist()
    have = available_memory(device)
    budget = have / 2 if device.type == "cuda" else min(have / 2, CPU_PIECE_BYTES)
    needs = [n * float(bytes_per_triplet) for n in per_system]
    for s, (n, need) in enumerate(zip(per_system, needs)):
        if need > have:
            atoms = int((system == s).sum())
            raise SystemTooLargeError(
                f"system {s} ({atoms:,} atoms) has {int(n):,} triplets (angle terms); the model "
                f"needs about {need / 2**30:.1f} GiB for them but {have / 2**30:.1f} GiB are available "
                f"on {device}. Use a smaller system, or a model without angle terms (e.g. 'painn', 'mace')")
    return consecutive_ranges(needs, budget)
