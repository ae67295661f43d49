# cleanworlds: text- and action-conditioned video diffusion. Docs: README.md, benchmark/RESULTS.md
"""
A 3D U-Net video diffusion model (Ho et al. 2022) for controllable worlds: clips conditioned on a
caption (cross-attention to a learned text encoder) and on per-frame actions (added to the time
embedding), sampled with DDPM, DDIM or DPM-Solver++, and continued from their last k frames.

The seed's setting (256 channels, 16 frames of 64x64, linear schedule, T = 1000), 1 GPU then 8:
    python video_diffusion.py                                       # the generated sprites world
    python video_diffusion.py --dataset atari --env-id Breakout-v5  # random-policy Breakout clips
    python video_diffusion.py --dataset folder --data-dir my_videos # your videos (+ captions.json)
    torchrun --standalone --nproc_per_node=8 video_diffusion.py --batch-size 64
On a CPU, offline: end to end in seconds (tiny), action and text control in about 20 minutes (cpu):
    python video_diffusion.py --preset tiny  # or --preset cpu
Continue a run, or sample from it (MP4s in samples/, a long video); watch: tensorboard --logdir runs
    python video_diffusion.py --resume runs/sprites__video_diffusion__1__1700000000
    python video_diffusion.py --resume RUN --sample-only --cfg-scale 3 --long-video-frames 64
Steer a sprites model live (pip install pygame-ce) or by keys (MP4s: {run}/play/):  # optional: play
    python video_diffusion.py --resume RUN --play  # optional: play
    python video_diffusion.py --resume RUN --play-keys RRRDDD --play-world both  # optional: play
"""
import atexit
import contextlib
import copy
import difflib
import io
import json
import math
import os
import random
import re
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

SCRIPT_NAME = "video_diffusion.py"
CHECKPOINT_FORMAT_VERSION = 2  # 2: the cross-attention and resampling weights renamed
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
    """tiny: a full sprites run in CPU seconds; cpu: caption and action control in CPU minutes"""
    config: Annotated[Optional[str], RESUME_MUTABLE] = None
    """a config.json written by an earlier run: its values become the defaults (flags still win)"""
    resume: Optional[str] = None
    """a run folder or checkpoint file to continue exactly where it stopped"""
# ==== BEGIN OPTIONAL: play ====
    play: Annotated[bool, RESUME_MUTABLE] = False
    """with --resume: play the model live (pip install pygame-ce; keys in README.md)"""
    play_keys: Annotated[Optional[str], RESUME_MUTABLE] = None
    """headless play: a letter per step (N noop, U D L R, F fire, QEZC diagonals, / restart)"""
    play_caption: Annotated[Optional[str], RESUME_MUTABLE] = None
    """play: the caption the frames are generated with (default: null caption, keys alone steer)"""
    play_world: Annotated[Literal["imagined", "real", "both"], RESUME_MUTABLE] = "imagined"
    """headless play: the model (imagined), the real sprites world, or both in turn, same keys"""
    play_size: Annotated[int, ">= 16", RESUME_MUTABLE] = 512
    """play: the frame's side in the window and in the play MP4s, in pixels"""
    play_fps: Annotated[float, "> 0", RESUME_MUTABLE] = 15.0
    """play: the window's steps per second at most"""
# ==== END OPTIONAL: play ====
    sample_only: Annotated[bool, RESUME_MUTABLE] = False
    """with --resume: only generate --num-samples clips (and a long video) with the EMA weights"""
    compile: Annotated[bool, RESUME_MUTABLE] = False
    """torch.compile the training step's model (sampling runs the EMA model eagerly)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """autocast dtype on CUDA (float16 uses a GradScaler); the CPU always computes in float32"""
    # Data
    dataset: Literal["sprites", "atari", "folder"] = "sprites"
    """sprites (generated), atari (random-policy --env-id clips), folder (--data-dir's videos)"""
    data_dir: Annotated[str, RESUME_MUTABLE] = "data"
    """atari: episodes go to {data_dir}/atari_v2/{env id}/; folder: videos (+ captions.json/.txt)"""
    num_frames: Annotated[int, ">= 1"] = 16
    """frames per training clip"""
    img_size: Annotated[int, ">= 1"] = 64
    """frame side length in pixels (frames are center-cropped to a square, then resized)"""
    num_sprite_clips: Annotated[int, ">= 1"] = 2048
    """sprites: number of generated training clips"""
    num_distractors: Annotated[int, ">= 0"] = 2
    """sprites: bouncing grey squares that no action moves"""
    action_dim: Annotated[int, ">= 0"] = 0
    """0: discrete actions (an embedding); 2: the sprites' continuous velocity (the seed's MLP)"""
    env_id: str = "Breakout-v5"
    """atari: the ALE game (Breakout, Breakout-v5 and ALE/Breakout-v5 are the same)"""
    num_atari_episodes: Annotated[int, ">= 1"] = 50
    """atari: episodes recorded with a random policy (files already in the folder are reused)"""
    atari_episode_steps: Annotated[int, ">= 1"] = 1000
    """atari: at most this many steps per recorded episode"""
    # Model (the seed's 3D U-Net)
    model_channels: Annotated[int, ">= 1"] = 256
    """base channel count of the 3D U-Net"""
    channel_mult: Annotated[tuple[int, ...], ">= 1"] = (1, 2, 2)
    """channel multiplier per resolution level (spatial halving between levels)"""
    num_res_blocks: Annotated[int, ">= 1"] = 2
    """ResBlock3D per level on the way down (one more on the way up)"""
    attn_resolutions: Annotated[tuple[int, ...], ">= 1"] = (32, 16)
    """resolutions (pixels) with spatio-temporal attention and text cross-attention"""
    num_heads: Annotated[int, ">= 1"] = 8
    """attention heads"""
    norm_groups: Annotated[int, ">= 1"] = 32
    """GroupNorm groups"""
    dropout: Annotated[float, "[0, 1)"] = 0.0
    """dropout in the residual blocks"""
    text_dim: Annotated[int, ">= 1"] = 256
    """width of the learned text encoder"""
    text_layers: Annotated[int, ">= 1"] = 2
    """transformer layers of the text encoder"""
    max_text_len: Annotated[int, ">= 1"] = 16
    """caption words the model reads (words beyond are dropped, and a notice says so)"""
    cond_drop_prob: Annotated[float, "[0, 1]"] = 0.1
    """p: training drops the caption to null with probability p, and independently the actions"""
    null_cond_prob: Annotated[float, "[0, 1]"] = 0.1
    """q: probability of dropping both (guidance's eps_u: --cfg-scale other than 1 needs q > 0)"""
    context_frames: Annotated[int, ">= 0"] = 4
    """k: frames the model is conditioned on to continue a video (autoregressive generation)"""
    context_prob: Annotated[float, "[0, 1]"] = 0.5
    """fraction of training clips whose first 1 to k frames (uniformly many) are given as context"""
    context_noise_max_step: Annotated[int, ">= 1"] = 100
    """context noise augmentation: context frames noised to a step in [0, this), told the model"""
    context_noise_sampling_step: Annotated[int, ">= 0", RESUME_MUTABLE] = 10
    """the context noise step used when generating (a little noise limits drift)"""
    # Diffusion
    prediction: Literal["eps", "v"] = "eps"
    """the net predicts eps (DDPM) or v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans and Ho 2022)"""
    timesteps: Annotated[int, ">= 1"] = 1000
    """number of diffusion steps T"""
    beta_schedule: Literal["linear", "cosine"] = "linear"
    """linear (Ho et al.) or cosine (Nichol and Dhariwal)"""
    beta_start: Annotated[float, "(0, 1)"] = 1e-4
    """beta_1 of the linear schedule at --timesteps 1000; scaled by 1000/--timesteps"""
    beta_end: Annotated[float, "(0, 1)"] = 0.02
    """beta_T of the linear schedule at --timesteps 1000; times 1000/--timesteps, capped at 0.999"""
    # Training
    total_steps: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 200_000
    """optimizer steps to train for"""
    batch_size: Annotated[int, ">= 1"] = 8
    """global batch size in clips (split across torchrun ranks)"""
    learning_rate: Annotated[float, "> 0"] = 1e-4
    """Adam learning rate"""
    warmup_steps: Annotated[int, STEPS, ">= 0"] = 1000
    """linear learning-rate warmup steps"""
    max_grad_norm: Annotated[float, ">= 0"] = 1.0
    """gradient clipping norm (0 turns it off)"""
    ema_decay: Annotated[float, "[0, 1]"] = 0.9999
    """EMA decay of the weights used for sampling"""
    log_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 100
    """log losses and throughput every N steps"""
    save_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 5000
    """write checkpoints/latest.pt every N steps"""
    eval_every: Annotated[int, STEPS, ">= 1", RESUME_MUTABLE] = 10_000
    """sample clips and compute the eval/ metrics with the EMA model every N steps"""
    first_sample_at: Annotated[int, STEPS, ">= 0", RESUME_MUTABLE] = 0
    """also sample 8 clips (no metrics) at this step: the run's first picture (0: none)"""
    # Sampling and evaluation
    sampler: Annotated[Literal["ddpm", "ddim", "dpm++"], RESUME_MUTABLE] = "ddim"
    """sampler for the samples, the metrics and --sample-only"""
    num_sampling_steps: Annotated[int, ">= 1", RESUME_MUTABLE] = 50
    """network evaluations per clip (ddpm with fewer than T steps is respaced)"""
    ddim_eta: Annotated[float, "[0, 1]", RESUME_MUTABLE] = 0.0
    """DDIM eta (0: deterministic)"""
    cfg_scale: Annotated[float, ">= 0", RESUME_MUTABLE] = 2.0
    """guidance s on caption and actions: eps_u + s (eps_c - eps_u); 1: none, 0: unconditional"""
    num_eval_samples: Annotated[int, ">= 1", RESUME_MUTABLE] = 32
    """clips generated for each evaluation (samples and metrics)"""
    num_samples: Annotated[int, ">= 1", RESUME_MUTABLE] = 16
    """clips generated by --sample-only"""
    long_video_frames: Annotated[int, ">= 1", RESUME_MUTABLE] = 64
    """frames of the autoregressive long videos written at each evaluation and by --sample-only"""
    sample_batch_size: Annotated[int, ">= 1", RESUME_MUTABLE] = 16
    """batch size when generating clips"""


# The whole loop in seconds on a CPU; 4 DDIM steps keep its evaluation (7 sets of clips) short.
PRESETS = {"tiny": dict(
    dataset="sprites", num_frames=8, img_size=16, num_sprite_clips=256, num_distractors=1,
    model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
    num_heads=2, norm_groups=4, text_dim=32, text_layers=1, context_frames=2, prediction="v",
    total_steps=40, batch_size=8, learning_rate=2e-3, warmup_steps=10, ema_decay=0.9,
    log_every=10, save_every=20, eval_every=40, num_sampling_steps=4, num_eval_samples=8,
    num_samples=8, long_video_frames=12, sample_batch_size=8)}
# Caption and action control in CPU minutes (benchmark/video_control.sh): tiny's U-Net, 8x8 sprites
PRESETS["cpu"] = dict(
    PRESETS["tiny"], num_frames=6, img_size=8, num_sprite_clips=2048, num_distractors=0,
    context_frames=3, cond_drop_prob=0.5, cfg_scale=3.0, total_steps=2000, batch_size=32,
    learning_rate=1e-3, log_every=100, save_every=500, eval_every=1000, first_sample_at=100,
    num_sampling_steps=8, num_eval_samples=128, num_samples=16, long_video_frames=6,
    sample_batch_size=128)
FLAG_ALIASES: dict[str, str] = {}  # flags spelled otherwise (diamond_atari.py: --game, --env-id)
# A checkpoint after its header; the vocabulary and action count fix the model's shape (read first).
CHECKPOINT_KEYS = ("args", "step", "rng", "model", "ema", "optimizer", "scheduler", "scaler",
                   "train_generator", "vocabulary", "num_actions")


def check_args(args: Args, world_size: int):
    """Settings that cannot work, refused at start-up in one line (before data or a run folder)."""
    check_arg_domains(args)
    halvings = len(args.channel_mult) - 1
    widths = sorted({args.model_channels * m for m in args.channel_mult})
    plays = args.play or args.play_keys is not None  # optional: play
    problems = [  # (refused when true, the line that says why and what to do)
        (args.batch_size % world_size,
         f"--batch-size {args.batch_size} is not divisible by the {world_size} torchrun processes"),
        (args.num_sampling_steps > args.timesteps,
         f"--num-sampling-steps must be between 1 and --timesteps {args.timesteps}"),
        (plays and args.sample_only,  # optional: play
         "--sample-only and --play are two uses of a checkpoint: give one"),  # optional: play
        (plays and not args.resume, "--play needs --resume RUN_OR_CHECKPOINT"),  # optional: play
        (args.sample_only and not args.resume, "--sample-only needs --resume RUN_OR_CHECKPOINT"),
        (args.img_size % 2 ** halvings,
         f"--img-size {args.img_size} must be divisible by 2^{halvings} (a halving per level)"),
        (any(w % args.num_heads for w in widths),
         f"--num-heads {args.num_heads} must divide every level's width {widths}"),
        (args.context_frames >= args.num_frames,
         f"--context-frames must be between 0 and --num-frames - 1 = {args.num_frames - 1}"),
        (max(args.context_noise_sampling_step + 1, args.context_noise_max_step) > args.timesteps,
         f"--context-noise-max-step must be <= --timesteps {args.timesteps}, "
         f"--context-noise-sampling-step less"),
        (args.long_video_frames < args.num_frames,
         f"--long-video-frames must be at least --num-frames {args.num_frames}"),
        (args.long_video_frames > args.num_frames and args.context_frames < 1,
         "--long-video-frames beyond --num-frames needs --context-frames of at least 1"),
        (args.action_dim and (args.action_dim != 2 or args.dataset != "sprites"),
         "--action-dim: continuous actions are the sprites' 2-d velocity: --action-dim 2 or 0"),
        # Guidance extrapolates from eps_u, trained by --null-cond-prob (else in p^2 of the samples)
        (args.null_cond_prob == 0 and args.cfg_scale != 1,
         f"--cfg-scale {args.cfg_scale:g} guides with the unconditional model, which "
         f"--null-cond-prob 0 does not train; use --cfg-scale 1 or --null-cond-prob > 0"),
    ]
    for refused, message in problems:
        if refused:
            raise UserError(message)


# --------------------------------------------------------------------------------------------------
# Data: the sprites world (generated), Atari clips (random-policy episodes), video folders.


@dataclass
class VideoData:
    frames: np.ndarray  # uint8 (F, 3, H, W)
    actions: Optional[np.ndarray]  # the action into each frame: int64 (F,), float32 (F, action_dim)
    clip_starts: np.ndarray  # int64 (N,)
    captions: list  # N strings ("" is the null caption)
    directions: np.ndarray  # int64 (N,): sprites: the commanded DIRECTIONS index; -1 elsewhere
    num_actions: int  # discrete actions (0: none, or continuous)
    dataset_id: str  # the run name's first part
    sprite_states: Optional[list] = None  # sprites: clip starts, to re-render with other actions


SPRITE_COLOURS = {"red": (230, 40, 40), "green": (40, 210, 40), "blue": (50, 90, 245),
                  "yellow": (235, 215, 30)}
DIRECTIONS = ["up", "down", "left", "right"]  # sprites: discrete action i + 1 goes DIRECTIONS[i]
SPRITE_ACTIONS = ["noop"] + DIRECTIONS  # below: DIRECTIONS' (dx, dy), y down, then noop's
DIRECTION_VECTORS = np.array([[0, -1], [0, 1], [-1, 0], [1, 0], [0, 0]], dtype=np.float32)


def sprite_geometry(img_size: int) -> tuple[int, int, int]:
    """Sprite side, distractor side and sprite speed in pixels per step (8 px: 2, 16: 4, 64: 8)."""
    size = max(2, img_size // 4) if img_size <= 16 else max(4, img_size // 8)
    return size, max(1, size // 2), max(1, img_size // 32)


def sprite_positions(state: dict, actions: np.ndarray, img_size: int) -> np.ndarray:
    """The sprite's top-left corner (T, 2) after each action (index or (dx, dy)); walls stop it."""
    size, _, speed = sprite_geometry(img_size)
    out = [np.array(state["sprite"], dtype=np.float32)]
    for a in actions[1:]:
        move = np.asarray(a, dtype=np.float32) if np.ndim(a) else DIRECTION_VECTORS[int(a) - 1]
        out.append(np.clip(out[-1] + move * speed, 0, img_size - size))
    return np.round(np.stack(out))


def render_sprite_clip(state: dict, actions: np.ndarray, img_size: int) -> np.ndarray:
    """The sprites world: uint8 (T, 3, H, W) from a state and actions; distractors ignore them."""
    size, dsize, _ = sprite_geometry(img_size)
    dpos = np.array(state["distractors"], dtype=np.float32).reshape(-1, 2)
    dvel = np.array(state["distractor_velocities"], dtype=np.float32).reshape(-1, 2)
    frames = np.full((len(actions), img_size, img_size, 3), 20, dtype=np.uint8)  # a dark background
    for frame, (x, y) in zip(frames, sprite_positions(state, actions, img_size).astype(int)):
        for dx, dy in np.round(dpos).astype(int):
            frame[dy: dy + dsize, dx: dx + dsize] = 150
        frame[y: y + size, x: x + size] = SPRITE_COLOURS[state["colour"]]  # last: always seen
        dpos = dpos + dvel
        dvel = np.where((dpos < 0) | (dpos > img_size - dsize), -dvel, dvel)  # off the walls
        dpos = np.clip(dpos, 0, img_size - dsize)
    return frames.transpose(0, 3, 1, 2)


def make_sprites_dataset(num_clips: int, num_frames: int, img_size: int, num_distractors: int = 1,
                         action_dim: int = 0, seed: int = 0) -> VideoData:
    """Clips of a square moved by the actions ("a red square moves right"), 3/4 of them as said."""
    if num_frames < 2:
        raise UserError(f"--num-frames {num_frames}: a sprites clip needs at least 2 frames to "
                        f"show a move; use --num-frames 2 or more")
    size, dsize, speed = sprite_geometry(img_size)
    rng = np.random.default_rng(seed)
    clips = []  # (frames, actions, caption, direction, initial state)
    for _ in range(num_clips):
        for _attempt in range(1000):
            d = int(rng.integers(4))
            xy = rng.integers(0, img_size - size + 1, 2).astype(float).tolist()  # independent of d
            choice = rng.random(num_frames)
            sideways = np.array([3, 4] if d < 2 else [1, 2])[rng.integers(2, size=num_frames)]
            clip_actions = np.where(choice < 0.75, d + 1, np.where(choice < 0.85, 0, sideways))
            if action_dim > 0:  # a velocity: the discrete move scaled by U(0.6, 1), plus jitter
                speeds = rng.uniform(0.6, 1.0, (num_frames, 1))
                clip_actions = (DIRECTION_VECTORS[clip_actions - 1] * speeds
                                + rng.normal(0, 0.05, (num_frames, 2))).astype(np.float32)
            clip_actions[0] = 0
            state = {"sprite": xy, "colour": list(SPRITE_COLOURS)[int(rng.integers(4))],
                     "distractors": rng.uniform(0, img_size - dsize, (num_distractors, 2)).tolist(),
                     "distractor_velocities":
                         (rng.choice([-1.0, 1.0], (num_distractors, 2)) * speed).tolist()}
            positions = sprite_positions(state, clip_actions, img_size)
            if direction_of_displacement(positions[-1] - positions[0]) == d:
                break
        else:
            raise UserError(f"--img-size {img_size} is too small for sprites moving over "
                            f"--num-frames {num_frames}")
        clips.append((render_sprite_clip(state, clip_actions, img_size), clip_actions,
                      f"a {state['colour']} square moves {DIRECTIONS[d]}", d, state))
    frames, actions, captions, directions, states = zip(*clips)
    starts = np.arange(num_clips) * num_frames
    return VideoData(np.concatenate(frames), np.concatenate(actions), starts, list(captions),
                     np.array(directions), 0 if action_dim else 5, "sprites", list(states))


def resize_frame(rgb: np.ndarray, img_size: int) -> np.ndarray:
    """uint8 (h, w, 3) -> (3, img_size, img_size): center crop to a square, INTER_AREA resize."""
    import cv2

    h, w = rgb.shape[:2]
    side = min(h, w)
    square = rgb[(h - side) // 2:, (w - side) // 2:][:side, :side]  # the center square
    return cv2.resize(square, (img_size, img_size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)


def clips_of_episodes(episodes: list, num_frames: int, caption: Callable, too_short: str,
                      **fields) -> VideoData:
    """VideoData: windows of num_frames, num_frames // 2 apart, captioned caption(episode, start)"""
    windows = [(e, s) for e, frames in enumerate(episodes)
               for s in range(0, len(frames) - num_frames + 1, max(1, num_frames // 2))]
    if not windows:
        raise UserError(too_short)
    first = np.cumsum([0] + [len(frames) for frames in episodes])  # each episode's first frame
    starts, captions = np.array([first[e] + s for e, s in windows]), [caption(*w) for w in windows]
    return VideoData(np.concatenate(episodes), clip_starts=starts, captions=captions,
                     directions=np.full(len(starts), -1), **fields)


ATARI_AGENTS = {"Breakout": "paddle", "Pong": "paddle", "Boxing": "boxer", "Freeway": "chicken",
                "SpaceInvaders": "cannon", "MsPacman": "pacman", "Seaquest": "submarine"}


def atari_ids(env_id: str) -> tuple[str, str, str]:
    """(gymnasium id, slash-free canonical id, game) for Breakout, Breakout-v5, ALE/Breakout-v5."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Warning)  # no banner: errors stay one line
    game = re.sub(r"(NoFrameskip)?(-v\d+)?$", "", env_id.split("/")[-1])
    games = sorted(m[1] for k in gym.registry if (m := re.fullmatch(r"ALE/(\w+)-v5", k)))
    if game not in games:
        close = difflib.get_close_matches(game, games, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(games[:8])}, ..."
        raise UserError(f"unknown Atari game --env-id {env_id}: {hint}")
    return f"ALE/{game}-v5", f"{game}-v5", game


def describe_atari_action(meaning: str) -> str:
    """ALE action meaning -> words: RIGHTFIRE -> "moves right and fires", NOOP -> "stays still"."""
    moves = " and ".join(d.lower() for d in ("UP", "DOWN", "LEFT", "RIGHT") if d in meaning)
    words = ([f"moves {moves}"] if moves else []) + (["fires"] if "FIRE" in meaning else [])
    return " and ".join(words) or "stays still"


def atari_folder(data_dir: str, canonical: str) -> Path:
    return Path(data_dir) / "atari_v2" / canonical  # v2: DIAMOND's step (v1: ALE's last frame only)


def record_atari_episodes(gym_id: str, folder: Path, num_episodes: int, max_steps: int,
                          img_size: int, seed: int, game: str) -> list[str]:
    """Random-policy episode files (actions held 1-8 steps), written atomically; action names."""
    import gymnasium as gym

    folder.mkdir(parents=True, exist_ok=True)
    # frameskip 1: the loop below repeats the action; no sticky actions: the recorded one is run
    with gym.make(gym_id, frameskip=1, repeat_action_probability=0.0) as env:
        for i in range(num_episodes):
            path, tmp = folder / f"episode_{i:05d}.npz", folder / f".episode_{i:05d}.tmp.npz"
            if path.exists():
                continue
            rng = np.random.default_rng(seed * 1_000_003 + i)
            obs, _ = env.reset(seed=seed * 1_000_003 + i)
            frames, steps, change = [resize_frame(obs, img_size)], [], 0
            for step in range(max_steps):
                if step == change:  # a new action, held for 1 to 8 steps
                    action = int(rng.integers(env.action_space.n))
                    change = step + int(rng.integers(1, 9))
                reward, last = 0.0, []
                for _ in range(4):  # DIAMOND's step: 4 frames, rewards summed, max of the last two
                    obs, r, terminated, truncated, _ = env.step(action)
                    reward, last = reward + float(r), (last + [obs])[-2:]
                    if terminated or truncated:
                        break
                frames.append(resize_frame(np.maximum(last[0], last[-1]), img_size))
                steps.append((action, reward, terminated, truncated or step == max_steps - 1))
                if terminated or truncated:
                    break
            columns = [np.stack(frames).transpose(0, 2, 3, 1), *zip(*steps)]  # as EPISODE_KEYS
            episode = {k: np.array(c, t) for (k, t), c in zip(EPISODE_KEYS.items(), columns)}
            try:
                np.savez(tmp, **episode, caption=np.array([game]))
                os.replace(tmp, path)
            except OSError as e:  # a full disk: one line; the episodes recorded so far are kept
                raise TrainingFailure(f"cannot write the recorded episode {path} "
                                      f"({e.strerror or e}): free disk space or make the "
                                      f"folder writable") from None
            finally:  # also after a Ctrl-C in the middle of the write: no temporary file left
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
        return env.unwrapped.get_action_meanings()


EPISODE_KEYS = {"obs": np.uint8, "actions": np.int64, "rewards": np.float32, "terminated": np.bool_,
                "truncated": np.bool_}


def read_episode(path: Path, num_actions: int, fix: str) -> dict:
    """An episode .npz (docs/PROMISES.md section 3) read with allow_pickle=False (no code runs) and
    checked field by field: a bad file is refused in one line naming it, the field and `fix`."""
    def bad(problem: str) -> UserError:
        return UserError(f"{path}: {problem}; {fix}")

    try:
        with np.load(path, allow_pickle=False) as data:
            episode = {key: data[key] for key in EPISODE_KEYS}
    except Exception as e:  # noqa: BLE001 - a missing field, a corrupt or pickled file: the same user-facing error
        reason = (str(e) or type(e).__name__).splitlines()[0][:150]
        raise bad(f"cannot read it as an episode .npz of obs uint8 (T+1, H, W, 3), actions int64 (T,), rewards "
                  f"float32 (T,), terminated and truncated bool (T,) ({reason})") from None
    obs = episode["obs"]
    if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[-1] != 3 or len(obs) < 2 or 0 in obs.shape:
        raise bad(f"obs is {obs.dtype} {obs.shape}, not uint8 (T+1, H, W, 3) RGB frames of at least one step")
    for key, kinds in (("actions", "iu"), ("rewards", "fiu"), ("terminated", "b"), ("truncated", "b")):
        value = episode[key]
        if value.dtype.kind not in kinds or value.shape != (len(obs) - 1,):
            raise bad(f"{key} is {value.dtype} {value.shape}, not {np.dtype(EPISODE_KEYS[key]).name} "
                      f"({len(obs) - 1},) (one per step between the {len(obs)} frames of obs)")
    actions, rewards = episode["actions"], episode["rewards"]
    if actions.min() < 0 or actions.max() >= num_actions:
        raise bad(f"actions holds {actions.min() if actions.min() < 0 else actions.max()}, outside the game's "
                  f"{num_actions} actions 0..{num_actions - 1}")
    if not np.isfinite(rewards).all():
        step = int(np.flatnonzero(~np.isfinite(rewards))[0])
        raise bad(f"rewards holds {rewards[step]} at step {step}: rewards must be finite")
    return episode | {"actions": actions.astype(np.int64), "rewards": rewards.astype(np.float32)}


def load_atari_dataset(args: "Args") -> VideoData:
    """Recorded episodes' clips, captioned by the action held most ("the paddle moves left")."""
    gym_id, canonical, game = atari_ids(args.env_id)
    folder = atari_folder(args.data_dir, canonical)
    meanings = record_atari_episodes(gym_id, folder, args.num_atari_episodes,
                                     args.atari_episode_steps, args.img_size, args.seed, game)
    episodes, actions = [], []
    for path in sorted(folder.glob("episode_*.npz"))[: args.num_atari_episodes]:
        episode = read_episode(path, len(meanings), "delete it (a missing one is recorded again)")
        episodes.append(np.stack([resize_frame(obs, args.img_size) for obs in episode["obs"]]))
        actions.append(np.concatenate([[0], episode["actions"]]))  # NOOP into frame 0

    agent = ATARI_AGENTS.get(game, "player")

    def caption(e: int, s: int) -> str:
        held = np.bincount(actions[e][s + 1: s + args.num_frames], minlength=len(meanings)).argmax()
        return f"{game}: the {agent} {describe_atari_action(meanings[held])}"

    return clips_of_episodes(episodes, args.num_frames, caption,
                             f"no episode in {folder} has {args.num_frames} frames: raise "
                             f"--atari-episode-steps or lower --num-frames",
                             actions=np.concatenate(actions), num_actions=len(meanings),
                             dataset_id=canonical)


def read_video(path: Path, img_size: int) -> list[np.ndarray]:
    """A video's frames through resize_frame; an empty or undecodable file is refused, named."""
    import cv2

    # FFmpeg writes to fd 2 itself (OpenCV's log level does not reach it): silenced while decoding
    sys.stderr.flush()
    stderr_fd, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with path.open("rb") as f:
            empty = not f.read(1)
        reads = iter(cv2.VideoCapture(str(path)).read, (False, None))  # (True, BGR) until the end
        frames = [resize_frame(bgr[:, :, ::-1], img_size) for _, bgr in reads]
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); make it readable or "
                        f"remove it") from None
    finally:
        os.dup2(stderr_fd, 2)
        os.close(stderr_fd)
        os.close(devnull)
    if not frames:
        why = "empty file" if empty else "OpenCV decodes no frame (cut, corrupt, unknown codec)"
        raise UserError(f"{path}: {why}; replace it with a video OpenCV can read or remove it")
    return frames


def load_video_folder(args: "Args") -> VideoData:
    """Every video under data_dir, center-cropped and resized; optional captions by file name."""
    root = Path(args.data_dir)
    if not root.is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder (--dataset folder reads "
                        f"videos from it)")

    def unreadable(e: OSError):  # os.walk's onerror (Path.rglob would skip the folder silently)
        raise UserError(f"{e.filename}: cannot read this folder ({e.strerror}); make it readable "
                        f"or move it out of --data-dir")

    extensions = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif"}
    paths = sorted(Path(folder) / name for folder, _, names in os.walk(root, onerror=unreadable)
                   for name in names if Path(name).suffix.lower() in extensions)
    if not paths:
        raise UserError(f"no videos ({', '.join(sorted(extensions))}) under {args.data_dir}")
    found = [p for p in (root / "captions.json", root / "captions.txt") if p.is_file()]
    try:  # {file name: caption}: a JSON object or name<TAB>caption lines
        text = found[0].read_text() if found else "{}"
        by_name = json.loads(text) if not found or found[0].suffix == ".json" else dict(
            line.split("\t", 1) for line in text.splitlines() if line.strip())
        if not isinstance(by_name, dict):
            raise ValueError("expected a JSON object {file name: caption}")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read captions file {found[0]} ({e}): use JSON {{name: caption}} "
                        f"or name<TAB>caption lines") from None
    episodes = [np.stack(read_video(p, args.img_size)) for p in paths]
    names = [(str(p.relative_to(root)), p.name, p.stem) for p in paths]  # the keys of a caption
    captions = [next((str(by_name[k]) for k in keys if k in by_name), "") for keys in names]
    return clips_of_episodes(episodes, args.num_frames, lambda e, s: captions[e],
                             f"no video under {args.data_dir} has --num-frames {args.num_frames} "
                             f"readable frames: check the files or lower --num-frames",
                             actions=None, num_actions=0, dataset_id="folder")


def load_dataset(args: "Args") -> VideoData:
    if args.dataset == "sprites":
        return make_sprites_dataset(args.num_sprite_clips, args.num_frames, args.img_size,
                                    args.num_distractors, args.action_dim, seed=args.seed)
    return load_atari_dataset(args) if args.dataset == "atari" else load_video_folder(args)


def eval_subset(data: VideoData, args: "Args") -> VideoData:
    """The clips the metrics use: held-out sprites (another seed), or clips spread over the data."""
    n = args.num_eval_samples
    if args.dataset == "sprites":
        return load_dataset(replace(args, num_sprite_clips=n, seed=args.seed + 1_000))
    chosen = np.linspace(0, len(data.clip_starts) - 1, n).round().astype(np.int64)
    return replace(data, clip_starts=data.clip_starts[chosen],
                   captions=[data.captions[i] for i in chosen], directions=data.directions[chosen])


def global_batch_indices(step: int, batch_size: int, num_items: int, seed: int) -> torch.Tensor:
    """The step-th global batch of per-epoch shuffles of (seed, epoch): the step is the position."""
    start = step * batch_size
    first, last = start // num_items, (start + batch_size - 1) // num_items  # the epochs the batch spans
    order = torch.cat([torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
                       for epoch in range(first, last + 1)])
    return order[start % num_items: start % num_items + batch_size]


# Words: a vocabulary of the dataset's captions, learned with the model (no hub). Token 0 pads; the
# empty caption is the single token <null>: the null condition for guidance.
SPECIAL_TOKENS = ["<pad>", "<null>", "<unk>"]
PAD_ID, NULL_ID, UNK_ID = 0, 1, 2


def caption_words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


def build_vocabulary(captions: list) -> list[str]:
    return SPECIAL_TOKENS + sorted({w for c in captions for w in caption_words(c)})


def tokenize(captions: list, vocabulary: list, max_len: int) -> torch.Tensor:
    """Captions -> int64 (N, max_len): word ids (unknown: <unk>), <null> if empty, padded."""
    index = {w: i for i, w in enumerate(vocabulary)}
    out = torch.full((len(captions), max_len), PAD_ID, dtype=torch.long)
    for i, caption in enumerate(captions):
        ids = [index.get(w, UNK_ID) for w in caption_words(caption)][:max_len] or [NULL_ID]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def caption_as_read(caption: str, vocabulary: list, max_len: int) -> str:
    """The caption as tokenize gives it to the model: its first max_len words, unknown as <unk>."""
    known = set(vocabulary)
    return " ".join(w if w in known else "<unk>" for w in caption_words(caption)[:max_len])


def data_caption_notices(captions: list, vocabulary: list, max_len: int) -> list[str]:
    """At most one notice: captions cut to max_len words, words a resumed model never learned."""
    distinct = {tuple(caption_words(c)) for c in captions}
    cut = sum(len(words) > max_len for words in distinct)
    said = ([f"{cut} of {len(distinct)} captions are cut to their first --max-text-len "
             f"{max_len} words"] if cut else [])
    known = set(vocabulary)
    if unknown := dict.fromkeys(w for c in captions for w in caption_words(c)[:max_len]
                                if w not in known):  # in order of first use
        said.append(f"words the model never learned, read as <unk>: {', '.join(unknown)}")
    return ["notice: " + "; ".join(said)] if said else []


# --------------------------------------------------------------------------------------------------
# Noise schedule. Everything is computed in float64 and cast at the point of use.


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


def noise_context(context: torch.Tensor, level: torch.Tensor, alphas_cumprod: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """Context noise: q(c_s | c) = sqrt(abar_s) c + sqrt(1 - abar_s) n; s = level (B,) is told."""
    abar = alphas_cumprod.to(context.device)[level].float()[:, None, None, None, None]
    return abar.sqrt() * context + (1 - abar).sqrt() * noise


# --------------------------------------------------------------------------------------------------
# Model: the seed's 3D U-Net, blocks factorised over space and time (Video Diffusion Models) on
# (B, C, T, H, W); per frame (B, T, 4C): time + context noise level + pooled caption + action.


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def zero_(*modules: nn.Module):
    """Zero weights and biases: a residual branch starts at zero, its block as the identity."""
    for module in modules:
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)


class SinusoidalPosEmb(nn.Module):
    """DDPM's sinusoids: [sin(t w_i), cos(t w_i)], w_i = exp(-ln(10000) i / (dim/2 - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)  # follows the module's device

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResBlock3D(nn.Module):
    """(2+1)D: GN-swish-conv(1x3x3) + emb, GN-swish-dropout-conv(1x3x3), shortcut, + conv(3x1x1)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0,
                 norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.temporal_norm = group_norm(out_channels, norm_groups)
        self.temporal_conv = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0))
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        zero_(self.conv2, self.temporal_conv)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb)).permute(0, 2, 1)[:, :, :, None, None]  # (B, C, T, 1, 1)
        h = self.shortcut(x) + self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.temporal_conv(F.silu(self.temporal_norm(h)))


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, Lq, C), (N, Lk, C) -> (N, Lq, C): softmax(q k^T / sqrt(d) + mask) v per head (SDPA)."""
    n, lq, c = q.shape
    q, k, v = (z.reshape(n, z.shape[1], num_heads, c // num_heads).transpose(1, 2) for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, lq, c)


class SpatioTemporalAttention(nn.Module):
    """Residual spatial, temporal (relative position bias) and caption cross-attention."""

    def __init__(self, channels: int, num_heads: int = 8, norm_groups: int = 32,
                 context_dim: int = 256, max_relative_position: int = 32):
        super().__init__()
        self.num_heads, self.max_relative_position = num_heads, max_relative_position
        self.spatial_norm = group_norm(channels, norm_groups)
        self.spatial_qkv = nn.Linear(channels, 3 * channels)
        self.spatial_out = nn.Linear(channels, channels)
        self.temporal_norm = group_norm(channels, norm_groups)
        self.temporal_qkv = nn.Linear(channels, 3 * channels)
        self.temporal_out = nn.Linear(channels, channels)
        self.relative_bias = nn.Parameter(torch.zeros(2 * max_relative_position + 1, num_heads))
        self.cross_norm = nn.LayerNorm(channels)
        self.cross_q = nn.Linear(channels, channels)
        self.cross_k = nn.Linear(context_dim, channels)
        self.cross_v = nn.Linear(context_dim, channels)
        self.cross_out = nn.Linear(channels, channels)
        zero_(self.spatial_out, self.temporal_out, self.cross_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor):
        """x (B, C, T, H, W); context (B, L, context_dim), context_mask (B, L) False at padding."""
        b, c, t, h, w = x.shape
        tokens = self.spatial_norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)  # (B*T, HW, C)
        out = multi_head_attention(*self.spatial_qkv(tokens).chunk(3, dim=-1), self.num_heads)
        x = x + self.spatial_out(out).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

        tokens = self.temporal_norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (B*HW, T, C)
        frame, m = torch.arange(t, device=x.device), self.max_relative_position
        offsets = (frame[None, :] - frame[:, None]).clamp(-m, m)  # j - i
        bias = self.relative_bias[offsets + m].permute(2, 0, 1).to(tokens.dtype)  # (heads, T, T)
        out = multi_head_attention(*self.temporal_qkv(tokens).chunk(3, dim=-1), self.num_heads, bias)
        x = x + self.temporal_out(out).reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)

        tokens = self.cross_norm(x.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c))  # (B, THW, C)
        out = multi_head_attention(self.cross_q(tokens), self.cross_k(context), self.cross_v(context),
                                   self.num_heads, context_mask[:, None, None, :])
        return x + self.cross_out(out).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class TextEncoder(nn.Module):
    """Learned word embeddings + positions -> a small pre-norm transformer -> (B, L, dim), mask."""

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, max_len: int):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens != PAD_ID  # (B, L): every caption has a real token (a word or <null>)
        h = self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]]
        return self.norm(self.blocks(h, src_key_padding_mask=~mask)), mask


class VideoDiffusionModel(nn.Module):
    """The 3D U-Net: eps(x_t, t | caption, actions, context frames) for clips (B, 3, T, H, W)."""

    def __init__(self, in_channels: int = 3, model_channels: int = 256, num_res_blocks: int = 2,
                 channel_mult: tuple = (1, 2, 2), attn_resolutions: tuple = (32, 16),
                 img_size: int = 64, num_heads: int = 8, norm_groups: int = 32, dropout: float = 0.0,
                 num_actions: int = 0, action_dim: int = 0, vocab_size: int = len(SPECIAL_TOKENS),
                 text_dim: int = 256, text_layers: int = 2, max_text_len: int = 16):
        super().__init__()
        self.num_actions, self.action_dim, self.max_text_len = num_actions, action_dim, max_text_len
        self.num_res_blocks = num_res_blocks
        c, emb = model_channels, 4 * model_channels
        self.time_embed, self.context_noise_embed = (
            nn.Sequential(SinusoidalPosEmb(c), nn.Linear(c, emb), nn.GELU(), nn.Linear(emb, emb))
            for _ in range(2))
        text_heads = text_dim // 64 if text_dim % 64 == 0 else 1  # heads of width 64 if it can
        self.text_encoder = TextEncoder(vocab_size, text_dim, text_layers, text_heads, max_text_len)
        self.text_pool = nn.Linear(text_dim, emb)
        if action_dim > 0:  # the seed's ActionConditionedDiffusion's MLP
            self.action_encoder = nn.Sequential(nn.Linear(action_dim, 256), nn.ReLU(),
                                                nn.Linear(256, emb))
            self.null_action = nn.Parameter(torch.zeros(emb))
        elif num_actions > 0:
            self.action_encoder = nn.Embedding(num_actions + 1, emb)  # row num_actions: null

        # in: the noisy clip, the context frames and the context mask
        self.input_conv = nn.Conv3d(2 * in_channels + 1, c, (1, 3, 3), padding=(0, 1, 1))
        self.down_blocks, self.down_attns, self.downsamples = (nn.ModuleList() for _ in range(3))
        skip_channels, current = [c], c

        def attention(level: int) -> nn.Module:  # if the level's resolution is in attn_resolutions
            if img_size // 2 ** level in attn_resolutions:
                return SpatioTemporalAttention(current, num_heads, norm_groups, text_dim)
            return nn.Identity()

        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResBlock3D(current, c * mult, emb, dropout, norm_groups))
                current = c * mult
                self.down_attns.append(attention(level))
                skip_channels.append(current)
            if level != len(channel_mult) - 1:  # a stride-2 conv over space only: the frames stay
                self.downsamples.append(nn.Conv3d(current, current, (1, 3, 3), (1, 2, 2), (0, 1, 1)))
                skip_channels.append(current)
        self.mid_block1 = ResBlock3D(current, current, emb, dropout, norm_groups)
        self.mid_attn = SpatioTemporalAttention(current, num_heads, norm_groups, text_dim)
        self.mid_block2 = ResBlock3D(current, current, emb, dropout, norm_groups)
        self.up_blocks, self.up_attns, self.upsamples = (nn.ModuleList() for _ in range(3))
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                self.up_blocks.append(ResBlock3D(current + skip, c * mult, emb, dropout, norm_groups))
                current = c * mult
                self.up_attns.append(attention(level))
            if level != 0:  # nearest x2 over space only, then a 1x3x3 conv
                conv = nn.Conv3d(current, current, (1, 3, 3), padding=(0, 1, 1))
                self.upsamples.append(nn.Sequential(nn.Upsample(scale_factor=(1.0, 2.0, 2.0)), conv))
        self.out_norm = group_norm(current, norm_groups)
        self.out = nn.Conv3d(current, in_channels, 3, padding=1)  # the seed's 3x3x3 output conv
        zero_(self.out)

    def null_text(self, batch: int, device: torch.device) -> torch.Tensor:
        null = torch.full((batch, 1), NULL_ID, dtype=torch.long, device=device)  # then <pad>s
        return F.pad(null, (0, self.max_text_len - 1), value=PAD_ID)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: Optional[torch.Tensor] = None,
                actions: Optional[torch.Tensor] = None, drop_actions: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                context_noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, 3, T, H, W), t (B,); text (B, L), actions (B, T) or (B, T, A) (None: null),
        drop_actions (B,); context like x, context_mask (B, T) (1: given), context_noise (B,)."""
        b, _, num_frames, height, width = x.shape
        emb = self.time_embed(t)
        if context_noise is not None:
            emb = emb + self.context_noise_embed(context_noise)
        text_tokens, text_mask = self.text_encoder(self.null_text(b, x.device) if text is None else text)
        pooled = (text_tokens * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
        emb = (emb + self.text_pool(pooled))[:, None, :].expand(b, num_frames, -1)  # (B, T, 4C)
        if self.action_dim > 0:  # the null action where actions is None or drop_actions
            null = self.null_action.expand(b, num_frames, -1)
            encoded = null if actions is None else self.action_encoder(actions.to(null.dtype))
            if drop_actions is not None:
                encoded = torch.where(drop_actions[:, None, None], null, encoded)
            emb = emb + encoded
        elif self.num_actions > 0:  # discrete: row num_actions is the null action
            if actions is None:
                actions = x.new_full((b, num_frames), self.num_actions, dtype=torch.long)
            elif drop_actions is not None:
                actions = torch.where(drop_actions[:, None], self.num_actions, actions)
            emb = emb + self.action_encoder(actions)
        if context is None or context_mask is None:
            mask, context = x.new_zeros(b, 1, num_frames, 1, 1), torch.zeros_like(x)
        else:
            mask = context_mask.to(x.dtype)[:, None, :, None, None]
        mask_channel = mask.expand(b, 1, num_frames, height, width)
        h = self.input_conv(torch.cat([x * (1 - mask), context * mask, mask_channel], dim=1))

        def attend(attn, h):
            return h if isinstance(attn, nn.Identity) else attn(h, text_tokens, text_mask)

        skips, n = [h], self.num_res_blocks  # blocks per level: n down, n + 1 up, then a resampling
        for i, (block, attn) in enumerate(zip(self.down_blocks, self.down_attns)):
            skips.append(h := attend(attn, block(h, emb)))
            if i % n == n - 1 and i // n < len(self.downsamples):
                skips.append(h := self.downsamples[i // n](h))
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb), text_tokens, text_mask), emb)
        for i, (block, attn) in enumerate(zip(self.up_blocks, self.up_attns)):
            h = attend(attn, block(torch.cat([h, skips.pop()], dim=1), emb))
            if i % (n + 1) == n and i // (n + 1) < len(self.upsamples):
                h = self.upsamples[i // (n + 1)](h)
        return self.out(F.silu(self.out_norm(h)))


def build_model(args: "Args", vocab_size: int, num_actions: int) -> VideoDiffusionModel:
    return VideoDiffusionModel(3, args.model_channels, args.num_res_blocks, args.channel_mult,
                               args.attn_resolutions, args.img_size, args.num_heads,
                               args.norm_groups, args.dropout, num_actions, args.action_dim,
                               vocab_size, args.text_dim, args.text_layers, args.max_text_len)


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


def guided_model_fn(model: nn.Module, cfg_scale: float, text: Optional[torch.Tensor] = None,
                    actions: Optional[torch.Tensor] = None, drop_actions: Optional[torch.Tensor] = None,
                    context: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                    context_noise: Optional[torch.Tensor] = None, autocast=contextlib.nullcontext(),
                    prediction: str = "eps", alphas_cumprod: Optional[torch.Tensor] = None) -> Callable:
    """model_fn(x_t, t) -> eps_u + s (eps_c - eps_u) in one forward; eps_u: null caption, actions"""
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        null_text = model.null_text(x.shape[0], x.device)
        drop = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) if drop_actions is None else drop_actions
        both = lambda z: None if z is None else torch.cat([z, z])  # noqa: E731
        with autocast:
            eps_c, eps_u = model(both(x), both(t), torch.cat([null_text if text is None else text, null_text]),
                                 both(actions), torch.cat([drop, torch.ones_like(drop)]), both(context),
                                 both(context_mask), both(context_noise)).to(x.dtype).chunk(2)
        guided = eps_u + cfg_scale * (eps_c - eps_u)  # in v or eps alike: eps is affine in v
        if prediction == "v":
            abar = alphas_cumprod.to(x.device)[t].to(x.dtype)[:, None, None, None, None]
            guided = abar.sqrt() * guided + (1 - abar).sqrt() * x
        return guided

    return model_fn


def sample_videos(model_fn: Callable, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, sampler: str,
                  num_steps: int, eta: float = 0.0, generator=None) -> torch.Tensor:
    """The chosen sampler's clips (B, 3, T, H, W) in [-1, 1]."""
    if sampler == "ddpm":  # num_steps = T: the paper's sampler, fewer: respaced
        x = ddpm_sample(model_fn, x_T, alphas_cumprod, num_steps, generator=generator)
    elif sampler == "ddim":  # x0 clipped each step: an undertrained model's samples stay in range
        x = ddim_sample(model_fn, x_T, alphas_cumprod, num_steps, eta=eta, clip_denoised=True, generator=generator)
    else:
        x = dpm_solver_sample(model_fn, x_T, alphas_cumprod, num_steps)
    return x.float().clamp(-1, 1)


@torch.no_grad()
def generate_video(model: nn.Module, alphas_cumprod: torch.Tensor, args: Args, num_frames: int, shape: tuple,
                   generator: torch.Generator, text=None, actions=None, drop_actions=None, video=None,
                   autocast=contextlib.nullcontext()) -> torch.Tensor:
    """Video (B, 3, num_frames, H, W): `video`, then clips of `shape` given its last k frames."""
    device, (b, _, clip_frames) = generator.device, shape[:3]
    video = torch.zeros(*shape[:2], 0, *shape[3:], device=device) if video is None else video
    while video.shape[2] < num_frames:
        k = min(args.context_frames, video.shape[2])  # the frames given to this clip
        start, mask, level, context = video.shape[2] - k, None, None, None
        index = torch.arange(start, start + clip_frames, device=device).clamp(max=num_frames - 1)
        clip_actions = None if actions is None else actions[:, index % actions.shape[1]]
        if k > 0:  # the given frames, then zeros to generate
            mask = (torch.arange(clip_frames, device=device) < k).float().expand(b, clip_frames)
            level = torch.full((b,), args.context_noise_sampling_step, dtype=torch.long, device=device)
            given = F.pad(video[:, :, start:], (0, 0, 0, 0, 0, clip_frames - k))
            noise = torch.randn(given.shape, generator=generator, device=device)
            context = noise_context(given, level, alphas_cumprod, noise)
        x_T = torch.randn(shape, generator=generator, device=device)
        model_fn = guided_model_fn(model, args.cfg_scale, text, clip_actions, drop_actions, context, mask, level,
                                   autocast, args.prediction, alphas_cumprod)
        clip = sample_videos(model_fn, x_T, alphas_cumprod, args.sampler, args.num_sampling_steps, args.ddim_eta,
                             generator)
        video = torch.cat([video, clip[:, :, k:]], dim=2)
    return video[:, :, :num_frames]


def to_uint8(clips: torch.Tensor) -> np.ndarray:
    return ((clips.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def video_diffusion_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod,
                         prediction: str = "eps", autocast=contextlib.nullcontext(), **conditions) -> torch.Tensor:
    """L_simple (Ho et al. eq. 14): mean || eps or v - f(x_t, t) ||^2, context frames as zero."""
    sqrt_abar = alphas_cumprod[t].sqrt().float()[:, None, None, None, None]
    sqrt_one_minus_abar = (1 - alphas_cumprod[t]).sqrt().float()[:, None, None, None, None]
    x_t = sqrt_abar * x0 + sqrt_one_minus_abar * noise  # q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    with autocast:
        output = model(x_t, t, **conditions)
    target = sqrt_abar * noise - sqrt_one_minus_abar * x0 if prediction == "v" else noise
    mask = conditions.get("context_mask")
    generated = 1.0 if mask is None else (1 - mask)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    return ((output.float() - target) ** 2 * generated).mean()


class DeviceClips:
    """Clips on the device (uint8 frames, no loader), caption tokens, actions; a model's samples."""

    def __init__(self, data: VideoData, vocabulary: list, args: Args, device, alphas_cumprod,
                 model: Optional[nn.Module] = None, autocast=contextlib.nullcontext()):
        self.args, self.device, self.data, self.alphas_cumprod = args, device, data, alphas_cumprod.to(device)
        self.frames = torch.from_numpy(data.frames).to(device)
        self.starts = torch.from_numpy(data.clip_starts).to(device)
        self.actions = None if data.actions is None else torch.from_numpy(data.actions).to(device)
        self.text = tokenize(data.captions, vocabulary, args.max_text_len).to(device)
        self.read_captions = [caption_as_read(c, vocabulary, args.max_text_len) for c in data.captions]
        self.model, self.autocast = model, autocast
        self.judge = None  # optional: judge

    def __getitem__(self, index: torch.Tensor) -> tuple:
        """Clips `index` (cycled): (B, 3, T, H, W) in [-1, 1], tokens, actions (B, T[, A])/None."""
        index = index % len(self.starts)
        frames = self.starts[index, None] + torch.arange(self.args.num_frames, device=self.device)
        clips = self.frames[frames].permute(0, 2, 1, 3, 4).float() / 127.5 - 1.0
        return clips, self.text[index], None if self.actions is None else self.actions[frames]

    def batch(self, step: int, generator: torch.Generator, mine: slice, null_text) -> dict:
        """The loss's kwargs: the global batch, drawn alike on every rank, sliced to `mine`."""
        args, device, B, abar = self.args, self.device, self.args.batch_size, self.alphas_cumprod
        clip_shape = (3, args.num_frames, args.img_size, args.img_size)
        indices = global_batch_indices(step, B, len(self.starts), args.seed).to(device, non_blocking=True)
        t = torch.randint(0, args.timesteps, (B,), generator=generator, device=device)
        noise = torch.randn((B, *clip_shape), generator=generator, device=device)
        # Guidance's dropout: both null w.p. --null-cond-prob, else each w.p. --cond-drop-prob
        drop_both = torch.rand(B, generator=generator, device=device) < args.null_cond_prob
        drop_text = drop_both | (torch.rand(B, generator=generator, device=device) < args.cond_drop_prob)
        drop_actions = drop_both | (torch.rand(B, generator=generator, device=device) < args.cond_drop_prob)
        # Context: the first 1..k frames of some clips, noised to a level the model is told
        use_context = torch.rand(B, generator=generator, device=device) < args.context_prob
        num_context = torch.randint(1, max(args.context_frames, 1) + 1, (B,), generator=generator, device=device)
        context_noise = torch.randint(0, args.context_noise_max_step, (B,), generator=generator, device=device)
        context_eps = torch.randn((B, *clip_shape), generator=generator, device=device)
        x0, text, actions = self[indices[mine]]
        given = torch.arange(args.num_frames, device=device)[None, :] < num_context[mine, None]
        return dict(x0=x0, t=t[mine], noise=noise[mine], alphas_cumprod=abar, actions=actions,
                    text=torch.where(drop_text[mine, None], null_text, text), drop_actions=drop_actions[mine],
                    context=noise_context(x0, context_noise[mine], abar, context_eps[mine]),
                    context_noise=context_noise[mine], context_mask=(use_context[mine, None] & given).float())

    def clips(self, num: int, use_text: bool = True, use_actions: bool = True, num_context: int = 0,
              text_shift: int = 0, action_shift: int = 0, long: bool = False) -> np.ndarray:
        """num seeded uint8 clips, conditioned as the first num clips (*_shift: another's)."""
        args, out, device = self.args, [], self.device
        length = args.long_video_frames if long else args.num_frames
        generator = torch.Generator(device=device).manual_seed(args.seed + (10_001 if long else 10_000))
        for start in range(0, num, args.sample_batch_size):
            index = torch.arange(start, min(num, start + args.sample_batch_size), device=device)
            real, actions = self[index][0], self[index + action_shift][2]
            text = self[index + text_shift][1] if use_text else None
            drop = torch.full((len(index),), not use_actions, dtype=torch.bool, device=device)
            clips = generate_video(self.model, self.alphas_cumprod, args, length, tuple(real.shape), generator,
                                   text, actions, drop, real[:, :, :num_context], self.autocast)
            out.append(to_uint8(clips))
        return np.concatenate(out)


def step_memory_profile(args: Args, vocab_size: int, num_actions: int) -> tuple[int, float, float]:
    """(parameters, saved activation bytes, forward FLOPs) of one clip's training step, on meta."""
    with torch.device("meta"):
        model = build_model(args, vocab_size, num_actions)
        x0 = torch.zeros(1, 3, args.num_frames, args.img_size, args.img_size)
        t, text = torch.zeros(1, dtype=torch.long), torch.zeros(1, args.max_text_len, dtype=torch.long)
        actions = (torch.zeros(1, args.num_frames, args.action_dim) if args.action_dim
                   else torch.zeros(1, args.num_frames, dtype=torch.long) if num_actions else None)
        activations = saved_activation_bytes(lambda: video_diffusion_loss(
            model, x0, t, x0, torch.ones(args.timesteps), args.prediction, text=text, actions=actions))
    flops = forward_flops(lambda: build_model(args, vocab_size, num_actions), x0, t, text, actions)
    return sum(p.numel() for p in model.parameters()), activations, flops


# --------------------------------------------------------------------------------------------------
# Evaluation: do the actions matter (Genie's delta-PSNR of rollouts), does the sprite go where told?


def rollout_psnr(predicted: np.ndarray, real: np.ndarray, first_frame: int = 0) -> float:
    """Mean PSNR of uint8 clips (B, 3, T, H, W) from first_frame on (in [0, 1], <= 100 dB)."""
    error = (predicted[:, :, first_frame:] / 255.0 - real[:, :, first_frame:] / 255.0) ** 2
    mse = np.maximum(error.reshape(len(real), -1).mean(1), 1e-10)
    return float(np.mean(np.minimum(100.0, 10 * np.log10(1.0 / mse))))


def direction_of_displacement(displacement: np.ndarray, min_pixels: float = 0.5) -> np.ndarray:
    """(..., 2) moves (dx, dy) -> DIRECTIONS index of the larger part; -1: under min_pixels."""
    dx, dy = displacement[..., 0], displacement[..., 1]
    scores = np.stack([-dy, dy, -dx, dx], -1)
    return np.where(scores.max(-1) >= min_pixels, scores.argmax(-1), -1)


def movement_directions(clips: np.ndarray) -> np.ndarray:
    """The DIRECTIONS index each clip's (B, 3, T, H, W) sprite moved, first frame to last (-1: none)."""
    x = clips[:, :, [0, -1]].astype(np.float32) / 255.0
    weight = np.clip(x.max(1) - x.min(1) - 0.4, 0, None)  # saturation: sprites have 0.67 to 0.8
    total = weight.sum((-1, -2))  # (B, 2): the first and the last frame
    cx = (weight * np.arange(weight.shape[-1])).sum((-1, -2)) / np.maximum(total, 1e-8)
    cy = (weight * np.arange(weight.shape[-2])[:, None]).sum((-1, -2)) / np.maximum(total, 1e-8)
    moved = direction_of_displacement(np.stack([cx[:, 1] - cx[:, 0], cy[:, 1] - cy[:, 0]], -1))
    return np.where((total > 0.2).all(1), moved, -1)  # found: about a pixel of strong colour


# ==== BEGIN OPTIONAL: judge ====
# eval/judge_* (FID needs Inception weights): a small CNN trained once on real frames, cached. To delete it:
# sed '/^# ==== BEGIN OPTIONAL: judge/,/^# ==== END OPTIONAL: judge/d; /# optional: judge$/d' video_diffusion.py > x.py


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


JUDGE_DATA_SEED, JUDGE_HELDOUT_SEED = 1_000_001, 1_000_002  # the judge's own sprites sets (a run trains on --seed's)


def judge_clips(sampler: DeviceClips, samples: np.ndarray) -> dict:
    """eval/judge_*: each generated frame's sprite colour against its caption's (a CNN cached in {data_dir}/judge)."""
    args, (n, _, num_frames) = sampler.args, samples.shape[:3]

    def colour_labels(captions: list, frames_each: int) -> np.ndarray:  # "a red square ..." -> 0
        return np.repeat([list(SPRITE_COLOURS).index(c.split()[1]) for c in captions], frames_each)

    if sampler.judge is None:
        def real(count: int, frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
            data = make_sprites_dataset(count, frames, args.img_size, args.num_distractors, seed=seed)
            return data.frames, colour_labels(data.captions, frames)

        key = f"sprites_{args.img_size}px_{args.num_distractors}distractors_4classes_seed{JUDGE_DATA_SEED}"
        judge = load_or_train_judge(Path(args.data_dir) / "judge", key, lambda: real(512, 8, JUDGE_DATA_SEED),
                                    len(SPRITE_COLOURS), JUDGE_DATA_SEED)
        sampler.judge = (judge, *real(-(-2 * n * num_frames // args.num_frames), args.num_frames, JUDGE_HELDOUT_SEED))
    asked = colour_labels((list(sampler.data.captions) * n)[:n], num_frames)
    frames = samples.transpose(0, 2, 1, 3, 4).reshape(-1, 3, *samples.shape[3:])
    scores = judge_scores(sampler.judge[0], frames, asked, *sampler.judge[1:])
    return {f"eval/judge_{name}": value for name, value in scores.items()}


# ==== END OPTIONAL: judge ====


def evaluate(sampler: DeviceClips, writer, step: int, samples_dir: Path, full: bool = True) -> dict:
    """8 clips (full: --num-eval-samples, long videos, eval/ metrics) to samples/, a PNG and TensorBoard."""
    args, k, metrics = sampler.args, sampler.args.context_frames, {}
    n = args.num_eval_samples if full else 8
    samples = sampler.clips(n)
    write_samples(samples_dir, f"step{step:08d}", samples)
    strip = frame_strips(samples[:8], [f"generated: {c}" for c in (sampler.read_captions * 8)[:8]])
    writer.add_image("samples/clips", strip, step, dataformats="HWC")
    write_png(samples_dir / f"step{step:08d}.png", strip)
    if not full:
        return metrics
    metrics |= judge_clips(sampler, samples) if args.dataset == "sprites" else {}  # optional: judge
    if sampler.actions is not None and k > 0:  # rollouts from the first k real frames, no caption
        real, _, actions = sampler[torch.arange(n, device=sampler.device)]
        real, rollout = to_uint8(real), dict(use_text=False, num_context=k)
        rollouts = {"true_actions": sampler.clips(n, **rollout),
                    "shuffled_actions": sampler.clips(n, **rollout, action_shift=1),
                    "copy_last": np.repeat(real[:, :, k - 1: k], args.num_frames, axis=2)}
        metrics |= {f"eval/psnr_{name}": rollout_psnr(clips, real, k) for name, clips in rollouts.items()}
        # Genie's delta-PSNR: how much closer to the real clip the true actions bring a rollout
        metrics["eval/action_control_dpsnr"] = metrics["eval/psnr_true_actions"] - metrics["eval/psnr_shuffled_actions"]
        def words(a: torch.Tensor) -> str:  # actions (T,) or velocities (T, 2) in words
            if a.ndim == 2:
                return " ".join(f"{v[0]:+.1f},{v[1]:+.1f}" for v in a.tolist())
            return " ".join(SPRITE_ACTIONS[i] if args.dataset == "sprites" else f"a{i}"
                            for i in a.tolist())

        shown = min(4, n)  # real and generated rows in turn, named by the actions after frame k
        labels = [f"{row} {i}: {k} given, then {words(actions[i, k:])}"
                  for i in range(shown) for row in ("real", "generated")]
        pairs = np.stack([real[:shown], rollouts["true_actions"][:shown]], 1).reshape(-1, *real.shape[1:])
        writer.add_image("samples/rollouts_true_actions", frame_strips(pairs, labels), step, dataformats="HWC")
    if args.dataset == "sprites" and k > 0:
        # Does the sprite go where the caption or actions alone say? Swapped: another clip's (chance)
        for kind, alone in (("text", dict(use_actions=False)), ("action", dict(use_text=False))):
            for swapped, tag in ((0, ""), (1, "_swapped")):
                clips = sampler.clips(n, num_context=1, **alone, **{f"{kind}_shift": swapped})
                asked = np.resize(np.roll(sampler.data.directions, -swapped), n)  # i + swapped's
                hits = movement_directions(clips) == asked  # chance: 1/4
                metrics[f"eval/{kind}_direction_accuracy{tag}"] = float(hits.mean())
    if args.long_video_frames > args.num_frames:
        videos = sampler.clips(min(n, 4), long=True)
        write_samples(samples_dir, f"long_step{step:08d}", videos)
        labels = [f"generated {i} (autoregressive)" for i in range(len(videos))]
        writer.add_image("samples/long_video", frame_strips(videos, labels), step, dataformats="HWC")
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    if metrics:
        print(f"eval at step {step}: " + ", ".join(f"{t[5:]} {v:.3f}" for t, v in metrics.items()))
    return metrics


def with_caption(frame: np.ndarray, size: int, lines: list[str]) -> np.ndarray:
    """A uint8 (h, w, 3) frame enlarged to width size (nearest: sharp pixels) above a line of text per entry."""
    import cv2

    height = int(round(frame.shape[0] * size / frame.shape[1]))
    big = cv2.resize(np.ascontiguousarray(frame), (size, height), interpolation=cv2.INTER_NEAREST)
    margin = np.zeros((8 + 18 * len(lines), size, 3), dtype=np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(margin, line, (6, 18 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([big, margin])


def frame_strips(clips: np.ndarray, labels: list[str]) -> np.ndarray:
    """uint8 clips (N, 3, T, H, W) -> a uint8 image: each clip's frames in a row above its label."""
    scale = max(1, 48 // clips.shape[3])
    rows = [make_grid(clip.transpose(1, 0, 2, 3), columns=clip.shape[1]) for clip in clips]
    return np.concatenate([with_caption(row, row.shape[1] * scale, [label]) for row, label in zip(rows, labels)])


def write_samples(folder: Path, stem: str, clips: np.ndarray, fps: int = 8) -> Path:
    """An MP4 (each frame a grid of the clips, >= 256 px) and an .npz of the uint8 clips (N, T, H, W, 3)."""
    write_mp4(folder / f"{stem}.mp4", np.stack([make_grid(clips[:64, :, i]) for i in range(clips.shape[2])]), fps)
    np.savez(folder / f"{stem}.npz", clips.transpose(0, 2, 3, 4, 1))
    return folder / f"{stem}.mp4"


# ==== BEGIN OPTIONAL: play ====
# Play: a model as a game, in a pygame window or headless. To delete it (here, in Args, marked lines):
#   sed '/^# ==== BEGIN OPTIONAL: play/,/^# ==== END OPTIONAL: play/d; /# optional: play$/d' video_diffusion.py > x.py

# --play-keys letters: N noop, U D L R moves, '/' restarts (DIAMOND's Atari games add fire, diagonals).
ACTION_LETTERS = {"NOOP": "N", "FIRE": "F", "UP": "U", "DOWN": "D", "LEFT": "L", "RIGHT": "R", "UPLEFT": "Q",
                  "UPRIGHT": "E", "DOWNLEFT": "Z", "DOWNRIGHT": "C", "UPFIRE": "u", "DOWNFIRE": "d", "LEFTFIRE": "l",
                  "RIGHTFIRE": "r", "UPLEFTFIRE": "q", "UPRIGHTFIRE": "e", "DOWNLEFTFIRE": "z", "DOWNRIGHTFIRE": "c"}
RESTART_LETTER = "/"


def parse_play_keys(keys: str, meanings: list[str]) -> list[Optional[int]]:
    """--play-keys -> an action index per step (None: restart); a letter of no action is refused."""
    index = {ACTION_LETTERS.get(name, name): i for i, name in enumerate(meanings)} | {RESTART_LETTER: None}
    letters = [letter for letter in keys if not letter.isspace()]
    if unknown := [letter for letter in letters if letter not in index]:
        known = ", ".join(f"{ACTION_LETTERS.get(name, name)} {name.lower()}" for name in meanings)
        raise UserError(f"--play-keys: {unknown[0]!r} is no action of this model; its letters: {known}, "
                        f"{RESTART_LETTER} restart")
    if not letters:
        raise UserError("--play-keys is empty: give one letter per step, e.g. RRRDDD")
    return [index[letter] for letter in letters]


def action_from_keys(up: bool, down: bool, left: bool, right: bool, fire: bool, meanings: list[str]) -> int:
    """Held keys -> an action of `meanings` (ALE names: UPFIRE); a name it lacks drops the vertical
    part, then fire (moving matters more): Breakout's up-right and left+fire are RIGHT and LEFT."""
    vertical = "UP" if up and not down else "DOWN" if down and not up else ""
    horizontal = "LEFT" if left and not right else "RIGHT" if right and not left else ""
    suffix = "FIRE" if fire else ""
    names = (vertical + horizontal + suffix, horizontal + suffix, vertical + horizontal,
             horizontal, vertical + suffix, vertical, suffix, "NOOP")
    return next((meanings.index(name) for name in names if name and name in meanings), 0)


def imagined_video(next_frame: Callable, frames: torch.Tensor, actions: torch.Tensor, values: torch.Tensor):
    """A generator, the model as a game: the last of frames (1, 3, k, H, W), then one per action."""
    frame = frames[0, :, -1]
    while True:
        action = yield to_uint8(frame).transpose(1, 2, 0)
        actions = torch.cat([actions, values[action].to(actions)[None, None]], dim=1)
        frame = next_frame(frames, actions).clamp(-1, 1)[0]
        frames, actions = torch.cat([frames[:, :, 1:], frame[None, :, None]], dim=2), actions[:, 1:]


def real_sprites(state: dict, actions: np.ndarray, img_size: int, values: torch.Tensor):
    """The sprites world as a game (a generator): a start re-rendered under all actions so far."""
    actions = list(actions)
    while True:
        action = yield render_sprite_clip(state, np.array(actions), img_size)[-1].transpose(1, 2, 0)
        actions.append(values[action].numpy())


def play_keys(game: Callable, steps: list, meanings: list[str], size: int, name: str = "") -> dict:
    """game() played headless with steps (None: restart): frames, captioned ones (MP4), frames/s."""
    frames, start = [], time.perf_counter()
    for action in [None, *steps]:  # None: a (re)start
        frames.append(next(session := game()) if action is None else session.send(action))
    seconds = time.perf_counter() - start
    shown = [with_caption(frame, size, [f"{name}  step {i}  action {'-' if a is None else meanings[a].lower()}"])
             for i, (frame, a) in enumerate(zip(frames, [None, *steps]))]
    return {"frames": np.stack(frames), "shown": np.stack(shown), "fps": len(steps) / max(seconds, 1e-9)}


def import_pygame():
    """pygame (pygame-ce or pygame) for the play window, or one line with the install command."""
    try:
        import pygame
    except ImportError:
        raise UserError("--play opens a window with pygame, which is not installed: pip install pygame-ce (or pip "
                        "install -e '.[play]'); --play-keys KEYS plays headless without it") from None
    return pygame


def play_window(games: dict, meanings: list[str], out_dir: Path, size: int, max_fps: float):
    """The live session: the model (Tab: the real world), at most max_fps steps a second."""
    pygame = import_pygame()
    pygame.display.init()  # the display alone: no audio device needed
    driver = pygame.display.get_driver()
    if driver in ("offscreen", "dummy") and not os.environ.get("SDL_VIDEODRIVER"):  # no screen: SDL fell back
        raise UserError(f"no display to open a window on (SDL fell back to its {driver} driver): play headless with "
                        f"--play-keys KEYS, or set SDL_VIDEODRIVER={driver} to run the window unseen")
    screen, clock = pygame.display.set_mode((size, size + 8 + 18 * 2)), pygame.time.Clock()
    modes, recording, keys = list(games), None, {pygame.K_RETURN}  # recording: frames since R
    held = (pygame.K_UP, pygame.K_DOWN, pygame.K_LEFT, pygame.K_RIGHT, pygame.K_SPACE)
    while True:
        if recording is not None and keys & {pygame.K_r, pygame.K_TAB, pygame.K_ESCAPE}:
            path = out_dir / f"play_{modes[0]}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"
            write_mp4(path, np.stack(recording), fps=int(round(max_fps)))
            print(f"wrote {path}", flush=True)
            recording, keys = None, keys - {pygame.K_r}
        if pygame.K_ESCAPE in keys:
            break
        recording = [] if pygame.K_r in keys else recording
        modes = modes[1:] + modes[:1] if pygame.K_TAB in keys else modes
        if keys & {pygame.K_RETURN, pygame.K_TAB}:
            frame, step, action = next(game := games[modes[0]]()), 0, None
        else:
            action = action_from_keys(*(pygame.key.get_pressed()[key] for key in held), meanings)
            frame, step = game.send(action), step + 1
        image = with_caption(frame, size, [
            f"{modes[0]}  step {step}  action {'-' if action is None else meanings[action].lower()}",
            f"{clock.get_fps():.1f} fps" + ("" if recording is None else "  REC")])
        if recording is not None:
            recording.append(image)
        screen.blit(pygame.image.frombuffer(image.tobytes(), image.shape[1::-1], "RGB"), (0, 0))
        pygame.display.flip()
        clock.tick(max_fps)
        keys = {pygame.K_ESCAPE if event.type == pygame.QUIT else event.key  # closing it: Esc
                for event in pygame.event.get() if event.type in (pygame.QUIT, pygame.KEYDOWN)}
        keys -= {pygame.K_TAB} if len(modes) == 1 else set()  # nothing to switch to
    pygame.quit()


def play_games(args: Args, checkpoint: dict, device: torch.device, autocast=contextlib.nullcontext(),
               clip: Optional[int] = None) -> dict:
    """The EMA model as a game from held-out clip `clip`: each step, frame k of a clip given k."""
    num_actions, vocabulary = checkpoint["num_actions"], checkpoint["vocabulary"]
    if args.dataset == "folder" or num_actions == 0 and args.action_dim == 0 or args.context_frames < 1:
        raise UserError(f"--play needs a model trained with actions (--dataset sprites or atari) and --context-frames "
                        f">= 1; this run has --dataset {args.dataset}, --context-frames {args.context_frames}")
    if args.dataset != "sprites" and args.play_world != "imagined":
        raise UserError(f"--play-world {args.play_world}: only the sprites world can be played for "
                        f"real here; give --play-world imagined")
    caption, max_len = args.play_caption or "", args.max_text_len  # checked before any data is made
    if unknown := dict.fromkeys(w for w in caption_words(caption)[:max_len] if w not in vocabulary):
        known = vocabulary[len(SPECIAL_TOKENS):]
        guesses = {w: difflib.get_close_matches(w, known, n=1) for w in unknown}
        named = ", ".join(w + (f" (did you mean {guesses[w][0]}?)" if guesses[w] else "") for w in unknown)
        raise UserError(f"--play-caption {caption!r}: the model does not know {named}: it learned the "
                        f"words of its training captions only (an unknown word would be the untrained "
                        f"<unk>); its {len(known)} words: {', '.join(known)}")
    if len(words := caption_words(caption)) > max_len:
        print(f"notice: --play-caption has {len(words)} words, more than the model's --max-text-len {max_len}: "
              f"it reads {' '.join(words[:max_len])!r} and drops {' '.join(words[max_len:])!r}", flush=True)
    caption = caption_as_read(caption, vocabulary, max_len)  # printed as the model reads it
    if args.dataset == "sprites":
        meanings = [name.upper() for name in SPRITE_ACTIONS]
        data = load_dataset(replace(args, num_sprite_clips=64, seed=args.seed + 2_000))  # unseen
    else:  # Atari: starts from the run's recorded episodes, the game's own action names
        import gymnasium as gym

        data = load_atari_dataset(args)
        meanings = list(gym.make(atari_ids(args.env_id)[0]).unwrapped.get_action_meanings())
    # each action as the model takes it; continuous: the velocity (DIRECTION_VECTORS[-1]: none)
    values = torch.from_numpy(DIRECTION_VECTORS[np.arange(5) - 1]) if args.action_dim else torch.arange(len(meanings))
    model = build_model(args, len(vocabulary), num_actions).to(device).eval()
    model.load_state_dict(checkpoint["ema"])
    alphas_cumprod = make_alphas_cumprod(make_beta_schedule(args.beta_schedule, args.timesteps,
                                                            args.beta_start, args.beta_end))
    sampler = DeviceClips(data, vocabulary, args, device, alphas_cumprod, model, autocast)
    k, clip = args.context_frames, args.seed % len(data.clip_starts) if clip is None else clip
    real, _, actions = sampler[torch.tensor([clip], device=device)]
    text = tokenize([caption], vocabulary, max_len).to(device) if caption else None
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def next_frame(frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:  # after the k frames
        return generate_video(model, alphas_cumprod, args, k + 1, tuple(real.shape), generator, text, actions,
                              video=frames, autocast=autocast)[:, :, k]

    games = {"imagined": lambda: imagined_video(next_frame, real[:, :, :k], actions[:, :k], values)}
    if args.dataset == "sprites":
        start_actions = actions[0, :k].cpu().numpy()
        games["real"] = lambda: real_sprites(data.sprite_states[clip], start_actions, args.img_size, values)
    return {"games": games, "meanings": meanings, "caption": caption}


def play(args: Args, checkpoint: dict, run_dir: Path, device: torch.device, autocast):
    """--play: play_games' games in a window, or headless with --play-keys (each --play-world's MP4 in play/)."""
    games, meanings, caption = play_games(args, checkpoint, device, autocast).values()
    steps = None if args.play_keys is None else parse_play_keys(args.play_keys, meanings)
    letters = ", ".join(f"{ACTION_LETTERS.get(name, name)} {name.lower()}" for name in meanings)
    print(f"keys: {letters}" + (f", {RESTART_LETTER} restart (--play-keys letters)" if steps is not None else
                                "; window: arrows and space (fire) pick these, Enter restarts, Tab switches "
                                "model / real world, R records, Esc quits"), flush=True)
    print(f"caption: {caption!r}; sampler: {args.sampler}, {args.num_sampling_steps} steps per "
          f"frame, cfg scale {args.cfg_scale:g}", flush=True)
    if steps is None:
        return play_window(games, meanings, run_dir / "play", args.play_size, args.play_fps)
    for mode in ("imagined", "real") if args.play_world == "both" else (args.play_world,):
        session = play_keys(games[mode], steps, meanings, args.play_size, mode)
        path = run_dir / "play" / f"play_{mode}_{time.strftime('%Y%m%d_%H%M%S')}.mp4"
        write_mp4(path, session["shown"], fps=int(round(args.play_fps)))
        print(f"{mode}: {len(steps)} steps at {session['fps']:.2f} frames/s; wrote {path}", flush=True)


# ==== END OPTIONAL: play ====


# --------------------------------------------------------------------------------------------------
# The run: the run folder, logging, checkpoints, main (training, or sampling only).


def open_run(args: Args, setup, run_dir: Optional[Path], step: int, data: VideoData, vocabulary: list,
             num_actions: int, num_params: int):
    """Rank 0's run folder (new unless resumed) and writer (else None); prints the run's start."""
    if not setup.is_main:
        return run_dir, None
    run_dir, writer = open_writer(args, run_dir, step, data.dataset_id)
    num_clips = len(data.clip_starts)
    print(f"run folder: {run_dir}")
    if step > 0:
        print(f"resuming at step {step} of {args.total_steps}")
    else:
        writer.add_scalar("charts/num_parameters", num_params, 0)
    print(f"model: {num_params:,} parameters; data: {num_clips:,} clips, {len(vocabulary) - len(SPECIAL_TOKENS)} "
          f"words, {num_actions} actions; device: {setup.device}")
    if num_clips < args.batch_size:  # it trains (batches cross epochs and repeat clips), but say so
        print(f"notice: {num_clips:,} clips, fewer than --batch-size {args.batch_size}")
    return run_dir, writer


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
    # ---- setup: the arguments (a resumed run's from its checkpoint), the device, seeds, the data
    checkpoint, run_dir, started = None, None, time.perf_counter()
    if args.resume:
        trains = not args.sample_only  # --sample-only writes no checkpoint: it reads any checkpoint file
        trains = trains and not (args.play or args.play_keys is not None)  # optional: play
        args, checkpoint, run_dir = resume_run(args, given, trains)  # a trainer locks the run first
    check_args(args, torchrun_world()[0])
    setup = setup_device(args)
    device, autocast = setup.device, autocast_context(setup, args.dtype)
    if args.play or args.play_keys is not None:  # optional: play
        return play(args, checkpoint, run_dir, device, autocast)  # optional: play
    train_generator = torch.Generator(device=device).manual_seed(args.seed)  # t, noise, drops ...
    data = load_dataset(args)  # (a resumed run's vocabulary and action count: they fix the model's shape)
    vocabulary = build_vocabulary(data.captions) if checkpoint is None else checkpoint["vocabulary"]
    num_actions = checkpoint["num_actions"] if checkpoint is not None else data.num_actions
    for line in data_caption_notices(data.captions, vocabulary, args.max_text_len) if setup.is_main else []:
        print(line)  # captions cut to --max-text-len, words the resumed model never learned
    if not args.sample_only:  # will a training step fit? (one line naming --batch-size if not)
        num_params, activations, flops = step_memory_profile(args, len(vocabulary), num_actions)
        check_step_memory(setup, args.batch_size, num_params, activations, args.dtype)
    alphas_cumprod = make_alphas_cumprod(make_beta_schedule(args.beta_schedule, args.timesteps,
                                                            args.beta_start, args.beta_end))
    clips = DeviceClips(data, vocabulary, args, device, alphas_cumprod)

    # ---- model, EMA, optimizer with warmup (lr_s = lr * min(1, (s + 1) / warmup)), resumed state
    model = build_model(args, len(vocabulary), num_actions).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, fused=setup.use_cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    scaler = torch.amp.GradScaler("cuda", enabled=setup.use_cuda and args.dtype == "float16")
    parts = (model, ema_model, optimizer, scheduler, scaler, train_generator, vocabulary, num_actions)
    step = 0 if checkpoint is None else restore_state(checkpoint, *parts)

    stop = StopFlag()  # now SIGTERM/SIGINT finish the step (or abandon sampling), save and exit 0
    ema_model.register_forward_pre_hook(lambda module, inputs: stop.check())  # sampling stops within a step
    sampler = DeviceClips(eval_subset(data, args), vocabulary, args, device, alphas_cumprod, ema_model, autocast)
    if args.sample_only or step >= args.total_steps:  # --sample-only, or a finished run
        leave_process_group(setup.world_size)  # what follows is rank 0's alone
        stem = f"sample_only_{args.sampler}{args.num_sampling_steps}_cfg{args.cfg_scale:g}_step{step}_{time.time():.0f}"
        if setup.is_main and args.sample_only:
            try:  # --num-samples clips (and long videos) into samples/; a signal stops it
                path = write_samples(run_dir / "samples", stem, sampler.clips(args.num_samples))
                print(f"wrote {args.num_samples} clips to {path} and {path.with_suffix('.npz')}")
                if args.long_video_frames > args.num_frames:
                    videos = sampler.clips(min(args.num_samples, 4), long=True)
                    path = write_samples(run_dir / "samples", f"long_{stem}", videos)
                    print(f"wrote long videos of {args.long_video_frames} frames to {path}")
            except StopRequested:
                print("stopped by signal while sampling; nothing more was written")
        elif setup.is_main:
            print(f"the run is already at step {step} of --total-steps {args.total_steps}: raise --total-steps "
                  f"to train on")
        stop.restore()
        return

    # ---- the run folder (after the signal handlers: it always gets a checkpoint), throughput
    run_dir, writer = open_run(args, setup, run_dir, step, data, vocabulary, num_actions, num_params)
    meter = Meter(device, 3 * flops, peak_flops(setup, args.dtype), setup.world_size)
    train_model = torch.compile(model, backend=COMPILE_BACKEND) if args.compile else model
    if setup.world_size > 1:
        device_ids = [setup.local_rank] if setup.use_cuda else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=device_ids)

    # ---- train
    local_batch = args.batch_size // setup.world_size
    mine = slice(setup.rank * local_batch, (setup.rank + 1) * local_batch)
    first_step, step_timer = step, StepTimer(step, args.total_steps, setup)
    progress = progress_bar(args.total_steps, step, "train", "step", setup.is_main)
    while step < args.total_steps:
        batch = clips.batch(step, train_generator, mine, model.null_text(local_batch, device))
        loss = video_diffusion_loss(train_model, **batch, prediction=args.prediction, autocast=autocast)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():  # EMA: theta_ema <- decay theta_ema + (1 - decay) theta
            torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - args.ema_decay)
        meter.add(loss, grad_norm, local_batch)
        step += 1
        progress.update(1)
        if setup.is_main and (seconds := step_timer.seconds_per_step(step)) is not None:
            progress.write("\n".join(run_time_notice(seconds, args.total_steps - step, setup)))
        if step % args.log_every == 0 or step == args.total_steps:
            log_interval(writer, meter, scheduler, progress, step, run_dir)
        # Every rank stops at the same step: all-reduced at a log step under torchrun, else at once.
        stopping = stop.sync(setup) if setup.world_size == 1 or step % args.log_every == 0 else False
        evaluation = step % args.eval_every == 0 or step == args.total_steps
        if setup.is_main and not stopping and (evaluation or step == args.first_sample_at):
            with contextlib.suppress(StopRequested):  # a signal ends sampling, not the checkpoint
                evaluate(sampler, writer, step, run_dir / "samples", full=evaluation)
                if not evaluation:
                    progress.write(f"first samples at step {step}, {time.perf_counter() - started:.0f} s after the "
                                   f"start: {run_dir / 'samples' / f'step{step:08d}.png'}")
            stopping = stop.sync(setup) if setup.world_size == 1 else stopping
        if step % args.save_every == 0 or step == args.total_steps or stopping:
            save_run(run_dir, args, step, parts, meter, setup)
        if evaluation or step % args.save_every == 0 or step in (first_step + 1, args.first_sample_at):
            meter.restart_clock()  # sampling, saving and the first (compiling) step stay out of SPS
        if stopping:
            break

    # ---- teardown
    progress.close()
    leave_process_group(setup.world_size)
    close_writer(args, writer)
    if setup.is_main:
        print(f"stopped by signal at step {step}" if stopping else f"done: step {step}, checkpoint at "
              f"{run_dir / 'checkpoints' / 'latest.pt'}", flush=True)
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


def write_mp4(path: Path, frames: np.ndarray, fps: int = 15, min_side: int = 256):
    """uint8 (T, H, W, 3) RGB frames -> MP4 (mp4v), enlarged by an integer factor to min_side."""
    import cv2
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, min_side // max(frames.shape[1:3]))
    height, width = frames.shape[1] * scale, frames.shape[2] * scale
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"cannot write {path}")
    for frame in frames:
        writer.write(cv2.resize(frame, (width, height), interpolation=cv2.INTER_NEAREST)[..., ::-1])
    writer.release()


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
