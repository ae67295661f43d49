# The probes behind RESULTS.md section 2e (not a maintained tool): DDIM's timestep spacing and where in t stochasticity
# matters, on a ddpm_cifar10.py shapes checkpoint, scored by the script's judge as samplers_cpu.py does.
#     python benchmark/logs/samplers_cpu_probes.py runs/<ddpm cpu run> 256
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("ddpm", Path(__file__).resolve().parents[2] / "ddpm_cifar10.py")
ddpm = importlib.util.module_from_spec(spec)
sys.modules["ddpm"] = ddpm
spec.loader.exec_module(ddpm)
torch.set_num_threads(1)
args, checkpoint, _ = ddpm.resume_run(ddpm.Args(resume=sys.argv[1]), set(), trains=False)
model = ddpm.build_model(args)
model.load_state_dict(checkpoint["ema"])
model.eval().requires_grad_(False)
abar = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule(args.beta_schedule, args.timesteps, args.beta_start,
                                                        args.beta_end))
n, seed = int(sys.argv[2]), 1
judge = ddpm.make_shapes_judge(args, n)[0]
heldout, heldout_labels = ddpm.make_shapes_dataset(2 * n, args.img_size, seed=ddpm.JUDGE_HELDOUT_SEED + seed)


def score(name, x, start):
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    s = ddpm.judge_scores(judge, images, None, heldout, heldout_labels)
    print(f"{name}: excess {s['frechet'] - s['frechet_real']:.1f} recognised {s['recognised']:.3f} "
          f"{time.time() - start:.0f}s", flush=True)


def ddim_eta_by_t(x, steps, eta_high, eta_low, generator, boundary=600):
    """DDIM (x0 clipped) with eta_high for t >= boundary and eta_low below."""
    timesteps = ddpm.ddim_timesteps(len(abar), steps, "uniform")
    for i, t in enumerate(timesteps):
        a, a_prev = ddpm._abar(abar, t), ddpm._abar(abar, timesteps[i + 1] if i + 1 < len(timesteps) else -1)
        eps = model(x, torch.full((len(x),), t))
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        eta = eta_high if t >= boundary else eta_low
        s = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - s * s, 0)) * eps
        if s > 0:
            x = x + s * torch.randn(x.shape, generator=generator)
    return x


with torch.no_grad():
    for spacing, steps in (("quadratic", 50), ("linspace", 50), ("quadratic", 20)):
        g = torch.Generator().manual_seed(seed)
        x_T, start = torch.randn(n, 3, args.img_size, args.img_size, generator=g), time.time()
        score(f"ddim {spacing}-{steps} clipped", ddpm.ddim_sample(lambda x, t: model(x, t), x_T, abar, steps,
                                                                   spacing=spacing, clip_denoised=True), start)
    for name, high, low in (("eta 1 for t >= 600, 0 below", 1.0, 0.0), ("eta 0 for t >= 600, 1 below", 0.0, 1.0),
                            ("eta 1 everywhere", 1.0, 1.0)):
        g = torch.Generator().manual_seed(seed)
        x_T, start = torch.randn(n, 3, args.img_size, args.img_size, generator=g), time.time()
        score(f"ddim 50 steps, {name}", ddim_eta_by_t(x_T, 50, high, low, g), start)
