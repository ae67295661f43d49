#!/usr/bin/env bash
# DiT on CIFAR-10 (class-conditional, classifier-free guidance), the seed's config and DiT-S/2, on one GPU.
#
# What to expect: the DiT paper (Peebles and Xie 2023, arXiv 2212.09748) reports no CIFAR-10 figure. ViT-style
# diffusion on CIFAR-10: U-ViT-S/2 reaches FID 3.11 (Bao et al. 2023, arXiv 2209.12152; unconditional, 500k
# iterations, batch 128); a plain DiT on CIFAR-10 is reported by its users at about FID 10 (FID-50k, in
# facebookresearch/DiT issue #84). The seed's config (patch 4, width 384, depth 6: 16.5M parameters, 64 tokens)
# is much smaller than DiT-S/2 (patch 2, depth 12: 256 tokens, 32.5M). Best FID with guidance at small scales
# (DiT: cfg 1.5); the script's default --cfg-scale is 1.5.
# Cost: the seed config is 4.2 GFLOP per image for forward + backward (benchmark/speed.py): 100 epochs x 50k images
# = 2.1e16 FLOP, well under an hour on one H100. DiT-S/2 is about 8 times that per image.
#
#   bash benchmark/dit_cifar10.sh
#   SEED=2 PRESET=dit-s2 EPOCHS=400 bash benchmark/dit_cifar10.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${SEED:-1}
OUT=${OUT:-runs}
EXTRA=()
[ -n "${PRESET:-}" ] && EXTRA+=(--preset "$PRESET")
[ -n "${EPOCHS:-}" ] && EXTRA+=(--epochs "$EPOCHS")
pip install -e ".[eval]"

python dit_cifar10.py --seed "$SEED" --output-dir "$OUT" "${EXTRA[@]}" --eval-fid --fid-num-samples 50000
RUN=$(ls -td "$OUT"/cifar10__dit_cifar10__"$SEED"__* | head -1)

# FID against guidance scale, DDIM 50 steps (the guidance sweep papers show)
for cfg in 1.0 1.5 2.0 3.0; do
  python dit_cifar10.py --resume "$RUN" --sample-only --sampler ddim --num-sampling-steps 50 --cfg-scale "$cfg" \
    --num-samples 64 --eval-fid --fid-num-samples 50000 | tee -a "$RUN/fid_per_cfg.txt"
done
python benchmark/plot.py "$OUT" --tag losses/mse --tag eval/fid --out-dir "$OUT/plots_dit"
