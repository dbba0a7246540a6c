#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine that brings its own torch (and torchvision):
# the `gpu`-marked tests (the training step under torch.cuda.set_sync_debug_mode("error") for
# every task, pinned batches, bf16 losses), then `python -m benchmarks` (800x1333 in bf16, the
# compile cases, K-Net vs Mask R-CNN; the systems rows need Ray/DVC/Prefect and are skipped).
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # default: reports/
#
# Needs numpy, scipy, pyyaml, pillow, tqdm, pycocotools and pytest beside torch. Nothing is
# installed: the checkout is put on PYTHONPATH. Writes OUT_DIR/gpu_tests.log, bench.json,
# bench.md and bench.log. Exits non-zero if a test fails or no CUDA device is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-reports}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'EOF'
import torch
assert torch.cuda.is_available(), "gpu_check: no CUDA device visible"
print("gpu_check:", torch.__version__, torch.cuda.get_device_name())
EOF
python3 -m pytest -m gpu -p no:cacheprovider -o addopts="-ra" \
  tests/test_fast_path.py tests/test_model.py 2>&1 | tee "$out/gpu_tests.log"
python3 -m benchmarks --skip-systems --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
