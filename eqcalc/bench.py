"""Benchmarks behind ``eqcalc bench``: neighbor lists vs peers, and a model step per compiled form.

Results are written as CSV plus a PNG plot to ``--output-dir`` and printed as a table with ratios
against the peers measured in the same run. Benchmarks are measurements, not tests.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("eqcalc")


def copper(n_atoms: int, seed: int = 0):
    """Rattled fcc Cu cubic supercell with about ``n_atoms`` atoms (4 n³)."""
    from ase.build import bulk

    n = max(1, round((n_atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
    atoms.rattle(0.05, seed=seed)
    return atoms


def best_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def write_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def bench_model(model_path: str | None, sizes, device: str, output_dir: Path):
    """Step time (energy + forces + stress through the calculator) per compiled form, and compile time."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eqcalc import EquivariantCalculator
    from eqcalc.model import Model

    if model_path is None:
        import potentials

        model_path = str(Path(tempfile.mkdtemp()) / "painn-untrained.eqm")
        potentials.save(potentials.build("painn", species=["Cu"], cutoff=5.0, dtype="float32"), model_path)
    rows = []
    for kind in ("eager", "torchscript", "aoti"):
        start = time.perf_counter()
        model = Model(model_path, device=device, compile=kind)
        setup = time.perf_counter() - start
        for n in sizes:
            atoms = copper(n)
            calc = EquivariantCalculator(model, skin=0.0)

            def step():
                atoms.positions[0, 0] += 1e-4  # a new structure each call: no ASE cache hit
                atoms.calc = calc
                atoms.get_forces(), atoms.get_stress()

            t = best_time(step, repeats=5)
            rows.append({"atoms": len(atoms), "form": kind, "step_ms": round(t * 1e3, 2),
                         "setup_s": round(setup, 1), "device": device})
            log.info("%-11s %6d atoms: %8.1f ms/step (setup incl. compile %.1f s)", kind, len(atoms), t * 1e3, setup)
    for r in rows:
        eager = next(x for x in rows if x["atoms"] == r["atoms"] and x["form"] == "eager")
        r["speedup_vs_eager"] = round(eager["step_ms"] / r["step_ms"], 2)
    write_csv(rows, output_dir / "model_step.csv")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind in ("eager", "torchscript", "aoti"):
        sel = [r for r in rows if r["form"] == kind]
        ax.plot([r["atoms"] for r in sel], [r["step_ms"] for r in sel], "o-", label=kind)
    ax.set(xlabel="atoms", ylabel="ms per step (E, F, σ)", xscale="log", yscale="log",
           title=f"model step on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "model_step.png", dpi=120)
    return rows


def main(args) -> None:
    out = Path(args.output_dir)
    if args.what == "model":
        rows = bench_model(args.model, args.atoms or [108, 864], args.device, out)
    else:
        from eqcalc.neighbors_bench import run as bench_neighbors

        rows = bench_neighbors(args.atoms or [864, 4000, 16384], out)
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    print(f"wrote CSV and PNG to {out}")
