#!/usr/bin/env bash
# Separate benchmark environment for the reference mace-torch (it pins e3nn 0.4.4), so that the
# project's own venv never gets e3nn or mace-torch. Usage:
#   bash benchmarks/mace_env.sh [ENV_DIR]        (default: build/mace-env)
# torch is pinned to the local CPU wheel: a plain `pip install torch` pulls GBs of CUDA wheels.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV="${1:-$ROOT/build/mace-env}"
if [ ! -x "$ENV/bin/python" ]; then
    python3.11 -m venv "$ENV" 2>/dev/null || python3 -m venv "$ENV"
fi
"$ENV/bin/pip" install --quiet "torch==2.13.0"
"$ENV/bin/pip" install --quiet mace-torch ase
"$ENV/bin/python" -c "import mace, e3nn, torch; print('mace-torch', mace.__version__, 'e3nn', e3nn.__version__, 'torch', torch.__version__)"
