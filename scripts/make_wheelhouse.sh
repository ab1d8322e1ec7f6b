#!/usr/bin/env bash
# Run HERE (with network to PyPI): download the pure-Python wheels gpu_check.sh may need on the GPU
# machine (Python 3.12, no network) into ./wheelhouse. Carry `wheelhouse` with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
$PY -m pip download --only-binary=:all: --python-version 3.12 --no-deps -d wheelhouse \
  pluggy platformdirs tqdm packaging pytest iniconfig pygments safetensors "setuptools>=77"
ls -la wheelhouse
