"""Second derivatives of a model against EMT (its ground truth) and against finite differences.

Parts (``--what``, default all), CSV + PNG in ``benchmarks/results/``:

* ``phonons``: frequencies at Γ, X and L of fcc Al, Ni, Cu, Pd, Ag, Pt, Au, each at its EMT
  lattice constant, 4x4x4 primitive supercell, phonopy displacements evaluated by the model and
  by EMT through the same pipeline (``eqcalc.workflows.phonons``) → ``phonons_vs_emt.csv/.png``.
* ``adsorbates``: O, N, H, C on the hollow sites and CO on top of Pt, Cu and Ni (111) and (100)
  (2x2x3 slab, 10 Å vacuum, slab fixed, adsorbate free), each relaxed by its own potential (EMT
  with ASE BFGS, the model with ASE BFGS through EquivariantCalculator, fmax 1e-3 eV/Å), then
  frequencies by the model's autograd Hessian and by ASE ``Vibrations`` with EMT (nfree 4,
  delta 0.005 Å) → ``adsorbate_vib_vs_emt.csv/.png``: error per mode above 100 cm⁻¹ and ZPE.
* ``speed``: a 36-atom Cu(111) slab (3x3x4) with O in the fcc hollow: autograd Hessian
  (``eqcalc.workflows.vibrations.vibrations``) vs ASE ``Vibrations`` (nfree 2) with the same
  EquivariantCalculator, once with the top two layers and the adsorbate free (19 atoms, 57 rows)
  and once with only the adsorbate free (``-ads``); 16 such slabs (six metals, O/CO/OH) in one
  batch vs 16 ASE runs; the full Hessian of a 1,000-atom Cu crystal. Wall time and peak memory (resident set, each case in
  a fresh subprocess) → ``hessian_speed.csv/.png``.
* ``fd``: the model's Hessian against finite differences of its forces in float64
  (``potentials.testing.check_hessian_fd``) on the library's test structures → ``hessian_fd.csv``.
* ``relax``: fixed-cell relaxation of rattled 108-atom fcc Cu (0.05 Å, 5 seeds) with ASE BFGS to
  fmax 1e-3 eV/Å: rms offset from the ideal sites (after removing the mean shift) and steps,
  model vs EMT → ``relax_sites.csv``.

``--model`` (default: the shipped ``default``) and ``--compare OLD.eqm`` add a second model
(e.g. the pre-fix default from git history) to phonons and relax.

    nice -n 5 .venv/bin/python benchmarks/bench_second_order.py
    .venv/bin/python benchmarks/bench_second_order.py --what speed
    git show a19a82e:potentials/models/default.eqm > /tmp/old.eqm
    .venv/bin/python benchmarks/bench_second_order.py --what phonons relax --compare /tmp/old.eqm
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
METALS = ("Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au")


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def emt_lattice_constant(metal: str) -> float:
    """EMT's equilibrium fcc lattice constant (Å), by a parabola through E(a)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    a0 = bulk(metal).cell.cellpar()[0] * np.sqrt(2)
    grid = a0 * np.linspace(0.97, 1.03, 13)
    energies = []
    for a in grid:
        atoms = bulk(metal, "fcc", a=a)
        atoms.calc = EMT()
        energies.append(atoms.get_potential_energy())
    c = np.polyfit(grid, energies, 4)
    fine = np.linspace(grid[0], grid[-1], 2001)
    return float(fine[np.argmin(np.polyval(c, fine))])


# ---- phonons ---------------------------------------------------------------------------------
def phonons(models, out: Path) -> None:
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from eqcalc import EquivariantCalculator
    from eqcalc.workflows import phonons as P

    calcs = {name: EquivariantCalculator(path, compile="eager") for name, path in models.items()}
    rows = []
    for metal in METALS:
        a = emt_lattice_constant(metal)
        atoms = bulk(metal, "fcc", a=a)
        ref = P.phonons(atoms, forces=EMT(), supercell=(4, 4, 4))
        points = P.special_points(ref)
        results = {name: P.phonons(atoms, c, supercell=(4, 4, 4)) for name, c in calcs.items()}
        for label in ("G", "X", "L"):
            f_emt = P.frequencies(ref, [points[label]])[0]
            row = {"metal": metal, "a_A": f"{a:.4f}", "point": label,
                   "emt_THz": " ".join(f"{v:.3f}" for v in f_emt)}
            for name, ph in results.items():
                f = P.frequencies(ph, [points[label]])[0]
                row[f"{name}_THz"] = " ".join(f"{v:.3f}" for v in f)
                row[f"{name}_max_error_THz"] = f"{np.abs(f - f_emt).max():.3f}"
            rows.append(row)
            print(row, flush=True)
    write_csv(out / "phonons_vs_emt.csv", rows)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for k, name in enumerate(models):
        x = np.concatenate([[float(v) for v in r["emt_THz"].split()] for r in rows])
        y = np.concatenate([[float(v) for v in r[f"{name}_THz"].split()] for r in rows])
        worst = max(float(r[f"{name}_max_error_THz"]) for r in rows)
        ax.scatter(x, y, s=14, label=f"{name} (max |error| {worst:.2f} THz)", color=f"C{k}")
    lim = [min(-1, ax.get_ylim()[0]), 10]
    ax.plot(lim, lim, "k-", lw=0.5)
    ax.axhline(0, color="0.7", lw=0.5)
    ax.set_xlabel("EMT frequency (THz)")
    ax.set_ylabel("model frequency (THz)")
    ax.set_title("fcc metals at Γ, X, L (4x4x4 supercell)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "phonons_vs_emt.png", dpi=120)
    print(f"wrote {out / 'phonons_vs_emt.png'}")


# ---- adsorbates --------------------------------------------------------------------------------
def adsorbate_cases():
    from ase.build import add_adsorbate, fcc100, fcc111, molecule
    from ase.constraints import FixAtoms

    cases = []
    for metal in ("Pt", "Cu", "Ni"):
        for facet, build, hollow in (("111", fcc111, "fcc"), ("100", fcc100, "hollow")):
            for ads in ("O", "N", "H", "C", "CO"):
                slab = build(metal, size=(2, 2, 3), vacuum=10.0)
                slab.pbc = (True, True, False)
                if ads == "CO":
                    add_adsorbate(slab, molecule("CO"), 1.9, "ontop", mol_index=0)
                else:
                    add_adsorbate(slab, ads, 1.0 if ads == "H" else 1.2, hollow)
                slab.info.pop("adsorbate_info", None)
                slab.set_constraint(FixAtoms(indices=list(range(12))))
                cases.append((f"{ads}@{metal}({facet}) {'ontop' if ads == 'CO' else hollow}", slab))
    return cases


def adsorbates(model: str, out: Path) -> None:
    import tempfile

    from ase.calculators.emt import EMT
    from ase.optimize import BFGS
    from ase.vibrations import Vibrations

    from eqcalc import EquivariantCalculator
    from eqcalc.workflows.vibrations import summary, vibrations

    calc = EquivariantCalculator(model, compile="eager")
    rows = []
    for name, slab in adsorbate_cases():
        ref = slab.copy()
        ref.calc = EMT()
        BFGS(ref, logfile=None).run(fmax=1e-3, steps=500)
        ours = ref.copy()
        ours.calc = calc
        BFGS(ours, logfile=None).run(fmax=1e-3, steps=500)
        free = list(range(12, len(slab)))
        with tempfile.TemporaryDirectory() as tmp:
            vib = Vibrations(ref, indices=free, delta=0.005, nfree=4, name=f"{tmp}/vib")
            vib.run()
            emt = summary(vib.get_vibrations())
        model_s = summary(vibrations([ours], calc)[0])
        f_emt, f_model = np.sort(emt.frequencies_cm1), np.sort(model_s.frequencies_cm1)
        keep = f_emt > 100
        rel = np.abs(f_model[keep] - f_emt[keep]) / f_emt[keep]
        rows.append({"case": name, "emt_cm1": " ".join(f"{v:.1f}" for v in f_emt),
                     "model_cm1": " ".join(f"{v:.1f}" for v in f_model),
                     "max_rel_error_above_100": f"{rel.max() if rel.size else 0:.4f}",
                     "emt_zpe_eV": f"{emt.zpe_eV:.4f}", "model_zpe_eV": f"{model_s.zpe_eV:.4f}",
                     "zpe_error_meV": f"{1e3 * (model_s.zpe_eV - emt.zpe_eV):.2f}",
                     "height_shift_A": f"{ours.positions[12, 2] - ref.positions[12, 2]:.4f}"})
        print(rows[-1], flush=True)
    write_csv(out / "adsorbate_vib_vs_emt.csv", rows)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.concatenate([[float(v) for v in r["emt_cm1"].split()] for r in rows])
    y = np.concatenate([[float(v) for v in r["model_cm1"].split()] for r in rows])
    a.scatter(x, y, s=12)
    a.plot([0, x.max()], [0, x.max()], "k-", lw=0.5)
    a.set_xlabel("EMT (cm$^{-1}$)")
    a.set_ylabel(f"{Path(model).stem} (cm$^{{-1}}$)")
    a.set_title("adsorbate modes, each at its own minimum")
    b.barh([r["case"] for r in rows], [float(r["zpe_error_meV"]) for r in rows])
    b.axvline(5, color="r", lw=0.5)
    b.axvline(-5, color="r", lw=0.5)
    b.set_xlabel("ZPE error (meV)")
    b.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(out / "adsorbate_vib_vs_emt.png", dpi=120)
    print(f"wrote {out / 'adsorbate_vib_vs_emt.png'}")


# ---- speed and memory ----------------------------------------------------------------------------
SPEED_CASES = ("eqcalc_1", "ase_1", "eqcalc_16", "ase_16", "eqcalc_1-ads", "ase_1-ads",
               "eqcalc_16-ads", "ase_16-ads", "eqcalc_1000")


def speed_slabs(n: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_md import slabs

    return slabs(n)


def speed_case(case: str, model: str) -> dict:
    """One timing in this process (run in a fresh subprocess for an honest peak memory)."""
    import resource
    import tempfile

    import torch
    from ase.build import bulk
    from ase.vibrations import Vibrations

    from eqcalc import EquivariantCalculator
    from eqcalc.workflows.vibrations import free_atoms, vibrations

    torch.set_num_threads(1)
    calc = EquivariantCalculator(model, compile="eager")
    kind, n = case.split("_")
    n, _, only_adsorbate = n.partition("-")
    structures = [bulk("Cu", "fcc", a=3.61, cubic=True).repeat((6, 6, 7))[:1000]] if n == "1000" \
        else speed_slabs(int(n))
    if n == "1000":
        structures[0].rattle(0.02, seed=0)

    def moving(s):
        return np.arange(36, len(s)) if only_adsorbate else free_atoms(s)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "eqcalc":
        vibrations(structures[:1], calc)            # warm-up (allocator, first graph)
        start = time.perf_counter()
        vibs = vibrations(structures, calc, indices=[None] if n == "1000" else [moving(s) for s in structures])
        seconds = time.perf_counter() - start
        n_rows = sum(3 * len(v.get_indices()) for v in vibs)
    else:
        seconds, n_rows = 0.0, 0
        for s in structures:
            s = s.copy()
            s.calc = calc
            s.get_forces()
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                vib = Vibrations(s, indices=moving(s), nfree=2, name=f"{tmp}/vib")
                vib.run()
                vib.get_vibrations()
                seconds += time.perf_counter() - start
                n_rows += 3 * len(moving(s))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"case": case, "structures": len(structures), "atoms": sum(len(s) for s in structures),
            "hessian_rows": n_rows, "seconds": round(seconds, 4), "peak_rss_MB": round(peak / 1024, 1),
            "rss_before_MB": round(before / 1024, 1)}


def speed(model: str, out: Path, cases=SPEED_CASES) -> None:
    rows = []
    for case in cases:
        r = subprocess.run([sys.executable, __file__, "--speed-case", case, "--model", model],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    by = {r["case"]: r for r in rows}
    groups = ("1", "16", "1-ads", "16-ads")
    for n in groups:
        by[f"eqcalc_{n}"]["speedup_vs_ase"] = round(by[f"ase_{n}"]["seconds"] / by[f"eqcalc_{n}"]["seconds"], 2)
    for r in rows:
        r.setdefault("speedup_vs_ase", "")
    write_csv(out / "hessian_speed.csv", rows)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = ["1 slab\n19 free", "16 slabs\n19-21 free", "1 slab\nO free", "16 slabs\nadsorbate free"]
    x = np.arange(len(groups))
    ax.bar(x - 0.2, [by[f"ase_{n}"]["seconds"] for n in groups], 0.4, label="ASE Vibrations (loop)")
    ax.bar(x + 0.2, [by[f"eqcalc_{n}"]["seconds"] for n in groups], 0.4, label="eqcalc autograd (batch)")
    for k, n in enumerate(groups):
        ax.text(k + 0.2, by[f"eqcalc_{n}"]["seconds"], f"{by[f'eqcalc_{n}']['speedup_vs_ase']}x", ha="center", va="bottom")
    ax.set_xticks(x, labels)
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.set_title(f"adsorbate Hessians, {Path(model).stem}, 1 thread")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hessian_speed.png", dpi=120)
    print(f"wrote {out / 'hessian_speed.png'}")


# ---- finite differences and relaxation ----------------------------------------------------------
def fd(model: str, out: Path) -> None:
    from eqcalc import EquivariantCalculator
    from potentials import testing as T

    calc = EquivariantCalculator(model, compile="eager", dtype="float64")
    species = [s for s in ("Cu", "Pt", "C", "O", "H") if s in calc.model.species] or calc.model.species[:3]
    rows = []
    for name, atoms in T.structures(species).items():
        ident = T.check_hessian_identities(calc, atoms)
        rows.append({"structure": name, "atoms": len(atoms),
                     "fd_relative_error": f"{T.check_hessian_fd(calc, atoms, n_columns=12):.2e}",
                     "asymmetry": f"{ident['symmetry']:.2e}", "acoustic_sum": f"{ident['acoustic_sum']:.2e}"})
        print(rows[-1], flush=True)
    write_csv(out / "hessian_fd.csv", rows)


def relax_sites(models, out: Path) -> None:
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.optimize import BFGS

    from eqcalc import EquivariantCalculator

    a = emt_lattice_constant("Cu")
    ideal = bulk("Cu", "fcc", a=a, cubic=True).repeat(3)
    calcs = {"EMT": EMT, **{name: (lambda p=path: EquivariantCalculator(p, compile="eager"))
                             for name, path in models.items()}}
    rows = []
    for name, make in calcs.items():
        offsets, steps = [], []
        for seed in range(5):
            atoms = ideal.copy()
            atoms.rattle(0.05, seed=seed)
            atoms.calc = make()
            opt = BFGS(atoms, logfile=None)
            opt.run(fmax=1e-3, steps=1000)
            d = atoms.positions - ideal.positions
            d -= d.mean(axis=0)
            offsets.append(np.sqrt((d ** 2).sum(axis=1).mean()))
            steps.append(opt.nsteps)
        rows.append({"potential": name, "rms_offset_A": f"{np.mean(offsets):.2e}",
                     "max_rms_offset_A": f"{np.max(offsets):.2e}", "mean_steps": f"{np.mean(steps):.1f}"})
        print(rows[-1], flush=True)
    write_csv(out / "relax_sites.csv", rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", default=["phonons", "adsorbates", "speed", "fd", "relax"],
                   choices=["phonons", "adsorbates", "speed", "fd", "relax"])
    p.add_argument("--model", default="default")
    p.add_argument("--compare", default=None, help="a second model file for phonons and relax")
    p.add_argument("--output-dir", default=str(RESULTS))
    p.add_argument("--speed-case", choices=SPEED_CASES, help=argparse.SUPPRESS)
    p.add_argument("--speed-cases", nargs="+", choices=SPEED_CASES, default=list(SPEED_CASES),
                   help="which speed cases to run (eqcalc_1000, the 1,000-atom Hessian, takes longest)")
    args = p.parse_args()
    if args.speed_case:
        print(json.dumps(speed_case(args.speed_case, args.model)))
        return
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = {Path(args.model).stem: args.model}
    if args.compare:
        models[Path(args.compare).stem] = args.compare
    start = time.perf_counter()
    for what in args.what:
        t = time.perf_counter()
        {"phonons": lambda: phonons(models, out), "adsorbates": lambda: adsorbates(args.model, out),
         "speed": lambda: speed(args.model, out, args.speed_cases), "fd": lambda: fd(args.model, out),
         "relax": lambda: relax_sites(models, out)}[what]()
        print(f"{what}: {time.perf_counter() - t:.0f} s", flush=True)
    print(f"all: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
