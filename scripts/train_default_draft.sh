#!/usr/bin/env bash
# The draft recipe for SmolLM2-135M-Instruct (TRAINING.md has the numbers and the knobs that
# reproduce the shipped drafts):
#   1. N_PROMPTS first user turns of ShareGPT (seeded, distinct, <= 1500 characters), which
#      `jakiro datagen --regenerate` has SmolLM2 answer itself (greedy, bf16, <= 256 tokens);
#   2. the next N_SHAREGPT records of the same seeded order with ShareGPT's own first answer
#      (no generation: one target pass each, so ten times more data for the same time);
#   3. features of every conversation in bf16 (one folder per source), with the residual streams
#      of FEATURE_LAYERS before the last layer's (EAGLE-3's multi-layer features);
#   4. `jakiro train` of the Jakiro draft and of the EAGLE-2 configuration on both folders, with
#      the same steps, batch, learning rate, loss vocabulary and training-time-test passes, side
#      by side (one thread each on a CPU), HELD_OUT conversations scored every EVAL_EVERY steps
#      (the final draft is the best-scoring one; PATIENCE scores without a new best stop a run);
#   5. the trained drafts (bfloat16) and their data's token counts go into jakiro/drafts/ (SHIP=1).
# Usage: scripts/train_default_draft.sh [OUT]   (default runs/smollm2; reruns resume)
# Knobs: N_PROMPTS (600), N_SHAREGPT (4000), STEPS (8400), BATCH (4), LR (5e-4),
#        LOSS_VOCAB (8192; 0: the whole vocabulary), ROUNDS (2), TRAIN_LEN (512: tokens of a
#        conversation trained on), JAKIRO_CONFIG (extra `--draft-config KEY=VALUE` of the Jakiro
#        draft, space-separated, e.g. "expert_intermediate_size=768"; default none: the authors'
#        shape), FEATURE_LAYERS (auto: EAGLE-3's; none: the last layer's only), HELD_OUT (200; 0:
#        none), EVAL_EVERY (400), PATIENCE (3; 0: never stop early), DEVICE (cpu), SHIP (0),
#        ONLY_DATA (0; 1: stop after the features).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/smollm2}
N_PROMPTS=${N_PROMPTS:-600}
N_SHAREGPT=${N_SHAREGPT:-4000}
STEPS=${STEPS:-8400}
BATCH=${BATCH:-4}
LR=${LR:-5e-4}
LOSS_VOCAB=${LOSS_VOCAB:-8192}
ROUNDS=${ROUNDS:-2}
TRAIN_LEN=${TRAIN_LEN:-512}
JAKIRO_CONFIG=${JAKIRO_CONFIG:-}
FEATURE_LAYERS=${FEATURE_LAYERS:-auto}
HELD_OUT=${HELD_OUT:-200}
EVAL_EVERY=${EVAL_EVERY:-400}
PATIENCE=${PATIENCE:-3}
DEVICE=${DEVICE:-cpu}
PY=${PY:-python3}
mkdir -p "$OUT"

"$PY" - "$OUT" "$N_PROMPTS" "$N_SHAREGPT" <<'PY'
import json, os, sys
from jakiro.commands.prompts import sharegpt_first_exchanges, sharegpt_first_turns
out, prompts, exchanges = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(os.path.join(out, "prompts.jsonl"), "w") as f:
    for prompt in sharegpt_first_turns(prompts, seed=0, max_chars=1500):
        f.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": ""}]}) + "\n")
with open(os.path.join(out, "exchanges.jsonl"), "w") as f:
    for messages in sharegpt_first_exchanges(exchanges, seed=0, skip=prompts, max_chars=1500):
        f.write(json.dumps({"messages": messages}) + "\n")
PY

"$PY" -m jakiro.cli datagen --data "$OUT/prompts.jsonl" --format jsonl --out "$OUT/features" --regenerate \
  --max-new-tokens 256 --batch-size 32 --dtype bfloat16 --max-len 1024 --per-shard 200 --device "$DEVICE" \
  --feature-layers "$FEATURE_LAYERS"
"$PY" -m jakiro.cli datagen --data "$OUT/exchanges.jsonl" --format jsonl --out "$OUT/features-sharegpt" \
  --dtype bfloat16 --max-len 1024 --per-shard 250 --device "$DEVICE" --feature-layers "$FEATURE_LAYERS"

if [ "${ONLY_DATA:-0}" = 1 ]; then
  echo "features written under $OUT (ONLY_DATA=1: no training)"
  exit 0
fi

train() {  # name, extra flags
  local name=$1; shift
  local resume=()
  [ -d "$OUT/$name/checkpoints" ] && resume=(--resume)
  local vocab=()
  [ "$LOSS_VOCAB" != 0 ] && vocab=(--loss-vocab "$LOSS_VOCAB")
  local held_out=()
  [ "$HELD_OUT" != 0 ] && held_out=(--held-out "$HELD_OUT" --eval-every "$EVAL_EVERY" --patience "$PATIENCE")
  OMP_NUM_THREADS=1 "$PY" -m jakiro.cli train --data "$OUT/features" "$OUT/features-sharegpt" --out "$OUT/$name" \
    --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --warmup-steps 100 --max-len "$TRAIN_LEN" --precision bf16 \
    --rounds "$ROUNDS" --checkpoint-every 200 "${vocab[@]}" \
    "${held_out[@]}" \
    --device "$DEVICE" --no-progress "${resume[@]}" "$@" > "$OUT/$name.log" 2>&1
}
start=$(date +%s)
jakiro_config=()
for pair in $JAKIRO_CONFIG; do jakiro_config+=(--draft-config "$pair"); done
train jakiro "${jakiro_config[@]}" & jakiro_pid=$!
train eagle2 --eagle2 & eagle2_pid=$!
wait $jakiro_pid && wait $eagle2_pid
echo "train: both drafts in $(( $(date +%s) - start )) s (logs: $OUT/jakiro.log, $OUT/eagle2.log)"

if [ "${SHIP:-0}" = 1 ]; then
  # Shipped in bfloat16 (the dtype the commands draft in on a CPU): half the bytes in the package.
  for name in jakiro eagle2; do
    "$PY" - "$OUT/$name/draft" "jakiro/drafts/smollm2-135m-instruct-$name" <<'PY'
import os, shutil, sys, torch
from safetensors.torch import load_file, save_file
source, dest = sys.argv[1:]
os.makedirs(dest, exist_ok=True)
weights = load_file(os.path.join(source, "model.safetensors"))
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, os.path.join(dest, "model.safetensors"))
counts = load_file(os.path.join(source, "token_counts.safetensors"))["counts"]
save_file({"counts": counts}, os.path.join(dest, "token_counts.safetensors"))
shutil.copyfile(os.path.join(source, "config.json"), os.path.join(dest, "config.json"))
PY
  done
  echo "shipped into jakiro/drafts/"
fi
