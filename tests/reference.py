"""Independent references for the tests: a model's results without eqcalc's runtime
(:class:`ReferenceCalculator`), and EMT relaxations (:func:`emt_relaxed`).

Everything around the network is done here without eqcalc's own runtime: ASE's neighbor list
(``ase.neighborlist.neighbor_list``), the species index looked up by symbol in the package's
species list, and ASE's Voigt conversion. Only the eager network and its autograd wrapper are
shared (those are pinned by finite differences and by Lennard-Jones against ASE elsewhere), so
a wrong neighbor list, species map, result assembly, cache or stress convention in the
calculator shows up as a difference.
"""
import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list
from ase.stress import full_3x3_to_voigt_6_stress

from eqcalc import keys


class ReferenceCalculator(Calculator):
    """ASE calculator over ``model.wrapper`` (an eager :class:`eqcalc.model.Model`'s
    ForceStressModel), rebuilding everything on every call: no cache, no skin."""

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.wrapper = model.wrapper
        self.species = list(model.metadata["species"])
        self.cutoff = float(model.metadata["cutoff"])

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        a = self.atoms
        i, j, S = neighbor_list("ijS", a, self.cutoff)
        species = torch.tensor([self.species.index(s) for s in a.get_chemical_symbols()])
        out = self.wrapper(torch.tensor(a.positions, dtype=torch.float64),
                           torch.tensor(a.cell.array, dtype=torch.float64).unsqueeze(0), species,
                           torch.tensor(np.stack([i, j]), dtype=torch.int64),
                           torch.tensor(S, dtype=torch.float64), torch.zeros(len(a), dtype=torch.int64))
        self.results = {"energy": float(out[keys.ENERGY][0]),
                        "energies": out[keys.ENERGIES].double().numpy(),
                        "forces": out[keys.FORCES].double().numpy()}
        self.results["free_energy"] = self.results["energy"]
        if a.pbc.any():
            self.results["stress"] = full_3x3_to_voigt_6_stress(out[keys.STRESS][0].double().numpy())


def emt_relaxed(atoms, fmax: float = 0.05):
    """A copy of ``atoms`` relaxed with ASE's EMT and BFGS to ``fmax`` (eV/Å; asserted reached):
    the reference the shipped models were trained on."""
    from ase.calculators.emt import EMT
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = EMT()
    assert BFGS(atoms, logfile=None).run(fmax=fmax, steps=300)
    return atoms


def run_reference(cmd, what: str) -> str:
    """Run ``cmd`` (a reference code in its own virtualenv, so without this tree on PYTHONPATH);
    its stdout, or the test fails with the tail of both streams."""
    import os
    import subprocess

    import pytest

    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=""))
    if done.returncode != 0:
        pytest.fail(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done.stdout
