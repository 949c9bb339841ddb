"""eqcalc's neighbor list as a drop-in for ASE's, and the torch function behind it.

    .venv/bin/python examples/neighbor_list.py
"""
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

from eqcalc.neighbors import compute_neighbors, neighbor_list

atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
atoms.rattle(0.05, seed=0)
i, j, S = neighbor_list("ijS", atoms, 5.0)
i_ref, j_ref, S_ref = ase_neighbor_list("ijS", atoms, 5.0)
print(f"{len(i)} pairs (ASE: {len(i_ref)})")

# Torch level: any device, and a batch of systems with their own cell and pbc.
positions = torch.tensor(atoms.positions)
cell = torch.tensor(atoms.cell.array)[None]
pbc = torch.tensor(atoms.pbc)[None]
edge_index, shifts = compute_neighbors(positions, cell, pbc, 5.0)
print(edge_index.shape, shifts.shape)
