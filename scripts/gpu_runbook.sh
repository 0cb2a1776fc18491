#!/usr/bin/env bash
# The GPU runbook: one command that, on a machine with a CUDA GPU and a preinstalled torch (no
# internet needed), builds jakiro for that GPU, runs the CUDA tests and every kernel benchmark,
# then runs `jakiro bench-e2e` on the real SmolLM2-135M-Instruct staged by scripts/stage_model.py,
# and writes a summary (markdown and JSON) to the output folder. docs/gpu-runbook.md says how it
# is run on the lent GPU (two calls, each carrying half of the model) and how to read the results.
#
#   bash scripts/gpu_runbook.sh [--device cuda|cpu] [--out DIR] [--steps LIST] [--deadline S] [--plan]
#
# --device cpu is the rehearsal without a GPU: the CUDA-only steps say so and are skipped (the
# build: the extension already built here is used; the tests: the CUDA paths run under
# FakeTensorMode instead), and the rest runs on tiny inputs (the staging of the real GGUF in two
# calls, its conversion, a one-prompt bench-e2e, two quick kernel benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STEPS="env stage build tests bench e2e e2e_compile"

usage() {
  cat <<'EOF'
usage: bash scripts/gpu_runbook.sh [--device cuda|cpu] [--out DIR] [--steps LIST] [--deadline S] [--plan]

Steps (in this order; --steps picks some, comma-separated; default: all):
  env          GPU, driver, Python, torch, compiler, commit -> the summary
  stage        collects the model parts this call carried (.stage/parts) into $JAKIRO_STAGE_DIR and,
               once all are there, joins and checks the GGUF (scripts/stage_model.py install)
  build        setup.py build_ext --inplace for TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (16)
  tests        pytest $TEST_ARGS (default: -m cuda tests; pytest-xdist with TEST_WORKERS=8 if present)
  bench        benchmarks/run_all.py $BENCH_ARGS (default: --quick)
  e2e          converts the staged GGUF once, then jakiro bench-e2e --device DEVICE $E2E_ARGS
  e2e_compile  the same with --compile (each cycle compiled; on CUDA captured as a CUDA graph)

Options:
  --device cuda|cpu   cuda (default) or the CPU rehearsal (CUDA-only steps skipped, tiny inputs)
  --out DIR           results: summary.md, summary.json, bench.json, e2e.json, e2e-compile.json,
                      logs.tar.gz (default: $OUT, else gpu-results)
  --deadline S        wall seconds for the whole run: a step that would not fit is skipped, and each
                      step's time is capped to what is left (default: 0, none)
  --plan              print what would run, and exit

Environment: PYTHON, TORCH_CUDA_ARCH_LIST, MAX_JOBS, TEST_ARGS, TEST_WORKERS, BENCH_ARGS, E2E_ARGS,
JAKIRO_STAGE_DIR (where the parts gather; default build/stage: kept between calls on a warm machine,
like the build; --device cpu: a temporary folder), JAKIRO_STAGE_SOURCE (what prepare wrote; .stage).
Exit status: 0 when no step failed (skipped and partial steps are not failures), 1 otherwise, 2 usage.
EOF
}

DEVICE=cuda
OUT_DIR=${OUT:-gpu-results}
STEPS=all
DEADLINE=0
PLAN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --out) OUT_DIR=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --out=*) OUT_DIR=${1#*=}; shift ;;
    --steps) STEPS=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --steps=*) STEPS=${1#*=}; shift ;;
    --deadline) DEADLINE=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --deadline=*) DEADLINE=${1#*=}; shift ;;
    --plan) PLAN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_runbook: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_runbook: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
case "$DEADLINE" in ''|*[!0-9]*) echo "gpu_runbook: --deadline must be whole seconds, got '$DEADLINE'" >&2; exit 2 ;; esac
[ -n "$OUT_DIR" ] || { echo "gpu_runbook: --out is empty" >&2; exit 2; }
[ "$STEPS" = all ] && STEPS=${ALL_STEPS// /,}
SELECTED=" "
for step in ${STEPS//,/ }; do
  case " $ALL_STEPS " in *" $step "*) SELECTED+="$step " ;;
    *) echo "gpu_runbook: unknown step '$step'; steps: $ALL_STEPS" >&2; exit 2 ;; esac
done
selected() { case "$SELECTED" in *" $1 "*) return 0 ;; esac; return 1; }

STAGE_SOURCE=${JAKIRO_STAGE_SOURCE:-.stage}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# What each step runs on each device (the defaults; the environment overrides them).
if [ "$DEVICE" = cuda ]; then
  TEST_ARGS=${TEST_ARGS-"-m cuda tests"}
  BENCH_ARGS=${BENCH_ARGS-"--quick"}
  E2E_ARGS=${E2E_ARGS-"--datasets mtbench,humaneval --limit 3 --max-new-tokens 128 --temperatures 0 --methods vanilla,hf-generate,eagle2,jakiro-mixture"}
  STAGE_DIR=${JAKIRO_STAGE_DIR:-build/stage}
else
  TEST_ARGS=${TEST_ARGS-"tests/test_fake_cuda.py"}
  BENCH_ARGS=${BENCH_ARGS-"--quick --only rms_norm rotary_embedding"}
  E2E_ARGS=${E2E_ARGS-"--datasets mtbench --limit 1 --max-new-tokens 8 --temperatures 0 --methods vanilla,jakiro-mixture --total-tokens 8"}
  STAGE_DIR=${JAKIRO_STAGE_DIR:-}      # default: a temporary folder, removed at the end
fi

if [ "$PLAN" = 1 ]; then
  echo "gpu_runbook plan: device=$DEVICE out=$OUT_DIR deadline=${DEADLINE}s python=$PY stage=${STAGE_DIR:-<temporary>}"
  for step in $ALL_STEPS; do
    selected "$step" || { echo "  $step: not selected"; continue; }
    case "$step" in
      env) echo "  env: nvidia-smi, python, torch, compiler, commit" ;;
      stage) echo "  stage: $PY scripts/stage_model.py install --stage $STAGE_SOURCE --stash ${STAGE_DIR:-<temporary>}$([ "$DEVICE" = cpu ] && echo ' (twice: part 1 alone, then all: the two calls rehearsed)')" ;;
      build) if [ "$DEVICE" = cuda ]; then echo "  build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} JAKIRO_CUDA=1 $PY setup.py -q build_ext --inplace"
             else echo "  build: CUDA only, skipped; checks that this checkout's extension imports"; fi ;;
      tests) echo "  tests: $PY -m pytest $TEST_ARGS" ;;
      bench) echo "  bench: $PY benchmarks/run_all.py --device $DEVICE $BENCH_ARGS" ;;
      e2e) echo "  e2e: resolve_target('smollm2') (converted once), then $PY -m jakiro.cli bench-e2e --device $DEVICE --target smollm2 $E2E_ARGS" ;;
      e2e_compile) echo "  e2e_compile: the e2e command with --compile (compiled cycles; CUDA graphs on CUDA)" ;;
    esac
  done
  exit 0
fi

mkdir -p "$OUT_DIR" || exit 1
OUT_DIR=$(cd "$OUT_DIR" && pwd)
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/jakiro-runbook.XXXXXX")
LOGS=$ROOT/logs
mkdir -p "$LOGS"
if [ -z "$STAGE_DIR" ]; then STAGE_DIR=$ROOT/stage; fi
mkdir -p "$STAGE_DIR" && STAGE_DIR=$(cd "$STAGE_DIR" && pwd)
# The logs travel in $OUT_DIR/logs.tar.gz; RUNBOOK_KEEP=1 keeps the folder (and a temporary stage).
cleanup() { [ "${RUNBOOK_KEEP:-0}" = 1 ] || rm -rf "$ROOT"; }
trap cleanup EXIT
rm -f "$OUT_DIR"/summary.md "$OUT_DIR"/summary.json "$OUT_DIR"/bench.json "$OUT_DIR"/e2e.json \
      "$OUT_DIR"/e2e-compile.json "$OUT_DIR"/logs.tar.gz
: > "$LOGS/steps.tsv"
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
RESERVE=20          # seconds kept for the summary when a deadline is set
STATUS=0
BUILD_OK=
SITE=

echo "gpu_runbook: device=$DEVICE, steps:$SELECTED, deadline=${DEADLINE}s, results in $OUT_DIR (logs: logs.tar.gz)"

# ------------------------------------------------------------------------------ helpers
LIMIT=0
limited() {   # runs "$@" within the current step's time cap (none without a deadline)
  if [ "$LIMIT" -gt 0 ]; then timeout -k 10 "$LIMIT" "$@"; else "$@"; fi
}

timed_out_note() { [ "$1" = 124 ] || [ "$1" = 137 ] && echo "timed out after ${LIMIT}s; "; }

render_summary() {
  "$PY" - "$OUT_DIR" "$LOGS" "$DEVICE" "$STARTED" "$SELECTED" <<'PYEOF' || echo "gpu_runbook: (the summary could not be written)"
import json, os, sys
out, logs, device, started, selected = sys.argv[1:6]
def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None
def load(path):
    text = read(path)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
steps = [dict(zip(("step", "status", "seconds", "note"), line.split("\t", 3)))
         for line in (read(os.path.join(logs, "steps.tsv")) or "").splitlines() if line.strip()]
for s in steps:
    s["seconds"] = int(s["seconds"])
env = read(os.path.join(logs, "env.txt")) or ""
md = [f"# jakiro GPU runbook: --device {device}, started {started}", ""]
md += ["```", env.strip(), "```", ""] if env.strip() else []
md += ["| step | status | seconds | note |", "|---|---|---|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s.get('note', '').strip().replace('|', '/')} |" for s in steps]
for title, name in (("End to end: jakiro bench-e2e", "e2e.md"), ("End to end with --compile", "e2e-compile.md")):
    table = read(os.path.join(logs, name))
    if table:
        md += ["", f"## {title}", "", table.strip()]
bench = read(os.path.join(logs, "bench.log"))
if bench:
    lines = [l for l in bench.splitlines() if l.startswith(("|", "=== ", "#"))]
    if lines:
        md += ["", "## Kernel benchmarks (median times; full numbers in bench.json)", ""] + lines
summary = {"device": device, "started": started, "steps_selected": selected.split(), "steps": steps,
           "env": env.strip().splitlines(), "e2e": load(os.path.join(out, "e2e.json")),
           "e2e_compile": load(os.path.join(out, "e2e-compile.json"))}
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(md) + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
PYEOF
  tar -czf "$OUT_DIR/logs.tar.gz" -C "$ROOT" logs 2>/dev/null
}

record() {   # record STEP STATUS SECONDS NOTE
  local note=${4//$'\t'/ }
  note=${note//$'\n'/ }
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$note" >> "$LOGS/steps.tsv"
  [ "$2" = FAILED ] && STATUS=1
  printf '%-12s %-8s %5ss  %s\n' "$1" "$2" "$3" "$note"
  render_summary
}

# run_step NAME MIN_SECONDS CAP_SECONDS: runs step_NAME unless the deadline leaves too little time.
run_step() {
  local name=$1 min=$2 cap=$3 left code start
  selected "$name" || return 0
  echo "== $name"
  if [ "$DEADLINE" -gt 0 ]; then
    left=$(( DEADLINE - SECONDS - RESERVE ))
    if [ "$left" -lt "$min" ]; then
      record "$name" SKIPPED 0 "deadline: ${left}s left, the step needs ~${min}s"
      return 0
    fi
    LIMIT=$(( cap < left ? cap : left ))
  else
    LIMIT=0
  fi
  NOTE=
  start=$SECONDS
  "step_$name"
  code=$?
  case $code in
    0) record "$name" OK $(( SECONDS - start )) "$NOTE" ;;
    2) record "$name" SKIPPED $(( SECONDS - start )) "$NOTE" ;;
    3) record "$name" PARTIAL $(( SECONDS - start )) "$NOTE" ;;
    *) record "$name" FAILED $(( SECONDS - start )) "$NOTE" ;;
  esac
}

check_build() {   # BUILD_OK=1 when jakiro imports (with CUDA kernels on --device cuda)
  local want=False
  [ "$DEVICE" = cuda ] && want=True
  if "$PY" -c "import jakiro, json, sys; info = jakiro.build_info(); print(json.dumps(info)); sys.exit(0 if info['cuda_compiled'] or not $want else 3)" \
      >> "$LOGS/build.log" 2>&1; then
    BUILD_OK=1
  else
    BUILD_OK=
  fi
}

# -------------------------------------------------------------------------------- steps
step_env() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  host: $(uname -srm), $(nproc) cores"
    if [ "$DEVICE" = cuda ]; then
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    else
      echo "gpu: none (--device cpu: the rehearsal)"
    fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    echo "compiler: $(${CXX:-c++} --version 2>/dev/null | head -1)  nvcc: $(nvcc --version 2>/dev/null | tail -1)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || cat "$STAGE_SOURCE/common/commit" 2>/dev/null || echo unknown)"
  } > "$LOGS/env.txt" 2>&1
  [ "$DEVICE" = cuda ] && nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1
  cat "$LOGS/env.txt"
  NOTE=$(grep -m1 '^gpu:' "$LOGS/env.txt" | cut -c6-)
  return 0
}

stage_install() {   # stage_install [--only N]: exit status of stage_model.py install
  limited "$PY" scripts/stage_model.py install --stage "$STAGE_SOURCE" --stash "$STAGE_DIR" "$@" >> "$LOGS/stage.log" 2>&1
}

step_stage() {
  local code
  if [ ! -f "$STAGE_SOURCE/common/manifest.json" ]; then
    if [ "$DEVICE" = cuda ]; then
      NOTE="no $STAGE_SOURCE/common/manifest.json: run scripts/stage_model.py prepare before the calls, and carry $STAGE_SOURCE/common and one part in each"
      return 1
    fi
    echo "stage: no $STAGE_SOURCE here: scripts/stage_model.py prepare (what runs here before the GPU calls)"
    limited "$PY" scripts/stage_model.py prepare --stage "$STAGE_SOURCE" >> "$LOGS/stage.log" 2>&1 || { NOTE="prepare failed: $(tail -1 "$LOGS/stage.log")"; return 1; }
  fi
  if [ "$DEVICE" = cpu ]; then
    # The two calls rehearsed: the first carries part 1 only (the stash then lacks the rest), the next the rest.
    stage_install --only 1; code=$?
    [ "$code" = 3 ] || { NOTE="rehearsal of the first call: expected 'parts still missing' (3), got $code"; tail -5 "$LOGS/stage.log"; return 1; }
  fi
  stage_install; code=$?
  tail -4 "$LOGS/stage.log"
  case $code in
    0) SITE=$(grep '^site: ' "$LOGS/stage.log" | tail -1 | cut -c7-); NOTE="GGUF joined and checked: $SITE"; return 0 ;;
    3) NOTE="$(grep '^stage: still missing' "$LOGS/stage.log" | tail -1 | cut -c8-)"; return 3 ;;
    *) NOTE="$(timed_out_note $code)$(tail -1 "$LOGS/stage.log")"; return 1 ;;
  esac
}

step_build() {
  local code
  if [ "$DEVICE" = cpu ]; then
    check_build
    if [ -n "$BUILD_OK" ]; then
      NOTE="CUDA only (sm_90 build_ext), skipped: this checkout's extension imports"
      echo "build: skipped: CUDA only; the extension already built here imports"
      return 2
    fi
    NOTE="CUDA only, skipped; and this checkout's extension does not import (bash scripts/setup.sh)"
    return 1
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} JAKIRO_CUDA=1
  # The GPU image points CC/CXX at /opt/gcc/bin wrappers whose links embed a private static
  # libstdc++ in the module; its iostreams then crash the process when an error message formats
  # an integer. Use the system compilers instead.
  if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
  limited "$PY" setup.py -q build_ext --inplace > "$LOGS/build.log" 2>&1; code=$?
  if [ "$code" != 0 ]; then
    tail -30 "$LOGS/build.log"
    NOTE="$(timed_out_note $code)build failed (logs.tar.gz: logs/build.log)"
    return 1
  fi
  check_build
  [ -n "$BUILD_OK" ] || { NOTE="built, but jakiro does not import with CUDA kernels"; tail -5 "$LOGS/build.log"; return 1; }
  NOTE="sm_${TORCH_CUDA_ARCH_LIST//./} ($TORCH_CUDA_ARCH_LIST), MAX_JOBS=$MAX_JOBS"
  return 0
}

need_build() {
  [ -n "$BUILD_OK" ] || check_build
  [ -n "$BUILD_OK" ] && return 0
  NOTE="no usable build (the build step failed or did not run)"
  return 1
}

step_tests() {
  local code workers=() summary
  need_build || return 2
  if [ "$DEVICE" = cpu ]; then
    echo "tests: the CUDA tests need a GPU; --device cpu runs the CUDA paths under FakeTensorMode ($TEST_ARGS)"
  elif "$PY" -c "import xdist" 2>/dev/null && [ "${TEST_WORKERS:-8}" -gt 1 ]; then
    workers=(-n "${TEST_WORKERS:-8}")
  fi
  # shellcheck disable=SC2086  # TEST_ARGS is a list of pytest arguments
  limited "$PY" -m pytest -q -rfE -p no:cacheprovider --continue-on-collection-errors "${workers[@]}" $TEST_ARGS \
    > "$LOGS/tests.log" 2>&1; code=$?
  grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -30
  summary=$(grep -E "(passed|failed|error|skipped|deselected)" "$LOGS/tests.log" | tail -1 | tr -d '=' | sed 's/^ *//')
  echo "tests: $summary"
  NOTE="$(timed_out_note $code)$([ "$DEVICE" = cpu ] && echo 'FakeTensorMode, no GPU: ')${summary:-no summary line (logs/tests.log)}"
  [ "$code" = 0 ] && return 0
  return 1
}

step_bench() {
  local code failed
  need_build || return 2
  [ "$DEVICE" = cpu ] && echo "bench: --device cpu runs two quick CPU benchmarks ($BENCH_ARGS)"
  # shellcheck disable=SC2086
  limited "$PY" benchmarks/run_all.py --device "$DEVICE" --out "$LOGS/bench" $BENCH_ARGS > "$LOGS/bench.log" 2>&1; code=$?
  cp "$LOGS/bench/all.json" "$OUT_DIR/bench.json" 2>/dev/null
  grep -E "^(=== |\(bench_|bench_.*FAILED)" "$LOGS/bench.log"
  failed=$(grep -m1 "^benchmarks that failed" "$LOGS/bench.log")
  NOTE="$(timed_out_note $code)$(grep -c '^=== ' "$LOGS/bench.log") benchmarks ($BENCH_ARGS)${failed:+; $failed}"
  [ "$code" = 0 ] && return 0
  return 1
}

stage_site() {   # the staged site folder, when the stash holds the joined GGUF
  if [ -z "$SITE" ] && "$PY" scripts/stage_model.py status "$STAGE_DIR/parts" > /dev/null 2>&1 \
      && [ -d "$STAGE_DIR/site" ]; then
    SITE=$(cd "$STAGE_DIR/site" && pwd)
  fi
  [ -n "$SITE" ]
}

E2E_FLAGS=()
e2e_run() {   # e2e_run JSON MARKDOWN LOG [extra bench-e2e options]: converts once, then runs bench-e2e
  local json=$1 markdown=$2 log=$3 code
  shift 3
  export JAKIRO_CACHE=$STAGE_DIR/cache
  export PYTHONPATH="$PWD:$SITE"
  {
    echo "+ convert (once): resolve_target('smollm2') with JAKIRO_CACHE=$JAKIRO_CACHE"
    limited "$PY" -c "
import importlib.metadata, time, gguf
from jakiro.pretrained import resolve_target
print('gguf', importlib.metadata.version('gguf'), 'from', gguf.__file__)
start = time.time()
print(resolve_target('smollm2'), f'ready in {time.time() - start:.1f} s')"
  } >> "$log" 2>&1 || { NOTE="$(timed_out_note $?)conversion of the staged GGUF failed: $(tail -1 "$log")"; return 1; }
  E2E_FLAGS=(--json "$json" --markdown "$markdown")
  "$PY" -m jakiro.cli bench-e2e --help 2>/dev/null | grep -q -- "--no-progress" && E2E_FLAGS+=(--no-progress)
  echo "+ $PY -m jakiro.cli bench-e2e --device $DEVICE --target smollm2 $E2E_ARGS $* ${E2E_FLAGS[*]}" >> "$log"
  # shellcheck disable=SC2086
  limited "$PY" -m jakiro.cli bench-e2e --device "$DEVICE" --target smollm2 $E2E_ARGS "$@" "${E2E_FLAGS[@]}" \
    >> "$log" 2>&1; code=$?
  grep -E "^(\[jakiro\]|\||jakiro)" "$log" | grep -v "^\[jakiro\] convert" | tail -25
  if [ "$code" != 0 ]; then
    NOTE="$(timed_out_note $code)bench-e2e failed: $(grep -v '^\s*$' "$log" | tail -1)"
    return 1
  fi
  NOTE="$(grep -m1 '^\[jakiro\] .*total_tokens' "$log" | cut -c10-)"
  return 0
}

step_e2e() {
  need_build || return 2
  stage_site || { NOTE="the staged model is not complete here (stage step: carry the missing part, then rerun with --steps stage,e2e)"; return 2; }
  [ "$DEVICE" = cpu ] && echo "e2e: --device cpu: one MT-bench prompt, 8 new tokens"
  e2e_run "$OUT_DIR/e2e.json" "$LOGS/e2e.md" "$LOGS/e2e.log"
}

step_e2e_compile() {
  need_build || return 2
  if ! "$PY" -m jakiro.cli bench-e2e --help 2>/dev/null | grep -q -- "--compile"; then
    NOTE="this checkout's bench-e2e has no --compile option"
    echo "e2e_compile: skipped: $NOTE"
    return 2
  fi
  stage_site || { NOTE="the staged model is not complete here"; return 2; }
  if [ "$LIMIT" -gt 0 ] && [ "$LIMIT" -lt 60 ]; then NOTE="deadline: ${LIMIT}s left, the step needs ~60s"; return 2; fi
  # Two methods (each compiles once per prompt-length bucket, untimed: the report's compile_s).
  e2e_run "$OUT_DIR/e2e-compile.json" "$LOGS/e2e-compile.md" "$LOGS/e2e-compile.log" --compile \
    --methods vanilla,jakiro-mixture
}

# ---------------------------------------------------------------------------- the run
#        name        min  cap (seconds; the cap applies only under a deadline)
run_step env           5   30
run_step stage        10  120
run_step build        60  330
run_step tests        30  240
run_step bench        30  240
run_step e2e          60  330
run_step e2e_compile  60  330

render_summary
echo
echo "== summary ($OUT_DIR/summary.md)"
sed -n '/^| step /,/^$/p' "$OUT_DIR/summary.md" 2>/dev/null
for name in e2e.md e2e-compile.md; do
  [ -f "$LOGS/$name" ] && { echo; cat "$LOGS/$name"; }
done
echo
echo "gpu_runbook: $([ "$STATUS" = 0 ] && echo 'no step failed' || echo 'some step FAILED'); took ${SECONDS}s; results: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
exit $STATUS
