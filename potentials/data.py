"""Reference data from ASE's EMT for the catalyst domain, and a label-checking reader.

``generate(path, n_structures, seed, elements=...)`` writes an extxyz file of labelled frames:

* fcc(111), (100) and (211) slabs of Al, Ni, Cu, Pd, Ag, Pt, Au (pbc ``[T, T, F]``, no fake
  vacuum periodicity), clean or with one adsorbate H, C, N, O, CO or OH on a high-symmetry
  site (ontop, bridge, fcc, hcp on (111); ontop, bridge, hollow on (100); ontop, bridge and
  hollow on the step edge of (211));
* bulk fcc crystals under random strain (up to ±4 %, shear included), the only frames with stress;
* isolated adsorbate molecules and atoms (CO, OH, H2, O2, N2, CH, NH, H, C, N, O; pbc all F);
* each structure is then perturbed by one of: a Gaussian rattle, a few steps of an EMT
  relaxation (near-equilibrium frames, what relaxations visit), or short Langevin MD at
  300–900 K (ASE ``Langevin``, ``fixcm=False``; up to three frames from one trajectory).

Labels are EMT energy (eV), forces (eV/Å, unconstrained) and, for fully periodic frames, stress
(eV/Å³, ASE Voigt order). Each frame carries ``info["group"]`` (frames from one starting
structure share it), ``info["kind"]`` and ``info["split"]`` in ``{"train", "val", "test"}``.
Splits are drawn by group, so MD frames of one trajectory never straddle splits, and are fixed
by ``seed``: same arguments → identical file.

``read_dataset(path, require=("energy", "forces"))`` reads it back (energies and forces live in
``atoms.calc``, as ASE puts them) and raises :class:`DataLabelError` naming file, frame and key
for any missing or non-finite label that training needs. Pass ``require=("energy",)`` for
energy-only training.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from eqcalc.errors import InvalidAtomsError

METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")
ADSORBATE_ELEMENTS = ("H", "C", "N", "O")
ELEMENTS = METALS + ADSORBATE_ELEMENTS
ADSORBATES = ("H", "C", "N", "O", "CO", "OH")
SPLITS = ("train", "val", "test")
#: fraction of groups in each split
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
LABELS = ("energy", "forces", "stress")

# Bond length (Å) from the binding atom to its nearest metal atom when placing an adsorbate.
_BOND = {"H": 1.75, "C": 1.85, "N": 1.85, "O": 1.95}
# Adsorbate geometry: (symbols, offsets along +z from the binding atom).
_MOLECULE_ON_SURFACE = {
    "H": (["H"], [0.0]), "C": (["C"], [0.0]), "N": (["N"], [0.0]), "O": (["O"], [0.0]),
    "CO": (["C", "O"], [0.0, 1.15]), "OH": (["O", "H"], [0.0, 0.97]),
}
# Isolated molecules: symbols and bond length (Å) along z.
_GAS = {"CO": (["C", "O"], 1.15), "OH": (["O", "H"], 0.97), "H2": (["H", "H"], 0.74),
        "O2": (["O", "O"], 1.21), "N2": (["N", "N"], 1.10), "CH": (["C", "H"], 1.12),
        "NH": (["N", "H"], 1.04), "H": (["H"], 0.0), "C": (["C"], 0.0), "N": (["N"], 0.0),
        "O": (["O"], 0.0)}


class DataLabelError(InvalidAtomsError):
    """A data file lacks a label training needs, or holds NaN/inf in one (file, frame, key)."""


# ----------------------------------------------------------------------------------------------
# structure builders
# ----------------------------------------------------------------------------------------------
def _slab(metal: str, facet: str, rng: np.random.Generator):
    from ase.build import fcc100, fcc111, fcc211

    if facet == "111":
        size = [(2, 2, 3), (2, 2, 4), (3, 3, 3), (3, 3, 4)][rng.integers(4)]
        return fcc111(metal, size=size, vacuum=6.0)
    if facet == "100":
        size = [(2, 2, 3), (2, 2, 4), (3, 3, 3)][rng.integers(3)]
        return fcc100(metal, size=size, vacuum=6.0)
    size = [(3, 2, 3), (3, 3, 3)][rng.integers(2)]
    return fcc211(metal, size=size, vacuum=6.0)


def _sites(slab, facet: str) -> Dict[str, np.ndarray]:
    """High-symmetry sites ``name -> (x, y)`` of the top surface."""
    info = slab.info.get("adsorbate_info", {})
    if facet in ("111", "100") and "sites" in info:
        cell = info["cell"]
        return {name: np.dot(np.asarray(frac), cell) for name, frac in info["sites"].items()}
    # (211): the step edge is made of the highest atoms; sites on and next to it.
    z = slab.positions[:, 2]
    top = np.argsort(-z)
    edge = slab.positions[top[0]]
    # nearest other atom of the step row (same height) gives the bridge direction
    row = [k for k in top[1:] if abs(z[k] - z[top[0]]) < 0.1]
    a = slab.positions[row[0]] if row else edge + np.array([slab.cell[1, 0], slab.cell[1, 1], 0]) / 2
    below = slab.positions[top[len(row) + 1]]  # highest atom of the next row down the terrace
    return {"ontop": edge[:2], "bridge": 0.5 * (edge[:2] + a[:2]),
            "hollow": (edge[:2] + a[:2] + below[:2]) / 3.0}


def _place(slab, adsorbate: str, xy: np.ndarray) -> None:
    """Put ``adsorbate`` above ``xy`` so its binding atom is ``_BOND`` Å from the nearest metal."""
    from ase import Atoms

    symbols, dz = _MOLECULE_ON_SURFACE[adsorbate]
    metal = slab.copy()
    metal.pbc = [True, True, False]
    bond = _BOND[symbols[0]]
    z_top = slab.positions[:, 2].max()
    # images of the slab within the xy plane so the nearest-metal distance is periodic-correct
    shifts = np.array([i * slab.cell[0] + j * slab.cell[1] for i in (-1, 0, 1) for j in (-1, 0, 1)])
    images = (slab.positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    height = z_top + bond
    for z in np.arange(z_top + bond + 0.5, z_top - 0.5, -0.02):
        p = np.array([xy[0], xy[1], z])
        if np.min(np.linalg.norm(images - p, axis=1)) < bond:
            break
        height = z
    base = np.array([xy[0], xy[1], height])
    slab.extend(Atoms(symbols, positions=[base + [0, 0, d] for d in dz]))


def _bulk(metal: str, rng: np.random.Generator):
    from ase.build import bulk

    atoms = bulk(metal, "fcc", cubic=bool(rng.integers(2)))
    if len(atoms) == 1:
        atoms = atoms.repeat((2, 2, 2))
    strain = rng.uniform(-0.04, 0.04, (3, 3))
    strain = 0.5 * (strain + strain.T)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return atoms


def _gas(name: str, rng: np.random.Generator):
    from ase import Atoms

    symbols, d = _GAS[name]
    d = d * rng.uniform(0.9, 1.12) if len(symbols) > 1 else 0.0
    atoms = Atoms(symbols, positions=[[0, 0, 0], [0, 0, d]][:len(symbols)], cell=[10, 10, 10], pbc=False)
    atoms.center()
    return atoms


# ----------------------------------------------------------------------------------------------
# perturbations and labels
# ----------------------------------------------------------------------------------------------
def _label(atoms):
    """A copy of ``atoms`` with EMT energy, forces and (fully periodic only) stress attached."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = atoms.copy()
    atoms.constraints = []
    atoms.info.pop("adsorbate_info", None)  # a dict of arrays: not storable in extxyz
    atoms.calc = EMT()
    results = {"energy": float(atoms.get_potential_energy()), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        results["stress"] = atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def _perturb(atoms, rng: np.random.Generator, seed: int) -> List:
    """One to three labelled frames from ``atoms`` (rattle, partial relaxation or Langevin MD)."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.optimize import BFGS

    mode = rng.choice(["rattle", "relax", "md"], p=[0.35, 0.25, 0.4])
    atoms = atoms.copy()
    if mode == "rattle":
        atoms.rattle(stdev=float(rng.uniform(0.02, 0.15)), seed=int(rng.integers(2**31)))
        return [_label(atoms)]
    atoms.calc = EMT()
    if mode == "relax":
        atoms.rattle(stdev=0.03, seed=int(rng.integers(2**31)))
        opt = BFGS(atoms, logfile=None)
        opt.run(fmax=0.02, steps=int(rng.integers(1, 30)))
        return [_label(atoms)]
    temperature = float(rng.uniform(300, 900))
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.RandomState(seed))
    dyn = Langevin(atoms, timestep=2.0 * units.fs, temperature_K=temperature, friction=0.02,
                   fixcm=False, rng=np.random.RandomState(seed + 1), logfile=None)
    frames = []
    for _ in range(int(rng.integers(1, 4))):
        dyn.run(int(rng.integers(10, 40)))
        frames.append(_label(atoms))
    return frames


def _base_structure(rng: np.random.Generator, elements: Sequence[str]):
    metals = [m for m in METALS if m in elements]
    adsorbates = [a for a in ADSORBATES if set(_MOLECULE_ON_SURFACE[a][0]) <= set(elements)]
    gases = [g for g in _GAS if set(_GAS[g][0]) <= set(elements)]
    kinds = ["adsorbate", "slab", "bulk", "gas"]
    p = np.array([0.6 if metals and adsorbates else 0, 0.12 if metals else 0,
                  0.2 if metals else 0, 0.08 if gases else 0])
    if p.sum() == 0:
        raise InvalidAtomsError(f"elements={list(elements)} contain no metal or molecule to build; "
                                f"use some of {', '.join(ELEMENTS)}")
    kind = kinds[rng.choice(4, p=p / p.sum())]
    # Pt and Cu (the shipped models' focus) get half of the metal draws.
    weights = np.array([3.0 if m in ("Pt", "Cu") else 1.0 for m in metals])
    metal = metals[rng.choice(len(metals), p=weights / weights.sum())] if metals else None
    if kind == "gas":
        return kind, _gas(gases[rng.integers(len(gases))], rng)
    if kind == "bulk":
        return kind, _bulk(metal, rng)
    facet = ["111", "100", "211"][rng.choice(3, p=[0.5, 0.25, 0.25])]
    slab = _slab(metal, facet, rng)
    if kind == "adsorbate":
        sites = _sites(slab, facet)
        site = sorted(sites)[rng.integers(len(sites))]
        ads = adsorbates[rng.integers(len(adsorbates))]
        _place(slab, ads, sites[site])
        slab.info["site"] = f"{facet}-{site}-{ads}"
    return kind, slab


def _check_elements(elements: Sequence[str]) -> None:
    unknown = sorted(set(elements) - set(ELEMENTS))
    if unknown:
        raise InvalidAtomsError(f"elements {unknown} are not covered by EMT here; use some of "
                                f"{', '.join(ELEMENTS)}")


def _progress(show: bool, total: int, desc: str, unit: str = "frame"):
    """A tqdm bar over frames (or ``unit``), or None."""
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit)


def generate(path: str | os.PathLike, n_structures: int, seed: int = 0,
             elements: Sequence[str] = ELEMENTS, progress: bool = False) -> Path:
    """Write ``n_structures`` EMT-labelled frames to ``path`` (extxyz); see the module docstring.

    Deterministic for a given ``(n_structures, seed, elements)``. Returns the path.
    """

    _check_elements(elements)
    rng = np.random.default_rng(seed)
    frames: List = []
    group = 0
    bar = _progress(progress, n_structures, "EMT data")
    while len(frames) < n_structures:
        kind, atoms = _base_structure(rng, elements)
        new = _perturb(atoms, rng, seed * 100003 + group)
        for f in new[: n_structures - len(frames)]:
            f.info["group"] = group
            f.info["kind"] = kind
            f.info["reference"] = "ASE EMT"
            if "site" in atoms.info:
                f.info["site"] = atoms.info["site"]
            frames.append(f)
        if bar is not None:
            bar.update(min(len(new), bar.total - bar.n))
        group += 1
    if bar is not None:
        bar.close()
    return write_split(path, frames, group, seed)


def generate_near_minima(path: str | os.PathLike, n_structures: int, seed: int = 0,
                         elements: Sequence[str] = ELEMENTS, progress: bool = False) -> Path:
    """Write ``n_structures`` EMT-labelled frames near EMT minima to ``path`` (extxyz).

    Vibrational frequencies and phonons read the curvature of the energy surface within ~0.1 Å
    of a minimum, where :func:`generate`'s frames (rattled, partly relaxed, hot MD) are sparse.
    Here each adsorbate on a (111), (100) or (211) slab (85 %) is relaxed by EMT to 0.01 eV/Å
    (bottom layer fixed; it may move to a neighbouring site, as it would), and each fcc crystal
    (15 %, unstrained) starts at its lattice sites; then three frames displace the adsorbate by a
    Gaussian of 0.02–0.1 Å and the metal by 0.005–0.03 Å. ``info["kind"]`` is
    ``"near-minimum"``; groups and splits as in :func:`generate`. Deterministic for given
    arguments; returns the path.
    """
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms
    from ase.optimize import BFGS

    _check_elements(elements)
    metals = [m for m in METALS if m in elements]
    adsorbates = [a for a in ADSORBATES if set(_MOLECULE_ON_SURFACE[a][0]) <= set(elements)]
    if not metals:
        raise InvalidAtomsError(f"elements={list(elements)} contain no metal; use some of {', '.join(METALS)}")
    rng = np.random.default_rng([seed, 11])
    frames: List = []
    group = 0
    bar = _progress(progress, n_structures, "EMT near-minimum data")
    while len(frames) < n_structures:
        metal = metals[rng.integers(len(metals))]
        if adsorbates and rng.random() < 0.85:
            facet = ["111", "100", "211"][rng.choice(3, p=[0.45, 0.35, 0.2])]
            atoms = _slab(metal, facet, rng)
            sites = _sites(atoms, facet)
            site = sorted(sites)[rng.integers(len(sites))]
            ads = adsorbates[rng.integers(len(adsorbates))]
            n_metal = len(atoms)
            bottom = atoms.positions[:, 2] < atoms.positions[:, 2].min() + 0.5
            _place(atoms, ads, sites[site])
            atoms.set_constraint(FixAtoms(indices=np.flatnonzero(bottom)))
            atoms.calc = EMT()
            BFGS(atoms, logfile=None).run(fmax=0.01, steps=150)
            atoms.constraints = []
            label = f"{facet}-{site}-{ads}"
        else:
            from ase.build import bulk
            atoms = bulk(metal, "fcc", cubic=True).repeat((2, 2, 2))
            n_metal, label = len(atoms), "bulk"
        for _ in range(3):
            frame = atoms.copy()
            sigma = np.where(np.arange(len(frame)) < n_metal, rng.uniform(0.005, 0.03), rng.uniform(0.02, 0.1))
            frame.positions += rng.normal(size=(len(frame), 3)) * sigma[:, None]
            frame = _label(frame)
            frame.info.update(group=group, kind="near-minimum", reference="ASE EMT", site=label)
            frames.append(frame)
        if bar is not None:
            bar.update(min(3, bar.total - bar.n))
        group += 1
    if bar is not None:
        bar.close()
    return write_split(path, frames[:n_structures], group, seed)


#: ``(process, metal, moving species)`` left out of :func:`generate_paths` by default: the
#: reactions of ``tests/neb_cases.py``, whose barriers measure the model against EMT, so that
#: those exact chemistries stay unseen (their neighbours in chemistry are drawn).
HELD_OUT_PATHS = (("hop-111", "Pt", "O"), ("hop-100", "Cu", "O"), ("hop-100", "Al", "Au"),
                  ("vacancy", "Cu", "Cu"), ("hop-111", "Pd", "N"))
_HOP_HEIGHT = {"H": 1.0, "C": 1.1, "N": 1.1, "O": 1.2}   # Å above the surface, before relaxing


def _hop_endpoints(process: str, metal: str, mover: str, rng: np.random.Generator):
    """Unrelaxed end points of one elementary hop (same atoms, same order)."""
    from ase.build import bulk, fcc100, fcc111

    if process == "vacancy":
        base = bulk(metal, "fcc", cubic=True).repeat((2, 2, 2))
        base.set_cell(base.cell.array * rng.uniform(0.99, 1.01), scale_atoms=True)
        return vacancy_end_points(base, int(rng.integers(len(base))))
    build, sites = (fcc111, ("fcc", "hcp")) if process == "hop-111" else (fcc100, ("hollow", "hollow"))
    size = [(3, 3, 3), (2, 3, 3), (3, 3, 4)][rng.integers(3)]
    height = 1.8 if mover in METALS else _HOP_HEIGHT[mover] - (0.2 if process == "hop-100" else 0.0)
    return hop_end_points(build, metal, size, mover, height, sites,
                          ((0, 0), (1, 0) if process == "hop-100" else (0, 0)))


def vacancy_end_points(crystal, vacancy: int):
    """End points of a vacancy hop in ``crystal``: atom ``vacancy`` removed, then its nearest
    neighbour (minimum image) moved onto the empty site."""
    neighbour = int(np.argsort(crystal.get_distances(vacancy, range(len(crystal)), mic=True))[1])
    initial = crystal.copy()
    del initial[vacancy]
    final = initial.copy()
    final.positions[neighbour - (neighbour > vacancy)] = crystal.positions[vacancy]
    return initial, final


def hop_end_points(build, metal: str, size, mover: str, height: float, sites, offsets):
    """Unrelaxed end points of ``mover`` (an adsorbate or a metal atom) hopping between two
    sites of a slab: ``build`` is ASE's ``fcc111``/``fcc100``, ``size`` its repeats (6 Å vacuum),
    ``sites`` two site names and ``offsets`` two ``add_adsorbate`` offsets (in surface cells);
    ``height`` Å above the top layer; bottom layer fixed."""
    from ase.build import add_adsorbate
    from ase.constraints import FixAtoms

    pair = []
    for site, offset in zip(sites, offsets):
        s = build(metal, size, vacuum=6.0)
        add_adsorbate(s, mover, height, site, offset=offset)
        s.info.pop("adsorbate_info", None)
        s.set_constraint(FixAtoms(mask=s.get_tags() == size[2]))
        pair.append(s)
    return tuple(pair)


def generate_paths(path: str | os.PathLike, n_paths: int, seed: int = 0,
                   elements: Sequence[str] = ELEMENTS, n_images: int = 5,
                   held_out: Sequence[tuple] = HELD_OUT_PATHS, progress: bool = False) -> Path:
    """Write EMT-labelled frames along ``n_paths`` elementary hops to ``path`` (extxyz).

    Barriers are read where :func:`generate`'s frames never go: an atom squeezed between two
    sites, a metal atom jumping into a vacancy. Each path is one of: an adsorbate (H, C, N, O)
    or a metal adatom hopping fcc → hcp on (111) or hollow → hollow on (100), or a metal atom
    hopping into a nearest-neighbour vacancy of a 2x2x2 cubic crystal. End points are relaxed
    by EMT (0.05 eV/Å), ``n_images`` intermediate images interpolated (IDPP, minimum image)
    and relaxed by ASE's climbing-image NEB with EMT for at most 60 FIRE steps (a band near
    the path is the point, not a converged one). Frames: every intermediate image plus a
    0.03 Å rattle of the highest one, ``info["kind"] == "path"``, one group per path. Hops in
    ``held_out`` (``(process, metal, mover)``, see :data:`HELD_OUT_PATHS`) are never drawn.
    Deterministic for given arguments; returns the path.
    """
    from ase.calculators.emt import EMT
    from ase.mep import NEB
    from ase.optimize import BFGS, FIRE

    _check_elements(elements)
    metals = [m for m in METALS if m in elements]
    movers = [a for a in ADSORBATE_ELEMENTS if a in elements]
    if not metals:
        raise InvalidAtomsError(f"elements={list(elements)} contain no metal; use some of {', '.join(METALS)}")
    rng = np.random.default_rng([seed, 13])
    held = {tuple(h) for h in held_out}
    frames: List = []
    bar = _progress(progress, n_paths, "EMT reaction paths", unit="path")
    group = 0
    while group < n_paths:
        process = ["hop-111", "hop-100", "vacancy"][rng.choice(3, p=[0.4, 0.35, 0.25])]
        metal = metals[rng.integers(len(metals))]
        if process == "vacancy":
            mover = metal
        else:
            choices = movers if movers and rng.random() < 0.6 else metals
            mover = choices[rng.integers(len(choices))]
        if (process, metal, mover) in held:
            continue
        ends = _hop_endpoints(process, metal, mover, rng)
        for end in ends:
            end.calc = EMT()
            BFGS(end, logfile=None).run(fmax=0.05, steps=200)
        band = [ends[0]] + [ends[0].copy() for _ in range(n_images)] + [ends[1]]
        for image in band[1:-1]:
            image.calc = EMT()
        neb = NEB(band, climb=True, method="improvedtangent")
        neb.interpolate("idpp", mic=True)
        FIRE(neb, logfile=None).run(fmax=0.1, steps=60)
        interior = band[1:-1]
        top = interior[int(np.argmax([image.get_potential_energy() for image in interior]))].copy()
        top.positions += rng.normal(scale=0.03, size=top.positions.shape)
        for image in interior + [top]:
            frame = _label(image)
            frame.info.update(group=group, kind="path", reference="ASE EMT", site=f"{process}-{metal}-{mover}")
            frames.append(frame)
        if bar is not None:
            bar.update(1)
        group += 1
    if bar is not None:
        bar.close()
    return write_split(path, frames, group, seed)


def write_split(path: str | os.PathLike, frames: List, n_groups: int, seed: int) -> Path:
    """Give each frame the split of its ``info["group"]`` (fixed by ``seed``) and write all
    frames to ``path`` (extxyz); returns the path."""
    import ase.io

    split_of_group = _split_groups(n_groups, seed)
    for f in frames:
        f.info["split"] = split_of_group[f.info["group"]]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ase.io.write(path, frames, format="extxyz")
    return path


def _split_groups(n_groups: int, seed: int) -> List[str]:
    order = np.random.default_rng([seed, 7]).permutation(n_groups)
    n_train = int(round(SPLIT_FRACTIONS[0] * n_groups))
    n_val = max(1, int(round(SPLIT_FRACTIONS[1] * n_groups))) if n_groups >= 3 else 0
    out = ["test"] * n_groups
    for rank, g in enumerate(order):
        out[g] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def labels(atoms) -> Dict[str, np.ndarray]:
    """The labels of a frame read by ASE (``atoms.calc.results``, else ``info``/``arrays``)."""
    out: Dict[str, np.ndarray] = {}
    results = dict(getattr(atoms.calc, "results", {}) or {})
    for key in LABELS:
        if key in results:
            out[key] = np.asarray(results[key], dtype=float)
        elif key in atoms.info:
            out[key] = np.asarray(atoms.info[key], dtype=float)
        elif key in atoms.arrays:
            out[key] = np.asarray(atoms.arrays[key], dtype=float)
    return out


def _read_db(path: Path, index) -> tuple:
    """Frames of an ASE database with their places (``"row ID"``); ``key_value_pairs`` go into
    ``info`` (``split``, ``group``, ``kind`` as :func:`generate` sets them), labels stay in ``calc``."""
    import ase.db
    from ase.io.formats import string2index

    try:
        with ase.db.connect(path, type="db", serial=True) as db:
            rows = list(db.select())
    except Exception as e:  # sqlite3.DatabaseError and friends: not a database
        raise DataLabelError(f"{path}: not a readable ASE database ({type(e).__name__}: {e}); "
                             "write one with ase.db.connect(path).write(atoms)") from e
    if isinstance(index, str):
        index = string2index(index)
    rows = rows[index] if isinstance(index, slice) else [rows[index]]
    frames, places = [], []
    for row in rows:
        atoms = row.toatoms()
        atoms.info.update(row.key_value_pairs)
        frames.append(atoms)
        places.append(f"row {row.id}")
    return frames, places


def read_dataset(path: str | os.PathLike, require: Sequence[str] = ("energy", "forces"),
                 index=":") -> List:
    """Frames of ``path`` (any ASE-readable file, extxyz for generated data, or an ASE database
    ``.db``) with checked labels.

    Every frame must carry each key of ``require`` (``"energy"``, ``"forces"``, ``"stress"``;
    stress only on fully periodic frames) with finite values, else :class:`DataLabelError`
    names file, frame index (row id for a ``.db``) and key. Labels present but not required must
    still be finite. Frames without ``info["split"]`` (``key_value_pairs`` in a ``.db``) are
    assigned one by frame index (seed 0).
    """
    import ase.io

    path = Path(path)
    if not path.exists():
        raise DataLabelError(f"data file {str(path)!r} does not exist; generate one with "
                             "potentials.data.generate(path, n_structures, seed)")
    for key in require:
        if key not in LABELS:
            raise DataLabelError(f"require={tuple(require)!r}: {key!r} is not a label; use {LABELS}")
    if path.suffix.lower() == ".db":
        frames, places = _read_db(path, index)
    else:
        try:
            frames = ase.io.read(path, index=index)
        except Exception as e:  # ASE raises many types for unreadable files
            raise DataLabelError(f"{path}: cannot be read as structures ({type(e).__name__}: {e}); give a "
                                 "file ASE reads (extxyz from potentials.data.generate, .traj, an ASE .db)") from e
        if not isinstance(frames, list):
            frames = [frames]
        places = [f"frame {k}" for k in range(len(frames))]
    if len(frames) == 0:
        raise DataLabelError(f"{path}: the file holds no frames")
    missing_split = [k for k, a in enumerate(frames) if "split" not in a.info]
    if missing_split:
        split = _split_groups(len(frames), 0)
        for k in missing_split:
            frames[k].info["split"] = split[k]
    for k, atoms in enumerate(frames):
        try:
            found = labels(atoms)
        except (TypeError, ValueError) as e:
            raise DataLabelError(f"{path}: {places[k]}: a label is not numeric ({e}); relabel or drop the frame") from e
        for key in LABELS:
            needed = key in require and (key != "stress" or bool(atoms.pbc.all()))
            if key not in found:
                if needed:
                    hint = ("train energy-only with require=('energy',)" if key == "forces"
                            else "relabel the frame or drop it")
                    raise DataLabelError(
                        f"{path}: {places[k]}: label {key!r} is missing (found "
                        f"{sorted(found) or 'no labels'}); {hint}")
                continue
            value = found[key]
            expected = {"energy": (), "forces": (len(atoms), 3)}.get(key)
            if expected is not None and value.shape != expected:
                raise DataLabelError(f"{path}: {places[k]}: label {key!r} has shape {value.shape}, "
                                     f"expected {expected}")
            if not np.all(np.isfinite(value)):
                if key in require:
                    raise DataLabelError(f"{path}: {places[k]}: label {key!r} is NaN or inf; relabel "
                                         "or drop the frame")
                # not needed (e.g. NaN forces in energy-only training): drop the broken label
                if atoms.calc is not None:
                    atoms.calc.results.pop(key, None)
                atoms.info.pop(key, None)
                atoms.arrays.pop(key, None)
    return frames


def split(frames: Sequence, name: str) -> List:
    """The frames whose ``info["split"]`` is ``name`` (``"train"``, ``"val"`` or ``"test"``)."""
    return [f for f in frames if f.info.get("split") == name]


def summary(frames: Sequence) -> Dict:
    """Counts per split and kind, elements and atom counts: the data part of model metadata."""
    from collections import Counter

    symbols = sorted({s for f in frames for s in f.get_chemical_symbols()})
    return {
        "n_frames": len(frames),
        "splits": dict(Counter(f.info.get("split", "?") for f in frames)),
        "kinds": dict(Counter(str(f.info.get("kind", "?")) for f in frames)),
        "elements": symbols,
        "atoms_per_frame": [int(min(len(f) for f in frames)), int(max(len(f) for f in frames))],
        "n_with_stress": int(sum("stress" in labels(f) for f in frames)),
        # Files written before frames carried info["reference"] count as "unknown".
        "reference": ", ".join(sorted({str(f.info.get("reference", "unknown")) for f in frames})),
    }
