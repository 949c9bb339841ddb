"""Side-by-side MACE step time: mace-torch's MACECalculator vs eqcalc's MACE through
EquivariantCalculator, in one benchmark run → benchmarks/results/mace_speed.csv and .png.

Same model hyperparameters on both sides (cutoff 5 Å, 8 Bessel functions, hidden
32x0e+32x1o, max_ell 3, correlation 3, 2 interactions, radial MLP [64, 64, 64], one species),
the same rattled fcc Cu cells (a = 3.6 Å, 3x3x3 and 6x6x6 cubic: 108 and 864 atoms, rattle
0.05 Å), float32, energy + forces + stress per step, neighbor list included on both sides (ours
with skin 0, so it is rebuilt every step like mace-torch's). Each step moves the atoms a little
first. Untrained weights: the step time does not depend on their values.

mace-torch lives in its own venv (it pins e3nn 0.4.4; ``benchmarks/mace_env.sh`` creates it
or finds it made); this script runs itself there as a subprocess
(``--worker mace-torch``), building the mace-torch model in-process (loading a saved mace-torch
model under torch 2.13's safe ``torch.load`` default would need a process-wide override).

    nice -n 15 .venv/bin/python benchmarks/bench_mace.py [--atoms 108 864] [--kinds eager aoti]
        [--threads 2] [--mace-python PATH]
    nice -n 15 .venv/bin/python benchmarks/bench_mace.py --profile   # where our step's time goes

``--profile`` times the parts of our MACE step (forward + backward for forces, 864 atoms) one by
one and writes them with the torch.profiler operator table to benchmarks/results/mace_profile.txt.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mace_python() -> str:
    """The python of the mace-torch venv that ``benchmarks/mace_env.sh`` creates or reuses
    (pinned versions, in ``~/.cache/eqcalc-reference``; see that script)."""
    made = subprocess.run(["bash", str(ROOT / "benchmarks" / "mace_env.sh")], check=True,
                          stdout=subprocess.PIPE, text=True)
    return made.stdout.strip().splitlines()[-1]


HYPER = dict(cutoff=5.0, channels=32, max_ell=3, hidden_l=1, correlation=3, num_interactions=2,
             num_radial=8, radial_mlp=64, avg_num_neighbors=20.0)


def cells(sizes):
    from ase.build import bulk

    out = {}
    for n in sizes:
        rep = round((n / 4) ** (1 / 3))
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((rep, rep, rep))
        atoms.rattle(0.05, seed=0)
        assert len(atoms) == n, f"{n} atoms is not 4 k^3"
        out[n] = atoms
    return out


def time_steps(calc, atoms, steps: int, warmup: int = 2):
    """Best and median wall time (s) of ``steps`` energy+forces+stress calls, atoms moved
    by ~1e-3 Å before each call so nothing is cached."""
    import numpy as np
    from ase.calculators.calculator import all_changes

    atoms = atoms.copy()
    rng = np.random.default_rng(1)
    times = []
    for k in range(warmup + steps):
        atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
        start = time.perf_counter()
        calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
        _ = calc.results["forces"], calc.results["stress"]
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def mace_torch_worker(args):
    """Runs inside the mace-torch venv: times MACECalculator and prints JSON rows."""
    import numpy as np
    import torch

    # e3nn 0.4.4 loads its own packaged constants.pt, which holds `slice` objects: allow just that
    # type under torch 2.13's safe torch.load default (this worker process only).
    torch.serialization.add_safe_globals([slice])
    from e3nn import o3
    from mace import __version__ as mace_version
    from mace.calculators import MACECalculator
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)  # this worker process only
    model = ScaleShiftMACE(
        r_max=HYPER["cutoff"], num_bessel=HYPER["num_radial"], num_polynomial_cutoff=5,
        max_ell=HYPER["max_ell"], interaction_cls=RealAgnosticResidualInteractionBlock,
        interaction_cls_first=RealAgnosticResidualInteractionBlock,
        num_interactions=HYPER["num_interactions"], num_elements=1,
        hidden_irreps=o3.Irreps(f"{HYPER['channels']}x0e+{HYPER['channels']}x1o"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(1),
        avg_num_neighbors=HYPER["avg_num_neighbors"], atomic_numbers=[29],
        correlation=HYPER["correlation"], gate=torch.nn.functional.silu,
        radial_MLP=[HYPER["radial_mlp"]] * 3, atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    calc = MACECalculator(models=model, device="cpu", default_dtype="float32")
    for n, atoms in cells(args.atoms).items():
        best, median = time_steps(calc, atoms, args.steps)
        print(json.dumps({"code": f"mace-torch {mace_version}", "kind": "eager", "atoms": n,
                          "best_s": best, "median_s": median, "parameters": n_params,
                          "threads": args.threads}), flush=True)


def ours(args):
    import torch
    import torch._inductor.config  # noqa: F401  (for the simdlen patch below)

    import potentials
    from eqcalc import EquivariantCalculator

    torch.set_num_threads(args.threads)
    # Own compile cache: a .pt2 built elsewhere without the simdlen patch must not be reused.
    os.environ.setdefault("EQCALC_CACHE", str(ROOT / "build" / "mace-bench-cache"))
    model = potentials.build("mace", species=["Cu"], **HYPER)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = potentials.save(model, Path(tmp) / "mace.eqm")
        for kind in args.kinds:
            start = time.perf_counter()
            # torch 2.13's Inductor miscompiles this model with AVX-512-wide CPU vectors (heap
            # corruption at run time; see the report of issue 7): compile with AVX2 width.
            with torch._inductor.config.patch({"cpp.simdlen": args.simdlen}):
                calc = EquivariantCalculator(str(path), compile=kind, device="cpu", skin=0.0)
            setup = time.perf_counter() - start
            for n, atoms in cells(args.atoms).items():
                best, median = time_steps(calc, atoms, args.steps)
                rows.append({"code": "eqcalc mace", "kind": kind, "atoms": n, "best_s": best,
                             "median_s": median, "parameters": n_params, "setup_s": setup,
                             "threads": args.threads})
                print(rows[-1], flush=True)
    return rows


def profile(args, out: Path):
    """Per-part forward+backward times of our MACE at the largest size, and the op table."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    import potentials
    from eqcalc import EquivariantCalculator
    from eqcalc.neighbors import compute_neighbors

    torch.set_num_threads(args.threads)
    model = potentials.build("mace", species=["Cu"], **HYPER)
    atoms = cells([max(args.atoms)])[max(args.atoms)]
    t = torch.tensor
    pos = t(atoms.positions)
    cell = t(atoms.cell.array).unsqueeze(0)
    system = torch.zeros(len(atoms), dtype=torch.int64)
    edge_index, shifts = compute_neighbors(pos, cell, t([list(atoms.pbc)]), HYPER["cutoff"], system)
    vectors = (pos[edge_index[1]] - pos[edge_index[0]] + shifts.to(pos.dtype) @ cell[0]).float()
    species = torch.zeros(len(atoms), dtype=torch.int64)
    lines = [f"{len(atoms)} atoms, {edge_index.shape[1]} edges, threads {args.threads}, float32; "
             "forward + backward (forces) of each part, best of 3"]

    def timed(name, fn):
        from eqcalc.compile import best_time
        lines.append(f"{name:48s} {1e3 * best_time(fn):9.1f} ms")

    from potentials.nn import edge_geometry

    v = vectors.clone().requires_grad_(True)
    data = {"species": species, "edge_index": edge_index}

    def whole():
        e = model(dict(data, edge_vectors=v))["energies"].sum()
        torch.autograd.grad(e, v)

    timed("whole model (no neighbor list, no stress)", whole)

    def geometry():
        lengths, unit = edge_geometry(v)
        Y = model.sh(unit)
        basis, env = model.radial(lengths)
        return Y, basis * env.unsqueeze(1)

    def grad_of(outputs, inputs):
        total = sum(o.float().pow(2).sum() for o in outputs)
        torch.autograd.grad(total, inputs)

    timed("harmonics + radial basis", lambda: grad_of(geometry()[0] + [geometry()[1]], [v]))
    c = HYPER["channels"]
    for k, layer in enumerate(model.layers):
        Y, feats = geometry()
        feats = feats.detach().requires_grad_(True)
        timed(f"layer {k}: radial MLP", lambda: grad_of([layer.radial(feats)], [feats]))
        R = layer.radial(feats).view(-1, layer.n_paths, c).detach().requires_grad_(True)
        Yd = [y.detach().requires_grad_(True) for y in Y]
        h = torch.randn(len(atoms), 1 if k == 0 else 4, c, requires_grad=True)
        timed(f"layer {k}: edge tensor product + scatter ({layer.n_paths} paths)",
              lambda: grad_of(layer.tp(h, Yd, R, edge_index), Yd + [R, h]))
        A = torch.randn(len(atoms), (HYPER["max_ell"] + 1) ** 2, c, requires_grad=True)
        timed(f"layer {k}: symmetric contraction (per atom)", lambda: grad_of([layer.product(A, species)], [A]))
    with tempfile.TemporaryDirectory() as tmp:
        path = potentials.save(model, Path(tmp) / "mace.eqm")
        calc = EquivariantCalculator(str(path), compile="eager", device="cpu", skin=0.0)
        time_steps(calc, atoms, 1)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            time_steps(calc, atoms, 1, warmup=0)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    text = "\n".join(lines) + "\n\nEquivariantCalculator step (eager), torch.profiler:\n" + table
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name("mace_profile.txt").write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--atoms", type=int, nargs="+", default=[108, 864])
    parser.add_argument("--kinds", nargs="+", default=["eager", "aoti"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mace-python", default=None, help="default: the venv of benchmarks/mace_env.sh")
    parser.add_argument("--worker", choices=["mace-torch"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--simdlen", type=int, default=8, help="Inductor CPU vector width for aoti")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mace_speed"))
    args = parser.parse_args()
    if args.worker:
        return mace_torch_worker(args)
    if args.profile:
        return profile(args, Path(args.out))
    rows = []
    args.mace_python = args.mace_python or mace_python()
    if Path(args.mace_python).exists():
        cmd = [args.mace_python, __file__, "--worker", "mace-torch", "--threads", str(args.threads),
               "--steps", str(args.steps), "--atoms", *map(str, args.atoms)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit("the mace-torch worker failed; see above")
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        for r in rows:
            print(r, flush=True)
    else:
        print(f"no mace-torch venv at {args.mace_python}; run: bash benchmarks/mace_env.sh", file=sys.stderr)
    rows += ours(args)
    write(rows, Path(args.out))


def write(rows, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    reference = {r["atoms"]: r["best_s"] for r in rows if r["code"].startswith("mace-torch")}
    fields = ["code", "kind", "atoms", "threads", "best_s", "median_s", "ratio_to_mace_torch", "parameters",
              "setup_s"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            ref = reference.get(r["atoms"])
            w.writerow({**{k: r.get(k, "") for k in fields},
                        "ratio_to_mace_torch": round(r["best_s"] / ref, 3) if ref else ""})
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = sorted({(r["code"], r["kind"]) for r in rows})
    sizes = sorted({r["atoms"] for r in rows})
    width = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        ys = [next((r["best_s"] * 1e3 for r in rows if (r["code"], r["kind"]) == label and r["atoms"] == n), 0)
              for n in sizes]
        ax.bar([s + k * width for s in range(len(sizes))], ys, width, label=f"{label[0]} ({label[1]})")
    ax.set_xticks([s + width * (len(labels) - 1) / 2 for s in range(len(sizes))])
    ax.set_xticklabels([f"{n} atoms" for n in sizes])
    ax.set_ylabel("ms per step (energy + forces + stress)")
    threads = sorted({r.get("threads") for r in rows})
    ax.set_title(f"MACE 32x0e+32x1o, max_ell 3, corr 3, 2 layers, fp32, CPU, {threads} thread(s)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
