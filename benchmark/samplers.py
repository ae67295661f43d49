# cleanworlds benchmark: sample quality per number of network evaluations (NFE). Results: benchmark/RESULTS.md
"""
Sample quality per NFE for one fixed trained model: DDPM-1000 (ancestral), DDIM-10/20/50/100 (eta 0) and
DPM-Solver++(2M)-10/20, all from the same starting noise, with the samplers of ddpm_cifar10.py exactly as its
--sampler flag runs them (sample_images); and DDIM with the predicted x0 clipped at every step (ddim_sample's
clip_denoised option), since DDPM's ancestral sampler clips and the others do not.

Two models, both trained here on ddpm_cifar10.py's generated shapes data at 8x8 (linear schedule, T = 1000):
- `--model mlp` (default): an MLP (3 residual blocks of width 512, 2.1M parameters, 4 MFLOP per image) trained in
  this process (train_mlp below) to predict v, and served to the samplers as the equivalent epsilon-model: 4000 Adam
  steps, a few minutes on 2 CPU cores, so that 1000-step ancestral sampling of 500 images stays in minutes too.
- `--model unet`: the script's own U-Net, trained by running ddpm_cifar10.py with TRAIN_ARGS below (ten times the
  FLOPs per image of the MLP: a GPU, or a quiet CPU and patience), or any ddpm_cifar10.py run on the shapes data
  given with --run.
The score: the Frechet distance between Gaussian fits of the features of generated and held-out real images, where
the features come from a small CNN classifier trained here on the shapes labels (its penultimate 32-d layer). It is
FID's formula on another network's features: it is called "FD-shapes-CNN", never FID, and its absolute values mean
nothing outside this benchmark. The distance between two independent real sets of the same size is printed as the
floor.

    python benchmark/samplers.py                              # MLP: train (a few minutes on 2 cores), then score
    python benchmark/samplers.py --model unet                 # the script's U-Net, trained by ddpm_cifar10.py
    python benchmark/samplers.py --run runs/shapes__samplers__1__1700000000 --num-samples 2000
    python benchmark/samplers.py --samplers ddim-20,dpm++-20 --num-samples 500
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
# --model unet: an 8x8 version of the shapes data and a 0.65M-parameter U-Net (no attention but the middle one).
TRAIN_ARGS = ["--dataset", "shapes", "--img-size", "8", "--num-shapes-images", "4096", "--channels", "32",
              "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attn-resolutions", "--dropout", "0",
              "--batch-size", "64", "--learning-rate", "1e-3", "--warmup-steps", "100", "--ema-decay", "0.995",
              "--total-steps", "1500", "--log-every", "100", "--save-every", "500", "--eval-every", "500",
              "--num-eval-samples", "16", "--sampler", "ddim", "--num-sampling-steps", "20", "--exp-name", "samplers"]
DEFAULT_SAMPLERS = ("ddpm-1000,ddim-10,ddim-20,ddim-50,ddim-100,dpm++-10,dpm++-20,"
                    "ddim-clip-10,ddim-clip-20,ddim-clip-100")
SAMPLER_LABELS = {"ddpm": "DDPM (ancestral, sigma^2 = beta, x0 clipped)", "ddim": "DDIM (eta 0, uniform spacing)",
                  "dpm++": "DPM-Solver++(2M)", "ddim-clip": "DDIM, x0 clipped to [-1, 1] each step"}
FEATURE_SEED, HELDOUT_SEED, FLOOR_SEED = 2_000, 3_000, 4_000  # the shapes sets: classifier, held-out, floor
NOISE_SEED = 5_000


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


def load_script(file_name: str):
    import importlib.util

    name = f"cleanworlds_{Path(file_name).stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------------
# The feature network and the Frechet distance


class ShapesFeatureNet(nn.Module):
    """A small CNN classifier of the shapes classes; features() is its penultimate (2 * width)-d layer."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.body(images_uint8.float() / 127.5 - 1.0)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images_uint8))


def train_feature_net(ddpm, img_size: int, steps: int = 400, num_images: int = 4096, seed: int = FEATURE_SEED):
    """Trains the classifier on its own shapes set (a seed no other set here uses); returns it and its accuracy on a
    fresh set of 1024 images."""
    torch.manual_seed(seed)
    images, labels = ddpm.make_shapes_dataset(num_images, img_size, seed=seed)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    net = ShapesFeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, num_images, (128,), generator=generator)
        batch = images[index]
        batch = torch.where(torch.rand(128, 1, 1, 1, generator=generator) < 0.5, batch.flip(3), batch)  # as training
        loss = F.cross_entropy(net(batch), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval().requires_grad_(False)
    test_images, test_labels = ddpm.make_shapes_dataset(1024, img_size, seed=seed + 1)
    accuracy = (net(torch.from_numpy(test_images)).argmax(1) == torch.from_numpy(test_labels)).float().mean().item()
    return net, accuracy


@torch.no_grad()
def features_of(net: ShapesFeatureNet, images_uint8: np.ndarray, batch: int = 1000) -> np.ndarray:
    images = torch.from_numpy(np.ascontiguousarray(images_uint8))
    return torch.cat([net.features(images[i: i + batch]) for i in range(0, len(images), batch)]).double().numpy()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)) between Gaussian fits of two feature sets.

    tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix: two eigh calls,
    no scipy.linalg.sqrtm (and no complex parts to throw away)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# The MLP epsilon-model (--model mlp)

MLP_STEPS, MLP_BATCH, MLP_LR, MLP_EMA, MLP_WIDTH, MLP_DEPTH, MLP_SEED = 4000, 128, 1e-3, 0.999, 512, 3, 1


class MLPDenoiser(nn.Module):
    """eps(x_t, t) for small images: flatten, Linear to `width`, `depth` residual blocks h += fc2(silu(fc1(silu(LN(h)))
    + temb)) with temb the timestep's sinusoidal embedding through an MLP, LayerNorm, Linear back to pixels
    (zero-initialised)."""

    def __init__(self, img_size: int, width: int = MLP_WIDTH, depth: int = MLP_DEPTH, channels: int = 3):
        super().__init__()
        self.shape, dim = (channels, img_size, img_size), channels * img_size * img_size
        self.time_dim = 128
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(norm=nn.LayerNorm(width), fc1=nn.Linear(width, width),
                                                       fc2=nn.Linear(width, width))) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, timestep_embedding: Callable) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.time_dim))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block["fc2"](F.silu(block["fc1"](F.silu(block["norm"](h))) + temb))
        return self.out(self.out_norm(h)).view(-1, *self.shape)


def train_mlp(ddpm, img_size: int, alphas_cumprod: torch.Tensor, steps: int = MLP_STEPS) -> tuple[Callable, str]:
    """Trains MLPDenoiser on 4096 shapes images (the set ddpm_cifar10.py makes with --seed 1) with Adam, a 100-step
    warmup then cosine decay, random flips and an EMA. It learns v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans &
    Ho 2022), which an MLP fits far better than eps at small t; the samplers get the equivalent epsilon,
    eps = sqrt(abar) v + sqrt(1 - abar) x_t, so model_fn is an ordinary eps-model. Returns model_fn and the recipe."""
    torch.manual_seed(MLP_SEED)
    images, _ = ddpm.make_shapes_dataset(4096, img_size, seed=MLP_SEED)
    data = torch.from_numpy(images).float() / 127.5 - 1.0
    model = MLPDenoiser(img_size)
    ema = MLPDenoiser(img_size)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=MLP_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    sqrt_abar, sqrt_one_minus = alphas_cumprod.sqrt().float(), (1 - alphas_cumprod).sqrt().float()
    generator = torch.Generator().manual_seed(MLP_SEED)
    start, running = time.perf_counter(), 0.0
    for step in range(1, steps + 1):
        x0 = data[torch.randint(0, len(data), (MLP_BATCH,), generator=generator)]
        x0 = torch.where(torch.rand(MLP_BATCH, 1, 1, 1, generator=generator) < 0.5, x0.flip(3), x0)
        t = torch.randint(0, len(alphas_cumprod), (MLP_BATCH,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a, b = sqrt_abar[t, None, None, None], sqrt_one_minus[t, None, None, None]
        x_t = a * x0 + b * noise  # q(x_t | x0)
        loss = F.mse_loss(model(x_t, t, ddpm.timestep_embedding), a * noise - b * x0)  # v-prediction
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - MLP_EMA)
        running += loss.item()
        if step % 500 == 0:
            print(f"  mlp step {step}: v-loss {running / 500:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
            running = 0.0
    ema.eval()

    def model_fn(x, t):  # eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
        v = ema(x, t, ddpm.timestep_embedding)
        return sqrt_abar[t, None, None, None] * v + sqrt_one_minus[t, None, None, None] * x

    num_params = sum(p.numel() for p in ema.parameters())
    recipe = (f"benchmark/samplers.py train_mlp: MLPDenoiser (width {MLP_WIDTH}, depth {MLP_DEPTH}, {num_params:,} "
              f"parameters, v-prediction) on 4096 {img_size}x{img_size} shapes images, {steps} Adam steps, batch "
              f"{MLP_BATCH}, lr {MLP_LR} (100 warmup, cosine decay), EMA {MLP_EMA}, seed {MLP_SEED}, "
              f"{time.perf_counter() - start:.0f} s")
    return model_fn, recipe


def parse_samplers(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, steps = item.strip().rpartition("-")
        if name not in SAMPLER_LABELS or not steps.isdigit() or int(steps) < 1:
            raise UserError(f"--samplers item {item!r} is not <{'|'.join(SAMPLER_LABELS)}>-<steps>, e.g. ddim-20")
        out.append((name, int(steps)))
    return out


def train_model(output_dir: Path, extra_args: list[str]) -> tuple[Path, str]:
    """Runs ddpm_cifar10.py with TRAIN_ARGS; returns the run folder and the command line."""
    output_dir.mkdir(parents=True, exist_ok=True)
    before = set(output_dir.iterdir())
    cmd = [sys.executable, str(ROOT / "ddpm_cifar10.py"), *TRAIN_ARGS, *extra_args, "--output-dir", str(output_dir)]
    shown = "python ddpm_cifar10.py " + " ".join(TRAIN_ARGS + extra_args)
    print(f"training: {shown}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"training with ddpm_cifar10.py failed (exit {result.returncode}): {last}")
    new = sorted(set(output_dir.iterdir()) - before)
    print(f"trained in {time.perf_counter() - start:.0f} s: {new[-1]}", flush=True)
    return new[-1], shown


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "unet"], default="mlp", help="the model to train here (see above)")
    parser.add_argument("--run", default=None, help="a ddpm_cifar10.py run folder on the shapes data (no training)")
    parser.add_argument("--train-output-dir", default="runs", help="where the training run goes")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (MLP 4000, U-Net 1500)")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help=f"comma list (default {DEFAULT_SAMPLERS})")
    parser.add_argument("--num-samples", type=int, default=500, help="samples per sampler, and real images")
    parser.add_argument("--sample-batch-size", type=int, default=500)
    parser.add_argument("--feature-steps", type=int, default=400, help="training steps of the feature CNN")
    parser.add_argument("--out-dir", default=None, help="sample grids and results.json (default: <run>/samplers)")
    ns = parser.parse_args(argv)
    samplers = parse_samplers(ns.samplers)
    ddpm = load_script("ddpm_cifar10.py")
    torch.set_grad_enabled(True)

    if ns.model == "mlp" and ns.run is None:
        img_size = 8
        alphas_cumprod = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule("linear", 1000))
        print("training the MLP (v-prediction) ...", flush=True)
        model_fn, train_command = train_mlp(ddpm, img_size, alphas_cumprod, ns.train_steps or MLP_STEPS)
        model_name = "MLPDenoiser (2,106,048 parameters, v-prediction served as eps, EMA weights)"
        run_dir = Path(ns.train_output_dir) / "samplers_mlp"
    else:
        train_command = None
        if ns.run is None:
            extra = ["--total-steps", str(ns.train_steps)] if ns.train_steps else []
            run_dir, train_command = train_model(Path(ns.train_output_dir), extra)
        else:
            run_dir = Path(ns.run)
            train_command = f"(the run's config: {run_dir / 'config.json'})"
        args, checkpoint, _ = ddpm.resume_run(ddpm.Args(resume=str(run_dir)), set(), trains=False)
        if args.dataset != "shapes":
            raise UserError(f"{run_dir} was trained on {args.dataset}; this benchmark scores models of the shapes data")
        unet = ddpm.build_model(args)
        unet.load_state_dict(checkpoint["ema"])  # the EMA weights, as the script samples
        unet.eval().requires_grad_(False)
        img_size = args.img_size
        alphas_cumprod = ddpm.make_alphas_cumprod(ddpm.make_beta_schedule(args.beta_schedule, args.timesteps,
                                                                          args.beta_start, args.beta_end))
        model_name = (f"ddpm_cifar10.UNet of {run_dir.name} ({sum(p.numel() for p in unet.parameters()):,} "
                      f"parameters, EMA weights)")

        def model_fn(x, t):  # the network's output as eps (a --prediction v run's is converted)
            return ddpm.eps_from_output(unet(x, t), x, t, alphas_cumprod, args.prediction)

    out_dir = Path(ns.out_dir) if ns.out_dir else run_dir / "samplers"
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    feature_net, accuracy = train_feature_net(ddpm, img_size, ns.feature_steps)
    print(f"feature CNN: {accuracy:.1%} accuracy on fresh shapes images ({time.perf_counter() - start:.0f} s)")
    n = ns.num_samples
    heldout, _ = ddpm.make_shapes_dataset(n, img_size, seed=HELDOUT_SEED)
    floor_set, _ = ddpm.make_shapes_dataset(n, img_size, seed=FLOOR_SEED)
    heldout_features = features_of(feature_net, heldout)
    floor = frechet_distance(features_of(feature_net, floor_set), heldout_features)
    print(f"floor: FD-shapes-CNN between two real sets of {n} images = {floor:.4f}", flush=True)

    rows = []
    for name, steps in samplers:
        generator = torch.Generator().manual_seed(NOISE_SEED)  # the same x_T for every sampler
        images = []
        start = time.perf_counter()
        for first in range(0, n, ns.sample_batch_size):
            x_T = torch.randn((min(ns.sample_batch_size, n - first), 3, img_size, img_size),
                              generator=generator)
            if name == "ddim-clip":  # DDIM with x0_hat clipped to [-1, 1] at every step (ddim_sample's option)
                x = ddpm.ddim_sample(model_fn, x_T, alphas_cumprod, steps, clip_denoised=True)
                images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
            else:  # exactly what ddpm_cifar10.py --sampler NAME --num-sampling-steps STEPS does
                images.append(ddpm.sample_images(model_fn, x_T, alphas_cumprod, name, steps, 0.0, generator).numpy())
        seconds = time.perf_counter() - start
        images = np.concatenate(images)
        fd = frechet_distance(features_of(feature_net, images), heldout_features)
        label = SAMPLER_LABELS[name]
        rows.append(dict(sampler=name, label=label, nfe=steps, fd=fd, seconds=seconds))
        import cv2

        cv2.imwrite(str(out_dir / f"{name}-{steps}.png"), ddpm.make_grid(images[:64])[:, :, ::-1])
        print(f"{label:34s} NFE {steps:5d}: FD-shapes-CNN {fd:8.4f}  ({seconds:.0f} s)", flush=True)
        (out_dir / "partial.json").write_text(json.dumps(rows, indent=1))  # what a killed run has so far

    lines = [f"Model: {model_name}, {img_size}x{img_size} shapes; trained with: `{train_command}`",
             f"Score: FD-shapes-CNN = Frechet distance on the {heldout_features.shape[1]}-d features of a CNN "
             f"classifier trained here on the shapes labels ({accuracy:.1%} accuracy), {n} samples vs {n} held-out "
             f"real images; not FID. "
             f"Two real sets: {floor:.4f}.", "",
             "| sampler | NFE | FD-shapes-CNN (lower is better) | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['nfe']} | {r['fd']:.4f} | {r['seconds']:.0f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    result = dict(model=model_name, train_command=train_command, feature_accuracy=accuracy, num_samples=n,
                  floor=floor, rows=rows, table=table)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "results.md").write_text(table)
    print(f"wrote {out_dir / 'results.md'}, results.json and one PNG grid per sampler")
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - the script's own one-line errors
        if e.__class__.__name__ == "UserError":
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
