# cleanworlds: DDPM (Ho et al. 2020) on CIFAR-10. Docs and results: README.md, benchmark/RESULTS.md
"""Denoising diffusion probabilistic models with the paper's 35.7M-parameter U-Net, in one file.

    python ddpm_cifar10.py                                    # the paper's run (FID 3.17 at 800k)
    torchrun --standalone --nproc_per_node=8 ddpm_cifar10.py  # the same on 8 GPUs
    python ddpm_cifar10.py --preset tiny                      # end to end on a CPU in seconds
    python ddpm_cifar10.py --preset cpu                       # shapes in minutes on 2 CPU cores
    python ddpm_cifar10.py --dataset folder --data-dir my_images --img-size 64 --attn-resolutions 16
    python ddpm_cifar10.py --resume RUN --sample-only --sampler ddim --num-sampling-steps 50
"""
import atexit
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT_NAME = "ddpm_cifar10.py"
CHECKPOINT_FORMAT_VERSION = 1
OLDER_CHECKPOINT_FORMATS = ()  # formats a resume converts (none)
# torch.compile's backend (--compile), read at each call: tests put a counting or failing one here
COMPILE_BACKEND = "inductor"
STEPS = tyro.conf.arg(metavar="STEPS")  # a flag's unit in --help (--save-every STEPS): one per name
# Beside an Args field: its domain ('>= 1', '[0, 1)'), and RESUME_MUTABLE if --resume may change it.
RESUME_MUTABLE = "resume-mutable"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: Annotated[int, ">= 0"] = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """CPU: exact resume; CUDA: cudnn.deterministic, CUBLAS_WORKSPACE_CONFIG (close, not bitwise)"""
    cuda: Annotated[bool, RESUME_MUTABLE] = True
    """use CUDA when available (falls back to the CPU with a notice)"""
    track: Annotated[bool, RESUME_MUTABLE] = False
    """log to Weights and Biases as well as TensorBoard"""
    wandb_project_name: Annotated[str, RESUME_MUTABLE] = "cleanworlds"
    """the wandb project name"""
    wandb_entity: Annotated[Optional[str], RESUME_MUTABLE] = None
    """the wandb entity (team)"""
    output_dir: Annotated[str, RESUME_MUTABLE] = "runs"
    """runs are written to {output_dir}/{run_name}/"""
    preset: Optional[Literal["tiny", "cpu"]] = None
    """tiny: a whole run on generated data in seconds on a CPU; cpu: shapes in minutes on 2 cores"""
    config: Annotated[Optional[str], RESUME_MUTABLE] = None
    """a config.json written by an earlier run: its values become the defaults (flags still win)"""
    resume: Optional[str] = None
    """a run folder or checkpoint file to continue exactly where it stopped"""
    sample_only: Annotated[bool, RESUME_MUTABLE] = False
    """with --resume: generate --num-samples images with the checkpoint's EMA weights, and exit"""
    compile: Annotated[bool, RESUME_MUTABLE] = False
    """torch.compile the training step's model (sampling runs the EMA model eagerly)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """autocast dtype on CUDA (float16 uses a GradScaler); the CPU always computes in float32"""
    channels_last: bool = True
    """channels_last memory format for the convolutions (faster on GPUs and on most CPUs)"""

    # Data
    dataset: Literal["cifar10", "folder", "shapes"] = "cifar10"
    """cifar10 (downloaded into --data-dir), folder (PNG/JPG) or shapes (generated, offline)"""
    data_dir: Annotated[str, RESUME_MUTABLE] = "data"
    """where CIFAR-10 is (or is downloaded to), or the image folder"""
    download: Annotated[bool, RESUME_MUTABLE] = True
    """download CIFAR-10 into --data-dir when it is not there"""
    img_size: Annotated[int, ">= 1"] = 32
    """image side length in pixels (folder images are center-cropped and resized to it)"""
    num_shapes_images: Annotated[int, ">= 1"] = 2048
    """size of the generated shapes dataset"""
    random_flip: bool = True
    """random horizontal flips"""

    # Model (the DDPM CIFAR-10 U-Net)
    channels: Annotated[int, ">= 1"] = 128
    """base channel count of the U-Net"""
    channel_mult: Annotated[tuple[int, ...], ">= 1"] = (1, 2, 2, 2)
    """channel multiplier per resolution level"""
    num_res_blocks: Annotated[int, ">= 1"] = 2
    """residual blocks per level on the way down (one more on the way up)"""
    attn_resolutions: Annotated[tuple[int, ...], ">= 1"] = (16,)
    """resolutions (in pixels) with self-attention after each residual block"""
    dropout: Annotated[float, "[0, 1)"] = 0.1
    """dropout in the residual blocks"""

    # Diffusion
    timesteps: Annotated[int, ">= 1"] = 1000
    """number of diffusion steps T"""
    beta_schedule: Literal["linear", "cosine"] = "linear"
    """linear (Ho et al.) or cosine (Nichol and Dhariwal)"""
    beta_start: Annotated[float, "(0, 1)"] = 1e-4
    """beta_1 of the linear schedule at T = 1000; scaled by 1000/T (improved diffusion)"""
    beta_end: Annotated[float, "(0, 1)"] = 0.02
    """beta_T of the linear schedule at T = 1000; scaled by 1000/T, capped at 0.999"""
    prediction: Literal["eps", "v"] = "eps"
    """eps (Ho et al.) or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans and Ho 2022)"""

    # Training
    total_steps: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 800_000
    """optimizer steps to train for"""
    batch_size: Annotated[int, ">= 1"] = 128
    """global batch size (split across torchrun ranks)"""
    learning_rate: Annotated[float, "> 0"] = 2e-4
    """Adam learning rate"""
    warmup_steps: Annotated[int, STEPS, ">= 0"] = 5000
    """linear learning-rate warmup steps"""
    max_grad_norm: Annotated[float, ">= 0"] = 1.0
    """gradient clipping norm (0 turns it off)"""
    ema_decay: Annotated[float, "[0, 1]"] = 0.9999
    """EMA decay of the sampling weights, warmed up: step t uses min(decay, (1 + t) / (10 + t))"""
    log_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 100
    """log losses and throughput every N steps"""
    save_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 10_000
    """write checkpoints/latest.pt every N steps"""
    eval_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 20_000
    """sample a grid from the EMA model every N steps"""
    first_sample_at: Annotated[int, STEPS, ">= 0", RESUME_MUTABLE] = 0
    """also sample 16 images (not judged) at this step: the run's first picture; 0: none"""

    # Sampling and evaluation
    sampler: Annotated[Literal["ddpm", "ddim", "dpm++"], RESUME_MUTABLE] = "ddpm"
    """sampler for the grids, --sample-only and FID"""
    num_sampling_steps: Annotated[int, ">= 1", RESUME_MUTABLE] = 1000
    """network evaluations per sample (ddpm with fewer than T steps is respaced)"""
    ddim_eta: Annotated[float, "[0, 1]", RESUME_MUTABLE] = 0.0
    """DDIM eta (0: deterministic)"""
    num_eval_samples: Annotated[int, ">= 2", RESUME_MUTABLE] = 64
    """images in each sample grid (>= 2: the judge's Frechet distance needs a covariance)"""
    num_samples: Annotated[int, ">= 1", RESUME_MUTABLE] = 64
    """images generated by --sample-only"""
    eval_fid: Annotated[bool, RESUME_MUTABLE] = False
    """FID of EMA samples vs the training set at the end (needs the eval extra)"""
    fid_num_samples: Annotated[int, ">= 2", RESUME_MUTABLE] = 50_000
    """samples for FID (the paper protocol: 50k vs the train set)"""
    sample_batch_size: Annotated[int, ">= 1", RESUME_MUTABLE] = 500
    """batch size when generating many samples"""


# v-prediction: after a short run eps's x0 is far off near t = T (only DDPM-1000 recovers)
CPU_PRESET = dict(
    dataset="shapes", img_size=16, num_shapes_images=8192, channels=32, channel_mult=(1, 2),
    num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, total_steps=2000, batch_size=64,
    learning_rate=1e-3, warmup_steps=100, ema_decay=0.995, log_every=50, save_every=250,
    eval_every=500, first_sample_at=100, prediction="v", sampler="dpm++", num_sampling_steps=20,
    num_eval_samples=128, num_samples=128, fid_num_samples=2000, sample_batch_size=128)
PRESETS = {"cpu": CPU_PRESET, "tiny": dict(
    CPU_PRESET, num_shapes_images=256, total_steps=60, batch_size=16, warmup_steps=10, ema_decay=0.9,
    log_every=10, save_every=30, eval_every=30, first_sample_at=0, num_sampling_steps=10,
    num_eval_samples=16, num_samples=16, fid_num_samples=64, sample_batch_size=64)}
FLAG_ALIASES: dict[str, str] = {}  # flags spelled otherwise on the command line (none here)
# A checkpoint's keys after its header, in checkpoint_state's order (restore_state reads them back).
CHECKPOINT_KEYS = ("args", "step", "rng", "model", "ema", "optimizer", "scheduler", "scaler", "train_generator")


def check_args(args: Args, world_size: int):
    """Settings that cannot work, refused at start-up in one line (before data or a run folder)."""
    check_arg_domains(args)
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world_size} torchrun processes")
    if args.num_sampling_steps > args.timesteps:
        raise UserError(f"--num-sampling-steps must be between 1 and --timesteps {args.timesteps}, "
                        f"not {args.num_sampling_steps}")
    if args.beta_start > args.beta_end:
        raise UserError(f"--beta-start {args.beta_start} must not exceed --beta-end {args.beta_end}")
    if args.img_size % 2 ** (len(args.channel_mult) - 1):
        raise UserError(f"--img-size {args.img_size} must be divisible by 2^{len(args.channel_mult) - 1} (one halving "
                        f"per level of --channel-mult {' '.join(map(str, args.channel_mult))})")
    if args.sample_only and not args.resume:
        raise UserError("--sample-only needs --resume RUN_FOLDER_OR_CHECKPOINT")
    if args.channels % 32:
        raise UserError(f"--channels {args.channels} must be divisible by 32 (GroupNorm with 32 groups)")
    if args.dataset == "cifar10" and args.img_size != 32:
        raise UserError(f"CIFAR-10 images are 32x32: use --img-size 32, not {args.img_size}")


# --------------------------------------------------------------------------------------------------
# Data (CIFAR-10, image folders, shapes: uint8 (N, 3, H, W)), its order, noise schedule (float64)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def load_cifar10(data_dir: str, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's train split, uint8 (50000, 3, 32, 32), int64 labels, from the binary version."""
    root = Path(data_dir)
    folder, archive = root / "cifar-10-batches-bin", root / "cifar-10-binary.tar.gz"
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {data_dir} is a file: give the folder that holds (or will hold) CIFAR-10")
    if not folder.is_dir() and not archive.exists():  # a damaged folder: refused below, never replaced
        put = f"put cifar-10-binary.tar.gz ({CIFAR10_URL}) in {root}/ and run again"
        if not download:
            raise UserError(f"CIFAR-10 not found: {put}")
        root.mkdir(parents=True, exist_ok=True)
        print(f"downloading {CIFAR10_URL} to {root}/ ...", flush=True)
        try:  # into a temporary file, renamed once complete: a failed download leaves nothing
            torch.hub.download_url_to_file(CIFAR10_URL, str(archive))
        except OSError as e:
            raise UserError(f"could not download CIFAR-10 ({e.__class__.__name__}): {put}") from None
    if not folder.is_dir():
        if hashlib.md5(archive.read_bytes()).hexdigest() != CIFAR10_MD5:
            raise UserError(f"{archive} is corrupt (md5 is not {CIFAR10_MD5}): delete it and download it again")
        extracting = root / ".cifar-10-extracting"  # then renamed: a killed extraction leaves nothing
        shutil.rmtree(extracting, ignore_errors=True)
        shutil.unpack_archive(archive, extracting, "gztar", filter="data")
        os.replace(extracting / "cifar-10-batches-bin", folder)
        shutil.rmtree(extracting)
    fix = f"delete the folder {folder} to extract (or download) CIFAR-10 again"
    records = []
    for path in [folder / f"data_batch_{i}.bin" for i in range(1, 6)]:
        if not path.is_file():
            raise UserError(f"{path} is missing (CIFAR-10 has data_batch_1.bin to data_batch_5.bin); {fix}")
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise UserError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records; {fix}")
        records.append(raw.reshape(-1, 3073))  # 1 label byte, then 3x32x32 pixels, channel-major
        if records[-1][:, 0].max() > 9:
            raise UserError(f"{path}: the labels (each record's first byte) are not all in 0..9; {fix}")
    records = np.concatenate(records)
    return np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32)), records[:, 0].astype(np.int64)


def load_image_folder(data_dir: str, img_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every PNG/JPG under data_dir, EXIF-rotated, center-cropped and resized: uint8 (N, 3, S, S);
    its label is its subfolder's index (at any depth), -1 directly in data_dir."""
    import cv2
    from PIL import Image, ImageOps

    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder (--dataset folder reads PNG/JPG images from it)")

    def unreadable(e: OSError):  # os.walk's onerror (Path.rglob would skip the folder without a word)
        raise UserError(f"{e.filename}: cannot read this folder ({e.strerror}); make it readable or move it "
                        f"out of --data-dir")

    paths = sorted(Path(folder) / name for folder, _, names in os.walk(root, onerror=unreadable) for name in names
                   if Path(name).suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not paths:
        raise UserError(f"no PNG/JPG images under {data_dir} (--dataset folder reads images from its subfolders)")
    images = []
    for path in paths:
        if not path.is_file():  # a FIFO or a device would block or never end
            raise UserError(f"{path}: not a regular file; move it out of --data-dir")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror}); make it readable or remove it") from None
        try:
            with Image.open(io.BytesIO(data)) as image:
                rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        except Exception as e:  # noqa: BLE001 - whatever PIL finds wrong in the file, the fix is the same
            kind = Image.registered_extensions()[path.suffix.lower()]  # .jpg -> JPEG
            what = f"{'truncated ' if 'truncated' in str(e).lower() else ''}{kind} that PIL cannot decode"
            raise UserError(f"{path}: {what if data else 'empty file'} ({e.__class__.__name__}); replace it with "
                            f"a valid PNG/JPG or remove it") from None
        h, w, _ = rgb.shape
        side = min(h, w)  # center crop, then resize (INTER_AREA: no aliasing when shrinking)
        square = rgb[(h - side) // 2: (h + side) // 2, (w - side) // 2: (w + side) // 2]
        images.append(cv2.resize(square, (img_size, img_size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1))
    parts = [p.relative_to(root).parts for p in paths]
    class_names = sorted({part[0] for part in parts if len(part) > 1})
    labels = [class_names.index(part[0]) if len(part) > 1 else -1 for part in parts]
    return np.ascontiguousarray(np.stack(images)), np.asarray(labels, dtype=np.int64), class_names


SHAPE_COLOURS = np.array([[230, 25, 25], [25, 200, 25], [40, 80, 240], [240, 220, 30], [230, 40, 230],
                          [30, 220, 220], [250, 140, 20], [240, 240, 240]], dtype=np.uint8)


def make_shapes_dataset(num_images: int, img_size: int, num_classes: int = 10, seed: int = 0):
    """A labelled toy set that trains in seconds: uint8 (N, 3, S, S) shapes on a dark background and
    labels (N,); class k has colour k % 8, a square for k < 8 and a disc above."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_images)
    yy, xx = np.mgrid[0:img_size, 0:img_size]
    images = np.full((num_images, img_size, img_size, 3), 20, dtype=np.uint8)
    for i, k in enumerate(labels):
        r = rng.integers(img_size // 6, img_size // 3 + 1)
        cy, cx = rng.integers(r, img_size - r + 1, size=2)
        square = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        images[i][square if k < 8 else (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = SHAPE_COLOURS[k % 8]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels.astype(np.int64)


def load_dataset(args: Args) -> tuple[np.ndarray, str]:
    """uint8 images (N, 3, H, W), no labels (an unconditional model), and the run name's dataset id."""
    if args.dataset == "cifar10":
        return load_cifar10(args.data_dir, args.download)[0], "cifar10"
    if args.dataset == "folder":
        return load_image_folder(args.data_dir, args.img_size)[0], Path(args.data_dir).resolve().name or "folder"
    return make_shapes_dataset(args.num_shapes_images, args.img_size, seed=args.seed)[0], "shapes"


def global_batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """The step-th global batch of per-epoch shuffles of (seed, epoch): the step is the position."""
    start = step * batch_size
    first, last = start // num_items, (start + batch_size - 1) // num_items  # the epochs the batch spans
    order = torch.cat([torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
                       for epoch in range(first, last + 1)])
    return order[start % num_items: start % num_items + batch_size]


def make_beta_schedule(kind: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """betas (T,) in float64, capped at 0.999: "linear" Ho et al.'s, "cosine" Nichol & Dhariwal."""
    if kind == "linear":  # scaled as improved-diffusion's: a shorter schedule still ends in noise
        scale = 1000 / timesteps  # exactly 1.0 at T = 1000
        return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64).clamp(max=0.999)
    # abar_t = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) pi/2), s = 0.008; beta_t = 1 - abar_t / abar_{t-1}
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


def make_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)  # abar_t = prod_{s<=t} (1 - beta_s)


# --------------------------------------------------------------------------------------------------
# Model: the DDPM U-Net (Ho et al. 2020, appendix B), 35,746,307 parameters at the defaults.


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DDPM's sinusoids: [sin(t w_i), cos(t w_i)], w_i = exp(-ln(10000) i / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResBlock(nn.Module):
    """GN-swish-conv3x3, + Dense(swish(temb)), GN-swish-dropout-conv3x3 (zero-init), shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb_proj(F.silu(temb))[:, :, None, None]
        return self.shortcut(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, residual (zero-init output)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)  # softmax(q k^T / sqrt(C)) v
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out).transpose(1, 2).reshape(x.shape)


class UNet(nn.Module):
    """The DDPM U-Net: the noise eps(x_t, t) for images in [-1, 1] and integer timesteps t (B,)."""

    def __init__(self, img_size: int = 32, in_channels: int = 3, channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.1):
        super().__init__()
        self.channels, self.num_levels, self.num_res_blocks = channels, len(channel_mult), num_res_blocks
        temb_channels = 4 * channels
        self.temb_dense1 = nn.Linear(channels, temb_channels)
        self.temb_dense2 = nn.Linear(temb_channels, temb_channels)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # Down: res blocks (+ attention), stride-2 convs (named downsamples.{i}.conv, as diffusers)
        self.down_blocks, self.down_attns, self.downsamples = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skip_channels, current, resolution = [channels], channels, img_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResBlock(current, channels * mult, temb_channels, dropout))
                current = channels * mult
                self.down_attns.append(AttnBlock(current) if resolution in attn_resolutions else nn.Identity())
                skip_channels.append(current)
            if level != len(channel_mult) - 1:
                self.downsamples.append(nn.ModuleDict({"conv": nn.Conv2d(current, current, 3, stride=2)}))
                skip_channels.append(current)
                resolution //= 2

        self.mid_block1 = ResBlock(current, current, temb_channels, dropout)
        self.mid_attn = AttnBlock(current)
        self.mid_block2 = ResBlock(current, current, temb_channels, dropout)

        # Up: num_res_blocks + 1 per level, each taking a skip connection, then nearest x2, conv3x3.
        self.up_blocks, self.up_attns, self.upsamples = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(ResBlock(current + skip_channels.pop(), channels * mult, temb_channels, dropout))
                current = channels * mult
                self.up_attns.append(AttnBlock(current) if resolution in attn_resolutions else nn.Identity())
            if level != 0:
                self.upsamples.append(nn.ModuleDict({"conv": nn.Conv2d(current, current, 3, padding=1)}))
                resolution *= 2

        self.norm_out = nn.GroupNorm(32, current, eps=1e-6)
        self.conv_out = nn.Conv2d(current, in_channels, 3, padding=1)
        # As the original: Xavier-uniform, zero biases, zero last layers (blocks start as identity)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
                if name.endswith(("conv2", "proj_out", "conv_out")):
                    nn.init.zeros_(module.weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb_dense2(F.silu(self.temb_dense1(timestep_embedding(t, self.channels))))
        skips, n = [h := self.conv_in(x)], self.num_res_blocks
        for level in range(self.num_levels):
            for i in range(level * n, (level + 1) * n):
                skips.append(h := self.down_attns[i](self.down_blocks[i](h, temb)))
            if level < len(self.downsamples):  # TensorFlow's "SAME" padding: bottom/right only
                skips.append(h := self.downsamples[level].conv(F.pad(h, (0, 1, 0, 1))))
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)
        for level in range(self.num_levels):
            for i in range(level * (n + 1), (level + 1) * (n + 1)):
                h = self.up_attns[i](self.up_blocks[i](torch.cat([h, skips.pop()], dim=1), temb))
            if level < len(self.upsamples):
                h = self.upsamples[level].conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


def build_model(args: Args) -> UNet:
    return UNet(args.img_size, 3, args.channels, args.channel_mult, args.num_res_blocks, args.attn_resolutions,
                args.dropout)


# --------------------------------------------------------------------------------------------------
# Samplers of model_fn(x_t, t) -> predicted noise (t: int64 (B,)), x_T, alphas_cumprod (float64, T)


def ddim_timesteps(T: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """The S = num_steps timesteps (descending) before the last step to x0; S = 1: [T-1].
    uniform: diffusers' "leading"; linspace: DiT's respacing; quadratic: DDIM's CIFAR-10 one."""
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be between 1 and T = {T}, not {num_steps}")
    steps = {"uniform": np.arange(num_steps) * T // num_steps, "linspace": np.linspace(0, T - 1, num_steps).round(),
             "quadratic": np.linspace(0, math.sqrt(T * 0.8), num_steps) ** 2}[spacing]
    return [T - 1] if num_steps == 1 else [int(s) for s in steps[::-1]]


def ddpm_sample(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: Optional[int] = None,
                variance: str = "fixed_large", clip_denoised: bool = True,
                generator: Optional[torch.Generator] = None, spacing: str = "uniform") -> torch.Tensor:
    """Ancestral sampling (Ho et al. eq. 6-7): DDIM with eta = 1, its noise of variance beta~_t
    ("fixed_small") or beta_t = 1 - abar_t / abar_prev ("fixed_large", the paper's)."""
    return ddim_sample(model_fn, x_T, alphas_cumprod, num_steps or len(alphas_cumprod), 1.0, spacing, clip_denoised,
                       generator, fixed_large=variance == "fixed_large")


@torch.no_grad()
def ddim_sample(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int,
                eta: float = 0.0, spacing: str = "uniform", clip_denoised: bool = False,
                generator: Optional[torch.Generator] = None, fixed_large: bool = False) -> torch.Tensor:
    """DDIM (Song et al. eq. 12) at ddim_timesteps(T, num_steps, spacing), the last step to abar 1.
    fixed_large: the noise added has variance beta_t, not sigma_t^2 (ddpm_sample)."""
    abar = alphas_cumprod.tolist() + [1.0]  # abar at "t = -1" is 1: the clean image
    x, timesteps = x_T, ddim_timesteps(len(alphas_cumprod), num_steps, spacing)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        abar_t, abar_prev = abar[t], abar[t_prev]
        eps = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)  # (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)
        if clip_denoised:  # clip x0, then re-derive eps from it so that the update stays consistent
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        # sigma_t^2 = eta^2 beta~_t, beta~_t = (1-abar_prev)/(1-abar_t) beta_t, beta_t = 1 - abar_t/abar_prev (eq. 16)
        s = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        # x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - s * s, 0.0)) * eps
        if s > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + (math.sqrt(1 - abar_t / abar_prev) if fixed_large else s) * noise
    return x


@torch.no_grad()
def dpm_solver_sample(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor,
                      num_steps: int, clip_denoised: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) as diffusers': first order at both ends, timesteps
    round(linspace(0, T-1, S+1))[:-1] (S = T: all); clip_denoised thresholds x0 to [-1, 1]."""
    T, abar = len(alphas_cumprod), alphas_cumprod.tolist()
    timesteps = (ddim_timesteps(T, num_steps + 1, "linspace")[:-1] if 0 < num_steps < T
                 else ddim_timesteps(T, num_steps))
    sigmas = [math.sqrt((1 - abar[t]) / abar[t]) for t in timesteps] + [0.0]
    x, previous_x0 = x_T, None
    for i, (t, sigma_s, sigma_t) in enumerate(zip(timesteps, sigmas, sigmas[1:])):
        alpha_s, alpha_t = 1 / math.sqrt(sigma_s ** 2 + 1), 1 / math.sqrt(sigma_t ** 2 + 1)
        eps = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - sigma_s * alpha_s * eps) / alpha_s  # data prediction m = (x - sigma alpha eps) / alpha
        x0 = x0.clamp(-1, 1) if clip_denoised else x0
        if sigma_t == 0:  # the last step (lambda = +inf) returns the data prediction
            return x0
        h = math.log(sigma_s / sigma_t)  # h = lambda_t - lambda_s, lambda = -log sigma
        # D = m0 + (m0 - m1) / (2 r0), r0 = (lambda_s - lambda_prev) / h; first order (D = m0) on the first step
        d = x0 if previous_x0 is None else x0 + (x0 - previous_x0) * h / (2 * math.log(sigmas[i - 1] / sigma_s))
        x = (sigma_t * alpha_t / (sigma_s * alpha_s)) * x - alpha_t * math.expm1(-h) * d  # x_t
        previous_x0 = x0


# ==== BEGIN OPTIONAL: judge ====
# A small CNN, trained once on real images and cached, judges the generated shapes offline (FID
# needs Inception weights). To drop it, delete this block and each line ending "# optional: judge":
#   sed '/^# ==== BEGIN OPTIONAL: judge/,/^# ==== END OPTIONAL: judge/d; /# optional: judge$/d' ddpm_cifar10.py > x.py


def load_or_train_judge(cache_dir: Path, key: str, make_data: Callable[[], tuple[np.ndarray, np.ndarray]],
                        num_classes: int, seed: int) -> nn.Sequential:
    """A CNN: images in [-1, 1] -> num_classes + 1 logits (the last "none"); cached or trained."""
    path = Path(cache_dir) / f"{key}_v2.pt"  # v2: a changed network never loads an old cache
    with torch.random.fork_rng(devices=[]):  # a pure function of seed: no draw from the run's RNG
        torch.manual_seed(seed)
        judge = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(32, num_classes + 1))
    if path.is_file():
        try:
            judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return judge.eval().requires_grad_(False)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, retrain
            print(f"judge cache {path} does not load ({e.__class__.__name__}): training the judge again")
    images, labels = make_data()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(judge.parameters(), lr=3e-3)
    n = 16  # of each batch of 64, turned to "none": x = (1 - a) x + a n, n ~ N(0, 1), a ~ U(0.4, 1)
    for _ in range(200):
        index = torch.randint(0, len(images), (64,), generator=generator).numpy()
        x, y = torch.from_numpy(images[index]).float() / 127.5 - 1.0, torch.from_numpy(labels[index]).long()
        a = torch.rand(n, 1, 1, 1, generator=generator) * 0.6 + 0.4
        x[:n] = ((1 - a) * x[:n] + a * torch.randn(x[:n].shape, generator=generator)).clamp(-1, 1)
        y[:n] = num_classes
        F.cross_entropy(judge(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(path, judge.state_dict())  # atomic
    return judge.eval().requires_grad_(False)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """FID's d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (N, d) features."""
    a, b = feats_a.double(), feats_b.double()
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (d, d), ddof 1
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()  # as torchmetrics
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


@torch.no_grad()
def judge_scores(judge: nn.Sequential, samples: np.ndarray, asked_labels: Optional[np.ndarray],
                 real_heldout: np.ndarray, real_labels: Optional[np.ndarray] = None) -> dict:
    """Scores of N uint8 samples (N, 3, H, W) against 2N held-out real ones; *_real: the ceiling."""
    n = len(samples)
    if len(real_heldout) < 2 * n:
        raise ValueError(f"judge_scores needs at least {2 * n} held-out real images, got {len(real_heldout)}")
    feats_s, feats_a, feats_b = (judge[:-1](torch.from_numpy(x).float() / 127.5 - 1.0)  # uint8 -> [-1, 1]
                                 for x in (samples, real_heldout[:n], real_heldout[n: 2 * n]))
    scores = {}
    for suffix, feats, labels in (("", feats_s, asked_labels), ("_real", feats_a, real_labels)):
        probs = judge[-1](feats).softmax(1)  # the last class: "none"
        scores[f"recognised{suffix}"] = float((1 - probs[:, -1] >= 0.9).float().mean())
        if labels is not None:
            hits = probs[:, :-1].argmax(1).numpy() == np.asarray(labels[:n])
            scores[f"class_accuracy{suffix}"] = float(hits.mean())
    return {**scores, "frechet": frechet_distance(feats_s, feats_a), "frechet_real": frechet_distance(feats_b, feats_a)}


JUDGE_DATA_SEED, JUDGE_HELDOUT_SEED = 1_000_001, 1_000_002  # the judge's own data (a run's: --seed)


def make_shapes_judge(args: Args, num_samples: int) -> tuple[nn.Sequential, np.ndarray, np.ndarray]:
    """The judge of the 10 shapes classes at --img-size; 2 * num_samples held-out shapes, labels."""
    judge = load_or_train_judge(
        Path(args.data_dir) / "judge", f"shapes_{args.img_size}px_10classes_seed{JUDGE_DATA_SEED}",
        lambda: make_shapes_dataset(4096, args.img_size, seed=JUDGE_DATA_SEED), 10, JUDGE_DATA_SEED)
    return (judge, *make_shapes_dataset(2 * num_samples, args.img_size, seed=JUDGE_HELDOUT_SEED))


def judge_samples(judge, samples, args: Args, step: int, eval_now: bool, writer, progress):
    """eval/judge_* of an evaluation's shapes samples; returns the judge (made at the first one)."""
    if eval_now and samples is not None and args.dataset == "shapes":
        judge = judge or make_shapes_judge(args, args.num_eval_samples)
        scores = judge_scores(judge[0], samples, None, judge[1], judge[2])
        for name, value in scores.items():
            writer.add_scalar(f"eval/judge_{name}", value, step)
        progress.write(f"judge at step {step}: " + ", ".join(f"{k} {v:.3g}" for k, v in scores.items()))
    return judge


# ==== END OPTIONAL: judge ====


def sample_images(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, sampler: str,
                  num_steps: int, eta: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """uint8 (B, 3, H, W), x0 clipped at each step as in Ho et al.'s code (young models diverge)."""
    if sampler == "ddpm":
        x = ddpm_sample(model_fn, x_T, alphas_cumprod, num_steps, generator=generator)
    elif sampler == "ddim":
        x = ddim_sample(model_fn, x_T, alphas_cumprod, num_steps, eta=eta, clip_denoised=True, generator=generator)
    else:
        x = dpm_solver_sample(model_fn, x_T, alphas_cumprod, num_steps, clip_denoised=True)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> {0..255}


def eps_from_output(output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                    prediction: str) -> torch.Tensor:
    """The network's output (B, 3, H, W) as eps; v: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
    if prediction == "eps":
        return output
    # in float64: in bfloat16, abar >= 0.998 rounds to 1 and x_t's term is lost
    abar = alphas_cumprod.to(output.device, torch.float64)[t][:, None, None, None]
    dtype = torch.promote_types(output.dtype, torch.float32)
    return abar.sqrt().to(dtype) * output + (1 - abar).sqrt().to(dtype) * x_t


def generate_samples(model: nn.Module, alphas_cumprod: torch.Tensor, args: Args, num: int,
                     autocast=contextlib.nullcontext(), should_stop: Callable[[], None] = lambda: None) -> np.ndarray:
    """num uint8 images (num, 3, H, W) from seed + 10,000's noise; should_stop() at each call."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed + 10_000)

    def model_fn(x, t):
        should_stop()
        with autocast:
            return eps_from_output(model(x, t).float(), x, t, alphas_cumprod, args.prediction)

    out = []
    for batch in torch.arange(num).split(args.sample_batch_size):
        x_T = torch.randn(len(batch), 3, args.img_size, args.img_size, generator=generator, device=device)
        out.append(sample_images(model_fn, x_T, alphas_cumprod, args.sampler, args.num_sampling_steps, args.ddim_eta,
                                 generator).cpu())
    return torch.cat(out).numpy()


def ddpm_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
              autocast=contextlib.nullcontext(), layout=torch.contiguous_format, prediction="eps") -> torch.Tensor:
    """L_simple = || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2, batch mean (Ho
    et al. eq. 14); v's target: sqrt(abar_t) eps - sqrt(1 - abar_t) x0. x0, noise: (B, 3, H, W)."""
    abar = alphas_cumprod[t].float()[:, None, None, None]
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).contiguous(memory_format=layout)
    with autocast:
        output = model(x_t, t)
    target = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if prediction == "v" else noise
    return F.mse_loss(output.float(), target)


# --------------------------------------------------------------------------------------------------
# Evaluation (FID by torchmetrics; the judge is above) and the run's bookkeeping, main()'s steps.


def make_fid_metric(feature_extractor: Optional[nn.Module] = None):
    """torchmetrics' FID on Inception-v3 features (torch-fidelity's), or on feature_extractor's."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048 if feature_extractor is None else feature_extractor)
    except Exception as e:  # noqa: BLE001 - no torchmetrics or torch-fidelity, or no Inception weights
        raise UserError(f"FID needs torchmetrics, torch-fidelity and the Inception weights "
                        f"pt_inception-2015-12-05-6726825d.pth (pip install -e '.[eval]'; offline, put the file in "
                        f"{torch.hub.get_dir()}/checkpoints/): {error_reason(e)}") from None


def evaluate_fid(fid_metric, generate: Callable[[int], np.ndarray], real_images: np.ndarray, args: Args,
                 device: torch.device, writer=None, step: int = 0) -> float:
    """FID of --fid-num-samples samples vs the training images (the paper's protocol), as eval/fid."""
    fid_metric.to(device).reset()  # a Module: moved in place
    for images, real in ((real_images, True), (generate(args.fid_num_samples), False)):
        for batch in torch.from_numpy(images).split(args.sample_batch_size):
            fid_metric.update(batch.to(device), real=real)
    fid = float(fid_metric.compute())
    print(f"FID of {args.fid_num_samples} samples: {fid:.3f}")
    if writer is not None:
        writer.add_scalar("eval/fid", fid, step)
        writer.add_scalar("eval/fid_num_samples", args.fid_num_samples, step)
    return fid


def write_samples(folder: Path, stem: str, images: np.ndarray) -> Path:
    """A PNG grid and an .npz of the uint8 (N, H, W, 3) images (arr_0, as FID tools read)."""
    write_png(folder / f"{stem}.png", make_grid(images[:256]))
    np.savez(folder / f"{stem}.npz", images.transpose(0, 2, 3, 1))
    return folder / f"{stem}.png"


def ema_decay_at(step: int, decay: float) -> float:
    """d_t = min(decay, (1 + t) / (10 + t)): a function of the step alone (exact resume)."""
    return min(decay, (1 + step) / (10 + step))


def sample_from_checkpoint(generate: Callable, args: Args, run_dir: Path, step: int, fid_metric, images_np: np.ndarray,
                           setup: "Setup"):
    """Nothing to train: write --sample-only's samples (--eval-fid: their FID), or say so."""
    leave_process_group(setup.world_size)  # sampling is rank 0's alone
    if setup.is_main and not args.sample_only:  # it writes nothing (no purge)
        print(f"the run is already at step {step} of --total-steps {args.total_steps}: raise it to train on")
    elif setup.is_main:
        try:
            samples = generate(args.num_samples)
            stem = f"sample_only_{args.sampler}{args.num_sampling_steps}_step{step}_{int(time.time())}"
            path = write_samples(run_dir / "samples", stem, samples)
            print(f"wrote {len(samples)} samples to {path} and {path.with_suffix('.npz')}")
            if args.eval_fid:
                evaluate_fid(fid_metric, generate, images_np, args, setup.device)
        except StopRequested:
            print("stopped by signal while sampling; nothing more was written")


def log_interval(writer, meter: "Meter", scheduler, progress, step: int, run_dir: Optional[Path]):
    """Logs a --log-every interval; a non-finite loss raises TrainingFailure."""
    if not meter.finite():
        progress.close()  # end the progress line, so that the error is a line of its own
        raise non_finite_failure(f"before step {step}", run_dir)
    logged = meter.read()
    if writer is not None:
        writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
        tags = {"loss": "losses/mse", "mfu": "perf/mfu"}  # and charts/grad_norm, charts/SPS
        for key, value in logged.items():  # mfu on CUDA only
            writer.add_scalar(tags.get(key, f"charts/{key}"), value, step)
        progress.set_postfix({key: f"{value:.4g}" for key, value in logged.items()})


def log_samples(generate: Callable, args: Args, step: int, eval_now: bool, writer, run_dir: Path, progress,
                started: float) -> Optional[np.ndarray]:
    """--num-eval-samples EMA samples (16 at --first-sample-at) in TensorBoard and samples/."""
    with contextlib.suppress(StopRequested):  # a signal abandons the grid, not the checkpoint
        samples = generate(args.num_eval_samples if eval_now else 16)
        writer.add_image("samples/ema", make_grid(samples), step, dataformats="HWC")
        path = write_samples(run_dir / "samples", f"step{step:08d}", samples)
        if not eval_now:
            progress.write(f"first samples at step {step}, {time.perf_counter() - started:.0f} s after the "
                           f"start: {path}")
        return samples


def save_run(run_dir: Path, args: Args, step: int, parts: tuple, meter, setup: "Setup", **extra):
    """Rank 0 writes the checkpoint; a non-finite loss since the last check is a TrainingFailure."""
    if not meter.finite():
        raise non_finite_failure(f"before step {step}", run_dir)
    if setup.is_main:
        state = checkpoint_state(args, step, *parts, **extra)
        save_checkpoint(run_dir / "checkpoints" / "latest.pt", state)
        print(f"saved checkpoint at step {step}", flush=True)


def main(args: Args, given: set[str]):
    # ---- setup: arguments (resumed: the checkpoint's), device, seeds, data, model, optimizer
    started = time.perf_counter()
    args, checkpoint, run_dir = resume_run(args, given, not args.sample_only) if args.resume else (args, None, None)
    check_args(args, torchrun_world()[0])
    setup = setup_device(args)
    device, autocast = setup.device, autocast_context(setup, args.dtype)
    train_generator = torch.Generator(device=device).manual_seed(args.seed)  # flips, t, eps
    stop = StopFlag()  # SIGTERM/SIGINT now finish the step (or abandon sampling), save, exit 0
    if not args.sample_only:  # will a training step fit? (one line naming --batch-size if not)
        with torch.device("meta"):  # per image; nothing allocated, no random draw
            unet = build_model(args)
            x0, t = torch.zeros(1, 3, args.img_size, args.img_size), torch.zeros(1, dtype=torch.long)
            activations = saved_activation_bytes(
                lambda: ddpm_loss(unet, x0, t, x0, torch.ones(args.timesteps), prediction=args.prediction))
        flops = forward_flops(lambda: build_model(args), x0, t)
        num_params = sum(p.numel() for p in unet.parameters())
        check_step_memory(setup, args.batch_size, num_params, activations, args.dtype)

    images_np, dataset_id = load_dataset(args)
    images = torch.from_numpy(images_np).to(device)  # uint8 on the device: no loader, no copies
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = build_model(args).to(device, memory_format=layout)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, fused=setup.use_cuda)
    # linear warmup: lr_s = lr * min(1, (s + 1) / warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=setup.use_cuda and args.dtype == "float16")
    betas = make_beta_schedule(args.beta_schedule, args.timesteps, args.beta_start, args.beta_end)
    alphas_cumprod = make_alphas_cumprod(betas).to(device)  # float64: cast where used
    parts = (model, ema_model, optimizer, scheduler, scaler, train_generator)  # as CHECKPOINT_KEYS
    step = 0 if checkpoint is None else restore_state(checkpoint, *parts)

    def generate(num: int) -> np.ndarray:  # a signal abandons the sampling (StopRequested)
        return generate_samples(ema_model, alphas_cumprod, args, num, autocast, stop.check)

    fid_metric = make_fid_metric() if args.eval_fid else None  # fails now, not after training
    if args.sample_only or step >= args.total_steps:  # nothing to train: sample, or say so
        sample_from_checkpoint(generate, args, run_dir, step, fid_metric, images_np, setup)
        stop.restore()
        return

    # ---- the run folder (after the signal handlers: it gets a checkpoint), TensorBoard, throughput
    train_model = torch.compile(model, backend=COMPILE_BACKEND) if args.compile else model
    if setup.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model, [setup.local_rank] if setup.use_cuda else None)
    run_dir, writer = open_writer(args, run_dir, step, dataset_id) if setup.is_main else (run_dir, None)
    if setup.is_main:
        print(f"run folder: {run_dir}")
        if step > 0:
            print(f"resuming at step {step} of {args.total_steps}")
        else:
            writer.add_scalar("charts/num_parameters", num_params, 0)
        print(f"model: {num_params:,} parameters; data: {len(images):,} images of {args.img_size}x{args.img_size}; "
              f"device: {setup.device}{f' x {setup.world_size}' if setup.world_size > 1 else ''}")
        if len(images) < args.batch_size:  # it trains (a batch spans epochs), but say so
            print(f"notice: {len(images):,} images, fewer than --batch-size {args.batch_size}: each batch holds "
                  f"images more than once (it spans several epochs)")
    meter = Meter(device, 3 * flops, peak_flops(setup, args.dtype), setup.world_size)
    judge = None  # optional: judge

    # ---- train
    local_batch = args.batch_size // setup.world_size
    mine = slice(setup.rank * local_batch, (setup.rank + 1) * local_batch)
    first_step, step_timer = step, StepTimer(step, args.total_steps, setup)
    progress = progress_bar(args.total_steps, step, "train", "step", setup.is_main)
    while step < args.total_steps:
        # Every rank draws the whole global batch and takes its slice: 2 ranks compute what 1 does
        indices = global_batch_indices(step, args.batch_size, len(images), args.seed).to(device, non_blocking=True)
        flips = torch.rand(args.batch_size, generator=train_generator, device=device) < 0.5
        t = torch.randint(0, args.timesteps, (args.batch_size,), generator=train_generator, device=device)
        noise = torch.randn((args.batch_size, *images.shape[1:]), generator=train_generator, device=device)
        x0 = images[indices[mine]].float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        x0 = torch.where(flips[mine, None, None, None] & args.random_flip, x0.flip(3), x0)
        loss = ddpm_loss(train_model, x0, t[mine], noise[mine], alphas_cumprod, autocast, layout,
                         args.prediction)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():  # EMA: theta_ema <- d theta_ema + (1 - d) theta (d: ema_decay_at)
            torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()),
                                 1.0 - ema_decay_at(step, args.ema_decay))
        meter.add(loss, grad_norm, local_batch)
        step += 1
        progress.update(1)
        if setup.is_main and (seconds := step_timer.seconds_per_step(step)) is not None:
            progress.write("\n".join(run_time_notice(seconds, args.total_steps - step, setup)))
        if step % args.log_every == 0 or step == args.total_steps:
            log_interval(writer, meter, scheduler, progress, step, run_dir)
        eval_now = step % args.eval_every == 0 or step == args.total_steps
        save_now = step % args.save_every == 0 or step == args.total_steps
        if setup.is_main and not stop.requested and (eval_now or step == args.first_sample_at):
            samples = log_samples(generate, args, step, eval_now, writer, run_dir, progress, started)
            judge = judge_samples(judge, samples, args, step, eval_now, writer, progress)  # optional: judge
        # Every rank stops at the same step: all-reduced at a log step under torchrun, at once alone
        stopping = stop.sync(setup) if setup.world_size == 1 or step % args.log_every == 0 else False
        if save_now or stopping:
            save_run(run_dir, args, step, parts, meter, setup)
        if eval_now or save_now or step in (first_step + 1, args.first_sample_at):
            meter.restart_clock()  # sampling, saving and the first (compiling) step stay out of SPS
        if stopping:
            if setup.is_main:
                print(f"stopped by signal at step {step}", flush=True)
            break

    # ---- the end: the final FID (rank 0's alone, after the process group is gone)
    progress.close()
    leave_process_group(setup.world_size)
    if setup.is_main and step == args.total_steps:
        if args.eval_fid:
            with contextlib.suppress(StopRequested):
                evaluate_fid(fid_metric, generate, images_np, args, device, writer, step)
        print(f"done: step {step}, checkpoint at {run_dir / 'checkpoints' / 'latest.pt'}")
    close_writer(args, writer)
    stop.restore()


# ==== BEGIN SHARED MACHINERY (docs/PROMISES.md) ====
# Each definition is the same text in every script that carries it (tests/test_shared_blocks.py).
# It reads the script's SCRIPT_NAME, Args, PRESETS, FLAG_ALIASES, RESUME_MUTABLE and CHECKPOINT_*.


class UserError(Exception):
    """Bad input: one line naming the problem and the fix, exit 2; nothing saved is touched."""


class TrainingFailure(Exception):
    """A fault during the run (a non-finite loss, a full disk): one line, exit 1; nothing lost."""


class StopRequested(Exception):
    """A signal arrived during sampling, an evaluation or test episodes: the work is abandoned."""


class Interrupted(BaseException):
    """A second Ctrl-C: quit without saving, exit 130 (no `except Exception` swallows it)."""


def parse_args(argv: Optional[list[str]] = None) -> tuple[Args, set[str]]:
    """The args (defaults < --preset < --config < flags) and the fields the command line gives."""
    argv, hints, values = list(sys.argv[1:] if argv is None else argv), get_type_hints(Args), {}
    for token, after in zip(argv, argv[1:] + ["--"]):  # '--total_steps=5', '--no-cuda', an alias
        flag = token.split("=")[0]
        field = FLAG_ALIASES.get(flag, flag[2:].replace("-", "_"))
        field = field if field in hints else field.removeprefix("no_")
        if flag[:2] != "--" or flag == "--help":
            continue
        if field not in hints:
            import difflib
            flags = [f"--{name.replace('_', '-')}" for name in hints] + list(FLAG_ALIASES)
            close = difflib.get_close_matches(flag.replace("_", "-"), flags, n=3)
            maybe = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UserError(f"unknown flag {flag}{maybe}; {SCRIPT_NAME} --help lists the flags")
        if hints[field] is bool and ("=" in token or after[:2] != "--"):
            given = token if "=" in token else f"{token} {after}"
            flag = "--" + flag[2:].removeprefix("no-")
            raise UserError(f"{flag} takes no value ({given}): give {flag} for on, --no-{flag[2:]} "
                            f"for off")
        values[field] = token.split("=", 1)[1] if "=" in token else after
    defaults = replace(Args(), **PRESETS.get(values.get("preset"), {}))  # tyro refuses others
    if "config" in values and "resume" in values:
        raise UserError("--config with --resume: a resumed run takes its arguments from its checkpoint; "
                        "drop --config and give the flags a resume may change on the command line")
    config = read_config(values["config"]) if values.get("config", "--")[:2] != "--" else []
    box = io.StringIO()  # tyro's error box is many lines, ours is one
    try:
        with contextlib.redirect_stderr(box):
            return tyro.cli(Args, default=defaults, args=config + argv), set(values)
    except SystemExit as e:
        if not e.code:  # --help
            raise
    above_rule = box.getvalue().split("│ ─")[0].splitlines()[1:]  # tyro's words
    said = " ".join(line.strip("│ ") for line in above_rule if line.strip("│─╰╯ ")).rstrip(".")
    where = f" (on the command line or in --config {values['config']})" if config else ""
    raise UserError(f"{said or 'a bad value'}{where}; see {SCRIPT_NAME} --help")


def read_config(path: str) -> list[str]:
    """--config: the config.json (or YAML) an earlier run wrote, as flags (tyro checks values)."""
    import yaml
    fix, is_yaml = "give an earlier run's config.json", path.lower().endswith((".yaml", ".yml"))
    try:
        with open(path, "rb") as f:
            raw = f.read(2**20 + 1)  # bounded: --config /dev/zero must not read forever
        if len(raw) > 2**20:
            raise UserError(f"--config {path} is larger than 1024 KiB: not a config; {fix}")
        values = yaml.safe_load(raw.decode()) if is_yaml else json.loads(raw.decode())
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror or e}") from None
    except (ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8, or not JSON
        kind = "YAML" if is_yaml else "JSON (YAML needs a .yaml or .yml name)"
        problem = ("not a text file" if isinstance(e, UnicodeDecodeError)
                   else f"not valid {kind} ({str(e).splitlines()[0]})")
        raise UserError(f"--config {path} is {problem}; {fix}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold an object of flag names and values: {fix}")
    tokens, hints = [], get_type_hints(Args)
    for name, value in values.items():
        if name not in hints:
            raise UserError(f"--config {path} has a field this script does not know: {name}")
        flag = f"--{name.replace('_', '-')}"
        if hints[name] is bool and not isinstance(value, bool):
            raise UserError(f"--config {path}: {name} is {value!r}, not true or false")
        if hints[name] is bool:
            tokens.append(flag if value else f"--no-{flag[2:]}")
        else:  # YAML 1.1 reads on/off as booleans; '=': a value may start with '-'
            value = ("on" if value else "off") if isinstance(value, bool) else value
            tokens += [flag, *map(str, value)] if isinstance(value, list) else [f"{flag}={value}"]
    return tokens


def flag_marks() -> tuple[dict[str, str], set[str]]:
    """Beside Args' fields: numeric flags' domains ('>= 1', '[0, 1)' ...), and RESUME_MUTABLE."""
    marks = [(name, mark) for name, hint in get_type_hints(Args, include_extras=True).items()
             for mark in getattr(hint, "__metadata__", ()) if isinstance(mark, str)]
    return ({name: mark for name, mark in marks if mark != RESUME_MUTABLE},
            {name for name, mark in marks if mark == RESUME_MUTABLE})


def check_arg_domains(args: Args):
    """Numeric flags finite and in their domains ('>= 0', '(0, 1]' ...); a plain run name."""
    for name, domain in flag_marks()[0].items():
        value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
        if value == ():
            raise UserError(f"{flag} needs at least one value")
        interval = domain[0] in "[("  # else '> x' or '>= x'
        low, high = map(float, domain[1:-1].split(",") if interval else (domain[2:], "inf"))
        for x in [x for x in (value if isinstance(value, tuple) else (value,)) if x is not None]:
            above = low <= x if domain[0] == "[" or domain[:2] == ">=" else low < x
            if not (math.isfinite(x) and above and (x <= high if domain[-1] == "]" else x < high)):
                must = f"{'' if math.isfinite(x) else 'a finite number '}{'in ' * interval}{domain}"
                raise UserError(f"{flag} must be {must}, not {value}")
    if not args.exp_name or any(part in args.exp_name for part in ("/", "\\", "..")):
        raise UserError(f"--exp-name {args.exp_name!r} must be a plain name (no '/', '\\' or "
                        f"'..'): it names the run folder inside --output-dir")
    if len(args.exp_name.encode()) > 200:  # a file system caps a name at 255 bytes
        raise UserError(f"--exp-name is {len(args.exp_name.encode())} bytes long: give at most 200")


def resume_run(args: Args, given: set[str], trains: bool) -> tuple[Args, dict, Path]:
    """--resume RUN or FILE: the run's args (flags change only RESUME_MUTABLE ones), its checkpoint
    and the folder it writes in (RUN for RUN/checkpoints/*.pt, else the file's folder)."""
    path = Path(args.resume)
    path = path / "checkpoints" / "latest.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--resume {args.resume}: no checkpoint at {path}; give a run folder or a "
                        f"checkpoint file")
    in_run = path.parent.name == "checkpoints"
    if trains and in_run and torchrun_world()[1] == 0:  # before the read: no trainer saves after it
        lock_run(path.parent.parent)
    checkpoint = load_checkpoint(path)
    if unknown := sorted(set(checkpoint["args"]) - {f.name for f in fields(Args)}):
        raise UserError(f"{path} has an argument this script does not know: {unknown[0]}")
    saved = Args(**checkpoint["args"])
    mutable = flag_marks()[1]
    for name in sorted(given - mutable - {"resume"}):
        if getattr(args, name) != getattr(saved, name):
            flag = f"--{name.replace('_', '-')}"
            raise UserError(f"{flag} is {getattr(saved, name)!r} in the checkpoint and cannot "
                            f"change on --resume (only the run length, cadence, logging and "
                            f"sampling flags can); drop {flag} or start a new run")
    if trains and not (in_run and path.name == "latest.pt"):  # or it overwrites a newer one
        raise UserError(f"--resume {path}: training continues only from a run folder's "
                        f"checkpoints/latest.pt; copy the file to NEW_RUN/checkpoints/latest.pt "
                        f"and --resume NEW_RUN")
    saved = replace(saved, **{name: getattr(args, name) for name in given & mutable},
                    resume=args.resume)
    return saved, checkpoint, path.parent.parent if in_run else path.parent


def load_checkpoint(path: Path) -> dict:
    """weights_only=True (a malicious file cannot run code); refuses all but a whole, finite one."""
    try:
        with warnings.catch_warnings():  # torch's warning about a foreign pickle: the line says it
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to read the file is the same error
        raise UserError(f"cannot load checkpoint {path} (corrupt or not a checkpoint, or with "
                        f"Python objects that could run code); resume from another one") from None
    found = checkpoint if isinstance(checkpoint, dict) else {}
    readable = (*OLDER_CHECKPOINT_FORMATS, CHECKPOINT_FORMAT_VERSION)
    if found.get("script") != SCRIPT_NAME or found.get("format_version") not in readable:
        raise UserError(f"{path} is a checkpoint of {found.get('script') or 'something else'} "
                        f"(format {found.get('format_version')}); {SCRIPT_NAME} reads formats "
                        f"{', '.join(map(str, readable))}: give one it wrote")
    if missing := sorted(set(CHECKPOINT_KEYS) - set(checkpoint)):
        raise UserError(f"{path} lacks {', '.join(missing)}: not a whole {SCRIPT_NAME} checkpoint")

    def finite(tree) -> bool:  # every floating-point tensor in nested dicts and lists
        if isinstance(tree, torch.Tensor):
            return not tree.is_floating_point() or bool(tree.isfinite().all())
        return all(map(finite, tree.values() if isinstance(tree, dict) else
                       tree if isinstance(tree, (list, tuple)) else ()))
    if bad := [key for key, value in checkpoint.items() if not finite(value)]:
        raise UserError(f"{path} holds non-finite values (in {bad[0]}); resume from an earlier one")
    return checkpoint


def error_reason(e: Exception) -> str:
    """An exception's message in one short line, without torch's "Error(s) in" header."""
    lines = [s.strip() for s in str(e).splitlines() if s.strip() and not s.startswith("Error(s)")]
    return (lines[0] if lines else type(e).__name__)[:200]


def checkpoint_state(args: Args, step: int, *parts, **extra) -> dict:
    """The header, then CHECKPOINT_KEYS in order: args, step, every global RNG, each part's state
    (its state_dict, a generator's state, or a plain value), then extra (not read back)."""
    states = [part.get_state() if isinstance(part, torch.Generator) else part.state_dict()
              if hasattr(part, "state_dict") else part for part in parts]
    values = [asdict(args), step, rng_state(), *states]
    return {"script": SCRIPT_NAME, "format_version": CHECKPOINT_FORMAT_VERSION,
            **dict(zip(CHECKPOINT_KEYS, values, strict=True)), **extra}


def restore_state(checkpoint: dict, *parts) -> int:
    """Puts back checkpoint_state's parts and the global RNGs; returns the step; misfits: 1 line."""
    try:
        for key, part in zip(CHECKPOINT_KEYS[3:], parts, strict=True):
            if isinstance(part, torch.Generator):
                part.set_state(checkpoint[key])
            elif hasattr(part, "load_state_dict"):  # a plain value: the run read it
                part.load_state_dict(checkpoint[key])
        set_rng_state(checkpoint["rng"])
        if type(checkpoint["step"]) is not int or checkpoint["step"] < 0:
            raise ValueError(f"its step is {checkpoint['step']!r}")
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"checkpoint weights do not fit this model, or its state is damaged "
                        f"({error_reason(e)}); resume from another checkpoint") from None
    return checkpoint["step"]


def save_checkpoint(path: Path, state: dict):
    """Atomic (a temporary file, fsynced and renamed): a failed write is a TrainingFailure."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a failed write (torch.save's: a RuntimeError)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else error_reason(e)
        kept = f"the previous {path.name} is intact" if path.exists() else "it was not written"
        raise TrainingFailure(f"cannot write {path} ({reason}); {kept}: free disk space or make "
                              f"the folder writable, then --resume") from None
    finally:  # whatever stopped the write, a second Ctrl-C too
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def non_finite_failure(where: str, run_dir: Optional[Path]) -> TrainingFailure:
    """A loss or gradients that became NaN or infinite: the message says if a checkpoint exists."""
    latest = run_dir / "checkpoints" / "latest.pt" if run_dir else None
    kept = (f"the last good checkpoint is kept in {latest}" if latest and latest.exists()
            else "no checkpoint was saved yet")
    return TrainingFailure(f"the loss or gradients became non-finite {where}; {kept} (try a lower "
                           f"--learning-rate or --dtype float32)")


def rng_state() -> dict:
    """Every global RNG as plain values (weights_only=True refuses numpy objects)."""
    name, keys, *rest = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest],
            "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


@dataclass
class Setup:
    """Where this process runs: its device and its place among torchrun's processes."""
    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    def __post_init__(self):
        self.is_main, self.use_cuda = self.rank == 0, self.device.type == "cuda"


def torchrun_world() -> tuple[int, int, int]:  # (1, 0, 0) for `python script.py`
    return tuple(int(os.environ.get(name, default)) for name, default in
                 (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))


def setup_device(args: Args) -> Setup:
    """CUDA when asked and available (else the CPU, with a notice), determinism, TF32, torchrun, and
    the global RNGs seeded alike on every rank (every rank builds the same initial weights)."""
    world_size, rank, local_rank = torchrun_world()
    use_cuda = args.cuda and torch.cuda.is_available()
    if args.cuda and not use_cuda and rank == 0:
        print("notice: CUDA is not available, running on the CPU")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        if args.torch_deterministic:  # before the first cuBLAS call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif world_size > 1:
        torch.set_num_threads(1)  # one thread per rank: the ranks do not fight over the cores
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    # cuDNN's determinism only: torch.use_deterministic_algorithms costs more than 10% on CUDA
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32: ~free
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return Setup(device, world_size, rank, local_rank)


def autocast_context(setup: Setup, dtype: str):
    """bf16/fp16 autocast on CUDA; a no-op for float32 and on the CPU (which computes in fp32)."""
    if setup.use_cuda and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def leave_process_group(world_size: int):
    """Every rank leaves after a barrier (gloo can abort a rank that leaves while another saves)."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


class StopFlag:
    """SIGTERM/SIGINT: training stops after its step, work calling check() is abandoned; the first
    is acknowledged at once, a second SIGINT raises Interrupted, a SIGTERM never aborts a save."""
    keep_handlers = False  # run_main sets it: the handlers stay until the process exits

    def __init__(self):
        self.requested, self.finished, self.busy = False, False, ""
        self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGTERM, signal.SIGINT)}

    def request(self, signum, frame):  # once finished (the process exits) there is nothing to stop
        if self.requested and signum == signal.SIGINT and not self.finished:
            raise Interrupted()
        if not (self.requested or self.finished):
            busy = f"; {self.busy} must end first" if self.busy else ""
            say_now(f"stopping after this step, then saving{busy}; Ctrl-C again to quit without "
                    f"saving")
        self.requested = True

    def check(self):
        if self.requested:
            raise StopRequested()

    def sync(self, setup: Setup) -> bool:
        """Whether to stop, all-reduced under torchrun: every rank stops at the same step."""
        if setup.world_size > 1:
            flag = torch.tensor(float(self.requested), device=setup.device)
            dist.all_reduce(flag)
            self.requested = flag.item() > 0
        return self.requested

    def restore(self):
        self.finished = True
        for sig, handler in self.previous.items() if not StopFlag.keep_handlers else ():
            signal.signal(sig, handler)


def say_now(message: str):
    """A line written at once, also from a signal handler (where a print could re-enter a print)."""
    try:
        os.write(sys.stdout.fileno(), (message + "\n").encode())
    except (OSError, ValueError, io.UnsupportedOperation):  # stdout is not a file (a test's)
        print(message, flush=True)


RUN_LOCKS = {}  # run folder -> its RUN/train.lock, open in this process (a flock is per open file)


def lock_run(run_dir: Path):
    """The run's one trainer holds a flock on RUN/train.lock until close_writer or its exit."""
    import fcntl
    if run_dir not in RUN_LOCKS:
        RUN_LOCKS[run_dir] = open(run_dir / "train.lock", "a")
        try:
            fcntl.flock(RUN_LOCKS[run_dir], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            RUN_LOCKS.pop(run_dir).close()
            raise UserError(f"{run_dir} is being trained by another process, which holds {run_dir}/"
                            f"train.lock; wait for it to end (or stop it) first") from None


def open_writer(args: Args, run_dir: Optional[Path], step: int, run_id: str) -> tuple[Path, object]:
    """The one trainer's run folder (None: a new {run_id}__{exp_name}__{seed}__{unix time} with
    config.json) and its TensorBoard (and wandb) writer, purging what a killed run logged later."""
    from torch.utils.tensorboard import SummaryWriter
    if run_dir is None:
        name = f"{run_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.output_dir) / name
        while run_dir.exists():
            run_dir = run_dir.with_name(run_dir.name + "_")
        try:
            run_dir.mkdir(parents=True)
            (run_dir / "config.json").write_text(json.dumps(asdict(args), indent=2))
        except OSError as e:
            raise UserError(f"--output-dir {args.output_dir}: cannot create the run folder "
                            f"{run_dir} ({e.strerror or e}); give a writable folder") from None
    lock_run(run_dir)  # released by close_writer
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name,
                   id=run_dir.name, resume="allow", config=asdict(args), sync_tensorboard=True,
                   save_code=True)
    writer = SummaryWriter(str(run_dir), purge_step=step + 1 if step else None)
    if step == 0:
        table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return run_dir, writer


def close_writer(args: Args, writer):
    if writer is not None:
        writer.close()
        RUN_LOCKS.pop(Path(writer.log_dir)).close()
    if args.track:
        import wandb
        wandb.finish()


def progress_bar(total: int, initial: int, desc: str, unit: str, enabled: bool = True):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled)


def peak_flops(setup: Setup, dtype: str) -> Optional[float]:
    """MFU's denominator: dense bf16/fp16 FLOP/s (halved: TF32), NaN: unknown GPU, None: a CPU."""
    if not setup.use_cuda:
        return None
    name = torch.cuda.get_device_name(setup.device)
    peaks = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
             "L4": 121e12, "T4": 65e12, "A10G": 70e12, "A10": 125e12, "4090": 165e12, "3090": 71e12,
             "V100": 125e12}
    peak = next((flops for key, flops in peaks.items() if key in name), float("nan"))
    return peak / 2 if dtype == "float32" else peak


def forward_flops(build: Callable[[], nn.Module], *inputs: torch.Tensor) -> float:
    """FLOPs of a forward pass of build()'s model, on the meta device: no compute, no RNG draw."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs))
    return float(counter.get_total_flops())


class Meter:
    """Loss and gradient norm summed on the device (no host sync per step); read() gives their
    means, the global samples/s and, given a peak, MFU (achieved / peak FLOP/s per process)."""

    def __init__(self, device: torch.device, train_flops_per_sample: float, peak: Optional[float],
                 world_size: int = 1):
        self.flops, self.peak, self.world_size = train_flops_per_sample, peak, world_size
        self.sums, self.steps = torch.zeros(2, device=device), 0  # loss, gradient norm
        self.restart_clock()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, num_samples: int):
        self.sums += torch.stack([loss.detach().float(), grad_norm.detach().float()])
        self.steps, self.timed_samples = self.steps + 1, self.timed_samples + num_samples

    def restart_clock(self):  # what follows (compiling, sampling, saving) is no throughput
        self.timed_samples, self.clock = 0, time.perf_counter()

    def finite(self) -> bool:  # a host sync
        return bool(self.sums.isfinite().all())

    def read(self) -> dict:
        loss, grad_norm = (self.sums / max(self.steps, 1)).tolist()
        rate = self.timed_samples / max(time.perf_counter() - self.clock, 1e-9)  # this process's
        values = {"loss": loss, "grad_norm": grad_norm, "SPS": rate * self.world_size}
        if self.peak is not None:
            values["mfu"] = rate * self.flops / self.peak
        self.sums, self.steps = torch.zeros_like(self.sums), 0
        self.restart_clock()
        return values


def available_memory(setup: Setup) -> float:
    """Bytes a training step may take: CUDA's free memory; on a CPU the least of MemAvailable, the
    cgroup's memory.max less its usage and RLIMIT_AS less the address space (inf: none read)."""
    if setup.use_cuda:
        return float(torch.cuda.mem_get_info(setup.device)[0])
    import resource

    def number(path: str, name: str = "") -> float:  # a file's number, or "Name: 123 kB" in bytes
        words = [line.split() for line in Path(path).read_text().splitlines() if line.startswith(name)]
        return 1024 * float(words[0][1]) if name else float(words[0][0])

    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    address_space = math.inf if address_space == resource.RLIM_INFINITY else address_space
    limits, cgroup = [math.inf], "/sys/fs/cgroup"
    for limit in (lambda: number("/proc/meminfo", "MemAvailable:"),
                  lambda: number(f"{cgroup}/memory.max") - number(f"{cgroup}/memory.current"),
                  lambda: address_space - number("/proc/self/status", "VmSize:")):
        with contextlib.suppress(OSError, ValueError, IndexError):  # memory.max "max": no limit
            limits.append(limit())
    return min(limits)


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor]) -> float:
    """Bytes autograd saves for loss_fn()'s backward (meta device): each tensor once, no weights."""
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if not (base.is_leaf and base.requires_grad):
            saved[id(base)] = base
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn()
    return float(sum(tensor.numel() * tensor.element_size() for tensor in saved.values()))


def check_step_memory(setup: Setup, batch_size: int, num_params: int,
                      activation_bytes_per_sample: float, dtype: str) -> float:
    """Refuses a step that cannot fit, naming the batch size that does. Per process: 5 x 4 bytes a
    parameter (weights, grads, Adam's moments, EMA) + batch x activations (halved by autocast)."""
    per_sample = activation_bytes_per_sample / (2 if setup.use_cuda and dtype != "float32" else 1)
    fixed, available = 5 * 4 * num_params, available_memory(setup)
    needed = fixed + batch_size // setup.world_size * per_sample
    if needed > available:
        fits = int((available - fixed) // per_sample) * setup.world_size if available > fixed else 0
        raise UserError(f"--batch-size {batch_size} needs about {needed / 2**30:.1f} GiB per "
                        f"process for a training step, {available / 2**30:.1f} GiB is available on "
                        f"{setup.device}: use --batch-size {fits} or less")
    return needed


class StepTimer:
    """Seconds per training step, timed once with a device sync at both ends, from after the first
    (compiling) step to timed_steps later; None at other steps, and if no step would be left."""

    def __init__(self, first_step: int, total_steps: int, setup: Setup, timed_steps: int = 5):
        self.start_step, self.end_step = first_step + 1, first_step + 1 + timed_steps
        self.total_steps, self.setup, self.clock = total_steps, setup, 0.0

    def seconds_per_step(self, step: int) -> Optional[float]:
        if step not in (self.start_step, self.end_step) or self.end_step >= self.total_steps:
            return None
        if self.setup.use_cuda:
            torch.cuda.synchronize(self.setup.device)
        elapsed, self.clock = time.perf_counter() - self.clock, time.perf_counter()
        return elapsed / (self.end_step - self.start_step) if step == self.end_step else None


def run_time_notice(seconds_per_step: float, remaining_steps: int, setup: Setup) -> list[str]:
    """How long the rest of the training takes; on a CPU, more than a day is a notice."""
    seconds = seconds_per_step * remaining_steps
    days, rest = divmod(int(seconds), 86_400)
    length = (f"{rest // 60} min {rest % 60} s" if seconds < 3600
              else f"{f'{days} d ' if days else ''}{rest // 3600} h {rest % 3600 // 60} min")
    steps = f"{remaining_steps:,} step{'s' if remaining_steps != 1 else ''}"
    lines = [f"estimated time to the end of training: {length} ({seconds_per_step:.3g} s per step "
             f"on {setup.device}, {steps} to go, evaluations not counted)"]
    if not setup.use_cuda and seconds > 86_400:
        lines.append("notice: on this CPU the run takes more than a day: the defaults are the "
                     "paper's GPU settings (--preset tiny runs in seconds, --preset cpu is sized for one)")
    return lines


def make_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, 3, H, W) -> one uint8 (rows*(H+pad)+pad, columns*(W+pad)+pad, 3) image."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    cells = np.zeros((rows * columns, h + pad, w + pad, 3), dtype=np.uint8)  # a top and left pad
    cells[:n, pad:, pad:] = images.transpose(0, 2, 3, 1)
    grid = cells.reshape(rows, columns, h + pad, w + pad, 3).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (h + pad), columns * (w + pad), 3)
    return np.pad(grid, ((0, pad), (0, pad), (0, 0)))


def write_png(path: Path, rgb: np.ndarray):
    """uint8 (H, W, 3) RGB -> PNG; a failed write raises (OpenCV's returns False)."""
    import cv2
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1])):
        raise OSError(f"cannot write {path}")


def run_main(main: Callable):
    """One line on rank 0: exit 2 for bad input, 1 for a fault in the run, 130 for a Ctrl-C."""
    from tqdm import tqdm
    StopFlag.keep_handlers = True
    for sig in (signal.SIGTERM, signal.SIGINT):  # Python's exit resets its handlers to kill: ignore at exit
        atexit.register(signal.signal, sig, signal.SIG_IGN)
    try:
        return main(*parse_args())
    except (UserError, TrainingFailure) as e:
        message, status = str(e), 2 if isinstance(e, UserError) else 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror or e}; check the disk and the folder's permissions, then --resume"
        status = 1
    except (Interrupted, KeyboardInterrupt) as e:
        message, status = ("interrupted by a second Ctrl-C: quit without saving (the last "
                           "checkpoint, if any, is intact)" if isinstance(e, Interrupted) else
                           "interrupted before the run started; nothing was saved"), 130
    finally:
        StopFlag.keep_handlers = False  # the process exits with its handlers; a caller gets its own
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()  # end any progress line, so that the error is a line of its own
    if torchrun_world()[1] == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    run_main(main)
