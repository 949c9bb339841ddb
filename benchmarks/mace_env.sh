#!/usr/bin/env bash
# The separate virtualenv of the reference mace-torch (it pins e3nn 0.4.4, which must never enter
# eqcalc's own venv). Used by tests/test_convert_mace.py (which calls this script) and
# benchmarks/bench_convert_mace.py. Usage:
#   bash benchmarks/mace_env.sh [ENV_DIR]
# ENV_DIR defaults to $EQCALC_MACE_ENV, else <reference cache>/mace-env-<pins>, the reference
# cache being $EQCALC_REFERENCE_CACHE, else $XDG_CACHE_HOME/eqcalc-reference or
# ~/.cache/eqcalc-reference: outside the clone, so fresh clones on one machine share it (and not
# $EQCALC_CACHE, which the test suite points at a per-run folder). Installs from PyPI only
# (~1.5 min with a warm pip cache) into a temporary folder renamed when complete; a complete env
# is reused as is. Prints the env's python as the last line of stdout (the rest goes to stderr).
# Every version is pinned: torch to the CPU wheel (an unpinned torch pulls GBs of CUDA wheels) and
# mace-torch/e3nn/ase to what the reference results were made with.
set -euo pipefail
PINS="torch==2.13.0 mace-torch==0.3.16 e3nn==0.4.4 ase==3.29.0"
CACHE="${EQCALC_REFERENCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/eqcalc-reference}"
ENV="${1:-${EQCALC_MACE_ENV:-$CACHE/mace-env-0.3.16-torch2.13.0}}"
if [ "$(cat "$ENV/installed" 2>/dev/null)" != "$PINS" ]; then
    {
        start=$(date +%s)
        tmp="$ENV.partial.$$"
        trap 'rm -rf "$tmp"' EXIT
        mkdir -p "$(dirname "$ENV")"
        python3.11 -m venv "$tmp" 2>/dev/null || python3 -m venv "$tmp"
        # torch alone first, so that nothing mace-torch needs can choose another torch build
        "$tmp/bin/python" -m pip install --quiet "torch==2.13.0"
        # shellcheck disable=SC2086
        "$tmp/bin/python" -m pip install --quiet $PINS
        "$tmp/bin/python" -c "import mace, e3nn, torch; print('mace-torch', mace.__version__, 'e3nn', e3nn.__version__, 'torch', torch.__version__)"
        echo "$PINS" > "$tmp/installed"
        rm -rf "$ENV"
        mv "$tmp" "$ENV"   # a venv's python finds its prefix from pyvenv.cfg: renaming is safe
        trap - EXIT
        echo "mace-torch venv created at $ENV in $(( $(date +%s) - start )) s"
    } >&2
fi
echo "$ENV/bin/python"
