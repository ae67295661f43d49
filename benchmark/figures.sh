#!/usr/bin/env bash
# The README's pictures of DIAMOND and of the video model (docs/figures/), each copied from a run made here, on one
# CPU thread:
#   - diamond_catch_rollout.png: DIAMOND's imagined-vs-real strip (samples/rollout_epochNNNNN.png: real frames on top,
#     the world model's open-loop imagination below, each column headed by the action taken into it) after the catch
#     preset's first epoch on bsuite's Catch (1,000 denoiser updates);
#   - video_cpu_step2000.png: the video cpu preset's last samples (samples/step00002000.png: 8 generated clips, one
#     row each, named by the caption it was asked for).
#
#   bash benchmark/figures.sh                                   # both (35 minutes on one busy CPU core)
#   DIAMOND="--env-id Catch --preset tiny --num-epochs 1" VIDEO="--preset tiny --total-steps 2" FIGURES=/tmp/f \
#     bash benchmark/figures.sh                                 # the same commands at tiny sizes (tests/test_benchmark.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
FIGURES=${FIGURES:-docs/figures}
OUT=${OUT:-runs/figures}
DIAMOND=${DIAMOND:-"--env-id Catch --preset catch --num-epochs 1"}
VIDEO=${VIDEO:-"--preset cpu"}
export OMP_NUM_THREADS=1
rm -rf "$OUT"
mkdir -p "$OUT" "$FIGURES"
# shellcheck disable=SC2086
"$PY" diamond_atari.py $DIAMOND --no-cuda --exp-name figure --output-dir "$OUT/diamond" > "$OUT/diamond.log" 2>&1
cp "$(ls "$OUT"/diamond/*/samples/rollout_epoch*.png | tail -1)" "$FIGURES/diamond_catch_rollout.png"
# shellcheck disable=SC2086
"$PY" video_diffusion.py $VIDEO --no-cuda --exp-name figure --output-dir "$OUT/video" > "$OUT/video.log" 2>&1
cp "$(ls "$OUT"/video/*/samples/step*.png | tail -1)" "$FIGURES/video_cpu_step2000.png"
ls -l "$FIGURES/diamond_catch_rollout.png" "$FIGURES/video_cpu_step2000.png"
