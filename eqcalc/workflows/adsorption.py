"""Adsorption energies on every symmetry-distinct site, relaxed as one batch.

1. Sites of the slab's top surface from pymatgen's ``AdsorbateSiteFinder`` (imported only here:
   pymatgen is an optional dependency), ``distance`` Å above the surface: on top, bridge and
   hollow (hollow sites are labelled ``hcp`` when an atom of the second layer lies below them,
   ``fcc`` otherwise).
2. One placement per site: the adsorbate's binding atom (the first element of its formula: C of
   CO, O of OH) on the site, the rest of the molecule pointing away from the surface.
3. All placements, the clean slab and the gas-phase adsorbate (in vacuum, no periodicity) are
   relaxed together by :func:`eqcalc.relax.relax` with the same model; the slab's FixAtoms are
   kept.
4. ``E_ads = E(slab+adsorbate) - E(slab) - E(adsorbate in gas phase)``, eV; negative binds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from eqcalc.errors import InvalidAtomsError, InvalidOptionError

SITE_KINDS = ("ontop", "bridge", "hollow")
#: Å of vacuum a slab needs above its top surface (to the next periodic image along z): room for
#: the adsorbate at ``distance`` plus its length. A bulk crystal has ~2 Å (one interlayer gap).
MIN_VACUUM = 5.0


@dataclass
class AdsorptionResult:
    """``rows``: one dict per placement (site, x/y Å, E_ads eV, E eV, converged, steps, height Å);
    ``placements``/``slab``/``gas``: the relaxed structures."""

    rows: List[Dict]
    placements: List
    slab: object
    gas: object
    e_slab: float
    e_gas: float

    def table(self) -> str:
        head = f"{'site':14s}{'x (Å)':>8s}{'y (Å)':>8s}{'E_ads (eV)':>12s}{'height (Å)':>12s}{'fmax':>8s}{'steps':>7s}  converged"
        lines = [head] + [
            f"{r['site']:14s}{r['x_A']:8.3f}{r['y_A']:8.3f}{r['E_ads_eV']:12.4f}{r['height_A']:12.3f}"
            f"{r['fmax_eV_A']:8.3f}{r['steps']:7d}  {'yes' if r['converged'] else 'NO'}" for r in self.rows]
        lines.append(f"E(slab) {self.e_slab:.4f} eV, E(gas) {self.e_gas:.4f} eV; E_ads = E(slab+ads) - E(slab) - E(gas)")
        return "\n".join(lines)


def gas_molecule(adsorbate: str, box: float = 12.0):
    """The adsorbate as an isolated molecule (ASE's g2 geometry, or one atom), centred in a box."""
    from ase import Atoms
    from ase.build import molecule
    from ase.collections import g2
    from ase.data import chemical_symbols

    if adsorbate in chemical_symbols[1:]:
        mol = Atoms(adsorbate)
    elif adsorbate in g2.names:
        mol = molecule(adsorbate)
    else:
        raise InvalidOptionError(
            f"adsorbate={adsorbate!r} is neither an element nor a molecule of ASE's g2 set; use e.g. "
            "'O', 'H', 'CO', 'OH', 'NO', 'H2O'")
    mol.cell = [box, box, box]
    mol.pbc = False
    mol.center()
    return mol


def _binding_index(adsorbate: str, mol) -> int:
    from ase.symbols import string2symbols

    first = string2symbols(adsorbate)[0]
    return mol.get_chemical_symbols().index(first)


def place(slab, mol, binding: int, site: np.ndarray):
    """``slab`` + ``mol`` with atom ``binding`` at ``site`` (Å) and the molecule pointing up (+z)."""
    m = mol.copy()
    if len(m) > 1:
        others = np.delete(m.positions, binding, axis=0).mean(0)
        axis = others - m.positions[binding]
        if np.linalg.norm(axis) > 1e-8:
            m.rotate(axis, "z", center=m.positions[binding])
    m.translate(site - m.positions[binding])
    m.cell, m.pbc = slab.cell, slab.pbc
    out = slab.copy()
    out += m
    return out


def check_vacuum(slab) -> float:
    """The vacuum gap (Å) along the surface normal between the slab's top and the bottom of its
    periodic image; :class:`InvalidAtomsError` below :data:`MIN_VACUUM` (e.g. a bulk crystal)."""
    if not slab.pbc[2]:
        return float("inf")
    normal = np.cross(slab.cell[0], slab.cell[1])
    normal /= np.linalg.norm(normal)
    height = abs(float(np.dot(slab.cell[2], normal)))
    z = slab.positions @ normal
    gap = height - float(z.max() - z.min())
    if gap < MIN_VACUUM:
        raise InvalidAtomsError(
            f"{slab.get_chemical_formula()} has only {gap:.2f} Å between its top atoms and the next periodic "
            f"image along z (a bulk crystal, or a slab wrapped across the cell?); adsorption needs a slab with at "
            f"least {MIN_VACUUM:g} Å of vacuum: build one with ase.build.fcc111(..., vacuum=10) or "
            "ase.build.surface(bulk, (1, 1, 1), layers=4, vacuum=10), or centre it with atoms.center(10, axis=2)")
    return gap


def find_sites(slab, distance: float = 2.0, kinds: Sequence[str] = SITE_KINDS) -> List[tuple]:
    """``[(label, position (3,) Å)]`` of symmetry-distinct sites ``distance`` Å above the top surface."""
    try:
        from pymatgen.analysis.adsorption import AdsorbateSiteFinder
        from pymatgen.io.ase import AseAtomsAdaptor
    except ImportError as e:  # pragma: no cover - depends on the install
        raise InvalidOptionError("eqcalc adsorption needs pymatgen for site finding: pip install pymatgen") from e
    if not (slab.pbc[0] and slab.pbc[1]) or abs(slab.cell[2, 2]) < 1e-8:
        raise InvalidAtomsError("the slab needs a cell periodic along x and y with the surface normal along z "
                                "(e.g. ase.build.fcc111(..., vacuum=10))")
    check_vacuum(slab)
    for k in kinds:
        if k not in SITE_KINDS:
            raise InvalidOptionError(f"site kind {k!r} is unknown; use any of {', '.join(SITE_KINDS)}")
    plain = slab.copy()
    plain.set_constraint()
    plain.pbc = True  # pymatgen Structures are periodic; the vacuum separates the images
    finder = AdsorbateSiteFinder(AseAtomsAdaptor.get_structure(plain))
    sites = finder.find_adsorption_sites(distance=distance, positions=tuple(kinds))
    z = slab.positions[:, 2]
    top = z.max()
    below = slab.positions[(z < top - 0.5) & (z > top - 3.5)]  # the second layer
    out = []
    for kind in kinds:
        for k, pos in enumerate(sites.get(kind, [])):
            label = f"{kind}{k if len(sites[kind]) > 1 else ''}"
            if kind == "hollow" and len(below):
                d = below[:, :2] - pos[:2]
                frac = np.linalg.solve(slab.cell[:2, :2].T, d.T).T
                frac -= np.round(frac)
                lateral = np.linalg.norm(frac @ slab.cell[:2, :2], axis=1).min()
                label = f"hollow-{'hcp' if lateral < 0.5 else 'fcc'}{k if len(sites[kind]) > 2 else ''}"
            out.append((label, np.asarray(pos, dtype=float)))
    if not out:
        raise InvalidAtomsError("no adsorption sites found on the slab's top surface; is it a slab with vacuum along z?")
    return out


@dataclass
class Placements:
    """What :func:`plan` gives: the ``slab`` (info cleaned), the gas molecule ``gas``, the index
    ``binding`` of its binding atom, ``sites`` ``[(label, position (3,) Å)]`` and one
    ``placements`` Atoms per site (the slab's atoms first, then the adsorbate's)."""

    slab: object
    gas: object
    binding: int
    sites: List[tuple]
    placements: List

    def site_row(self, k: int, relaxed, energy: float, e_slab: float, e_gas: float, fmax: float,
                 steps: int, converged: bool) -> Dict:
        """The table row of site ``k`` from its relaxed placement and the three energies (eV)."""
        label, pos = self.sites[k]
        n_slab = len(self.slab)
        surface = self.slab.positions[:, 2] > self.slab.positions[:, 2].max() - 0.5  # the top layer
        b = relaxed.positions[n_slab + self.binding]
        return {"site": label, "x_A": float(pos[0]), "y_A": float(pos[1]),
                "E_ads_eV": float(energy) - e_slab - e_gas, "E_eV": float(energy),
                "height_A": float(b[2] - relaxed.positions[:n_slab][surface, 2].mean()),
                "fmax_eV_A": float(fmax), "steps": int(steps), "converged": bool(converged)}


def plan(slab, adsorbate: str, distance: float = 2.0, kinds: Sequence[str] = SITE_KINDS) -> Placements:
    """Sites of ``slab`` and one placement of ``adsorbate`` per site (nothing relaxed yet)."""
    from eqcalc.atoms import to_ase

    if not (isinstance(distance, (int, float)) and np.isfinite(distance) and distance > 0.5):
        raise InvalidOptionError(f"distance={distance!r} must be > 0.5 Å (height of the binding atom)")
    slab = to_ase(slab).copy()
    slab.info.pop("adsorbate_info", None)  # ase.build's helper dict: not storable in extxyz
    mol = gas_molecule(adsorbate)
    binding = _binding_index(adsorbate, mol)
    sites = find_sites(slab, distance, kinds)
    return Placements(slab=slab, gas=mol, binding=binding, sites=sites,
                      placements=[place(slab, mol, binding, pos) for _, pos in sites])


def adsorption_energies(slab, adsorbate: str, potential, distance: float = 2.0,
                        kinds: Sequence[str] = SITE_KINDS, fmax: float = 0.05,
                        max_steps: int = 500, optimizer="fire") -> AdsorptionResult:
    """Place ``adsorbate`` on every site of ``slab``, relax all in one batch with ``potential``
    (a :class:`~eqcalc.md.ModelPotential`), and return the adsorption-energy table."""
    from eqcalc.engine.relax import relax

    p = plan(slab, adsorbate, distance, kinds)
    result = relax(p.placements + [p.slab, p.gas], potential, fmax=fmax, max_steps=max_steps,
                   optimizer=optimizer)
    e_slab, e_gas = float(result.energy[-2]), float(result.energy[-1])
    rows = [p.site_row(k, atoms, result.energy[k], e_slab, e_gas, result.fmax[k], result.steps[k],
                       result.converged[k]) for k, atoms in enumerate(result.structures[:-2])]
    return AdsorptionResult(rows=rows, placements=result.structures[:-2], slab=result.structures[-2],
                            gas=result.structures[-1], e_slab=e_slab, e_gas=e_gas)


def write(result: AdsorptionResult, output_dir) -> List[str]:
    """``adsorption.csv`` (the table), ``placements.extxyz`` (relaxed, one frame per site, with
    ``info['site']``), ``slab.extxyz`` and ``gas.extxyz`` in ``output_dir``."""
    import csv
    import io

    from eqcalc import outputs

    out = outputs.writable_dir(output_dir)
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(result.rows[0]))
    w.writeheader()
    w.writerows(result.rows)
    outputs.replace_atomically(out / "adsorption.csv", lambda f: f.write(table.getvalue().encode()))
    frames = []
    for row, atoms in zip(result.rows, result.placements):
        atoms.info.update(site=row["site"], E_ads_eV=row["E_ads_eV"])
        frames.append(atoms)
    outputs.write_atoms(out / "placements.extxyz", frames)
    outputs.write_atoms(out / "slab.extxyz", result.slab)
    outputs.write_atoms(out / "gas.extxyz", result.gas)
    return [str(out / n) for n in ("adsorption.csv", "placements.extxyz", "slab.extxyz", "gas.extxyz")]


# ---- command line shell (eqcalc adsorption) ----------------------------------------------------
def add_arguments(parser) -> None:
    """Options of ``eqcalc adsorption``."""
    from eqcalc.cli import nonnegative_int, positive_float
    from eqcalc.engine.drivers import add_model_arguments

    from eqcalc.workflows import distributed  # imports no dask

    parser.add_argument("slab", nargs="+", help="slab structure file(s) (vacuum along z; FixAtoms kept, e.g. "
                                                "from extxyz); several need --db or --scheduler")
    parser.add_argument("--adsorbate", nargs="+", required=True,
                        help="element(s) or g2 molecule(s), binding atom first: O, H, CO, OH, NO; several "
                             "need --db or --scheduler")
    add_model_arguments(parser)
    parser.add_argument("--distance", type=positive_float, default=2.0, help="initial height of the binding atom, Å")
    parser.add_argument("--sites", nargs="+", default=list(SITE_KINDS), help="site kinds: ontop bridge hollow")
    parser.add_argument("--fmax", type=positive_float, default=0.05, help="force threshold, eV/Å")
    parser.add_argument("--max-steps", type=nonnegative_int, default=500, help="optimizer steps at most")
    parser.add_argument("--optimizer", default="fire", help="fire | lbfgs")
    parser.add_argument("--output-dir", default="eqcalc-adsorption", help="folder for the table and structures")
    distributed.add_arguments(parser)


def main(args) -> int:
    from eqcalc import outputs
    from eqcalc.engine import md
    from eqcalc.engine.drivers import _device, read_structures
    from eqcalc.workflows import distributed

    if distributed.requested(args):
        return distributed.adsorption_main(args)
    if len(args.slab) > 1 or len(args.adsorbate) > 1:
        raise InvalidOptionError("several slabs or adsorbates are a screening: add --db results.db (this "
                                 "machine) or --scheduler ADDRESS (a Dask cluster)")
    slab = read_structures(args.slab)[0]
    check_vacuum(slab)  # before loading the model
    outputs.writable_dir(args.output_dir)  # before the relaxations, not after them
    potential = md.ModelPotential(args.model, device=_device(args.device), compile=args.compile, dtype=args.dtype)
    result = adsorption_energies(slab, args.adsorbate[0], potential, distance=args.distance, kinds=args.sites,
                                 fmax=args.fmax, max_steps=args.max_steps, optimizer=args.optimizer)
    print(f"{args.adsorbate[0]} on {slab.get_chemical_formula()}: {len(result.rows)} sites relaxed as one batch")
    print(result.table())
    print(f"wrote {', '.join(write(result, args.output_dir))}")
    return 0
