#!/usr/bin/env bash
# The wheels `bench/gpu.py` needs on the lent GPU machine, fetched here (it reaches no registry).
#
# That machine (device tool, kind nvidia-h200) has Python 3.12, torch 2.11 + CUDA and most of
# diffusers' dependencies, but not diffusers itself nor importlib_metadata. bench/gpu.py imports only
# torch, diffusers and bench/ (no cogfun install, zarr, decord or deepspeed), so these two suffice:
#
#     bash bench/gpu_wheels.sh          # here: writes .whl/ (ignored by git, ~6.5 MB)
#
# then one device call, carrying .whl (docs/performance.md, "GPU figures"):
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#         --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
#         && python3 bench/gpu.py 2>&1 | tee $OUT/gpu.txt
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl diffusers==0.42.1 importlib_metadata zipp
ls -l .whl
