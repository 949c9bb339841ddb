"""Reference data for organic molecules from GFN2-xTB (tblite), sampled by MD like MD17.

``generate_molecules(path, n_frames, molecules=("CH3CH2OH",), seed=0)`` runs one Langevin
trajectory per molecule with tblite's ASE calculator and writes every ``interval``-th frame to an
extxyz file in the same layout as :func:`potentials.data.generate`: energy (eV) and forces (eV/Å)
on a SinglePointCalculator, ``info["kind"] = "molecule"``, ``info["group"]``, ``info["split"]``
and ``info["reference"]``. Molecules are non-periodic, so there is no stress. The same readers,
training (``potentials.train``) and ``eqcalc train`` then serve molecules and catalysts alike.

Why groups of consecutive frames: neighbouring MD frames are strongly correlated, so frames are
split into train/val/test by blocks of ``block`` consecutive frames, never frame by frame (a test
frame would otherwise sit 10 fs from a training frame).

tblite is an optional extra (``pip install .[xtb]``); without it
:class:`~eqcalc.errors.MissingDependencyError` says how to install it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from eqcalc.errors import InvalidOptionError, MissingDependencyError

REFERENCE = "GFN2-xTB (tblite)"


def xtb_calculator(method: str = "GFN2-xTB"):
    """tblite's ASE calculator, quiet; MissingDependencyError when tblite is not installed."""
    try:
        from tblite.ase import TBLite
    except ImportError:
        raise MissingDependencyError(
            "molecule data needs tblite (GFN2-xTB); install the extra with: pip install '.[xtb]' "
            "(or pip install tblite)") from None
    return TBLite(method=method, verbosity=0)


def _molecule(name: str):
    from ase.build import molecule
    from ase.collections import g2

    if name not in g2.names:
        raise InvalidOptionError(f"molecule {name!r} is not in ASE's g2 collection; use names such as "
                                 "'CH3CH2OH', 'CH3OH', 'H2O', 'CH4', 'NH3', 'HCOOH' (ase.collections.g2)")
    return molecule(name)


def generate_molecules(path: str | os.PathLike, n_frames: int, molecules: Sequence[str] = ("CH3CH2OH",),
                       seed: int = 0, temperature_K: float = 500.0, timestep_fs: float = 0.5,
                       interval: int = 10, equilibration_steps: int = 200, block: int = 10,
                       progress: bool = False) -> Path:
    """Write ``n_frames`` GFN2-xTB frames (shared evenly among ``molecules``) to ``path`` (extxyz).

    Each molecule: Maxwell–Boltzmann velocities at ``temperature_K``, ``equilibration_steps`` of
    Langevin MD (friction 0.01 /fs, ``timestep_fs``), then one frame every ``interval`` steps.
    Deterministic for given arguments. Returns the path.
    """
    from ase import units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from tqdm import tqdm

    from potentials.data import write_split

    if n_frames < 1 or interval < 1 or block < 1 or timestep_fs <= 0 or temperature_K <= 0:
        raise InvalidOptionError(
            f"n_frames={n_frames}, interval={interval}, block={block}, timestep_fs={timestep_fs}, "
            f"temperature_K={temperature_K}: all must be positive")
    if len(molecules) == 0:
        raise InvalidOptionError("molecules is empty; name at least one, e.g. ('CH3CH2OH',)")
    counts = [n_frames // len(molecules) + (k < n_frames % len(molecules)) for k in range(len(molecules))]
    frames, group = [], 0
    bar = tqdm(total=n_frames, desc="xTB molecule frames", unit="frame", disable=not progress)
    for k, (name, count) in enumerate(zip(molecules, counts)):
        atoms = _molecule(name)
        atoms.calc = xtb_calculator()
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K,
                                     rng=np.random.RandomState([seed, k, 0]))
        dyn = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_K,
                       friction=0.01 / units.fs, fixcm=False, rng=np.random.RandomState([seed, k, 1]),
                       logfile=None)
        dyn.run(equilibration_steps)
        for n in range(count):
            dyn.run(interval)
            frame = atoms.copy()
            frame.calc = SinglePointCalculator(frame, energy=float(atoms.get_potential_energy()),
                                               forces=atoms.get_forces())
            frame.info.update(kind="molecule", molecule=name, reference=REFERENCE,
                              group=group + n // block)
            frames.append(frame)
            bar.update(1)
        group += -(-count // block)
    bar.close()
    return write_split(path, frames, group, seed)
