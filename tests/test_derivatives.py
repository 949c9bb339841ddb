"""The one derivative module against an independent reference: ASE's Lennard-Jones calculator.

A Lennard-Jones energy model run through ForceStressModel must reproduce ASE's forces and
stress (including ASE's stress sign) exactly: this pins the pair-vector, strain and sign
conventions of eqcalc.keys independently of any learned architecture.
"""
from typing import Dict

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111
from ase.calculators.lj import LennardJones
from torch import Tensor

from eqcalc import keys
from eqcalc.atoms import to_tensors
from eqcalc.derivatives import ForceStressModel
from eqcalc.neighbors import compute_neighbors

SIGMA, EPS, RC = 2.3, 0.4, 5.0


class LJ(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, data: Dict[str, Tensor]) -> Dict[str, Tensor]:
        r = data[keys.EDGE_VECTORS].norm(dim=1)
        lj = lambda x: 4 * EPS * ((SIGMA / x) ** 12 - (SIGMA / x) ** 6)  # noqa: E731
        pair = torch.where(r < RC, lj(r) - lj(RC), torch.zeros_like(r)) * self.scale
        e = torch.zeros(data[keys.SPECIES].shape[0], dtype=r.dtype).index_add(0, data[keys.EDGE_INDEX][0], 0.5 * pair)
        return {keys.ENERGIES: e}


@pytest.mark.parametrize("kind", ["bulk", "triclinic", "left-handed", "slab", "compressed"])
def test_lennard_jones_forces_and_stress_match_ase(kind):
    if kind == "slab":
        atoms = fcc111("Cu", (2, 2, 3), a=3.7, vacuum=4.0)
        atoms.pbc = (True, True, False)
    else:
        atoms = bulk("Cu", "fcc", a=3.7 if kind != "compressed" else 3.2).repeat(2)
        if kind in ("triclinic", "left-handed"):
            atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.05 * np.random.default_rng(0).normal(size=(3, 3))),
                           scale_atoms=True)
        if kind == "left-handed":  # mirrored: det(cell) < 0, the volume is |det|
            atoms.set_cell(atoms.cell.array @ np.diag([1.0, 1.0, -1.0]), scale_atoms=True)
            assert np.linalg.det(atoms.cell.array) < 0
    atoms.rattle(0.05, seed=1)
    ref = LennardJones(sigma=SIGMA, epsilon=EPS, rc=RC, smooth=False)
    atoms.calc = ref
    t = to_tensors([atoms])
    ei, S = compute_neighbors(t.positions, t.cell, t.pbc, RC, t.system)
    out = ForceStressModel(LJ())(t.positions, t.cell, torch.zeros_like(t.numbers), ei, S.double(), t.system)
    assert out[keys.ENERGY].item() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
    np.testing.assert_allclose(out[keys.FORCES].numpy(), atoms.get_forces(), atol=1e-10)
    full = atoms.get_stress(voigt=False)
    np.testing.assert_allclose(out[keys.STRESS][0].numpy(), full, atol=1e-10)
    if kind == "compressed":  # ASE sign: compressed crystal → negative stress, positive pressure
        assert np.trace(out[keys.STRESS][0].numpy()) < 0


def test_no_stress_and_no_nan_for_a_molecule():
    from ase.build import molecule

    m = molecule("H2O")
    t = to_tensors([m])
    ei, S = compute_neighbors(t.positions, t.cell, t.pbc, RC, t.system)
    out = ForceStressModel(LJ())(t.positions, t.cell, torch.zeros_like(t.numbers), ei, S.double(), t.system)
    assert torch.all(out[keys.STRESS] == 0)
    assert torch.isfinite(out[keys.FORCES]).all()
