"""Harmonic vibrations of many structures in one batch, as ASE ``VibrationsData``.

``vibrations(structures, model)`` takes the Hessian of every structure by autograd
(:meth:`eqcalc.EquivariantCalculator.predict_hessian`: all structures in one batch, one backward
pass per moving coordinate of the largest system) and returns one
:class:`ase.vibrations.VibrationsData` per structure, so ASE's own tools apply: frequencies,
modes, zero-point energy, ``HarmonicThermo`` / ``IdealGasThermo`` free energies, mode animations.

Which atoms move: ``indices[k]`` when given, else the atoms not fixed by ``FixAtoms``
(adsorbates on a slab whose lower layers are fixed). The Hessian is symmetrised before
diagonalising. When every atom of a free molecule moves, rigid translations and rotations are
projected out (in mass-weighted coordinates), so they are exactly zero even slightly away from a
minimum, as quantum-chemistry codes do; for a bulk with every atom moving, translations only. Imaginary modes (a transition state, or a structure that is not a minimum) are
reported, not refused: ``summary`` counts them and leaves them out of the zero-point and free
energies, as ASE's ``HarmonicThermo(ignore_imag_modes=True)`` does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from eqcalc.errors import InvalidOptionError

log = logging.getLogger("eqcalc")

#: Modes below this (cm⁻¹, by magnitude) are treated as translations/rotations of a free body.
RIGID_BODY_CM1 = 10.0


def _calculator(model, device: str, dtype: Optional[str]):
    from eqcalc.calculator import EquivariantCalculator
    from eqcalc.engine.md import ModelPotential
    from eqcalc.model import Model

    if isinstance(model, EquivariantCalculator):
        return model
    if isinstance(model, ModelPotential):
        model = model.model
    if isinstance(model, Model):
        return EquivariantCalculator(model)
    return EquivariantCalculator(model, device=device, compile="eager", dtype=dtype)


def free_atoms(atoms) -> np.ndarray:
    """Indices of the atoms no ``FixAtoms`` constraint holds; a typed error when none move."""
    from ase.constraints import FixAtoms

    fixed = np.zeros(len(atoms), dtype=bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            fixed[c.index] = True
    free = np.flatnonzero(~fixed)
    if free.size == 0:
        raise InvalidOptionError(
            f"every atom of {atoms.get_chemical_formula()} is fixed by FixAtoms, so nothing vibrates; "
            "remove the constraint or give indices of the atoms that move")
    return free


def vibrations(structures: Sequence, model="default", indices: Optional[Sequence] = None,
               device: str = "auto", dtype: Optional[str] = None) -> List:
    """Harmonic analysis of ``structures`` (ASE Atoms or pymatgen) in one batch.

    ``model``: a shipped name, ``.eqm`` path, loaded :class:`~eqcalc.model.Model`,
    :class:`~eqcalc.engine.md.ModelPotential` or :class:`~eqcalc.EquivariantCalculator`;
    ``indices``: one list of moving atoms per structure (``None`` entries, or ``None`` for all:
    the atoms FixAtoms leaves free). Returns one ``ase.vibrations.VibrationsData`` per structure.
    """
    from ase.vibrations import VibrationsData

    from eqcalc.atoms import to_ase

    structures = [to_ase(s) for s in structures]
    if not structures:
        raise InvalidOptionError("vibrations() got no structures; pass a list of Atoms")
    calc = _calculator(model, device, dtype)
    indices = list(indices) if indices is not None else [None] * len(structures)
    if len(indices) != len(structures):
        raise InvalidOptionError(
            f"indices has {len(indices)} entries for {len(structures)} structures; give one per structure")
    picked = [free_atoms(a) if idx is None else idx for a, idx in zip(structures, indices)]
    start = time.perf_counter()
    hessians = calc.predict_hessian(structures, picked)
    out = []
    for atoms, idx, h in zip(structures, picked, hessians):
        h = project_rigid(atoms, np.asarray(idx), 0.5 * (h + h.T))
        data = atoms.copy()
        data.calc = None
        out.append(VibrationsData.from_2d(data, h, indices=np.asarray(idx)))
    n_rows = sum(h.shape[0] for h in hessians)
    log.info("Hessians of %d structures (%d moving coordinates) in %.2f s", len(structures), n_rows,
             time.perf_counter() - start)
    return out


def project_rigid(atoms, indices: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """``hessian`` ``(3n, 3n)`` of the atoms ``indices`` with rigid-body motions removed: rigid
    translations and rotations of a non-periodic structure whose atoms all move, translations
    of a periodic one whose atoms all move, nothing otherwise (a fixed slab holds the rest)."""
    if len(indices) != len(atoms):
        return hessian
    masses = atoms.get_masses()
    sqrt_m = np.repeat(np.sqrt(masses), 3)
    vectors = [np.tile(np.eye(3)[a], len(atoms)) * sqrt_m for a in range(3)]
    if not atoms.pbc.any():
        centred = atoms.positions - atoms.get_center_of_mass()
        vectors += [np.cross(np.eye(3)[a], centred).reshape(-1) * sqrt_m for a in range(3)]
    q, r = np.linalg.qr(np.array(vectors).T)
    q = q[:, np.abs(np.diag(r)) > 1e-8 * np.abs(np.diag(r)).max()]   # a linear molecule has 5
    projector = np.eye(len(sqrt_m)) - q @ q.T
    weighted = hessian / np.outer(sqrt_m, sqrt_m)
    return projector @ weighted @ projector * np.outer(sqrt_m, sqrt_m)


@dataclass
class VibrationSummary:
    """One structure's harmonic summary: frequencies (cm⁻¹, imaginary ones negative), the
    number of imaginary modes, zero-point energy and harmonic Helmholtz free energy at
    ``temperature_K`` (eV, vibrations only, imaginary and rigid-body modes left out)."""

    frequencies_cm1: np.ndarray
    n_imaginary: int
    n_rigid: int
    zpe_eV: float
    free_energy_eV: float
    temperature_K: float


def summary(vib, temperature_K: float = 298.15) -> VibrationSummary:
    """Frequencies, imaginary count, ZPE and harmonic free energy of one ``VibrationsData``.

    Modes with |ν| < :data:`RIGID_BODY_CM1` (free translations/rotations of a molecule, the
    acoustic modes of a bulk at Γ) are counted as ``n_rigid`` and left out of the energies.
    """
    from ase.thermochemistry import HarmonicThermo

    freqs = vib.get_frequencies()
    signed = np.where(np.abs(freqs.imag) > np.abs(freqs.real), -np.abs(freqs.imag), freqs.real)
    rigid = np.abs(signed) < RIGID_BODY_CM1
    real = (signed > 0) & ~rigid
    energies = vib.get_energies()[real].real
    zpe = 0.5 * float(np.sum(energies))
    free = 0.0
    if energies.size:
        thermo = HarmonicThermo(energies, potentialenergy=0.0)
        free = float(thermo.get_helmholtz_energy(temperature_K, verbose=False))
    return VibrationSummary(frequencies_cm1=signed, n_imaginary=int(np.sum((signed < 0) & ~rigid)),
                            n_rigid=int(np.sum(rigid)), zpe_eV=zpe, free_energy_eV=free,
                            temperature_K=float(temperature_K))


def write(vibs: Sequence, names: Sequence[str], output_dir, temperature_K: float = 298.15,
          frames: int = 30) -> List[str]:
    """``vib.csv`` (one row per structure: modes, imaginary count, ZPE, free energy, all
    frequencies), and per structure ``NAME_modes.extxyz``: every mode animated over ``frames``
    frames at ``temperature_K`` (``info['mode']``, ``info['frequency_cm1']``). Files are written
    under a temporary name and renamed, so a crash never leaves half a table."""
    import csv
    import os

    import ase.io

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    rows = []
    for name, vib in zip(names, vibs):
        s = summary(vib, temperature_K)
        rows.append({"name": name, "n_modes": len(s.frequencies_cm1), "n_imaginary": s.n_imaginary,
                     "n_rigid": s.n_rigid, "zpe_eV": f"{s.zpe_eV:.6f}",
                     f"free_energy_{temperature_K:g}K_eV": f"{s.free_energy_eV:.6f}",
                     "frequencies_cm1": " ".join(f"{f:.2f}" for f in s.frequencies_cm1)})
        animation = []
        for mode, freq in enumerate(s.frequencies_cm1):
            for atoms in vib.iter_animated_mode(mode, temperature=max(temperature_K, 1.0), frames=frames):
                atoms.info.update(mode=mode, frequency_cm1=float(freq))
                animation.append(atoms)
        path = out / f"{name}_modes.extxyz"
        tmp = path.with_name(path.name + ".tmp")
        ase.io.write(tmp, animation, format="extxyz")
        os.replace(tmp, path)
        files.append(str(path))
    table = out / "vib.csv"
    tmp = table.with_name("vib.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, table)
    return [str(table)] + files


# ---- command line shell (eqcalc vib) ------------------------------------------------------------
def add_arguments(parser) -> None:
    """Options of ``eqcalc vib``."""
    from eqcalc.engine.drivers import add_model_arguments

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="structure files (extxyz keeps FixAtoms), analysed as one batch")
    add_model_arguments(parser)
    parser.add_argument("--indices", type=int, nargs="+", default=None,
                        help="atoms that move, the same for every input (default: those FixAtoms leaves free)")
    parser.add_argument("--temperature-K", type=float, default=298.15,
                        help="temperature of the harmonic free energy and the mode animations, K")
    parser.add_argument("--frames", type=int, default=30, help="frames per mode animation")
    parser.add_argument("--output-dir", default="eqcalc-vib", help="folder for vib.csv and the mode animations")


def main(args) -> int:
    from eqcalc.engine.drivers import _device, read_structures, unique_names

    if not (np.isfinite(args.temperature_K) and args.temperature_K >= 0):
        raise InvalidOptionError(f"--temperature-K {args.temperature_K} must be a finite number >= 0")
    if args.frames < 1:
        raise InvalidOptionError(f"--frames {args.frames} must be at least 1")
    structures = read_structures(args.inputs)
    names = unique_names(args.inputs)
    indices = None if args.indices is None else [args.indices] * len(structures)
    vibs = vibrations(structures, args.model, indices=indices, device=_device(args.device), dtype=args.dtype)
    for name, vib in zip(names, vibs):
        s = summary(vib, args.temperature_K)
        shown = ", ".join(f"{f:.0f}" for f in sorted(s.frequencies_cm1, reverse=True)[:8])
        warn = f"  {s.n_imaginary} IMAGINARY" if s.n_imaginary else ""
        print(f"  {name:20s} {len(s.frequencies_cm1):3d} modes  ZPE {s.zpe_eV:.4f} eV  "
              f"F_vib({args.temperature_K:g} K) {s.free_energy_eV:.4f} eV  highest cm^-1: {shown}{warn}")
    print(f"wrote {', '.join(write(vibs, names, args.output_dir, args.temperature_K, args.frames))}")
    return 0
