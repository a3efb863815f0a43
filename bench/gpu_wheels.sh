#!/usr/bin/env bash
# What the lent GPU machine needs for bench/gpu.py and bench/gpu_check.sh, fetched and built here
# (that machine reaches no registry). Everything lands in .whl/ (ignored by git):
#
#     bash bench/gpu_wheels.sh            # .whl/gpu: wheels (~25 MB); .whl/stores: stores (~5 MB)
#     AV=1 bash bench/gpu_wheels.sh       # also .whl/av: PyAV (35 MB), for gpu_check.sh --precompute
#     HF=1 bash bench/gpu_wheels.sh       # also transformers + tokenizers (17 MB) into .whl/gpu
#
# The machine (device tool, kind nvidia-h200) has Python 3.12 and torch 2.11 + CUDA, and of
# cogfun's dependencies accelerate, transformers, peft, safetensors, numpy and most small ones, but
# not diffusers, zarr, numcodecs, DeepSpeed, pydantic, CAME, PyAV or decord. A device call carries at
# most 64 MiB with the working tree (~20 MB): these wheels at the lock's versions fit, PyAV (35 MB)
# and decord (13 MB) do not fit beside them, nor bitsandbytes (42 MB). So the stores the training
# steps read are precomputed here (`python -m bench.gpu_check --prepare`: the tiny model's store,
# and a store at the real 2b text width, 226 x 4096) and `cogfun precompute` runs there only in a
# second call that carries .whl/av onto the still-warm machine (docs/performance.md, "GPU figures").
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/gpu
lock=requirements/lock.txt
pin() { grep -i "^$1==" "$lock"; }
names=(diffusers importlib_metadata lazy-importer zipp zarr numcodecs donfig google-crc32c
    deepspeed hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions
    came-pytorch huggingface_hub httpx2 httpcore2 truststore h11 anyio idna click annotated-doc
    typer shellingham accelerate peft safetensors regex msgpack einops py-cpuinfo)
if [ "${HF:-0}" = 1 ]; then names+=(transformers tokenizers); fi
pins=()
for n in "${names[@]}"; do pins+=("$(pin "$n")"); done
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64)
# DeepSpeed is published as an sdist only: build its (pure Python, no ops) wheel here.
ds=$(pin deepspeed)
pins=("${pins[@]/$ds/}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl/gpu ${pins[*]}
if ! ls .whl/gpu/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl/gpu "$ds"
fi
if [ "${AV:-0}" = 1 ]; then
    mkdir -p .whl/av
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl/av "$(pin av)"
fi
# The stores and the tiny model the GPU's training steps read (built on this CPU, seconds).
python3 -m bench.gpu_check --prepare --workdir .whl/stores
du -sh .whl/* && du -sh .whl
