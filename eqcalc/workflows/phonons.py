"""Phonons of a crystal with phonopy: force constants from eqcalc, band structure and DOS.

``phonons(atoms, model, supercell=(4, 4, 4))`` returns a ``phonopy.Phonopy`` object with force
constants set, so phonopy's own tools apply (band structures, meshes, thermal properties).
Force constants come either from displaced supercells evaluated as one batch (``method=
"displacement"``, phonopy's finite displacements, default) or from the autograd Hessian of the
perfect supercell (``method="hessian"``). phonopy finds the primitive cell of ``atoms`` (a
conventional cell works too); q-points are fractional coordinates of the primitive cell's
reciprocal lattice, and band paths are ASE's standard path of that primitive cell.

phonopy is an optional dependency (``pip install "eqcalc[phonons]"``); without it the functions
raise :class:`~eqcalc.errors.MissingDependencyError`. Imaginary modes are reported plainly (as
negative frequencies, phonopy's convention), never hidden.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from eqcalc.errors import InvalidAtomsError, InvalidOptionError, MissingDependencyError, check_choice

log = logging.getLogger("eqcalc")

METHODS = ("displacement", "hessian")
#: |ν| below this (THz) at Γ counts as an acoustic mode, not an imaginary one.
ACOUSTIC_THZ = 0.05


def _phonopy():
    try:
        import phonopy
    except ImportError as e:
        raise MissingDependencyError(
            "phonons need phonopy; install it with pip install \"eqcalc[phonons]\" (or pip install phonopy)") from e
    return phonopy


def _to_phonopy_atoms(atoms):
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(symbols=atoms.get_chemical_symbols(), cell=np.asarray(atoms.cell.array),
                        scaled_positions=atoms.get_scaled_positions(wrap=False),
                        masses=atoms.get_masses())


def _to_ase(cell, pbc=True):
    from ase import Atoms

    return Atoms(cell.symbols, cell=cell.cell, scaled_positions=cell.scaled_positions,
                 masses=cell.masses, pbc=pbc)


def check_supercell(supercell) -> np.ndarray:
    matrix = np.asarray(supercell)
    if matrix.shape == (3,):
        matrix = np.diag(matrix)
    if matrix.shape != (3, 3) or not np.all(np.round(matrix) == matrix) or round(abs(np.linalg.det(matrix))) < 1:
        raise InvalidOptionError(
            f"supercell={supercell!r}: give three positive integers (e.g. 4 4 4) or an integer 3x3 matrix")
    if matrix.shape == (3, 3) and np.any(np.diag(matrix) < 1) and np.allclose(matrix, np.diag(np.diag(matrix))):
        raise InvalidOptionError(f"supercell={supercell!r}: multiples must be >= 1")
    return matrix.astype(int)


def phonons(atoms, model="default", supercell=(4, 4, 4), method: str = "displacement",
            displacement: float = 0.01, device: str = "auto", dtype: Optional[str] = None,
            forces=None):
    """A ``phonopy.Phonopy`` for the crystal ``atoms`` with force constants from ``model``.

    ``supercell``: three multiples or a 3x3 integer matrix; ``displacement``: Å (phonopy's
    default 0.01); ``forces``: a reference in place of the model, displacement method only: an ASE calculator
    (e.g. ``EMT()``, evaluated supercell by supercell) or a function ``[Atoms] -> [(n, 3) eV/Å]``.
    """
    from eqcalc.atoms import to_ase, validate
    from eqcalc.workflows.vibrations import _calculator

    check_choice("method", method, METHODS)
    atoms = to_ase(atoms)
    validate(atoms)
    if not atoms.pbc.all():
        raise InvalidAtomsError(
            f"phonons need a crystal periodic in all three directions; {atoms.get_chemical_formula()} "
            f"has pbc={atoms.pbc.tolist()}. For molecules and adsorbates use eqcalc vib")
    if not (np.isfinite(displacement) and 0 < displacement <= 0.1):
        raise InvalidOptionError(f"displacement={displacement!r} Å must be in (0, 0.1]; phonopy uses 0.01")
    phonopy = _phonopy()
    matrix = check_supercell(supercell)
    with warnings.catch_warnings():  # phonopy 4 announces its "auto" default at every call
        warnings.simplefilter("ignore")
        phonon = phonopy.Phonopy(_to_phonopy_atoms(atoms), supercell_matrix=matrix, primitive_matrix="auto")
    start = time.perf_counter()
    calc = None if forces is not None else _calculator(model, device, dtype)
    if method == "hessian":
        if forces is not None:
            raise InvalidOptionError("forces= replaces the model only with method='displacement'")
        # Compact force constants: rows of the primitive cell's atoms only (3 per atom, not 3N).
        perfect = _to_ase(phonon.supercell)
        primitive = np.asarray(phonon.primitive.p2s_map)
        rows = calc.hessian_rows([perfect], [primitive])[0]
        phonon.force_constants = rows.reshape(len(primitive), 3, len(perfect), 3).transpose(0, 2, 1, 3).copy()
    else:
        phonon.generate_displacements(distance=displacement)
        cells = [_to_ase(c) for c in phonon.supercells_with_displacements] + [_to_ase(phonon.supercell)]
        evaluate = (_forces_of(forces) if forces is not None
                    else (lambda structures: [r["forces"] for r in calc.predict(structures)]))
        results = evaluate(cells)
        residual = results[-1]  # forces of the perfect supercell: zero at equilibrium
        phonon.forces = np.array([f - residual for f in results[:-1]])
        phonon.produce_force_constants()
    phonon.symmetrize_force_constants()
    log.info("force constants of %s (%s, %d-atom supercell) in %.2f s", atoms.get_chemical_formula(),
             method, len(phonon.supercell), time.perf_counter() - start)
    return phonon


def _forces_of(reference) -> Callable[[List], List[np.ndarray]]:
    """``forces=`` as a function of a list of structures: an ASE calculator is attached to a copy
    of each structure in turn (the caller's calculator keeps no state from us)."""
    from ase.calculators.calculator import BaseCalculator

    if not isinstance(reference, BaseCalculator):
        return reference

    def evaluate(structures):
        out = []
        for s in structures:
            s = s.copy()
            s.calc = reference
            out.append(s.get_forces())
        return out
    return evaluate


def frequencies(phonon, qpoints: Sequence[Sequence[float]]) -> np.ndarray:
    """Frequencies ``(n_q, 3 n_atoms)`` THz at fractional ``qpoints`` (imaginary → negative)."""
    phonon.run_qpoints(np.asarray(qpoints, dtype=float))
    return np.asarray(phonon.get_qpoints_dict()["frequencies"])


def special_points(phonon) -> Dict[str, np.ndarray]:
    """ASE's special q-points (``"G"``, ``"X"``, ``"L"``, ...) of the primitive cell, fractional."""
    from ase.cell import Cell

    return Cell(phonon.primitive.cell).bandpath(npoints=0).special_points


def band_structure(phonon, npoints: int = 101) -> Dict:
    """Frequencies (THz) along ASE's standard band path of the primitive cell: ``{"x": (n,),
    "frequencies": (n, 3 n_atoms), "labels": [(x, name)], "path": str}``."""
    from ase.cell import Cell

    path = Cell(phonon.primitive.cell).bandpath(npoints=npoints)
    kpts = path.kpts
    freqs = frequencies(phonon, kpts)
    x, label_x, labels = path.get_linear_kpoint_axis()
    return {"x": np.asarray(x), "frequencies": freqs, "labels": list(zip(label_x, labels)), "path": path.path}


def dos(phonon, mesh=(20, 20, 20)) -> Dict:
    """Total phonon DOS on a Γ-centred ``mesh``: ``{"frequency": THz, "dos": states/THz}``."""
    phonon.run_mesh(list(mesh))
    phonon.run_total_dos()
    d = phonon.get_total_dos_dict()
    return {"frequency": np.asarray(d["frequency_points"]), "dos": np.asarray(d["total_dos"])}


def imaginary_modes(band: Dict, tolerance_THz: float = ACOUSTIC_THZ) -> List[tuple]:
    """``[(x, frequency THz)]`` of modes below ``-tolerance_THz`` along the band path."""
    f = band["frequencies"]
    k, m = np.nonzero(f < -tolerance_THz)
    return [(float(band["x"][a]), float(f[a, b])) for a, b in zip(k, m)]


def plot(band: Dict, density: Dict, path, title: str = "") -> str:
    """Band structure and DOS side by side, PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_dos) = plt.subplots(1, 2, figsize=(8, 4), sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    ax.plot(band["x"], band["frequencies"], color="C0", lw=1)
    ax.axhline(0, color="k", lw=0.5)
    ticks = [x for x, _ in band["labels"]]
    ax.set_xticks(ticks, [("Γ" if name == "G" else name) for _, name in band["labels"]])
    for x in ticks:
        ax.axvline(x, color="0.7", lw=0.5)
    ax.set_xlim(band["x"][0], band["x"][-1])
    ax.set_ylabel("frequency (THz)")
    ax.set_title(title)
    ax_dos.plot(density["dos"], density["frequency"], color="C1", lw=1)
    ax_dos.set_xlabel("DOS (1/THz)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ---- command line shell (eqcalc phonons) --------------------------------------------------------
def add_arguments(parser) -> None:
    """Options of ``eqcalc phonons``."""
    from eqcalc.engine.drivers import add_model_arguments

    parser.add_argument("input", help="primitive (or conventional) cell of the crystal, any format ASE reads")
    add_model_arguments(parser)
    parser.add_argument("--supercell", type=int, nargs=3, default=[4, 4, 4], metavar=("NA", "NB", "NC"),
                        help="supercell multiples for the force constants (default 4 4 4)")
    parser.add_argument("--method", choices=METHODS, default="displacement",
                        help="displacement: phonopy's finite displacements, one batch; hessian: autograd")
    parser.add_argument("--displacement", type=float, default=0.01, help="displacement, Å (default 0.01)")
    parser.add_argument("--mesh", type=int, nargs=3, default=[20, 20, 20], help="q-mesh of the DOS")
    parser.add_argument("--output-dir", default="eqcalc-phonons", help="folder for band.csv, phonons.png")


def main(args) -> int:
    import csv
    import os

    from eqcalc.engine.drivers import _device, read_structures, unique_names

    atoms = read_structures([args.input])[0]
    name = unique_names([args.input])[0]
    if any(m < 1 for m in args.mesh):
        raise InvalidOptionError(f"--mesh {args.mesh}: give three positive integers")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    phonon = phonons(atoms, args.model, supercell=args.supercell, method=args.method,
                     displacement=args.displacement, device=_device(args.device), dtype=args.dtype)
    band = band_structure(phonon)
    density = dos(phonon, args.mesh)
    table = out / "band.csv"
    with open(table.with_name("band.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x"] + [f"branch_{k}_THz" for k in range(band["frequencies"].shape[1])])
        for x, row in zip(band["x"], band["frequencies"]):
            w.writerow([f"{x:.6f}"] + [f"{v:.5f}" for v in row])
    os.replace(table.with_name("band.csv.tmp"), table)
    png = plot(band, density, out / "phonons.png", f"{atoms.get_chemical_formula()} ({args.model})")
    for label, q in special_points(phonon).items():
        f = frequencies(phonon, [q])[0]
        print(f"  {('Γ' if label == 'G' else label):3s} {np.round(q, 3).tolist()}  " + " ".join(f"{v:7.3f}" for v in f) + " THz")
    bad = imaginary_modes(band)
    if bad:
        worst = min(f for _, f in bad)
        print(f"IMAGINARY MODES: {len(bad)} branch points below -{ACOUSTIC_THZ} THz along {band['path']} "
              f"(lowest {worst:.3f} THz): the structure is not a minimum of this model, or the supercell is too small")
    else:
        print(f"no imaginary modes along {band['path']}")
    print(f"wrote {table}, {png} ({name})")
    return 0
