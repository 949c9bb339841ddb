"""A converted MACE-MP-0-medium-sized model vs mace-torch, side by side in one run
→ benchmarks/results/convert_mace.csv and .png.

The model: mace-torch's ScaleShiftMACE at the MACE-MP-0 medium configuration (128x0e+128x1o,
max_ell 3, correlation 3, 2 layers, r_max 6 Å, 10 Bessel functions, radial MLP [64, 64, 64],
89 elements: 4,688,656 parameters), random weights, built and saved (``torch.save``, float64
and float32) by mace-torch in its own venv (made or reused by ``benchmarks/mace_env.sh``). Then:

* step time (energy + forces + stress, neighbor list included on both sides; ours with skin 0,
  rebuilt every step like mace-torch's) of mace-torch's ``MACECalculator`` and of eqcalc's
  ``EquivariantCalculator`` on the converted file, float32 and float64, on rattled fcc
  Cu/Pd/Ag/Pt/Au alloys of 108 and 864 atoms (a = 3.9 Å), each step after a ~1e-3 Å move;
* conversion time (``potentials.convert``) and file sizes (.eqm vs .model).

The mace-torch side runs in a worker process that stays up and is asked for one timing at a
time, so the two codes alternate (mace-torch, eqcalc, mace-torch, eqcalc per size): a change of
the machine's load hits both. Each row keeps the best wall time and the best process CPU time
(the work done, all threads of the process; on a shared machine the more reliable ratio).

    nice -n 15 .venv/bin/python benchmarks/bench_convert_mace.py [--atoms 108 864]
        [--dtypes float32 float64] [--kinds eager] [--steps 2] [--rounds 2] [--threads 2]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mace import mace_python  # noqa: E402
ELEMENTS = ["Cu", "Pd", "Ag", "Pt", "Au"]
MP0_MEDIUM = dict(r_max=6.0, num_bessel=10, num_polynomial_cutoff=5, max_ell=3, num_interactions=2,
                  hidden_irreps="128x0e+128x1o", MLP_irreps="16x0e", correlation=3,
                  radial_MLP=[64, 64, 64], avg_num_neighbors=61.96)


def alloys(sizes):
    import numpy as np
    from ase.build import bulk

    out = {}
    rng = np.random.default_rng(0)
    for n in sizes:
        rep = round((n / 4) ** (1 / 3))
        atoms = bulk("Cu", "fcc", a=3.9, cubic=True).repeat((rep, rep, rep))
        assert len(atoms) == n, f"{n} atoms is not 4 k^3"
        atoms.set_chemical_symbols(rng.choice(ELEMENTS, size=n))
        atoms.rattle(0.05, seed=1)
        out[n] = atoms
    return out


def time_steps(calc, atoms, steps: int, warmup: int = 1):
    """Best and median wall time and best process CPU time (s) of ``steps`` energy + forces +
    stress calls, the atoms moved by ~1e-3 Å before each call so nothing is cached. On a busy
    machine wall time measures the neighbours' load as well; CPU time (all threads of this
    process) measures the work done."""
    import numpy as np
    from ase.calculators.calculator import all_changes

    atoms = atoms.copy()
    rng = np.random.default_rng(1)
    walls, cpus = [], []
    for k in range(warmup + steps):
        atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
        wall, cpu = time.perf_counter(), time.process_time()
        calc.calculate(atoms, ["energy", "forces", "stress"], all_changes)
        _ = calc.results["forces"], calc.results["stress"]
        if k >= warmup:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return {"best_s": min(walls), "median_s": float(np.median(walls)), "cpu_s": min(cpus)}


def worker(args):
    """In the mace-torch venv: build + save the model (float64 and float32), then answer timing
    requests ``DTYPE ATOMS STEPS`` (one per stdin line) with JSON lines."""
    import numpy as np
    import torch

    torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4's own constants.pt
    from e3nn import o3
    from mace import __version__ as mace_version
    from mace.calculators import MACECalculator
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)  # this worker process only
    torch.manual_seed(0)
    o = MP0_MEDIUM
    model = ScaleShiftMACE(
        r_max=o["r_max"], num_bessel=o["num_bessel"], num_polynomial_cutoff=o["num_polynomial_cutoff"],
        max_ell=o["max_ell"], interaction_cls=RealAgnosticResidualInteractionBlock,
        interaction_cls_first=RealAgnosticResidualInteractionBlock, num_interactions=o["num_interactions"],
        num_elements=89, hidden_irreps=o3.Irreps(o["hidden_irreps"]), MLP_irreps=o3.Irreps(o["MLP_irreps"]),
        atomic_energies=np.random.default_rng(0).uniform(-5, -1, 89), avg_num_neighbors=o["avg_num_neighbors"],
        atomic_numbers=list(range(1, 90)), correlation=o["correlation"], gate=torch.nn.functional.silu,
        radial_MLP=o["radial_MLP"], atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    out = Path(args.workdir)
    torch.save(model, out / "mp0_medium_like.float64.model")
    torch.save(model.float(), out / "mp0_medium_like.float32.model")
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"mace_version": mace_version, "parameters": n_params}), flush=True)
    calcs = {}
    for line in sys.stdin:
        dtype, n, steps = line.split()
        if dtype not in calcs:
            m = torch.load(out / f"mp0_medium_like.{dtype}.model", weights_only=False)  # our own file
            calcs[dtype] = MACECalculator(models=m, device="cpu", default_dtype=dtype)
        atoms = alloys([int(n)])[int(n)]
        print(json.dumps({"code": f"mace-torch {mace_version}", "kind": "eager", "dtype": dtype, "atoms": int(n),
                          "threads": args.threads, **time_steps(calcs[dtype], atoms, int(steps))}), flush=True)


def run(args, worker_process, workdir: Path):
    """Convert both files, then per dtype and size time mace-torch and eqcalc in turn, twice
    (ABAB: both sides see the same machine load), keeping each side's best."""
    import torch
    import torch._inductor.config  # noqa: F401  (simdlen patch, as bench_mace)

    from eqcalc import EquivariantCalculator
    from potentials.convert import convert

    torch.set_num_threads(args.threads)
    os.environ.setdefault("EQCALC_CACHE", str(ROOT / "build" / "mace-bench-cache"))
    sizes, rows = [], []
    for dtype in args.dtypes:
        source = workdir / f"mp0_medium_like.{dtype}.model"
        start = time.perf_counter()
        path = convert(source, workdir / f"mp0_medium_like.{dtype}.eqm")
        seconds = time.perf_counter() - start
        sizes.append({"dtype": dtype, "conversion_s": seconds, "model_MB": source.stat().st_size / 1e6,
                      "eqm_MB": path.stat().st_size / 1e6})
        print(sizes[-1], flush=True)
        calcs = {}
        for kind in args.kinds:
            with torch._inductor.config.patch({"cpp.simdlen": 8}):
                calcs[kind] = EquivariantCalculator(str(path), compile=kind, device="cpu", skin=0.0)
        for n, atoms in alloys(args.atoms).items():
            best = {}
            for _ in range(args.rounds):
                worker_process.stdin.write(f"{dtype} {n} {args.steps}\n")
                worker_process.stdin.flush()
                results = [json_line(worker_process)]
                for kind, calc in calcs.items():
                    results.append({"code": "eqcalc (converted)", "kind": kind, "dtype": dtype, "atoms": n,
                                    "threads": args.threads, **time_steps(calc, atoms, args.steps)})
                for r in results:
                    key = (r["code"], r["kind"])
                    if key not in best:
                        best[key] = r
                    else:
                        best[key] = {**r, **{k: min(r[k], best[key][k]) for k in ("best_s", "median_s", "cpu_s")}}
            rows += list(best.values())
            for r in best.values():
                print(r, flush=True)
    return rows, sizes


def json_line(process) -> dict:
    """The worker's next JSON answer (other output lines are skipped)."""
    for line in process.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit("the mace-torch worker stopped; see its stderr above")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--atoms", type=int, nargs="+", default=[108, 864])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--kinds", nargs="+", default=["eager"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations mace-torch / eqcalc per size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mace-python", default=None,
                        help="python of a mace-torch venv (default: the one benchmarks/mace_env.sh makes or reuses)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--workdir")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_mace"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.mace_python = args.mace_python or mace_python()
    if not Path(args.mace_python).exists():
        raise SystemExit(f"no mace-torch venv at {args.mace_python}; run: bash benchmarks/mace_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.mace_python, __file__, "--worker", "--workdir", tmp, "--threads", str(args.threads)]
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PYTHONPATH=""))
        try:
            info = json_line(process)
            rows, sizes = run(args, process, Path(tmp))
        finally:
            process.stdin.close()
            process.wait(timeout=600)
    write(rows, sizes, info, Path(args.out))


def write_ratio_csv(rows, sizes, path: Path, peer: str, source_column: str) -> None:
    """Step times with their ratios to the peer code (rows whose ``code`` starts with ``peer``,
    same dtype and atoms; column suffix ``peer`` with "-" as "_"; against the peer's eager form,
    and against each of its other forms in a column suffixed with the form), then one conversion
    row per source file (its size under ``source_column``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    reference = {(r["dtype"], r["atoms"], r["kind"]): r for r in rows if r["code"].startswith(peer)}
    base = f"ratio_to_{peer.replace('-', '_')}"
    kinds = ["eager"] + sorted({k for _, _, k in reference} - {"eager"})
    columns = {k: (base if k == "eager" else f"{base}_{k}", "cpu_" + (base if k == "eager" else f"{base}_{k}"))
               for k in kinds}
    fields = ["code", "kind", "dtype", "atoms", "threads", "best_s", "median_s", "cpu_s"] + \
        [c for pair in columns.values() for c in pair]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields + ["conversion_s", source_column, "eqm_MB"])
        w.writeheader()
        for r in rows:
            row = {k: r.get(k, "") for k in fields}
            for kind, (ratio, cpu_ratio) in columns.items():
                ref = reference.get((r["dtype"], r["atoms"], kind))
                row[ratio] = round(r["best_s"] / ref["best_s"], 3) if ref else ""
                row[cpu_ratio] = round(r["cpu_s"] / ref["cpu_s"], 3) if ref else ""
            w.writerow(row)
        for s in sizes:
            w.writerow({"code": "potentials.convert", "kind": "conversion", "dtype": s["dtype"],
                        "conversion_s": round(s["conversion_s"], 2), source_column: round(s["model_MB"], 2),
                        "eqm_MB": round(s["eqm_MB"], 2)})


def write(rows, sizes, info, out: Path):
    write_ratio_csv(rows, sizes, out.with_suffix(".csv"), "mace-torch", "model_MB")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1.3]})
    groups = sorted({(r["dtype"], r["atoms"]) for r in rows})
    labels = sorted({(r["code"], r["kind"]) for r in rows})
    width = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        ys = [next((r["best_s"] for r in rows if (r["code"], r["kind"]) == label and (r["dtype"], r["atoms"]) == g),
                   0) for g in groups]
        bars = ax.bar([i + k * width for i in range(len(groups))], ys, width, label=f"{label[0]} ({label[1]})")
        if not label[0].startswith("mace-torch"):
            for bar, g, y in zip(bars, groups, ys):
                ref = reference.get(g)
                if ref:
                    mine = next(r for r in rows if (r["code"], r["kind"]) == label and (r["dtype"], r["atoms"]) == g)
                    ax.annotate(f"{y / ref['best_s']:.2f}x\n(cpu {mine['cpu_s'] / ref['cpu_s']:.2f}x)",
                                (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{n} atoms\n{d}" for d, n in groups])
    ax.set_yscale("log")
    ax.set_ylabel("s per step, best wall time (energy + forces + stress)")
    ax.set_title(f"MACE-MP-0-medium-sized ({info['parameters']:,} parameters), CPU, "
                 f"{rows[0]['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    xs = range(len(sizes))
    ax2.bar([x - 0.2 for x in xs], [s["model_MB"] for s in sizes], 0.4, label=".model (mace-torch)")
    ax2.bar([x + 0.2 for x in xs], [s["eqm_MB"] for s in sizes], 0.4, label=".eqm (eqcalc)")
    for x, s in zip(xs, sizes):
        ax2.annotate(f"convert {s['conversion_s']:.1f} s", (x, max(s["model_MB"], s["eqm_MB"])),
                     ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels([s["dtype"] for s in sizes])
    ax2.set_ylabel("file size (MB)")
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    sys.exit(main())
