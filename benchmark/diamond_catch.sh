#!/usr/bin/env bash
# Does DIAMOND's whole loop learn bsuite's Catch on one CPU core? diamond_atari.py --env-id Catch --preset catch
# (the same algorithm as on Atari, at the sizes and update counts of PRESETS["catch"]), one run per seed, one after
# another, each on one thread; then per seed the test catch rate over the preset's 200 test games (a game returns +1
# or -1, so catch rate = (mean return + 1) / 2; a random paddle catches 1 ball in 5), the updates of each model and
# the env steps, and the curves (summary.md). Goal (issue 21): a catch rate of at least 0.9 for every seed, in about
# 20 minutes of one core each. Results: benchmark/RESULTS.md, section 3e "DIAMOND learns Catch".
#
# Why these settings (each from a logged diagnostic; RESULTS 3e has the runs):
#   - the cpu preset's networks, 32x32 frames (3-pixel cells) and lr 1e-3: a denoiser update 0.1 s, a reward/end
#     update 0.25 s, an actor-critic update (16 imagined envs x 8 steps) 0.7 s of one core.
#   - first epoch 800 denoiser updates: the next frame's error on changed pixels falls from 0.13 to 0.005-0.01
#     (copying the last frame: 0.37) and stays there with 20 per epoch.
#   - a first collection of 5000 random env steps (about 110 catches under every action; env steps cost 1 ms) and 2000
#     reward/end updates on it, then 40 per epoch: with 1,000 to 2,000 random steps the reward/end model fits its
#     training data (loss 4e-5) and not held-out transitions (+1 precision 0.03 to 0.08), and the actor-critic
#     exploits it; with 5000 its loss stays at 0.02 to 0.04 and +1 recall reaches 0.9 to 1.0 once the policy catches.
#   - the actor-critic from epoch 2 (--actor-critic-start-after-epochs 1, the reference's start_after_epochs), 60
#     updates per epoch at lr 1e-3: 840 in all (with Catch itself as the world model the same code needs 300 to 500).
#   - then 200 env steps per epoch up to 8000: 15 epochs.
#   - 200 test games (catch rate to 0.03), evaluations every 2 epochs (20 games and the imagined-vs-real return), an
#     agent copy every 2 epochs (the curve: benchmark/diamond_catch_diagnosis.py --agents tests each on 200 games).
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
  # the curve of the agents the run kept, each on the same 200 real games
  "$PY" benchmark/diamond_catch_diagnosis.py "$(sed -n 's/^run folder: //p' "$OUT/catch_seed${seed}.log")" --agents \
    > "$OUT/agents_seed${seed}.txt"
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
               for name in ("denoiser", "reward")]
    start = config.get("actor_critic_start_after_epochs", 0)  # the actor-critic trains in the epochs after it
    updates.append((config["first_epoch_actor_critic_steps"] if start == 0 else 0)
                   + max(0, epochs - max(1, start)) * config["actor_critic_steps_per_epoch"])
    wall = re.findall(r"^seed \S+: (\d+) s$", log, re.M)[-1]
    print(f"| {seed} | {games} | {mean:+.2f} | {(mean + 1) / 2:.3f} | {' / '.join(map(str, updates))} | {env_steps} "
          f"| {wall} s |")
# the curves, per seed and evaluation: the kept agent's catch rate (200 games), the evaluation's (eval_episodes
# games), the reward/end model's recall per reward sign and of ends (held-out transitions), the imagined minus the
# real return of the policy from the same starts, and a random paddle's catch rate beside them
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

for seed in seeds:
    log = (out / f"catch_seed{seed}.log").read_text()
    run = re.findall(r"^run folder: (.*)$", log, re.M)[-1]
    agents = {int(m[0]): float(m[1]) for m in re.findall(r"agent_epoch_(\d+)\.pt: catch rate ([\d.]+)",
                                                            (out / f"agents_seed{seed}.txt").read_text())}
    events = EventAccumulator(run, size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    cell = lambda tag, step, f=lambda v: f"{v:.2f}": f(scalars[tag][step]) if step in scalars.get(tag, {}) else "-"
    print(f"\nseed {seed} ({run}):\n\n| epoch | env steps | agent catch rate (200 games) | eval catch rate "
          "| +1 recall | -1 recall | end recall | imagined - real return | random |")
    print("|---|---|---|---|---|---|---|---|---|")
    for step, epoch in sorted(scalars["charts/epoch"].items()):
        if step not in scalars.get("eval/imagined_minus_real_return", {}):  # not an evaluation's epoch
            continue
        print(f"| {int(epoch)} | {cell('charts/env_steps', step, lambda v: f'{v:.0f}')} | "
              f"{f'{agents[int(epoch)]:.3f}' if int(epoch) in agents else '-'} | "
              f"{cell('eval/episodic_return', step, lambda v: f'{(v + 1) / 2:.2f}')} | "
              f"{cell('world_model/reward_recall_pos', step)} | {cell('world_model/reward_recall_neg', step)} | "
              f"{cell('world_model/end_recall', step)} | "
              f"{cell('eval/imagined_minus_real_return', step, lambda v: f'{v:+.2f}')} | 0.2 |")
EOF
