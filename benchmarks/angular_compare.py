"""Angular message passing (DimeNet++, GemNet-T) vs SchNet, PaiNN, NequIP, MACE, FAENet (issue 17).

    nice -n 15 python benchmarks/angular_compare.py                 # all models, ~80 min on 2 busy cores
    python benchmarks/angular_compare.py --models schnet dimenet --steps 50   # a quick look
    python benchmarks/angular_compare.py --work build/angular_bench --reuse --sections speed

One run, one machine, torch with 1 thread. Every model is trained by ``potentials.train`` on the
same EMT train/val/test split (``build/potentials/emt.xyz``, the default recipe's data; generated
if missing), with the same budget: ``--steps`` optimizer steps of ``batch_size`` 8, linear warm-up
then cosine to 2 % of the learning rate, the same loss weights (default recipe), EMA, one
validation (16 frames) at the end, inside the timed training. Hyperparameters: the shipped
recipes' where one exists (SchNet, PaiNN = default, FAENet with its direct-force loss),
benchmarks/mace_accuracy.py's for NequIP and MACE,
the registry defaults for DimeNet++ and GemNet-T (GemNet's scaling factors are calibrated on
the first training batch). Then, for all models back to back:

* accuracy: test-split energy MAE (meV/atom) and force MAE (meV/Å) of the trained EMA weights
  (``potentials.train``'s own evaluation; FAENet's forces from its direct head);
* inference: structures/s of ``EquivariantCalculator.predict`` over the test split in batches
  of 8 (TorchScript, float32, forces and stress), best of two passes;
* training: seconds per epoch (training time / steps × steps per epoch) and parameters; and,
  measured interleaved over all models after training (load on a shared machine changes
  between the training runs), seconds per training step × steps per epoch;
* profile (angular models): share of one inference call spent building triplets and in
  triplet-sized tensor operations (torch.profiler, ops classified by their input sizes).

Writes ``benchmarks/results/angular_compare.csv`` (section, model, metric, value) and
``angular_compare.png``, and prints the FAENet paper's speed ratios next to ours.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path("build/potentials/emt.xyz")
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The budget every model gets (default recipe's loss weights; steps from the command line).
TRAIN = dict(energy_weight=20.0, forces_weight=1.0, stress_weight=100.0, lr=0.003, weight_decay=1e-4,
             min_lr_ratio=0.02, clip_grad=10.0, ema_decay=0.99, batch_size=8, max_force=20.0,
             cutoff=5.0, dtype="float32", seed=0, threads=1, max_val_frames=16, progress=False,
             plots=False, patience=1000)

#: FAENet paper (Duval et al., ICML 2023), Table 9/10 on OC20: inference structures/s on a GPU
#: and training time. S2EF: SchNet 509, DimeNet++ 52, GemNet-OC 18 /s; IS2RE: SchNet 3597,
#: DimeNet++ 115, GemNet-T 104 /s, training 9, 170, 200 min.
PAPER = {"s2ef_inference_vs_schnet": {"dimenet": 52 / 509, "gemnet (OC)": 18 / 509},
         "is2re_inference_vs_schnet": {"dimenet": 115 / 3597, "gemnet": 104 / 3597},
         "is2re_train_time_vs_schnet": {"dimenet": 170 / 9, "gemnet": 200 / 9}}


def hyperparameters():
    """(model hyperparameters, extra training options) per architecture."""
    from bench_mace import HYPER
    from potentials.make_models import RECIPES, load_recipe

    def recipe(name):
        return load_recipe(RECIPES / f"{name}.yaml")

    faenet = recipe("faenet")
    mace = {k: v for k, v in HYPER.items() if k != "cutoff"}
    return {
        "schnet": (recipe("schnet")["model"], {}),
        "painn": (recipe("default")["model"], {}),
        "faenet": (faenet["model"], {k: faenet[k] for k in ("force_mode", "energy_grad_weight",
                                                             "conservative_forces_weight")}),
        "nequip": ({k: v for k, v in mace.items() if k not in ("correlation", "num_interactions")}, {}),
        "mace": (mace, {}),
        "dimenet": ({}, {}),
        "gemnet": ({}, {}),
    }


def splits(max_force: float):
    """train/val/test frames exactly as potentials.train selects them."""
    from potentials import data as datamod

    frames = datamod.read_dataset(DATA)
    kept = [a for a in frames if np.abs(datamod.labels(a)["forces"]).max() <= max_force]
    return {name: datamod.split(kept, name) for name in datamod.SPLITS}


def ensure_data():
    from potentials import data as datamod
    from potentials.make_models import RECIPES, load_recipe

    if not DATA.exists():
        gen = load_recipe(RECIPES / "default.yaml")["generate"]
        datamod.generate(DATA, gen["n_structures"], gen["seed"], elements=gen["elements"], progress=True)


def train_all(names, steps: int, work: Path, rows, reuse: bool = False):
    """Train each model with the common budget; test-split accuracy comes from the training
    run's own evaluation (EMA weights, faenet: its direct head). ``reuse``: take a model already
    trained in ``work`` with the same number of steps."""
    from eqcalc import package
    from potentials.train import train

    hyper = hyperparameters()
    n_train = len(splits(TRAIN["max_force"])["train"])
    per_epoch = max(1, n_train // TRAIN["batch_size"])  # as potentials.train counts an epoch
    paths = {}
    for name in names:
        model, extra = hyper[name]
        config = dict(TRAIN, architecture=name, model=model, data=str(DATA), max_steps=steps,
                      val_every=steps, warmup_steps=max(1, steps // 10), work_dir=str(work / name),
                      output=str(work / f"{name}.eqm"), **extra)
        done = work / name / "metrics.json"
        if not (reuse and done.exists() and json.loads(done.read_text())["steps"] == steps):
            train(config)
        paths[name] = Path(config["output"])
        metrics = json.loads(done.read_text())
        seconds = metrics["train_time_s"] / metrics["steps"] * per_epoch
        rows += [("train", name, "train_s_per_epoch", seconds), ("train", name, "steps", metrics["steps"]),
                 ("accuracy", name, "energy_mae_meV_per_atom", metrics["test_energy_mae_meV_per_atom"]),
                 ("accuracy", name, "forces_mae_meV_per_A", metrics["test_forces_mae_meV_per_A"]),
                 ("accuracy", name, "n_parameters", package.read(paths[name]).metadata["n_parameters"])]
        print(f"{name}: {metrics['steps']} steps, {seconds:.0f} s/epoch; test energy MAE "
              f"{metrics['test_energy_mae_meV_per_atom']:.2f} meV/atom, force MAE "
              f"{metrics['test_forces_mae_meV_per_A']:.1f} meV/Å", flush=True)
    return paths


def inference(paths, rows, passes: int = 2):
    from eqcalc import EquivariantCalculator

    structures = splits(TRAIN["max_force"])["test"]
    calcs = {name: EquivariantCalculator(str(path), compile="torchscript", device="cpu",
                                         forces="direct" if name == "faenet" else "conservative")
             for name, path in paths.items()}
    best = {name: math.inf for name in calcs}
    for _ in range(passes):  # interleaved passes: load changes on a shared machine hit all alike
        for name, calc in calcs.items():
            calc.predict(structures[:8])
            start = time.perf_counter()
            for k in range(0, len(structures), 8):
                calc.predict(structures[k:k + 8])
            best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        rows.append(("inference", name, "structures_per_s", len(structures) / seconds))
        print(f"{name}: {len(structures) / seconds:.1f} structures/s", flush=True)


def profile(paths, rows):
    """Where one inference call of an angular model spends its time (8 test structures)."""
    from eqcalc.atoms import to_tensors
    from eqcalc.model import Model
    from eqcalc.neighbors import compute_neighbors
    from eqcalc.triplets import triplets

    structures = splits(TRAIN["max_force"])["test"][:8]
    for name in [n for n in ("dimenet", "gemnet") if n in paths]:
        model = Model(str(paths[name]), compile="eager", device="cpu")
        t = to_tensors(structures)
        edge_index, shifts = compute_neighbors(t.positions, t.cell, t.pbc, model.cutoff, t.system)
        inputs = model.inputs(t, edge_index, shifts)
        model.wrapper(*inputs)
        kj, ji, _ = triplets(edge_index, shifts.double(), len(t.positions))
        n_triplets, n_edges = int(kj.numel()), int(edge_index.shape[1])
        all_candidates = n_triplets + n_edges  # before the backtracking pairs are dropped
        with torch.profiler.profile(record_shapes=True) as prof:
            start = time.perf_counter()
            model.wrapper(*inputs)
            total = time.perf_counter() - start
        construction = min(_time(lambda: triplets(edge_index, shifts.double(), len(t.positions))) for _ in range(3))
        sizes = {n_triplets, all_candidates}
        triplet_us = other_us = 0.0
        for event in prof.key_averages(group_by_input_shape=True):
            shapes = [s for s in event.input_shapes if isinstance(s, list) and s]
            if any(s[0] in sizes for s in shapes):
                triplet_us += event.self_cpu_time_total
            else:
                other_us += event.self_cpu_time_total
        share = triplet_us / max(triplet_us + other_us, 1e-9)
        rows += [("profile", name, "n_triplets", n_triplets), ("profile", name, "n_edges", n_edges),
                 ("profile", name, "call_s", total), ("profile", name, "triplet_construction_s", construction),
                 ("profile", name, "triplet_construction_share", construction / total),
                 ("profile", name, "triplet_sized_ops_share", share)]
        print(f"{name}: {n_triplets} triplets / {n_edges} edges; call {total:.2f} s, building triplets "
              f"{construction:.3f} s ({100 * construction / total:.0f} %), triplet-sized ops {100 * share:.0f} % "
              "of op time", flush=True)


def step_speed(paths, rows, rounds: int = 3, steps: int = 3):
    """Seconds per training step of every model, measured interleaved (round after round over
    all models) on the same 8-frame batches, so that changing load on a shared machine hits all
    alike; median over rounds × steps per epoch. Same step as potentials.train: forward with
    forces and stress, loss, backward, AdamW."""
    from ase.data import atomic_numbers

    from eqcalc import package
    from potentials import load
    from potentials.train import Frame, _forward, _loss, collate, make_wrapper

    hyper = hyperparameters()
    train_frames = splits(TRAIN["max_force"])["train"]
    per_epoch = max(1, len(train_frames) // TRAIN["batch_size"])
    runs = {}
    for name, path in paths.items():
        meta = package.read(path).metadata
        index = {atomic_numbers[s]: k for k, s in enumerate(meta["species"])}
        frames = [Frame(a, index) for a in train_frames[:8 * steps]]
        batches = [collate(frames[k:k + 8], float(meta["cutoff"])) for k in range(0, len(frames), 8)]
        model = load(path).train()
        extra = hyper[name][1]
        weights = (TRAIN["energy_weight"], TRAIN["forces_weight"], TRAIN["stress_weight"],
                   extra.get("energy_grad_weight", 0.0), extra.get("conservative_forces_weight", 0.0))
        wrapper = make_wrapper(model, extra.get("force_mode", "conservative"), create_graph=True)
        runs[name] = (model, wrapper, torch.optim.AdamW(model.parameters(), lr=1e-4), batches, weights)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, wrapper, optimizer, batches, weights) in runs.items():
            for batch in batches:
                start = time.perf_counter()
                loss = _loss(_forward(wrapper, batch), batch, weights)["total"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        rows.append(("speed", name, "train_s_per_step", float(np.median(t))))
        rows.append(("speed", name, "train_s_per_epoch_interleaved", float(np.median(t)) * per_epoch))
        print(f"{name}: {np.median(t):.3f} s per training step (interleaved)", flush=True)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratios(rows):
    value = {(r[1], r[2]): r[3] for r in rows}
    for name in ("dimenet", "gemnet"):
        if (name, "structures_per_s") in value and ("schnet", "structures_per_s") in value:
            ours = value[(name, "structures_per_s")] / value[("schnet", "structures_per_s")]
            rows.append(("ratio", name, "inference_vs_schnet", ours))
            print(f"{name}: inference speed / SchNet's = {ours:.3f} here; FAENet paper: "
                  f"{ {k: round(v[name], 3) for k, v in PAPER.items() if name in v} }", flush=True)
        for metric in ("train_s_per_epoch", "train_s_per_epoch_interleaved"):
            if (name, metric) in value and ("schnet", metric) in value:
                ours = value[(name, metric)] / value[("schnet", metric)]
                rows.append(("ratio", name, metric.replace("train_s_per_epoch", "train_time_vs_schnet"), ours))
                print(f"{name}: training time / SchNet's = {ours:.1f} here ({metric})", flush=True)


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value = {(r[1], r[2]): r[3] for r in rows}
    names = [n for n in ("schnet", "painn", "faenet", "nequip", "mace", "dimenet", "gemnet")
             if (n, "forces_mae_meV_per_A") in value]
    panels = [("forces_mae_meV_per_A", "test force MAE (meV/Å)", False),
              ("energy_mae_meV_per_atom", "test energy MAE (meV/atom)", False),
              ("structures_per_s", "inference (structures/s)", True),
              ("train_s_per_epoch_interleaved" if any(r[2] == "train_s_per_epoch_interleaved" for r in rows)
               else "train_s_per_epoch", "training (s/epoch)", True)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    colors = ["tab:orange" if n in ("dimenet", "gemnet") else "tab:blue" for n in names]
    for ax, (metric, label, log) in zip(axes, panels):
        ax.bar(names, [value.get((n, metric), np.nan) for n in names], color=colors)
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=45)
        if log:
            ax.set_yscale("log")
    fig.suptitle("Equal budget on the EMT split (orange: angular message passing); 1 CPU thread")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


SECTIONS = {"inference": inference, "profile": profile, "speed": step_speed}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*",
                        default=["schnet", "painn", "faenet", "nequip", "mace", "dimenet", "gemnet"])
    parser.add_argument("--steps", type=int, default=236, help="optimizer steps per model (236 = 1 epoch)")
    parser.add_argument("--work", default=None, help="keep the trained models here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse models already trained in --work with the same --steps, and the rows "
                             "of sections not run now from the existing CSV")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS),
                        help="what to measure after training (training and accuracy always)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ensure_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        paths = train_all(args.models, args.steps, work, rows, args.reuse)
        for section in args.sections:
            SECTIONS[section](paths, rows)
    if args.reuse and (RESULTS / "angular_compare.csv").exists():
        with open(RESULTS / "angular_compare.csv") as f:
            kept = [r for r in csv.reader(f)][1:]
        done = {"train", "accuracy", "ratio"} | set(args.sections)
        rows += [(r[0], r[1], r[2], float(r[3])) for r in kept if r[0] not in done and r[1] in paths]
    ratios(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "angular_compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "model", "metric", "value"])
        w.writerows(rows)
    plot(rows, RESULTS / "angular_compare.png")
    print("wrote", RESULTS / "angular_compare.csv", "and .png")


if __name__ == "__main__":
    main()
