#!/usr/bin/env bash
# On a CUDA machine: run the GPU tests and the GPU transfer benchmark.
# Usage: tools/gpu_check.sh [scratch-dir]   (uses the current python)
set -uo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-/tmp/slabcache-gpu}"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -m gpu -p no:cacheprovider tests
python3 benchmarks/gpu_transfer.py --dir "$DIR"
