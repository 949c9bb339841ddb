#!/usr/bin/env bash
# Separate environment for the reference nequip (it needs e3nn >= 0.6, which conflicts with
# mace-torch's pin), so that the project's own venv never gets e3nn or nequip. Usage:
#   bash benchmarks/nequip_env.sh [ENV_DIR [SHARE_PYTHON]]    (default: build/nequip-env)
# With SHARE_PYTHON (the interpreter of eqcalc's venv; the test fixture passes its own) the new
# env is made from the same base Python and sees that venv's site-packages read-only, after its
# own (a .pth line): torch (~1 GB unpacked) and the common packages are not installed a second
# time. pip installs into ENV only and never touches the shared venv (it refuses to uninstall
# anything outside ENV); a requirement the shared copy does not meet (e3nn >= 0.6) is installed
# into ENV, whose site-packages come first on sys.path. Nothing goes the other way: eqcalc's venv
# never sees nequip. torch is pinned: a plain `pip install torch` pulls GBs of CUDA wheels. Use
# `python -m pip` (the venv's own interpreter) so nothing lands in the base Python.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV="${1:-$ROOT/build/nequip-env}"
SHARE="${2:-}"
if [ ! -x "$ENV/bin/python" ]; then
    if [ -n "$SHARE" ]; then
        "$SHARE" -m venv "$ENV"
    else
        python3.11 -m venv "$ENV" 2>/dev/null || python3 -m venv "$ENV"
    fi
fi
if [ -n "$SHARE" ]; then
    own="$("$ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$SHARE" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
        | sort -u > "$own/eqcalc-venv-shared.pth"
fi
"$ENV/bin/python" -m pip install --quiet "torch==2.13.0" nequip ase
"$ENV/bin/python" -c "import nequip, e3nn, torch
print('nequip', nequip.__version__, 'e3nn', e3nn.__version__, 'torch', torch.__version__, torch.__file__)"
