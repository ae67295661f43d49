#!/usr/bin/env bash
# Does DIAMOND's whole loop learn bsuite's Catch on one CPU core? diamond_atari.py --env-id Catch --preset catch
# (the same algorithm as on Atari, at the sizes and update counts of PRESETS["catch"]), one run per seed, one after
# another, each on one thread; then per seed the test catch rate over the preset's 200 test games (a game returns +1
# or -1, so catch rate = (mean return + 1) / 2; a random paddle catches 1 ball in 5), the updates of each model and
# the env steps. Goal (issue 21): a catch rate of at least 0.9 for every seed, in about 20 minutes of one core each.
# Results: benchmark/RESULTS.md, section "DIAMOND learns Catch" (not reached so far: see there).
#
# Why these settings (each from a logged diagnostic of a seed-1 run, on a shared 2-core machine):
#   - the cpu preset's networks, 32x32 frames (3-pixel cells) and lr 1e-3: a denoiser update 0.09 s, a reward/end
#     update 0.23 s, an actor-critic update (16 imagined envs x 8 steps) 0.5 s of one core.
#   - first epoch 800 denoiser updates: the next frame's error on changed pixels falls from 0.13 to 0.005-0.01
#     (copying the last frame: 0.37) and stays there with 20 per epoch.
#   - first epoch 1500 reward/end updates, 40 per epoch: with 1000 (and 100 actor-critic updates) the +1 reward was
#     not yet recognised (world_model/reward_precision_pos 0.07 in epoch 2; recall 0.96 only by epoch 6).
#   - 30 actor-critic updates per epoch at --actor-critic-learning-rate 5e-4: at 1e-3 the policy's entropy fell to
#     0.28 within epoch 1's 100 updates and stayed on RIGHT (eval/action_share_RIGHT 0.90 to 1.00); at 5e-4 it
#     stayed at 0.8-1.0 until the reward model recognised catches.
#   - 1000 first env steps (18 rewards +1), then 200 per epoch up to 5000: 20 epochs, env steps are cheap (1 ms).
#   - 200 test games (catch rate to 0.005), evaluations every 2 epochs (20 games and the imagined-vs-real return).
#
#   bash benchmark/diamond_catch.sh                  # seeds 1 2 3 (about an hour on one core)
#   bash benchmark/diamond_catch.sh 4 5              # other seeds
#   OUT=/tmp/catch bash benchmark/diamond_catch.sh   # runs and logs under another folder
#   EXTRA="--num-epochs 1 --test-episodes 3" ...     # flags appended to every run (tests/test_benchmark.py shrinks it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SEEDS=${*:-1 2 3}
OUT=${OUT:-benchmark/out/diamond_catch}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one core per run: the goal's unit
for seed in $SEEDS; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" diamond_atari.py --env-id Catch --preset catch --seed "$seed" --no-cuda --output-dir "$OUT/runs" $EXTRA \
    > "$OUT/catch_seed${seed}.log" 2>&1 || { echo "seed $seed failed: see $OUT/catch_seed${seed}.log" >&2; exit 1; }
  echo "seed $seed: $(( $(date +%s) - start )) s" >> "$OUT/catch_seed${seed}.log"
done
# the table: per seed the test catch rate, the run's updates per model (from its config.json) and env steps
"$PY" - "$OUT" $SEEDS <<'EOF' | tee "$OUT/summary.md"
import json, re, sys
from pathlib import Path

out, seeds = Path(sys.argv[1]), sys.argv[2:]
print("| seed | test games | mean return | catch rate | denoiser / reward-end / actor-critic updates | env steps "
      "| wall time |")
print("|---|---|---|---|---|---|---|")
for seed in seeds:
    log = (out / f"catch_seed{seed}.log").read_text()
    test = re.findall(r"^(\d+) test episodes after (\d+) epochs, (\d+) env steps: mean return (-?[\d.]+)", log, re.M)[-1]
    games, epochs, env_steps, mean = int(test[0]), int(test[1]), int(test[2]), float(test[3])
    config = json.loads((Path(re.findall(r"^run folder: (.*)$", log, re.M)[-1]) / "config.json").read_text())
    updates = [config[f"first_epoch_{name}_steps"] + (epochs - 1) * config[f"{name}_steps_per_epoch"]
               for name in ("denoiser", "reward", "actor_critic")]
    wall = re.findall(r"^seed \S+: (\d+) s$", log, re.M)[-1]
    print(f"| {seed} | {games} | {mean:+.2f} | {(mean + 1) / 2:.3f} | {' / '.join(map(str, updates))} | {env_steps} "
          f"| {wall} s |")
EOF
