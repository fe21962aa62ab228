#!/usr/bin/env bash
# Prepare a virtual environment for slabcache in .venv (or $SLABCACHE_VENV).
#
# Usage: tools/bootstrap.sh [--with-lmcache]
#
# Idempotent: a second run only re-installs the package itself. torch is
# pinned to 2.13.0 when absent because an unpinned resolve pulls a
# multi-GB CUDA build; an existing torch that satisfies the package's range
# is kept.  --with-lmcache (or SLABCACHE_WITH_LMCACHE=1) adds lmcache==0.5.6
# for the integration tests; it needs numpy<=2.2.6, which slabcache accepts.
set -euo pipefail
WITH_LMCACHE="${SLABCACHE_WITH_LMCACHE:-0}"
for arg in "$@"; do
    case "$arg" in
        --with-lmcache) WITH_LMCACHE=1 ;;
        *) echo "bootstrap: unknown option $arg (use --with-lmcache)" >&2; exit 2 ;;
    esac
done
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

if [ "$WITH_LMCACHE" = "1" ] && ! "$VPY" -c "import lmcache" >/dev/null 2>&1; then
    echo "bootstrap: installing lmcache==0.5.6" >&2
    "$VPY" -m pip install -q "lmcache==0.5.6"
fi

"$VPY" -m pip install -q -e ".[test]"
