#!/usr/bin/env bash
# Prepare .gpucheck/ (git-ignored through .git/info/exclude) for `bdsweep gpu-check` on a lent GPU machine
# that reaches no package index: the CIFAR-10 archive with its materialize.py, and wheels of the one
# dependency missing from that machine's image (jsonschema with its own, for CPython 3.12). About 55 MiB,
# inside the device tool's 64 MiB for the working tree. Run it here, in the repository root's checkout:
#   bash benchmarks/gpu_check_bundle.sh [SHARED_DATASETS_DIR]      (default: ../shared/datasets)
# then the one-line command of README "GPU acceptance check", carrying .gpucheck.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/datasets}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .gpucheck/datasets .gpucheck/wheels
grep -qxF '/.gpucheck/' "$exclude" 2>/dev/null || echo '/.gpucheck/' >> "$exclude"
cp "$shared/materialize.py" "$shared/cifar10_jpeg_all.npz" .gpucheck/datasets/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpucheck/wheels \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
du -sh .gpucheck
