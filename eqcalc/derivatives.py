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


#: Edge-directions per vectorised backward pass of :func:`hessian`: each direction keeps its own
#: copy of the per-edge intermediates (measured ~3-7 kB per edge and direction for SchNet/PaiNN),
#: so 2**17 bounds the extra memory near 1 GB whatever the system size.
HESSIAN_EDGE_BUDGET = 2 ** 17


def hessian(model: torch.nn.Module, positions: Tensor, cell: Tensor, species: Tensor,
            edge_index: Tensor, shifts: Tensor, system: Tensor, rows: Tensor,
            max_batch: Optional[int] = None) -> Tensor:
    """Rows ``rows`` of the Hessian ``∂²E/∂r∂r`` of a batch, eV/Å², float64.

    ``model`` is an energy model (what :class:`ForceStressModel` wraps); the other arguments are
    :class:`ForceStressModel`'s inputs. ``rows`` ``(n_rows,)`` are flat indices ``3 * atom + axis``
    into the positions; the result is ``(n_rows, 3 * n_atoms)``, zero outside each row's system.

    The forces are built once with their graph, then differentiated again, ``max_batch``
    directions at a time in one vectorised backward pass (default: as many as
    :data:`HESSIAN_EDGE_BUDGET` allows for this many edges, at most 64: bounded memory). Systems of a batch do
    not interact, so one backward pass serves a row of every system at once: the number of
    passes is the largest number of rows in one system, not the total.
    """
    if max_batch is None:
        max_batch = max(1, min(64, HESSIAN_EDGE_BUDGET // max(int(edge_index.shape[1]), 1)))
    wrapper = ForceStressModel(model, forces="conservative", stress=False, create_graph=True)
    positions = positions.detach().to(torch.float64).requires_grad_(True)
    forces = wrapper(positions, cell, species, edge_index, shifts, system)[keys.FORCES]
    n_atoms = positions.shape[0]
    rows = rows.to(positions.device)
    row_system = system[rows // 3]
    rank = _rank_within(row_system)
    out = torch.zeros(rows.shape[0], 3 * n_atoms, dtype=torch.float64, device=positions.device)
    column_system = system.repeat_interleave(3)
    n_passes = int(rank.max()) + 1 if rows.numel() > 0 else 0
    for start in range(0, n_passes, max_batch):
        passes = torch.arange(start, min(start + max_batch, n_passes), device=positions.device)
        picked = (rank.unsqueeze(0) == passes.unsqueeze(1))                    # (n_passes, n_rows)
        directions = torch.zeros(len(passes), 3 * n_atoms, dtype=forces.dtype, device=forces.device)
        p, r = picked.nonzero(as_tuple=True)
        directions[p, rows[r]] = 1.0
        # d(F · e_r)/dr = -H[r, :] for every direction e_r at once.
        grads = _vjp(forces, positions, directions.view(len(passes), n_atoms, 3))
        grads = grads.reshape(len(passes), 3 * n_atoms)
        same = column_system.unsqueeze(0) == row_system[r].unsqueeze(1)         # (n_picked, 3N)
        out[r] = torch.where(same, -grads[p], torch.zeros((), dtype=grads.dtype, device=grads.device))
    return out


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


def _vjp(outputs: Tensor, inputs: Tensor, directions: Tensor) -> Tensor:
    """``directions`` ``(k, *outputs.shape)`` → ``(k, *inputs.shape)`` vector-Jacobian products,
    vectorised (``is_grads_batched``) where the model's operations allow it, else one at a time."""
    try:
        (g,) = torch.autograd.grad([outputs], [inputs], grad_outputs=[directions],
                                   retain_graph=True, is_grads_batched=True)
        return g
    except RuntimeError:
        return torch.stack([torch.autograd.grad([outputs], [inputs], grad_outputs=[d],
                                                retain_graph=True)[0] for d in directions])
