#!/usr/bin/env bash
# diamond_atari.py at GPU speed, beside the paper: on one GPU, in at most 5 minutes, the denoiser, reward/end and
# actor-critic update times and the imagination step time (median of 8 after 2 warm-up calls, the compiling first
# call apart), the epoch time and the days for Atari 100k they imply, each beside the paper's RTX 4090 figures, in
# three rows, each hard-limited (150, 50, 50 s) and printed figure by figure: the fast path with the reference's
# settings (TF32, cudnn autotuning), eager with the same, eager with --torch-deterministic's settings. After the fast
# row: its compile counters (cudagraph skips are errors here) and a check, TF32 off, that its outputs match eager's
# from identical inputs (exit status 1 if not). Offline: the replay buffer holds random frames. The goals on one
# H100/H200: imagination step <= 10 ms (32 envs), actor-critic update <= 200 ms, epoch <= 130 s, Atari 100k <= 1.5 days.
#
#   bash benchmark/gpu_diamond.sh                       # prints the table; the log goes to benchmark/logs/
#   SPEED_ARGS="--device cpu --preset tiny --repeats 2 --warmup 1 --backend eager" bash benchmark/gpu_diamond.sh
#                                                       # the tests' smoke run on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${LOG:-benchmark/logs/gpu_diamond_$(date -u +%Y%m%d_%H%M).txt}
LIMIT=${LIMIT:-290}  # seconds: the whole check stays within 5 minutes (the rows' limits sum to 250)
export TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1  # a CUDA graph that inductor would skip is an error, not a slow fallback
mkdir -p "$(dirname "$LOG")"
# shellcheck disable=SC2086  # SPEED_ARGS is a list of flags
timeout "$LIMIT" "$PY" benchmark/diamond_speed.py ${SPEED_ARGS:-} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu_diamond.sh: stopped after $LIMIT s (the table above is incomplete)"
echo "gpu_diamond.sh: exit $status; log in $LOG"
exit "$status"
