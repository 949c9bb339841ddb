"""Model step (energy, forces, stress through EquivariantCalculator) for eager, TorchScript and
AOTInductor, with set-up/compile times → benchmarks/results/model_step.csv and model_step.png.

    .venv/bin/python benchmarks/bench_model.py [--model m.eqm] [--atoms 108 864]
    # same as: eqcalc bench --what model
"""
import sys

from eqcalc.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--what", "model", *sys.argv[1:]]))
