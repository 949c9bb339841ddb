"""The ASE calculator: ``Atoms`` → neighbors → model → derivatives → ``results``."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from eqcalc import keys
from eqcalc.atoms import to_ase, to_tensors, validate
from eqcalc.errors import InvalidOptionError, PropertyNotAvailableError
from eqcalc.model import Model


def full_to_voigt(stress: np.ndarray) -> np.ndarray:
    """(3, 3) → ASE Voigt order ``xx, yy, zz, yz, xz, xy``."""
    return stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def check_indices(indices: Optional[Sequence[int]], n_atoms: int) -> np.ndarray:
    """Atom ``indices`` (``None``: all ``n_atoms``) as a sorted-as-given int array; a typed error
    for empty, repeated, non-integer or out-of-range indices."""
    if indices is None:
        return np.arange(n_atoms)
    array = np.asarray(indices)
    if array.ndim != 1 or array.size == 0:
        raise InvalidOptionError(
            f"indices={indices!r}: give a non-empty list of atom indices (or None for all atoms)")
    if array.dtype.kind == "b" and array.size == n_atoms:
        array = np.flatnonzero(array)
    if array.dtype.kind not in "iu":
        raise InvalidOptionError(f"indices={indices!r}: atom indices must be integers")
    bad = array[(array < -n_atoms) | (array >= n_atoms)]
    if bad.size:
        raise InvalidOptionError(
            f"indices {bad.tolist()} are out of range for a structure of {n_atoms} atoms; use 0..{n_atoms - 1}")
    array = array % n_atoms
    if len(set(array.tolist())) != array.size:
        raise InvalidOptionError(f"indices={indices!r} lists an atom twice; list each atom once")
    return array


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

    def get_hessian(self, atoms: Atoms | None = None, indices: Optional[Sequence[int]] = None) -> np.ndarray:
        """Hessian ``∂²E/∂r∂r`` of ``atoms`` (default: the attached ones), ``(3N, 3N)`` eV/Å²,
        float64, by autograd (row ``3 * i + axis``). With ``indices``, only the block of those
        atoms, ``(3n, 3n)``, which costs ``3n`` rows instead of ``3N``: what
        ``ase.vibrations.VibrationsData.from_2d(atoms, hessian, indices)`` takes."""
        if atoms is None:
            if self.atoms is None:
                raise InvalidOptionError("get_hessian() needs atoms: pass them or attach this calculator")
            atoms = self.atoms
        return self.predict_hessian([atoms], None if indices is None else [indices])[0]

    def predict_hessian(self, structures: Sequence[Atoms],
                        indices: Optional[Sequence[Optional[Sequence[int]]]] = None) -> List[np.ndarray]:
        """Hessians of many structures as one batch: a list of ``(3n, 3n)`` eV/Å² arrays, ``n``
        the atoms of ``indices[k]`` (``None``: all atoms of structure ``k``)."""
        blocks = []
        for rows, idx in zip(*self._hessian_rows(structures, indices)):
            columns = (3 * idx[:, None] + np.arange(3)).reshape(-1)
            blocks.append(rows[:, columns])
        return blocks

    def hessian_rows(self, structures: Sequence[Atoms],
                     indices: Optional[Sequence[Optional[Sequence[int]]]] = None) -> List[np.ndarray]:
        """Rows of the Hessians of many structures as one batch: a list of ``(3n, 3N)`` eV/Å²
        arrays, the rows of the ``n`` atoms of ``indices[k]`` against all ``3N`` coordinates
        (what force constants of a supercell need: rows of one cell's atoms only)."""
        return self._hessian_rows(structures, indices)[0]

    def _hessian_rows(self, structures, indices):
        from eqcalc.neighbors import compute_neighbors
        import torch

        structures = [to_ase(s) for s in structures]
        for s in structures:
            validate(s, self.model.species)
        indices = list(indices) if indices is not None else [None] * len(structures)
        if len(indices) != len(structures):
            raise InvalidOptionError(
                f"indices has {len(indices)} entries for {len(structures)} structures; give one "
                "list (or None) per structure")
        picked = [check_indices(idx, len(s)) for idx, s in zip(indices, structures)]
        starts = np.cumsum([0] + [len(s) for s in structures])
        rows = np.concatenate([(3 * (start + idx))[:, None] + np.arange(3) for start, idx in zip(starts, picked)])
        t = to_tensors(structures, self.model.device)
        edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, self.model.cutoff, t.system)
        rows_t = torch.as_tensor(rows.reshape(-1), device=self.model.device)
        h = self.model.hessian(t, edge_index, shifts, rows_t).cpu().numpy()
        out, offset = [], 0
        for k, idx in enumerate(picked):
            out.append(h[offset:offset + 3 * len(idx), 3 * starts[k]:3 * starts[k + 1]])
            offset += 3 * len(idx)
        return out, picked

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
