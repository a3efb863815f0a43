#!/usr/bin/env bash
# cogfun on other Pythons: a fresh venv per interpreter, installed from requirements/lock.txt as the
# README says, then byte-compile, import every module (the bench package's too, as
# `python -m bench.NAME` from the checkout imports it), `cogfun doctor` and the fast tests.
#
#     bash bench/py_versions.sh [PYTHON ...]    # default: pyenv's 3.12 and 3.10
#
# Not part of the test suite: each venv downloads torch for its Python (on PyPI that is the CUDA
# build, ~3.5 GB with its nvidia-* packages; only the 3.11 CPU build lies on this machine's disk)
# and the fast tests take minutes. An interpreter outside pyproject.toml's requires-python is
# refused by pip; the script then still byte-compiles the sources with it and says so.
# WORK (default /tmp/cogfun-pyversions) keeps the venvs, so a rerun installs nothing new.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORK="${WORK:-/tmp/cogfun-pyversions}"
mkdir -p "$WORK"
pythons=("$@")
if [ ${#pythons[@]} -eq 0 ]; then
    pythons=(/root/.pyenv/versions/3.12.*/bin/python3.12 /root/.pyenv/versions/3.10.*/bin/python3.10)
fi
summary=()
for py in "${pythons[@]}"; do
    v=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || continue
    echo "=== Python $v ($py)"
    src="$WORK/src-$v"
    rm -rf "$src" && mkdir -p "$src"
    # The working tree as git sees it (tracked and new files, nothing ignored).
    git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src" 2>/dev/null
    "$py" -m compileall -q "$src/common" "$src/precompute" "$src/train" "$src/app" \
        "$src/testing" "$src/config" "$src/bench" "$src/tests" >"$WORK/compile-$v.log" 2>&1
    compiled=$([ $? -eq 0 ] && echo ok || echo "FAILED (see $WORK/compile-$v.log)")
    echo "byte-compile: $compiled"
    venv="$WORK/venv-$v"
    if [ ! -x "$venv/bin/python" ]; then
        "$py" -m venv "$venv" && "$venv/bin/pip" install -q -U pip 2>/dev/null  # old pips word refusals badly
    fi
    t0=$(date +%s)
    if ! "$venv/bin/pip" install -q -c "$src/requirements/lock.txt" -e "$src[dev]" \
        >"$WORK/install-$v.log" 2>&1; then
        echo "install: refused"
        grep -E "^ERROR" "$WORK/install-$v.log" | head -3
        summary+=("$v: byte-compile $compiled; install refused: $(grep -m1 -E '^ERROR' "$WORK/install-$v.log")")
        continue
    fi
    echo "install: ok in $(($(date +%s) - t0)) s"
    "$venv/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|diffusers|transformers|zarr|deepspeed|decord|av) "
    (cd "$src" && "$venv/bin/python" - <<'EOF'
import importlib, pkgutil, sys
import bench, cogfun.app, cogfun.common, cogfun.precompute, cogfun.testing, cogfun.train
bad = []
n = 0
for pkg in (cogfun.common, cogfun.precompute, cogfun.train, cogfun.app, cogfun.testing, bench):
    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
        n += 1
        try:
            importlib.import_module(m.name)
        except Exception as e:
            bad.append(f"{m.name}: {type(e).__name__}: {e}")
print(f"imports: {n - len(bad)}/{n} modules import", *bad, sep="\n  ")
sys.exit(1 if bad else 0)
EOF
    )
    imported=$([ $? -eq 0 ] && echo ok || echo FAILED)
    "$venv/bin/cogfun" doctor 2>/dev/null | grep -E "^(python|torch|cuda|video|deepspeed|PROBLEM|ok|[0-9]+ problem)"
    t0=$(date +%s)
    (cd "$src" && "$venv/bin/python" -m pytest -m "not slow" -q -p no:cacheprovider \
        >"$WORK/tests-$v.log" 2>&1)
    tests=$(tail -1 "$WORK/tests-$v.log")
    echo "fast tests ($(($(date +%s) - t0)) s): $tests"
    grep -E "^(FAILED|ERROR) " "$WORK/tests-$v.log" | head -20
    summary+=("$v: byte-compile $compiled; install ok; imports $imported; fast tests: $tests")
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
