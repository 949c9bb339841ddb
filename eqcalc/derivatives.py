"""Forces and stress for every architecture, from one function.

An *energy model* maps a graph batch (see :mod:`eqcalc.keys`) to per-atom energies and,
optionally, direct forces from a force head. :class:`ForceStressModel` wraps any energy model:

* conservative forces ``F = -∂E/∂r`` by autograd;
* stress ``σ = (1/V) ∂E/∂ε`` from a symmetric strain ε applied to positions and cell
  (the "virtual strain" trick of SchNetPack/NequIP): ``r' = r (I + ε)``, ``cell' = cell (I + ε)``;
* direct forces (``forces="direct"``) from the model's head; stress still from the energy;
* Hessians ``H = ∂²E/∂r∂r`` (:func:`hessian`) by differentiating the conservative forces once
  more, through the same wrapper.

The wrapper is the unit that gets compiled (TorchScript / AOTInductor), so forces and stress
live inside the compiled graph. Hessians run eagerly: a compiled graph holds no second backward.
"""
from typing import Dict, List, Optional

import torch
from torch import Tensor

from eqcalc import keys
from eqcalc.atoms import consecutive_ranges

FORCE_MODES = ("conservative", "direct")


def edge_vectors(positions: Tensor, cell: Tensor, edge_index: Tensor, shifts: Tensor,
                 system: Tensor) -> Tensor:
    """Pair vectors ``r_ij = r_j - r_i + S @ cell[system[i]]``, shape ``(n_edges, 3)``, Å."""
    i, j = edge_index[0], edge_index[1]
    offsets = torch.bmm(shifts.unsqueeze(1), cell[system[i]]).squeeze(1)
    return positions[j] - positions[i] + offsets


class ForceStressModel(torch.nn.Module):
    """Energy, per-atom energies, forces and stress of a batch of systems.

    ``forward(positions, cell, species, edge_index, shifts, system)`` with positions
    ``(n_atoms, 3)``, cell ``(n_systems, 3, 3)``, species ``(n_atoms,)``, edge_index
    ``(2, n_edges)``, shifts ``(n_edges, 3)`` (float, integer values) and system ``(n_atoms,)``
    returns a dict with ``energy`` ``(n_systems,)`` float64 eV, ``energies`` ``(n_atoms,)`` eV,
    ``forces`` ``(n_atoms, 3)`` eV/Å and ``stress`` ``(n_systems, 3, 3)`` eV/Å³ (zero where the
    cell has no volume). Positions and cell come in float64 and the pair vectors are formed in
    float64 (large unwrapped coordinates lose nothing); only then are they cast to the model's
    dtype. Forces and stress come back in float64.
    """

    def __init__(self, model: torch.nn.Module, forces: str = "conservative",
                 stress: bool = True, create_graph: bool = False):
        super().__init__()
        if forces not in FORCE_MODES:
            from eqcalc.errors import InvalidOptionError
            raise InvalidOptionError(f"forces={forces!r}; use one of {FORCE_MODES}")
        self.model = model
        self.direct = forces == "direct"
        self.stress = stress
        self.create_graph = create_graph  # True when training on forces
        dtype = next(model.parameters()).dtype
        # A zero-size buffer carries the model dtype through .to() and TorchScript.
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype), persistent=False)

    def forward(self, positions: Tensor, cell: Tensor, species: Tensor, edge_index: Tensor,
                shifts: Tensor, system: Tensor) -> Dict[str, Tensor]:
        n_systems = cell.shape[0]
        strain = torch.zeros_like(cell)
        inputs: List[Tensor] = []
        if not self.direct:
            # A caller that differentiates the forces again (hessian) passes its own leaf.
            if not positions.requires_grad:
                positions = positions.detach().requires_grad_(True)
            inputs.append(positions)
        if self.stress:
            strain.requires_grad_(True)
            inputs.append(strain)
        # Symmetrise so the derivative is the symmetric stress even for rotated frames.
        deformation = torch.eye(3, dtype=cell.dtype, device=cell.device) + 0.5 * (
            strain + strain.transpose(1, 2))
        positions_s = torch.bmm(positions.unsqueeze(1), deformation[system]).squeeze(1)
        cell_s = torch.bmm(cell, deformation)
        dtype = self.dtype_probe.dtype
        vectors = edge_vectors(positions_s, cell_s, edge_index, shifts, system)
        data: Dict[str, Tensor] = {
            keys.POSITIONS: positions_s.to(dtype),
            keys.CELL: cell_s.to(dtype),
            keys.SPECIES: species,
            keys.EDGE_INDEX: edge_index,
            keys.SHIFTS: shifts,  # tells periodic images apart (triplets of angular models)
            keys.SYSTEM: system,
            keys.EDGE_VECTORS: vectors.to(dtype),
        }
        out = self.model(data)
        energies = out[keys.ENERGIES]
        energy = torch.zeros(n_systems, dtype=torch.float64, device=energies.device)
        energy = energy.index_add(0, system, energies.to(torch.float64))
        result: Dict[str, Tensor] = {keys.ENERGY: energy, keys.ENERGIES: energies}
        if self.direct:
            result[keys.FORCES] = out[keys.FORCES].to(positions.dtype)
        if len(inputs) > 0:
            grads = torch.autograd.grad([energies.sum()], inputs,
                                        create_graph=self.create_graph, allow_unused=True)
            if not self.direct:
                g = grads[0]
                result[keys.FORCES] = -g if g is not None else torch.zeros_like(positions)
            if self.stress:
                g = grads[-1]
                # Triple product rather than det: AOTInductor has no native kernel for det.
                volume = torch.linalg.cross(cell[:, 0], cell[:, 1], dim=-1).mul(cell[:, 2]).sum(-1).abs()
                # Cells without volume (molecules) get zero stress, never inf/NaN.
                safe = torch.where(volume > 0, volume, torch.ones_like(volume))
                s = g if g is not None else torch.zeros_like(cell)
                result[keys.STRESS] = torch.where(
                    (volume > 0).view(-1, 1, 1), s / safe.view(-1, 1, 1), torch.zeros_like(s))
        if not self.create_graph:
            # Inference: hand back plain tensors, not pieces of an autograd graph.
            for k in list(result.keys()):
                result[k] = result[k].detach()
        return result


#: Edges per Hessian graph of :func:`hessian`: the batch is copied up to this many edges so that
#: one double-backward pass yields one row per copy. Each copied edge keeps its intermediates for
#: the second backward (measured ~3-7 kB per edge for SchNet/PaiNN), so 2**17 bounds the extra
#: memory near 1 GB whatever the system size.
HESSIAN_EDGE_BUDGET = 2 ** 17


#: Edges per Hessian graph on a CPU: a batch is cut into groups of whole systems of at most this
#: many edges (a system is never split) and each group gets its own graph. A double-backward pass
#: streams every edge's intermediates; while they fit the cache a pass costs a few ms per slab,
#: and one graph of 16 catalyst slabs (18,706 edges) ran 4x slower per edge than one slab alone.
HESSIAN_CPU_EDGES = 2 ** 11


def hessian(model: torch.nn.Module, positions: Tensor, cell: Tensor, species: Tensor,
            edge_index: Tensor, shifts: Tensor, system: Tensor, rows: Tensor,
            max_batch: Optional[int] = None) -> Tensor:
    """Rows ``rows`` of the Hessian ``∂²E/∂r∂r`` of a batch, eV/Å², float64.

    ``model`` is an energy model (what :class:`ForceStressModel` wraps); the other arguments are
    :class:`ForceStressModel`'s inputs. ``rows`` ``(n_rows,)`` are flat indices ``3 * atom + axis``
    into the positions; the result is ``(n_rows, 3 * n_atoms)``, zero outside each row's system.

    Each row is one more backward pass through the forces' graph. Systems of a batch do not
    interact, so one pass serves a row of every system at once: the passes needed are the
    largest number of rows in one system. On a GPU small systems make small, launch-bound
    passes, so the batch is copied ``max_batch`` times into one graph (default there: as many
    copies as :data:`HESSIAN_EDGE_BUDGET` edges allow, bounded memory) and copy ``c`` carries
    pass ``c``: one forward and one double-backward for all of them. On CPU (default
    ``max_batch=1``) one graph serves all passes one after another, and a batch of many systems
    is cut into groups of at most :data:`HESSIAN_CPU_EDGES` edges, one graph each, so that a
    pass stays in cache.
    """
    n_atoms, n_systems = positions.shape[0], cell.shape[0]
    rows = rows.to(positions.device)
    if max_batch is None and positions.device.type == "cpu" and n_systems > 1:
        edges = torch.bincount(system[edge_index[0]], minlength=n_systems).tolist()
        pieces = consecutive_ranges(edges, HESSIAN_CPU_EDGES)
        if len(pieces) > 1:
            return _hessian_in_pieces(model, pieces, positions, cell, species, edge_index, shifts,
                                      system, rows)
    row_system = system[rows // 3]
    rank = _rank_within(row_system)
    n_passes = int(rank.max()) + 1 if rows.numel() > 0 else 0
    if max_batch is None:
        # On CPU one small graph, pass after pass, stays in cache and is fastest (a 37-atom slab,
        # 57 rows: 2.5 s, against 9 s copied and 6 s with autograd's vectorised passes);
        # copies are for launch-bound devices.
        max_batch = 1 if positions.device.type == "cpu" else HESSIAN_EDGE_BUDGET // max(int(edge_index.shape[1]), 1)
    copies = max(1, min(int(max_batch), n_passes))
    wrapper = ForceStressModel(model, forces="conservative", stress=False, create_graph=True)
    column_system = system.repeat_interleave(3)
    out = torch.zeros(rows.shape[0], 3 * n_atoms, dtype=torch.float64, device=positions.device)
    graph = None
    for start in range(0, n_passes, copies):
        k = min(copies, n_passes - start)
        if graph is None or graph[0] != k:
            graph = (k, *_copied_forces(wrapper, k, positions, cell, species, edge_index, shifts, system))
        _, leaf, forces = graph
        r = torch.nonzero((rank >= start) & (rank < start + k)).squeeze(1)
        copy = rank[r] - start
        directions = torch.zeros(k * 3 * n_atoms, dtype=forces.dtype, device=forces.device)
        directions[copy * 3 * n_atoms + rows[r]] = 1.0
        # d(F · e)/dr = -H[row, :], each copy's direction picking its own row.
        (grads,) = torch.autograd.grad([forces], [leaf], grad_outputs=[directions.view_as(forces)],
                                       retain_graph=k == 1 and start + k < n_passes)
        grads = grads.reshape(k, 3 * n_atoms)[copy]
        same = column_system.unsqueeze(0) == row_system[r].unsqueeze(1)         # (n_picked, 3N)
        out[r] = torch.where(same, -grads, torch.zeros((), dtype=grads.dtype, device=grads.device))
        if k > 1:
            graph = None  # a copied graph serves one group of passes
    return out


def _hessian_in_pieces(model: torch.nn.Module, pieces, positions: Tensor, cell: Tensor,
                       species: Tensor, edge_index: Tensor, shifts: Tensor, system: Tensor,
                       rows: Tensor) -> Tensor:
    """:func:`hessian` of a batch as independent sub-batches, one per system range ``(first,
    stop)`` of ``pieces`` (systems do not interact, so each row's nonzero columns lie within its
    own piece)."""
    n_atoms = positions.shape[0]
    out = torch.zeros(rows.shape[0], 3 * n_atoms, dtype=torch.float64, device=positions.device)
    for first, stop in pieces:
        inside = (system >= first) & (system < stop)
        picked = torch.nonzero(inside[rows // 3]).squeeze(1)
        if picked.numel() == 0:
            continue
        atoms = torch.nonzero(inside).squeeze(1)
        new_index = torch.cumsum(inside.long(), 0) - 1   # the piece's own atom numbering
        edges = inside[edge_index[0]]
        sub_rows = 3 * new_index[rows[picked] // 3] + rows[picked] % 3
        block = hessian(model, positions[atoms], cell[first:stop], species[atoms], new_index[edge_index[:, edges]],
                        shifts[edges], system[atoms] - first, sub_rows, max_batch=1)
        columns = (3 * atoms.unsqueeze(1) + torch.arange(3, device=atoms.device)).reshape(-1)
        out[picked.unsqueeze(1), columns.unsqueeze(0)] = block
    return out


def _copied_forces(wrapper: ForceStressModel, k: int, positions: Tensor, cell: Tensor, species: Tensor,
                   edge_index: Tensor, shifts: Tensor, system: Tensor):
    """``k`` independent copies of a batch as one batch; returns the positions leaf
    ``(k * n_atoms, 3)`` and the forces ``(k * n_atoms, 3)`` with their graph."""
    n_atoms, n_systems = positions.shape[0], cell.shape[0]
    copy = torch.arange(k, device=positions.device)
    leaf = positions.detach().to(torch.float64).repeat(k, 1).requires_grad_(True)
    forces = wrapper(leaf, cell.repeat(k, 1, 1), species.repeat(k),
                     (edge_index.unsqueeze(1) + n_atoms * copy.view(1, k, 1)).reshape(2, -1),
                     shifts.repeat(k, 1), (system.unsqueeze(0) + n_systems * copy.view(k, 1)).reshape(-1))[keys.FORCES]
    return leaf, forces


def _rank_within(groups: Tensor) -> Tensor:
    """For each entry of ``groups`` ``(n,)``, how many earlier entries share its group."""
    n = groups.shape[0]
    order = torch.argsort(groups, stable=True)
    sorted_groups = groups[order]
    first = torch.ones(n, dtype=torch.bool, device=groups.device)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = torch.cummax(torch.where(first, torch.arange(n, device=groups.device),
                                      torch.zeros_like(order)), 0).values
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=groups.device) - starts
    return rank
