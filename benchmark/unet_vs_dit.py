# cleanworlds benchmark: the seed's U-Net vs DiT comparison at the same data and compute budget. Results: RESULTS.md
"""
Trains ddpm_cifar10.py (U-Net) and dit_cifar10.py (DiT, unconditional: --num-classes 0) on the same generated
shapes images for the same wall-clock budget each, one after the other on the same machine, then samples both with
the same sampler (DDPM, respaced to --num-sampling-steps) through their own --sample-only, and reports parameters,
training FLOPs per image, optimizer steps and images per second reached in the budget, and sample quality.

The budget is enforced the way a user stops a run: SIGTERM after --budget-seconds (the scripts finish the step,
save and exit 0), so both runs pay the same start-up cost inside it. Quality is the Frechet distance on the features
of benchmark/samplers.py's small CNN classifier trained here on the shapes labels ("FD-shapes-CNN": FID's formula,
another network; its values mean nothing outside this benchmark), against held-out real images, with the distances
of three other real sets of the same size as the floor (a range: at a few hundred images it spreads widely).

    python benchmark/unet_vs_dit.py                          # 16x16 shapes, 5 minutes each on a CPU
    python benchmark/unet_vs_dit.py --budget-seconds 1800 --num-samples 2000
    python benchmark/unet_vs_dit.py --dit-args "--patch 4"   # extra flags for one side
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmark"))
from samplers import (FLOOR_SEED, HELDOUT_SEED, features_of, frechet_distance, load_script,  # noqa: E402
                      train_feature_net)

# The same data, optimizer settings and cadence for both; each side's network at about the same parameter count.
# EMA 0.99: a CPU budget buys about a thousand steps, after which a 0.999 average would still hold 0.999^1000 = 37% of
# the random initial weights.
COMMON = ["--dataset", "shapes", "--num-shapes-images", "8192", "--batch-size", "64", "--learning-rate", "5e-4",
          "--ema-decay", "0.99", "--log-every", "50", "--save-every", "1000000", "--eval-every", "1000000",
          "--sampler", "ddpm", "--exp-name", "unet_vs_dit"]
UNET = ["--channels", "64", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--attn-resolutions", "8",
        "--dropout", "0", "--warmup-steps", "100", "--total-steps", "100000000"]
DIT = ["--num-classes", "0", "--patch", "2", "--width", "192", "--depth", "6", "--heads", "3", "--warmup-steps", "100",
       "--epochs", "1000000"]
SCRIPTS = {"U-Net (ddpm_cifar10.py)": ("ddpm_cifar10.py", UNET), "DiT (dit_cifar10.py)": ("dit_cifar10.py", DIT)}


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


def train_for(script: str, args: list[str], output_dir: Path, budget_seconds: float) -> tuple[Path, float]:
    """Runs the script until the budget is spent, then stops it with SIGTERM; returns its run folder and the seconds
    it ran."""
    output_dir.mkdir(parents=True, exist_ok=True)
    before = set(output_dir.iterdir())
    cmd = [sys.executable, str(ROOT / script), *args, "--output-dir", str(output_dir)]
    print(f"training for {budget_seconds:.0f} s: python {script} {' '.join(args)}", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = process.communicate(timeout=budget_seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the scripts finish the step, save and exit 0
        out, err = process.communicate(timeout=600)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{script} failed (exit {process.returncode}): {last}")
    new = sorted(set(output_dir.iterdir()) - before)
    if not new or not (new[-1] / "checkpoints" / "latest.pt").exists():
        raise UserError(f"{script} wrote no checkpoint in {budget_seconds:.0f} s: give it a larger --budget-seconds")
    return new[-1], seconds


def sample_run(script: str, run_dir: Path, num_samples: int, num_steps: int) -> np.ndarray:
    """The run's --sample-only with the DDPM sampler: uint8 (N, 3, H, W) (the .npz holds (N, H, W, 3), as FID tools
    read it)."""
    cmd = [sys.executable, str(ROOT / script), "--resume", str(run_dir), "--sample-only", "--num-samples",
           str(num_samples), "--sample-batch-size", str(min(num_samples, 500)), "--sampler", "ddpm",
           "--num-sampling-steps", str(num_steps)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"{script} --sample-only failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    newest = max((run_dir / "samples").glob("sample_only_*.npz"), key=lambda p: p.stat().st_mtime)
    with np.load(newest, allow_pickle=False) as data:
        return np.ascontiguousarray(data["arr_0"].transpose(0, 3, 1, 2))


def run_summary(module, run_dir: Path, img_size: int) -> dict:
    """Step, parameters (as the run logged them), images/s and training FLOPs per image of a finished run, from its
    checkpoint (the network rebuilt from the run's own arguments) and its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True, map_location="cpu")
    args = module.Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["args"].items()})
    # forward + backward ~ 3 x forward; both forwards take (x, t) (the unconditional DiT's label defaults to None)
    x, t = torch.zeros(1, 3, img_size, img_size), torch.zeros(1, dtype=torch.long)
    train_flops = 3 * module.forward_flops(lambda: module.build_model(args), x, t)
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    last = {tag: events.Scalars(tag)[-1].value for tag in ("charts/SPS", "losses/mse", "charts/num_parameters")
            if tag in scalars}
    nan = float("nan")
    return {"steps": int(checkpoint["step"]), "parameters": int(last.get("charts/num_parameters", -1)),
            "images_per_second": last.get("charts/SPS", nan), "last_loss": last.get("losses/mse", nan),
            "train_gflop_per_image": train_flops / 1e9}


def main(argv=None) -> dict:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=300, help="wall-clock training budget per model")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=500, help="samples per model, and real images")
    parser.add_argument("--num-sampling-steps", type=int, default=100, help="DDPM steps (respaced) for both")
    parser.add_argument("--feature-steps", type=int, default=400, help="training steps of the feature CNN")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--unet-args", default="", help="extra flags for ddpm_cifar10.py")
    parser.add_argument("--dit-args", default="", help="extra flags for dit_cifar10.py")
    parser.add_argument("--output-dir", default="runs/unet_vs_dit")
    ns = parser.parse_args(argv)
    if ns.budget_seconds <= 0 or ns.num_samples < 2 or ns.num_sampling_steps < 1:
        raise UserError("--budget-seconds, --num-samples (at least 2) and --num-sampling-steps must be positive")
    output_dir = Path(ns.output_dir)
    common = [*COMMON, "--img-size", str(ns.img_size), "--seed", str(ns.seed)]
    extra = {"ddpm_cifar10.py": shlex.split(ns.unet_args), "dit_cifar10.py": shlex.split(ns.dit_args)}

    ddpm = load_script("ddpm_cifar10.py")
    print("training the feature network ...", flush=True)
    feature_net, accuracy = train_feature_net(ddpm, ns.img_size, steps=ns.feature_steps)
    heldout, _ = ddpm.make_shapes_dataset(ns.num_samples, ns.img_size, seed=HELDOUT_SEED)
    heldout_features = features_of(feature_net, heldout)  # (N, 3, H, W) uint8
    # The floor: independent real sets of the same size against the held-out set. At 500 images it spreads widely
    # (19 to 224 over four sets at 16x16), so several are scored and the range is the yardstick.
    floors = [frechet_distance(features_of(feature_net, ddpm.make_shapes_dataset(ns.num_samples, ns.img_size,
                                                                                seed=FLOOR_SEED + k)[0]),
                               heldout_features) for k in range(3)]
    floor = float(np.mean(floors))

    rows = {}
    for label, (script, args) in SCRIPTS.items():
        full_args = [*common, *args, *extra[script]]
        run_dir, seconds = train_for(script, full_args, output_dir, ns.budget_seconds)
        summary = run_summary(load_script(script), run_dir, ns.img_size)
        samples = sample_run(script, run_dir, ns.num_samples, ns.num_sampling_steps)
        fd = frechet_distance(features_of(feature_net, samples), heldout_features)
        rows[label] = {**summary, "seconds": round(seconds, 1), "fd_shapes_cnn": fd, "run": str(run_dir),
                       "command": f"python {script} {' '.join(full_args)}"}
        print(f"{label}: {summary['steps']} steps in {seconds:.0f} s, FD-shapes-CNN {fd:.3f}", flush=True)

    lines = [f"Same data (generated shapes, {ns.img_size}x{ns.img_size}, 8192 images), batch 64, lr 5e-4, EMA 0.99, "
             f"{ns.budget_seconds:.0f} s of training each; DDPM-{ns.num_sampling_steps} samples (EMA weights), "
             f"{ns.num_samples} per model. FD-shapes-CNN floor (real sets vs held-out): {min(floors):.3f} to "
             f"{max(floors):.3f}; "
             f"feature CNN accuracy {accuracy:.1%}.", "",
             "| model | parameters | train GFLOP/image (fwd+bwd ~ 3x fwd) | steps in budget | images/s | last loss "
             "| FD-shapes-CNN |", "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['parameters'] / 1e6:.2f}M | {r['train_gflop_per_image']:.3f} | {r['steps']} | "
                     f"{r['images_per_second']:.0f} | {r['last_loss']:.4f} | {r['fd_shapes_cnn']:.3f} |")
    print("\n".join(lines))
    result = {"rows": rows, "floor": floor, "floors": floors, "feature_accuracy": accuracy, "args": vars(ns),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (output_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
