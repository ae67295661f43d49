#!/usr/bin/env bash
# Does diamond_atari.py learn? Its whole loop (collection, denoiser, reward/end model, actor-critic in imagination,
# test episodes) at CPU scale (--preset cpu) on two ALE games with the same settings, 2 seeds each, the 4 runs at once
# on 2 shared CPU cores within a 50-minute budget; then a random policy and the best single repeated action under the
# same protocol and episode cap (benchmark/diamond_baselines.py), and the agent's pooled test returns beside them with
# 95% confidence intervals. Results: benchmark/RESULTS.md, section "DIAMOND learns".
#
# Why these settings (--preset cpu, diamond_atari.py's PRESETS), from a timed epoch on this 2-core machine:
#   - 32x32 frames: the U-Net's cost goes with the pixel count (64x64 is 4x); Boxing's boxers and Breakout's paddle
#     and bricks stay visible, Breakout's ball becomes a faint blob of a pixel or two (the hard part at this size).
#   - denoiser 16 channels x 3 levels, 1 res block, no autoregressive step, 1 Euler step when imagining (the paper's
#     Table 7: 1 step still learns, Boxing 41.9 vs 86.9): at batch 16 on one core at load 4 a denoiser step took
#     0.3 s and an actor-critic update (16 imagined envs x 8 steps) 1.4 s; with 32 channels, 2 predictions and 3
#     Euler steps they took 1 s and 6 s.
#   - reward/end model 8 channels, LSTM 64, 12-frame segments (horizon 8 + 4 conditioning frames).
#   - actor-critic: 16 imagined envs, horizon 8 (= backup_every), lambda-returns as the paper; lr 1e-3 everywhere
#     (the paper's 1e-4 is for 1000 epochs).
#   - 20 epochs: epoch 1 collects N >= 1000 random-policy env steps (more until 10 rare rewards, at most 2000) and
#     trains 300/200/40 updates; each later epoch collects 100 env steps with the agent and trains 60/30/15:
#     1440 denoiser, 770 reward/end and 325 actor-critic updates, 3000 to 3900 env steps. At half the timed rates
#     (4 runs on 2 cores) that is about 47 minutes. The machine is shared and the runs are niced: when other work
#     leaves them less, BUDGET_SECONDS stops them and their agents are tested as they are (the log says after which
#     epoch; benchmark/RESULTS.md reports how far the measured runs got).
#   - episodes capped at 500 agent steps (2000 frames; train, eval and test games alike, and the baselines): 100
#     test games per run of Boxing's 1780-step rounds would not fit; Breakout's random games are about 170 steps.
#   - test: 100 full games per run (life loss does not end them), epsilon 0: 200 pooled test games per game.
#
#   bash benchmark/diamond_learns.sh                                   # the measurement (about an hour)
#   GAMES="Pong-v5" SEEDS="1 2 3" bash benchmark/diamond_learns.sh     # other games or seeds
#   PRESET=tiny MAX_EPISODE_STEPS=30 BASELINE_EPISODES=2 SCREEN_EPISODES=1 EXTRA="--num-epochs 1" ...
#                                                 # the whole pipeline in seconds (tests/test_benchmark.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
GAMES=${GAMES:-"Breakout-v5 Boxing-v5"}
SEEDS=${SEEDS:-"1 2"}
OUT=${OUT:-benchmark/out/diamond_learns}
LOGS=${LOGS:-benchmark/logs}
PRESET=${PRESET:-cpu}
EXTRA=${EXTRA:-}
MAX_EPISODE_STEPS=${MAX_EPISODE_STEPS:-500}
BASELINE_EPISODES=${BASELINE_EPISODES:-100}
SCREEN_EPISODES=${SCREEN_EPISODES:-3}
NICE=${NICE:-10}  # the machine is shared: the runs yield to other work
BUDGET_SECONDS=${BUDGET_SECONDS:-3000}  # 50 minutes for the 4 runs together, then the test games
mkdir -p "$OUT" "$LOGS"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
pids=()
for game in $GAMES; do
  for seed in $SEEDS; do
    # shellcheck disable=SC2086
    nice -n "$NICE" "$PY" diamond_atari.py --preset "$PRESET" --env-id "$game" --seed "$seed" --no-cuda \
      --max-episode-steps "$MAX_EPISODE_STEPS" --output-dir "$OUT" $EXTRA \
      > "$LOGS/diamond_learns_${game}_${seed}.log" 2>&1 &
    pids+=($!)
  done
done
# The wall-clock budget: runs still going after it are stopped (SIGTERM: each saves its checkpoint and exits 0) and
# their agent as it then is plays the same test games with --eval-only (its output appended to the run's log).
deadline=$(( $(date +%s) + BUDGET_SECONDS ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 1 ] || break
  sleep 1
done
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
[ "$status" = 0 ] || { echo "a run failed: see $LOGS/diamond_learns_*.log" >&2; exit 1; }
tests=()
for log in "$LOGS"/diamond_learns_*_*.log; do
  run_dir=$(sed -n 's/^stopped after [0-9.]* s: //p' "$log" | tail -1)
  [ -n "$run_dir" ] && ! grep -q "test episodes after" "$log" || continue
  echo "$log: stopped by the budget; testing its agent with --eval-only"
  nice -n "$NICE" "$PY" diamond_atari.py --resume "$run_dir" --eval-only >> "$log" 2>&1 &
  tests+=($!)
done
for pid in "${tests[@]}"; do wait "$pid" || { echo "an --eval-only test failed: see $LOGS" >&2; exit 1; }; done
# the baselines under the same protocol and cap, then the table and the curves
# shellcheck disable=SC2086
nice -n "$NICE" "$PY" benchmark/diamond_baselines.py --games $GAMES --episodes "$BASELINE_EPISODES" \
  --screen-episodes "$SCREEN_EPISODES" --max-episode-steps "$MAX_EPISODE_STEPS" --out "$OUT/baselines.json" \
  | tee "$LOGS/diamond_learns_baselines.txt"
"$PY" benchmark/diamond_baselines.py --summarize "$OUT" --baselines "$OUT/baselines.json" --logs "$LOGS" \
  | tee "$LOGS/diamond_learns_summary.md"
"$PY" benchmark/plot.py "$OUT" --tag eval/episodic_return --tag losses/denoiser --tag losses/reward_end \
  --tag world_model/next_frame_mse_changed --out-dir "$OUT/plots"
