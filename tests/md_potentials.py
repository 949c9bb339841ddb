"""Cheap potentials for engine tests: smooth Morse pairs through ForceStressModel, and ASE's EMT.

Thermostat statistics need thousands of steps; an untrained network gives no physics worth the
cost there, and the Morse pair potential costs well under a millisecond per step for ~100 atoms.
EMT through the engine (``EMTPotential``) lets engine results be compared with ASE's own drivers
running ``EMT()`` step for step (NEB, relaxation).
"""
import numpy as np
import torch

from eqcalc import keys
from eqcalc.derivatives import ForceStressModel
from eqcalc.neighbors import NeighborList


class MorseEnergy(torch.nn.Module):
    """Per-atom energies ``0.5 sum_j D (e^{-2a(r-r0)} - 2 e^{-a(r-r0)}) fc(r)`` with the cosine
    cutoff ``fc`` (smooth to first order at ``cutoff``). Defaults: Cu (Girifalco & Weizer)."""

    def __init__(self, D=0.3429, a=1.3588, r0=2.866, cutoff=5.0):
        super().__init__()
        self.D, self.a, self.r0, self.cutoff = D, a, r0, cutoff
        self.register_buffer("dummy", torch.zeros(1, dtype=torch.float64))
        self.dummy_param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, data):
        v = data[keys.EDGE_VECTORS]
        r = torch.sqrt((v * v).sum(1))
        e = torch.exp(-self.a * (r - self.r0))
        fc = torch.where(r < self.cutoff, 0.5 * (torch.cos(torch.pi * r / self.cutoff) + 1), torch.zeros_like(r))
        pair = self.D * (e * e - 2 * e) * fc
        n = data[keys.POSITIONS].shape[0]
        energies = torch.zeros(n, dtype=v.dtype, device=v.device).index_add(0, data[keys.EDGE_INDEX][0], 0.5 * pair)
        return {keys.ENERGIES: energies}


class MorsePotential:
    """The engine's potential interface (``__call__(state)``, ``reset()``) over :class:`MorseEnergy`."""

    def __init__(self, skin=0.5, **morse):
        self.energy = MorseEnergy(**morse)
        self.wrapper = ForceStressModel(self.energy)
        self.neighbors = NeighborList(self.energy.cutoff, skin=skin)

    def reset(self):
        self.neighbors.reset()

    def __call__(self, state):
        edge_index, shifts = self.neighbors.update(state.positions, state.cell, state.pbc, state.system,
                                                   state.numbers)
        out = self.wrapper(state.positions, state.cell, torch.zeros_like(state.numbers), edge_index,
                           shifts.to(torch.float64), state.system)
        return {"energy": out[keys.ENERGY], "forces": out[keys.FORCES], "stress": out[keys.STRESS]}


class EMTPotential:
    """ASE's EMT on each system of an engine batch, one system after another: reference physics
    for engine tests (exact agreement with ASE drivers using ``EMT()`` directly). ``atom_evaluations``
    counts the atoms evaluated."""

    def __init__(self):
        self.atom_evaluations = 0

    def reset(self):
        pass

    def __call__(self, state):
        from ase import Atoms
        from ase.calculators.emt import EMT

        pos, num = state.positions.cpu().numpy(), state.numbers.cpu().numpy()
        cell, pbc = state.cell.cpu().numpy(), state.pbc.cpu().numpy()
        counts = torch.bincount(state.system, minlength=state.n_systems).tolist()
        energy, forces, stress, start = [], [], [], 0
        for s, n in enumerate(counts):
            atoms = Atoms(num[start:start + n], positions=pos[start:start + n], cell=cell[s], pbc=pbc[s])
            atoms.calc = EMT()
            energy.append(atoms.get_potential_energy())
            forces.append(atoms.get_forces())
            stress.append(atoms.get_stress(voigt=False) if pbc[s].all() else np.zeros((3, 3)))
            start += n
        self.atom_evaluations += start
        f64 = dict(dtype=torch.float64, device=state.device)
        return {"energy": torch.tensor(energy, **f64), "forces": torch.tensor(np.concatenate(forces), **f64),
                "stress": torch.tensor(np.stack(stress), **f64)}
