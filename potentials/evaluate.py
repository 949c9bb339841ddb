"""Errors of a model package on a data split, through the calculator users run.

``evaluate(model, data, split="test", max_force=None)`` returns energy MAE (meV/atom), force MAE
(meV/Å), stress MAE (meV/Å³, periodic frames only), frame counts and inference throughput
(structures/s, batches of ``batch_size`` through :meth:`EquivariantCalculator.predict`,
neighbor lists included). ``max_force`` (eV/Å) drops frames with any larger reference force
component, the same filter training can apply; ``None`` keeps every frame, so the figure covers
the outliers too.

    python -m potentials.evaluate default --data build/potentials/emt.xyz
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Dict, Optional

import numpy as np


def evaluate(model, data: str, split: str = "test", max_force: Optional[float] = None,
             batch_size: int = 16, **calculator_options) -> Dict[str, float]:
    """MAEs and throughput of ``model`` (name, path or :class:`eqcalc.model.Model`) on ``split``."""
    from eqcalc import EquivariantCalculator
    from potentials import data as datamod

    frames = datamod.split(datamod.read_dataset(data), split)
    kept = [f for f in frames
            if max_force is None or np.abs(datamod.labels(f)["forces"]).max() <= max_force]
    calc = EquivariantCalculator(model, **calculator_options)
    calc.predict(kept[:2])  # warm-up: first-call allocations are not inference
    e_err, f_err, s_err = [], [], []
    start = time.perf_counter()
    predictions = []
    for k in range(0, len(kept), batch_size):
        predictions += calc.predict(kept[k:k + batch_size])
    seconds = time.perf_counter() - start
    for frame, pred in zip(kept, predictions):
        ref = datamod.labels(frame)
        e_err.append(abs(pred["energy"] - ref["energy"]) / len(frame))
        f_err.append(np.abs(pred["forces"] - ref["forces"]).ravel())
        if "stress" in ref and "stress" in pred:
            s_err.append(np.abs(pred["stress"] - ref["stress"]))
    return {
        "split": split, "n_frames": len(kept), "n_dropped": len(frames) - len(kept),
        "max_force_eV_per_A": max_force,
        "energy_mae_meV_per_atom": 1e3 * float(np.mean(e_err)),
        "forces_mae_meV_per_A": 1e3 * float(np.mean(np.concatenate(f_err))),
        "stress_mae_meV_per_A3": 1e3 * float(np.mean(np.concatenate(s_err))) if s_err else float("nan"),
        "structures_per_s": len(kept) / seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Energy/force/stress MAE and throughput of a model package on a data split.",
        epilog="example: python -m potentials.evaluate default --data build/potentials/emt.xyz "
               "--max-force 20")
    parser.add_argument("model", help="shipped model name or .eqm path")
    parser.add_argument("--data", default="build/potentials/emt.xyz", help="extxyz or ASE .db file")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--max-force", type=float, default=None,
                        help="drop frames with a larger force component, eV/Å (default: keep all)")
    parser.add_argument("--forces", default="auto", choices=["auto", "conservative", "direct"])
    args = parser.parse_args(argv)
    result = evaluate(args.model, args.data, args.split, args.max_force, forces=args.forces,
                      compile="eager")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
