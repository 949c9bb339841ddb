#!/usr/bin/env bash
# Separate environment for the reference nequip (it needs e3nn >= 0.6, which conflicts with
# mace-torch's pin), so that the project's own venv never gets e3nn or nequip. Usage:
#   bash benchmarks/nequip_env.sh [ENV_DIR]        (default: build/nequip-env)
# torch is pinned: a plain `pip install torch` pulls GBs of CUDA wheels. Use `python -m pip`
# (the venv's own interpreter) so nothing lands in the base Python.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV="${1:-$ROOT/build/nequip-env}"
if [ ! -x "$ENV/bin/python" ]; then
    python3.11 -m venv "$ENV" 2>/dev/null || python3 -m venv "$ENV"
fi
"$ENV/bin/python" -m pip install --quiet "torch==2.13.0" nequip ase
"$ENV/bin/python" -c "import nequip, e3nn, torch; print('nequip', nequip.__version__, 'e3nn', e3nn.__version__, 'torch', torch.__version__)"
