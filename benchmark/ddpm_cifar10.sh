#!/usr/bin/env bash
# DDPM on CIFAR-10 at full scale, on one GPU (or N with torchrun), then FID per sampler from the same checkpoint.
#
# Should reproduce (50k samples vs the training set; Ho et al. 2020, arXiv 2006.11239, Table 1; Song et al. 2021,
# arXiv 2010.02502, Table 1):
#   Ho et al. 2020, DDPM-1000 ancestral (sigma^2 = beta): FID 3.17, IS 9.46 (800k steps, batch 128, EMA 0.9999)
#   Song et al. 2021 (DDIM, eta 0, on the same kind of model): FID 13.36 / 6.84 / 4.67 / 4.16 at 10 / 20 / 50 / 100
#     steps. Note: that paper used "quadratic" timesteps on CIFAR-10; ddpm_cifar10.py's ddim sampler uses uniform
#     ("leading") spacing, which is usually a little worse at 10-20 steps.
#   DPM-Solver++(2M): its paper (arXiv 2211.01095) gives no CIFAR-10 DDPM figure; DPM-Solver (arXiv 2206.00927)
#     reports 4.70 at 10 NFE on ScoreSDE's model.
# Cost: 800k x 128 images x 37.3 GFLOP (forward + backward, benchmark/speed.py) = 3.8e18 FLOP: about 5 to 10 hours on
# one H100 at 10-20% MFU (the paper: 21 steps/s on a TPU v3-8, 10.6 hours). Each FID of 50k samples with DDPM-1000 is
# 50M network evaluations (about 6e17 FLOP) on top.
#
#   bash benchmark/ddpm_cifar10.sh                  # seed 1
#   SEED=2 GPUS=8 bash benchmark/ddpm_cifar10.sh    # torchrun on 8 GPUs (global batch 128)
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-1}
GPUS=${GPUS:-1}
OUT=${OUT:-runs}
pip install -e ".[eval]"   # torchmetrics[image] + torch-fidelity: FID with the Inception weights (downloaded once)

if [ "$GPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node="$GPUS" ddpm_cifar10.py --seed "$SEED" --output-dir "$OUT"
else
  python ddpm_cifar10.py --seed "$SEED" --output-dir "$OUT"
fi
RUN=$(ls -td "$OUT"/cifar10__ddpm_cifar10__"$SEED"__* | head -1)

# FID of the EMA model with each sampler (eval/fid in the run's TensorBoard, and printed)
for sampler_steps in "ddpm 1000" "ddim 10" "ddim 20" "ddim 50" "ddim 100" "dpm++ 10" "dpm++ 20"; do
  set -- $sampler_steps
  python ddpm_cifar10.py --resume "$RUN" --sample-only --sampler "$1" --num-sampling-steps "$2" \
    --num-samples 64 --eval-fid --fid-num-samples 50000 | tee -a "$RUN/fid_per_sampler.txt"
done

# Learning curves and the final-value table (mean +- std once several seeds are in $OUT)
python benchmark/plot.py "$OUT" --tag losses/mse --tag charts/SPS --tag perf/mfu --out-dir "$OUT/plots_ddpm"
