#!/usr/bin/env bash
# Controllability of video_diffusion.py after a fixed CPU budget: the sprites world at 8x8 (a 2x2 square, 6 frames),
# the tiny network, a few thousand steps per seed (2 to 6 steps/s on one core: 8 to 25 minutes for 3000 steps),
# seeds in parallel. At every evaluation the script measures, from its own samples: does the sprite move where the
# caption alone says, where the actions alone say (eval/*_direction_accuracy; *_swapped: another clip's command from this clip's first frame, chance
# 0.25), and how much closer multi-step rollouts from real frames are to the real clip with the true actions than with
# shuffled ones (eval/action_control_dpsnr, dB). The table (mean +- std over seeds): benchmark/plot.py.
#
#   bash benchmark/video_control.sh                         # 2 seeds x 3000 steps, 2 processes at once
#   SEEDS="1 2 3 4" STEPS=6000 bash benchmark/video_control.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/video_control}
SEEDS=${SEEDS:-"1 2"}
STEPS=${STEPS:-3000}
mkdir -p "$OUT"
for seed in $SEEDS; do
  OMP_NUM_THREADS=1 python video_diffusion.py --preset tiny --img-size 8 --num-frames 6 --num-distractors 0 \
    --num-sprite-clips 2048 --batch-size 32 --learning-rate 1e-3 --context-frames 3 --cfg-scale 3 \
    --cond-drop-prob 0.5 --null-cond-prob 0.1 --total-steps "$STEPS" --eval-every 1000 --save-every 1000 \
    --log-every 100 --num-eval-samples 128 --sample-batch-size 128 --long-video-frames 6 --seed "$seed" \
    --exp-name control --output-dir "$OUT" > "$OUT.seed$seed.log" 2>&1 &
done
wait
python benchmark/plot.py "$OUT" --tag eval/text_direction_accuracy_swapped --tag eval/text_direction_accuracy \
  --tag eval/action_direction_accuracy_swapped --tag eval/action_direction_accuracy --tag eval/action_control_dpsnr \
  --tag eval/psnr_true_actions --tag eval/psnr_copy_last --out-dir "$OUT/plots"
