"""Neighbor-list benchmark: eqcalc (torch cell list, ASE-style wrapper) vs vesin, matscipy, ASE,
and the torch_cluster path when present.

Rattled fcc Cu (a = 3.61 Å, rattle 0.05 Å), cubic supercells of 864, 4000 and 16384 atoms,
cutoff 5 Å, full list with shifts. Best of N repeats after a warm-up, wall-clock, torch threads
left at their default. Writes benchmarks/results/neighbors.csv and neighbors.png.

    python benchmarks/bench_neighbors.py [--repeats 7] [--ase-max 4000]
"""
import argparse
import importlib.util
import csv
import os
import sys
import time

import torch
from ase.build import bulk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from eqcalc import neighbors as nb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CUTOFF = 5.0


def best_of(fn, repeats):
    fn()
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ase-max", type=int, default=4000,
                    help="skip ASE above this many atoms (it takes seconds)")
    args = ap.parse_args()

    import vesin
    import matscipy.neighbours
    from ase.neighborlist import neighbor_list as ase_nl
    have_tc = importlib.util.find_spec("torch_cluster") is not None

    rows = []
    for rep in (6, 10, 16):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(rep)
        atoms.rattle(0.05, seed=0)
        n = len(atoms)
        pos_t = torch.tensor(atoms.positions)
        cell_t = torch.tensor(atoms.cell.array)
        pbc_t = torch.tensor(atoms.pbc)
        points, box = atoms.positions, atoms.cell.array
        vnl = vesin.NeighborList(cutoff=CUTOFF, full_list=True)
        methods = {
            "eqcalc.compute_neighbors": lambda: compute(pos_t, cell_t, pbc_t),
            "eqcalc.compute_neighbors (1 thread)": lambda: one_thread(compute, pos_t, cell_t,
                                                                       pbc_t),
            "eqcalc.neighbor_list(ijS)": lambda: nb.neighbor_list("ijS", atoms, CUTOFF),
            "vesin": lambda: vnl.compute(points, box, periodic=True, quantities="ijS"),
            "matscipy": lambda: matscipy.neighbours.neighbour_list("ijS", atoms, CUTOFF),
        }
        if n <= args.ase_max:
            methods["ase"] = lambda: ase_nl("ijS", atoms, CUTOFF)
        else:
            print(f"ase skipped at {n} atoms (--ase-max {args.ase_max}; ~1.2 s per call)")
        if have_tc:
            # periodic systems have no torch_cluster path; time its non-periodic radius graph
            # on the same coordinates as a reference point for the fully open case
            methods["torch_cluster.radius_graph (open, no images)"] = \
                lambda: nb._torch_cluster_radius(pos_t, CUTOFF)
        res = {}
        for name, fn in methods.items():
            t, out = best_of(fn, args.repeats if n < 10000 or name != "ase" else 1)
            n_pairs = int(out.shape[1] if isinstance(out, torch.Tensor) else
                          (out[0].shape[1] if isinstance(out[0], torch.Tensor) and out[0].dim() == 2
                           else len(out[0])))
            res[name] = (t, n_pairs)
        t_v, n_v = res["vesin"]
        for name, (t, n_pairs) in res.items():
            if not name.startswith("torch_cluster"):
                assert n_pairs == n_v, f"{name}: {n_pairs} pairs != vesin {n_v}"
            rows.append(dict(size=n, method=name, time_ms=round(t, 3),
                             ratio_to_vesin=round(t / t_v, 2), n_pairs=n_pairs))

    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "neighbors.csv")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cutoff {CUTOFF} Å")
    print(f"{'atoms':>6} {'method':<46} {'time_ms':>9} {'x vesin':>8} {'pairs':>9}")
    for r in rows:
        print(f"{r['size']:>6} {r['method']:<46} {r['time_ms']:>9.2f} {r['ratio_to_vesin']:>8.2f} "
              f"{r['n_pairs']:>9}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["size"], r["time_ms"]) for r in rows if r["method"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("atoms (fcc Cu, rattled)")
    ax.set_ylabel("time per full list [ms]")
    ax.set_title(f"neighbor list, cutoff {CUTOFF} Å, {torch.get_num_threads()} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "results", "neighbors.png"), dpi=120)
    print(f"wrote {path} and neighbors.png")


def one_thread(fn, *args):
    """Run fn with one intra-op thread (restored afterwards): shows the cost without OpenMP
    contention on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(n)


def compute(pos, cell, pbc):
    return nb.compute_neighbors(pos, cell, pbc, CUTOFF)


if __name__ == "__main__":
    main()
