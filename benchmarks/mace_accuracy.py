"""Accuracy at equal epochs: our MACE (potentials.train) vs mace-torch on the same EMT split.

Both models: the MACE hyperparameters of benchmarks/bench_mace.py (32x0e+32x1o, max_ell 3,
correlation 3, 2 interactions, 8 Bessel functions, radial MLP [64, 64, 64], cutoff 5 Å), the
same train/val/test frames of build/potentials/emt.xyz (its ``info["split"]``, frames with
|F| > max_force dropped, as potentials.train does), the same batch size, loss weights
(energy per atom, forces, stress), optimiser (AdamW, EMA), the same learning-rate schedule (linear
warm-up over ``warmup_steps``, then cosine to ``min_lr_ratio`` of the rate, as potentials.train)
and the same number of epochs; mace-torch is trained by a small in-process loop inside its own venv (its data
classes, its model; no saved mace-torch file is loaded). Test-split energy MAE (meV/atom) and
force MAE (meV/Å) of both and their ratio → benchmarks/results/mace_accuracy.csv, with each code's training time.

    nice -n 15 .venv/bin/python benchmarks/mace_accuracy.py [--epochs 3] [--threads 1] [--ours mace nequip painn]
"""
import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mace import HYPER, mace_python  # noqa: E402

TRAIN = dict(energy_weight=10.0, forces_weight=1.0, stress_weight=100.0, lr=0.003, batch_size=8,
             ema_decay=0.99, max_force=20.0, weight_decay=0.0, warmup_steps=100, min_lr_ratio=0.02)


def splits(data: Path, max_force: float):
    """train/val/test frames exactly as potentials.train selects them."""
    import numpy as np

    from potentials import data as datamod

    frames = datamod.read_dataset(data, require=("energy", "forces"))
    frames = [a for a in frames if np.abs(datamod.labels(a)["forces"]).max() <= max_force]
    return {name: datamod.split(frames, name) for name in datamod.SPLITS}


def mace_torch_worker(args):
    """Inside the mace-torch venv: train ScaleShiftMACE on the split files, print test MAEs."""
    import ase.io
    import numpy as np
    import torch

    torch.serialization.add_safe_globals([slice])  # e3nn 0.4.4's own packaged constants
    from e3nn import o3
    from mace import data as mdata
    from mace import modules, tools
    from mace.tools import torch_geometric

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    work = Path(args.work)
    sets = {k: ase.io.read(work / f"{k}.xyz", ":") for k in ("train", "val", "test")}
    zs = sorted({int(z) for a in sets["train"] for z in a.numbers})
    table = tools.AtomicNumberTable(zs)
    # Reference energies by least squares on the training split (as potentials.train does).
    counts = np.array([[np.sum(a.numbers == z) for z in zs] for a in sets["train"]], float)
    energies = np.array([a.info["REF_energy"] for a in sets["train"]])
    e0 = np.linalg.lstsq(counts, energies, rcond=None)[0]

    def loader(frames, shuffle):
        configs = [mdata.config_from_atoms(a, key_specification=_keys()) for a in frames]
        data = [mdata.AtomicData.from_config(c, z_table=table, cutoff=HYPER["cutoff"]) for c in configs]
        return torch_geometric.dataloader.DataLoader(data, batch_size=TRAIN["batch_size"], shuffle=shuffle,
                                                     drop_last=False)

    def _keys():
        from mace.data.utils import KeySpecification
        return KeySpecification(info_keys={"energy": "REF_energy", "stress": "REF_stress"},
                                arrays_keys={"forces": "REF_forces"})

    train, test = loader(sets["train"], True), loader(sets["test"], False)
    forces_rms = float(np.sqrt(np.mean(np.concatenate([a.arrays["REF_forces"] for a in sets["train"]]) ** 2)))
    model = modules.ScaleShiftMACE(
        r_max=HYPER["cutoff"], num_bessel=HYPER["num_radial"], num_polynomial_cutoff=5,
        max_ell=HYPER["max_ell"], interaction_cls=modules.RealAgnosticResidualInteractionBlock,
        interaction_cls_first=modules.RealAgnosticResidualInteractionBlock,
        num_interactions=HYPER["num_interactions"], num_elements=len(zs),
        hidden_irreps=o3.Irreps(f"{HYPER['channels']}x0e+{HYPER['channels']}x1o"),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=e0, avg_num_neighbors=HYPER["avg_num_neighbors"],
        atomic_numbers=zs, correlation=HYPER["correlation"], gate=torch.nn.functional.silu,
        radial_MLP=[HYPER["radial_mlp"]] * 3, atomic_inter_scale=forces_rms, atomic_inter_shift=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    total, warm, low = args.epochs * len(train), TRAIN["warmup_steps"], TRAIN["min_lr_ratio"]

    def lr_factor(step):  # potentials.train's schedule (this venv cannot import potentials)
        if step < warm:
            return (step + 1) / warm
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(TRAIN["ema_decay"]))
    start, steps = time.perf_counter(), 0
    for _ in range(args.epochs):
        for batch in train:
            out = model(batch.to_dict(), training=True, compute_force=True, compute_stress=True)
            n = (batch.ptr[1:] - batch.ptr[:-1]).to(out["energy"].dtype)
            loss = TRAIN["energy_weight"] * (((out["energy"] - batch.energy) / n) ** 2).mean() \
                + TRAIN["forces_weight"] * ((out["forces"] - batch.forces) ** 2).mean() \
                + TRAIN["stress_weight"] * ((out["stress"] - batch.stress) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            schedule.step()
            ema.update_parameters(model)
            steps += 1
    e_err, f_err = [], []
    for batch in test:
        out = ema.module(batch.to_dict(), training=False, compute_force=True)
        n = (batch.ptr[1:] - batch.ptr[:-1]).to(out["energy"].dtype)
        e_err.append(((out["energy"] - batch.energy) / n).abs().detach())
        f_err.append((out["forces"] - batch.forces).abs().detach().reshape(-1))
    print(json.dumps({"code": "mace-torch", "steps": steps, "epochs": args.epochs,
                      "energy_mae_meV_atom": 1e3 * float(torch.cat(e_err).mean()),
                      "force_mae_meV_A": 1e3 * float(torch.cat(f_err).mean()),
                      "parameters": sum(p.numel() for p in model.parameters()),
                      "train_s": time.perf_counter() - start}), flush=True)


#: eqcalc architectures trained with the same data, epochs, batch, loss and schedule: MACE at the
#: benchmark hyperparameters, NequIP at the same widths (its default 3 layers), and the shipped
#: default model's PaiNN, to see whether a MACE or NequIP model would beat it at equal budget.
OURS = {"mace": {k: v for k, v in HYPER.items() if k != "cutoff"},
        "nequip": {k: v for k, v in HYPER.items() if k not in ("cutoff", "correlation", "num_interactions")},
        "painn": dict(features=48, num_interactions=3, num_radial=16)}


def ours(args, work: Path, n_train: int, architecture: str):
    import potentials
    from potentials.train import train

    steps = args.epochs * math.ceil(n_train / TRAIN["batch_size"])
    # One validation, at the end: the final EMA weights are kept, as in the mace-torch loop.
    config = dict(architecture=architecture, model=OURS[architecture],
                  cutoff=HYPER["cutoff"], dtype="float32", data=str(args.data),
                  energy_weight=TRAIN["energy_weight"], forces_weight=TRAIN["forces_weight"],
                  stress_weight=TRAIN["stress_weight"], lr=TRAIN["lr"], batch_size=TRAIN["batch_size"],
                  ema_decay=TRAIN["ema_decay"], max_force=TRAIN["max_force"], weight_decay=TRAIN["weight_decay"],
                  max_steps=steps, val_every=steps, patience=1000,
                  threads=args.threads, work_dir=str(work / architecture), output=str(work / f"{architecture}.eqm"), seed=0,
                  progress=False, max_val_frames=120, warmup_steps=TRAIN["warmup_steps"],
                  min_lr_ratio=TRAIN["min_lr_ratio"])
    start = time.perf_counter()
    path = train(config)
    metrics = json.loads((work / architecture / "metrics.json").read_text())
    model = potentials.load(path)
    return {"code": f"eqcalc {architecture}", "metrics": metrics, "epochs": args.epochs, "train_s": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in model.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "build" / "potentials" / "emt.xyz"))
    parser.add_argument("--epochs", type=int, default=3, help="training epochs, the same for both codes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default=str(ROOT / "build" / "mace-accuracy"))
    parser.add_argument("--mace-python", default=None, help="default: the venv of benchmarks/mace_env.sh")
    parser.add_argument("--worker", choices=["mace-torch"])
    parser.add_argument("--only", choices=["ours", "mace-torch"])
    parser.add_argument("--ours", nargs="+", choices=sorted(OURS), default=["mace"],
                        help="eqcalc architectures to train beside mace-torch (default: mace)")
    args = parser.parse_args()
    if args.worker:
        return mace_torch_worker(args)
    import ase.io

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sets = splits(Path(args.data), TRAIN["max_force"])
    for name, frames in sets.items():  # mace-torch reads REF_* keys from extxyz
        if args.only == "ours":
            break
        out = []
        for a in frames:
            from potentials import data as datamod

            lab = datamod.labels(a)
            b = a.copy()
            b.calc = None
            b.info = {"REF_energy": float(lab["energy"]), "split": name}
            if "stress" in lab and a.pbc.all():
                b.info["REF_stress"] = lab["stress"]
            b.arrays["REF_forces"] = lab["forces"]
            out.append(b)
        ase.io.write(work / f"{name}.xyz", out, format="extxyz")
    rows = []
    if args.only in (None, "mace-torch"):
        cmd = [args.mace_python or mace_python(), __file__, "--worker", "mace-torch", "--work", str(work),
               "--epochs", str(args.epochs), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
        rows += [json.loads(l) for l in done.stdout.splitlines() if l.startswith("{")]
    for architecture in (args.ours if args.only in (None, "ours") else []):
        r = ours(args, work, len(sets["train"]), architecture)
        test = r["metrics"]["test"]
        rows.append({"code": r["code"], "energy_mae_meV_atom": test["energy_mae_meV_per_atom"],
                     "force_mae_meV_A": test["forces_mae_meV_per_A"], "parameters": r["parameters"],
                     "train_s": r["train_s"], "steps": r["metrics"].get("steps"), "epochs": r["epochs"]})
    for r in rows:
        print(r)
    out = ROOT / "benchmarks" / "results" / "mace_accuracy.csv"
    fields = ["code", "energy_mae_meV_atom", "force_mae_meV_A", "parameters", "train_s", "steps", "epochs"]
    with open(out, "a" if args.only else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if not args.only or f.tell() == 0:
            w.writeheader()
        for r in rows:
            w.writerow(r)


if __name__ == "__main__":
    sys.exit(main())
