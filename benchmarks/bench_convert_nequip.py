"""A converted NequIP package vs nequip's own ASE calculator, side by side in one run
→ benchmarks/results/convert_nequip.csv and .png.

The model: nequip's ``NequIPGNNModel`` at the size of the NequIP foundation models' "S" preset
(2 layers, l_max 1, num_features [128, 64], parity off, type embedding 32, radial MLP 1 x 128),
r_max 6 Å, trained for one epoch on a few EMT frames with ``nequip-train`` and packaged with
``nequip-package build`` in nequip's own venv (``bash benchmarks/nequip_env.sh``), float32 and
float64 builds. Then:

* step time (energy + forces + stress, neighbor list included on both sides; ours with skin 0,
  rebuilt every step like nequip's) of nequip's ``NequIPCalculator`` (the eager package model,
  and with ``--nequip-kinds aoti`` the ``.nequip.pt2`` file ``nequip-compile --mode
  aotinductor --target ase`` makes of it on this CPU) and of eqcalc's ``EquivariantCalculator`` on
  the converted ``.eqm`` (``--kinds``: eager, aoti), on rattled fcc Cu/Pd/Ag/Pt/Au alloys of
  108 and 864 atoms (a = 3.9 Å), each step after a ~1e-3 Å move;
* conversion time (``potentials.convert``) and file sizes (.eqm vs .nequip.zip).

``--reuse-freed-memory`` applies :func:`eqcalc.memory.reuse_freed_memory` (what the ``eqcalc``
command does) in both processes, nequip's and eqcalc's; without it both run with glibc's default
(every large step temporary mapped and page-faulted anew).

The nequip side runs in a worker process that stays up and answers one timing at a time, so the
two codes alternate (nequip, eqcalc, nequip, eqcalc per size) and a change of the machine's load
hits both. Each row keeps the best wall time and the best process CPU time.

    nice -n 15 .venv/bin/python benchmarks/bench_convert_nequip.py [--atoms 108 864]
        [--dtypes float32 float64] [--kinds eager aoti] [--nequip-kinds eager aoti]
        [--steps 2] [--rounds 2] [--threads 2] [--reuse-freed-memory]
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_convert_mace import ELEMENTS, alloys, json_line, time_steps  # noqa: E402

PRESET_S = dict(l_max=1, parity=False, num_layers=2, num_features=[128, 64], type_embed_num_features=32,
                radial_mlp_depth=1, radial_mlp_width=128, num_bessels=8, polynomial_cutoff_p=6)
R_MAX = 6.0


def reuse_memory(args):
    if args.reuse_freed_memory:
        sys.path.insert(0, str(ROOT))  # eqcalc.memory is plain ctypes: importable from nequip's venv too
        from eqcalc.memory import reuse_freed_memory

        assert reuse_freed_memory(), "no glibc mallopt here"


def worker(args):
    """In the nequip venv: train + package the model per dtype (and compile it with nequip-compile
    for the aotinductor kind), then answer timing requests ``DTYPE ATOMS STEPS`` (one per stdin
    line) with one JSON line per nequip kind."""
    import shutil

    import nequip
    import nequip_reference as ref  # tests/nequip_reference.py: data, config, train + package
    import torch
    from nequip.integrations.ase import NequIPCalculator

    torch.set_num_threads(args.threads)
    reuse_memory(args)
    ref.SPECIES, ref.R_MAX = list(ELEMENTS), R_MAX
    out = Path(args.workdir)
    data = out / "train.xyz"
    ref.training_data(data)
    for dtype in args.dtypes:
        folder = out / dtype
        folder.mkdir()
        opts = {**ref.BASE, **PRESET_S}
        (folder / "config.yaml").write_text(ref.config("S", opts, data).replace("float64", dtype))
        package = out / f"nequip_s.{dtype}.nequip.zip"
        with contextlib.redirect_stdout(sys.stderr):  # hydra logs to stdout; stdout is the JSON channel
            ref.nequip_package(ref.nequip_train(folder), package)
            if "aoti" in args.nequip_kinds:
                from nequip.scripts import compile as nequip_compile

                start = time.perf_counter()
                nequip_compile.main([str(package), str(out / f"nequip_s.{dtype}.nequip.pt2"), "--mode", "aotinductor",
                                     "--device", "cpu", "--target", "ase"])
                print(f"nequip-compile aotinductor {dtype}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        shutil.rmtree(folder)
    print(json.dumps({"nequip_version": nequip.__version__}), flush=True)
    calcs = {}
    for line in sys.stdin:
        dtype, n, steps = line.split()
        if dtype not in calcs:
            calcs[dtype] = {"eager": NequIPCalculator._from_saved_model(
                str(out / f"nequip_s.{dtype}.nequip.zip"), device="cpu", chemical_species_to_atom_type_map=True)}
            if "aoti" in args.nequip_kinds:
                calcs[dtype]["aoti"] = NequIPCalculator.from_compiled_model(
                    str(out / f"nequip_s.{dtype}.nequip.pt2"), device="cpu", chemical_species_to_atom_type_map=True)
        atoms = alloys([int(n)])[int(n)]
        for kind in args.nequip_kinds:
            print(json.dumps({"code": f"nequip {nequip.__version__}", "kind": kind, "dtype": dtype, "atoms": int(n),
                              "threads": args.threads, **time_steps(calcs[dtype][kind], atoms, int(steps))}),
                  flush=True)


def run(args, worker_process, workdir: Path):
    """Convert each package, then per dtype and size time nequip and eqcalc in turn (ABAB)."""
    import torch

    from eqcalc import EquivariantCalculator
    from potentials.convert import convert

    torch.set_num_threads(args.threads)
    reuse_memory(args)
    os.environ.setdefault("EQCALC_CACHE", str(ROOT / "build" / "nequip-bench-cache"))
    sizes, rows = [], []
    n_params = None
    for dtype in args.dtypes:
        source = workdir / f"nequip_s.{dtype}.nequip.zip"
        start = time.perf_counter()
        path = convert(source, workdir / f"nequip_s.{dtype}.eqm")
        seconds = time.perf_counter() - start
        sizes.append({"dtype": dtype, "conversion_s": seconds, "model_MB": source.stat().st_size / 1e6,
                      "eqm_MB": path.stat().st_size / 1e6})
        print(sizes[-1], flush=True)
        calcs = {kind: EquivariantCalculator(str(path), compile=kind, device="cpu", skin=0.0) for kind in args.kinds}
        n_params = sum(p.numel() for p in calcs[args.kinds[0]].model.wrapper.parameters())
        for n, atoms in alloys(args.atoms).items():
            best = {}
            for _ in range(args.rounds):
                worker_process.stdin.write(f"{dtype} {n} {args.steps}\n")
                worker_process.stdin.flush()
                results = [json_line(worker_process) for _ in args.nequip_kinds]
                for kind, calc in calcs.items():
                    results.append({"code": "eqcalc (converted)", "kind": kind, "dtype": dtype, "atoms": n,
                                    "threads": args.threads, **time_steps(calc, atoms, args.steps)})
                for r in results:
                    key = (r["code"], r["kind"])
                    best[key] = r if key not in best else \
                        {**r, **{k: min(r[k], best[key][k]) for k in ("best_s", "median_s", "cpu_s")}}
            rows += list(best.values())
            for r in best.values():
                print(r, flush=True)
    return rows, sizes, n_params


def write(rows, sizes, n_params, out: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_convert_mace import write_ratio_csv

    write_ratio_csv(rows, sizes, out.with_suffix(".csv"), "nequip", "package_MB")
    reference = {(r["dtype"], r["atoms"]): r for r in rows if r["code"].startswith("nequip") and r["kind"] == "eager"}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    groups = sorted({(r["dtype"], r["atoms"]) for r in rows})
    labels = sorted({(r["code"], r["kind"]) for r in rows})
    width = 0.8 / max(len(labels), 1)
    for k, label in enumerate(labels):
        mine = [next((r for r in rows if (r["code"], r["kind"]) == label and (r["dtype"], r["atoms"]) == g), None)
                for g in groups]
        ys = [r["best_s"] if r else 0 for r in mine]
        bars = ax.bar([i + k * width for i in range(len(groups))], ys, width, label=f"{label[0]} ({label[1]})")
        if not label[0].startswith("nequip"):
            for bar, g, r in zip(bars, groups, mine):
                ref = reference.get(g)
                if ref and r:
                    ax.annotate(f"{r['best_s'] / ref['best_s']:.2f}x\n(cpu {r['cpu_s'] / ref['cpu_s']:.2f}x)",
                                (bar.get_x() + bar.get_width() / 2, r["best_s"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{n} atoms\n{d}" for d, n in groups])
    ax.set_yscale("log")
    ax.set_ylabel("s per step, best wall time (energy + forces + stress)")
    ax.set_title(f"NequIP 'S'-sized ({n_params:,} parameters), CPU, {rows[0]['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--atoms", type=int, nargs="+", default=[108, 864])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--kinds", nargs="+", default=["eager", "aoti"], help="eqcalc's compile forms")
    parser.add_argument("--nequip-kinds", nargs="+", default=["eager", "aoti"], choices=["eager", "aoti"],
                        help="nequip's forms: the package (eager) and its nequip-compile AOTInductor file")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations nequip / eqcalc per size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nequip-python", default=str(ROOT / "build" / "nequip-env" / "bin" / "python"))
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="both processes keep freed memory for reuse (eqcalc.memory), as the eqcalc command does")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--workdir")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "convert_nequip"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not Path(args.nequip_python).exists():
        raise SystemExit(f"no nequip venv at {args.nequip_python}; run: bash benchmarks/nequip_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.nequip_python, __file__, "--worker", "--workdir", tmp, "--threads", str(args.threads),
               "--dtypes", *args.dtypes, "--nequip-kinds", *args.nequip_kinds] + \
            (["--reuse-freed-memory"] if args.reuse_freed_memory else [])
        process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env=dict(os.environ, PYTHONPATH=""))
        try:
            json_line(process)
            rows, sizes, n_params = run(args, process, Path(tmp))
        finally:
            process.stdin.close()
            process.wait(timeout=600)
    write(rows, sizes, n_params, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
