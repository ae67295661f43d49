#!/usr/bin/env bash
# ddpm, dit and video end to end on one GPU with their default (paper) networks and precision, in about 6 minutes: a
# short training run each, sampling at its end, a checkpoint, then a resume that must go on from it. Data is generated
# (shapes, sprites) or the ALE itself, so the check runs offline. It prints each run's final losses/, perf/ and eval/
# values (benchmark/plot.py reads the same event files); the figures it gave are in RESULTS.md. DIAMOND has its
# own: gpu_diamond.sh (speed), then gpu_diamond_smoke.sh (an epoch, an evaluation, the test episodes, a resume).
#
#   bash benchmark/gpu_smoke.sh                  # runs under runs/gpu_smoke
#   OUT=/tmp/smoke COMPILE=1 bash benchmark/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_smoke}
PY=${PYTHON:-python}
EXTRA=""
[ "${COMPILE:-0}" = 1 ] && EXTRA="--compile"
status=0
run() {  # name, timeout in seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep -v -E '^\s*$' | awk 'NR % 20 == 1 || /error|Error|saved|wrote|resumed|param|step [0-9]+|mfu/' | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

# DDPM: the paper's 35.7M U-Net at batch 128; 32x32 generated shapes stand in for CIFAR-10 (no download offline).
run ddpm 150 $PY ddpm_cifar10.py --dataset shapes --img-size 32 --num-shapes-images 8192 --total-steps 300 \
  --log-every 50 --eval-every 300 --save-every 300 --num-eval-samples 64 --sampler ddim --num-sampling-steps 50 \
  --exp-name gpu --output-dir "$OUT/ddpm" $EXTRA
run ddpm_resume 90 $PY ddpm_cifar10.py --resume "$(ls -d "$OUT"/ddpm/*/ | head -n 1)" --total-steps 400
# DiT: the default config (the seed's: patch 4, width 384, depth 6, adaLN-Zero), class-conditional, with guidance.
run dit 150 $PY dit_cifar10.py --dataset shapes --img-size 32 --num-shapes-images 16384 --total-steps 256 \
  --eval-every 256 --save-every 128 --num-sampling-steps 50 --exp-name gpu --output-dir "$OUT/dit" $EXTRA
# Video: the seed's 3D U-Net (256 channels, 16 frames of 64x64, batch 8) on sprites with text and actions.
run video 170 $PY video_diffusion.py --total-steps 80 --log-every 20 --eval-every 80 --save-every 80 \
  --num-eval-samples 8 --sample-batch-size 8 --num-sampling-steps 20 --exp-name gpu --output-dir "$OUT/video" $EXTRA
$PY - "$OUT" <<'EOF'
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

for run_dir in sorted({p.parent for p in Path(sys.argv[1]).rglob("events.out.tfevents.*")}):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    print(f"--- {run_dir}")
    for tag in sorted(events.Tags()["scalars"]):
        if tag.split("/")[0] in ("losses", "perf", "eval", "charts", "world_model"):
            last = events.Scalars(tag)[-1]
            print(f"{tag:45s} step {last.step:>7d}  {last.value:.6g}")
EOF
exit $status
