#!/usr/bin/env bash
# Prepare a virtual environment for slabcache in .venv (or $SLABCACHE_VENV).
#
# Idempotent: a second run only re-installs the package itself. torch is
# pinned to 2.13.0 when absent because an unpinned resolve pulls a
# multi-GB CUDA build; an existing torch that satisfies the package's range
# is kept.  Set SLABCACHE_WITH_LMCACHE=1 to add lmcache==0.5.6 for the
# integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SLABCACHE_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: installing torch==2.13.0 (CPU build)" >&2
    "$VPY" -m pip install -q "torch==2.13.0"
fi

if [ "${SLABCACHE_WITH_LMCACHE:-0}" = "1" ] && ! "$VPY" -c "import lmcache" >/dev/null 2>&1; then
    echo "bootstrap: installing lmcache==0.5.6" >&2
    "$VPY" -m pip install -q "lmcache==0.5.6"
fi

"$VPY" -m pip install -q -e ".[test]"
