#!/usr/bin/env bash
# One-command GPU check for a machine with a CUDA GPU and a preinstalled torch
# (no internet needed): builds the extension for that GPU, runs the whole test
# suite (CUDA tests included) and every benchmark, and writes logs and JSON to
# the output folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else gpu-results/)
#
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 16),
# PYTHON (default python3), BENCH_ARGS (extra benchmark options, e.g. --quick or
# --only NAME...), TEST_ARGS (pytest selection, default: the whole suite).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} JAKIRO_CUDA=1
# The GPU image points CC/CXX at /opt/gcc/bin wrappers whose links embed a
# private static libstdc++ in the module; its iostreams then crash the process
# when an error message formats an integer. Use the system compilers instead.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

{ date -u; nvidia-smi; echo "CXX=${CXX:-}"; "${CXX:-c++}" --version | head -1; "$PY" -c "import torch, sys; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
  > "$OUT_DIR/env.txt" 2>&1

echo "== build"
start=$(date +%s)
if ! "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  tail -50 "$OUT_DIR/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
"$PY" -c "import jakiro, json; print(json.dumps(jakiro.build_info()))" | tee -a "$OUT_DIR/env.txt"

echo "== tests"
"$PY" -m pytest -q -rfE -p no:cacheprovider ${TEST_ARGS:-tests} > "$OUT_DIR/pytest.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest.log" | head -40
tail -3 "$OUT_DIR/pytest.log"

echo "== benchmarks"
# per-benchmark JSON stays in a temp folder; all.json gathers it for $OUT_DIR
BENCH_TMP=$(mktemp -d)
"$PY" benchmarks/run_all.py --device cuda --out "$BENCH_TMP" ${BENCH_ARGS:-} > "$OUT_DIR/bench.log" 2>&1 || status=1
cp "$BENCH_TMP/all.json" "$OUT_DIR/bench.json" 2>/dev/null
grep -vE "^results:" "$OUT_DIR/bench.log" | tail -60
exit $status
