"""FAENet with frame averaging vs PaiNN vs SchNet on the EMT catalyst data (issue 6 figures).

    nice -n 15 python benchmarks/faenet_compare.py            # all sections, ~10 min on 2 busy cores
    python benchmarks/faenet_compare.py --sections symmetry   # symmetry | accuracy | train_speed | nve

Writes ``benchmarks/results/faenet_compare.csv`` (section, model, metric, value) and
``benchmarks/results/faenet_compare.png``. Uses the shipped models (potentials/models/*.eqm), the
test split of ``build/potentials/emt.xyz`` (same ``max_force`` filter as the recipes), torch with
1 thread. Sections:

* symmetry: the shipped FAENet's weights under every frame-averaging mode, 100 random O(3)
  elements (half reflections) + translation + permutation per structure through the calculator
  (fp32); "stochastic-1frame" is one random frame per evaluation (the paper's SFA inference,
  eager model in training mode), which no calculator mode serves.
* accuracy: test-split energy/force MAE (FAENet: direct head and conservative forces of the same
  file), inference structures/s through EquivariantCalculator.predict on the test split (batches of
  8, TorchScript, fp32).
* train_speed: training time per epoch measured in this run: each shipped model's recipe trained
  for ``--train-steps`` steps (1 thread, validation on 8 frames), seconds per step times the steps
  of one epoch. (The training time stored in a model's metadata depends on what else ran then.)
* nve: ASE VelocityVerlet, 1 fs, on a rattled 32-atom Cu bulk at 300 K; drift = slope of the
  total energy, meV/atom/ps.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch

import potentials
from eqcalc import EquivariantCalculator
from potentials import frames, testing as T

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(potentials.__file__).resolve().parent / "models"
DATA = Path("build/potentials/emt.xyz")


def _variant(mode: str, tmp: Path) -> str:
    """The shipped FAENet's weights wrapped in another frame-averaging mode, as a model file."""
    fa = potentials.load(MODELS / "faenet.eqm")
    path = tmp / f"faenet-{mode}.eqm"
    potentials.save(frames.wrap(fa.model, mode), path)
    return str(path)


def _test_structures(max_force: float = 20.0):
    from potentials import data as datamod

    frames_ase = datamod.read_dataset(DATA)
    kept = [a for a in frames_ase if np.abs(datamod.labels(a)["forces"]).max() <= max_force]
    return datamod.split(kept, "test"), kept


def _sfa_symmetry(n: int, atoms, seed: int = 0):
    """check_symmetry for one random frame per evaluation (model in training mode)."""
    from eqcalc.derivatives import ForceStressModel
    from eqcalc.model import Model

    model = Model(str(MODELS / "faenet.eqm"), compile="eager", device="cpu", forces="direct")
    fa = model.wrapper.model
    fa.train()
    gen = torch.Generator().manual_seed(seed)

    class OneFrame:
        def predict(self, structures):
            from eqcalc.atoms import to_tensors
            from eqcalc.neighbors import compute_neighbors

            out = []
            for s in structures:
                t = to_tensors([s], model.device)
                ei, sh = compute_neighbors(t.positions, t.cell, t.pbc, model.cutoff, t.system)
                fa.choose_frames(1, gen)
                r = ForceStressModel(fa, forces="direct")(*model.inputs(t, ei, sh))
                out.append({"energy": float(r["energy"][0]), "forces": r["forces"].detach().numpy()})
            return out

    worst = T.check_symmetry(OneFrame(), atoms, n=n)
    worst.pop("stress", None)
    return worst


def symmetry(rows, tmp: Path, n: int = 100):
    structures, _ = _test_structures()
    rng = np.random.default_rng(0)
    picks = [structures[k] for k in rng.choice(len(structures), 2, replace=False)]
    for mode in ("full", "se3", "2d", "none"):
        path = _variant(mode, tmp)
        for forces in ("direct", "conservative"):
            calc = EquivariantCalculator(path, compile="eager", device="cpu", forces=forces, dtype="float32")
            worst = {"energy": 0.0, "forces": 0.0}
            for atoms in picks:
                w = T.check_symmetry(calc, atoms, n=n)
                worst = {k: max(worst[k], w[k]) for k in worst}
            for k, v in worst.items():
                rows.append(("symmetry", f"faenet-{mode}-{forces}", f"max_rel_{k}_error", v))
            print(mode, forces, worst, flush=True)
    worst = {"energy": 0.0, "forces": 0.0}
    for atoms in picks:
        w = _sfa_symmetry(n, atoms)
        worst = {k: max(worst[k], w[k]) for k in worst}
    for k, v in worst.items():
        rows.append(("symmetry", "faenet-stochastic-1frame-direct", f"max_rel_{k}_error", v))
    print("sfa 1 frame", worst, flush=True)


def accuracy(rows):
    from eqcalc import package
    from potentials.train import Frame, _batches, evaluate

    structures, kept = _test_structures()
    runs = [("faenet", "direct"), ("faenet", "conservative"), ("default", "conservative"),
            ("schnet", "conservative")]
    for name, forces in runs:
        path = MODELS / f"{name}.eqm"
        meta = package.read(path).metadata
        model = potentials.load(path).eval()
        species = meta["species"]
        from ase.data import atomic_numbers
        index = {atomic_numbers[s]: k for k, s in enumerate(species)}
        batches = _batches([Frame(a, index) for a in structures], 16, float(meta["cutoff"]))
        mode = "direct" if forces == "direct" else "conservative"
        m = evaluate(model, batches, (10.0, 1.0, 100.0), mode)
        label = f"{meta['architecture']}-{forces}"
        rows.append(("accuracy", label, "energy_mae_meV_per_atom", m["energy_mae_meV_per_atom"]))
        rows.append(("accuracy", label, "forces_mae_meV_per_A", m["forces_mae_meV_per_A"]))
        calc = EquivariantCalculator(str(path), compile="torchscript", device="cpu", forces=forces)
        calc.predict(structures[:8])
        start = time.perf_counter()
        for k in range(0, len(structures), 8):
            calc.predict(structures[k:k + 8])
        rate = len(structures) / (time.perf_counter() - start)
        rows.append(("accuracy", label, "inference_structures_per_s", rate))
        rows.append(("accuracy", label, "n_parameters", meta.get("n_parameters", 0)))
        print(label, m["energy_mae_meV_per_atom"], m["forces_mae_meV_per_A"], rate, flush=True)


def train_speed(rows, tmp: Path, steps: int):
    import json
    import math

    from potentials import data as datamod
    from potentials.make_models import RECIPES, load_recipe
    from potentials.train import train

    _, kept = _test_structures()
    n_train = len(datamod.split(kept, "train"))
    for name in ("faenet", "default", "schnet"):
        config = load_recipe(RECIPES / f"{name}.yaml")
        config.pop("adsorption_check", None)
        config.update(max_steps=steps, val_every=10 ** 6, max_val_frames=8, max_time_s=None, threads=1,
                      progress=False, work_dir=str(tmp / f"train-{name}"), output=str(tmp / f"{name}.eqm"))
        train(config)
        metrics = json.loads((tmp / f"train-{name}" / "metrics.json").read_text())
        per_epoch = math.ceil(n_train / int(config.get("batch_size", 8)))
        seconds = metrics["train_time_s"] / metrics["steps"] * per_epoch
        label = f"{config['architecture']}-{config.get('force_mode', 'conservative')}"
        rows.append(("train_speed", label, "train_s_per_epoch", seconds))
        print(label, f"{seconds:.1f} s/epoch", flush=True)


def nve(rows, steps: int = 2000):
    from ase import units
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    curves = {}
    for name, forces in (("faenet", "direct"), ("faenet", "conservative"), ("default", "conservative")):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        atoms.rattle(0.03, seed=1)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        atoms.calc = EquivariantCalculator(name, compile="torchscript", device="cpu", forces=forces)
        dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
        energies = []
        start = time.perf_counter()
        from eqcalc.errors import EqcalcError
        for _ in range(steps // 10):
            try:
                dyn.run(10)
            except EqcalcError as error:  # e.g. atoms driven onto each other: the run failed
                print(f"{name}-{forces}: stopped after {len(energies) * 10} steps: {error}", flush=True)
                break
            energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        rows.append(("nve", f"{name}-{forces}", "steps_completed", len(energies) * 10))
        if len(energies) < 2:
            continue
        t_ps = np.arange(1, len(energies) + 1) * 10 * 1e-3
        e = (np.array(energies) - energies[0]) / len(atoms) * 1000
        slope = float(np.polyfit(t_ps, e, 1)[0])
        label = f"{name}-{forces}"
        curves[label] = (t_ps, e)
        rows.append(("nve", label, "drift_meV_per_atom_per_ps", slope))
        rows.append(("nve", label, "max_abs_dE_meV_per_atom", float(np.abs(e).max())))
        rows.append(("nve", label, "wall_s", time.perf_counter() - start))
        print(label, slope, float(np.abs(e).max()), flush=True)
    return curves


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="*", default=["symmetry", "accuracy", "train_speed", "nve"])
    parser.add_argument("--train-steps", type=int, default=60, help="timed training steps per model")
    parser.add_argument("--n", type=int, default=100, help="O(3) elements per structure")
    parser.add_argument("--nve-steps", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import tempfile

    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        if "symmetry" in args.sections:
            symmetry(rows, Path(tmp), args.n)
        if "accuracy" in args.sections:
            accuracy(rows)
        if "train_speed" in args.sections:
            train_speed(rows, Path(tmp), args.train_steps)
        if "nve" in args.sections:
            curves = nve(rows, args.nve_steps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if set(args.sections) == {"symmetry", "accuracy", "train_speed", "nve"} else "_" + "_".join(args.sections)
    with open(RESULTS / f"faenet_compare{suffix}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["section", "model", "metric", "value"])
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    acc = [r for r in rows if r[0] == "accuracy" and r[2] == "forces_mae_meV_per_A"]
    if acc:
        ax[0].bar([r[1] for r in acc], [r[3] for r in acc])
        ax[0].set_ylabel("test force MAE (meV/Å)")
        ax[0].tick_params(axis="x", rotation=20)
    for label, (t, e) in curves.items():
        ax[1].plot(t, e, label=label)
    ax[1].set_xlabel("time (ps)"), ax[1].set_ylabel("E_total - E_0 (meV/atom)"), ax[1].set_title("NVE, Cu bulk 300 K")
    if curves:
        ax[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"faenet_compare{suffix}.png", dpi=100)
    print("wrote", RESULTS / f"faenet_compare{suffix}.csv")


if __name__ == "__main__":
    main()
