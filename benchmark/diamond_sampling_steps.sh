#!/usr/bin/env bash
# DIAMOND's sampling-step ablation on this machine (the paper's Table 7 analogue, world model only): the same
# --world-model-only training budget and seed for every arm, then the world model's next-frame error on held-out
# transitions with 1, 3, 5 and 10 Euler steps. The number of sampling steps does not enter training, so the arms of a
# seed train the same denoiser and differ only in how it is sampled. Table: benchmark/plot.py (mean +- std over seeds).
# The paper (Table 7, agents on 10 games): 1 Euler step instead of 3 drops the mean HNS from 3.05 to 1.96.
#
#   bash benchmark/diamond_sampling_steps.sh                    # tiny networks on 32x32 frames, minutes on a CPU
#   SEEDS="1 2 3" EXTRA="--preset small --num-epochs 20" OUT=runs/steps bash benchmark/diamond_sampling_steps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/diamond_sampling_steps}
SEEDS=${SEEDS:-"1 2"}
EXTRA=${EXTRA:-"--preset tiny --diffusion-channels 16 16 16 --diffusion-cond-dim 32 --first-epoch-denoiser-steps 1500 --num-epochs 2 --denoiser-steps-per-epoch 300 --num-heldout-transitions 256"}
for seed in $SEEDS; do
  for k in 1 3 5 10; do
    # shellcheck disable=SC2086
    python diamond_atari.py --world-model-only $EXTRA --num-sampling-steps "$k" --seed "$seed" --exp-name "euler$k" \
      --output-dir "$OUT"
  done
done
python benchmark/plot.py "$OUT" --tag world_model/next_frame_mse_changed --tag world_model/copy_last_frame_mse_changed \
  --tag world_model/next_frame_mse --out-dir "$OUT/plots"
