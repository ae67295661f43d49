# cleanworlds: DiT (Peebles & Xie 2023) on CIFAR-10. Docs, results: README.md, benchmark/RESULTS.md
"""
Class-conditional Diffusion Transformer (adaLN-Zero and 3 other adaLN variants) with guidance.

    python dit_cifar10.py                                    # the seed's config: patch 4, width 384
    python dit_cifar10.py --preset dit-s2 --eval-fid         # DiT-S/2 and its FID (50k samples)
    python dit_cifar10.py --adaln single                     # or plain, diagonal (default: zero)
    torchrun --standalone --nproc_per_node=8 dit_cifar10.py  # 8 GPUs, global batch 128
    python dit_cifar10.py --preset tiny                      # end to end on a CPU, offline (shapes)
    python dit_cifar10.py --preset cpu                       # the asked shapes in minutes, 2 cores
Your images, a subfolder per class; sampling one class of a run with guidance:
    python dit_cifar10.py --dataset folder --data-dir my_images --img-size 64 --num-classes 5
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
import pickle
import random
import shutil
import signal
import socket
import sys
import tarfile
import time
import urllib.request
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT_NAME = "dit_cifar10.py"
CHECKPOINT_FORMAT_VERSION = 2  # 2: the run length and cadence in optimizer steps (1: in epochs)
OLDER_CHECKPOINT_FORMATS = (1,)  # formats a resume converts (run_length_in_steps)
# torch.compile's backend (--compile), read at each call: tests put a counting or failing one here
COMPILE_BACKEND = "inductor"
# A flag's unit, shown by --help (--save-every STEPS) and read by the tests: one meaning per name.
STEPS, EPOCHS = tyro.conf.arg(metavar="STEPS"), tyro.conf.arg(metavar="EPOCHS")
# Beside an Args field: its domain ('>= 1', '[0, 1)': every numeric flag, checked at start-up), and
# RESUME_MUTABLE when --resume may change it (run length, cadence, logging, sampling): flag_marks.
RESUME_MUTABLE = "resume-mutable"


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: Annotated[int, ">= 0"] = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """CPU: deterministic (exact resume at a fixed thread count); CUDA: cudnn.deterministic and
    CUBLAS_WORKSPACE_CONFIG, not torch's strict (slow) algorithms: a resume is close, not bitwise"""
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

    # Data
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

    # Model (DiT, Peebles & Xie 2023)
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

    # Diffusion
    timesteps: Annotated[int, ">= 1"] = 1000
    """number of diffusion steps T"""
    beta_schedule: Literal["linear", "cosine"] = "linear"
    """linear (Ho et al.) or cosine (Nichol and Dhariwal)"""
    beta_start: Annotated[float, "(0, 1)"] = 1e-4
    """beta_1 of the linear schedule at T = 1000; scaled by 1000/T (improved diffusion)"""
    beta_end: Annotated[float, "(0, 1)"] = 0.02
    """beta_T of the linear schedule at T = 1000; scaled by 1000/T, capped at 0.999"""

    # Training
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
    # Why the warm-up: at a constant 0.9999 the EMA holds 55% of the initial weights after 6,000 steps.
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

    # Sampling and evaluation
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
    # Shapes of the asked class in minutes on 2 CPU cores: guidance 3 draws the asked class at
    # this budget. The judge scores each evaluation, guided and at guidance 1.
    "cpu": dict(dataset="shapes", img_size=16, num_shapes_images=4096, patch=2, width=128, depth=4,
                heads=4, total_steps=2048, batch_size=64, learning_rate=1e-3, ema_decay=0.999,
                log_every=32, save_every=256, eval_every=512, first_sample_at=100, sampler="ddim",
                num_sampling_steps=50, cfg_scale=3.0, samples_per_class=12, num_samples=120,
                fid_num_samples=2000, sample_batch_size=120),
    # The paper's model sizes at CIFAR-10 resolution (patch 2: 256 tokens).
    "dit-s2": dict(patch=2, width=384, depth=12, heads=6),
    "dit-b2": dict(patch=2, width=768, depth=12, heads=12),
}
# Flags spelled otherwise on the command line (none here; diamond_atari.py's --game is --env-id).
FLAG_ALIASES: dict[str, str] = {}
# A checkpoint after its header, in checkpoint_state's order (args, step, every global RNG, each
# part's state): restore_state reads them back, load_checkpoint refuses a file without one.
CHECKPOINT_KEYS = ("args", "step", "rng", "model", "ema", "optimizer", "scheduler", "scaler", "train_generator")


def check_args(args: Args, world_size: int):
    """Settings that cannot work, refused at start-up in one line (before data or a run folder).
    With --resume, the merged args: a --sample-only is checked as strictly as a new run."""
    check_arg_domains(args)
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world_size} torchrun processes")
    if args.num_sampling_steps > args.timesteps:
        raise UserError(f"--num-sampling-steps must be between 1 and --timesteps {args.timesteps}, "
                        f"not {args.num_sampling_steps}")
    if args.beta_start > args.beta_end:
        raise UserError(f"--beta-start {args.beta_start} must not exceed --beta-end {args.beta_end}")
    if args.img_size % args.patch:
        raise UserError(f"--patch {args.patch} does not divide --img-size {args.img_size}: choose one that does")
    if args.width % args.heads:
        raise UserError(f"--heads {args.heads} does not divide --width {args.width}: choose one that does")
    if args.width % 4:
        raise UserError(f"--width {args.width} must be divisible by 4 (the 2D sin-cos position embedding)")
    label = args.class_label  # an index, or a name (sample_from_checkpoint looks it up)
    if label is not None and (not args.num_classes or label.lstrip("-").isdigit()
                              and not 0 <= int(label) < args.num_classes):
        raise UserError(f"--class-label {label} is out of range: the model has {args.num_classes} classes")
    # Guidance mixes in eps(x_t, t, null); --class-dropout 0 never trains the null class's embedding
    # (it keeps its random initialisation), so any scale but 1 steers the samples by noise.
    if args.num_classes > 0 and args.class_dropout == 0 and args.cfg_scale != 1:
        raise UserError(f"--cfg-scale {args.cfg_scale:g} needs the null class, which --class-dropout 0 never trains: "
                        f"use --cfg-scale 1 (no guidance), or train with --class-dropout above 0 (DiT: 0.1)")
    if args.sample_only and not args.resume:
        raise UserError("--sample-only needs --resume RUN_FOLDER_OR_CHECKPOINT")


# --------------------------------------------------------------------------------------------------
# Data: CIFAR-10 (binary, md5-checked), image folders, generated shapes, all as uint8 (N, 3, H, W).

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class RestrictedUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's python version (pickled numpy arrays), refusing anything that could run
    code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    } | {("builtins", name) for name in ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray",
                                          "str", "int", "float", "complex", "bool", "slice", "range")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only numpy arrays, containers)")


def read_cifar10_batch(path: Path, fix: str) -> tuple[np.ndarray, np.ndarray]:
    """One training batch, binary (data_batch_i.bin) or python (data_batch_i): uint8 (N, 3072),
    labels (N,)."""
    if path.suffix == ".bin":
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise UserError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records "
                            f"(empty or truncated); {fix}")
        records = raw.reshape(-1, 3073)  # 1 label byte, then 3x32x32 pixels, channel-major
        return records[:, 1:], records[:, 0]
    try:
        with open(path, "rb") as f:
            batch = RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - whatever the bytes hold, it is the same user-facing error
        raise UserError(f"{path} is not a CIFAR-10 python batch ({error_reason(e)}); {fix}") from None
    data, labels = (batch.get(b"data"), batch.get(b"labels")) if isinstance(batch, dict) else (None, None)
    if not isinstance(data, np.ndarray) or not isinstance(labels, list):
        raise UserError(f"{path} is not a CIFAR-10 python batch (a dict with b'data', a uint8 array, and "
                        f"b'labels', a list); {fix}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) == 0:
        raise UserError(f"{path}: b'data' is {data.dtype} {data.shape}, not uint8 (N, 3072), N >= 1; {fix}")
    return data, np.asarray(labels)


def read_cifar10(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The five training batches of cifar-10-batches-bin (or -py) as uint8 (N, 3, 32, 32) and int64
    labels."""
    fix = f"delete the folder {folder} to extract (or download) CIFAR-10 again"
    images, labels = [], []
    for i in range(1, 6):
        path = folder / f"data_batch_{i}{'.bin' if folder.name.endswith('-bin') else ''}"
        if not path.is_file():
            raise UserError(f"{path} is missing (CIFAR-10 has data_batch_1 to data_batch_5); {fix}")
        data, batch_labels = read_cifar10_batch(path, fix)
        if batch_labels.shape != (len(data),) or batch_labels.dtype.kind not in "iu" or (
                batch_labels.min() < 0 or batch_labels.max() > 9):
            raise UserError(f"{path}: the labels (b'labels') are not {len(data)} integers in 0..9; {fix}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar10(data_dir: str, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR-10 train split as uint8 (50000, 3, 32, 32) and int64 labels, from the binary
    archive."""
    root = Path(data_dir)
    # An extracted folder is the data: the archive is extracted atomically, so a damaged folder is
    # refused with the name of what is wrong in it, never read in part or silently replaced.
    for name in ("cifar-10-batches-bin", "cifar-10-batches-py"):
        if (root / name).is_dir():
            return read_cifar10(root / name)
    archive = root / "cifar-10-binary.tar.gz"
    if not archive.exists():
        if not download:
            raise UserError(f"CIFAR-10 not found: put cifar-10-binary.tar.gz ({CIFAR10_URL}) in {root}/")
        root.mkdir(parents=True, exist_ok=True)
        partial = archive.with_suffix(".part")
        try:
            print(f"downloading {CIFAR10_URL} to {root}/ ...", flush=True)
            with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response, open(partial, "wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as e:
            partial.unlink(missing_ok=True)
            raise UserError(f"could not download CIFAR-10 ({e.__class__.__name__}): put cifar-10-binary.tar.gz "
                            f"({CIFAR10_URL}) in {root}/ and run again") from None
        os.replace(partial, archive)
    if md5_of(archive) != CIFAR10_MD5:
        raise UserError(f"{archive} is corrupt (md5 is not {CIFAR10_MD5}): delete it and download it again")
    extracting = root / ".cifar-10-extracting"  # then renamed: a killed extraction leaves no partial folder
    shutil.rmtree(extracting, ignore_errors=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(extracting, filter="data")
    if not (extracting / "cifar-10-batches-bin").is_dir():
        shutil.rmtree(extracting, ignore_errors=True)
        raise UserError(f"{archive} holds no cifar-10-batches-bin folder: delete it and download it again")
    os.replace(extracting / "cifar-10-batches-bin", root / "cifar-10-batches-bin")
    shutil.rmtree(extracting, ignore_errors=True)
    return read_cifar10(root / "cifar-10-batches-bin")


def jpeg_is_complete(data: bytes) -> bool:
    """False if a JPEG ends before its end-of-image marker (OpenCV decodes a truncated one with a
    warning). The header's segments are skipped by length (an EXIF thumbnail's marker is not the
    image's); in the scans FF D9 can only be that marker (a data byte FF is stuffed as FF 00).
    Trailing data is allowed."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] not in (0xD9, 0xDA):  # up to the first scan
        i += 1 if data[i + 1] == 0xFF else 2 + int.from_bytes(data[i + 2: i + 4], "big")
    return data.find(b"\xff\xd9", i) >= 0


def png_is_complete(data: bytes) -> bool:
    """Walks a PNG's chunks (length, type, data, CRC) to IEND: False if the data ends first."""
    i = 8
    while i + 8 <= len(data):
        if data[i + 4: i + 8] == b"IEND":
            return True
        i += 12 + int.from_bytes(data[i: i + 4], "big")
    return False


def read_image(path: Path) -> np.ndarray:
    """A PNG/JPG file as uint8 BGR (H, W, 3); a truncated file or one OpenCV cannot decode is
    refused."""
    import cv2

    fix = "replace it with a valid PNG/JPG or remove it"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); make it readable or remove it") from None
    if data.startswith(b"\xff\xd8") and not jpeg_is_complete(data):
        raise UserError(f"{path}: truncated JPEG (it ends before its end-of-image marker); {fix}")
    if data.startswith(b"\x89PNG\r\n\x1a\n") and not png_is_complete(data):
        raise UserError(f"{path}: truncated PNG (it ends before its IEND chunk); {fix}")
    log_level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # the error below is the one line
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            raise UserError(f"{path}: more pixels than OpenCV reads (OPENCV_IO_MAX_IMAGE_PIXELS, default "
                            f"2^30); shrink the image or raise that limit") from None
        reason = str(e).strip().splitlines()[-1][:150]
        raise UserError(f"{path}: OpenCV cannot decode it ({reason}); {fix}") from None
    finally:
        cv2.utils.logging.setLogLevel(log_level)
    if bgr is None:
        raise UserError(f"{path}: {'empty file' if not data else 'not a PNG/JPG image OpenCV can decode'}; {fix}")
    return bgr


def load_image_folder(data_dir: str, img_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every PNG/JPG under data_dir, center-cropped and resized, uint8 (N, 3, S, S). Its class is
    the subfolder of data_dir it is in (at any depth); an image directly in data_dir has label
    -1."""
    import cv2

    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a folder (--dataset folder reads PNG/JPG images from it)")

    def unreadable(e: OSError):  # os.walk's onerror (Path.rglob would skip the folder without a word)
        raise UserError(f"{e.filename}: cannot read this folder ({e.strerror}); make it readable or move it "
                        f"out of --data-dir")

    paths = sorted(Path(folder) / name for folder, _, names in os.walk(root, onerror=unreadable) for name in names
                   if Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise UserError(f"no PNG/JPG images under {data_dir} (--dataset folder reads images from its subfolders)")
    parts = [p.relative_to(root).parts for p in paths]
    class_names = sorted({part[0] for part in parts if len(part) > 1})
    images = []
    for p in paths:
        bgr = read_image(p)
        h, w = bgr.shape[:2]
        side = min(h, w)  # center crop to a square, then resize (INTER_AREA: no aliasing when shrinking)
        square = bgr[(h - side) // 2: (h + side) // 2, (w - side) // 2: (w + side) // 2]
        resized = cv2.resize(square, (img_size, img_size), interpolation=cv2.INTER_AREA)
        images.append(resized[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC -> RGB CHW
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
        if k < 8:
            mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        images[i][mask] = SHAPE_COLOURS[k % 8]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels.astype(np.int64)


def load_dataset(args: Args) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """uint8 images (N, 3, H, W), int64 labels, the dataset id (run name) and the class names (label
    k is class_names[k]; a folder's: its sorted subfolders), as many as --num-classes unless that is
    0."""
    if args.dataset == "cifar10":
        images, labels = load_cifar10(args.data_dir, args.download)
        if args.img_size != 32:
            raise UserError(f"CIFAR-10 images are 32x32: use --img-size 32, not {args.img_size}")
        dataset_id, class_names = "cifar10", CIFAR10_CLASSES
    elif args.dataset == "folder":
        images, labels, class_names = load_image_folder(args.data_dir, args.img_size)
        dataset_id = Path(args.data_dir).resolve().name.replace("/", "_") or "folder"
        if args.num_classes > 0 and (labels < 0).any():
            raise UserError(f"{(labels < 0).sum()} images lie directly in {args.data_dir} and so have no class: move "
                            f"them into a class subfolder, or train an unconditional model with --num-classes 0")
    else:
        images, labels = make_shapes_dataset(args.num_shapes_images, args.img_size, seed=args.seed)
        dataset_id, class_names = "shapes", SHAPES_CLASSES
    if args.num_classes > 0 and args.num_classes != len(class_names):
        raise UserError(f"--num-classes {args.num_classes} disagrees with the data: {dataset_id} has "
                        f"{len(class_names)} classes; use --num-classes {len(class_names)} (or 0 for an unconditional "
                        f"model)")
    return images, labels, dataset_id, class_names


def epoch_permutation(num_items: int, epoch: int, seed: int) -> torch.Tensor:
    # The data order is a pure function of (seed, epoch), so the position in it is just the step counter: an exact
    # resume needs no saved sampler state, and every torchrun rank agrees on the global batch.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)


def global_batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """The step-th global batch of an endless stream of per-epoch permutations (batches cross
    epochs)."""
    position, chunks = step * batch_size, []
    while batch_size > 0:
        epoch, offset = divmod(position, num_items)
        take = min(batch_size, num_items - offset)
        chunks.append(epoch_permutation(num_items, epoch, seed)[offset: offset + take])
        position, batch_size = position + take, batch_size - take
    return torch.cat(chunks)


# --------------------------------------------------------------------------------------------------
# Noise schedule. Everything is computed in float64 and cast at the point of use.


def make_beta_schedule(kind: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """betas (T,) in float64. "linear": Ho et al.'s linspace(beta_start, beta_end, T), both ends
    scaled by 1000 / T as improved-diffusion does (T = 1000: the paper's; a shorter schedule still
    ends in noise), capped at 0.999. "cosine": Nichol & Dhariwal. ValueError on another kind."""
    if kind == "linear":  # beta_t = (1000 / T) linear from beta_1 to beta_T
        scale = 1000 / timesteps  # exactly 1.0 at T = 1000
        return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64).clamp(max=0.999)
    if kind == "cosine":  # Nichol & Dhariwal: abar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008
        s = 0.008
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)  # beta_t = 1 - abar_t / abar_{t-1}
    raise ValueError(f"unknown beta schedule {kind}")


def make_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)  # abar_t = prod_{s<=t} (1 - beta_s)


# --------------------------------------------------------------------------------------------------
# Model: DiT (Peebles & Xie 2023). The --adaln variants (c = t_emb + y_emb, D the width, LN without
# affine parameters, modulate(h, shift, scale) = h (1 + scale) + shift):
#   zero      adaLN-Zero (the paper's): per block SiLU -> Linear(D, 6D) on c, zero-init: shift, scale
#             and gate for attention and MLP, x += gate * Attn(modulate(LN(x), shift, scale)).
#   plain     adaLN (the paper's ablation): Linear(D, 4D), shift and scale only, no gate.
#   single    adaLN-Single (PixArt-alpha): one Linear(D, 6D) on c for all blocks, plus a learned
#             (6, D) table per block (N(0, 1/D)); the final layer adds a (2, D) table to c.
#   diagonal  plain's shift and scale, each residual branch scaled by a learned per-channel gamma
#             (CaiT's LayerScale), not conditioned on c, zero-init.
# Every variant zero-initialises the output Linear: the model starts at eps = 0.

TIMESTEP_FREQUENCY_DIM = 256  # the timestep's sinusoidal features before the MLP


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """DiT's frequency embedding: [cos(t w_i), sin(t w_i)], w_i = exp(-ln(10000) i / (dim/2)), i <
    dim/2."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's and DiT's fixed 2D sin-cos position embedding (grid_size^2, dim), row-major: the first
    dim/2 channels encode the column, the last the row, each [sin(p w_i), cos(p w_i)], w_i =
    10000^(-4i/dim)."""
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    angles = torch.arange(grid_size, dtype=torch.float64)[:, None] * omega[None, :]
    emb_1d = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (grid_size, dim/2)
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return torch.cat([emb_1d[cols.flatten()], emb_1d[rows.flatten()]], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # adaLN: one (shift, scale) per sample and channel


class Attention(nn.Module):
    """Multi-head self-attention over the tokens (fused qkv projection, SDPA)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v per head, fused kernel
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """Pre-LN transformer block conditioned by adaptive LayerNorm (the --adaln variants above)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, adaln: str = "zero"):
        super().__init__()
        self.adaln = adaln
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        if adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.randn(6, width) / width ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, (6 if adaln == "zero" else 4) * width))
        if adaln == "diagonal":
            self.gamma_attn = nn.Parameter(torch.zeros(width))
            self.gamma_mlp = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: tokens (B, N, D); c: the conditioning (B, D), or adaLN-Single's modulation (B, 6D)."""
        if self.adaln == "single":
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                self.scale_shift_table[None] + c.reshape(c.shape[0], 6, -1)).unbind(1)
        elif self.adaln == "zero":
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        else:
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            gate_msa, gate_mlp = (self.gamma_attn[None], self.gamma_mlp[None]) if self.adaln == "diagonal" else (1, 1)
        x = x + self.gated(gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        return x + self.gated(gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))

    @staticmethod
    def gated(gate, branch: torch.Tensor) -> torch.Tensor:
        return branch if isinstance(gate, int) else gate[:, None] * branch  # gate (B or 1, D) broadcast over tokens


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear(D, P*P*C) to the patch pixels, zero-initialised."""

    def __init__(self, width: int, patch: int, out_channels: int, adaln: str = "zero"):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        if adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.randn(2, width) / width ** 0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "scale_shift_table"):
            shift, scale = (self.scale_shift_table[None] + c[:, None]).unbind(1)
        else:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Predicts the noise eps(x_t, t, y) for images in [-1, 1], integer timesteps t (B,) and
    labels y (B,), y = num_classes the null class (guidance); num_classes 0: unconditional, y is
    ignored."""

    def __init__(self, img_size: int = 32, patch: int = 4, in_channels: int = 3, width: int = 384, depth: int = 6,
                 heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 10, adaln: str = "zero"):
        super().__init__()
        self.img_size, self.patch, self.in_channels, self.num_classes, self.adaln = (
            img_size, patch, in_channels, num_classes, adaln)
        self.x_embedder = nn.Conv2d(in_channels, width, patch, stride=patch)  # patchify: one token per P x P patch
        # A buffer, not a parameter: fixed, and not in the checkpoint (a function of the config).
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, img_size // patch)[None], persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(TIMESTEP_FREQUENCY_DIM, width), nn.SiLU(), nn.Linear(width, width))
        # num_classes + 1 rows: the last is the null class of dropped labels (and guidance).
        self.y_embedder = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        if adaln == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # the one shared modulation MLP
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, adaln) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch, in_channels, adaln)
        self.reset_parameters()

    def reset_parameters(self):
        # As the reference: Xavier-uniform Linears, zero biases, the patch embedding as a Linear;
        # N(0, 0.02) for the label table and timestep MLP; zero for adaLN modulations, the output.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        if self.adaln == "single":
            nn.init.normal_(self.t_block[1].weight, std=0.02)  # as PixArt-alpha
        for module in list(self.blocks) + [self.final_layer]:
            if hasattr(module, "adaLN_modulation"):
                nn.init.zeros_(module.adaLN_modulation[1].weight)
                nn.init.zeros_(module.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, P*P*C) tokens -> (B, C, H, W) images; a token's pixels in (row, col, channel)."""
        b, p, c, g = x.shape[0], self.patch, self.in_channels, self.img_size // self.patch
        return x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D), N = (H/P)(W/P)
        c = self.t_embedder(timestep_embedding(t, TIMESTEP_FREQUENCY_DIM))
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)  # c = t_emb + y_emb
        block_c = self.t_block(c) if self.adaln == "single" else c
        for block in self.blocks:
            h = block(h, block_c)
        return self.unpatchify(self.final_layer(h, c))


def build_model(args: Args) -> DiT:
    """The DiT of the flags (check_args has refused a patch or head count that does not divide)."""
    return DiT(args.img_size, args.patch, 3, args.width, args.depth, args.heads, args.mlp_ratio, args.num_classes,
               args.adaln)


# --------------------------------------------------------------------------------------------------
# Samplers. Each takes model_fn(x_t, t) -> predicted noise for integer timesteps t (B,), the noise
# x_T, and alphas_cumprod (float64, length T). Coefficients in float64, cast to x's dtype. The class
# labels and the guidance live inside model_fn (guided_model_fn, at the end of this section).


def _abar(alphas_cumprod: torch.Tensor, t: int) -> float:
    return 1.0 if t < 0 else float(alphas_cumprod[t])  # abar at "t = -1" is 1: the clean image


def ddim_timesteps(T: int, num_steps: int, spacing: str = "uniform") -> list[int]:
    """The S = num_steps timesteps (descending) that DDIM, and DDPM with S < T, visit before their
    last step to the clean image; ValueError unless 1 <= S <= T. S = 1: [T-1] (formulas give [0]).
    - "uniform": floor(i T / S): diffusers' "leading" where S divides T (the DDIM paper's protocol)
    - "linspace": round(linspace(0, T-1, S)), half to even: diffusers' "linspace", DiT's respacing
    - "quadratic": int(linspace(0, sqrt(0.8 T), S)^2), the DDIM paper's CIFAR-10 choice"""
    if spacing not in ("uniform", "linspace", "quadratic"):
        raise ValueError(f"unknown timestep spacing {spacing}")
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be between 1 and T = {T}, not {num_steps}")
    if num_steps == 1:
        return [T - 1]
    if spacing == "uniform":
        steps = [i * T // num_steps for i in range(num_steps)]
    elif spacing == "linspace":
        steps = [int(s) for s in np.linspace(0, T - 1, num_steps).round()]
    else:  # a repeated small timestep (large S) is an identity step
        steps = [int(s) for s in np.linspace(0, math.sqrt(T * 0.8), num_steps) ** 2]
    return steps[::-1]


@torch.no_grad()
def ddpm_sample(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: Optional[int] = None,
                variance: str = "fixed_large", clip_denoised: bool = True,
                generator: Optional[torch.Generator] = None, spacing: str = "uniform") -> torch.Tensor:
    """Ancestral sampling (Ho et al. eq. 6-7) from x_T to x_0. num_steps None: all T steps; fewer:
    ddim_timesteps(T, S, spacing) with beta'_t = 1 - abar_t / abar_prev. ValueError on a bad
    argument."""
    if variance not in ("fixed_large", "fixed_small"):
        raise ValueError(f"unknown variance {variance}")
    T = len(alphas_cumprod)
    timesteps = ddim_timesteps(T, T if num_steps is None else num_steps, spacing)
    x = x_T
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        abar_t, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
        beta_t = 1 - abar_t / abar_prev
        eps = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)  # (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        # posterior mean mu~_t = sqrt(abar_prev) beta_t / (1-abar_t) x0 + sqrt(1-beta_t) (1-abar_prev) / (1-abar_t) x_t
        mean = (math.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 \
            + (math.sqrt(1 - beta_t) * (1 - abar_prev) / (1 - abar_t)) * x
        if t_prev >= 0:  # no noise on the last step, to the clean image
            # sigma_t^2: beta_t (fixed_large, the paper's) or beta~_t = (1-abar_prev)/(1-abar_t) beta_t
            var = beta_t if variance == "fixed_large" else max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            mean = mean + math.sqrt(var) * noise
        x = mean
    return x


@torch.no_grad()
def ddim_sample(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, num_steps: int,
                eta: float = 0.0, spacing: str = "uniform", clip_denoised: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDIM (Song et al. eq. 12) from x_T to x_0 at ddim_timesteps(T, num_steps, spacing), the last
    step to abar = 1 (diffusers' set_alpha_to_one): x_prev = sqrt(abar_prev) x0 +
    sqrt(1-abar_prev-s^2) eps + s z."""
    timesteps = ddim_timesteps(len(alphas_cumprod), num_steps, spacing)
    x = x_T
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        abar_t, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
        eps = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
        if clip_denoised:  # clip x0, then re-derive eps from it so that the update stays consistent
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
        # s = eta sqrt((1-abar_prev)/(1-abar_t) (1 - abar_t/abar_prev))
        s = eta * math.sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - s * s, 0.0)) * eps
        if s > 0:
            x = x + s * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


@torch.no_grad()
def dpm_solver_sample(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor,
                      num_steps: int, clip_denoised: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep) from x_T to x_0, with
    diffusers' defaults: timesteps round(linspace(0, T-1, S+1))[::-1][:-1] (S = T: all), a final
    sigma of 0, first-order first and last steps. clip_denoised: the paper's thresholding of x0 to
    [-1, 1]."""
    T = len(alphas_cumprod)
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be between 1 and T = {T}, not {num_steps}")
    if num_steps == T:  # T+1 points 1 - 1/T apart round to a repeated timestep: h = 0 and r0 = 0/0
        timesteps = list(range(T - 1, -1, -1))
    else:  # points at least 1 apart: distinct after rounding
        timesteps = [int(s) for s in np.linspace(0, T - 1, num_steps + 1).round()][::-1][:-1]
    sigma_table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # sigma_t = sqrt((1 - abar_t) / abar_t)
    sigmas = [float(sigma_table[t]) for t in timesteps] + [0.0]

    def alpha_and_s(sigma):  # alpha_t = 1/sqrt(sigma^2 + 1), s_t = sigma alpha_t, lambda_t = log(alpha_t / s_t)
        alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
        return alpha, sigma * alpha

    x, previous_x0 = x_T, None
    for i, t in enumerate(timesteps):
        alpha_s0, s_s0 = alpha_and_s(sigmas[i])
        alpha_t, s_t = alpha_and_s(sigmas[i + 1])
        eps = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x0 = (x - s_s0 * eps) / alpha_s0  # m = (x - s_t eps) / alpha_t
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        if sigmas[i + 1] == 0.0:  # lambda = +inf: the step lands on the data prediction (first order)
            x = x0
        else:
            h = math.log(alpha_t / s_t) - math.log(alpha_s0 / s_s0)  # h = lambda_t - lambda_s0
            if previous_x0 is None:  # first step: first order, identical to DDIM
                x = (s_t / s_s0) * x - alpha_t * math.expm1(-h) * x0
            else:
                alpha_s1, s_s1 = alpha_and_s(sigmas[i - 1])
                r0 = (math.log(alpha_s0 / s_s0) - math.log(alpha_s1 / s_s1)) / h  # r0 = (lambda_s0 - lambda_s1)/h
                d1 = (x0 - previous_x0) / r0  # D1 = (m0 - m1) / r0
                # x_t = (s_t/s_s0) x - alpha_t (e^-h - 1) D0 - 0.5 alpha_t (e^-h - 1) D1
                x = (s_t / s_s0) * x - alpha_t * math.expm1(-h) * x0 - 0.5 * alpha_t * math.expm1(-h) * d1
        previous_x0 = x0
    return x


# ==== BEGIN OPTIONAL: judge ====
# An offline sample-quality score on the generated shapes (FID needs Inception weights): a small CNN,
# trained once on real images and cached, judges the samples (eval/judge_*). Optional: delete this
# block and every line ending in "# optional: judge" (tests/test_optional_blocks.py does):
#   sed '/^# ==== BEGIN OPTIONAL: judge/,/^# ==== END OPTIONAL: judge/d; /# optional: judge$/d' dit_cifar10.py > x.py

JUDGE_VERSION = 1  # part of the cache file name: a changed network never loads an old cache


class JudgeNet(nn.Module):
    """Classifies uint8 images (N, 3, H, W) into num_classes + 1 classes, the last "none" (noise);
    features() is the pooled (4 * width)-d layer that the Frechet distance compares."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes + 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1.0)  # uint8 -> [-1, 1], as the diffusion models see them

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # logits (N, num_classes + 1)


def train_judge(images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int, steps: int = 200,
                batch_size: int = 64, lr: float = 3e-3) -> JudgeNet:
    """Adam on the cross-entropy of uint8 images (N, 3, H, W) and labels (N,), a quarter of each
    batch turned to "none" (label num_classes): x = (1 - a) x + a n, n ~ N(0, 1), a ~ U(0.4, 1). A
    pure function of the seed, drawing nothing from the run's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = JudgeNet(num_classes)
    generator = torch.Generator().manual_seed(seed)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels).long()
    optimizer = torch.optim.Adam(judge.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, len(images_t), (batch_size,), generator=generator)
        x, y = images_t[index].float() / 127.5 - 1.0, labels_t[index].clone()
        a = torch.rand(batch_size // 4, 1, 1, 1, generator=generator) * 0.6 + 0.4
        noise = torch.randn(x[: batch_size // 4].shape, generator=generator)
        x[: batch_size // 4] = ((1 - a) * x[: batch_size // 4] + a * noise).clamp(-1, 1)
        y[: batch_size // 4] = num_classes
        loss = F.cross_entropy(judge.head(judge.body(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return judge.eval().requires_grad_(False)


def load_or_train_judge(cache_dir: Path, key: str, make_data: Callable[[], tuple[np.ndarray, np.ndarray]],
                        num_classes: int, seed: int) -> JudgeNet:
    """The judge cached at {cache_dir}/{key}_v{JUDGE_VERSION}.pt, or trained on make_data() and
    cached (atomically). A cache that does not load is retrained; one that cannot be written is
    skipped."""
    path = Path(cache_dir) / f"{key}_v{JUDGE_VERSION}.pt"
    with torch.random.fork_rng(devices=[]):  # weights the cache overwrites: no draw from the run's RNG
        judge = JudgeNet(num_classes)
    if path.is_file():
        try:
            judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return judge.eval().requires_grad_(False)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, the fix is to retrain it
            print(f"judge cache {path} does not load ({e.__class__.__name__}): training the judge again")
    judge = train_judge(*make_data(), num_classes, seed)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(judge.state_dict(), tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError):
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return judge


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two
    feature sets (N, d), FID's formula in float64; Tr((S_a S_b)^(1/2)) from eigenvalues, as
    torchmetrics."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (d, d), ddof 1
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


@torch.no_grad()
def judge_scores(judge: JudgeNet, samples: np.ndarray, asked_labels: Optional[np.ndarray], real_heldout: np.ndarray,
                 real_labels: Optional[np.ndarray] = None, threshold: float = 0.9) -> dict:
    """Scores of N uint8 samples (N, 3, H, W) against 2N held-out real images: recognised (share
    with P(not "none") >= threshold), class_accuracy (share whose likeliest class is asked_labels'),
    frechet (judge features, samples vs real[:N]); *_real: real[:N] (vs real[N:2N]), the ceiling."""
    n = len(samples)
    if len(real_heldout) < 2 * n:
        raise ValueError(f"judge_scores needs at least {2 * n} held-out real images, got {len(real_heldout)}")
    samples_t, real_a, real_b = (torch.from_numpy(np.ascontiguousarray(x)) for x in (
        samples, real_heldout[:n], real_heldout[n: 2 * n]))
    feats_s, feats_a, feats_b = judge.features(samples_t), judge.features(real_a), judge.features(real_b)
    probs_s, probs_a = judge.head(feats_s).softmax(1), judge.head(feats_a).softmax(1)
    scores = {"recognised": float((1 - probs_s[:, -1] >= threshold).float().mean()),  # the last class: "none"
              "recognised_real": float((1 - probs_a[:, -1] >= threshold).float().mean()),
              "frechet": frechet_distance(feats_s, feats_a), "frechet_real": frechet_distance(feats_b, feats_a)}
    if asked_labels is not None:
        scores["class_accuracy"] = float((probs_s[:, :-1].argmax(1).numpy() == np.asarray(asked_labels)).mean())
    if real_labels is not None:
        scores["class_accuracy_real"] = float((probs_a[:, :-1].argmax(1).numpy() == np.asarray(real_labels[:n])).mean())
    return scores


def log_judge_scores(writer, scores: dict, step: int, suffix: str = ""):
    """Logs judge_scores' dict as eval/judge_{name}{suffix} and prints it on one line."""
    from tqdm import tqdm

    for name, value in scores.items():
        writer.add_scalar(f"eval/judge_{name}{suffix}", value, step)
    tqdm.write(f"judge at step {step}{suffix.replace('_', ', ')}: " +  # on its own line, not on a progress bar's
               ", ".join(f"{k} {v:.3g}" for k, v in scores.items()))


JUDGE_DATA_SEED, JUDGE_HELDOUT_SEED = 1_000_001, 1_000_002  # the judge's own data (a run's: --seed)


def make_shapes_judge(args: Args, num_samples: int) -> tuple[JudgeNet, np.ndarray, np.ndarray]:
    """The judge of the 10 shapes classes at --img-size (trained on 4096 generated images once,
    cached in {data_dir}/judge/), and 2 * num_samples held-out shapes, uint8 (2N, 3, H, W), with
    their labels."""
    judge = load_or_train_judge(
        Path(args.data_dir) / "judge", f"shapes_{args.img_size}px_10classes_seed{JUDGE_DATA_SEED}",
        lambda: make_shapes_dataset(4096, args.img_size, seed=JUDGE_DATA_SEED), 10, JUDGE_DATA_SEED)
    return (judge, *make_shapes_dataset(2 * num_samples, args.img_size, seed=JUDGE_HELDOUT_SEED))


def judge_samples(judge, evaluated: Optional[tuple], generate: Callable, args: Args, step: int, eval_now: bool,
                  writer):
    """eval/judge_* of an evaluation's samples of the shapes (log_samples' samples and labels), with
    and without guidance (_cfg1). Returns the judge (made at the first evaluation: the judge,
    held-out images, their labels)."""
    if not (eval_now and evaluated is not None and args.dataset == "shapes"):
        return judge
    samples, labels = evaluated
    judge = judge or make_shapes_judge(args, len(samples))
    log_judge_scores(writer, judge_scores(judge[0], samples, labels, judge[1], judge[2]), step)
    if args.num_classes > 0 and args.cfg_scale != 1.0:  # the same noise without guidance: what guidance adds
        with contextlib.suppress(StopRequested):
            plain = generate(len(samples), labels, replace(args, cfg_scale=1.0))
            log_judge_scores(writer, judge_scores(judge[0], plain, labels, judge[1], judge[2]), step, "_cfg1")
    return judge


# ==== END OPTIONAL: judge ====


def sample_images(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, sampler: str,
                  num_steps: int, eta: float = 0.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """uint8 images (B, 3, H, W) from the chosen sampler. DDPM with S < T steps visits DiT's
    respaced timesteps (respace.py's space_timesteps: the "linspace" spacing), not diffusers'
    leading ones."""
    if sampler == "ddpm":
        x = ddpm_sample(model_fn, x_T, alphas_cumprod, num_steps, generator=generator, spacing="linspace")
    elif sampler == "ddim":
        x = ddim_sample(model_fn, x_T, alphas_cumprod, num_steps, eta=eta, generator=generator)
    else:
        x = dpm_solver_sample(model_fn, x_T, alphas_cumprod, num_steps)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> {0..255}


def guided_model_fn(model: nn.Module, labels: Optional[torch.Tensor], cfg_scale: float = 1.0,
                    autocast=contextlib.nullcontext()) -> Callable:
    """model_fn(x_t, t) for the samplers, with the labels (B,) and classifier-free guidance inside:
    eps = eps_u + s (eps_c - eps_u) (Ho & Salimans' w = s - 1), both halves in one batched forward;
    labels None (unconditional) or s = 1: one plain forward."""
    null_labels = None if labels is None else torch.full_like(labels, model.num_classes)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast:
            if labels is None or cfg_scale == 1.0:
                return model(x, t, labels).float()
            eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null_labels])).float()
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_uncond + cfg_scale * (eps_cond - eps_uncond)

    return model_fn


# --------------------------------------------------------------------------------------------------
# Loss: L_simple of Ho et al. (eq. 14), the noise-prediction MSE at a uniform timestep, given y.


def dit_loss(model: nn.Module, x0: torch.Tensor, y: Optional[torch.Tensor], t: torch.Tensor, noise: torch.Tensor,
             alphas_cumprod: torch.Tensor, autocast=contextlib.nullcontext()) -> torch.Tensor:
    """L_simple = || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, y) ||^2, batch mean.
    x0, noise: (B, 3, H, W) in [-1, 1], N(0, I); y: int64 (B,) labels (num_classes: the null class;
    None: unconditional); t: int64 (B,); alphas_cumprod: (T,) on x0's device."""
    abar = alphas_cumprod[t].float()[:, None, None, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # x_t ~ N(sqrt(abar_t) x0, (1-abar_t) I)
    with autocast:
        eps_pred = model(x_t, t, y)
    return F.mse_loss(eps_pred.float(), noise)


def step_memory_profile(args: Args) -> tuple[int, float]:
    """(parameters, activation bytes autograd saves per sample) of a training step, counted on the
    meta device: the memory check runs before anything is allocated at full size."""
    with torch.device("meta"):
        model = build_model(args)
        x0, t = torch.zeros(1, 3, args.img_size, args.img_size), torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long) if args.num_classes > 0 else None
        activations = saved_activation_bytes(lambda: dit_loss(model, x0, y, t, x0, torch.ones(args.timesteps)))
    return sum(p.numel() for p in model.parameters()), activations


def train_flops_per_sample(args: Args) -> float:
    """A training step's FLOPs per image, for MFU: 3x the forward's."""
    example = (torch.zeros(1, 3, args.img_size, args.img_size), torch.zeros(1, dtype=torch.long),
               torch.zeros(1, dtype=torch.long) if args.num_classes > 0 else None)
    return 3 * forward_flops(lambda: build_model(args), *example)


# --------------------------------------------------------------------------------------------------
# Evaluation: FID with torchmetrics (torch-fidelity's Inception, or any feature extractor) for
# CIFAR-10 and image folders; on the generated shapes, the judge (the optional block above).


def make_fid_metric(feature_extractor: Optional[nn.Module] = None):
    """torchmetrics' FrechetInceptionDistance: Inception-v3 pool features (2048-d, torch-fidelity's
    weights, the standard FID), or a given feature_extractor's (N, d) features (tests, custom
    metrics)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise UserError("--eval-fid needs torchmetrics: pip install -e '.[eval]'") from None
    try:
        return FrechetInceptionDistance(feature=2048 if feature_extractor is None else feature_extractor)
    except Exception as e:  # noqa: BLE001 - no torch-fidelity, or it cannot fetch the Inception weights
        raise UserError(f"FID needs torch-fidelity and the Inception weights pt_inception-2015-12-05-6726825d.pth "
                        f"(pip install -e '.[eval]'; offline, put the file in {torch.hub.get_dir()}/checkpoints/): "
                        f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from None


def compute_fid(fid_metric, fake_images: torch.Tensor, real_images: torch.Tensor, batch_size: int = 500,
                device: torch.device = torch.device("cpu")) -> float:
    """FID = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)) of two sets of uint8 images (N, 3,
    H, W)."""
    fid_metric = fid_metric.to(device)
    fid_metric.reset()
    for images, real in ((real_images, True), (fake_images, False)):
        for start in range(0, len(images), batch_size):
            fid_metric.update(images[start: start + batch_size].to(device), real=real)
    return float(fid_metric.compute())

def evaluate_fid(fid_metric, generate: Callable[[int, Optional[torch.Tensor]], np.ndarray], real_images: np.ndarray,
                 args: Args, device: torch.device, writer=None, step: int = 0) -> float:
    """FID of --fid-num-samples generated images, every class equally often, vs the training images
    (the paper's protocol), printed and logged as eval/fid."""
    num, classes = args.fid_num_samples, args.num_classes
    samples = torch.from_numpy(generate(num, torch.arange(num) % classes if classes > 0 else None))
    fid = compute_fid(fid_metric, samples, torch.from_numpy(real_images), args.sample_batch_size, device)
    guidance = f", guidance {args.cfg_scale:g}" if classes > 0 else ""
    print(f"FID ({num} samples vs {len(real_images)} training images, {args.sampler} {args.num_sampling_steps} "
          f"steps{guidance}): {fid:.3f}")
    if writer is not None:
        writer.add_scalar("eval/fid", fid, step)
        writer.add_scalar("eval/fid_num_samples", num, step)
    return fid


# --------------------------------------------------------------------------------------------------
# The run's parts: samples from the EMA model (guided, abandoned on a signal) and their files,
# the run length, sampling a checkpoint, the run's start, the log of each interval, the checkpoint.


def sample_grid(images: np.ndarray, columns: Optional[int] = None) -> np.ndarray:
    """make_grid of at most 256 uint8 (N, 3, H, W) images; with columns (a row per class), every row
    is kept, cut short to fit."""
    if columns and len(images) > 256:
        rows = len(images) // columns
        images = images.reshape(rows, columns, *images.shape[1:])[:, : max(1, 256 // rows)]
        columns = images.shape[1]
        images = images.reshape(-1, *images.shape[2:])
    return make_grid(images[:256], columns)


def write_samples(folder: Path, stem: str, images: np.ndarray, labels: Optional[torch.Tensor] = None,
                  columns: Optional[int] = None) -> Path:
    """A PNG grid (sample_grid) and an .npz of the uint8 (N, H, W, 3) images (arr_0, the layout FID
    tools read) and their int64 class labels if any (arr_1, as ADM's). A failed write raises OSError."""
    write_png(folder / f"{stem}.png", sample_grid(images, columns))
    np.savez(folder / f"{stem}.npz", images.transpose(0, 2, 3, 1), *([] if labels is None else [labels.numpy()]))
    return folder / f"{stem}.png"


def class_rows(num_classes: int, per_row: int) -> Optional[torch.Tensor]:
    """Labels of a grid with a row of per_row images per class: 0, 0, ..., 1, 1, ... (None: unconditional)."""
    return torch.arange(num_classes).repeat_interleave(per_row) if num_classes > 0 else None


def generate_samples(ema_model: nn.Module, num: int, class_labels: Optional[torch.Tensor], args: Args,
                     alphas_cumprod: torch.Tensor, autocast, stop: "StopFlag") -> np.ndarray:
    """num uint8 (N, 3, H, W) samples of the given classes (None: unconditional) from the EMA model
    with args' sampler and guidance, in batches of --sample-batch-size, from the same noise every
    time (seed + 10,000). stop.check() runs before every network evaluation."""
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
    """The decay of EMA update number step: d_t = min(decay, (1 + t) / (10 + t)), the usual warm-up;
    a function of the step counter alone, so that a resume stays exact."""
    return min(decay, (1 + step) / (10 + step))


def run_length_in_steps(args: Args, given: set[str], num_items: int, checkpoint: Optional[dict]) -> Args:
    """The run length and cadence in optimizer steps: --epochs (default 100 without --total-steps)
    becomes ceil(epochs N / B) steps; a format 1 checkpoint counted run length, --save-every and
    --eval-every in epochs of N // B steps: converted. Both --epochs and --total-steps: UserError."""
    if {"epochs", "total_steps"} <= given:
        raise UserError(f"--epochs {args.epochs} and --total-steps {args.total_steps} both set the run length; give "
                        f"one")
    if checkpoint is not None and checkpoint["format_version"] == 1:  # flags given now count steps already
        steps_per_epoch = num_items // args.batch_size  # format 1's epoch
        converted = {name: getattr(args, name) * steps_per_epoch for name in ("save_every", "eval_every")
                     if name not in given}
        if not {"epochs", "total_steps"} & given:
            converted["total_steps"] = args.epochs * steps_per_epoch
        args = replace(args, **converted, epochs=args.epochs if "epochs" in given else None)
    if args.epochs is not None or args.total_steps is None:
        epochs = 100 if args.epochs is None else args.epochs
        args = replace(args, total_steps=math.ceil(epochs * num_items / args.batch_size), epochs=None)
    return args


def sample_from_checkpoint(generate: Callable, args: Args, run_dir: Path, step: int, fid_metric, images_np: np.ndarray,
                           device: torch.device, class_names: list[str]):
    """--sample-only: --num-samples samples (a grid and an .npz) in the run's samples/: a row of
    ceil(N / classes) per class, or N of --class-label; with --eval-fid, their FID. A signal
    abandons the sampling and writes nothing more."""
    label = args.class_label  # an index (check_args checked its range) or a class name
    if label is not None and not label.lstrip("-").isdigit():
        if label not in class_names:
            names = ", ".join(map(repr, class_names))
            raise UserError(f"--class-label {label!r} is not a class of this model: give an index "
                            f"(0 to {len(class_names) - 1}) or one of {names}")
        label = class_names.index(label)
    label = None if label is None else int(label)
    labels, columns, what = None, None, ""  # unconditional
    if label is not None:
        labels, what = torch.full((args.num_samples,), label), f" of class {label} ({class_names[label]})"
    elif args.num_classes > 0:
        columns = math.ceil(args.num_samples / args.num_classes)
        labels, what = class_rows(args.num_classes, columns), f", {columns} of each of the {args.num_classes} classes"
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
    """The run folder (a new one unless resumed) and its TensorBoard writer on rank 0 (None
    elsewhere), and the lines a run prints at its start."""
    if not setup.is_main:
        return run_dir, None
    run_dir = run_dir or create_run_dir(args, dataset_id)
    writer = open_writer(args, run_dir, step)
    num_params = sum(p.numel() for p in model.parameters())  # trainable only: the position embedding is a buffer
    if step == 0:
        writer.add_scalar("charts/num_parameters", num_params, 0)
    print(f"run folder: {run_dir}")
    if step > 0:
        print(f"resuming at step {step} of {args.total_steps}")
    classes = f"{args.num_classes} classes" if args.num_classes > 0 else "unconditional"
    print(f"model: DiT with adaLN-{args.adaln}, {num_params:,} parameters; data: {num_images:,} images of "
          f"{args.img_size}x{args.img_size}, {classes}; device: {setup.device}"
          + (f" x {setup.world_size}" if setup.world_size > 1 else ""))
    if class_names:  # what --class-label accepts
        print("classes: " + ", ".join(f"{k} {name}" for k, name in enumerate(class_names)))
    return run_dir, writer


def wrap_for_training(model: nn.Module, args: Args, setup: "Setup") -> nn.Module:
    """The model the training step calls: compiled with --compile, in DistributedDataParallel under
    torchrun. The optimizer, the EMA and the checkpoint hold the plain model."""
    train_model = torch.compile(model, backend=COMPILE_BACKEND) if args.compile else model
    if setup.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[setup.local_rank]
                                                          if setup.use_cuda else None)
    return train_model


def log_interval(writer, meter: "Meter", scheduler, progress, step: int, run_dir: Optional[Path]):
    """The end of a --log-every interval: mean loss and gradient norm, learning rate, samples/s (and
    MFU on CUDA) to TensorBoard and the progress bar; a non-finite loss raises TrainingFailure."""
    if not meter.finite():
        progress.close()  # end the progress line, so that the error is a line of its own
        raise non_finite_failure(f"before step {step}", run_dir)
    logged = meter.read()
    if writer is not None:
        writer.add_scalar("losses/mse", logged["loss"], step)
        writer.add_scalar("charts/learning_rate", scheduler.get_last_lr()[0], step)
        writer.add_scalar("charts/grad_norm", logged["grad_norm"], step)
        writer.add_scalar("charts/SPS", logged["SPS"], step)
        mfu = {"mfu": f"{logged['mfu']:.1%}"} if "mfu" in logged else {}  # on CUDA only
        if mfu:
            writer.add_scalar("perf/mfu", logged["mfu"], step)
        progress.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{logged['SPS']:.0f}", **mfu)


def log_samples(generate: Callable, args: Args, step: int, eval_now: bool, writer, run_dir: Path, progress,
                started: float) -> Optional[tuple[np.ndarray, Optional[torch.Tensor]]]:
    """EMA samples, a row per class (8 rows unconditional), to TensorBoard (samples/ema) and samples/:
    --samples-per-class at an evaluation, 2 at --first-sample-at. Returns them and their labels;
    None if a signal abandoned them."""
    per_row = args.samples_per_class if eval_now else 2
    labels = class_rows(args.num_classes, per_row)
    with contextlib.suppress(StopRequested):  # a signal abandons the grid, not the checkpoint
        samples = generate(per_row * (args.num_classes or 8), labels)
        writer.add_image("samples/ema", sample_grid(samples, per_row), step, dataformats="HWC")
        path = write_samples(run_dir / "samples", f"step{step:08d}", samples, labels, per_row)
        if not eval_now:
            progress.write(f"first samples at step {step}, {time.perf_counter() - started:.0f} s after the "
                           f"start: {path}")
        return samples, labels
    return None


def save_run(run_dir: Path, args: Args, step: int, parts: tuple, meter: "Meter", setup: "Setup", num_items: int,
             **extra):
    """Rank 0 writes the checkpoint, with the data order's position and extra; a non-finite loss
    since the last check raises TrainingFailure instead (never NaN weights over a good
    checkpoint)."""
    if not meter.finite():
        raise non_finite_failure(f"before step {step}", run_dir)
    if setup.is_main:
        position = {"epoch": step * args.batch_size // num_items, "index": step * args.batch_size % num_items}
        save_checkpoint(run_dir / "checkpoints" / "latest.pt",
                        checkpoint_state(args, step, *parts, **extra, data_position=position))
        print(f"saved checkpoint at step {step}", flush=True)


# --------------------------------------------------------------------------------------------------


def main(args: Args, given: set[str]):
    # ---- setup: arguments (resumed: the checkpoint's), device, seeds, data, model, optimizer
    started = time.perf_counter()
    checkpoint, run_dir = None, None
    if args.resume:  # the checkpoint's arguments, with the RESUME_MUTABLE flags given
        checkpoint_path = resolve_checkpoint_path(args.resume)
        checkpoint = load_checkpoint(checkpoint_path)
        args = merge_resumed_args(args, given, checkpoint["args"])
        run_dir = run_dir_of(checkpoint_path, trains=not args.sample_only)
    check_args(args, torchrun_world()[0])
    setup = setup_device(args)
    device, autocast = setup.device, autocast_context(setup, args.dtype)
    seed_everything(args.seed)
    train_generator = torch.Generator(device=device).manual_seed(args.seed)  # flips, drops, t, eps
    stop = StopFlag()  # SIGTERM/SIGINT now finish the step (or abandon sampling), save, exit 0
    if not args.sample_only:  # will a training step fit? (one line naming --batch-size if not)
        check_step_memory(setup, args.batch_size, *step_memory_profile(args), args.dtype)

    images_np, labels_np, dataset_id, data_class_names = load_dataset(args)
    # uint8 on the device: no loader, no copies
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
    run_dir, writer = open_run(args, setup, run_dir, dataset_id, step, model, len(images), class_names)
    meter = Meter(device, train_flops_per_sample(args), peak_flops(setup, args.dtype), setup.world_size)
    train_model = wrap_for_training(model, args, setup)
    judge = None  # optional: judge

    # ---- train
    local_batch = args.batch_size // setup.world_size
    mine = slice(setup.rank * local_batch, (setup.rank + 1) * local_batch)
    first_step, step_timer = step, StepTimer(step, args.total_steps, setup)
    progress = progress_bar(args.total_steps, step, "train", "step", setup.is_main)
    while step < args.total_steps:
        # Every rank draws the whole global batch (indices, flips, drops, t, noise) and takes its
        # slice: 2 ranks at batch B compute exactly what 1 rank at batch B does.
        indices = global_batch_indices(step, args.batch_size, len(images), args.seed).to(device, non_blocking=True)
        flips = torch.rand(args.batch_size, generator=train_generator, device=device) < 0.5
        if conditional:  # classifier-free guidance training: a label becomes the null class with p = class_dropout
            drops = torch.rand(args.batch_size, generator=train_generator, device=device) < args.class_dropout
        t = torch.randint(0, args.timesteps, (args.batch_size,), generator=train_generator, device=device)
        noise = torch.randn((args.batch_size, *images.shape[1:]), generator=train_generator, device=device)
        x0 = images[indices[mine]].float() / 127.5 - 1.0  # uint8 -> [-1, 1]
        if args.random_flip:
            x0 = torch.where(flips[mine, None, None, None], x0.flip(3), x0)
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
        # Every rank stops at the same step: all-reduced at a log step under torchrun, at once alone
        stopping = stop.sync(setup) if setup.world_size == 1 or step % args.log_every == 0 else False
        eval_now = step % args.eval_every == 0 or step == args.total_steps
        save_now = step % args.save_every == 0 or step == args.total_steps
        if setup.is_main and not stopping and (eval_now or step == args.first_sample_at):
            samples = log_samples(generate, args, step, eval_now, writer, run_dir, progress, started)
            judge = judge_samples(judge, samples, generate, args, step, eval_now, writer)  # optional: judge
            stopping = stop.sync(setup) if setup.world_size == 1 else stopping
        if save_now or stopping:
            save_run(run_dir, args, step, parts, meter, setup, len(images), class_names=class_names)
        if eval_now or save_now or step in (first_step + 1, args.first_sample_at):
            meter.restart_clock()  # sampling, saving and the first (compiling) step stay out of SPS
        if stopping:
            if setup.is_main:
                print(f"stopped by signal at step {step}", flush=True)
            break

    # ---- the end: the final FID (rank 0's alone, after the process group is gone)
    progress.close()
    leave_process_group(setup.world_size)
    if setup.is_main and args.eval_fid and step == args.total_steps:
        with contextlib.suppress(StopRequested):
            evaluate_fid(fid_metric, generate, images_np, args, device, writer, step)
    close_writer(args, writer)
    if setup.is_main and step == args.total_steps:
        print(f"done: step {step}, checkpoint at {run_dir / 'checkpoints' / 'latest.pt'}")
    stop.restore()


# ==== BEGIN SHARED MACHINERY (docs/PROMISES.md) ====
# Each definition is the same text in every script that carries it (tests/test_shared_blocks.py).
# It reads the script's SCRIPT_NAME, CHECKPOINT_FORMAT_VERSION, OLDER_CHECKPOINT_FORMATS,
# CHECKPOINT_KEYS, Args, PRESETS, FLAG_ALIASES and RESUME_MUTABLE.


class UserError(Exception):
    """Bad input: one line naming the problem and the fix, exit 2; nothing saved is touched."""


class TrainingFailure(Exception):
    """A fault during the run (a non-finite loss, a full disk): one line, exit 1; nothing lost."""


class StopRequested(Exception):
    """A signal arrived during sampling, an evaluation or test episodes: the work is abandoned."""


class Interrupted(BaseException):
    """A second Ctrl-C: quit without saving, exit 130 (no `except Exception` swallows it)."""


# ---- flags and config: defaults < --preset < --config < flags on the command line
def flag_field(token: str) -> Optional[str]:
    """The Args field a token sets, in any spelling ('--total_steps=5', '--no-cuda', an alias)."""
    name = token.split("=")[0]
    names = {f.name for f in fields(Args)}
    field = FLAG_ALIASES.get(name, name[2:].replace("-", "_"))
    field = field if field in names else field.removeprefix("no_")
    return field if token.startswith("--") and field in names else None


def parse_args(argv: Optional[list[str]] = None) -> tuple[Args, set[str]]:
    """The args, and the fields given on the command line (which --resume may let change)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = {}  # --preset and --config, which set the defaults of the other flags
    for token, after in zip(argv, argv[1:] + [None]):
        if flag_field(token) in ("preset", "config"):
            first[flag_field(token)] = token.split("=", 1)[1] if "=" in token else after
    defaults, preset = Args(), first.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown --preset {preset}: choose from {', '.join(PRESETS)}")
        defaults = replace(defaults, preset=preset, **PRESETS[preset])
    if first.get("config") is not None:
        defaults = replace(defaults, **read_config(first["config"]))
    quiet = not {"-h", "--help"} & set(argv)  # tyro's error box is many lines, ours is one
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box) if quiet else contextlib.nullcontext():
            args = tyro.cli(Args, default=defaults, args=argv)
    except SystemExit as e:
        if not quiet or not e.code:
            raise
        raise UserError(command_line_problem(argv, box.getvalue())) from None
    return args, {name for name in map(flag_field, argv) if name is not None}


def command_line_problem(argv: list[str], box: str) -> str:
    """What tyro refused, in one line: an unknown flag, a value for an on/off flag, or its words."""
    import difflib

    unknown = [token.split("=")[0] for token in argv if token[:2] == "--" and not flag_field(token)]
    if unknown:
        flags = [f"--{f.name.replace('_', '-')}" for f in fields(Args)] + list(FLAG_ALIASES)
        close = difflib.get_close_matches(unknown[0].replace("_", "-"), flags, n=3)
        maybe = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"unknown flag {unknown[0]}{maybe}; {SCRIPT_NAME} --help lists the flags"
    hints = get_type_hints(Args)
    for token, after in zip(argv, argv[1:] + ["--"]):  # a value given to an on/off flag
        if hints.get(flag_field(token)) is bool and ("=" in token or after[:2] != "--"):
            flag = "--" + token.split("=")[0][2:].removeprefix("no-")
            given = token if "=" in token else f"{token} {after}"
            return (f"{flag} takes no value ({given}): give {flag} to turn it on, --no-{flag[2:]} "
                    f"to turn it off")
    said = []  # the box's first paragraph: the lines under its title, up to its first rule
    for line in box.splitlines()[1:]:
        if line.strip("│─╭╮╰╯- "):  # a rule is of box characters (or of dashes, with no terminal)
            said.append(line.strip("│ "))
        elif said:
            break
    said = " ".join(said).rstrip(".") or "a bad value"
    return f"{said}; {SCRIPT_NAME} --help gives each flag's type and choices"


def read_config(path: str) -> dict:
    """--config: the config.json an earlier run wrote (an object of Args fields), or YAML."""
    import yaml

    fix = "give the config.json an earlier run wrote"
    try:
        with open(path, "rb") as f:
            raw = f.read(2**20 + 1)  # bounded: --config /dev/zero must not read forever
        if len(raw) > 2**20:
            raise UserError(f"--config {path} is larger than 1024 KiB: not a config; {fix}")
        text = raw.decode("utf-8")
        is_yaml = Path(path).suffix.lower() in (".yaml", ".yml")
        values = yaml.safe_load(text) if is_yaml else json.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"--config {path} is not a text file: {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config {path} is not valid JSON ({e}); {fix} (YAML needs a .yaml or "
                        f".yml name)") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path} must hold an object of flag names and values, not a "
                        f"{type(values).__name__}")
    return normalise_args_dict(values, f"--config {path}")


def value_fits(value, hint) -> bool:
    """Whether a value read from JSON or YAML fits an Args field's type."""
    origin, options = get_origin(hint), get_args(hint)
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in options)
    if origin is Union:
        return any(value_fits(value, option) for option in options)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        hints = [options[0]] * len(value) if options[1:] == (Ellipsis,) else options
        return len(value) == len(hints) and all(map(value_fits, value, hints))
    if hint is int or hint is float:  # a bool is no number; an int is a float
        number = isinstance(value, int) or (hint is float and isinstance(value, float))
        return number and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def normalise_args_dict(values: dict, source: str) -> dict:
    """Checks the names and types of Args values read from a file; JSON's lists become tuples."""
    hints = get_type_hints(Args)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"{source} has fields this script does not know: {', '.join(unknown)}")
    for name, value in values.items():
        choices = get_args(hints[name]) if get_origin(hints[name]) is Literal else ()
        if isinstance(value, bool) and {"on", "off"} <= set(choices):  # YAML 1.1 reads on as true
            value = values[name] = "on" if value else "off"
        if not value_fits(value, hints[name]):
            expected = (f"one of {', '.join(map(str, choices))}" if choices
                        else getattr(hints[name], "__name__", hints[name]))
            raise UserError(f"{source}: {name} is {value!r}, which is not a valid "
                            f"--{name.replace('_', '-')} (expected {expected})")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def in_domain(value, domain: str) -> bool:
    """A domain: '>= 0', '> 0', '[0, 1)', '(0, 1]' ... Non-finite numbers are in no domain."""
    if not math.isfinite(value):
        return False
    if domain.startswith(">"):
        bound = float(domain.lstrip(">="))
        return value >= bound if domain[1] == "=" else value > bound
    low, high = (float(bound) for bound in domain[1:-1].split(","))
    above = low <= value if domain[0] == "[" else low < value
    return above and (value <= high if domain[-1] == "]" else value < high)


def flag_marks() -> tuple[dict[str, str], set[str]]:
    """Beside Args' fields: numeric flags' domains ('>= 1', '[0, 1)' ...), and RESUME_MUTABLE."""
    marks = [(name, mark) for name, hint in get_type_hints(Args, include_extras=True).items()
             for mark in getattr(hint, "__metadata__", ()) if isinstance(mark, str)]
    return ({name: mark for name, mark in marks if mark != RESUME_MUTABLE},
            {name for name, mark in marks if mark == RESUME_MUTABLE})


def check_arg_domains(args: Args):
    """At start-up, not deep in a run: every numeric flag in its domain, --exp-name a plain name."""
    for name, domain in flag_marks()[0].items():
        value = getattr(args, name)
        for element in value if isinstance(value, tuple) else (value,):
            if element is not None and not in_domain(element, domain):
                shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
                finite = "" if math.isfinite(element) else "a finite number "
                where = "in " if domain[0] in "[(" else ""
                flag = f"--{name.replace('_', '-')}"
                raise UserError(f"{flag} must be {finite}{where}{domain}, not {shown}")
    exp_name = args.exp_name
    if not exp_name or any(part in exp_name for part in ("/", "\\", "..")):
        raise UserError(f"--exp-name {exp_name!r} must be a plain name (no '/', '\\' or '..'): it "
                        f"names the run folder inside --output-dir")
    if len(exp_name.encode()) > 200:  # a file system caps a name at 255 bytes
        raise UserError(f"--exp-name is {len(exp_name.encode())} bytes long: give at most 200 (it "
                        f"is part of the run folder's name)")


# ---- checkpoints: one file, written atomically, loaded with weights_only=True
def resolve_checkpoint_path(resume: str) -> Path:
    path = Path(resume)
    path = path / "checkpoints" / "latest.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--resume {resume}: no checkpoint at {path}; give a run folder (it holds "
                        f"checkpoints/latest.pt) or a checkpoint file")
    return path


def run_dir_of(checkpoint_path: Path, trains: bool) -> Path:
    """The folder a resumed run writes to: RUN for RUN/checkpoints/*.pt, else the file's folder.
    Training continues only from RUN/checkpoints/latest.pt: from another file it would overwrite
    a newer checkpoint, or another run's."""
    in_run = checkpoint_path.parent.name == "checkpoints"
    if trains and not (in_run and checkpoint_path.name == "latest.pt"):
        raise UserError(f"--resume {checkpoint_path}: training continues only from a run folder's "
                        f"checkpoints/latest.pt (it is overwritten as the run goes on); copy the "
                        f"file to NEW_RUN/checkpoints/latest.pt and --resume NEW_RUN")
    return checkpoint_path.parent.parent if in_run else checkpoint_path.parent


def floating_tensors(tree, prefix: str = ""):
    """(name, tensor) for every floating-point tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        yield prefix, tree
    elif isinstance(tree, (dict, list, tuple)):
        for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
            yield from floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def load_checkpoint(path: Path) -> dict:
    """weights_only=True (a malicious file cannot run code); refuses all but a whole, finite one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the same error
        if "GLOBAL" in str(e):  # the weights-only unpickler refused a Python object (GLOBAL a.b)
            raise UserError(f"cannot load checkpoint {path}: it holds Python objects other than "
                            f"tensors and plain containers, which could run code when loaded; "
                            f"resume from a checkpoint this script wrote") from None
        raise UserError(f"cannot load checkpoint {path} (corrupt or not a checkpoint: "
                        f"{error_reason(e)}); resume from another checkpoint") from None
    found = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if found != SCRIPT_NAME:
        raise UserError(f"{path} is a checkpoint of {found or 'something else'}, not of "
                        f"{SCRIPT_NAME}")
    readable = (*OLDER_CHECKPOINT_FORMATS, CHECKPOINT_FORMAT_VERSION)
    if checkpoint.get("format_version") not in readable:
        raise UserError(f"{path} has checkpoint format {checkpoint.get('format_version')}, this "
                        f"script reads {', '.join(map(str, readable))}")
    missing = sorted(set(CHECKPOINT_KEYS) - set(checkpoint))
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a complete checkpoint of "
                        f"{SCRIPT_NAME}")
    bad = [name for name, value in floating_tensors(checkpoint) if not value.isfinite().all()]
    if bad:
        raise UserError(f"{path} holds non-finite values (in {bad[0]}); resume from an earlier "
                        f"checkpoint")
    saved, now = checkpoint.get("versions", {}), library_versions()
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if saved.get(k, now[k]) != now[k]]
    if changed:
        print(f"notice: {path} was written under other library versions ({', '.join(changed)}): a "
              f"resumed run may differ from an uninterrupted one")
    return checkpoint


def error_reason(e: Exception) -> str:
    """An exception's message in one short line, without torch's advice or "Error(s) in" header."""
    lines = [line.strip() for line in str(e).split("WeightsUnpickler error:")[-1].splitlines()]
    lines = [line for line in lines if line and not line.startswith("Error(s) in")]
    return (lines[0] if lines else type(e).__name__)[:200]


def merge_resumed_args(args: Args, given: set[str], saved: dict) -> Args:
    """The run's args from the checkpoint; flags may change only those marked RESUME_MUTABLE."""
    run_args = Args(**normalise_args_dict(saved, "the checkpoint's args"))  # newer fields: defaults
    mutable = flag_marks()[1]
    for name in sorted(given - mutable - {"resume"}):
        if getattr(args, name) != getattr(run_args, name):
            flag = f"--{name.replace('_', '-')}"
            raise UserError(f"{flag} is {getattr(run_args, name)!r} in the checkpoint and cannot "
                            f"change on --resume (only the run length, cadence, logging and "
                            f"sampling flags can); drop {flag} or start a new run")
    changed = {name: getattr(args, name) for name in given & mutable - {"resume"}}
    return replace(run_args, **changed, resume=args.resume)


def checkpoint_state(args: Args, step: int, *parts, **extra) -> dict:
    """The header, then CHECKPOINT_KEYS in order: args, step, every global RNG, each part's state
    (its state_dict, a generator's state, or a plain value as it is), then extra (not read back)."""
    states = [part.get_state() if isinstance(part, torch.Generator) else part.state_dict()
              if hasattr(part, "state_dict") else part for part in parts]
    return {"script": SCRIPT_NAME, "format_version": CHECKPOINT_FORMAT_VERSION, "versions": library_versions(),
            **dict(zip(CHECKPOINT_KEYS, [asdict(args), step, rng_state(), *states], strict=True)), **extra}


def restore_state(checkpoint: dict, *parts) -> int:
    """Puts back what checkpoint_state saved from the same parts (a plain value: the run read it)
    and every global RNG; returns the step. A state that does not fit is one line."""
    try:
        for key, part in zip(CHECKPOINT_KEYS[3:], parts, strict=True):
            if isinstance(part, torch.Generator):
                part.set_state(checkpoint[key])
            elif hasattr(part, "load_state_dict"):
                part.load_state_dict(checkpoint[key])
        set_rng_state(checkpoint["rng"])
        step = checkpoint["step"]
        if type(step) is not int or step < 0:
            raise ValueError(f"its step is {step!r}")
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"checkpoint weights do not fit this model, or its state is damaged ({error_reason(e)}); "
                        f"resume from another checkpoint") from None
    return step


def save_checkpoint(path: Path, state: dict):
    """Atomic: a temporary file in the same folder, fsynced, then renamed over the old one. A failed
    write is a TrainingFailure, with the temporary file removed and the old checkpoint intact."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a failed write (torch.save: a RuntimeError), or a second Ctrl-C
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        kept = f"the previous {path.name} is intact" if path.exists() else "it was not written"
        raise TrainingFailure(f"cannot write {path} ({reason}); {kept}: free disk space or make "
                              f"the folder writable, then --resume") from None


def non_finite_failure(where: str, run_dir: Optional[Path]) -> TrainingFailure:
    """A loss or gradients that became NaN or infinite: the message says if a checkpoint exists."""
    latest = run_dir / "checkpoints" / "latest.pt" if run_dir is not None else None
    kept = (f"the last good checkpoint is kept in {latest}" if latest and latest.exists()
            else "no checkpoint was saved yet")
    return TrainingFailure(f"the loss or gradients became non-finite {where}; {kept} (try a lower "
                           f"--learning-rate or --dtype float32)")


def library_versions() -> dict:
    """What a checkpoint records of the software that wrote it: a resume under others may differ."""
    return {"python": sys.version.split()[0], "torch": str(torch.__version__),
            "numpy": str(np.__version__)}


def rng_state() -> dict:
    """Every global RNG as plain values (weights_only=True refuses numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    keys = torch.from_numpy(keys.astype(np.int64))
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, keys, int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int):
    """The same seed on every torchrun rank: every rank builds the same initial weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- device, determinism, torchrun
@dataclass
class Setup:
    """Where this process runs: its device and its place among torchrun's processes."""
    device: torch.device
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    def __post_init__(self):
        self.is_main, self.use_cuda = self.rank == 0, self.device.type == "cuda"


def torchrun_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) as torchrun sets them; (1, 0, 0) for `python script.py`."""
    return tuple(int(os.environ.get(name, default)) for name, default in
                 (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))


def setup_device(args: Args) -> Setup:
    """CUDA when asked and available (else the CPU, with a notice), determinism, TF32, torchrun."""
    world_size, rank, local_rank = torchrun_world()
    use_cuda = args.cuda and torch.cuda.is_available()
    if args.cuda and not use_cuda and rank == 0:
        print("notice: CUDA is not available, running on the CPU")
    if args.torch_deterministic and use_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if not use_cuda:
            torch.set_num_threads(1)  # one thread per rank: the ranks do not fight over the cores
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # cuDNN's determinism only: the CPU's kernels are deterministic at a fixed thread count, and on
    # CUDA torch.use_deterministic_algorithms costs more than 10% (docs/PROMISES.md section 5).
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+: nearly free speed for fp32
    torch.backends.cudnn.allow_tf32 = True
    return Setup(device, world_size, rank, local_rank)


def autocast_context(setup: Setup, dtype: str):
    """bf16/fp16 autocast on CUDA; a no-op for float32 and on the CPU (which computes in fp32)."""
    if setup.use_cuda and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def leave_process_group(world_size: int):
    """Every rank leaves after a barrier (gloo can abort a rank that leaves while another still
    saves); what follows is rank 0's alone."""
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


# ---- signals: SIGTERM / SIGINT finish the current step, save, exit 0
class StopFlag:
    """SIGTERM and SIGINT set a flag: training stops after the step, long work calls check() and is
    abandoned. The first is acknowledged at once, a second SIGINT raises Interrupted, more SIGTERMs
    never abort a save; `busy` names work that cannot stop midway. Install before the run folder."""

    keep_handlers = False  # run_main sets it: the handlers stay until the process exits

    def __init__(self):
        self.requested, self.finished, self.busy = False, False, ""
        signals = (signal.SIGTERM, signal.SIGINT)
        self.previous = {sig: signal.signal(sig, self.request) for sig in signals}

    def request(self, signum=None, frame=None):
        if self.finished:  # the run is over and the process is exiting: nothing is left to stop
            return
        if self.requested and signum == signal.SIGINT:
            raise Interrupted()
        if not self.requested:
            busy = f"; {self.busy} must end first" if self.busy else ""
            say_now(f"stopping after this step, then saving{busy}; Ctrl-C again to quit without "
                    f"saving")
        self.requested = True

    def check(self):
        if self.requested:
            raise StopRequested()

    def sync(self, setup: Setup) -> bool:
        """Whether to stop, all-reduced under torchrun so that every rank stops at the same step."""
        if setup.world_size > 1:
            flag = torch.tensor(float(self.requested), device=setup.device)
            dist.all_reduce(flag)
            self.requested = flag.item() > 0
        return self.requested

    def restore(self):
        """The previous handlers back for an in-process caller; under run_main they stay but stop
        listening, so that a signal while the process exits does not kill it mid-write."""
        self.finished = True
        if not StopFlag.keep_handlers:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)


def say_now(message: str):
    """A line written at once, also from a signal handler (where a print could re-enter a print)."""
    try:
        os.write(sys.stdout.fileno(), (message + "\n").encode())
    except (OSError, ValueError, io.UnsupportedOperation):  # stdout is not a file (a test's)
        print(message, flush=True)


# ---- the run folder, TensorBoard, wandb
def create_run_dir(args: Args, run_id: str) -> Path:
    """{output_dir}/{run_id}__{exp_name}__{seed}__{unix time}/ with config.json, always new."""
    run_dir = Path(args.output_dir) / f"{run_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    while run_dir.exists():
        run_dir = run_dir.with_name(run_dir.name + "_")
    try:
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(args), indent=2))
    except OSError as e:
        raise UserError(f"--output-dir {args.output_dir}: cannot create the run folder {run_dir} "
                        f"({e.strerror or e}); give a writable folder") from None
    return run_dir


def lock_run(run_dir: Path):
    """One trainer per run: RUN/train.lock holds its host and PID until it ends. The lock of a live
    process or of another host (which cannot be checked) is refused; a dead process's is taken."""
    lock, me = run_dir / "train.lock", f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            with open(lock, "x") as f:
                f.write(me + "\n")
            atexit.register(unlock_run, run_dir)
            return
        except FileExistsError:
            holder = lock.read_text().strip()
        if holder == me:  # this process holds it already (an in-process rerun)
            return
        host, _, pid = holder.rpartition(" ")
        try:  # signal 0 only asks whether the process exists
            alive = host != socket.gethostname() or (pid.isdigit() and os.kill(int(pid), 0) is None)
        except OSError as e:  # PermissionError: another user's live process
            alive = isinstance(e, PermissionError)
        if alive:
            raise UserError(f"{run_dir} is being trained by PID {pid} on host {host} (lock file "
                            f"{lock}); wait for it to end, or delete the lock file if that process "
                            f"is gone")
        print(f"notice: taking over {lock}: PID {pid} on this host left it and is no longer "
              f"running")
        lock.unlink(missing_ok=True)


def unlock_run(run_dir: Path):
    lock = run_dir / "train.lock"
    with contextlib.suppress(OSError):
        if lock.read_text().strip() == f"{socket.gethostname()} {os.getpid()}":
            lock.unlink()


def open_writer(args: Args, run_dir: Path, step: int):
    """TensorBoard (and wandb with --track) for the process that trains the run, which takes its
    lock. purge_step: a resumed run drops what a killed run logged after its last checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    lock_run(run_dir)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name,
                   id=run_dir.name, resume="allow", config=asdict(args), sync_tensorboard=True,
                   save_code=True)
    writer = SummaryWriter(str(run_dir), purge_step=step + 1 if step else None)
    if step == 0:
        table = "\n".join(f"|{key}|{value}|" for key, value in asdict(args).items())
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def close_writer(args: Args, writer):
    if writer is not None:
        writer.close()
        unlock_run(Path(writer.log_dir))
    if args.track:
        import wandb

        wandb.finish()


def progress_bar(total: int, initial: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar with step, speed and ETA (the loss in its postfix); silent unless enabled."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=not enabled)


# ---- throughput and model FLOPs utilisation (MFU, on CUDA)
CUDA_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12,
                   "T4": 65e12}  # dense bf16/fp16 FLOP/s


def peak_flops(setup: Setup, dtype: str) -> Optional[float]:
    """The MFU denominator: the table's dense bf16/fp16 peak, half of it for float32 (TF32), NaN
    for an unknown GPU; None on a CPU, which has no MFU (its throughput is the figure to read)."""
    if not setup.use_cuda:
        return None
    name = torch.cuda.get_device_name(setup.device)
    known = [flops for key, flops in CUDA_PEAK_FLOPS.items() if key in name] + [float("nan")]
    peak = 756e12 if "H100" in name and "PCIe" in name else known[0]
    return peak / 2 if dtype == "float32" else peak


def forward_flops(build: Callable[[], nn.Module], *inputs: torch.Tensor) -> float:
    """FLOPs of a forward pass of build()'s model, on the meta device: no compute, no RNG draw."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs))
    return float(counter.get_total_flops())


class Meter:
    """Training-loop accounting without a host sync per step: device-side sums of the loss and
    gradient norm, samples/s and, given a peak, MFU = achieved / peak FLOP/s. read() syncs once per
    interval."""

    def __init__(self, device: torch.device, train_flops_per_sample: float, peak: Optional[float],
                 world_size: int = 1):
        self.train_flops_per_sample, self.peak, self.world_size = train_flops_per_sample, peak, world_size
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.steps = 0
        self.restart_clock()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, num_samples: int):
        self.loss_sum += loss.detach().float()
        self.grad_norm_sum += grad_norm.detach().float()
        self.steps += 1
        self.timed_samples += num_samples

    def restart_clock(self):
        """Leaves what follows out of the throughput: the compiling first step, sampling, saving."""
        self.timed_samples, self.clock = 0, time.perf_counter()

    def finite(self) -> bool:
        """Whether every loss and gradient norm since the last read() was finite (a host sync)."""
        return math.isfinite(self.loss_sum.item()) and math.isfinite(self.grad_norm_sum.item())

    def read(self) -> dict:
        """Means since the last read, global samples/s and, given a peak, MFU per process."""
        samples_per_second = self.timed_samples * self.world_size / max(time.perf_counter() - self.clock, 1e-9)
        values = {"loss": self.loss_sum.item() / max(self.steps, 1),
                  "grad_norm": self.grad_norm_sum.item() / max(self.steps, 1), "SPS": samples_per_second}
        if self.peak is not None:
            values["mfu"] = samples_per_second / self.world_size * self.train_flops_per_sample / self.peak
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.steps = 0
        self.restart_clock()
        return values


# ---- memory and run time: will a training step fit, how long will the run take
def available_memory(setup: Setup) -> float:
    """Bytes a training step may still take: CUDA's free memory; on a CPU the least of MemAvailable,
    the cgroup's memory.max less its usage and RLIMIT_AS less the address space (inf: none read)."""
    if setup.use_cuda:
        return float(torch.cuda.mem_get_info(setup.device)[0])

    def field(path: str, name: str) -> float:  # "Name:   123 kB" -> bytes
        line = next(line for line in Path(path).read_text().splitlines() if line.startswith(name))
        return 1024 * float(line.split()[1])

    limits = [math.inf]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        limits.append(field("/proc/meminfo", "MemAvailable:"))
    with contextlib.suppress(OSError, ValueError):  # memory.max is "max" where there is no limit
        cgroup = Path("/sys/fs/cgroup")
        limits.append(float((cgroup / "memory.max").read_text())
                      - float((cgroup / "memory.current").read_text()))
    with contextlib.suppress(OSError, ValueError, StopIteration, ImportError):
        import resource

        soft_limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft_limit != resource.RLIM_INFINITY:
            limits.append(soft_limit - field("/proc/self/status", "VmSize:"))
    return min(limits)


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor]) -> float:
    """Bytes autograd keeps for the backward pass of loss_fn(), which builds its model and inputs on
    the meta device. A tensor saved twice (or as views of one) counts once; weights not at all."""
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
    """Refuses, naming the largest --batch-size that fits, a training step that cannot fit in
    available_memory(). Bytes per process: 5 x 4 per parameter (weights, gradients, two Adam
    moments, EMA) + its batch x the activations saved per sample (halved under CUDA autocast)."""
    local_batch = batch_size // setup.world_size
    autocast = setup.use_cuda and dtype != "float32"
    per_sample = activation_bytes_per_sample * (0.5 if autocast else 1.0)
    fixed = 5 * 4 * num_params
    needed, available = fixed + local_batch * per_sample, available_memory(setup)
    if needed > available:
        fits = int((available - fixed) // per_sample) * setup.world_size if available > fixed else 0
        smaller = " (or a smaller model)" if fits < setup.world_size else ""
        raise UserError(f"--batch-size {batch_size} needs about {needed / 2**30:.1f} GiB per "
                        f"process for a training step, {available / 2**30:.1f} GiB is available "
                        f"on {setup.device}: use --batch-size {fits} or less{smaller}")
    return needed


class StepTimer:
    """Seconds per training step, timed once with a device sync at both ends: from after the first
    (compiling) step to timed_steps later. seconds_per_step(step) returns it at that end step if
    steps remain, else None."""

    def __init__(self, first_step: int, total_steps: int, setup: Setup, timed_steps: int = 5):
        self.start_step, self.end_step = first_step + 1, first_step + 1 + timed_steps
        self.total_steps, self.setup, self.clock = total_steps, setup, 0.0

    def seconds_per_step(self, step: int) -> Optional[float]:
        if step not in (self.start_step, self.end_step) or self.end_step >= self.total_steps:
            return None
        if self.setup.use_cuda:
            torch.cuda.synchronize(self.setup.device)
        if step == self.start_step:
            self.clock = time.perf_counter()
            return None
        return (time.perf_counter() - self.clock) / (self.end_step - self.start_step)


def run_time_notice(seconds_per_step: float, remaining_steps: int, setup: Setup) -> list[str]:
    """How long the rest of the training takes (evaluations not counted); on a CPU, more than a day
    is a notice (the defaults are the papers' GPU settings)."""
    seconds = seconds_per_step * remaining_steps
    days, rest = divmod(int(seconds), 86_400)
    if seconds < 3600:
        length = f"{rest // 60} min {rest % 60} s"
    else:
        length = f"{f'{days} d ' if days else ''}{rest // 3600} h {rest % 3600 // 60} min"
    lines = [f"estimated time to the end of training: {length} ({seconds_per_step:.3g} s per step on "
             f"{setup.device}, {remaining_steps:,} step{'s' if remaining_steps != 1 else ''} to go, evaluations not "
             f"counted)"]
    if not setup.use_cuda and seconds > 86_400:
        lines.append("notice: on this CPU the run takes more than a day: the defaults are the paper's GPU settings "
                     "(--preset tiny runs in seconds, --preset cpu is sized for one)")
    return lines


# ---- files
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


# ---- the entry point
def run_main(main: Callable):
    """One line on rank 0: exit 2 for bad input, 1 for a fault in the run, 130 for a Ctrl-C."""
    def fail(message: str, status: int):
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()  # end any progress line, so that the error is a line of its own
        if torchrun_world()[1] == 0:
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(status)

    StopFlag.keep_handlers = True
    try:
        main(*parse_args())
    except Interrupted:
        fail("interrupted by a second Ctrl-C: quit without saving (the last checkpoint, if any, is "
             "intact)", 130)
    except UserError as e:
        fail(str(e), 2)
    except TrainingFailure as e:
        fail(str(e), 1)
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        fail(f"{where}{e.strerror or e}; check the disk and the folder's permissions, then "
             f"--resume", 1)
    except KeyboardInterrupt:
        fail("interrupted before the run started; nothing was saved", 130)
    finally:
        StopFlag.keep_handlers = False  # the process exits with its handlers; a caller gets its own


# ==== END SHARED MACHINERY ====


if __name__ == "__main__":
    run_main(main)
