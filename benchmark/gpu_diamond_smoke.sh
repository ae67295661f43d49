#!/usr/bin/env bash
# DIAMOND end to end on one GPU with the paper's networks, after gpu_diamond.sh if the lease has time left: Breakout
# (the ALE, offline), reduced update counts, in at most 5 minutes. Epoch 1 (collection, the three trainers, the
# imagination as CUDA graphs, its default on CUDA, and an evaluation with the imagined-vs-real diagnostic), a
# checkpoint; then a resume that trains epoch 2 and plays the test episodes. Each part is hard-limited.
#
#   bash benchmark/gpu_diamond_smoke.sh                                  # runs under runs/gpu_diamond_smoke
#   EXTRA="--preset tiny --no-cuda" bash benchmark/gpu_diamond_smoke.sh  # the tests' run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_diamond_smoke}
PY=${PYTHON:-python}
EXTRA=${EXTRA:-}
start=$SECONDS
# shellcheck disable=SC2086  # EXTRA is a list of flags
timeout "${LIMIT_EPOCH:-200}" "$PY" diamond_atari.py --env-id Breakout-v5 --num-sampling-steps 3 --num-epochs 1 \
  --initial-collection-steps 1000 --max-initial-collection-steps 2000 --min-rare-rewards 1 --env-step-budget 3000 \
  --first-epoch-denoiser-steps 100 --first-epoch-reward-steps 100 --first-epoch-actor-critic-steps 50 \
  --denoiser-steps-per-epoch 50 --reward-steps-per-epoch 50 --actor-critic-steps-per-epoch 50 \
  --eval-every 1 --eval-episodes 1 --test-episodes 2 --exp-name gpu --output-dir "$OUT" $EXTRA 2>&1 \
  | tr '\r' '\n' | grep -E 'error|Error|notice|estimated|graphs|epoch [0-9]+/|saved|test episodes|done after'
first=${PIPESTATUS[0]}
echo "gpu_diamond_smoke.sh: epoch 1 exit $first after $((SECONDS - start)) s"
run_dir=$(ls -td "$OUT"/*/ 2>/dev/null | head -n 1)  # the newest: the run epoch 1 just made (OUT may hold older ones)
[ "$first" = 0 ] && [ -n "$run_dir" ] || { echo "gpu_diamond_smoke.sh: exit 1"; exit 1; }
timeout "${LIMIT_RESUME:-100}" "$PY" diamond_atari.py --resume "$run_dir" --num-epochs 2 2>&1 \
  | tr '\r' '\n' | grep -E 'error|Error|notice|resuming|graphs|epoch [0-9]+/|saved|test episodes|done after'
second=${PIPESTATUS[0]}
echo "gpu_diamond_smoke.sh: resume exit $second after $((SECONDS - start)) s"
echo "gpu_diamond_smoke.sh: exit $second"
exit "$second"
