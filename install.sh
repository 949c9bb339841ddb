#!/usr/bin/env bash
# Fresh machine -> ./.venv with eqcalc and everything its tests and benchmarks need.
# Order matters: torch 2.13.0 first (the local CPU wheel; an unpinned torch pulls CUDA packages),
# then torch_cluster from source without build isolation (it builds against that torch, ~8 min),
# then eqcalc itself, whose torch and torch_cluster requirements are then already satisfied.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q setuptools wheel
python -m pip install -q torch==2.13.0
python -c "import torch_cluster" 2>/dev/null || python -m pip install -q --no-build-isolation torch_cluster
python -m pip install -q -e ".[test,bench,xtb,phonons,distributed]"
echo "eqcalc installed in $(pwd)/.venv"
