# cleanworlds benchmark: training and sampling speed of each script's default model beside a peer. Results: RESULTS.md
"""
Measures, in one process on one machine, the training step and the sampling forward pass of each script's default
model beside a peer implementation of the same model:

    ddpm     ddpm_cifar10.UNet (35,746,307 parameters)   vs diffusers UNet2DModel built with the same config
    dit      dit_cifar10.DiT (seed config, 16.5M)       vs diffusers DiTTransformer2DModel (same config, 17.8M)
    diamond  diamond_atari denoiser training step and one imagination step (32 imagined envs)   (no peer)
    video    video_diffusion.VideoDiffusionModel (16 frames of 64x64)                          (no peer)

Every candidate (each variant of ours, the peer, and a plain matmul) is timed in turn, round-robin, several times,
so that a change in machine load hits all of them alike; the table gives the median time per step, its spread (min
and max over the repetitions), images (clips, frames) per second, the ratio to the peer (peer time / our time: above
1 means ours is faster) of the medians and of the fastest repetitions (the least disturbed on a loaded machine),
and the achieved FLOP/s as a fraction of a 2048x2048 fp32 matmul measured in the same rounds (on CUDA: model FLOPs
utilisation against the GPU's bf16 dense peak, with bf16 autocast). FLOPs are counted by torch.utils.flop_counter
over one forward (sampling) or forward + backward (training) of each model, on the meta device.

    python benchmark/speed.py --quick                     # about 80 s on 2 quiet CPU cores, all four
    python benchmark/speed.py --only ddpm --compile       # also torch.compile variants (slow to compile on a CPU)
    python benchmark/speed.py --device cuda               # GPU: bf16 autocast, channels_last, MFU vs the bf16 peak
    python benchmark/speed.py --quick --json speed.json   # keep the numbers
    python benchmark/speed.py --quick --against aab134b   # each script now vs itself at a commit (no peers)
    OMP_WAIT_POLICY=PASSIVE python benchmark/speed.py --quick   # on a machine shared with other jobs (see below)

On a CPU shared with other jobs, OpenMP threads that spin at barriers make some repetitions 10 to 30 times slower
than others (the report warns when the spread is large); OMP_WAIT_POLICY=PASSIVE makes the timings stable (and all of
them slower), which keeps the ratios meaningful.

A training step is forward, MSE loss, backward and an Adam(W) step, in train mode (dropout on where the config has
it). The sampling figure is one network evaluation in eval mode under no_grad: a sampler with N steps makes N of them.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
ALL_BENCHMARKS = ("ddpm", "dit", "diamond", "video")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags (unknown, or of the wrong type) are one line, "error: ...", exit status 2, not the
    usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def load_script(file_name: str, ref: Optional[str] = None):
    """Imports a top-level script by path (the scripts are single files, not packages); with ref, the script as it
    is at that git commit (`git show ref:file_name`, imported from a temporary folder)."""
    name = f"cleanworlds_{Path(file_name).stem}" + (f"_at_{re.sub(r'[^0-9A-Za-z]', '_', ref)}" if ref else "")
    if name in sys.modules:
        return sys.modules[name]
    path = ROOT / file_name
    if ref:
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{file_name}"], capture_output=True, text=True)
        if shown.returncode:
            print(f"error: --against {ref}: git cannot show {file_name} there ({shown.stderr.strip()})",
                  file=sys.stderr)
            sys.exit(2)
        path = Path(tempfile.mkdtemp(prefix="speed_against_")) / file_name
        path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


@dataclass
class Candidate:
    """One thing to time: a step function and the work one step does."""
    label: str
    step: Callable[[], None]
    items_per_step: int  # images, clips or imagined env steps
    flops_per_step: float
    is_peer: bool = False
    is_reference: bool = False  # the matmul
    params: int = 0
    times: list = field(default_factory=list)  # seconds per step, one entry per repetition
    warmup_seconds: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def count_flops(fn: Callable[[], None]) -> float:
    """FLOPs of whatever fn runs (forward, or forward + backward), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def matmul_candidate(device: torch.device) -> Candidate:
    """The yardstick: a 2048x2048 fp32 matmul on the CPU, an 8192x8192 bf16 matmul on CUDA."""
    n, dtype = (2048, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    label = f"matmul {n}x{n} {str(dtype).replace('torch.', '')}"
    return Candidate(label, lambda: torch.mm(a, b), 1, 2.0 * n ** 3, is_reference=True)


def make_train_step(model: nn.Module, forward: Callable[[], torch.Tensor], target: torch.Tensor,
                    autocast, optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[], None]:
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=1e-5, fused=target.is_cuda)

    def step():
        model.train()
        with autocast:
            out = forward()
        loss = F.mse_loss(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_sample_step(model: nn.Module, forward: Callable[[], torch.Tensor], autocast) -> Callable[[], None]:
    def step():
        model.eval()
        with torch.no_grad(), autocast:
            forward()

    return step


def model_flops(model: nn.Module, call: Callable, inputs: tuple, train: bool) -> float:
    """FLOPs of call(model, *inputs) (and its backward when train), counted on a copy of the model on the meta device:
    no arithmetic runs, and scaled_dot_product_attention is counted through its math decomposition (the CPU's fused
    attention kernel is invisible to the FLOP counter). Falls back to counting a real run."""
    import copy

    def run(m, args):
        m.train(train)
        if train:
            call(m, *args).float().square().mean().backward()
        else:
            with torch.no_grad():
                call(m, *args)

    try:
        meta_model = copy.deepcopy(model).to("meta")
        meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
        return count_flops(lambda: run(meta_model, meta_inputs))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: count a real run instead
        result = count_flops(lambda: run(model, inputs))
        model.zero_grad(set_to_none=True)
        return result


def maybe_compile(model: nn.Module, compile_model: bool):
    return torch.compile(model) if compile_model else model


# ----------------------------------------------------------------------------------------------------------------------
# The benchmarks. Each returns (title, training candidates, sampling candidates, notes).


def diffusers_ddpm_unet() -> nn.Module:
    """The DDPM CIFAR-10 U-Net in diffusers: 35,746,307 parameters, as ddpm_cifar10.UNet (equal outputs once the
    weights are copied, tests/test_ddpm_cifar10.py)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False,
                       freq_shift=1, attention_head_dim=None, dropout=0.1)


def diffusers_dit() -> nn.Module:
    """The seed's DiT config in diffusers: patch 4, width 384 (6 heads x 64), depth 6, 10 classes, adaLN-Zero,
    tanh-GELU MLP: 17,797,296 parameters (it embeds timestep and label again in every block)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=3, out_channels=3,
                                 num_layers=6, sample_size=32, patch_size=4, num_embeds_ada_norm=10,
                                 norm_type="ada_norm_zero", activation_fn="gelu-approximate",
                                 norm_elementwise_affine=False, norm_eps=1e-6)


def bench_ddpm(cfg) -> tuple:
    ddpm = load_script("ddpm_cifar10.py", cfg.ref)
    device, batch, sample_batch = cfg.device, cfg.ddpm_batch, cfg.ddpm_sample_batch

    def ours():
        return ddpm.UNet()  # the paper's CIFAR-10 config: 128 ch, (1, 2, 2, 2), 2 blocks, attention at 16, dropout 0.1

    def inputs(b, channels_last):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, 3, 32, 32, generator=g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, 1000, (b,), generator=g).to(device)

    def call_ours(net, x, t):
        return net(x, t)

    def call_peer(net, x, t):
        return net(x, t).sample

    train, sample = [], []
    variants = [(False, False), (True, False)] + ([(False, True), (True, True)] if cfg.compile else [])
    for is_peer in (False, True):
        call = call_peer if is_peer else call_ours
        for channels_last, compiled in variants:
            name = ("diffusers UNet2DModel" if is_peer else "ddpm_cifar10.UNet") + \
                   (" channels_last" if channels_last else "") + (" compile" if compiled else "")
            model = (diffusers_ddpm_unet if is_peer else ours)().to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            net = maybe_compile(model, compiled)
            params = sum(p.numel() for p in model.parameters())
            one = inputs(1, channels_last)
            x, t = inputs(batch, channels_last)
            noise = torch.randn(x.shape, device=device)
            xs, ts = inputs(sample_batch, channels_last)
            train_forward = partial(call, net, x, t)
            sample_forward = partial(call, net, xs, ts)
            train.append(Candidate(name, make_train_step(model, train_forward, noise, cfg.autocast), batch,
                                   model_flops(model, call, one, train=True) * batch, is_peer, params=params))
            sample.append(Candidate(name, make_sample_step(model, sample_forward, cfg.autocast), sample_batch,
                                    model_flops(model, call, one, train=False) * sample_batch, is_peer, params=params))
    return ("DDPM U-Net, CIFAR-10 config (35.7M), 32x32", train, sample,
            [f"training batch {batch}, sampling batch {sample_batch}; dropout 0.1 in training, as the paper"])


def bench_dit(cfg) -> tuple:
    dit = load_script("dit_cifar10.py", cfg.ref)
    device, batch, sample_batch = cfg.device, cfg.dit_batch, cfg.dit_sample_batch

    def inputs(b):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, 3, 32, 32, generator=g).to(device)
        t = torch.randint(0, 1000, (b,), generator=g).to(device)
        return x, t, torch.randint(0, 10, (b,), generator=g).to(device)

    def call_ours(net, x, t, y):
        return net(x, t, y)

    def call_peer(net, x, t, y):
        return net(x, timestep=t, class_labels=y, return_dict=False)[0]

    train, sample = [], []
    for is_peer in (False, True):
        call = call_peer if is_peer else call_ours
        for compiled in ((False, True) if cfg.compile else (False,)):
            name = "diffusers DiTTransformer2DModel" if is_peer else "dit_cifar10.DiT"
            name += " compile" if compiled else ""
            model = (diffusers_dit() if is_peer else dit.DiT()).to(device)
            net = maybe_compile(model, compiled)
            params = sum(p.numel() for p in model.parameters())
            one, (x, t, y), (xs, ts, ys) = inputs(1), inputs(batch), inputs(sample_batch)
            train_forward, sample_forward = partial(call, net, x, t, y), partial(call, net, xs, ts, ys)
            train.append(Candidate(name, make_train_step(model, train_forward, torch.randn(x.shape, device=device),
                                                         cfg.autocast), batch,
                                   model_flops(model, call, one, train=True) * batch, is_peer, params=params))
            sample.append(Candidate(name, make_sample_step(model, sample_forward, cfg.autocast), sample_batch,
                                    model_flops(model, call, one, train=False) * sample_batch, is_peer, params=params))
    return ("DiT, the seed's CIFAR-10 config (patch 4, width 384, depth 6, 6 heads, adaLN-Zero), 32x32", train, sample,
            [f"training batch {batch}, sampling batch {sample_batch}; diffusers' model has 1.25M more parameters "
             f"(a timestep and label embedder in every block)"])


def bench_diamond(cfg) -> tuple:
    diamond = load_script("diamond_atari.py", cfg.ref)
    device, batch, envs = cfg.device, cfg.diamond_batch, cfg.diamond_envs
    args = diamond.Args()
    num_actions = 4  # Breakout's minimal action set
    c, n = args.num_conditioning_steps, args.num_autoregressive_steps
    size = args.obs_size
    train, sample = [], []
    for compiled in ((False, True) if cfg.compile else (False,)):
        suffix = " compile" if compiled else ""
        denoiser, reward_end, actor_critic = (m.to(device) for m in diamond.build_models(args, num_actions))
        net = maybe_compile(denoiser.net, compiled)
        params = sum(p.numel() for p in denoiser.parameters())
        g = torch.Generator().manual_seed(0)
        # DIAMOND's segments: c + 1 + n frames (4 + 1 + 1), 1 + n denoiser predictions per training step
        obs = (torch.rand(batch, c + 1 + n, 3, size, size, generator=g) * 2 - 1).to(device)
        actions = torch.randint(0, num_actions, (batch, c + n), generator=g).to(device)
        mask = torch.ones(batch, c + 1 + n, dtype=torch.bool, device=device)
        optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.learning_rate, eps=args.adam_eps,
                                      weight_decay=args.weight_decay)
        generator = torch.Generator(device=device).manual_seed(0)

        def loss_fn(b=batch, net=net):
            with cfg.autocast:
                return diamond.denoiser_loss(denoiser, obs[:b], actions[:b], mask[:b], args, generator, net)

        def denoiser_step(net=net):
            denoiser.train()
            loss = loss_fn(net=net)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), args.denoiser_max_grad_norm)
            optimizer.step()

        def count_train():
            loss_fn(1, denoiser.net).backward()
            denoiser.zero_grad(set_to_none=True)

        denoiser.train()
        train.append(Candidate(f"denoiser training step (batch {batch}){suffix}", denoiser_step, batch,
                               count_flops(count_train) * batch, params=params))

        # One imagination step for `envs` imagined envs, as WorldModelEnv.step and the actor do it: the next frame
        # (num_sampling_steps denoiser calls), the reward/end model on the new transition, the actor-critic on it.
        past = (torch.rand(envs, c, 3, size, size, generator=g) * 2 - 1).to(device)
        act = torch.randint(0, num_actions, (envs, c), generator=g).to(device)

        def imagination_step(net=net, k=envs):
            denoiser.eval(), reward_end.eval(), actor_critic.eval()
            with torch.no_grad():
                next_obs = diamond.generate_next_obs(denoiser, past[:k], act[:k], args, generator, net, cfg.autocast)
                with cfg.autocast:
                    reward_end(past[:k, -1:], act[:k, -1:], next_obs[:, None])  # (LSTM state: zeros here)
                    actor_critic(next_obs)

        imagination_params = sum(p.numel() for m in (denoiser, reward_end, actor_critic) for p in m.parameters())
        sample.append(Candidate(f"imagination step ({envs} envs, {args.num_sampling_steps} Euler steps){suffix}",
                                imagination_step, envs,
                                count_flops(lambda: imagination_step(denoiser.net, 1)) * envs,
                                params=imagination_params))
    return ("DIAMOND world model (Atari 100k defaults, 64x64, 4 actions)", train, sample,
            [f"denoiser training: batch {batch} segments, AdamW + clipping as the script; imagination: {envs} envs "
             f"(params column: denoiser + reward/end model + actor-critic); no peer: see the fraction of matmul"])


def bench_video(cfg) -> tuple:
    video = load_script("video_diffusion.py", cfg.ref)
    device, batch, sample_batch = cfg.device, cfg.video_batch, cfg.video_sample_batch
    args = video.Args()
    args.num_frames = cfg.video_frames or args.num_frames

    def inputs(b):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, 3, args.num_frames, args.img_size, args.img_size, generator=g).to(device)
        return x, torch.randint(0, args.timesteps, (b,), generator=g).to(device)

    def call(net, x, t):
        return net(x, t)

    train, sample = [], []
    for compiled in ((False, True) if cfg.compile else (False,)):
        model = video.build_model(args, len(video.SPECIAL_TOKENS), 0).to(device)
        net = maybe_compile(model, compiled)
        params = sum(p.numel() for p in model.parameters())
        one, (x, t), (xs, ts) = inputs(1), inputs(batch), inputs(sample_batch)
        name = "VideoDiffusionModel" + (" compile" if compiled else "")
        train.append(Candidate(name, make_train_step(model, partial(call, net, x, t),
                                                     torch.randn(x.shape, device=device), cfg.autocast), batch,
                               model_flops(model, call, one, train=True) * batch, params=params))
        sample.append(Candidate(name, make_sample_step(model, partial(call, net, xs, ts), cfg.autocast),
                                sample_batch, model_flops(model, call, one, train=False) * sample_batch,
                                params=params))
    return (f"Video diffusion 3D U-Net (defaults: {args.model_channels} ch, {args.num_frames} frames of "
            f"{args.img_size}x{args.img_size}, no text or actions)", train, sample,
            [f"training batch {batch} clips, sampling batch {sample_batch}; no peer: see the fraction of matmul"])


BENCHMARKS = {"ddpm": bench_ddpm, "dit": bench_dit, "diamond": bench_diamond, "video": bench_video}


# ----------------------------------------------------------------------------------------------------------------------
# Timing and the report


def run_round_robin(candidates: list[Candidate], cfg) -> None:
    """Warm each candidate up, pick how many steps make one timed repetition (about cfg.target_seconds), then time
    them in turn, rotating the order every repetition, cfg.repeats times."""
    steps_per_repeat = {}
    for c in candidates:
        synchronize(cfg.device)
        start = time.perf_counter()
        for _ in range(max(cfg.warmup_steps, 1)):
            c.step()
        synchronize(cfg.device)
        c.warmup_seconds = time.perf_counter() - start
        one = c.warmup_seconds / max(cfg.warmup_steps, 1)
        if cfg.device.type == "cuda" or cfg.compile:  # the warm-up included compilation: time one more step
            start = time.perf_counter()
            c.step()
            synchronize(cfg.device)
            one = time.perf_counter() - start
        steps_per_repeat[c.label] = max(1, min(cfg.max_steps_per_repeat, round(cfg.target_seconds / max(one, 1e-6))))
    for r in range(cfg.repeats):
        shift = r % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            k = steps_per_repeat[c.label]
            synchronize(cfg.device)
            start = time.perf_counter()
            for _ in range(k):
                c.step()
            synchronize(cfg.device)
            c.times.append((time.perf_counter() - start) / k)


def format_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def report(title: str, kind: str, candidates: list[Candidate], reference: Candidate, cfg, notes) -> tuple[str, list]:
    ref_flops = reference.flops_per_step / reference.median
    peers = [c for c in candidates if c.is_peer]
    peer_default = peers[0] if peers else None
    best_peer = min(peers, key=lambda c: c.median) if peers else None
    measure = "MFU (bf16 peak)" if cfg.device.type == "cuda" else "fraction of matmul FLOP/s"
    unit = {"train": "items/s", "sample": "items x NFE/s"}[kind]
    versus = f"vs {peer_default.label}" if peers else "vs peer"
    lines = [f"| {kind}: model | params | ms/step median [min, max] | {unit} | {versus} (median) | (min) | {measure} "
             f"| GFLOP/step |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for c in candidates:
        achieved = c.flops_per_step / c.median
        utilisation = achieved / (cfg.peak_flops if cfg.device.type == "cuda" else ref_flops)
        ratio = peer_default.median / c.median if peers else None
        # the ratio of the fastest repetitions: on a loaded machine, the least disturbed measurement of each
        ratio_min = min(peer_default.times) / min(c.times) if peers else None
        lines.append(f"| {c.label} | {c.params / 1e6:.2f}M | {format_time(c.median)} [{format_time(min(c.times))}, "
                     f"{format_time(max(c.times))}] | {c.items_per_step / c.median:.1f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {'' if ratio is None else f'{ratio_min:.2f}x'} | "
                     f"{utilisation:.2f} | {c.flops_per_step / 1e9:.1f} |")
        rows.append(dict(benchmark=title, kind=kind, label=c.label, is_peer=c.is_peer, params=c.params,
                         items_per_step=c.items_per_step, median_s=c.median, min_s=min(c.times), max_s=max(c.times),
                         times_s=c.times, items_per_s=c.items_per_step / c.median, ratio_vs_peer=ratio,
                         ratio_vs_peer_min=ratio_min,
                         flops_per_step=c.flops_per_step, utilisation=utilisation, warmup_s=c.warmup_seconds))
    summary = []
    ours = [c for c in candidates if not c.is_peer]
    if peers:
        best = min(ours, key=lambda c: c.median)
        fastest_ratio = min(min(c.times) for c in peers) / min(min(c.times) for c in ours)
        summary.append(f"best of ours: {best.label}, {best_peer.median / best.median:.2f}x the best peer variant "
                       f"({best_peer.label}), {peer_default.median / best.median:.2f}x {peer_default.label} (medians; "
                       f"fastest repetitions: {fastest_ratio:.2f}x the best peer variant)")
    spread = max(max(c.times) / min(c.times) for c in candidates)
    if spread > 1.5:  # a busy machine: oversubscribed OpenMP threads make some repetitions many times slower
        summary.append(f"warning: unstable timings (slowest / fastest repetition up to {spread:.1f}x): the machine is "
                       f"busy; the medians are unreliable: quote the fastest repetitions, or measure again with "
                       f"OMP_WAIT_POLICY=PASSIVE or on a quiet machine")
    text = "\n".join(lines) + "\n" + "".join(f"\n{s}" for s in summary)
    return text, rows


@dataclass
class Config:
    device: torch.device
    quick: bool
    compile: bool
    repeats: int
    warmup_steps: int
    target_seconds: float
    max_steps_per_repeat: int
    autocast: object
    peak_flops: float
    ddpm_batch: int
    ddpm_sample_batch: int
    dit_batch: int
    dit_sample_batch: int
    diamond_batch: int
    diamond_envs: int
    video_batch: int
    video_sample_batch: int
    video_frames: int
    ref: Optional[str] = None  # --against: the scripts at this git commit


def make_config(ns) -> Config:
    device = torch.device(ns.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here (use --device cpu)", file=sys.stderr)
        sys.exit(2)
    peak = float("nan")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        ddpm = load_script("ddpm_cifar10.py")
        peak = ddpm.peak_flops(ddpm.Setup(device), "bfloat16")  # the scripts' table of bf16 dense peaks
    scale = 8 if cuda else 1
    return Config(
        device=device, quick=ns.quick, compile=ns.compile, repeats=ns.repeats or (3 if ns.quick else 7),
        warmup_steps=3 if cuda else 1, target_seconds=(0.3 if ns.quick else 1.0) if not cuda else 0.5,
        max_steps_per_repeat=50, autocast=torch.autocast("cuda", dtype=torch.bfloat16) if cuda
        else contextlib.nullcontext(), peak_flops=peak,
        ddpm_batch=ns.batch_size or (8 if ns.quick and not cuda else 16) * scale,
        ddpm_sample_batch=ns.batch_size or (8 if ns.quick and not cuda else 16) * scale,
        dit_batch=ns.batch_size or 32 * (4 if cuda else 1), dit_sample_batch=ns.batch_size or 32 * (4 if cuda else 1),
        # DIAMOND's batch is 32 segments and 32 imagined envs; a CPU --quick run times 8 of each
        diamond_batch=8 if ns.quick and not cuda else 32, diamond_envs=8 if ns.quick and not cuda else 32,
        # The default video model makes 3.9 TFLOP per forward of a 16-frame 64x64 clip: a CPU times 1-frame clips
        # (the same layers; temporal attention over one frame is trivial) unless --video-frames says otherwise.
        video_batch=8 if cuda else 1, video_sample_batch=8 if cuda else 1,
        video_frames=ns.video_frames or (0 if cuda else 1))


def main(argv=None) -> list:
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 short repetitions (about 80 s on 2 quiet cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", default=",".join(ALL_BENCHMARKS), help=f"comma-separated subset of {ALL_BENCHMARKS}")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per candidate (3 quick, 7)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the DDPM/DiT batch sizes")
    parser.add_argument("--video-frames", type=int, default=None, help="frames per clip (16 on CUDA, 1 on a CPU)")
    parser.add_argument("--skip-sampling", action="store_true", help="time the training steps only")
    parser.add_argument("--json", default=None, help="write every number to this JSON file")
    parser.add_argument("--against", default=None, metavar="COMMIT",
                        help="time each script's models against the same script at this git commit (in place of "
                             "the peers): the ratio says whether a change made a step slower")
    ns = parser.parse_args(argv)
    selected = [name.strip() for name in ns.only.split(",") if name.strip()]
    unknown = [name for name in selected if name not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark {', '.join(unknown)} (choose from {', '.join(ALL_BENCHMARKS)})",
              file=sys.stderr)
        sys.exit(2)
    cfg = make_config(ns)
    torch.manual_seed(0)
    header = (f"device {cfg.device}"
              + (f" ({torch.cuda.get_device_name(cfg.device)}, bf16 peak {cfg.peak_flops / 1e12:.0f} TFLOP/s)"
                 if cfg.device.type == "cuda" else f" ({platform.processor() or platform.machine()}, "
                                                   f"{torch.get_num_threads()} threads)")
              + f"; torch {torch.__version__}; {'quick' if cfg.quick else 'full'}: {cfg.repeats} repetitions; "
                f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(header, flush=True)
    all_rows = []
    for name in selected:
        print(f"\n## {name}   (load average before: {load_average()})", flush=True)
        try:
            title, train, sample, notes = BENCHMARKS[name](cfg)
            if ns.against:  # the peers are the same script at that commit, timed in the same rounds
                _, train_then, sample_then, _ = BENCHMARKS[name](dataclasses.replace(cfg, ref=ns.against))
                train, sample = ([c for c in now if not c.is_peer] + [
                    dataclasses.replace(c, label=f"{c.label} @ {ns.against}", is_peer=True, times=[])
                    for c in then if not c.is_peer] for now, then in ((train, train_then), (sample, sample_then)))
        except (ImportError, FileNotFoundError, AttributeError, TypeError) as e:  # a script not there (yet)
            print(f"skipped: {e.__class__.__name__}: {e}", flush=True)
            continue
        print(title, flush=True)
        for kind, candidates in (("train", train), ("sample", sample)):
            if kind == "sample" and ns.skip_sampling:
                continue
            reference = matmul_candidate(cfg.device)
            start = time.perf_counter()
            run_round_robin(candidates + [reference], cfg)
            text, rows = report(title, kind, candidates, reference, cfg, notes)
            matmul_rate = reference.flops_per_step / reference.median
            print(text)
            low, high = reference.flops_per_step / max(reference.times), reference.flops_per_step / min(reference.times)
            print(f"({reference.label}: {matmul_rate / 1e9:.1f} GFLOP/s median [{low / 1e9:.1f}, {high / 1e9:.1f}]; "
                  f"{time.perf_counter() - start:.0f} s; "
                  f"load average after: {load_average()})", flush=True)
            for row in rows:
                row.update(matmul_flops_per_s=matmul_rate, load_average=load_average(), device=str(cfg.device))
            all_rows += rows
        for note in notes:
            print(f"note: {note}")
        del train, sample
    if ns.json:
        Path(ns.json).write_text(json.dumps(dict(header=header, rows=all_rows), indent=1))
        print(f"\nwrote {ns.json}")
    return all_rows


if __name__ == "__main__":
    main()
