# cleanworlds: DiT (Peebles & Xie 2023) on CIFAR-10. Docs, results: README.md, benchmark/RESULTS.md
"""Class-conditional Diffusion Transformer (adaLN-Zero and 3 other adaLN variants) with guidance.

    python dit_cifar10.py                                    # the seed's config: patch 4, width 384
    python dit_cifar10.py --preset tiny                      # end to end in seconds on a CPU
    python dit_cifar10.py --preset cpu                       # shapes of the asked class in minutes
    python dit_cifar10.py --preset dit-s2 --adaln single     # DiT-S/2 with adaLN-Single
    torchrun --standalone --nproc_per_node=8 dit_cifar10.py  # 8 GPUs, global batch 128
    python dit_cifar10.py --dataset folder --data-dir my_images --num-classes 5 --eval-fid
    python dit_cifar10.py --resume RUN_FOLDER --sample-only --class-label cat --cfg-scale 4
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

SCRIPT_NAME = "dit_cifar10.py"
CHECKPOINT_FORMAT_VERSION = 2  # 2: the run length and cadence in optimizer steps (1: in epochs)
OLDER_CHECKPOINT_FORMATS = (1,)  # formats a resume converts (run_length_in_steps)
COMPILE_BACKEND = "inductor"
# A flag's unit, shown by --help (--save-every STEPS) and read by the tests: one meaning per name.
STEPS, EPOCHS = tyro.conf.arg(metavar="STEPS"), tyro.conf.arg(metavar="EPOCHS")
# Beside an Args field: its domain ('>= 1': every number), RESUME_MUTABLE if --resume may change it
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
    preset: Optional[Literal["tiny", "cpu", "dit-s2", "dit-b2"]] = None
    """tiny: seconds on a CPU; cpu: the asked shapes in minutes; dit-s2, dit-b2: the paper's"""
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
    dataset: Literal["cifar10", "folder", "shapes"] = "cifar10"
    """cifar10 (downloaded into --data-dir), folder (PNG/JPG, a subfolder per class) or shapes"""
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
    num_classes: Annotated[int, ">= 0"] = 10
    """classes to condition on, as many as the data has (CIFAR-10, shapes: 10); 0: unconditional"""
    patch: Annotated[int, ">= 1"] = 4
    """patch size P: the image becomes (img_size/P)^2 tokens"""
    width: Annotated[int, ">= 1"] = 384
    """transformer width D (hidden size)"""
    depth: Annotated[int, ">= 1"] = 6
    """number of DiT blocks"""
    heads: Annotated[int, ">= 1"] = 6
    """attention heads (must divide --width)"""
    mlp_ratio: Annotated[float, "> 0"] = 4.0
    """MLP hidden size as a multiple of --width"""
    adaln: Literal["zero", "plain", "single", "diagonal"] = "zero"
    """conditioning: zero (adaLN-Zero), plain (adaLN, no gate), single (adaLN-Single), diagonal"""
    class_dropout: Annotated[float, "[0, 1)"] = 0.1
    """probability that a training label becomes the null class (for guidance; 0: no guidance)"""
    timesteps: Annotated[int, ">= 1"] = 1000
    """number of diffusion steps T"""
    beta_schedule: Literal["linear", "cosine"] = "linear"
    """linear (Ho et al.) or cosine (Nichol and Dhariwal)"""
    beta_start: Annotated[float, "(0, 1)"] = 1e-4
    """beta_1 of the linear schedule at T = 1000; scaled by 1000/T (improved diffusion)"""
    beta_end: Annotated[float, "(0, 1)"] = 0.02
    """beta_T of the linear schedule at T = 1000; scaled by 1000/T, capped at 0.999"""
    total_steps: Annotated[Optional[int], STEPS, ">= 1", RESUME_MUTABLE] = None
    """optimizer steps to train for (default: --epochs 100, converted to steps)"""
    epochs: Annotated[Optional[int], EPOCHS, ">= 1", RESUME_MUTABLE] = None
    """the run length in passes over N images (the seed's unit): --total-steps ceil(epochs N / batch)"""
    batch_size: Annotated[int, ">= 1"] = 128
    """global batch size (split across torchrun ranks)"""
    learning_rate: Annotated[float, "> 0"] = 1e-4
    """AdamW learning rate"""
    weight_decay: Annotated[float, ">= 0"] = 0.0
    """AdamW weight decay"""
    warmup_steps: Annotated[int, STEPS, ">= 0"] = 0
    """linear learning-rate warmup steps (0: none, as the reference DiT)"""
    max_grad_norm: Annotated[float, ">= 0"] = 0.0
    """gradient clipping norm (0 turns it off, as the reference DiT)"""
    ema_decay: Annotated[float, "[0, 1]"] = 0.9999
    """EMA decay of the sampling weights, warmed up: step t uses min(decay, (1 + t) / (10 + t))"""
    log_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 100
    """log losses and throughput every N optimizer steps"""
    save_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 2000
    """write checkpoints/latest.pt every N optimizer steps"""
    eval_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 4000
    """sample a grid (one row per class) from the EMA model every N optimizer steps"""
    first_sample_at: Annotated[int, STEPS, ">= 0", RESUME_MUTABLE] = 0
    """also sample 2 images per class (not judged) at this step: the run's first picture; 0: none"""
    sampler: Annotated[Literal["ddpm", "ddim", "dpm++"], RESUME_MUTABLE] = "ddpm"
    """sampler for the grids, --sample-only and FID"""
    num_sampling_steps: Annotated[int, ">= 1", RESUME_MUTABLE] = 250
    """network evaluations per sample (ddpm with fewer than T steps is respaced; DiT's: 250)"""
    ddim_eta: Annotated[float, "[0, 1]", RESUME_MUTABLE] = 0.0
    """DDIM eta (0: deterministic)"""
    cfg_scale: Annotated[float, ">= 0", RESUME_MUTABLE] = 1.5
    """guidance scale s: eps = eps_u + s (eps_c - eps_u); 1: none, 1.5: DiT's best FID"""
    class_label: Annotated[Optional[str], RESUME_MUTABLE] = None
    """with --sample-only: generate only this class, by index (0, 1, ...) or name (as printed)"""
    samples_per_class: Annotated[int, ">= 1", RESUME_MUTABLE] = 8
    """images per class in each sample grid (a row per class; an unconditional model gets 8 rows)"""
    num_samples: Annotated[int, ">= 1", RESUME_MUTABLE] = 64
    """images generated by --sample-only: a row of ceil(N / classes) per class (or N of one)"""
    eval_fid: Annotated[bool, RESUME_MUTABLE] = False
    """FID of EMA samples (every class) vs the training set at the end (needs the eval extra)"""
    fid_num_samples: Annotated[int, ">= 2", RESUME_MUTABLE] = 50_000
    """samples for FID (the paper protocol: 50k vs the train set)"""
    sample_batch_size: Annotated[int, ">= 1", RESUME_MUTABLE] = 500
    """batch size when generating many samples"""


PRESETS = {
    # tiny keeps the paper's EMA decay 0.9999: the warm-up (ema_decay_at) fits it to 1,024 steps.
    "tiny": dict(dataset="shapes", img_size=16, num_shapes_images=512, patch=4, width=64, depth=3,
                 heads=4, total_steps=1024, batch_size=32, learning_rate=2e-3, log_every=16,
                 save_every=256, eval_every=512, sampler="ddim", num_sampling_steps=20,
                 cfg_scale=3.0, samples_per_class=4, num_samples=16, fid_num_samples=64,
                 sample_batch_size=64),
    # Shapes of the asked class in minutes on 2 CPU cores (guidance 3 draws it at this budget).
    "cpu": dict(dataset="shapes", img_size=16, num_shapes_images=4096, patch=2, width=128, depth=4,
                heads=4, total_steps=2048, batch_size=64, learning_rate=1e-3, ema_decay=0.999,
                log_every=32, save_every=256, eval_every=512, first_sample_at=100, sampler="ddim",
                num_sampling_steps=50, cfg_scale=3.0, samples_per_class=12, num_samples=120,
                fid_num_samples=2000, sample_batch_size=120),
    # The paper's model sizes at CIFAR-10 resolution (patch 2: 256 tokens).
    "dit-s2": dict(patch=2, width=384, depth=12, heads=6),
    "dit-b2": dict(patch=2, width=768, depth=12, heads=12),
}
FLAG_ALIASES: dict[str, str] = {}  # flags spelled otherwise (diamond_atari.py: --game, --env-id)
CHECKPOINT_KEYS = ("args", "step", "rng", "model", "ema", "optimizer", "scheduler", "scaler", "train_generator")


def check_args(args: Args, world_size: int):
    """Settings that cannot work, refused before data or a run folder (resumed: the merged args)."""
    check_arg_domains(args)
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world_size} torchrun processes")
    if args.num_sampling_steps > args.timesteps:
        raise UserError(f"--num-sampling-steps must not exceed --timesteps {args.timesteps}")
    if args.beta_start > args.beta_end:
        raise UserError(f"--beta-start {args.beta_start} must not exceed --beta-end {args.beta_end}")
    if args.dataset == "cifar10" and args.img_size != 32:
        raise UserError(f"CIFAR-10 images are 32x32: use --img-size 32, not {args.img_size}")
    if args.img_size % args.patch:
        raise UserError(f"--patch {args.patch} does not divide --img-size {args.img_size}: choose one that does")
    if args.width % args.heads:
        raise UserError(f"--heads {args.heads} does not divide --width {args.width}: choose one that does")
    if args.width % 4:
        raise UserError(f"--width {args.width} must be divisible by 4 (the 2D sin-cos position embedding)")
    label, classes = args.class_label, args.num_classes  # label: an index or a name
    if label is not None and (not classes or label.lstrip("-").isdigit()
                              and not 0 <= int(label) < classes):
        raise UserError(f"--class-label {label} is out of range: the model has {classes} classes ("
                        + (f"0 to {classes - 1}, or a name)" if classes else "unconditional)"))
    if label is not None and not args.sample_only:
        raise UserError("--class-label picks the class of --sample-only's samples: add --sample-only")
    if classes > 0 and args.class_dropout == 0 and args.cfg_scale != 1:
        raise UserError(f"--cfg-scale {args.cfg_scale:g} needs the null class, which --class-dropout 0 never trains: "
                        f"use --cfg-scale 1 (no guidance), or train with --class-dropout above 0 (DiT: 0.1)")
    if args.sample_only and not args.resume:
        raise UserError("--sample-only needs --resume RUN_FOLDER_OR_CHECKPOINT")


# --------------------------------------------------------------------------------------------------
# Data (CIFAR-10, image folders, shapes: uint8 (N, 3, H, W)), its order, noise schedule (float64)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
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
# make_shapes_dataset's classes: class k in colour k % 8, a square for k < 8, else a disc
SHAPES_CLASSES = ["red square", "green square", "blue square", "yellow square", "magenta square",
                  "cyan square", "orange square", "white square", "red disc", "green disc"]


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


def load_dataset(args: Args) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """uint8 images (N, 3, H, W), int64 labels, the run name's dataset id and the class names."""
    dataset_id, class_names = args.dataset, SHAPES_CLASSES if args.dataset == "shapes" else CIFAR10_CLASSES
    if args.dataset == "cifar10":
        images, labels = load_cifar10(args.data_dir, args.download)
    elif args.dataset == "folder":
        images, labels, class_names = load_image_folder(args.data_dir, args.img_size)
        dataset_id = Path(args.data_dir).resolve().name or "folder"
        if args.num_classes > 0 and (labels < 0).any():
            raise UserError(f"{(labels < 0).sum()} images lie directly in {args.data_dir} and so have no class: move "
                            f"them into a class subfolder, or train an unconditional model with --num-classes 0")
    else:
        images, labels = make_shapes_dataset(args.num_shapes_images, args.img_size, seed=args.seed)
    if args.num_classes > 0 and args.num_classes != len(class_names):
        raise UserError(f"--num-classes {args.num_classes} disagrees with the data: {dataset_id} has "
                        f"{len(class_names)} classes; use --num-classes {len(class_names)} (or 0)")
    return images, labels, dataset_id, class_names


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
# Model: DiT (Peebles & Xie 2023). c = t_emb + y_emb. A block's attention and MLP each read
# modulate(x, shift, scale) = LN(x) (1 + scale) + shift (LN without affine) and add gate * output;
# the final layer modulates, then maps each token to its P*P*C pixels (zero-init). --adaln:
#   zero      adaLN-Zero (the paper's): SiLU -> Linear(D, 6D) of c per block, zero-init (identity)
#   plain     adaLN (the paper's ablation): Linear(D, 4D), shift and scale only, gate 1
#   single    adaLN-Single (PixArt-alpha): one Linear(D, 6D) of c for all blocks, plus a learned
#             (6, D) table per block (N(0, 1/D)); the final layer adds a (2, D) table to c
#   diagonal  plain's shift and scale, gate a learned zero-init (D,) (CaiT's LayerScale), not from c

TIMESTEP_FREQUENCY_DIM = 256  # the timestep's sinusoidal features before the MLP


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DiT's frequency embedding: [cos(t w_i), sin(t w_i)], w_i = exp(-ln(10000) i / (dim / 2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's and DiT's fixed 2D sin-cos position embedding (grid_size^2, dim), row-major: channels
    [:dim/2] encode the column, the rest the row, as [sin(p w), cos(p w)], w_i = 10000^(-4i/dim)."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    angles = torch.arange(grid_size, dtype=torch.float64)[:, None] * omega[None, :]
    emb_1d = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (grid_size, dim/2)
    columns, rows = emb_1d.repeat(grid_size, 1), emb_1d.repeat_interleave(grid_size, dim=0)
    return torch.cat([columns, rows], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift  # shift, scale (B, 1, D)


def add_modulation(layer: nn.Module, width: int, rows: int, adaln: str):
    """Rows of shifts, scales (gates) of c: adaLN-Single's (rows, D) table, else SiLU -> Linear."""
    if adaln == "single":
        layer.scale_shift_table = nn.Parameter(torch.randn(rows, width) / width ** 0.5)
    else:
        layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, rows * width))


def modulations(layer: nn.Module, c: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """add_modulation's rows for c, each (B, 1, D) (adaLN-Single: table + t_block(c) or c)."""
    if hasattr(layer, "scale_shift_table"):
        return (layer.scale_shift_table + c.reshape(len(c), -1, width))[:, :, None].unbind(1)
    return layer.adaLN_modulation(c).reshape(len(c), -1, width)[:, :, None].unbind(1)


class DiTBlock(nn.Module):
    """Pre-LN transformer block conditioned by adaptive LayerNorm (the --adaln variants above)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, adaln: str = "zero"):
        super().__init__()
        self.heads = heads
        qkv, proj = nn.Linear(width, 3 * width), nn.Linear(width, width)  # fused q, k, v projection
        self.attn = nn.ModuleDict(dict(qkv=qkv, proj=proj))  # the reference Attention's names
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        add_modulation(self, width, 4 if adaln in ("plain", "diagonal") else 6, adaln)
        if adaln == "diagonal":
            self.gamma_attn = nn.Parameter(torch.zeros(width))
            self.gamma_mlp = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: tokens (B, N, D); c: the conditioning (B, D), or adaLN-Single's t_block(c) (B, 6D)."""
        (b, n, d), mod = x.shape, modulations(self, c, x.shape[2])
        if len(mod) == 4:  # no gate from c: plain's is 1, diagonal's a learned (D,)
            gates = getattr(self, "gamma_attn", 1), getattr(self, "gamma_mlp", 1)
            mod = (*mod[:2], gates[0], *mod[2:], gates[1])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        qkv = self.attn.qkv(modulate(x, shift_msa, scale_msa))
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v, fused
        x = x + gate_msa * self.attn.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + gate_mlp * self.mlp(modulate(x, shift_mlp, scale_mlp))


class DiT(nn.Module):
    """Predicts the noise eps(x_t, t, y) of images x_t (B, C, H, W) in [-1, 1], integer timesteps
    t (B,) and labels y (B,), y = num_classes the null class; num_classes 0: y unused."""

    def __init__(self, img_size: int = 32, patch: int = 4, in_channels: int = 3, width: int = 384, depth: int = 6,
                 heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 10, adaln: str = "zero"):
        super().__init__()
        self.patch, self.grid, self.num_classes = patch, img_size // patch, num_classes
        self.x_embedder = nn.Conv2d(in_channels, width, patch, stride=patch)  # patchify
        # A buffer, not a parameter: fixed, and not in the checkpoint (a function of the config).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, self.grid)[None], persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # num_classes + 1 rows: the last is the null class of dropped labels (and guidance).
        self.y_embedder = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        if adaln == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # the one shared modulation MLP
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, adaln) for _ in range(depth))
        self.final_layer = nn.Module()  # a container: the reference's weight names
        self.final_layer.linear = nn.Linear(width, patch * patch * in_channels)
        add_modulation(self.final_layer, width, 2, adaln)
        # As the reference: Xavier-uniform Linears (the patch embedding as one), zero biases;
        # N(0, 0.02) for the label table, the timestep MLP (and t_block); zero adaLN and output.
        for linear in [module for module in self.modules() if isinstance(module, nn.Linear)]:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(width, -1))
        nn.init.zeros_(self.x_embedder.bias)
        normal = [self.y_embedder, self.t_embedder[0], self.t_embedder[2]]
        normal += [self.t_block[1]] if adaln == "single" else []
        for module in filter(None, normal):  # y_embedder is None when unconditional
            nn.init.normal_(module.weight, std=0.02)
        layers = [*self.blocks, self.final_layer]
        for linear in [m.adaLN_modulation[1] for m in layers if adaln != "single"] + [self.final_layer.linear]:
            nn.init.zeros_(linear.weight)  # the bias is 0 already

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, P*P*C) tokens -> (B, C, H, W) images; a token's pixels in (row, col, channel)."""
        b, p, c, g = x.shape[0], self.patch, x.shape[2] // self.patch ** 2, self.grid
        return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = (H/P)(W/P)
        c = self.t_embedder(timestep_embedding(t, TIMESTEP_FREQUENCY_DIM))
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)  # c = t_emb + y_emb
        block_c = self.t_block(c) if hasattr(self, "t_block") else c
        for block in self.blocks:
            h = block(h, block_c)
        shift, scale = modulations(self.final_layer, c, h.shape[2])
        return self.unpatchify(self.final_layer.linear(modulate(h, shift, scale)))


def build_model(args: Args) -> DiT:
    return DiT(args.img_size, args.patch, 3, args.width, args.depth, args.heads, args.mlp_ratio,
               args.num_classes, args.adaln)


# --------------------------------------------------------------------------------------------------
# Samplers of model_fn(x_t, t) -> predicted noise (t: int64 (B,)), x_T, alphas_cumprod (float64, T);
# the class labels and the guidance live inside model_fn (guided_model_fn, at the end).


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
#   sed '/^# ==== BEGIN OPTIONAL: judge/,/^# ==== END OPTIONAL: judge/d; /# optional: judge$/d' dit_cifar10.py > x.py


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


def judge_samples(judge, samples: Optional[np.ndarray], labels: Optional[torch.Tensor],
                  generate: Callable, args: Args, step: int, eval_now: bool, writer):
    """eval/judge_* of an evaluation's grid, also without guidance (_cfg1); returns the judge."""
    from tqdm import tqdm  # a line of its own, not on the progress bar's

    if not (eval_now and samples is not None and args.dataset == "shapes"):
        return judge
    judge = judge or make_shapes_judge(args, len(samples))
    judged = [("", samples)]
    if args.num_classes > 0 and args.cfg_scale != 1.0:  # the same noise without guidance: what guidance adds
        with contextlib.suppress(StopRequested):
            judged.append(("_cfg1", generate(len(samples), labels, replace(args, cfg_scale=1.0))))
    for suffix, images in judged:
        scores = judge_scores(judge[0], images, labels, judge[1], judge[2])
        for name, value in scores.items():
            writer.add_scalar(f"eval/judge_{name}{suffix}", value, step)
        tqdm.write(f"judge at step {step}{suffix.replace('_', ', ')}: " +
                   ", ".join(f"{k} {v:.3g}" for k, v in scores.items()))
    return judge


# ==== END OPTIONAL: judge ====


def sample_images(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, sampler: str,
                  num_steps: int, eta: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """uint8 images (B, 3, H, W) from the chosen sampler. DDPM with S < T steps visits DiT's
    respaced timesteps (space_timesteps: the "linspace" spacing), not diffusers' leading ones."""
    if sampler == "ddpm":
        x = ddpm_sample(model_fn, x_T, alphas_cumprod, num_steps, generator=generator, spacing="linspace")
    elif sampler == "ddim":
        x = ddim_sample(model_fn, x_T, alphas_cumprod, num_steps, eta=eta, generator=generator)
    else:
        x = dpm_solver_sample(model_fn, x_T, alphas_cumprod, num_steps)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> {0..255}


def guided_model_fn(model: nn.Module, labels: Optional[torch.Tensor], cfg_scale: float = 1.0,
                    autocast=contextlib.nullcontext()) -> Callable:
    """model_fn(x_t, t), labels (B,) and classifier-free guidance inside: eps = eps_u + s (eps_c -
    eps_u) (Ho & Salimans' w = s - 1) in one forward; labels None or s = 1: a plain forward."""
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast:
            if labels is None or cfg_scale == 1.0:
                return model(x, t, labels).float()
            y = torch.cat([labels, torch.full_like(labels, model.num_classes)])  # null: num_classes
            eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), y).float().chunk(2)
        return eps_uncond + cfg_scale * (eps_cond - eps_uncond)

    return model_fn


def dit_loss(model: nn.Module, x0: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor, noise: torch.Tensor,
             alphas_cumprod: torch.Tensor, autocast=contextlib.nullcontext()) -> torch.Tensor:
    """Ho et al.'s L_simple (eq. 14): || eps - eps_theta(x_t, t, y) ||^2, batch mean; y: int64
    labels (B,), num_classes the null class, None: unconditional."""
    abar = alphas_cumprod[t].float()[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # x_t ~ N(sqrt(abar_t) x0, (1-abar_t) I)
    with autocast:
        return F.mse_loss(model(x_t, t, y).float(), noise)


# --------------------------------------------------------------------------------------------------
# Evaluation (FID; the judge is above) and main()'s steps: samples, the run length, the start, logs


def make_fid_metric(feature_extractor: Optional[nn.Module] = None):
    """torchmetrics' FID on Inception-v3 features (torch-fidelity's), or on feature_extractor's."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=2048 if feature_extractor is None else feature_extractor)
    except Exception as e:  # noqa: BLE001 - no torchmetrics or torch-fidelity, or no Inception weights
        raise UserError(f"FID needs torchmetrics, torch-fidelity and the Inception weights "
                        f"pt_inception-2015-12-05-6726825d.pth (pip install -e '.[eval]'; offline, put the file in "
                        f"{torch.hub.get_dir()}/checkpoints/): {error_reason(e)}") from None


def evaluate_fid(fid_metric, generate: Callable[[int, Optional[torch.Tensor]], np.ndarray], real_images: np.ndarray,
                 args: Args, device: torch.device, writer=None, step: int = 0):
    """FID of --fid-num-samples samples, every class equally often, vs the training images."""
    num, classes = args.fid_num_samples, args.num_classes
    samples = generate(num, torch.arange(num) % classes if classes > 0 else None)
    fid_metric.to(device).reset()  # a Module: moved in place
    for images, real in ((real_images, True), (samples, False)):
        for batch in torch.from_numpy(images).split(args.sample_batch_size):
            fid_metric.update(batch.to(device), real=real)
    fid = float(fid_metric.compute())
    guidance = f", guidance {args.cfg_scale:g}" if classes > 0 else ""
    print(f"FID of {num} samples{guidance}: {fid:.3f}")
    if writer is not None:
        writer.add_scalar("eval/fid", fid, step)
        writer.add_scalar("eval/fid_num_samples", num, step)


def write_samples(folder: Path, stem: str, images: np.ndarray, labels: Optional[torch.Tensor] = None,
                  columns: Optional[int] = None) -> Path:
    """A PNG grid of the first 256 images (a row of columns per class), an .npz of the uint8 images
    (arr_0: (N, H, W, 3)) and int64 labels if any (arr_1, as ADM's)."""
    write_png(folder / f"{stem}.png", make_grid(images[:256], columns))
    np.savez(folder / f"{stem}.npz", images.transpose(0, 2, 3, 1), *([] if labels is None else [labels.numpy()]))
    return folder / f"{stem}.png"


def step_memory_profile(args: Args, setup: "Setup") -> float:
    """Refuses a --batch-size whose step won't fit (one line); returns forward FLOPs per image."""
    with torch.device("meta"):
        model = build_model(args)
        x0, t = torch.zeros(1, 3, args.img_size, args.img_size), torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if args.num_classes > 0 else None
        activations = saved_activation_bytes(lambda: dit_loss(model, x0, y, t, x0, torch.ones(args.timesteps)))
    num_params = sum(p.numel() for p in model.parameters())
    check_step_memory(setup, args.batch_size, num_params, activations, args.dtype)
    return forward_flops(lambda: build_model(args), x0, t, y)


def generate_samples(ema_model: nn.Module, num: int, class_labels: Optional[torch.Tensor], args: Args,
                     alphas_cumprod: torch.Tensor, autocast, stop: "StopFlag") -> np.ndarray:
    """num uint8 (N, 3, H, W) samples of class_labels (None: any), from seed + 10,000's noise."""
    device = next(ema_model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed + 10_000)
    out, starts = [], range(0, num, args.sample_batch_size)
    # on a terminal only: in a log file a bar nested under the training bar writes cursor codes
    with progress_bar(len(starts) * args.num_sampling_steps, 0, "sampling", "step", sys.stderr.isatty()) as bar:
        bar.leave = None  # tqdm's rule: the finished bar stays, unless it sits below the training bar
        for start in starts:
            x_T = torch.randn((min(args.sample_batch_size, num - start), 3, args.img_size, args.img_size),
                              generator=generator, device=device)
            y = None if class_labels is None else class_labels[start: start + len(x_T)].to(device)
            guided = guided_model_fn(ema_model, y, args.cfg_scale, autocast)

            def model_fn(x, t):
                stop.check()
                bar.update(1)
                return guided(x, t)

            out.append(sample_images(model_fn, x_T, alphas_cumprod, args.sampler, args.num_sampling_steps,
                                     args.ddim_eta, generator).cpu())
    return torch.cat(out).numpy()


def ema_decay_at(step: int, decay: float) -> float:
    """d_t = min(decay, (1 + t) / (10 + t)): a function of the step alone (exact resume)."""
    return min(decay, (1 + step) / (10 + step))


def run_length_in_steps(args: Args, given: set[str], num_items: int, checkpoint: Optional[dict]) -> Args:
    """--epochs (default 100 without --total-steps) as ceil(epochs N / B) optimizer steps. Format 1
    counted the run length, --save-every and --eval-every in epochs of N // B steps."""
    if {"epochs", "total_steps"} <= given:
        raise UserError(f"--epochs {args.epochs} and --total-steps {args.total_steps} both set the run "
                        f"length: give one")
    if checkpoint is not None and checkpoint["format_version"] == 1:  # flags given now count steps
        epoch = num_items // args.batch_size  # format 1's epoch, in steps
        steps = {k: getattr(args, k) * epoch for k in ("save_every", "eval_every") if k not in given}
        if not {"epochs", "total_steps"} & given:
            steps["total_steps"] = args.epochs * epoch
        args = replace(args, **steps, epochs=args.epochs if "epochs" in given else None)
    if args.epochs is not None or args.total_steps is None:
        steps = math.ceil((args.epochs or 100) * num_items / args.batch_size)
        args = replace(args, total_steps=steps, epochs=None)
    return args


def sample_from_checkpoint(generate: Callable, args: Args, run_dir: Path, step: int, fid_metric, images_np: np.ndarray,
                           device: torch.device, class_names: list[str]):
    """--sample-only: --num-samples samples in samples/, a row of ceil(N / classes) per class or N
    of --class-label; with --eval-fid, their FID. A signal abandons them, writes nothing more."""
    label, labels, columns, what = args.class_label, None, None, ""  # None: unconditional
    if label is not None:  # an index (check_args checked its range) or a class name
        if not label.lstrip("-").isdigit() and label not in class_names:
            raise UserError(f"--class-label {label!r} is not a class of this model: give an index "
                            f"(0 to {len(class_names) - 1}) or one of {', '.join(map(repr, class_names))}")
        label = int(label) if label.lstrip("-").isdigit() else class_names.index(label)
        labels, what = torch.full((args.num_samples,), label), f" of class {label} ({class_names[label]})"
    elif args.num_classes > 0:
        columns = math.ceil(args.num_samples / args.num_classes)
        labels = torch.arange(args.num_classes).repeat_interleave(columns)  # a row per class
        what = f", {columns} of each of the {args.num_classes} classes"
        if len(labels) != args.num_samples:
            what += f" (--num-samples {args.num_samples} rounded up to fill the rows)"
    which = ("" if label is None else f"_class{label}") + (f"_cfg{args.cfg_scale:g}" if args.num_classes else "")
    try:
        samples = generate(args.num_samples if labels is None else len(labels), labels)
        stem = f"sample_only_{args.sampler}{args.num_sampling_steps}{which}_step{step}_{int(time.time())}"
        path = write_samples(run_dir / "samples", stem, samples, labels, columns)
        print(f"wrote {len(samples)} samples{what} to {path} and {path.with_suffix('.npz')}")
        if args.eval_fid:
            evaluate_fid(fid_metric, generate, images_np, args, device)
    except StopRequested:
        print("stopped by signal while sampling; nothing more was written")


def open_run(args: Args, setup: "Setup", run_dir: Optional[Path], dataset_id: str, step: int, model: nn.Module,
             num_images: int, class_names: list[str]):
    """The model to train (compiled, in DDP), rank 0's run folder and writer; prints the start."""
    train_model = torch.compile(model, backend=COMPILE_BACKEND) if args.compile else model
    if setup.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model)  # on the model's device
    if not setup.is_main:
        return run_dir, None, train_model
    run_dir, writer = open_writer(args, run_dir, step, dataset_id)
    num_params = sum(p.numel() for p in model.parameters())  # trainable only: the position embedding is a buffer
    print(f"run folder: {run_dir}")
    if step > 0:
        print(f"resuming at step {step} of {args.total_steps}")
    else:
        writer.add_scalar("charts/num_parameters", num_params, 0)
    classes = f"{args.num_classes} classes" if args.num_classes > 0 else "unconditional"
    print(f"model: DiT with adaLN-{args.adaln}, {num_params:,} parameters; data: {num_images:,} "
          f"images of {args.img_size}px, {classes}; device: {setup.device} x {setup.world_size}")
    if class_names:  # what --class-label accepts
        print("classes: " + ", ".join(f"{k} {name}" for k, name in enumerate(class_names)))
    return run_dir, writer, train_model


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
    checkpoint, run_dir = None, None
    if args.resume:  # the checkpoint's arguments, with the RESUME_MUTABLE flags given
        args, checkpoint, run_dir = resume_run(args, given, trains=not args.sample_only)
    check_args(args, torchrun_world()[0])
    setup = setup_device(args)
    device, autocast = setup.device, autocast_context(setup, args.dtype)
    train_generator = torch.Generator(device=device).manual_seed(args.seed)  # flips, drops, t, eps
    stop = StopFlag()  # SIGTERM/SIGINT now finish the step (or abandon sampling), save, exit 0
    flops = None if args.sample_only else step_memory_profile(args, setup)  # too big: exit 2

    images_np, labels_np, dataset_id, data_class_names = load_dataset(args)
    images, labels = torch.from_numpy(images_np).to(device), torch.from_numpy(labels_np).to(device)
    args = run_length_in_steps(args, given, len(images), checkpoint)
    conditional = args.num_classes > 0
    class_names = (checkpoint or {}).get("class_names", data_class_names) if conditional else []
    model = build_model(args).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  fused=setup.use_cuda)
    # linear warmup: lr_s = lr * min(1, (s + 1) / warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=setup.use_cuda and args.dtype == "float16")
    alphas_cumprod = make_alphas_cumprod(make_beta_schedule(args.beta_schedule, args.timesteps, args.beta_start,
                                                            args.beta_end))
    alphas_cumprod_device = alphas_cumprod.float().to(device)
    parts = (model, ema_model, optimizer, scheduler, scaler, train_generator)  # as CHECKPOINT_KEYS
    step = 0 if checkpoint is None else restore_state(checkpoint, *parts)

    def generate(num: int, class_labels: Optional[torch.Tensor], sample_args: Args = args) -> np.ndarray:
        return generate_samples(ema_model, num, class_labels, sample_args, alphas_cumprod, autocast, stop)

    fid_metric = make_fid_metric() if args.eval_fid else None  # fails now, not after training
    if args.sample_only or step >= args.total_steps:  # nothing to train: sample, or say so
        leave_process_group(setup.world_size)  # sampling is rank 0's alone
        if setup.is_main and args.sample_only:
            sample_from_checkpoint(generate, args, run_dir, step, fid_metric, images_np, device, class_names)
        elif setup.is_main:  # a finished run says so and writes nothing (no purge)
            print(f"the run is already at step {step} of --total-steps {args.total_steps}: raise it to train on")
        stop.restore()
        return

    # ---- the run folder (after the signal handlers: it gets a checkpoint), TensorBoard, throughput
    run_dir, writer, train_model = open_run(args, setup, run_dir, dataset_id, step, model, len(images),
                                            class_names)
    meter = Meter(device, 3 * flops, peak_flops(setup, args.dtype), setup.world_size)  # 3x the forward
    judge = None  # optional: judge

    # ---- train
    local_batch = args.batch_size // setup.world_size
    mine = slice(setup.rank * local_batch, (setup.rank + 1) * local_batch)
    first_step, step_timer = step, StepTimer(step, args.total_steps, setup)
    progress = progress_bar(args.total_steps, step, "train", "step", setup.is_main)
    while step < args.total_steps:
        # Each rank draws the whole global batch, then takes its slice: 2 ranks compute what 1 does.
        indices = global_batch_indices(step, args.batch_size, len(images), args.seed).to(device, non_blocking=True)
        flips = torch.rand(args.batch_size, generator=train_generator, device=device) < 0.5
        if conditional:  # guidance training: a label becomes the null class with p = --class-dropout
            drops = torch.rand(args.batch_size, generator=train_generator, device=device) < args.class_dropout
        t = torch.randint(0, args.timesteps, (args.batch_size,), generator=train_generator, device=device)
        noise = torch.randn((args.batch_size, *images.shape[1:]), generator=train_generator, device=device)
        x0 = images[indices[mine]].float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        x0 = torch.where(flips[mine, None, None, None] & args.random_flip, x0.flip(3), x0)
        y = torch.where(drops[mine], args.num_classes, labels[indices[mine]]) if conditional else None
        loss = dit_loss(train_model, x0, y, t[mine], noise[mine], alphas_cumprod_device, autocast)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        # --max-grad-norm 0 (the reference): no clipping; an infinite bound still returns the norm
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
            # EMA samples, a row per class (8 unconditional); None: a signal abandoned them
            per_row, samples = args.samples_per_class if eval_now else 2, None
            rows = torch.arange(args.num_classes).repeat_interleave(per_row) if conditional else None
            with contextlib.suppress(StopRequested):
                samples = generate(per_row * (args.num_classes or 8), rows)
                writer.add_image("samples/ema", make_grid(samples[:256], per_row), step, dataformats="HWC")
                path = write_samples(run_dir / "samples", f"step{step:08d}", samples, rows, per_row)
                if not eval_now:
                    seconds = f"{time.perf_counter() - started:.0f} s"
                    progress.write(f"first samples at step {step}, {seconds} after the start: {path}")
            judge = judge_samples(judge, samples, rows, generate, args, step, eval_now, writer)  # optional: judge
        # Every rank stops at the same step: all-reduced at a log step under torchrun, at once alone
        stopping = stop.sync(setup) if setup.world_size == 1 or step % args.log_every == 0 else False
        if save_now or stopping:
            save_run(run_dir, args, step, parts, meter, setup, class_names=class_names)
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
