"""The ASE calculator: ``Atoms`` → neighbors → model → derivatives → ``results``."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from eqcalc import keys
from eqcalc.atoms import to_ase, to_tensors, validate
from eqcalc.errors import PropertyNotAvailableError
from eqcalc.model import Model


def full_to_voigt(stress: np.ndarray) -> np.ndarray:
    """(3, 3) → ASE Voigt order ``xx, yy, zz, yz, xz, xy``."""
    return stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


class EquivariantCalculator(Calculator):
    """ASE calculator for eqcalc model packages.

    >>> atoms.calc = EquivariantCalculator("default")
    >>> atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()  # eV, eV/Å, eV/Å³

    ``model``: shipped model name or ``.eqm`` path (or an already loaded :class:`Model`);
    ``device``: ``"auto" | "cpu" | "cuda" | "cuda:N"``; ``forces``: ``"auto" | "conservative" |
    "direct"``; ``compile``: ``"auto" | "aoti" | "torchscript" | "eager"``; ``dtype``: ``None``
    (the model's own) ``| "float32" | "float64"``; ``skin`` (Å): the neighbor list is reused until
    an atom moved more than ``skin / 2``. The Atoms are never modified.
    """

    def __init__(self, model: str | os.PathLike | Model = "default", device="auto", forces="auto",
                 compile="auto", dtype=None, skin: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        from eqcalc.neighbors import NeighborList

        self.model = model if isinstance(model, Model) else Model(model, device, forces, compile, dtype)
        self.metadata = dict(self.model.metadata)
        self.implemented_properties = ["energy", "free_energy", "energies", "forces"]
        if self.metadata.get("stress", True):
            self.implemented_properties.append("stress")
        self.neighbors = NeighborList(self.model.cutoff, skin=skin)
        # what produced the results, as ASE records it (calc.todict(): ase.db, trajectories)
        self.parameters.update(self.model.provenance(), skin=skin)

    def get_property(self, name, atoms=None, allow_calculation=True):
        return super().get_property(name, None if atoms is None else to_ase(atoms), allow_calculation)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes):
        # a pymatgen structure becomes Atoms first, so self.atoms stays comparable by ASE
        super().calculate(None if atoms is None else to_ase(atoms), properties, system_changes)
        atoms = self.atoms
        validate(atoms, self.model.species)
        if "stress" in properties and not atoms.pbc.any():
            raise PropertyNotAvailableError(
                "stress asked for a system with no periodic direction; set atoms.pbc and a cell, "
                "or ask only for energy and forces")
        t = to_tensors([atoms], self.model.device)
        edge_index, shifts = self.neighbors.update(t.positions, t.cell, t.pbc, t.system, t.numbers)
        self.results = self._evaluate([atoms], t, edge_index, shifts)[0]
        self.results["free_energy"] = self.results["energy"]

    def predict(self, structures: Sequence[Atoms]) -> List[Dict[str, np.ndarray]]:
        """Evaluate many structures as one batch; a list of dicts like ``results``."""
        from eqcalc.neighbors import compute_neighbors

        structures = [to_ase(s) for s in structures]
        for s in structures:
            validate(s, self.model.species)
        t = to_tensors(structures, self.model.device)
        edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, self.model.cutoff, t.system)
        return self._evaluate(structures, t, edge_index, shifts)

    def _evaluate(self, structures: Sequence[Atoms], t, edge_index, shifts) -> List[Dict[str, np.ndarray]]:
        """Model (which also checks for overlapping atoms), and one results dict per structure
        (stress where periodic)."""
        out = self.model(t, edge_index, shifts)
        counts = [len(s) for s in structures]
        energies = out[keys.ENERGIES].double().cpu().split(counts)
        forces = out[keys.FORCES].double().cpu().split(counts)
        results = []
        for k, s in enumerate(structures):
            r = {"energy": float(out[keys.ENERGY][k]), "energies": energies[k].numpy(),
                 "forces": forces[k].numpy()}
            if s.pbc.any() and abs(s.cell.volume) > 0:
                r["stress"] = full_to_voigt(out[keys.STRESS][k].double().cpu().numpy())
            results.append(r)
        return results
