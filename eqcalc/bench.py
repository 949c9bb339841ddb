"""Benchmarks behind ``eqcalc bench``: neighbor lists vs peers, and a model step per compiled form.

Results are written as CSV plus a PNG plot to ``--output-dir`` and printed as a table with ratios
against the peers measured in the same run. Benchmarks are measurements, not tests.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

from eqcalc.compile import best_time

log = logging.getLogger("eqcalc")


def copper(n_atoms: int, seed: int = 0):
    """Rattled fcc Cu cubic supercell with about ``n_atoms`` atoms (4 n³)."""
    from ase.build import bulk

    n = max(1, round((n_atoms / 4) ** (1 / 3)))
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n)
    atoms.rattle(0.05, seed=seed)
    return atoms


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


def one_thread(fn):
    """``fn`` with one intra-op thread, restored afterwards (benchmark only: shows the cost
    without OpenMP contention on a busy machine)."""
    import torch

    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)

    return run


def _n_pairs(out) -> int:
    first = out[0] if isinstance(out, tuple) else out
    return int(first.shape[1] if first.dim() == 2 else first.shape[0]) if hasattr(first, "dim") else len(first)


def bench_neighbors(sizes, output_dir: Path, cutoff: float = 5.0, repeats: int = 7, ase_max: int = 4000):
    """Full neighbor list with shifts: eqcalc vs vesin, matscipy, ASE (and torch_cluster's open
    radius graph as a reference point), same structures, same run; ratios to vesin."""
    import importlib.util

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    from eqcalc import neighbors as nb

    peers = {name: importlib.util.find_spec(name) is not None for name in ("vesin", "matscipy", "torch_cluster")}
    rows = []
    for size in sizes:
        atoms = copper(size)
        pos, cell, pbc = (torch.tensor(atoms.positions), torch.tensor(atoms.cell.array), torch.tensor(atoms.pbc))
        ours = lambda: nb.compute_neighbors(pos, cell, pbc, cutoff)  # noqa: E731
        methods = {"eqcalc.compute_neighbors": ours,
                   "eqcalc.compute_neighbors (1 thread)": one_thread(ours),
                   "eqcalc.neighbor_list(ijS)": lambda: nb.neighbor_list("ijS", atoms, cutoff)}
        if peers["vesin"]:
            import vesin

            vnl = vesin.NeighborList(cutoff=cutoff, full_list=True)
            methods["vesin"] = lambda: vnl.compute(atoms.positions, atoms.cell.array, periodic=True, quantities="ijS")
        if peers["matscipy"]:
            import matscipy.neighbours

            methods["matscipy"] = lambda: matscipy.neighbours.neighbour_list("ijS", atoms, cutoff)
        if len(atoms) <= ase_max:
            methods["ase"] = lambda: ase_neighbor_list("ijS", atoms, cutoff)
        else:
            log.info("ASE skipped at %d atoms (--ase-max %d; over a second per call)", len(atoms), ase_max)
        if peers["torch_cluster"]:
            # no periodic images: a reference point for the fully open case only
            methods["torch_cluster radius_graph (open, no images)"] = lambda: nb._torch_cluster_radius(pos, cutoff)
        results = {}
        for name, fn in methods.items():
            results[name] = (best_time(fn, repeats=repeats), _n_pairs(fn()))
            log.info("%6d atoms  %-46s %9.2f ms", len(atoms), name, results[name][0] * 1e3)
        reference = results.get("vesin", results["eqcalc.compute_neighbors"])
        for name, (t, pairs) in results.items():
            if not name.startswith("torch_cluster") and pairs != reference[1]:
                raise AssertionError(f"{name}: {pairs} pairs, vesin {reference[1]}")
            rows.append({"atoms": len(atoms), "method": name, "time_ms": round(t * 1e3, 3),
                         "ratio_to_vesin": round(t / reference[0], 2), "n_pairs": pairs,
                         "threads": torch.get_num_threads()})
    write_csv(rows, output_dir / "neighbors.csv")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["atoms"], r["time_ms"]) for r in rows if r["method"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="atoms (fcc Cu, rattled)", ylabel="ms per full list",
           title=f"neighbor list, cutoff {cutoff} Å, {torch.get_num_threads()} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "neighbors.png", dpi=120)
    return rows


def main(args) -> None:
    out = Path(args.output_dir)
    if args.what == "model":
        rows = bench_model(args.model, args.atoms or [108, 864], args.device, out)
    else:
        rows = bench_neighbors(args.atoms or [864, 4000, 16384], out, repeats=args.repeats)
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r[k]) for k in keys))
    print(f"wrote CSV and PNG to {out}")
