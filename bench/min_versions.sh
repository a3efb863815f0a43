#!/usr/bin/env bash
# pyproject.toml's lower bounds, tried: a Python 3.11 venv with the lock's versions except the
# oldest diffusers, transformers, peft, accelerate, zarr and numcodecs that pyproject.toml admits,
# then the tests that exercise them (model, loss, store, LoRA, training units, precompute, doctor).
#
#     bash bench/min_versions.sh          # WORK (default /tmp/cogfun-min) keeps the venv
#
# Not part of the test suite (it installs a second environment). torch stays at the lock's 2.13.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORK="${WORK:-/tmp/cogfun-min}"
mkdir -p "$WORK"
oldest=(diffusers==0.40.0 transformers==5.0.0 peft==0.18.0 accelerate==1.0.0 zarr==3.1.0
    numcodecs==0.14.0)
names=$(printf '%s\n' "${oldest[@]}" | cut -d= -f1 | paste -sd'|')
grep -v '^#' requirements/lock.txt |
    grep -viE "^($names|huggingface.hub|tokenizers)==" >"$WORK/constraints.txt"
[ -x "$WORK/venv/bin/python" ] || python3.11 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q -c "$WORK/constraints.txt" -e '.[dev]' "${oldest[@]}"
"$WORK/venv/bin/pip" list 2>/dev/null | grep -iE "^(torch|diffusers|transformers|peft|accelerate|zarr|numcodecs|huggingface.hub) "
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_transformer.py \
    tests/test_loss.py tests/test_store.py tests/test_tiny.py tests/test_models.py \
    tests/test_train_units.py tests/test_lora.py tests/test_doctor.py tests/test_precompute.py \
    tests/test_data.py
