# Probe: does torch.compile help the DDPM U-Net training step on this CPU? (speed.py machinery, 4 candidates)
# Run from the repository root: python benchmark/logs/compile_probe.py  (output: benchmark/logs/speed_ddpm_compile_run_B.txt)
import sys, time, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import speed, torch
ns = type("N", (), dict(device="cpu", quick=True, compile=True, repeats=3, batch_size=8, video_frames=None))()
cfg = speed.make_config(ns)
t0 = time.time()
title, train, sample, notes = speed.bench_ddpm(cfg)
keep = ["ddpm_cifar10.UNet channels_last", "ddpm_cifar10.UNet channels_last compile", "diffusers UNet2DModel",
        "diffusers UNet2DModel channels_last compile"]
train = [c for c in train if c.label in keep]
ref = speed.matmul_candidate(cfg.device)
print("load before", speed.load_average(), flush=True)
speed.run_round_robin(train + [ref], cfg)
text, rows = speed.report(title, "train", train, ref, cfg, notes)
print(text)
for c in train:
    print(c.label, "warm-up (incl. compile) s:", round(c.warmup_seconds, 1))
print("matmul GFLOP/s", ref.flops_per_step / ref.median / 1e9, "load after", speed.load_average(), "total s", time.time() - t0)
json.dump(rows, open("compile_probe.json", "w"), indent=1)
