#!/usr/bin/env bash
# The GPU check, kept for its command line: scripts/gpu_runbook.sh's env, build, tests and bench
# steps, with the whole test suite and the full benchmarks by default, and no deadline.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else gpu-results/)
#
# Environment: as scripts/gpu_runbook.sh (TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON, TEST_ARGS: default
# the whole suite, BENCH_ARGS: default the full benchmarks, e.g. --quick or --only NAME...).
export TEST_ARGS=${TEST_ARGS:-tests} BENCH_ARGS=${BENCH_ARGS:-}
exec bash "$(dirname "$0")/gpu_runbook.sh" --device cuda --steps env,build,tests,bench --out "${1:-${OUT:-gpu-results}}"
