"""Adsorption energies and heights of a model against EMT on relaxed cases not in the training data.

Each case is a metal slab (3×3 surface cell, 4 layers for (111)/(100), 3×3×3 for (211); bottom
two layers fixed), one adsorbate on a named high-symmetry site, relaxed twice from the same start:
with the model and with ASE's EMT (the model's reference). For each calculator

    E_ads = E(slab+adsorbate) − E(clean slab) − E(gas reference)

with every term relaxed by that calculator (BFGS, ``fmax`` eV/Å); the gas reference is the
isolated molecule (CO, OH) or atom (H, C, N, O), as in the training data. The adsorbate height is
the z of its binding atom above the mean z of the top metal layer, Å.

Why these are "not in training": the training frames are EMT-labelled structures perturbed by
rattling, 1–30 BFGS steps or short MD (``potentials.data``); none is a converged minimum, and the
relaxed geometries here are only reached by relaxing with each calculator.

``run_cases(calc_factory)`` returns one row per case; ``python -m potentials.adsorption_check``
prints the table and writes ``benchmarks/results/adsorption.csv`` with the mean absolute errors.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

#: (metal, facet, adsorbate, site); 16 cases over 7 metals, 3 facets and all 6 adsorbates.
CASES: Tuple[Tuple[str, str, str, str], ...] = (
    ("Pt", "111", "CO", "ontop"), ("Pt", "111", "O", "fcc"), ("Pt", "111", "H", "fcc"),
    ("Pt", "111", "OH", "ontop"), ("Cu", "111", "CO", "ontop"), ("Cu", "111", "O", "fcc"),
    ("Cu", "111", "H", "hcp"), ("Cu", "100", "O", "hollow"), ("Cu", "100", "C", "hollow"),
    ("Pt", "100", "N", "hollow"), ("Ni", "111", "O", "hcp"), ("Pd", "111", "H", "fcc"),
    ("Au", "111", "O", "fcc"), ("Ag", "100", "O", "hollow"), ("Al", "111", "O", "fcc"),
    ("Pt", "211", "CO", "ontop"),
)
SIZES = {"111": (3, 3, 4), "100": (3, 3, 4), "211": (3, 3, 3)}


def build_case(metal: str, facet: str, adsorbate: str, site: str):
    """``(slab+adsorbate, clean slab, gas reference)`` Atoms; bottom two layers fixed."""
    from ase.build import fcc100, fcc111, fcc211
    from ase.constraints import FixAtoms

    from potentials.data import _GAS, _place, _sites

    builder = {"111": fcc111, "100": fcc100, "211": fcc211}[facet]
    slab = builder(metal, size=SIZES[facet], vacuum=8.0)
    slab.pbc = (True, True, False)
    sites = _sites(slab, facet)
    slab.info.pop("adsorbate_info", None)
    z = slab.positions[:, 2]
    layers = np.unique(np.round(z, 1))
    fixed = z < layers[1] + 0.05 if facet != "211" else z < np.sort(z)[len(z) // 3] + 0.05
    slab.set_constraint(FixAtoms(mask=fixed))
    ads = slab.copy()
    _place(ads, adsorbate, sites[site])
    ads.set_constraint(FixAtoms(mask=np.concatenate([fixed, np.zeros(len(ads) - len(slab), bool)])))
    from ase import Atoms

    symbols, d = _GAS[adsorbate]
    gas = Atoms(symbols, positions=[[0, 0, 0], [0, 0, d]][:len(symbols)], cell=[12, 12, 12], pbc=False)
    gas.center()
    return ads, slab, gas


def _relax(atoms, calc, fmax: float, steps: int):
    from ase.optimize import BFGS

    atoms = atoms.copy()
    atoms.calc = calc
    converged = bool(BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)) if len(atoms) > 1 else True
    return atoms, float(atoms.get_potential_energy()), converged


def height(atoms, n_slab: int) -> float:
    """Height (Å) of the adsorbate's binding atom (first adsorbate atom) above the top layer."""
    z = atoms.positions[:n_slab, 2]
    top = z[z > z.max() - 0.5].mean()
    return float(atoms.positions[n_slab, 2] - top)


def adsorption(calc_factory: Callable, case, fmax: float = 0.02, steps: int = 400) -> Dict:
    """E_ads (eV), height (Å) and convergence for one case with one calculator."""
    ads, slab, gas = build_case(*case)
    relaxed, e_ads, ok_a = _relax(ads, calc_factory(), fmax, steps)
    _, e_slab, ok_s = _relax(slab, calc_factory(), fmax, steps)
    _, e_gas, ok_g = _relax(gas, calc_factory(), fmax, steps)
    return {"E_ads_eV": e_ads - e_slab - e_gas, "height_A": height(relaxed, len(slab)),
            "converged": ok_a and ok_s and ok_g}


def run_cases(calc_factory: Callable, cases=CASES, fmax: float = 0.02, progress: bool = True) -> List[Dict]:
    """One row per case: model and EMT adsorption energies and heights, and their differences."""
    from ase.calculators.emt import EMT
    from tqdm import tqdm

    rows = []
    for case in tqdm(cases, desc="adsorption cases", disable=not progress):
        start = time.perf_counter()
        model = adsorption(calc_factory, case, fmax)
        model_s = time.perf_counter() - start
        ref = adsorption(EMT, case, fmax)
        rows.append({"metal": case[0], "facet": case[1], "adsorbate": case[2], "site": case[3],
                     "E_ads_model_eV": model["E_ads_eV"], "E_ads_emt_eV": ref["E_ads_eV"],
                     "dE_eV": model["E_ads_eV"] - ref["E_ads_eV"],
                     "height_model_A": model["height_A"], "height_emt_A": ref["height_A"],
                     "dh_A": model["height_A"] - ref["height_A"],
                     "converged": model["converged"] and ref["converged"], "model_time_s": model_s})
    return rows


def summary(rows: List[Dict]) -> Dict[str, float]:
    """Mean absolute errors of adsorption energy (eV) and height (Å), and the worst case of each."""
    dE = np.abs([r["dE_eV"] for r in rows])
    dh = np.abs([r["dh_A"] for r in rows])
    return {"n_cases": len(rows), "E_ads_mae_eV": float(dE.mean()), "E_ads_max_eV": float(dE.max()),
            "height_mae_A": float(dh.mean()), "height_max_A": float(dh.max()),
            "all_converged": all(r["converged"] for r in rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Adsorption energies and heights of a model vs EMT on 16 relaxed cases.",
        epilog="example: python -m potentials.adsorption_check --model default "
               "--output benchmarks/results/adsorption.csv")
    parser.add_argument("--model", default="default", help="shipped model name or .eqm path")
    parser.add_argument("--fmax", type=float, default=0.02, help="relaxation threshold, eV/Å")
    parser.add_argument("--output", default="benchmarks/results/adsorption.csv")
    args = parser.parse_args(argv)
    from eqcalc import EquivariantCalculator
    from eqcalc.model import Model

    model = Model(args.model, compile="eager")
    rows = run_cases(lambda: EquivariantCalculator(model), fmax=args.fmax)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'case':<24}{'E_ads model':>12}{'EMT':>9}{'dE':>8}{'h model':>9}{'EMT':>7}{'dh':>7}")
    for r in rows:
        name = f"{r['metal']}({r['facet']}) {r['adsorbate']} {r['site']}"
        print(f"{name:<24}{r['E_ads_model_eV']:12.3f}{r['E_ads_emt_eV']:9.3f}{r['dE_eV']:8.3f}"
              f"{r['height_model_A']:9.3f}{r['height_emt_A']:7.3f}{r['dh_A']:7.3f}")
    s = summary(rows)
    print(f"{s['n_cases']} cases: E_ads MAE {s['E_ads_mae_eV']:.3f} eV (max {s['E_ads_max_eV']:.3f}), "
          f"height MAE {s['height_mae_A']:.3f} Å (max {s['height_max_A']:.3f}), "
          f"all converged: {s['all_converged']}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
