#!/usr/bin/env bash
# Checks the two pip paths a user of torch extensions takes, after scripts/setup.sh:
#   1. in a new venv with the same torch: `pip install --no-build-isolation <checkout>` (not
#      editable), then `jakiro demo` from another directory uses the installed package;
#   2. `pip wheel --no-build-isolation --no-deps` in .venv gives a wheel that installs into
#      that other venv and works there too.
# Both reuse the objects in build/ (only the link step runs again). CI runs this after the tests.
# JAKIRO_PIP_CHECK_DIR: where the venv and the wheel go (default: a temporary folder, removed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "check_pip_install: run scripts/setup.sh first" >&2; exit 1; }
WORK=${JAKIRO_PIP_CHECK_DIR:-$(mktemp -d)}
[ -n "${JAKIRO_PIP_CHECK_DIR:-}" ] || trap 'rm -rf "$WORK"' EXIT
pip() { "$1" -m pip --disable-pip-version-check "${@:2}"; }
say() { echo "check_pip_install: $*"; }
start=$(date +%s)

# The new venv sees .venv's packages (torch, the build tools, transformers, the data packages)
# through a .pth line instead of a 5 GB copy of torch: the same torch, so build/ is reused.
say "a new venv in $WORK/venv sharing .venv's torch and packages"
"$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$WORK/venv"
V=$WORK/venv/bin/python
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
  > "$("$V" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/jakiro-shared-venv.pth"
# What the README asks of a user's environment: the build tools (a new venv's own setuptools is
# too old on Python 3.11 and cannot build wheels).
"$PY" scripts/requirements.py build-tools > "$WORK/build-tools.txt"
pip "$V" install -q -r "$WORK/build-tools.txt"

say "pip install --no-build-isolation $ROOT"
pip "$V" install -q --no-build-isolation "$ROOT"
run_demo() {
  (cd / && "$WORK/venv/bin/jakiro" demo --questions 1 --max-new-tokens 24 --json) > "$WORK/demo.txt"
  tail -n 1 "$WORK/demo.txt"
  (cd / && "$V" -c "import jakiro, sys; sys.exit(not jakiro.__file__.startswith('$WORK/venv/'))") \
    || { echo "check_pip_install: jakiro was not imported from the new venv" >&2; exit 1; }
}
run_demo

say "pip wheel --no-build-isolation --no-deps in .venv, installed into the new venv"
pip "$PY" wheel -q --no-build-isolation --no-deps -w "$WORK/wheels" "$ROOT"
pip "$V" uninstall -q -y jakiro
pip "$V" install -q --no-deps "$WORK"/wheels/jakiro-*.whl
run_demo
say "both paths work ($(( $(date +%s) - start )) s)"
