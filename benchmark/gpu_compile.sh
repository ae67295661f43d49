#!/usr/bin/env bash
# Optional, on one GPU: what --compile buys the other three scripts (DDPM, DiT, video) on CUDA, beside their eager
# step, with benchmark/speed.py (bf16 autocast, the peers where there are any), one model per call so that a slow
# compilation stops only its own line. Each call has its own time limit (the whole script: at most about 10 minutes;
# speed.py's eight compilations did not finish within 5 minutes on an H100, RESULTS.md section 0). DIAMOND's own
# fast path is measured by benchmark/gpu_diamond.sh.
#
#   bash benchmark/gpu_compile.sh                  # logs and JSON in benchmark/logs/
#   MODELS="ddpm" LIMIT=300 bash benchmark/gpu_compile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LIMIT=${LIMIT:-200}  # seconds per model
STAMP=$(date -u +%Y%m%d_%H%M)
mkdir -p benchmark/logs
status=0
for model in ${MODELS:-ddpm dit video}; do
  log="benchmark/logs/gpu_compile_${model}_${STAMP}"
  echo "=== $model: eager and torch.compile, training and sampling (at most $LIMIT s)"
  timeout "$LIMIT" "$PY" benchmark/speed.py --device cuda --only "$model" --compile --quick --json "$log.json" \
    2>&1 | tee "$log.txt"
  rc=${PIPESTATUS[0]}
  echo "=== $model: exit $rc"
  [ "$rc" = 0 ] || status=1
done
exit "$status"
