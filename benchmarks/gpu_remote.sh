#!/usr/bin/env bash
# `make gpu-check` on a bare CUDA machine that received this checkout and the carried folder .gpu/ (made as the README's
# "GPU check" says: the CIFAR-10 JPEG copy packed by benchmarks/pack_folder.py, mnist/ and fashion-mnist/ under ood/,
# and wheels/ of jsonargparse, docstring-parser and typeshed-client). It needs python3 with torch, lightning,
# torchmetrics and torchvision, and no network: the wheels go into a scratch folder, the checkout on PYTHONPATH.
#
#   bash benchmarks/gpu_remote.sh [gpu_check.py options]     # from the repository root; summary into $OUT
#
# Scratch: /tmp/gpu_check_site (wheels), /tmp/cifar10-jpeg (images), /tmp/gpu_check (checkpoints, logs, caches).
set -euo pipefail
carried=${GPU_CARRY:-.gpu}
site=/tmp/gpu_check_site
data=/tmp/cifar10-jpeg
export OUT=${OUT:-logs/gpu_check} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$carried"/wheels/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/pack_folder.py unpack "$carried/cifar10-jpeg.pack" "$data"
args=(--out "$OUT" --work /tmp/gpu_check --budget "${GPU_BUDGET:-540}" "$@")
if command -v make >/dev/null; then
    make gpu-check GPU_PYTHON=python3 DATA="$data" OOD_ROOT="$carried/ood" ARGS="$(printf '%q ' "${args[@]}")"
else
    python3 benchmarks/gpu_check.py --data "$data" --ood-root "$carried/ood" "${args[@]}"
fi
