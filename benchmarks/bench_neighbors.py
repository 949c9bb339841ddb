"""Neighbor lists: eqcalc vs vesin, matscipy and ASE on rattled fcc Cu (864, 4000, 16384 atoms,
cutoff 5 Å), in one run → benchmarks/results/neighbors.csv and neighbors.png.

    .venv/bin/python benchmarks/bench_neighbors.py        # same as: eqcalc bench --what neighbors
"""
import sys

from eqcalc.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--what", "neighbors", *sys.argv[1:]]))
