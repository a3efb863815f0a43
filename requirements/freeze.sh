#!/usr/bin/env bash
# Rewrites requirements/lock.txt from the active venv (Python 3.11, CPU torch, cogfun installed
# editable): every installed package at its version, setuptools included, cogfun and pip left out.
# Run after adding or upgrading a dependency, then `python -m pytest tests/test_install.py`.
set -euo pipefail
cd "$(dirname "$0")"
header=$(grep '^#' lock.txt)
pins=$(python -m pip freeze --all --exclude-editable | grep -v -e '^#' -e '^-e ' \
    -e '^pip==' -e '^wheel==' -e '^cogfun' | sed 's/+cpu$//' | sort -f)
printf '%s\n%s\n' "$header" "$pins" >lock.txt
echo "requirements/lock.txt: $(grep -c '==' lock.txt) pins"
