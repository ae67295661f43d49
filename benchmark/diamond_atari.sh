#!/usr/bin/env bash
# DIAMOND on the 26 Atari 100k games x 5 seeds, then mean human-normalised score and IQM as the paper computes them.
#
# Should reproduce (DIAMOND, Alonso et al. 2024, arXiv 2405.12399, Table 1):
#   mean HNS 1.46 (mean of the 26 per-game means), IQM 0.64 (over all 130 runs), superhuman on 11 games;
#   e.g. Breakout 132.5 (81 to 200 across seeds), Boxing 86.9, Pong 20.4, Krull 8610.1.
#   benchmark/atari_scores.py prints the paper's per-game scores beside yours.
# Cost (paper): about 2.9 days per game and seed on one RTX 4090, 12 GB of GPU memory: 130 runs = 377 GPU-days.
# Measured here (benchmark/RESULTS.md, section 0): about 6 days per run on one H100 at the eager rates; the
# actor-critic's imagination is launch-bound, so try --compile first and check perf/* in TensorBoard.
# Several runs share a large GPU well (each is small); --workers sets how many run at once, spread over the GPUs
# listed in CUDA_VISIBLE_DEVICES.
#
#   WORKERS=8 bash benchmark/diamond_atari.sh                 # all 130 runs on this machine
#   GAMES=Breakout,Pong SEEDS=1-3 bash benchmark/diamond_atari.sh
#   Re-running continues: finished runs are skipped, interrupted ones resumed from their checkpoints.
#
# On a SLURM cluster instead (one array task per run):
#   python benchmark/run_atari100k.py --print-commands > benchmark/atari100k_jobs.txt     # 130 lines
#   sbatch --array=1-130%32 --gres=gpu:1 --cpus-per-task=4 --time=3-12:00:00 \
#     --wrap 'eval "$(sed -n "${SLURM_ARRAY_TASK_ID}p" benchmark/atari100k_jobs.txt)"'
#   (a task that hits its time limit is continued by running the same line again: regenerate the file first so that
#    it says --resume for the runs that have a checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/atari100k}
# --no-torch-deterministic: imagination runs 1.8x faster on an H100 without it (benchmark/RESULTS.md, section 0);
# bitwise-exact resume is a CPU promise anyway.
python benchmark/run_atari100k.py --games "${GAMES:-all}" --seeds "${SEEDS:-1-5}" --workers "${WORKERS:-4}" \
  --output-dir "$OUT" -- --num-sampling-steps 3 --no-torch-deterministic
python benchmark/atari_scores.py "$OUT" --bootstrap 2000 --out "$OUT/scores.md"
python benchmark/plot.py "$OUT" --tag eval/episodic_return --tag eval/human_normalized_score --out-dir "$OUT/plots"
