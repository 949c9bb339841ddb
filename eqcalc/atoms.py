"""ASE ``Atoms`` (or pymatgen ``Structure``) → validated float64 tensors.

The first room of the data flow: everything a user can get wrong about a structure is caught
here with a typed error naming the input and the fix, before any model runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols

from eqcalc.errors import CellError, InvalidAtomsError, UnknownElementError

#: Two atoms closer than this fraction of the sum of their covalent radii (ASE's
#: ``covalent_radii``) overlap: 0.35 gives 0.92 Å for Cu-Cu (bulk neighbours 2.55 Å), 0.50 Å for
#: C-O (bond 1.13 Å), 0.22 Å for H-H (bond 0.74 Å). The shortest real bonds are ~0.8 of the sum
#: and hot MD collisions stay above ~0.6; models give garbage far below that, so it is refused.
#: (Not higher: the physics test structures of potentials.testing reach 0.42.)
MIN_DISTANCE_FRACTION = 0.35
#: Atomic numbers a structure may hold (H to Og).
MAX_Z = 118


def to_ase(structure) -> Atoms:
    """Return ``structure`` as ASE ``Atoms``; pymatgen ``Structure``/``Molecule`` are converted
    (a new Atoms object: the pymatgen object is never modified)."""
    if isinstance(structure, Atoms):
        return structure
    if type(structure).__module__.startswith("pymatgen"):
        from pymatgen.io.ase import AseAtomsAdaptor  # only when a pymatgen object is passed

        return AseAtomsAdaptor.get_atoms(structure)
    raise InvalidAtomsError(
        f"expected ase.Atoms or a pymatgen Structure, got {type(structure).__name__}; "
        "build one with ase.Atoms(...) or ase.io.read(...)")


def validate(atoms: Atoms, species: Sequence[str] | None = None) -> None:
    """Raise a typed error if ``atoms`` cannot be evaluated (by a model with ``species``)."""
    if len(atoms) == 0:
        raise InvalidAtomsError("the Atoms object is empty; add atoms before computing")
    numbers = np.asarray(atoms.numbers)
    bad_z = np.where((numbers < 1) | (numbers > MAX_Z))[0]
    if len(bad_z):
        raise UnknownElementError(
            f"atoms {bad_z[:10].tolist()} have atomic numbers {numbers[bad_z[:10]].tolist()}, not an "
            f"element (1 to {MAX_Z}); set real elements (atoms.numbers or atoms.symbols)")
    positions = atoms.positions
    if not np.all(np.isfinite(positions)):
        bad = np.where(~np.isfinite(positions).all(axis=1))[0]
        raise InvalidAtomsError(
            f"positions of atoms {bad[:10].tolist()} are NaN or inf; fix the structure "
            "(a previous failed step or a bad file?)")
    cell = np.asarray(atoms.cell.array, dtype=float)
    if not np.all(np.isfinite(cell)):
        raise InvalidAtomsError("the cell contains NaN or inf; set a finite cell with atoms.set_cell")
    check_cell(cell, atoms.pbc)
    if species is not None:
        allowed = set(species)
        unknown = sorted({chemical_symbols[z] for z in np.unique(numbers).tolist()} - allowed)
        if unknown:
            raise UnknownElementError(
                f"element(s) {', '.join(unknown)} not supported by this model; "
                f"it knows {', '.join(species)}. Use a model trained on these elements.")


def check_cell(cell: np.ndarray, pbc: Sequence[bool]) -> None:
    """Periodic directions need non-zero, linearly independent cell vectors."""
    pbc = np.asarray(pbc, dtype=bool)
    lengths = np.linalg.norm(cell, axis=1)
    for axis in np.where(pbc)[0]:
        if lengths[axis] < 1e-8:
            raise CellError(
                f"pbc is True along axis {axis} but cell vector {axis} is zero; set a cell "
                f"(atoms.set_cell) or make that direction open (atoms.pbc[{axis}] = False)")
    vectors = cell[pbc]
    if len(vectors) > 1:
        singular = np.linalg.matrix_rank(vectors, tol=1e-8 * max(lengths.max(), 1.0)) < len(vectors)
        if singular:
            raise CellError(
                f"the periodic cell vectors {vectors.tolist()} are linearly dependent (singular "
                "cell); give independent lattice vectors")


@dataclass(frozen=True)
class SystemTensors:
    """A batch of systems as float64 tensors (see :mod:`eqcalc.keys` for the conventions)."""

    positions: torch.Tensor  # (n_atoms, 3) float64, Å
    numbers: torch.Tensor    # (n_atoms,) int64
    cell: torch.Tensor       # (n_systems, 3, 3) float64, Å
    pbc: torch.Tensor        # (n_systems, 3) bool
    system: torch.Tensor     # (n_atoms,) int64


def consecutive_ranges(costs: Sequence[float], budget: float) -> list[tuple[int, int]]:
    """Consecutive system ranges ``[(first, stop), ...]`` covering ``costs`` (one per system),
    each adding up to at most ``budget`` unless a single system exceeds it on its own: how a
    batch is cut into pieces that fit (triplet memory, Hessian graphs that stay in cache)."""
    pieces: list[tuple[int, int]] = []
    first, used = 0, 0.0
    for s, cost in enumerate(costs):
        if s > first and used + cost > budget:
            pieces.append((first, s))
            first, used = s, 0.0
        used += cost
    pieces.append((first, len(costs)))
    return pieces


def to_tensors(structures: Sequence[Atoms], device: torch.device | str = "cpu") -> SystemTensors:
    """Stack ``structures`` (already validated) into one batch on ``device``."""
    positions = np.concatenate([a.positions for a in structures])
    numbers = np.concatenate([a.numbers for a in structures])
    cells = np.stack([np.asarray(a.cell.array, dtype=float) for a in structures])
    pbc = np.stack([np.asarray(a.pbc, dtype=bool) for a in structures])
    system = np.repeat(np.arange(len(structures)), [len(a) for a in structures])
    f64 = dict(dtype=torch.float64, device=device)
    return SystemTensors(
        positions=torch.as_tensor(positions, **f64),
        numbers=torch.as_tensor(numbers, dtype=torch.int64, device=device),
        cell=torch.as_tensor(cells, **f64),
        pbc=torch.as_tensor(pbc, device=device),
        system=torch.as_tensor(system, dtype=torch.int64, device=device),
    )


_RADII = {}


def _covalent_radii(device: torch.device) -> torch.Tensor:
    """ASE's covalent radii ``(119,)`` Å, kept on ``device``."""
    if device not in _RADII:
        from ase.data import covalent_radii

        _RADII[device] = torch.as_tensor(covalent_radii[:MAX_Z + 1], dtype=torch.float64, device=device)
    return _RADII[device]


def check_overlaps(edge_lengths: torch.Tensor, edge_index: torch.Tensor, numbers: torch.Tensor,
                   system: torch.Tensor | None = None) -> None:
    """Raise :class:`InvalidAtomsError` naming the atoms if any pair is closer than
    :data:`MIN_DISTANCE_FRACTION` of the sum of their covalent radii (models would give garbage or
    NaN). ``edge_lengths`` ``(n_edges,)`` Å, ``numbers`` ``(n_atoms,)``; one host sync."""
    if edge_lengths.numel() == 0:
        return
    radii = _covalent_radii(edge_lengths.device)
    # no pair closer than the fraction of the largest radius sum present: nothing to look for
    if bool(edge_lengths.min().to(torch.float64) >= MIN_DISTANCE_FRACTION * 2 * radii[numbers].max()):
        return
    bond = radii[numbers[edge_index[0]]] + radii[numbers[edge_index[1]]]
    ratio, k = torch.min(edge_lengths.to(torch.float64) / bond, dim=0)
    if ratio < MIN_DISTANCE_FRACTION:
        i, j = edge_index[:, k].tolist()
        zi, zj = int(numbers[i]), int(numbers[j])
        where, s = "", 0
        if system is not None and int(system.max()) > 0:
            s = int(system[i])
            first = int((system < s).sum())
            where, i, j = f" of system {s}", i - first, j - first
        pair = (f"atom {i} ({chemical_symbols[zi]}){where} and its own periodic image" if i == j else
                f"atoms {i} ({chemical_symbols[zi]}) and {j} ({chemical_symbols[zj]}){where}")
        error = InvalidAtomsError(
            f"{pair} overlap: "
            f"{float(edge_lengths[k]):.3g} Å apart, less than {MIN_DISTANCE_FRACTION} x the sum of their "
            f"covalent radii ({MIN_DISTANCE_FRACTION * float(bond[k]):.3g} Å); "
            + ("check the cell (too small or flat for its atoms)" if i == j else
               "remove the duplicate atom or fix the positions"))
        error.system = s  # the engine names the system when a run brings atoms together
        raise error


def symbols_to_numbers(species: Sequence[str]) -> list[int]:
    """Chemical symbols → atomic numbers, with a typed error for unknown symbols."""
    out = []
    for s in species:
        if s not in chemical_symbols[1:]:
            raise UnknownElementError(f"{s!r} is not a chemical symbol; use e.g. 'Cu', 'O', 'H'")
        out.append(chemical_symbols.index(s))
    return out
