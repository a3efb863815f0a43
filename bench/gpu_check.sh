#!/usr/bin/env bash
# One-shot GPU check: install cogfun beside the machine's own torch, then `cogfun doctor`,
# bench/gpu.py (the real 2b step's MFU, the real VAE's encode throughput) and bench/gpu_check.py
# (`cogfun train` steps: tiny, ZeRO-2 on one GPU, real 2b width). Every figure is a `name: value` line.
#
#     bash bench/gpu_check.sh                  # on the GPU machine, carrying .whl/gpu and .whl/stores
#     bash bench/gpu_check.sh --precompute     # then, same machine, carrying .whl/av: precompute
#     PYTHON=/path/to/python bash bench/gpu_check.sh --cpu-reduced   # the same sequence on a CPU
#
# bench/gpu_wheels.sh prepares .whl/ here; docs/performance.md ("GPU figures") has the device calls.
# The install is pip's own resolution of pyproject.toml's dependencies against what the machine
# has, with only the carried wheels as an index, so the machine's torch stays when it is in range.
# PyAV, decord and bitsandbytes are not carried in the main call (too large beside the rest), so
# `cogfun doctor` names them as missing there; nothing the checks run imports them.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-python3}"
mode=gpu
case "${1:-}" in
--cpu-reduced) mode=cpu ;;
--precompute) mode=precompute ;;
"") ;;
*) echo "usage: bash bench/gpu_check.sh [--cpu-reduced | --precompute]" >&2 && exit 2 ;;
esac
section() { echo && echo "=== $*"; }

torch_version() { "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo none; }
before=$(torch_version)
section "python $("$PY" -c 'import platform; print(platform.python_version())'), torch $before"

if [ "$mode" = precompute ]; then
    section "install PyAV (.whl/av) beside the main call's install"
    "$PY" -c 'import diffusers, zarr, cogfun' 2>/dev/null ||
        { echo "cogfun is not installed here: this is a fresh machine; run the main check first" && exit 1; }
    "$PY" -m pip install -q --no-index --find-links .whl/av av || exit 1
    "$PY" -m bench.gpu_check --precompute
    exit $?
fi

section "install: pip, only the carried wheels as index, the machine's torch kept"
mapfile -t reqs < <("$PY" - <<'EOF'
import tomllib
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
not_carried = {"av", "decord", "bitsandbytes"}
print("\n".join(r for r in project["dependencies"] if Requirement(r).name not in not_carried))
EOF
)
wheels=.whl/gpu
if [ "$mode" = cpu ] && [ ! -d "$wheels" ]; then wheels=""; fi
if [ -n "$wheels" ]; then
    t0=$(date +%s)
    if ! "$PY" -m pip install -q --no-index --find-links "$wheels" "${reqs[@]}"; then
        echo "pip could not resolve cogfun's ranges from the machine's packages + $wheels (above);"
        echo "installing the carried wheels as they are (--no-deps) and going on"
        "$PY" -m pip install -q --no-index --no-deps "$wheels"/*.whl
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    if [ "$mode" = cpu ] && [ -d .whl/av ]; then  # the CPU run also precomputes: PyAV
        "$PY" -m pip install -q --no-index --find-links .whl/av av || exit 1
    fi
    echo "install_s: $(($(date +%s) - t0))"
else
    echo "no .whl/gpu: using what $PY has (cpu mode)"
fi
after=$(torch_version)
echo "torch_before: $before"
echo "torch_after: $after"
[ "$before" = "$after" ] && echo "torch_kept: yes" || echo "torch_kept: NO"

section "cogfun doctor"
if [ "$mode" = cpu ]; then "$PY" -m cogfun.app.cli doctor; else "$PY" -m cogfun.app.cli doctor --require-cuda; fi
echo "doctor_exit: $?"

section "bench/gpu.py"
if [ "$mode" = cpu ]; then
    "$PY" -m bench.gpu --reduced --steps 2 --encodes 1 --warmup 1 --vae-variants eager
else
    "$PY" -m bench.gpu --vae-variants eager,channels_last
fi
echo "gpu_py_exit: $?"

section "bench/gpu_check.py"
if [ "$mode" = cpu ]; then "$PY" -m bench.gpu_check --cpu-reduced; else "$PY" -m bench.gpu_check; fi
echo "gpu_check_exit: $?"
