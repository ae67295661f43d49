"""Does a model learn the classes of a small real dataset? scikit-learn's bundled handwritten digits (1,797 8x8
images, offline) become a 16x16 image folder with one subfolder per digit; dit_cifar10.py (class-conditional) and
ddpm_cifar10.py (unconditional) are trained on it as a user runs them (a subprocess each), then sampled with
--sample-only from the checkpoint's EMA weights; a logistic-regression judge trained on half of the real digits
scores the samples.

- DiT: the share of samples drawn for class k that the judge calls k, at each guidance scale (DDIM-50), beside
  chance (0.10) and the judge's accuracy on the held-out real digits (real vs real).
- DDPM: unconditional, so no asked class: the share of samples the judge assigns with confidence (max probability
  above 0.9; real held-out digits beside) and the class histogram against uniform (total variation distance).

    pip install -e '.[bench]'   # scikit-learn
    python benchmark/digits.py                                   # the issue's setting: DiT 220 epochs (~6,000 steps)
    python benchmark/digits.py --model ddpm --ddpm-steps 6000
    python benchmark/digits.py --epochs 40 --patch 4             # a smaller budget (state it with the figures)
    python benchmark/digits.py --patch 4 --plain-loop dit diffusers   # the bisection: the same models, a plain loop
    python benchmark/digits.py --patch 4 --epochs 50 100 150       # accuracy vs steps: one run, judged at each
    python benchmark/digits.py --patch 4 --plain-loop dit dit-label-std1 --plain-steps 1400 2800 4200
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def make_digits_folder(root: Path, img_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (ink 0..16 on 8x8) as white-on-black grayscale PNGs of img_size, root/<digit>/<i>.png.
    Returns the images as the scripts will read them back: uint8 (N, img_size, img_size), and the labels."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = np.stack([cv2.resize(im, (img_size, img_size), interpolation=cv2.INTER_LINEAR) for im in small])
    for k in range(10):
        (root / str(k)).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, digits.target)):
        if not cv2.imwrite(str(root / str(label) / f"{i:04d}.png"), image):
            raise OSError(f"cannot write {root / str(label)}")
    return images, digits.target.astype(np.int64)


def to_features(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) grayscale or (N, 3, H, W) RGB samples -> (N, H*W) floats in [0, 1] for the judge."""
    images = images.astype(np.float64)
    if images.ndim == 4:
        images = images.mean(1)
    return images.reshape(len(images), -1) / 255.0


def train_judge(images: np.ndarray, labels: np.ndarray, seed: int = 0):
    """Logistic regression on a random half of the real digits; returns (judge, held-out accuracy, held-out share
    of confident calls)."""
    from sklearn.linear_model import LogisticRegression

    order = np.random.default_rng(seed).permutation(len(images))
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    judge = LogisticRegression(max_iter=2000, C=1.0).fit(to_features(images[train]), labels[train])
    probabilities = judge.predict_proba(to_features(images[test]))
    accuracy = float((probabilities.argmax(1) == labels[test]).mean())
    return judge, accuracy, float((probabilities.max(1) > 0.9).mean())


def stamp() -> str:
    """The time (UTC) and the load average (1, 5, 15 min), printed beside each result: this machine is shared."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + ", load average " + " ".join(
        f"{x:.2f}" for x in os.getloadavg())


def run(command: list, log: Path) -> str:
    """Runs one script as a user does; its output goes to the log (and the last lines to the error if it fails)."""
    print("$", " ".join(map(str, command)), flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}\n")
    if result.returncode != 0:
        sys.exit(f"exit {result.returncode} after {time.time() - start:.0f} s:\n{result.stderr[-3000:]}")
    print(f"  ({time.time() - start:.0f} s)", flush=True)
    return result.stdout


def run_folder(stdout: str) -> Path:
    return Path(re.search(r"^run folder: (.*)$", stdout, re.M).group(1))


def samples_of(stdout: str) -> dict:
    """The .npz a --sample-only run wrote: images uint8 (N, H, W, 3) -> (N, 3, H, W), and labels if any."""
    path = re.search(r"^wrote \d+ samples to .* and (.*\.npz)$", stdout, re.M).group(1)
    with np.load(ROOT / path if not Path(path).is_absolute() else path, allow_pickle=False) as data:
        return {"images": data["arr_0"].transpose(0, 3, 1, 2), "labels": data["arr_1"] if "arr_1" in data else None}


def class_signal(dit, model, x_all, alphas_cumprod) -> str:
    """How loud the class is inside a DiT of dit_cifar10.py: the mean norm of the label table's class rows beside the
    timestep embedding's (mean over t), which are added into the one conditioning vector c = t_emb + y_emb, and how
    far the predicted noise moves between the 10 classes (rms over classes, pixels and 64 noised real digits at
    t = 500) beside its own rms."""
    import torch

    with torch.no_grad():
        labels = model.y_embedder.weight[:10].norm(dim=1).mean()
        steps = torch.arange(0, 1000, 50)
        timesteps = model.t_embedder(dit.timestep_embedding(steps, dit.TIMESTEP_FREQUENCY_DIM)).norm(dim=1).mean()
        generator = torch.Generator().manual_seed(7)
        x0 = x_all[torch.randperm(len(x_all), generator=generator)[:64]]
        t, a = torch.full((64,), 500), alphas_cumprod[500].float()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)
        eps = torch.stack([model(x_t, t, torch.full((64,), k)) for k in range(10)])
        spread = (eps - eps.mean(0)).pow(2).mean().sqrt()
    return (f"class signal: label rows |y| {labels:.3f}, timestep embedding |t| {timesteps:.2f} (ratio "
            f"{labels / timesteps:.3f}); eps between classes rms {spread:.4f} of eps rms {eps.pow(2).mean().sqrt():.3f}"
            f" (t = 500)")


def load_script_model(dit, run_dir: Path, args):
    """The EMA weights of a dit_cifar10.py run (what --sample-only samples), in a DiT of the run's size."""
    import torch

    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=False)
    model = dit.DiT(args.img_size, args.patch, 3, args.width, args.depth, args.heads, 4.0, 10)
    model.load_state_dict(checkpoint["ema"])
    return model.eval()


def load_dit_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dit_cifar10", ROOT / "dit_cifar10.py")
    dit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dit)
    return dit


PLAIN_LOOP_MODELS = ["dit", "dit-label-std1", "dit-adaln-default-init", "diffusers"]


def plain_loop(variant: str, folder: Path, judge, args) -> list:
    """The bisection of #14: the script's DiT (or a variant, or diffusers' DiTTransformer2DModel at the same size) in
    a plain loop of a few lines, on the script's own reading of the folder: AdamW, batches drawn at random, labels
    dropped to the null class with p = 0.1, t uniform, L_simple, no EMA (the raw weights are sampled). Variants of the
    official DiT: dit-label-std1 initialises the label table N(0, 1) (PyTorch's nn.Embedding default, as diffusers)
    instead of DiT's N(0, 0.02); dit-adaln-default-init leaves the adaLN modulations at PyTorch's Linear init instead
    of zero. Judged after each of --plain-steps (one run): returns [(step, [(scale, class accuracy)])]."""
    import torch
    import torch.nn.functional as F

    dit = load_dit_module()
    images, labels, names = dit.load_image_folder(str(folder), args.img_size)
    assert names == [str(k) for k in range(10)], names  # folder label k is digit k (what the judge calls k)
    x_all, y_all = torch.from_numpy(images).float() / 127.5 - 1, torch.from_numpy(labels)
    alphas_cumprod = dit.make_alphas_cumprod(dit.make_beta_schedule("linear", 1000))
    torch.manual_seed(args.seed)
    if variant == "diffusers":
        from diffusers import DiTTransformer2DModel

        class Peer(torch.nn.Module):  # per-block timestep and label embedders, each dropping labels on its own
            num_classes = 10

            def __init__(self):
                super().__init__()
                self.net = DiTTransformer2DModel(
                    num_attention_heads=args.heads, attention_head_dim=args.width // args.heads, in_channels=3,
                    out_channels=3, num_layers=args.depth, sample_size=args.img_size, patch_size=args.patch,
                    num_embeds_ada_norm=10)

            def forward(self, x, t, y):
                return self.net(x, t, class_labels=y).sample

        model, drop_labels = Peer(), False
    else:
        model, drop_labels = dit.DiT(args.img_size, args.patch, 3, args.width, args.depth, args.heads, 4.0, 10), True
        if variant == "dit-label-std1":
            torch.nn.init.normal_(model.y_embedder.weight, std=1.0)
        if variant == "dit-adaln-default-init":
            for module in list(model.blocks) + [model.final_layer]:
                module.adaLN_modulation[1].reset_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    abar = alphas_cumprod.float()
    asked = torch.arange(10 * args.samples_per_class) % 10
    x_T = torch.randn(len(asked), 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(5))
    start, judging, rows = time.time(), 0.0, []
    for step in range(1, max(args.plain_steps) + 1):
        model.train()
        index = torch.randint(0, len(x_all), (args.batch_size,), generator=generator)
        x0, y = x_all[index], y_all[index]
        if drop_labels:
            y = torch.where(torch.rand(len(y), generator=generator) < 0.1, 10, y)
        t = torch.randint(0, 1000, (len(y),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = abar[t][:, None, None, None]
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step not in args.plain_steps:
            continue
        model.eval()  # judged at this step (the raw weights); sampling draws nothing from the training generator
        judge_start, row = time.time(), []
        for scale in args.cfg_scales:
            with torch.no_grad():
                out = dit.sample_images(dit.guided_model_fn(model, asked, scale), x_T, alphas_cumprod, "ddim",
                                        args.sampling_steps)
            row.append((scale, float((judge.predict(to_features(out.numpy())) == asked.numpy()).mean())))
        signal = "" if variant == "diffusers" else "; " + class_signal(dit, model, x_all, alphas_cumprod)
        judging += time.time() - judge_start
        print(f"plain loop {variant}: {step} steps ({time.time() - start - judging:.0f} s of training), last loss "
              f"{loss.item():.4f}, class accuracy " + ", ".join(f"guidance {s:g}: {a:.3f}" for s, a in row)
              + f"{signal} ({stamp()})", flush=True)
        rows.append((step, row))
    return rows


def main():
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["dit", "ddpm", "both"], default="dit")
    parser.add_argument("--work-dir", default="runs/digits", help="the image folder and the runs go here")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    # DiT: the setting (#14)
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--epochs", type=int, nargs="+", default=[220],
                        help="DiT epochs (28 steps each at batch 64); several: one run, resumed to each and judged")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 3.0])
    # DDPM: a small U-Net
    parser.add_argument("--ddpm-steps", type=int, default=6000)
    parser.add_argument("--ddpm-channels", type=int, default=32)
    # sampling and judging
    parser.add_argument("--samples-per-class", type=int, default=30)
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--plain-loop", nargs="+", choices=PLAIN_LOOP_MODELS, default=[],
                        help="instead of the scripts: these models in a plain loop (the bisection of issue #14)")
    parser.add_argument("--plain-steps", type=int, nargs="+", default=[600], help="judged after each")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further flags for the scripts")
    args = parser.parse_args()

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"digits{args.img_size}"
    images, labels = make_digits_folder(folder, args.img_size)
    judge, real_accuracy, real_confident = train_judge(images, labels, args.seed)
    print(f"digits: {len(images)} images of {args.img_size}x{args.img_size} in {folder}; judge (logistic regression) "
          f"on held-out real digits: accuracy {real_accuracy:.3f}, confident (p > 0.9) {real_confident:.3f}; "
          f"{stamp()}")
    if args.plain_loop:
        for variant in args.plain_loop:
            plain_loop(variant, folder, judge, args)
        return
    log = work / "log.txt"
    common = ["--dataset", "folder", "--data-dir", folder, "--img-size", args.img_size, "--no-random-flip",
              "--seed", args.seed, "--output-dir", work / "runs", "--log-every", 50]
    num_samples = 10 * args.samples_per_class
    sampling = ["--sample-only", "--sampler", "ddim", "--num-sampling-steps", args.sampling_steps,
                "--num-samples", num_samples, "--sample-batch-size", min(num_samples, 500)]

    if args.model in ("dit", "both"):
        import torch

        dit = load_dit_module()
        x_all = torch.from_numpy(dit.load_image_folder(str(folder), args.img_size)[0]).float() / 127.5 - 1
        alphas_cumprod = dit.make_alphas_cumprod(dit.make_beta_schedule("linear", 1000))
        run_dir = None
        for epochs in sorted(args.epochs):  # the first budget trains from scratch, each further one resumes the run
            if run_dir is None:
                train = run(["dit_cifar10.py", *common, "--num-classes", 10, "--patch", args.patch, "--width",
                             args.width, "--depth", args.depth, "--heads", args.heads, "--batch-size",
                             args.batch_size, "--learning-rate", args.learning_rate, "--ema-decay", args.ema_decay,
                             "--epochs", epochs, "--eval-every", 10 ** 6, "--save-every", 10 ** 6, "--sampler",
                             "ddim", "--num-sampling-steps", args.sampling_steps, "--samples-per-class", 2,
                             *args.extra], log)  # a small final grid
                run_dir = run_folder(train)
            else:
                run(["dit_cifar10.py", "--resume", run_dir, "--epochs", epochs], log)
            steps = epochs * (len(images) // args.batch_size)
            rows = []
            for scale in args.cfg_scales:  # every class in turn, the labels beside the images in the .npz
                out = samples_of(run(["dit_cifar10.py", "--resume", run_dir, *sampling, "--cfg-scale", scale], log))
                predicted = judge.predict(to_features(out["images"]))
                per_class = [float((predicted[out["labels"] == k] == k).mean()) for k in range(10)]
                rows.append((scale, float((predicted == out["labels"]).mean()), min(per_class), max(per_class)))
            print(f"\nDiT on digits, {steps} steps ({epochs} epochs), EMA {args.ema_decay}, lr {args.learning_rate}, "
                  f"patch {args.patch}, width {args.width}, depth {args.depth}; {num_samples} samples, DDIM-"
                  f"{args.sampling_steps}; {run_dir}; {stamp()}")
            print("| guidance | class accuracy | worst class | best class | chance | real vs real |")
            print("|---|---|---|---|---|---|")
            for scale, accuracy, worst, best in rows:
                print(f"| {scale:g} | {accuracy:.3f} | {worst:.2f} | {best:.2f} | 0.100 | {real_accuracy:.3f} |",
                      flush=True)
            # the EMA weights sampled above: how loud their class is
            print(class_signal(dit, load_script_model(dit, run_dir, args), x_all, alphas_cumprod), flush=True)

    if args.model in ("ddpm", "both"):
        train = run(["ddpm_cifar10.py", *common, "--channels", args.ddpm_channels, "--channel-mult", 1, 2, 2,
                     "--num-res-blocks", 1, "--attn-resolutions", args.img_size // 2, "--dropout", 0.0,
                     "--batch-size", args.batch_size, "--learning-rate", 2e-4, "--warmup-steps", 200,
                     "--ema-decay", args.ema_decay, "--total-steps", args.ddpm_steps, "--eval-every", 10 ** 7,
                     "--save-every", 10 ** 7, "--sampler", "ddim", "--num-sampling-steps", args.sampling_steps,
                     "--num-eval-samples", 8, *args.extra], log)  # a small final grid
        run_dir = run_folder(train)
        out = samples_of(run(["ddpm_cifar10.py", "--resume", run_dir, *sampling], log))
        probabilities = judge.predict_proba(to_features(out["images"]))
        histogram = np.bincount(probabilities.argmax(1), minlength=10) / len(probabilities)
        print(f"\nDDPM (unconditional) on digits, {args.ddpm_steps} steps, EMA {args.ema_decay}; {num_samples} "
              f"samples, DDIM-{args.sampling_steps}; {run_dir}")
        print(f"confident (p > 0.9): {(probabilities.max(1) > 0.9).mean():.3f} (real held-out digits: "
              f"{real_confident:.3f})")
        print("class histogram: " + " ".join(f"{h:.2f}" for h in histogram) + " (uniform: 0.10 each; total "
              f"variation from uniform {0.5 * np.abs(histogram - 0.1).sum():.3f})")


if __name__ == "__main__":
    main()
