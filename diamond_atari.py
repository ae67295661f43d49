# cleanworlds: DIAMOND (Alonso et al. 2024) on Atari 100k. Docs: README.md, benchmark/RESULTS.md
"""
DIAMOND: a diffusion world model (EDM denoiser on the last 4 frames and actions), a reward/end model
and an actor-critic trained in the world model's imagination, on Atari 100k, in one file.

    python diamond_atari.py --env-id Breakout-v5  # the paper's setting on one GPU (Breakout 132.5)
    python diamond_atari.py --env-id Catch --preset tiny  # bsuite's Catch, seconds on a CPU
    python diamond_atari.py --env-id Breakout-v5 --dataset-dir path/to/episodes  # recorded episodes
    python diamond_atari.py --resume runs/Breakout-v5__diamond_atari__1__1700000000
    python diamond_atari.py --resume RUN --eval-only  # its 100 test episodes
    python diamond_atari.py --resume RUN --play  # optional: play
    python diamond_atari.py --episode-to-mp4 RUN/episodes/episode_000000.npz
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
from typing import Annotated, Callable, Literal, Optional, Union, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT_NAME = "diamond_atari.py"
CHECKPOINT_FORMAT_VERSION = 3  # 2: global_step (the one TensorBoard step); 3: the imagined episodes
OLDER_CHECKPOINT_FORMATS = ()  # formats a resume converts (none)
# torch.compile's backend, read at each call (tests swap in their own)
COMPILE_BACKEND = "inductor"
# Marks beside an Args field: its unit (--save-every EPOCHS in --help), its domain ('>= 1',
# '[0, 1)', checked at start-up) and RESUME_MUTABLE where --resume may change it (flag_marks).
EPOCHS, UPDATES = tyro.conf.arg(metavar="EPOCHS"), tyro.conf.arg(metavar="UPDATES")
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
    preset: Optional[Literal["tiny", "cpu", "catch", "small", "medium", "large"]] = None
    """tiny: seconds on a CPU; cpu, catch: CPU-scale runs; small/medium/large: TorchWM's networks"""
    config: Annotated[Optional[str], RESUME_MUTABLE] = None
    """a config.json written by an earlier run: its values become the defaults (flags still win)"""
    resume: Optional[str] = None
    """a run folder or checkpoint file to continue exactly where it stopped"""
    eval_only: Annotated[bool, RESUME_MUTABLE] = False
    """with --resume: only run --test-episodes test episodes with the checkpoint's agent"""
# ==== BEGIN OPTIONAL: play ====
    play: Annotated[bool, RESUME_MUTABLE] = False
    """with --resume: play the world model in a window (pip install pygame-ce)"""
    play_keys: Annotated[Optional[str], RESUME_MUTABLE] = None
    """headless play: one letter per step: N F U D L R, Q E Z C, lowercase with fire, / restart"""
    play_world: Annotated[Literal["imagined", "real", "both"], RESUME_MUTABLE] = "imagined"
    """headless play: the world model (imagined), the real game, or both with the same keys"""
    play_size: Annotated[int, ">= 16", RESUME_MUTABLE] = 512
    """play: the frame's side in the window and in the play MP4s, in pixels"""
    play_fps: Annotated[float, "> 0", RESUME_MUTABLE] = 15.0
    """play: the window's steps per second at most"""
# ==== END OPTIONAL: play ====
    episode_to_mp4: Annotated[Optional[str], RESUME_MUTABLE] = None
    """an episode .npz -> an MP4 beside it, frames captioned (--env-id names the actions)"""
    world_model_only: bool = False
    """train and evaluate only the world model, on random-policy data or --dataset-dir"""
    compile: Annotated[bool, RESUME_MUTABLE] = False
    """torch.compile the denoiser's U-Net"""
    imagination_graphs: Annotated[Literal["auto", "on", "off"], RESUME_MUTABLE] = "auto"
    """the imagination step compiled: CUDA graphs on CUDA, inductor on a CPU; auto: CUDA only"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """float32 (TF32 on CUDA, as DIAMOND), or bfloat16/float16 autocast on CUDA (CPU: float32)"""

    # Environment: Atari 100k as DIAMOND runs it
    env_id: Annotated[str, tyro.conf.arg(aliases=("--game",))] = "Breakout-v5"
    """Breakout-v5, ALE/Breakout-v5 or BreakoutNoFrameskip-v4 (one protocol), or Catch"""
    sticky_actions: bool = False
    """sticky actions (repeat_action_probability 0.25); off in Atari 100k as DIAMOND runs it"""
    noop_max: Annotated[int, ">= 0"] = 30
    """at most this many no-op frames after each reset (a random number from 1 to noop_max)"""
    frame_skip: Annotated[int, ">= 1"] = 4
    """each action is repeated this many frames; the observation is the max over the last two"""
    obs_size: Annotated[int, ">= 1"] = 64
    """observations are RGB obs_size x obs_size pixels (cv2.INTER_AREA)"""
    max_episode_steps: Annotated[int, ">= 1"] = 27_000
    """an episode (a whole game) is truncated after this many agent steps (108,000 frames)"""
    epsilon: Annotated[float, "[0, 1]"] = 0.01
    """probability of a uniformly random action when collecting (test episodes use 0)"""
    dataset_dir: Optional[str] = None
    """train on the episode .npz files in this folder (10% held out) instead of collecting"""

    # Denoiser (the diffusion world model)
    diffusion_channels: Annotated[tuple[int, ...], ">= 1"] = (64, 64, 64, 64)
    """channels of the U-Net levels (each level after the first halves the resolution)"""
    diffusion_res_blocks: Annotated[int, ">= 1"] = 2
    """residual blocks per U-Net level on the way down (one more on the way up)"""
    diffusion_cond_dim: Annotated[int, ">= 1"] = 256
    """size of the noise-level + action embedding that drives the adaptive group norms"""
    num_conditioning_steps: Annotated[int, ">= 2"] = 4
    """past frames and actions the world model is conditioned on"""
    sigma_data: Annotated[float, "> 0"] = 0.5
    """EDM sigma_data: the standard deviation of the (scaled) frames"""
    sigma_offset_noise: Annotated[float, ">= 0"] = 0.3
    """offset noise: a per-(image, channel) constant noise of this scale is added in training"""
    train_sigma_loc: Annotated[float, "> -inf"] = -0.4
    """training noise levels: ln(sigma) ~ N(loc, scale^2) (loc: any finite number)"""
    train_sigma_scale: Annotated[float, ">= 0"] = 1.2
    """training noise levels: ln(sigma) ~ N(loc, scale^2)"""
    train_sigma_min: Annotated[float, "> 0"] = 2e-3
    """training noise levels are clipped to [train_sigma_min, train_sigma_max]"""
    train_sigma_max: Annotated[float, "> 0"] = 20.0
    """training noise levels are clipped to [train_sigma_min, train_sigma_max]"""
    num_autoregressive_steps: Annotated[int, ">= 0"] = 1
    """extra denoiser predictions per training segment, each on the previous one's 8-bit output"""

    # Sampler
    sampler: Annotated[Literal["euler", "heun"], RESUME_MUTABLE] = "euler"
    """ODE solver over the Karras sigmas: euler (DIAMOND) or heun (about twice the network calls)"""
    num_sampling_steps: Annotated[int, "[1, 1000]", RESUME_MUTABLE] = 3
    """denoising steps per generated frame"""
    sigma_min: Annotated[float, "> 0"] = 2e-3
    """smallest sigma of the Karras schedule"""
    sigma_max: Annotated[float, "> 0"] = 5.0
    """largest sigma of the Karras schedule"""
    rho: Annotated[float, "> 0"] = 7.0
    """rho of the Karras schedule"""
    edm_initial_noise: bool = False
    """start sampling from sigma_max * noise (EDM), not unit noise (DIAMOND's code)"""

    # Reward / termination model
    reward_channels: Annotated[int, ">= 1"] = 32
    """channels of the reward/end model's convolutional encoder"""
    reward_cond_dim: Annotated[int, ">= 1"] = 128
    """action embedding size of the reward/end model"""
    reward_lstm_dim: Annotated[int, ">= 1"] = 512
    """LSTM size of the reward/end model"""
    reward_segment_length: Annotated[int, ">= 2"] = 19
    """frames per reward/end training segment (DIAMOND: horizon 15 + 4 conditioning steps)"""

    # Actor-critic
    actor_channels: Annotated[tuple[int, ...], ">= 1"] = (32, 32, 64, 64)
    """channels of the actor-critic's encoder stages (each halves the resolution)"""
    actor_lstm_dim: Annotated[int, ">= 1"] = 512
    """LSTM size of the actor-critic"""
    imagination_horizon: Annotated[int, ">= 1"] = 15
    """an imagined episode is truncated after this many steps and restarts from a real segment"""
    backup_every: Annotated[int, ">= 1"] = 15
    """imagined steps per actor-critic update (the imagined episodes go on across updates)"""
    num_imagined_envs: Annotated[int, ">= 1"] = 32
    """imagined environments per actor-critic update"""
    discount_factor: Annotated[float, "[0, 1]"] = 0.985
    """discount gamma of the lambda-returns"""
    td_lambda: Annotated[float, "[0, 1]"] = 0.95
    """lambda of the lambda-returns"""
    entropy_weight: Annotated[float, ">= 0"] = 0.001
    """weight of the entropy bonus"""

    # Training loop
    num_epochs: Annotated[Optional[int], EPOCHS, ">= 1", RESUME_MUTABLE] = None
    """the run length (default: the Atari 100k schedule's; --dataset-dir: the final epochs')"""
    initial_collection_steps: Annotated[int, ">= 1"] = 5000
    """the first collection N (before epoch 1's own share): at least this many env steps"""
    max_initial_collection_steps: Annotated[int, ">= 1"] = 10_000
    """the first collection grows 100 env steps at a time until --min-rare-rewards, up to this"""
    min_rare_rewards: Annotated[int, ">= 0"] = 10
    """the first collection goes on until the two rarer reward signs occur this often together"""
    collection_steps_per_epoch: Annotated[int, ">= 1"] = 100
    """env steps collected in each epoch after the first collection (epoch 1 included)"""
    env_step_budget: Annotated[int, ">= 1"] = 100_000
    """env steps collected in the whole run (Atari 100k), the first collection included"""
    final_epochs_without_collection: Annotated[int, ">= 0"] = 50
    """epochs that only train, after the budget is spent (with --dataset-dir: the run length)"""
    denoiser_steps_per_epoch: Annotated[int, ">= 1"] = 400
    """denoiser gradient steps per epoch"""
    reward_steps_per_epoch: Annotated[int, ">= 1"] = 400
    """reward/end model gradient steps per epoch"""
    actor_critic_steps_per_epoch: Annotated[int, ">= 1"] = 400
    """actor-critic gradient steps per epoch"""
    first_epoch_denoiser_steps: Annotated[int, ">= 1"] = 10_000
    """denoiser gradient steps in epoch 1"""
    first_epoch_reward_steps: Annotated[int, ">= 1"] = 10_000
    """reward/end model gradient steps in epoch 1"""
    first_epoch_actor_critic_steps: Annotated[int, ">= 1"] = 5000
    """actor-critic gradient steps in epoch 1"""
    actor_critic_start_after_epochs: Annotated[int, EPOCHS, ">= 0"] = 0
    """the actor-critic trains from epoch N + 1 on (until then the collector's policy is uniform)"""
    batch_size: Annotated[int, ">= 1"] = 32
    """segments per denoiser and reward/end model batch"""
    recency_weights: Annotated[tuple[float, ...], "> 0"] = (0.1, 0.1, 0.1, 0.7)
    """replay sampling weight of each chronological slice of the episodes, oldest first"""
    learning_rate: Annotated[float, "> 0"] = 1e-4
    """AdamW learning rate (all three components, unless --actor-critic-learning-rate is given)"""
    actor_critic_learning_rate: Annotated[Optional[float], "> 0"] = None
    """AdamW learning rate of the actor-critic alone (default: --learning-rate, as DIAMOND)"""
    adam_eps: Annotated[float, "> 0"] = 1e-8
    """AdamW epsilon"""
    warmup_steps: Annotated[int, UPDATES, ">= 0"] = 100
    """linear learning-rate warmup steps"""
    weight_decay: Annotated[float, ">= 0"] = 1e-2
    """AdamW weight decay of the denoiser and the reward/end model (the actor-critic uses none)"""
    denoiser_max_grad_norm: Annotated[float, "> 0"] = 1.0
    """gradient clipping norm of the denoiser"""
    max_grad_norm: Annotated[float, "> 0"] = 100.0
    """gradient clipping norm of the reward/end model and the actor-critic"""
    log_every: Annotated[int, UPDATES, ">= 1", RESUME_MUTABLE] = 100
    """write the losses to TensorBoard every N gradient updates of a model (at the global step)"""
    save_every: Annotated[int, EPOCHS, ">= 1", RESUME_MUTABLE] = 1
    """write checkpoints/latest.pt every N epochs"""
    save_agent_every: Annotated[int, EPOCHS, ">= 1"] = 5
    """every N epochs: checkpoints/agent_epoch_NNNNN.pt, the actor-critic's state dict alone"""
    num_agents_to_keep: Annotated[int, ">= 1"] = 11
    """the newest N agent_epoch_*.pt files are kept"""
    eval_every: Annotated[int, EPOCHS, ">= 1", RESUME_MUTABLE] = 10
    """every N epochs: test episodes, test-set losses and an imagined rollout beside the real one"""
    eval_episodes: Annotated[int, ">= 1", RESUME_MUTABLE] = 4
    """test episodes at each evaluation"""
    test_episodes: Annotated[int, ">= 1", RESUME_MUTABLE] = 100
    """test episodes at the end (the score the paper reports) and with --eval-only"""
    num_heldout_transitions: Annotated[int, ">= 1"] = 100
    """unseen real transitions the world_model/* metrics are computed on"""


# The cpu and catch presets' networks and imagination: DIAMOND's loop at CPU scale (why each value:
# benchmark/diamond_learns.sh, benchmark/diamond_catch.sh).
CPU_SCALE = dict(
    obs_size=32, diffusion_channels=(16, 16, 16), diffusion_res_blocks=1, diffusion_cond_dim=64,
    num_autoregressive_steps=0, num_sampling_steps=1, reward_channels=8, reward_cond_dim=32,
    reward_lstm_dim=64, reward_segment_length=12, actor_channels=(16, 16, 32, 32),
    actor_lstm_dim=128, imagination_horizon=8, backup_every=8, num_imagined_envs=16,
    final_epochs_without_collection=0, batch_size=16, learning_rate=1e-3, warmup_steps=20, log_every=20,
)
PRESETS = {
    # A full run in seconds on a CPU: 32x32 frames, small networks, short epochs and episodes.
    "tiny": dict(
        obs_size=32, diffusion_channels=(8, 8, 8), diffusion_res_blocks=1, diffusion_cond_dim=16,
        reward_channels=8, reward_cond_dim=8, reward_lstm_dim=16, actor_channels=(8, 8, 8, 8),
        actor_lstm_dim=16, imagination_horizon=4, backup_every=4, num_imagined_envs=4,
        reward_segment_length=8, initial_collection_steps=200, max_initial_collection_steps=300,
        min_rare_rewards=1, collection_steps_per_epoch=50, env_step_budget=350,
        final_epochs_without_collection=1, denoiser_steps_per_epoch=10, reward_steps_per_epoch=10,
        actor_critic_steps_per_epoch=5, first_epoch_denoiser_steps=20, first_epoch_reward_steps=20,
        first_epoch_actor_critic_steps=5, batch_size=8, learning_rate=1e-3, warmup_steps=5,
        max_episode_steps=200, log_every=10, eval_every=1, eval_episodes=1, test_episodes=2,
        num_heldout_transitions=32, save_agent_every=1,
    ),
    # 20 short epochs, 4000 env steps, 500-step episodes
    "cpu": dict(
        CPU_SCALE, num_epochs=20, initial_collection_steps=1000, max_initial_collection_steps=2000,
        collection_steps_per_epoch=100, env_step_budget=4000, denoiser_steps_per_epoch=60,
        reward_steps_per_epoch=30, actor_critic_steps_per_epoch=15, first_epoch_denoiser_steps=300,
        first_epoch_reward_steps=200, first_epoch_actor_critic_steps=40, max_episode_steps=500, eval_every=4,
        eval_episodes=4, test_episodes=100, num_heldout_transitions=64, save_agent_every=4,
    ),
    # Catch: 5000 random env steps train the world model first, then 200 per epoch up to 8000
    "catch": dict(
        CPU_SCALE, initial_collection_steps=5000, max_initial_collection_steps=6000,
        collection_steps_per_epoch=200, env_step_budget=8000, denoiser_steps_per_epoch=20,
        reward_steps_per_epoch=40, actor_critic_steps_per_epoch=60, first_epoch_denoiser_steps=800,
        first_epoch_reward_steps=2000, actor_critic_start_after_epochs=1, eval_every=2,
        eval_episodes=20, test_episodes=200, num_heldout_transitions=200, save_agent_every=2,
    ),
    "small": dict(diffusion_channels=(32, 32, 32, 32), diffusion_cond_dim=128, reward_channels=16,
                  reward_lstm_dim=256, actor_channels=(16, 16, 32, 32), actor_lstm_dim=256),
    "medium": dict(),  # the paper's networks: the defaults
    "large": dict(diffusion_channels=(128, 128, 128, 128), diffusion_res_blocks=3,
                  diffusion_cond_dim=512, reward_channels=64, reward_lstm_dim=1024,
                  actor_channels=(64, 64, 128, 128), actor_lstm_dim=1024),
}
# Flags spelled otherwise on the command line: --game is the seed's name for --env-id.
FLAG_ALIASES = {"--game": "env_id"}
# What a checkpoint must hold to be resumed (run_checkpoint writes them, restore_run reads them).
CHECKPOINT_KEYS = {
    "args", "epoch", "phase", "position", "global_step", "env_steps", "num_buffer_files", "models",
    "optimizers", "schedulers", "scalers", "rng", "cpu_generator", "generator", "env", "partial",
    "collect_hidden", "heldout", "epoch_log", "phase_sums", "imagination", "first_collection_steps",
}


def check_args(args: Args, world_size: int):
    """Settings that cannot work, refused at start-up in one line (before any data is read)."""
    check_arg_domains(args)
    if world_size > 1:
        raise UserError(f"diamond_atari.py runs one process per game and seed, not {world_size} "
                        "torchrun processes: run it with python (benchmark/run_atari100k.py: many)")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only needs --resume RUN_FOLDER_OR_CHECKPOINT")
    if (args.play or args.play_keys is not None) and not args.resume:  # optional: play
        raise UserError("--play needs --resume RUN_FOLDER_OR_CHECKPOINT")  # optional: play
    if args.eval_only and (args.play or args.play_keys is not None):  # optional: play
        raise UserError("--eval-only and --play are two uses of a checkpoint: give one of them")  # optional: play
    if args.eval_only and args.world_model_only:
        raise UserError("--eval-only tests an agent: a --world-model-only run has none")
    if args.diffusion_cond_dim % args.num_conditioning_steps:
        raise UserError(f"--diffusion-cond-dim {args.diffusion_cond_dim} must be divisible by "
                        f"--num-conditioning-steps {args.num_conditioning_steps}")
    if args.obs_size % 2 ** max(len(args.diffusion_channels) - 1, len(args.actor_channels), 3):
        raise UserError(f"--obs-size {args.obs_size} must be divisible by 2^{len(args.actor_channels)} "
                        f"(the max-pools) and 2^{len(args.diffusion_channels) - 1} (the U-Net levels)")
    if args.sigma_min >= args.sigma_max or args.train_sigma_min > args.train_sigma_max:
        raise UserError("need --sigma-min < --sigma-max and --train-sigma-min <= --train-sigma-max")
    if not args.initial_collection_steps <= args.max_initial_collection_steps <= args.env_step_budget:
        raise UserError(f"need --initial-collection-steps {args.initial_collection_steps} <= "
                        f"--max-initial-collection-steps {args.max_initial_collection_steps} <= "
                        f"--env-step-budget {args.env_step_budget} (the budget holds the first collection)")
    if args.dataset_dir is not None and args.num_epochs is None and args.final_epochs_without_collection < 1:
        raise UserError("--dataset-dir runs --final-epochs-without-collection epochs: give >= 1")


# --------------------------------------------------------------------------------------------------
# Data: Atari with DIAMOND's protocol, episodes as .npz files, and the replay buffer.

# (random, human) scores of the Atari 100k games, for HNS = (score - random) / (human - random).
ATARI_SCORES = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0),
    "Asterix": (210.0, 8503.3), "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5),
    "Boxing": (0.1, 12.1), "Breakout": (1.7, 30.5), "ChopperCommand": (811.0, 7387.8),
    "CrazyClimber": (10780.5, 35829.4), "DemonAttack": (152.1, 1971.0), "Freeway": (0.0, 29.6),
    "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5), "Hero": (1027.0, 30826.4),
    "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3), "MsPacman": (307.3, 6951.6), "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0), "RoadRunner": (11.5, 7845.0),
    "Seaquest": (68.4, 42054.7), "UpNDown": (533.4, 11693.2),
}


def import_gym():
    """gymnasium with ale-py's games registered and ALE's banner silenced (not its errors)."""
    import ale_py
    import gymnasium as gym

    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    gym.register_envs(ale_py)
    return gym


def canonical_env_id(env_id: str) -> tuple[str, str]:
    """Breakout-v5, ALE/Breakout-v5, BreakoutNoFrameskip-v4 -> ("Breakout", "Breakout-v5")."""
    if env_id.strip().lower() == "catch":
        return "Catch", "Catch"
    match = re.fullmatch(r"(?:ALE/)?([A-Za-z0-9]+?)(?:NoFrameskip-v4|-v5|-v4)?", env_id.strip())
    games = [id[4:-3] for id in import_gym().registry if id.startswith("ALE/") and id.endswith("-v5")]
    if match and match.group(1) in games:
        return match.group(1), f"{match.group(1)}-v5"
    spellings = sorted(f"{g}-v5" for g in games)
    close = difflib.get_close_matches(env_id.replace("ALE/", "").replace("NoFrameskip-v4", "-v5"),
                                      spellings + ["Catch"], n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"games are named like {spellings[0]}"
    raise UserError(f"unknown Atari env id {env_id!r}: {hint} (Breakout-v5, ALE/Breakout-v5 and "
                    f"BreakoutNoFrameskip-v4 name every ALE game; Catch is bsuite's Catch)")


class AtariEnv:
    """One ALE game, Atari 100k as DIAMOND: 1..noop_max no-ops after a reset, frame_skip repeats
    (the max of the last two), INTER_AREA resize; end_on_life_loss: a lost life ends the episode."""
    ignored_flags = ()  # the Args fields this environment ignores
    state_keys = ("game_over", "lives", "game_steps", "game_return")

    def __init__(self, game: str, obs_size: int = 64, frame_skip: int = 4, noop_max: int = 30,
                 sticky_actions: bool = False, max_episode_steps: int = 27_000,
                 end_on_life_loss: bool = True, generator: Optional[torch.Generator] = None,
                 seed: int = 0):
        # max_num_frames_per_episode=0: the time limit is counted here, in agent steps (our state)
        self.env = import_gym().make(f"ALE/{game}-v5", frameskip=1, full_action_space=False,
                                     repeat_action_probability=0.25 if sticky_actions else 0.0,
                                     max_num_frames_per_episode=0).unwrapped
        self.ale, self.game = self.env.ale, game
        self.num_actions = int(self.env.action_space.n)  # the minimal action set
        self.action_meanings = list(self.env.get_action_meanings())  # NOOP, FIRE, RIGHT, LEFT ...
        self.obs_size, self.frame_skip, self.noop_max = obs_size, frame_skip, noop_max
        self.max_episode_steps, self.end_on_life_loss = max_episode_steps, end_on_life_loss
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.env.reset(seed=seed)  # seeds the emulator's RNG once; later resets continue its stream
        self.game_over, self.lives, self.game_steps, self.game_return = True, 0, 0, 0.0
        self.obs = np.zeros((obs_size, obs_size, 3), dtype=np.uint8)

    def normalized_score(self, score: float) -> Optional[float]:
        """HNS = (score - random) / (human - random); None for a game without reference scores."""
        low, high = ATARI_SCORES.get(self.game, (None, None))
        return None if low is None else (score - low) / (high - low)

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        return cv2.resize(frame, (self.obs_size, self.obs_size), interpolation=cv2.INTER_AREA)

    def reset(self) -> np.ndarray:
        """A new game (with random no-ops) after a game over, else the next life of this game."""
        if self.game_over:
            frame, _ = self.env.reset()
            noops = torch.randint(1, self.noop_max + 1, (1,), generator=self.generator) if self.noop_max else 0
            for _ in range(int(noops)):
                frame, _, terminated, truncated, _ = self.env.step(0)
                if terminated or truncated:
                    frame, _ = self.env.reset()
            self.obs = self.preprocess(frame)
            self.game_over, self.lives, self.game_steps, self.game_return = False, self.ale.lives(), 0, 0.0
        return self.obs

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        """(obs, reward, terminated, truncated); self.game_over: whether the game ended."""
        reward, last_frames, game_over = 0.0, [], False
        for _ in range(self.frame_skip):
            frame, r, terminated, truncated, _ = self.env.step(action)
            reward, last_frames = reward + float(r), (last_frames + [frame])[-2:]
            game_over = terminated or truncated
            if game_over:
                break
        self.obs = self.preprocess(np.maximum(last_frames[0], last_frames[-1]))  # sprites flicker
        self.game_steps, self.game_return = self.game_steps + 1, self.game_return + reward
        life_lost, self.lives = self.ale.lives() < self.lives, self.ale.lives()
        time_out = self.game_steps >= self.max_episode_steps and not game_over
        self.game_over = game_over or time_out
        terminated = game_over or (self.end_on_life_loss and life_lost)
        return self.obs, reward, terminated, time_out and not terminated

    def state_dict(self) -> dict:
        # the emulator and its RNG (sticky actions), serialised to bytes -> a uint8 tensor
        ale_state = bytearray(self.ale.cloneState(include_rng=True).serialize())
        state = {k: getattr(self, k) for k in self.state_keys} | {"obs": torch.tensor(self.obs)}
        return state | {"ale": torch.frombuffer(ale_state, dtype=torch.uint8).clone()}

    def load_state_dict(self, state: dict):
        import ale_py

        self.ale.restoreState(ale_py.ALEState(state["ale"].numpy().tobytes()))
        for key in self.state_keys:
            setattr(self, key, state[key])
        self.obs = state["obs"].numpy().copy()


class CatchEnv:
    """bsuite's Catch (Osband et al. 2020) in RGB, AtariEnv's interface: a ball falls down a 10 x 5
    grid; the paddle moves first; at the bottom +1 if the paddle is under the ball, else -1."""
    rows, columns, moves = 10, 5, (-1, 0, 1)  # bsuite's _ACTIONS: left, no-op, right
    colours = {"cell": (40, 40, 40), "paddle": (40, 120, 255), "ball": (255, 220, 40)}
    ignored_flags = ("frame_skip", "noop_max", "sticky_actions", "max_episode_steps")
    state_keys = ("ball_row", "ball_col", "paddle_col", "game_over", "game_steps", "game_return")
    normalized_score = AtariEnv.normalized_score  # None: Catch has no reference scores

    def __init__(self, obs_size: int = 64, seed: int = 0):
        if obs_size < self.rows:
            raise UserError(f"--obs-size {obs_size} is too small for Catch: give at least {self.rows} "
                            f"(a pixel per cell of its {self.rows} rows)")
        self.game, self.obs_size, self.cell = "Catch", obs_size, obs_size // self.rows
        self.num_actions, self.action_meanings = 3, ["LEFT", "NOOP", "RIGHT"]
        self.rng = np.random.default_rng(seed)
        self.ball_row, self.ball_col, self.paddle_col = 0, 0, self.columns // 2
        self.game_over, self.game_steps, self.game_return = True, 0, 0.0
        self.obs = self.render()

    def cell_pixels(self, row: int, col: int, rows: int = 1, cols: int = 1) -> tuple[slice, slice]:
        """The frame's pixels of rows x cols cells from cell (row, col): the grid is centred."""
        top = (self.obs_size - self.rows * self.cell) // 2 + row * self.cell
        left = (self.obs_size - self.columns * self.cell) // 2 + col * self.cell
        return slice(top, top + rows * self.cell), slice(left, left + cols * self.cell)

    def render(self) -> np.ndarray:
        """uint8 (obs_size, obs_size, 3): grey cells, a blue paddle, a yellow ball."""
        frame = np.zeros((self.obs_size, self.obs_size, 3), dtype=np.uint8)
        frame[self.cell_pixels(0, 0, self.rows, self.columns)] = self.colours["cell"]
        frame[self.cell_pixels(self.rows - 1, self.paddle_col)] = self.colours["paddle"]
        frame[self.cell_pixels(self.ball_row, self.ball_col)] = self.colours["ball"]
        return frame

    def reset(self) -> np.ndarray:
        """After a game over a new game (a random ball column), else the frame."""
        if self.game_over:
            self.ball_row, self.ball_col = 0, int(self.rng.integers(self.columns))
            self.paddle_col = self.columns // 2
            self.game_over, self.game_steps, self.game_return = False, 0, 0.0
            self.obs = self.render()
        return self.obs

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        """(obs, reward, terminated, truncated): the paddle moves, then the ball falls a row."""
        self.paddle_col = min(max(self.paddle_col + self.moves[action], 0), self.columns - 1)
        self.ball_row += 1
        self.game_over = self.ball_row == self.rows - 1
        reward = (1.0 if self.paddle_col == self.ball_col else -1.0) if self.game_over else 0.0
        self.game_steps, self.game_return = self.game_steps + 1, self.game_return + reward
        self.obs = self.render()
        return self.obs, reward, self.game_over, False

    def state_dict(self) -> dict:
        # the Generator's state: PCG64's 128-bit ints as plain Python ints (weights_only loads them)
        state = {key: getattr(self, key) for key in self.state_keys}
        return state | {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        for key in self.state_keys:
            setattr(self, key, state[key])
        self.rng.bit_generator.state = state["rng"]
        self.obs = self.render()  # the frame is a function of the state


def make_env(args: Args, seed: int, generator: Optional[torch.Generator] = None,
             training: bool = True) -> Union[AtariEnv, CatchEnv]:
    """The real environment of --env-id; in training a lost life ends the episode."""
    game, _ = canonical_env_id(args.env_id)
    if game == "Catch":
        return CatchEnv(args.obs_size, seed)
    return AtariEnv(game, args.obs_size, args.frame_skip, args.noop_max, args.sticky_actions,
                    args.max_episode_steps, end_on_life_loss=training, generator=generator, seed=seed)


EPISODE_KEYS = {"obs": np.uint8, "actions": np.int64, "rewards": np.float32, "terminated": np.bool_,
                "truncated": np.bool_}


def save_episode(path: Path, episode: dict, run_dir: Optional[Path] = None):
    """One .npz per episode, written atomically; a failed write is one line naming the file."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **{key: np.asarray(episode[key], dtype=dtype) for key, dtype in EPISODE_KEYS.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        then = "" if run_dir is None else ", then " + (
            f"--resume {run_dir}" if (run_dir / "checkpoints" / "latest.pt").exists() else "start the run again")
        raise TrainingFailure(f"cannot write the episode {path} ({e.strerror or e}): free disk space or make "
                              f"the folder writable{then}") from None
    finally:  # whatever stopped the write, a second Ctrl-C too
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


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


def load_episode(path: Path, obs_size: int, num_actions: int, fix: str = "fix the file or remove it") -> dict:
    """An episode file (read_episode), its frames resized to obs_size."""
    import cv2

    episode = read_episode(path, num_actions, fix)
    if episode["obs"].shape[1:3] != (obs_size, obs_size):
        episode["obs"] = np.stack([cv2.resize(frame, (obs_size, obs_size), interpolation=cv2.INTER_AREA)
                                   for frame in episode["obs"]])
    return episode


class ReplayBuffer:
    """Finished episodes (a .npz each) and the one being collected (`partial`), sampled."""

    def __init__(self, folder: Optional[Path], recency_weights: Optional[tuple[float, ...]],
                 num_conditioning_steps: int):
        self.folder, self.recency_weights, self.num_cond = folder, recency_weights, num_conditioning_steps
        self.episodes: list[dict] = []
        self.partial: Optional[dict] = None  # the episode being collected (sampled too: the newest)

    @staticmethod
    def to_tensors(episode: dict) -> dict:
        """An episode's fields as tensors, obs (T+1, 3, H, W)."""
        tensors = {key: torch.from_numpy(np.asarray(episode[key], dtype)) for key, dtype in EPISODE_KEYS.items()}
        return dict(tensors, obs=tensors["obs"].permute(0, 3, 1, 2).contiguous())

    def add(self, episode: dict, write: bool = True):
        if write and self.folder is not None:
            save_episode(self.folder / f"episode_{len(self.episodes):06d}.npz", episode, self.folder.parent)
        self.episodes.append(self.to_tensors(episode))

    def episode(self, index: int) -> dict:
        return self.partial if index == -1 else self.episodes[index]

    def sampleable(self) -> list[int]:
        partial = self.partial is not None and len(self.partial["actions"]) > 0
        return list(range(len(self.episodes))) + [-1] * partial

    def num_transitions(self) -> int:
        return sum(len(self.episode(i)["actions"]) for i in self.sampleable())

    def episode_weights(self, ids: list[int]) -> torch.Tensor:
        """P(episode) for ids, oldest first: with k recency weights and n >= k episodes, w_s shared
        by the n // k episodes of slice s (the newest takes the n % k left); else T_i / sum T."""
        n, weights = len(ids), self.recency_weights
        if weights is None or n < len(weights):
            lengths = torch.tensor([len(self.episode(i)["actions"]) for i in ids]).double()
            return lengths / lengths.sum()
        k = len(weights)
        sizes = [n // k] * (k - 1) + [n // k + n % k]  # oldest first; the newest takes the rest
        probs = torch.tensor([w / size for w, size in zip(weights, sizes) for _ in range(size)], dtype=torch.float64)
        return probs / probs.sum()

    def sample_segments(self, batch_size: int, num_obs: int, generator: torch.Generator,
                        ids: Optional[list[int]] = None, beyond_end: bool = False) -> list[tuple[int, int]]:
        """(episode, start) of segments of L = num_obs frames around t ~ U{0..T-1}: start = min(T, t
        + 1 + U{0..L-1}) - L, or with beyond_end (reward/end) start = t - U{0..L-1}."""
        ids = self.sampleable() if ids is None else ids
        chosen = torch.multinomial(self.episode_weights(ids), batch_size, replacement=True, generator=generator)
        episodes = [ids[k] for k in chosen.tolist()]
        lengths = torch.tensor([len(self.episode(i)["actions"]) for i in episodes])
        t = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * lengths).long()  # U{0..T-1}
        offset = torch.randint(num_obs, (batch_size,), generator=generator)  # U{0..L-1}
        starts = t - offset if beyond_end else torch.minimum(lengths, t + 1 + offset) - num_obs
        return list(zip(episodes, starts.tolist()))

    def segments(self, refs: list[tuple[int, int]], num_obs: int) -> dict:
        """Segments of L frames at (episode, start): obs uint8 (B, L, 3, H, W), obs_mask (B, L)
        (frames 0..T), actions/rewards/ends and mask (B, L-1) (True: real transitions)."""
        out = {key: [] for key in ("obs", "obs_mask", "actions", "rewards", "ends", "mask")}
        for index, start in refs:
            ep = self.episode(index)
            T = len(ep["actions"])
            frames = torch.arange(start, start + num_obs)
            real_frame = (frames >= 0) & (frames <= T)
            valid, clipped = (frames[:-1] >= 0) & (frames[:-1] < T), frames[:-1].clamp(0, T - 1)
            out["obs"].append(ep["obs"][frames.clamp(0, T)] * real_frame[:, None, None, None])
            out["obs_mask"].append(real_frame)
            out["actions"].append(torch.where(valid, ep["actions"][clipped], 0))
            out["rewards"].append(torch.where(valid, ep["rewards"][clipped], 0.0))
            out["ends"].append(valid & ep["terminated"][clipped])
            out["mask"].append(valid)
        return {key: torch.stack(value) for key, value in out.items()}


def to_float(obs_uint8: torch.Tensor) -> torch.Tensor:
    return obs_uint8.float() / 127.5 - 1.0  # {0..255} -> [-1, 1]


def to_uint8(obs: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> {0..255}, rounding: to_float's exact inverse on 8-bit frames (stored, shown)."""
    return ((obs.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """The denoiser's output as an 8-bit frame, as DIAMOND: floor((x + 1) / 2 * 255)."""
    return ((x.float().clamp(-1, 1) + 1) / 2 * 255).floor() / 127.5 - 1.0


def segment_obs(batch: dict, device: torch.device) -> torch.Tensor:
    """The segments' frames on the device in [-1, 1], padding frames mid-grey (0.0) as DIAMOND's."""
    obs = to_float(batch["obs"].to(device, non_blocking=True))
    return torch.where(batch["obs_mask"].to(device)[:, :, None, None, None], obs, 0.0)


def sample_batch(buffer: ReplayBuffer, args: Args, generator: torch.Generator, device: torch.device,
                 ids: Optional[list[int]] = None, reward_end: bool = False) -> dict:
    """Segments on the device, obs in [-1, 1]: the denoiser's, or (reward_end) the reward/end's."""
    num_obs = (args.reward_segment_length if reward_end
               else args.num_conditioning_steps + 1 + args.num_autoregressive_steps)
    refs = buffer.sample_segments(args.batch_size, num_obs, generator, ids, reward_end)
    batch = buffer.segments(refs, num_obs)
    keys = ("actions", "rewards", "ends", "mask") if reward_end else ("actions", "obs_mask")
    return {"obs": segment_obs(batch, device), **{key: batch[key].to(device) for key in keys}}


# --------------------------------------------------------------------------------------------------
# EDM diffusion (Karras et al. 2022) as in DIAMOND: offset-noise preconditioning, log-normal sigmas.


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_offset_noise: float = 0.3):
    """(c_in, c_skip, c_out, c_noise) of D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM), at
    DIAMOND's sigma_eff = sqrt(sigma^2 + sigma_offset^2)."""
    sigma_eff = (sigma ** 2 + sigma_offset_noise ** 2).sqrt()
    c_in = 1 / (sigma_eff ** 2 + sigma_data ** 2).sqrt()  # unit-variance network input
    c_skip = sigma_data ** 2 / (sigma_eff ** 2 + sigma_data ** 2)
    c_out = sigma_eff * c_skip.sqrt()  # = sigma_eff sigma_data / sqrt(sigma_eff^2 + sigma_data^2)
    return c_in, c_skip, c_out, sigma_eff.log() / 4


def karras_sigmas(n: int, sigma_min: float = 2e-3, sigma_max: float = 5.0, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


# --------------------------------------------------------------------------------------------------
# Model: DIAMOND's denoiser U-Net, reward/end model, actor-critic.


def init_lstm(lstm: nn.Module):
    """Xavier input weights, orthogonal recurrent weights, zero biases but the forget gate's (1)."""
    for name, p in lstm.named_parameters():
        init = {"weight_ih": nn.init.xavier_uniform_, "weight_hh": nn.init.orthogonal_}.get(name[:9])
        (init or nn.init.zeros_)(p)
        if name.startswith("bias_ih"):  # gates are ordered input, forget, cell, output
            nn.init.ones_(p[p.shape[0] // 4: p.shape[0] // 2])


def lstm_step(x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor], weight_ih: torch.Tensor,
              weight_hh: torch.Tensor, bias_ih: torch.Tensor, bias_hh: torch.Tensor):
    """One LSTM step written out (one graph for torch.compile; nn.LSTM breaks it): gates = x W_ih^T
    + b_ih + h W_hh^T + b_hh; c' = sigmoid(f) c + sigmoid(i) tanh(g); h' = sigmoid(o) tanh(c')."""
    h, c = hidden
    i, f, g, o = (F.linear(x, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def sample_categorical(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A class per row of logits (B, K) by the inverse CDF of uniform (B,): #{j : cdf_j <= u}."""
    cdf = logits.detach().float().softmax(-1).cumsum(-1)
    return (cdf <= uniform[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of linear, convolution and LSTM layers only."""
    layers = (nn.Linear, nn.Conv2d, nn.LSTM, nn.LSTMCell)
    decay = [p for module in model.modules() if isinstance(module, layers)
             for name, p in module.named_parameters(recurse=False) if name.startswith("weight")]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 32), channels, eps=1e-5, affine=affine)  # groups of 32 channels


class FourierFeatures(nn.Module):
    """[cos(2 pi w c), sin(2 pi w c)] of the scalar noise level c, w ~ N(0, 1) fixed."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(1, dim // 2))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        # fp32 (a product, not a matmul, which autocast would run in bf16 and lose ~0.1 rad of ~20)
        angles = 2 * math.pi * c_noise[:, None].float() * self.weight.float()
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then x (1 + scale) + shift (Linear(cond))."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = group_norm(channels, affine=False)
        self.linear = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(cond)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions (head dim 8), zero-initialised output; as
    DIAMOND's code, the residual adds to the normalised input: GN(x) + proj(attention(GN(x)))."""

    def __init__(self, channels: int, head_dim: int = 8):
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = self.norm(x)
        qkv = self.qkv(x).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, heads, HW, head_dim)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    """AdaGN-SiLU-conv3x3, AdaGN-SiLU-conv3x3 (zero-init), + shortcut, optional attention."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, attention: bool = False):
        super().__init__()
        self.norm1 = AdaGroupNorm(in_channels, cond_dim)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(out_channels, cond_dim)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as (nearly) the identity
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attn = SelfAttention2d(out_channels) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, cond)))
        h = self.conv2(F.silu(self.norm2(h, cond)))
        return self.attn(self.shortcut(x) + h)


class ResBlocks(nn.Module):
    """A chain of ResBlocks; on the way up each block first concatenates one skip connection."""

    def __init__(self, in_channels: list[int], out_channels: list[int], cond_dim: int, attention: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(i, o, cond_dim, attention) for i, o in zip(in_channels, out_channels))

    def forward(self, x, cond, skips: Optional[list[torch.Tensor]] = None):
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x if skips is None else torch.cat([x, skips[i]], dim=1), cond)
            outputs.append(x)
        return x, outputs


class Resample(nn.Module):
    """A 3x3 conv with stride 2 (orthogonal init), or after a 2x nearest upsampling (up)."""

    def __init__(self, channels: int, up: bool = False):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)
        if not up:
            nn.init.orthogonal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class UNet(nn.Module):
    """DIAMOND's U-Net: per level res_blocks ResBlocks down and res_blocks + 1 up (skip concat),
    a stride-2 conv between levels, self-attention only in the 2-block middle."""

    def __init__(self, cond_dim: int, channels: tuple[int, ...], res_blocks: int):
        super().__init__()
        self.down_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(channels):
            c_prev = channels[max(0, i - 1)]
            self.down_blocks.append(ResBlocks([c_prev] + [c] * (res_blocks - 1), [c] * res_blocks, cond_dim))
            # up: each block concatenates a block output (c), the last the level's input (c_prev)
            self.up_blocks.append(ResBlocks([2 * c] * res_blocks + [c + c_prev],
                                            [c] * res_blocks + [c_prev], cond_dim))
        self.mid_blocks = ResBlocks([channels[-1]] * 2, [channels[-1]] * 2, cond_dim, attention=True)
        self.downsamples = nn.ModuleList([nn.Identity()] + [Resample(c) for c in channels[:-1]])
        self.upsamples = nn.ModuleList([nn.Identity()] + [Resample(c, True) for c in channels[-2::-1]])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        skips = []
        for downsample, blocks in zip(self.downsamples, self.down_blocks):
            x_down = downsample(x)
            x, outputs = blocks(x_down, cond)
            skips.append([x_down, *outputs])
        x, _ = self.mid_blocks(x, cond)
        for upsample, blocks, skip in zip(self.upsamples, reversed(self.up_blocks), reversed(skips)):
            x, _ = blocks(upsample(x), cond, skip[::-1])
        return x


class DenoiserNet(nn.Module):
    """F_theta(c_in x, c_noise, past frames, past actions): frames concatenated on channels; the
    actions' embeddings plus c_noise's Fourier features drive the adaptive group norms."""

    def __init__(self, num_actions: int, channels: tuple[int, ...] = (64, 64, 64, 64), res_blocks: int = 2,
                 cond_dim: int = 256, num_conditioning_steps: int = 4, img_channels: int = 3):
        super().__init__()
        self.noise_emb = FourierFeatures(cond_dim)
        self.act_emb = nn.Embedding(num_actions, cond_dim // num_conditioning_steps)
        self.cond_proj = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.conv_in = nn.Conv2d((num_conditioning_steps + 1) * img_channels, channels[0], 3, padding=1)
        self.unet = UNet(cond_dim, channels, res_blocks)
        self.norm_out = group_norm(channels[0])
        self.conv_out = nn.Conv2d(channels[0], img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, obs: torch.Tensor, act: torch.Tensor):
        cond = self.cond_proj(self.noise_emb(c_noise) + self.act_emb(act).flatten(1))
        h = self.unet(self.conv_in(torch.cat([obs, x_in], dim=1)), cond)
        return self.conv_out(F.silu(self.norm_out(h)))


class Denoiser(nn.Module):
    """D(x; sigma, past) = c_skip x + c_out F(c_in x, c_noise, past / sigma_data, actions)."""

    def __init__(self, net: DenoiserNet, sigma_data: float = 0.5, sigma_offset_noise: float = 0.3):
        super().__init__()
        self.net, self.sigma_data, self.sigma_offset_noise = net, sigma_data, sigma_offset_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, act: torch.Tensor, net=None):
        """(F's output, D(x)) of x (B, 3, H, W), sigma (B,), obs (B, 4*3, H, W), act (B, 4)."""
        c_in, c_skip, c_out, c_noise = edm_preconditioning(sigma.float(), self.sigma_data, self.sigma_offset_noise)
        c_in, c_skip, c_out = (c[:, None, None, None] for c in (c_in, c_skip, c_out))
        model_output = (self.net if net is None else net)(c_in * x, c_noise, obs / self.sigma_data, act).float()
        return model_output, c_skip * x + c_out * model_output


def denoiser_loss(denoiser: Denoiser, obs: torch.Tensor, actions: torch.Tensor, obs_mask: torch.Tensor, args: Args,
                  generator: torch.Generator, net=None) -> torch.Tensor:
    """EDM loss, mean over predictions k = 0..n on obs (B, c + 1 + n, 3, H, W): frame c + k from
    frames and actions k..c+k-1, loss_k = ||F - (x0 - c_skip x_noisy) / c_out||^2 on real targets;
    frame c + k then becomes D's 8-bit output, which prediction k + 1 sees, as in imagination."""
    c = args.num_conditioning_steps
    num_predictions = obs.shape[1] - c  # the segment length decides, as in DIAMOND
    obs, total = obs.clone(), 0.0
    b, _, ch, h, w = obs.shape

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=obs.device)

    for k in range(num_predictions):
        past, next_obs = obs[:, k: k + c].reshape(b, c * ch, h, w), obs[:, k + c]
        act, valid = actions[:, k: k + c], obs_mask[:, k + c].float()
        # ln(sigma) ~ N(loc, scale^2), clipped; x_noisy = x0 + sigma_offset n_bc + sigma n
        sigma = (args.train_sigma_loc + args.train_sigma_scale * randn(b)).exp()
        sigma = sigma.clip(args.train_sigma_min, args.train_sigma_max)
        offset_noise = args.sigma_offset_noise * randn(b, ch, 1, 1)
        noisy = next_obs + offset_noise + sigma[:, None, None, None] * randn(b, ch, h, w)
        _, c_skip, c_out, _ = edm_preconditioning(sigma, args.sigma_data, args.sigma_offset_noise)
        target = (next_obs - c_skip[:, None, None, None] * noisy) / c_out[:, None, None, None]
        model_output, denoised = denoiser(noisy, sigma, past, act, net)
        per_sample = ((model_output - target) ** 2).mean(dim=(1, 2, 3))
        # the mean over the real targets' pixels (0, not NaN, if a batch has none)
        total = total + (per_sample * valid).sum() / valid.sum().clamp(min=1)
        if k + 1 < num_predictions:  # the next prediction sees an 8-bit frame, as in sampling
            obs[:, k + c] = quantize_8bit(denoised.detach())
    return total / num_predictions


class RewardEndModel(nn.Module):
    """Reward sign (-1, 0, +1) and end (0, 1) logits of transitions (obs_t, a_t, obs_t+1): a conv
    encoder of action-conditioned ResBlocks (64 -> 8 pixels), an LSTM over time, an MLP head."""

    def __init__(self, num_actions: int, obs_size: int = 64, channels: int = 32,
                 cond_dim: int = 128, lstm_dim: int = 512, img_channels: int = 3):
        super().__init__()
        self.act_emb = nn.Embedding(num_actions, cond_dim)
        self.conv_in = nn.Conv2d(2 * img_channels, channels, 3, padding=1)
        # 4 stages of 2 ResBlocks, 3 downsamples between them, then 2 ResBlocks with attention
        self.stages = nn.ModuleList(ResBlocks([channels] * 2, [channels] * 2, cond_dim) for _ in range(4))
        self.downsamples = nn.ModuleList(Resample(channels) for _ in range(3))
        self.mid_blocks = ResBlocks([channels] * 2, [channels] * 2, cond_dim, attention=True)
        self.lstm = nn.LSTM(channels * (obs_size // 8) ** 2, lstm_dim, batch_first=True)
        self.head = nn.Sequential(nn.Linear(lstm_dim, lstm_dim), nn.SiLU(), nn.Linear(lstm_dim, 3 + 2, bias=False))
        init_lstm(self.lstm)

    def encode(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """obs, next_obs (B, T, 3, H, W), act (B, T) -> LSTM inputs (B, T, C (H/8)^2)."""
        b, t = act.shape
        cond = self.act_emb(act.reshape(b * t))
        x = self.conv_in(torch.cat([obs, next_obs], dim=2).flatten(0, 1))
        for stage, downsample in zip(self.stages, self.downsamples):  # the last stage has none
            x = downsample(stage(x, cond)[0])
        x, _ = self.mid_blocks(self.stages[-1](x, cond)[0], cond)
        return x.reshape(b, t, -1)

    def forward(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor, hidden=None):
        """obs, next_obs (B, T, 3, H, W), act (B, T) -> reward, end logits (B, T, 3 | 2), state."""
        x, hidden = self.lstm(self.encode(obs, act, next_obs), hidden)
        logits = self.head(x)
        return logits[..., :3], logits[..., 3:], hidden

    def step(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor, hidden):
        """forward of one transition (B, 3, H, W), act (B,), the LSTM step written out."""
        x, lstm = self.encode(obs[:, None], act[:, None], next_obs[:, None])[:, 0], self.lstm
        h, c = lstm_step(x, (hidden[0][0], hidden[1][0]), lstm.weight_ih_l0, lstm.weight_hh_l0,
                         lstm.bias_ih_l0, lstm.bias_hh_l0)
        logits = self.head(h)
        return logits[:, :3], logits[:, 3:], (h[None], c[None])


def reward_end_loss(reward_end_model: RewardEndModel, batch: dict) -> torch.Tensor:
    """CE(reward sign + 1) + CE(end) over the segments' real transitions, the LSTM from zeros."""
    obs, mask = batch["obs"], batch["mask"]
    reward_logits, end_logits, _ = reward_end_model(obs[:, :-1], batch["actions"], obs[:, 1:])
    reward_class = batch["rewards"].sign().long() + 1  # -1, 0, +1 -> classes 0, 1, 2
    return (F.cross_entropy(reward_logits[mask].float(), reward_class[mask])
            + F.cross_entropy(end_logits[mask].float(), batch["ends"].long()[mask]))


class SmallResBlock(nn.Module):
    """GN-SiLU-conv3x3 with a (projected) identity shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.f = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.f(x)


class ActorCritic(nn.Module):
    """A conv, per stage a SmallResBlock and a 2x2 max-pool (64 -> 4 pixels), an LSTM cell, and
    zero-initialised policy and value heads (the initial policy is uniform)."""

    def __init__(self, num_actions: int, obs_size: int = 64, channels: tuple[int, ...] = (32, 32, 64, 64),
                 lstm_dim: int = 512, img_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(img_channels, channels[0], 3, padding=1)]
        for c_prev, c in zip((channels[0],) + tuple(channels[:-1]), channels):
            layers += [SmallResBlock(c_prev, c), nn.MaxPool2d(2)]
        self.encoder = nn.Sequential(*layers)
        self.lstm = nn.LSTMCell(channels[-1] * (obs_size // 2 ** len(channels)) ** 2, lstm_dim)
        self.actor_linear, self.critic_linear = nn.Linear(lstm_dim, num_actions), nn.Linear(lstm_dim, 1)
        for p in (*self.actor_linear.parameters(), *self.critic_linear.parameters()):
            nn.init.zeros_(p)
        init_lstm(self.lstm)

    def forward(self, obs: torch.Tensor, hidden=None):
        """obs (B, 3, H, W), state (hx, cx) or None (zeros) -> logits (B, A), value (B,), state."""
        x, lstm = self.encoder(obs).flatten(1), self.lstm
        if hidden is None:
            hidden = (x.new_zeros(len(x), lstm.hidden_size),) * 2
        hx, cx = lstm_step(x, hidden, lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh)
        return self.actor_linear(hx), self.critic_linear(hx).squeeze(-1), (hx, cx)


def build_models(args: Args, num_actions: int) -> tuple[Denoiser, RewardEndModel, ActorCritic]:
    net = DenoiserNet(num_actions, args.diffusion_channels, args.diffusion_res_blocks,
                      args.diffusion_cond_dim, args.num_conditioning_steps)
    return (Denoiser(net, args.sigma_data, args.sigma_offset_noise),
            RewardEndModel(num_actions, args.obs_size, args.reward_channels, args.reward_cond_dim,
                           args.reward_lstm_dim),
            ActorCritic(num_actions, args.obs_size, args.actor_channels, args.actor_lstm_dim))


def lambda_returns(rewards: torch.Tensor, ends: torch.Tensor, truncs: torch.Tensor,
                   bootstrap: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """DIAMOND's compute_lambda_returns on sign-clipped rewards, (B, H) each; bootstrap[:, t] =
    V'_t, the value of the frame after step t: Lambda_t = sign(r_t) + gamma (1 - end_t) [trunc_t
    V'_t + (1 - trunc_t) ((1 - lambda) V'_t + lambda Lambda_t+1)], Lambda_H = V'_(H-1)."""
    rewards, not_end, truncs = rewards.sign(), 1.0 - ends.float(), truncs.float()
    returns, next_return = torch.empty_like(rewards), bootstrap[:, -1]
    for t in reversed(range(rewards.shape[1])):
        v = bootstrap[:, t]
        continued = (1 - lam) * v + lam * next_return
        next_return = rewards[:, t] + gamma * not_end[:, t] * (truncs[:, t] * v + (1 - truncs[:, t]) * continued)
        returns[:, t] = next_return
    return returns


# --------------------------------------------------------------------------------------------------
# Samplers: Euler (DIAMOND) or Heun over the Karras sigmas, and the imagination step.


@torch.no_grad()
def euler_sample(denoise_fn: Callable, x_T: torch.Tensor, sigmas: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Integrates dx/dsigma = (x - D(x; sigma)) / sigma over the sigmas (ending with 0), D =
    denoise_fn(x, sigma (B,)). order 1: Euler; 2: Heun but on the last step."""
    x, sigmas = x_T, [float(sigma) for sigma in sigmas]
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        sigma_batch = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
        d = (x - denoise_fn(x, sigma_batch)) / sigma
        x_next = x + d * (sigma_next - sigma)
        if order == 2 and sigma_next > 0:  # Heun: average the slopes at both ends of the step
            d_next = (x_next - denoise_fn(x_next, torch.full_like(sigma_batch, sigma_next))) / sigma_next
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
        x = x_next
    return x


def generate_next_obs(denoiser: Denoiser, obs: torch.Tensor, act: torch.Tensor, args: Args,
                      generator: Optional[torch.Generator] = None, net=None,
                      autocast=contextlib.nullcontext(), noise: Optional[torch.Tensor] = None,
                      sigmas: Optional[list[float]] = None, raw: Optional[list] = None) -> torch.Tensor:
    """The next frame (B, 3, H, W) from frames (B, c, 3, H, W), actions (B, c) and noise (default:
    from generator); raw, if given, collects each D(x; sigma) before 8-bit quantisation."""
    if sigmas is None:
        sigmas = karras_sigmas(args.num_sampling_steps, args.sigma_min, args.sigma_max, args.rho).tolist()
    if noise is None:
        noise = torch.randn(obs[:, -1].shape, generator=generator, device=obs.device)
    raw = [] if raw is None else raw

    def denoise_fn(x, sigma):
        with autocast:
            raw.append(denoiser(x, sigma, obs.flatten(1, 2), act, net)[1])
        return quantize_8bit(raw[-1])

    x_T = sigmas[0] * noise if args.edm_initial_noise else noise  # DIAMOND's x_T ~ N(0, I)
    return euler_sample(denoise_fn, x_T, sigmas, order=2 if args.sampler == "heun" else 1).clamp(-1, 1)


class WorldModelEnv:
    """DIAMOND's imagined envs: started from real segments, going on across actor-critic updates."""

    def __init__(self, denoiser: Denoiser, reward_end_model: RewardEndModel, buffer: ReplayBuffer,
                 args: Args, device: torch.device, generator: torch.Generator,
                 cpu_generator: torch.Generator, net=None, autocast=contextlib.nullcontext(),
                 ids: Optional[list[int]] = None):
        self.denoiser, self.reward_end_model, self.buffer, self.args = denoiser, reward_end_model, buffer, args
        self.ids = ids  # episodes imagination starts from (None: all; --dataset-dir holds some out)
        self.device, self.generator, self.cpu_generator = device, generator, cpu_generator
        self.net, self.autocast = net, autocast
        self.load_state_dict({})  # no imagined episodes until the first rollout

    @torch.no_grad()
    def start(self, num_envs: int, refs: Optional[list[tuple[int, int]]] = None):
        """Real segments (sampled, or refs): frames (n, c, 3, H, W), actions (n, c), LSTM state."""
        c = self.args.num_conditioning_steps
        refs = self.buffer.sample_segments(num_envs, c, self.cpu_generator, self.ids) if refs is None else refs
        batch = self.buffer.segments(refs, c)
        obs, actions = segment_obs(batch, self.device), batch["actions"].to(self.device)
        with self.autocast:
            _, _, hidden = self.reward_end_model(obs[:, :-1], actions, obs[:, 1:])
        act = torch.cat([actions, torch.zeros_like(actions[:, :1])], dim=1)
        return obs, act, tuple(h.float() for h in hidden)  # LSTM states stay fp32 between steps

    def state_dict(self) -> dict:
        if self.obs is None:
            return {}
        copy = lambda x: x.detach().cpu().clone()  # noqa: E731 - a step changes act, age in place
        return {"obs": copy(self.obs), "act": copy(self.act), "hidden": [copy(h) for h in self.hidden],
                "age": copy(self.age), "actor_hidden": [copy(h) for h in self.actor_hidden]}

    def load_state_dict(self, state: dict):
        self.obs = self.act = self.hidden = self.age = self.actor_hidden = None
        if state:
            self.obs, self.act, self.age = (state[key].to(self.device) for key in ("obs", "act", "age"))
            self.hidden, self.actor_hidden = (tuple(h.to(self.device).float() for h in state[key])
                                              for key in ("hidden", "actor_hidden"))


def actor_burn_in(actor_critic: ActorCritic, frames: torch.Tensor, autocast=contextlib.nullcontext()):
    """The actor-critic's LSTM state after frames (n, k, 3, H, W), from zero, no gradients."""
    hidden = None
    with torch.no_grad(), autocast:
        for k in range(frames.shape[1]):
            _, _, hidden = actor_critic(frames[:, k], hidden)
    return tuple(h.float() for h in hidden)


def actor_critic_loss(actor_critic: ActorCritic, wm_env: WorldModelEnv, args: Args,
                      generator: torch.Generator, autocast=contextlib.nullcontext(),
                      graphs: Optional["ImaginationGraphs"] = None):
    """On backup_every more imagined steps: V's MSE to lambda-returns, REINFORCE, entropy bonus."""
    graphs = graphs or ImaginationGraphs(wm_env, actor_critic, args, wm_env.device,
                                         autocast=autocast, eager=True)
    rollout = graphs.rollout(generator)
    logits, values, rewards, ends = (rollout[k] for k in ("logits", "values", "rewards", "ends"))
    with torch.no_grad():
        returns = lambda_returns(rewards, ends, rollout["truncs"], rollout["bootstrap"],
                                 args.discount_factor, args.td_lambda)
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    advantage = (returns - values).detach()
    actor_loss = -(log_probs.gather(-1, rollout["actions"][..., None])[..., 0] * advantage).mean()
    critic_loss = F.mse_loss(values, returns)
    loss = actor_loss + critic_loss - args.entropy_weight * entropy
    return loss, {"actor": actor_loss.detach(), "critic": critic_loss.detach(), "entropy": entropy.detach(),
                  "imagined_reward": rewards.mean(), "imagined_end": ends.mean()}


class ImaginationGraphs:
    """The policy and world-model steps, compiled (backend) or not; `eager` (the reference's)
    restarts a stopped env from a fresh real segment (a host sync), compiled from a pool."""

    def __init__(self, wm_env: WorldModelEnv, actor_critic: ActorCritic, args: Args,
                 device: torch.device, amp_dtype: Optional[torch.dtype] = None,
                 backend: Union[str, Callable, None] = None, mode: Optional[str] = None,
                 stop=None, autocast=None, eager: bool = False):
        self.wm_env, self.actor_critic, self.args, self.device = wm_env, actor_critic, args, device
        self.amp_dtype = amp_dtype  # bf16/fp16 autocast entered inside the graphs; None: float32
        self.autocast, self.eager, self.net = autocast, eager, wm_env.net if eager else None
        self.sigmas = karras_sigmas(args.num_sampling_steps, args.sigma_min, args.sigma_max, args.rho).tolist()
        self.backend, self.mode, self.stop = backend, mode, stop  # stop: the run's StopFlag
        self.policy, self.world_model, self.calls = self.policy_step, self.world_model_step, 0
        if backend is not None:  # lstm_step reads LSTM weights, which dynamo refuses by default
            torch._dynamo.config.allow_rnn = True
            self.policy, self.world_model = (
                torch.compile(fn, backend=backend, mode=mode, dynamic=False)
                for fn in (self.policy_step, self.world_model_step))

    def amp(self):
        """The autocast given, or one made where it is entered (in a compiled function)."""
        if self.autocast is None and self.amp_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.amp_dtype)
        return self.autocast or contextlib.nullcontext()

    def policy_step(self, obs, hidden, stopped, start_hidden, final_value, uniform):
        """The actor-critic on frames obs (n, 3, H, W), restarted envs taking start_hidden: logits,
        value, action, bootstrap V'_(t-1) (V(s_t) or V(final frame)), the state used, the next."""
        hidden = tuple(torch.where(stopped[:, None], s, h) for s, h in zip(start_hidden, hidden))
        with self.amp():
            logits, value, new_hidden = self.actor_critic(obs, hidden)
        action = sample_categorical(logits, uniform)
        bootstrap = torch.where(stopped, final_value, value.detach().float())
        return logits.float(), value.float(), action, bootstrap, hidden, new_hidden

    @torch.no_grad()
    def world_model_step(self, obs, act, hidden, age, action, actor_hidden, noise, uniforms, start):
        """Every imagined env stepped by action, noise, uniforms (2, n), stopped ones restarted
        from the pool `start` (or None): next state, reward sign, end, V(final frame), checks."""
        act, raw, env = torch.cat([act[:, :-1], action[:, None]], dim=1), [], self.wm_env
        with self.amp():
            next_obs = generate_next_obs(env.denoiser, obs, act, self.args, net=self.net,
                                         noise=noise, sigmas=self.sigmas, raw=raw)
            reward_logits, end_logits, hidden = env.reward_end_model.step(obs[:, -1], action,
                                                                          next_obs, hidden)
            _, final_value, _ = self.actor_critic(next_obs, actor_hidden)  # V(final frame), if it stops
        reward = sample_categorical(reward_logits, uniforms[0]) - 1
        end = sample_categorical(end_logits, uniforms[1])
        age = age + 1
        truncated = (age >= self.args.imagination_horizon) & (end == 0)  # the horizon, unless it ended
        stopped = (end == 1) | truncated
        obs, act = torch.cat([obs[:, 1:], next_obs[:, None]], 1), torch.cat([act[:, 1:], 0 * act[:, :1]], 1)
        hidden = tuple(h.float() for h in hidden)
        if start is not None:  # the envs that stopped take their slot of the pool (fixed shapes)
            obs = torch.where(stopped[:, None, None, None, None], start[0], obs)
            act = torch.where(stopped[:, None], start[1], act)
            hidden = tuple(torch.where(stopped[None, :, None], s, h) for s, h in zip(start[2], hidden))
            age = torch.where(stopped, 0, age)
        return {"obs": obs, "act": act, "hidden": hidden, "age": age, "reward": reward.float(),
                "end": end.float(), "truncated": truncated.float(), "stopped": stopped,
                "final_value": final_value.float(), "next_obs": next_obs,
                "denoised": torch.stack(raw).float(), "reward_logits": reward_logits.float(),
                "end_logits": end_logits.float()}

    def rollout(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """_rollout; compiled, a failed compilation is one line, a signal during it a stop."""
        if self.backend is None:
            return self._rollout(generator)
        busy = self.calls == 0 and "compiling the imagination step (" + (
            "up to 20 minutes on a CPU)" if self.device.type == "cpu" else "minutes)")
        with compile_failures(self.stop, "the imagination graphs", "with --imagination-graphs off",
                              busy):
            return self._rollout(generator)

    def _rollout(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """backup_every more imagined steps: logits (n, H, A), values (n, H), the rest (n, H)."""
        args, env, n = self.args, self.wm_env, self.args.num_imagined_envs
        if env.obs is None:  # the first update: start the imagined episodes
            env.obs, env.act, env.hidden = env.start(n)
            env.age = torch.zeros(n, dtype=torch.long, device=self.device)
            env.actor_hidden = actor_burn_in(self.actor_critic, env.obs[:, :-1], self.amp())
        actor_hidden = tuple(h.detach().float() for h in env.actor_hidden)
        start, start_actor_hidden = None, actor_hidden  # eager: set at each restart
        if not self.eager:  # the restart pool, burnt in with the weights of this rollout
            start = env.start(n)
            start_actor_hidden = actor_burn_in(self.actor_critic, start[0][:, :-1], self.amp())
        # every random number of the rollout, drawn first: noise, uniforms of action, reward, end
        device, steps = self.device, args.backup_every
        noise = torch.randn((steps, *env.obs[:, -1].shape), generator=generator, device=device)
        uniforms = torch.rand((steps, 3, n), generator=generator, device=device)
        if device.type == "cuda":  # a new rollout: the graphs may reuse the last outputs' memory
            torch.compiler.cudagraph_mark_step_begin()
        obs, act, hidden, age = env.obs, env.act, env.hidden, env.age
        stopped = torch.zeros(n, dtype=torch.bool, device=device)
        final_value = torch.zeros(n, device=device)
        out = {key: [] for key in ("logits", "values", "bootstrap", "actions", "rewards", "ends", "truncs")}
        for t in range(steps):
            # step 0 (its LSTM state detached) runs uncompiled, as does the final value (no
            # gradient): the compiled policy step sees one grad mode and requires_grad pattern
            policy = self.policy if t > 0 else self.policy_step
            logits, value, action, bootstrap, _, actor_hidden = policy(
                obs[:, -1], actor_hidden, stopped, start_actor_hidden, final_value, uniforms[t, 0])
            step = self.world_model(obs, act, hidden, age, action, tuple(h.detach() for h in actor_hidden),
                                    noise[t], uniforms[t, 1:], start)
            self.calls += 1 + (t > 0)
            obs, act, hidden, age = step["obs"], step["act"], step["hidden"], step["age"]
            stopped, final_value = step["stopped"], step["final_value"]
            if self.eager and stopped.any():  # a host sync, as DIAMOND's: fresh real segments
                index = stopped.nonzero()[:, 0]
                fresh_obs, fresh_act, fresh_hidden = env.start(len(index))
                fresh_actor = actor_burn_in(self.actor_critic, fresh_obs[:, :-1], self.amp())
                obs, act = obs.index_copy(0, index, fresh_obs), act.index_copy(0, index, fresh_act)
                age = age.index_fill(0, index, 0)
                hidden = tuple(h.index_copy(1, index, f) for h, f in zip(hidden, fresh_hidden))
                start_actor_hidden = tuple(h.detach().float().index_copy(0, index, f)
                                           for h, f in zip(actor_hidden, fresh_actor))
            # copies: the next replay of the graphs may write over their outputs
            for key, value_t in zip(out, (logits, value, bootstrap, action, step["reward"],
                                          step["end"], step["truncated"])):
                out[key].append(value_t.clone())
        with torch.no_grad():  # V(s_H), without stepping the kept LSTM state
            _, _, _, bootstrap, actor_hidden, _ = self.policy_step(
                obs[:, -1], actor_hidden, stopped, start_actor_hidden, final_value, uniforms[0, 0])
        out["bootstrap"] = out["bootstrap"][1:] + [bootstrap.clone()]  # V'_t, the value after step t
        # the persistent state leaves the graphs' memory: a later replay may overwrite their outputs
        env.obs, env.act, env.age = obs.clone(), act.clone(), age.clone()
        env.hidden = tuple(h.float().clone() for h in hidden)
        env.actor_hidden = tuple(h.detach().clone() for h in actor_hidden)
        return {key: torch.stack(value, 1) for key, value in out.items()}


@contextlib.contextmanager
def compile_failures(stop, what: str, fix: str, busy: str = ""):
    """torch.compile's failures inside as one line naming `what` and the fix, or after a signal a
    stop; other errors keep their traceback. busy: what must end before a signal stops the run."""
    if busy and stop is not None:
        stop.busy = busy
    try:
        yield
    except (StopRequested, TrainingFailure):
        raise
    except Exception as e:
        if stop is not None and stop.requested:
            raise StopRequested() from None
        if not (isinstance(e, (ImportError, OSError))
                or type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))):
            raise
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "the folder torchinductor_<user> in the temp folder")
        last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
        raise TrainingFailure(f"compiling {what} failed ({type(e).__name__}: {last}); rerun {fix}, or delete "
                              f"torch's compile cache ({cache}) if a stopped compilation left it broken") from None
    finally:
        if busy and stop is not None:
            stop.busy = ""


def imagination_graphs(args: Args, setup, wm_env: WorldModelEnv, actor_critic: ActorCritic,
                       stop=None) -> Optional[ImaginationGraphs]:
    """The compiled imagination step (CUDA graphs on CUDA) of --imagination-graphs; None: eager."""
    if args.world_model_only or args.imagination_graphs == "off" or (
            args.imagination_graphs == "auto" and not setup.use_cuda):
        return None
    amp_dtype = getattr(torch, args.dtype) if setup.use_cuda and args.dtype != "float32" else None
    return ImaginationGraphs(wm_env, actor_critic, args, setup.device, amp_dtype, COMPILE_BACKEND,
                             "reduce-overhead" if setup.use_cuda else None, stop)


# --------------------------------------------------------------------------------------------------
# Schedules: Atari 100k's env-step budget, the learning-rate warmup.


def collection_schedule(first_collection_steps: int, env_step_budget: int = 100_000,
                        steps_per_epoch: int = 100, final_epochs: int = 50) -> list[int]:
    """Env steps collected in epoch e (item e - 1) as DIAMOND spends the budget: N plus
    steps_per_epoch, steps_per_epoch until it is spent, final_epochs of 0 (N = 5000: 950 + 50)."""
    remaining = env_step_budget - first_collection_steps
    collecting_epochs = max(1, math.ceil(remaining / steps_per_epoch))  # epoch 1 always collects (the first N)
    steps = [min(steps_per_epoch, remaining - steps_per_epoch * e) for e in range(collecting_epochs)]
    steps[0] += first_collection_steps
    return steps + [0] * final_epochs


def run_schedule(args: Args, first_collection_steps: int = 0) -> list[int]:
    """Env steps collected in each epoch of this run (N: initial_collection_steps until epoch 1
    decides it); --num-epochs cuts or extends it (never beyond the budget)."""
    if args.dataset_dir is not None:
        steps = [0] * args.final_epochs_without_collection
    else:
        steps = collection_schedule(first_collection_steps or args.initial_collection_steps,
                                    args.env_step_budget, args.collection_steps_per_epoch,
                                    args.final_epochs_without_collection)
    if args.num_epochs is not None:
        steps = (steps + [0] * args.num_epochs)[: args.num_epochs]
    return steps


def lr_warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup from 0, as DIAMOND's reference: lr_s = lr * min(1, s / warmup_steps)."""
    return 1.0 if step >= warmup_steps else step / warmup_steps


# --------------------------------------------------------------------------------------------------
# Evaluation: test episodes, the human-normalised score, world-model metrics, rollout videos.


def score_agent(args: Args, actor_critic: ActorCritic, env: Union[AtariEnv, CatchEnv], device, autocast,
                stop, what: str, run_dir: Path, step: int, writer=None):
    """The paper's score: --test-episodes full games, printed and logged as eval/test_* into the
    run's writer, or (--eval-only: no writer) as eval/eval_only_* by a writer of its own."""
    try:
        returns = run_test_episodes(actor_critic, args, args.test_episodes, args.seed * 7919 + 1_000_003,
                                    device, autocast, check=stop.check)
    except StopRequested:
        return print(f"stopped by signal during the {what}; nothing was logged (play them with "
                     f"--resume {run_dir} --eval-only)", flush=True)
    mean, std = float(np.mean(returns)), np.std(returns)
    score, line = env.normalized_score(mean), f"{what}: mean return {mean:.2f} (std {std:.2f})"
    if score is None:
        line += f" ({env.game} has no random/human reference scores here: raw score only)"
    else:
        low, high = ATARI_SCORES[env.game]
        line += f"; human-normalised score {score:.3f} = ({mean:.2f} - random {low}) / (human {high} - random {low})"
    catch = f"; catch rate {(mean + 1) / 2:.3f} (random 0.2)" if env.game == "Catch" else ""  # returns: +1, -1
    print(line + catch, flush=True)
    from torch.utils.tensorboard import SummaryWriter

    kind, values = "eval_only" if writer is None else "test", (len(returns), mean, score)
    with SummaryWriter(str(run_dir)) if writer is None else contextlib.nullcontext(writer) as tensorboard:
        for key, value in zip(("num_episodes", "episodic_return", "human_normalized_score"), values):
            if value is not None:
                tensorboard.add_scalar(f"eval/{kind}_{key}", value, step)


@torch.no_grad()
def run_test_episodes(actor_critic: ActorCritic, args: Args, num_episodes: int, seed: int,
                      device: torch.device, autocast=contextlib.nullcontext(), max_parallel: int = 16,
                      check: Callable = lambda: None, record: Optional[list] = None) -> list[float]:
    """Returns of full games (epsilon 0, no life-loss ends) seeded by `seed` alone; check() before
    each env is made and each step; the episodes appended to record."""
    generator, returns = torch.Generator().manual_seed(seed), []
    while len(returns) < num_episodes:
        envs = []
        for i in range(min(max_parallel, num_episodes - len(returns))):
            check()
            envs.append(make_env(args, seed * 1000 + len(returns) + i, generator, training=False))
        episodes = [new_episode(env.reset()) for env in envs]
        hidden, active = None, list(range(len(envs)))
        while active:
            check()
            obs = np.stack([episodes[i]["obs"][-1] for i in active])
            with autocast:
                logits, _, hidden = actor_critic(to_float(torch.from_numpy(obs).permute(0, 3, 1, 2).to(device)), hidden)
            actions = torch.multinomial(logits.float().softmax(-1).cpu(), 1, generator=generator)[:, 0].tolist()
            still = [row for row, (i, action) in enumerate(zip(active, actions))
                     if not add_step(episodes[i], action, *envs[i].step(action))]
            if len(still) < len(active):
                hidden = tuple(h[torch.tensor(still, dtype=torch.long, device=device)] for h in hidden)
                active = [active[row] for row in still]
        returns += [env.game_return for env in envs]
        if record is not None:
            record += [{key: np.asarray(value) for key, value in episode.items()} for episode in episodes]
    return returns


@torch.no_grad()
def test_set_losses(denoiser: Denoiser, reward_end_model: RewardEndModel, buffer: ReplayBuffer,
                    ids: list[int], args: Args, device: torch.device, seed: int, net=None,
                    autocast=contextlib.nullcontext()) -> dict:
    """DIAMOND's test losses: each held-out frame a denoiser target, each transition a reward/end one."""
    generator, losses = torch.Generator(device=device).manual_seed(seed), {}
    c, length, k = args.num_conditioning_steps, args.reward_segment_length, 1 + args.num_autoregressive_steps
    # denoiser segments start at 1 - c, 1 - c + k, ... (targets 1..T); reward/end segments share
    # their boundary frame (transitions 0..L-2, L-1..2L-3, ...)
    for name, first, stride, num_obs in (("denoiser", 1 - c, k, c + k), ("reward_end", 0, length - 1, length)):
        refs = [(i, s) for i in ids for s in range(first, len(buffer.episode(i)["actions"]) + first, stride)]
        total = 0.0
        for chunk in (refs[j: j + args.batch_size] for j in range(0, len(refs), args.batch_size)):
            batch = {key: value.to(device) for key, value in buffer.segments(chunk, num_obs).items()}
            obs = segment_obs(batch, device)
            with autocast:
                loss = (denoiser_loss(denoiser, obs, batch["actions"], batch["obs_mask"], args, generator, net)
                        if name == "denoiser" else reward_end_loss(reward_end_model, {**batch, "obs": obs}))
            total += float(loss) * len(chunk)
        losses[f"{name}_test_loss"] = total / max(len(refs), 1)
    return losses


REWARD_END_CLASSES = ("reward_neg", "reward_zero", "reward_pos", "end")  # world_model_metrics counts


@torch.no_grad()
def world_model_metrics(denoiser: Denoiser, reward_end_model: RewardEndModel, buffer: ReplayBuffer,
                        refs: list[tuple[int, int]], args: Args, device: torch.device, seed: int,
                        net=None, autocast=contextlib.nullcontext()) -> dict:
    """On real transitions (episode, t): the sampled next frame's MSE beside copying the last
    frame, on all and on changed pixels; reward and end accuracy; each class's counts."""
    c, n = args.num_conditioning_steps, len(refs)
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = [0.0] * 6  # the sample's and the last frame's squared errors, all and changed; pixels
    counts = torch.zeros(len(REWARD_END_CLASSES), 3, dtype=torch.long)
    for first in range(0, n, 64):
        batch = buffer.segments([(e, t - (c - 1)) for e, t in refs[first: first + 64]], c + 1)
        obs, actions = segment_obs(batch, device), batch["actions"].to(device)  # (B, c + 1, 3, H, W)
        predicted = generate_next_obs(denoiser, obs[:, :-1], actions, args, generator, net, autocast)
        target, last, predicted = (obs[:, -1] + 1) / 2, (obs[:, -2] + 1) / 2, (predicted + 1) / 2
        changed = ((target - last).abs().amax(dim=1, keepdim=True) > 0).float().expand_as(target)
        mse, copy_error = (predicted - target) ** 2, (last - target) ** 2
        sums = [total + float(x) for total, x in zip(sums, (mse.sum(), copy_error.sum(), (mse * changed).sum(), (
            copy_error * changed).sum(), changed.sum(), target.numel()))]
        with autocast:
            reward_logits, end_logits, _ = reward_end_model(obs[:, :-1], actions, obs[:, 1:])
        # per class (signs -1, 0, +1, the end): predicted == actual == class, predicted, actual
        guess = torch.cat([F.one_hot(reward_logits[:, -1].argmax(-1).cpu(), 3),
                           end_logits[:, -1].argmax(-1).cpu()[:, None]], 1).bool()
        actual = torch.cat([F.one_hot(batch["rewards"][:, -1].sign().long() + 1, 3),
                            batch["ends"][:, -1, None].long()], 1).bool()
        counts += torch.stack([guess & actual, guess, actual], -1).sum(0)
    mse, copy_error, mse_changed, copy_changed, changed, pixels = sums
    hits, predicted, actual = counts.T.tolist()  # the end's TN: n - predicted - actual + hits
    return {"next_frame_mse": mse / pixels, "copy_last_frame_mse": copy_error / pixels,
            "next_frame_mse_changed": mse_changed / max(changed, 1.0),
            "copy_last_frame_mse_changed": copy_changed / max(changed, 1.0), "changed_pixel_fraction": changed / pixels,
            "reward_accuracy": sum(hits[:3]) / n, "end_accuracy": (n - predicted[3] - actual[3] + 2 * hits[3]) / n,
            "counts": dict(zip(REWARD_END_CLASSES, counts.tolist()))}


def add_to_pools(pools: dict, counts: dict[str, list[int]]):
    """Each class's (hits, predicted, actual), as world_model_metrics counts them, added to the
    pools: {"recall": {class: [hits, actual]}, "precision": {class: [hits, predicted]}}."""
    for name, (hits, predicted, actual) in counts.items():
        for kind, total in (("recall", actual), ("precision", predicted)):
            pools[kind][name] = [pools[kind][name][0] + hits, pools[kind][name][1] + total]


def take_pooled(pools: dict, min_count: int = 20) -> dict[str, float]:
    """The pools of min_count examples or more as values by tag (world_model/reward_recall_pos ...),
    those emptied: no value rests on fewer."""
    values = {}
    for kind, pool in pools.items():
        for name, (hits, total) in pool.items():
            if total >= min_count:
                what, _, sign = name.partition("_")
                values[f"world_model/{what}_{kind}" + (f"_{sign}" if sign else "")] = hits / total
                pool[name] = [0, 0]
    return values


@torch.no_grad()
def imagined_and_real_returns(graphs: ImaginationGraphs, starts: list[tuple[int, int, dict]],
                              env: Union[AtariEnv, CatchEnv], args: Args, seed: int,
                              check: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Mean sums of reward signs over the horizon from K starts (Collector.fork_starts) in the world
    model and the real game forked there, same actor state, actions, uniforms: what imagination exploits."""
    c, horizon, device, k = args.num_conditioning_steps, args.imagination_horizon, graphs.device, len(starts)
    num_episodes = len(graphs.wm_env.buffer.episodes)
    start = graphs.wm_env.start(k, [(e if e < num_episodes else -1, t - (c - 1)) for e, t, _ in starts])
    start_hidden = actor_burn_in(graphs.actor_critic, start[0][:, :-1], graphs.amp())
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((horizon, k, 3, args.obs_size, args.obs_size), generator=generator).to(device)
    uniforms = torch.rand((horizon, 3, k), generator=generator).to(device)  # action, reward, end
    no_restart, no_value = torch.zeros(k, dtype=torch.bool, device=device), torch.zeros(k, device=device)

    def policy(frames, actor_hidden, t):  # step t's action, the actor's state stepped on the frames
        _, _, action, _, _, actor_hidden = graphs.policy_step(frames, actor_hidden, no_restart, actor_hidden,
                                                              no_value, uniforms[t, 0])
        return action, actor_hidden

    # imagined: no restarts (world_model_step's pool is the starts; what follows an end is unused)
    state, actor_hidden = start, start_hidden
    age, alive, imagined = torch.zeros(k, dtype=torch.long, device=device), torch.ones(k, device=device), 0.0
    for t in range(horizon):
        check()
        action, actor_hidden = policy(state[0][:, -1], actor_hidden, t)
        step = graphs.world_model_step(*state, age, action, actor_hidden, noise[t], uniforms[t, 1:], start)
        imagined = imagined + alive * step["reward"]
        alive = alive * (1 - step["end"])
        state, age = (step["obs"], step["act"], step["hidden"]), step["age"]
    # real: the same policy from the same frame and LSTM state, in the game forked at each start
    states, frames, actor_hidden = [s for _, _, s in starts], start[0][:, -1].clone(), start_hidden
    real, playing = torch.zeros(k), [True] * k
    for t in range(horizon):
        check()
        action, actor_hidden = policy(frames, actor_hidden, t)
        for i, a in enumerate(action.tolist()):
            if playing[i]:
                env.load_state_dict(states[i])
                frame, reward, terminated, truncated = env.step(a)
                states[i], playing[i] = env.state_dict(), not (terminated or truncated)
                real[i] += float(np.sign(reward))
                frames[i] = to_float(torch.from_numpy(frame).permute(2, 0, 1).to(device))
        if not any(playing):
            break
    imagined = imagined.cpu()
    return {"imagined_return": float(imagined.mean()), "real_return": float(real.mean()),
            "imagined_minus_real_return": float((imagined - real).mean())}


def action_shares(episodes: list[dict], num_actions: int) -> np.ndarray:
    """The share of each action among the episodes' actions (summing to 1; all 0 without any)."""
    counts = sum((np.bincount(np.asarray(e["actions"], np.int64), minlength=num_actions) for e in episodes),
                 np.zeros(num_actions))
    return counts / max(counts.sum(), 1.0)


def with_caption(frame: np.ndarray, size: int, lines: list[str]) -> np.ndarray:
    """A uint8 (h, w, 3) frame enlarged to width size (nearest: sharp pixels) above a line of text per entry."""
    import cv2

    height = int(round(frame.shape[0] * size / frame.shape[1]))
    big = cv2.resize(np.ascontiguousarray(frame), (size, height), interpolation=cv2.INTER_NEAREST)
    margin = np.zeros((8 + 18 * len(lines), size, 3), dtype=np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(margin, line, (6, 18 + 18 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([big, margin])


# --------------------------------------------------------------------------------------------------
# The training loop's parts: the run's position, the collector, the epoch's log, the phases.

# Each epoch runs these phases in order; a checkpoint records the phase and the position inside it.
PHASES = ("collect", "world_model_eval", "denoiser", "reward_end", "actor_critic", "evaluate")


@dataclass
class RunPosition:
    """Where the run is: epoch (from 1), phase, step in it, global step (all models' updates)."""
    epoch: int = 1
    phase: int = 0
    step: int = 0
    global_step: int = 0

    @property
    def name(self) -> str:
        return PHASES[self.phase]

    def __str__(self) -> str:
        return f"epoch {self.epoch} ({self.name}, step {self.step}; global step {self.global_step})"


def new_episode(obs: np.ndarray) -> dict:
    """An episode being recorded, from its first frame: lists of the episode .npz fields."""
    return {"obs": [obs.copy()], "actions": [], "rewards": [], "terminated": [], "truncated": []}


def add_step(episode: dict, action: int, obs: np.ndarray, reward: float, terminated: bool, truncated: bool) -> bool:
    """One env step appended to an episode being recorded; True when it ended the episode."""
    for key, value in zip(episode, (obs.copy(), action, reward, terminated, truncated)):
        episode[key].append(value)
    return terminated or truncated


class Collector:
    """The real env, the episode in progress (new_episode's lists), the actor's LSTM state, the
    first collection N (0: not decided), held-out transitions, env states to fork from."""
    num_fork_starts = 8

    def __init__(self, env: Union[AtariEnv, CatchEnv], buffer: ReplayBuffer,
                 generator: torch.Generator, device: torch.device):
        self.env, self.buffer, self.generator, self.device = env, buffer, generator, device
        self.partial, self.hidden, self.env_steps, self.first_collection_steps = None, None, 0, 0
        self.heldout, self.fork_starts = torch.zeros((0, 2), dtype=torch.long), []
        self.reward_end_pools = {kind: {name: [0, 0] for name in REWARD_END_CLASSES}
                                 for kind in ("recall", "precision")}  # add_to_pools's

    @torch.no_grad()
    def step(self, actor_critic: ActorCritic, args: Args, autocast, random_policy: bool):
        """One env step: the reward and, when it ended a game, its (return, length)."""
        if self.partial is None:
            self.partial = new_episode(self.env.reset())
        ref = (len(self.buffer.episodes), len(self.partial["actions"]))  # the coming transition
        if self.env_steps % max(1, args.num_heldout_transitions // self.num_fork_starts) == 0:
            self.fork_starts = (self.fork_starts + [(*ref, self.env.state_dict())])[-self.num_fork_starts:]
        explore = float(torch.rand(1, generator=self.generator)) < args.epsilon
        action = int(torch.randint(self.env.num_actions, (1,), generator=self.generator))
        if not random_policy:
            x = to_float(torch.from_numpy(self.partial["obs"][-1]).permute(2, 0, 1)[None].to(self.device))
            with autocast:
                logits, _, self.hidden = actor_critic(x, self.hidden)
            sampled = int(torch.multinomial(logits.float().softmax(-1).cpu(), 1, generator=self.generator))
            action = action if explore else sampled
        obs, reward, terminated, truncated = self.env.step(action)
        self.env_steps += 1
        self.heldout = torch.cat([self.heldout, torch.tensor([ref])])[-args.num_heldout_transitions:]
        game = None
        if add_step(self.partial, action, obs, reward, terminated, truncated):
            self.buffer.add({key: np.asarray(value) for key, value in self.partial.items()})
            game = (self.env.game_return, self.env.game_steps) if self.env.game_over else None
            self.partial, self.hidden = None, None
        return reward, game

    def share_partial(self):
        """The episode in progress becomes the buffer's newest (sampled in training)."""
        self.buffer.partial = None if self.partial is None else ReplayBuffer.to_tensors(self.partial)


class EpochLog:
    """An epoch's numbers: losses summed on the device and written every log_every updates; the
    rest pending until the epoch's end, so that a resume never writes a step twice."""

    def __init__(self, device: torch.device):
        self.device, self.pending, self.sums = device, {}, {}  # sums: the current log window's
        self.means: dict[str, list[float]] = {}  # the losses' logged means, for the epoch's line

    def add(self, key: str, value: float):
        self.pending.setdefault(key, []).append(float(value))

    def accumulate(self, values: dict[str, torch.Tensor]):
        for key, value in values.items():
            value = value.detach().float()  # cloned below: a CUDA graph's output is overwritten
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def finite(self) -> bool:
        """Whether every loss and gradient norm of the current window is finite (a host sync)."""
        return all(math.isfinite(value.item()) for value in self.sums.values())

    def flush(self, writer, step: int, count: int) -> dict[str, float]:
        """Writes the window's means over its `count` updates at `step`; a new window starts."""
        means, self.sums = {key: value.item() / count for key, value in self.sums.items()}, {}
        for key, value in means.items():
            writer.add_scalar(key, value, step)
            self.means.setdefault(key, []).append(value)
        return means


class Learner:
    """A model with its AdamW (weight decay on the world model only, as DIAMOND), warmup schedule,
    grad scaler (fp16 only) and clipping norm."""

    def __init__(self, name: str, model: nn.Module, args: Args, use_cuda: bool):
        lr = (name == "actor_critic" and args.actor_critic_learning_rate) or args.learning_rate
        decay = 0.0 if name == "actor_critic" else args.weight_decay
        norm = args.denoiser_max_grad_norm if name == "denoiser" else args.max_grad_norm
        self.model, self.max_grad_norm = model, norm
        self.optimizer = torch.optim.AdamW(weight_decay_groups(model, decay), lr=lr, eps=args.adam_eps,
                                           fused=use_cuda)
        warmup = lambda step: lr_warmup_factor(step, args.warmup_steps)  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup)
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and args.dtype == "float16")

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """One gradient step on the loss; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm


def build_learners(args: Args, models: dict[str, nn.Module], use_cuda: bool) -> dict[str, Learner]:
    return {name: Learner(name, model, args, use_cuda) for name, model in models.items()}


def run_checkpoint(run, pos: RunPosition, log: EpochLog) -> dict:
    """checkpoints/latest.pt's contents (CHECKPOINT_KEYS), which restore_run puts back."""
    collector, partial, hidden = run.collector, run.collector.partial, run.collector.hidden
    parts = {key: {name: getattr(learner, key[:-1]).state_dict() for name, learner in run.learners.items()}
             for key in ("models", "optimizers", "schedulers", "scalers")}
    return {"script": SCRIPT_NAME, "format_version": CHECKPOINT_FORMAT_VERSION, "args": asdict(run.args),
            "epoch": pos.epoch, "phase": pos.name, "position": pos.step, "global_step": pos.global_step,
            "env": collector.env.state_dict(), "env_steps": collector.env_steps, "heldout": collector.heldout,
            "partial": None if partial is None else ReplayBuffer.to_tensors(partial),
            "first_collection_steps": collector.first_collection_steps,
            "collect_hidden": None if hidden is None else tuple(h.cpu() for h in hidden),
            "reward_end_pools": collector.reward_end_pools,
            "fork_starts": [{"episode": e, "t": t, "env": env} for e, t, env in collector.fork_starts],
            "epoch_log": {"pending": log.pending, "means": log.means},
            "phase_sums": {key: value.item() for key, value in log.sums.items()},
            "num_buffer_files": len(run.buffer.episodes) if run.args.dataset_dir is None else 0, **parts,
            "rng": rng_state(), "cpu_generator": run.cpu_generator.get_state(),
            "generator": run.generator.get_state().cpu(), "imagination": run.wm_env.state_dict()}


def restore_run(state: dict, collector: Collector, log: EpochLog, learners: dict[str, Learner],
                cpu_generator, generator) -> RunPosition:
    """Puts run_checkpoint's state back and returns the position, or says in one line why not."""
    try:
        for name, learner in learners.items():
            for key in ("models", "optimizers", "schedulers", "scalers"):
                getattr(learner, key[:-1]).load_state_dict(state[key][name])
        set_rng_state(state["rng"])
        cpu_generator.set_state(state["cpu_generator"])
        generator.set_state(state["generator"])  # a CPU ByteTensor, for CUDA generators too
        collector.env.load_state_dict(state["env"])
        collector.env_steps, collector.heldout, partial = state["env_steps"], state["heldout"], state["partial"]
        collector.first_collection_steps, hidden = state["first_collection_steps"], state["collect_hidden"]
        collector.partial = None if partial is None else {"obs": list(partial["obs"].permute(0, 2, 3, 1).numpy()), **{
            key: partial[key].tolist() for key in ("actions", "rewards", "terminated", "truncated")}}
        collector.hidden = None if hidden is None else tuple(h.to(collector.device) for h in hidden)
        collector.reward_end_pools = state["reward_end_pools"]
        collector.fork_starts = [(s["episode"], s["t"], s["env"]) for s in state["fork_starts"]]
        log.pending, log.means = state["epoch_log"]["pending"], state["epoch_log"]["means"]
        log.sums = {key: torch.tensor(value, device=log.device) for key, value in state["phase_sums"].items()}
        return RunPosition(state["epoch"], PHASES.index(state["phase"]), state["position"], state["global_step"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        raise UserError(f"checkpoint weights do not fit this model, or its state is damaged ({error_reason(e)}); "
                        f"resume from another checkpoint") from None


@dataclass
class Run:
    """What the phases of an epoch share (train_ids None: all episodes; graphs None: eager)."""
    args: Args
    device: torch.device
    autocast: object
    generator: torch.Generator
    cpu_generator: torch.Generator
    buffer: ReplayBuffer
    train_ids: Optional[list[int]]
    learners: dict[str, Learner]
    denoiser_net: nn.Module
    wm_env: WorldModelEnv
    graphs: Optional[ImaginationGraphs]
    collector: Collector
    writer: object
    stop: object
    run_dir: Path
    mfu_per_update: Optional[float]  # mfu_per_update's: None on a CPU (no MFU)
    schedule: list[int]  # env steps per epoch (run_schedule), final once the first collection is

    def checked_net(self, *inputs):
        """The uncompiled denoiser network; a signal abandons an evaluation within a call."""
        self.stop.check()
        return self.learners["denoiser"].model.net(*inputs)


def phase_work(args: Args, schedule: list[int], name: str, epoch: int) -> int:
    """A phase's work in an epoch: env steps, updates, 1 (an evaluation), or 0 (none)."""
    first = epoch == 1
    return {"collect": schedule[epoch - 1],
            "world_model_eval": int(schedule[epoch - 1] > 0 or args.dataset_dir is not None),
            "denoiser": args.first_epoch_denoiser_steps if first else args.denoiser_steps_per_epoch,
            "reward_end": args.first_epoch_reward_steps if first else args.reward_steps_per_epoch,
            "actor_critic": 0 if args.world_model_only or epoch <= args.actor_critic_start_after_epochs else
            args.first_epoch_actor_critic_steps if first else args.actor_critic_steps_per_epoch,
            "evaluate": int(epoch % args.eval_every == 0 or epoch == len(schedule))}[name]


def phase_loss(run: Run, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One update's loss of a model on a fresh batch, and the extra values to log."""
    args, model = run.args, run.learners[name].model
    if name == "actor_critic":
        loss, parts = actor_critic_loss(model, run.wm_env, args, run.generator, run.autocast, run.graphs)
        return loss, {f"losses/{key}" if key in ("actor", "critic", "entropy") else f"charts/{key}": value
                      for key, value in parts.items()}
    # denoiser: 6-frame segments, two predictions (the second on the first's 8-bit output);
    # reward/end: 19-frame segments from t - U[0, 19), the LSTM from a zero state
    batch = sample_batch(run.buffer, args, run.cpu_generator, run.device, run.train_ids, name == "reward_end")
    with run.autocast:
        if name == "denoiser":
            return denoiser_loss(model, batch["obs"], batch["actions"], batch["obs_mask"], args, run.generator,
                                 run.denoiser_net), {}
        return reward_end_loss(model, batch), {}


def collect(run: Run, pos: RunPosition, log: EpochLog):
    """Env steps until this epoch's share of the budget. Epoch 1 decides the first collection N as
    DIAMOND: initial_collection_steps, then 100 more at a time until the two rarer reward signs
    occur min_rare_rewards times, or the maximum."""
    args, buffer, collector = run.args, run.buffer, run.collector
    counts = [sum(int((buffer.episode(i)["rewards"].sign() == sign).sum()) for i in buffer.sampleable())
              for sign in (-1, 0, 1)]  # the reward signs in the buffer (the partial episode's too)
    total = run.schedule[pos.epoch - 1]
    progress = progress_bar(total, pos.step, f"epoch {pos.epoch} collect", "env step")
    start, first = time.perf_counter(), pos.step
    while not run.stop.requested:
        extra = pos.step - args.initial_collection_steps
        if not collector.first_collection_steps and extra >= 0 and extra % args.collection_steps_per_epoch == 0 and (
                sum(sorted(counts)[:2]) >= args.min_rare_rewards or pos.step >= args.max_initial_collection_steps):
            collector.first_collection_steps = pos.step  # N: the schedule is now fixed
            run.schedule = run_schedule(args, pos.step)
            total = progress.total = run.schedule[0]
            progress.write(f"first collection: {pos.step} env steps (reward signs -1/0/+1: {counts}); the run: "
                           f"{len(run.schedule)} epochs, {sum(run.schedule)} env steps", file=sys.stdout)
        if collector.first_collection_steps and pos.step >= total:
            break
        reward, game = collector.step(run.learners["actor_critic"].model, args, run.autocast, args.world_model_only)
        counts[int(np.sign(reward)) + 1] += 1
        if game is not None:
            log.add("charts/episodic_return", game[0])
            log.add("charts/episodic_length", game[1])
        pos.step += 1
        progress.update(1)
    progress.close()
    collector.share_partial()
    if pos.step > first:
        log.add("charts/SPS", (pos.step - first) / (time.perf_counter() - start))


def measure_world_model(run: Run, pos: RunPosition, log: EpochLog):
    """world_model/* on the transitions just collected (or held out), never trained on."""
    collector = run.collector
    refs = [(e if e < len(run.buffer.episodes) else -1, t) for e, t in collector.heldout.tolist()]
    metrics = world_model_metrics(run.learners["denoiser"].model, run.learners["reward_end"].model,
                                  run.buffer, refs, run.args, run.device, run.args.seed * 7919 + pos.epoch,
                                  run.checked_net, run.autocast)
    add_to_pools(collector.reward_end_pools, metrics.pop("counts"))
    for key, value in metrics.items():
        log.add(f"world_model/{key}", value)
    if run.args.dataset_dir is None:  # trained on from now on: no collection, no world_model/*
        collector.heldout = collector.heldout[:0]


def train_model(run: Run, name: str, pos: RunPosition, log: EpochLog):
    """This epoch's updates of one model from pos.step on, until done or a signal."""
    args, learner = run.args, run.learners[name]
    num_steps = phase_work(args, run.schedule, name, pos.epoch)
    progress = progress_bar(num_steps, pos.step, f"epoch {pos.epoch} {name}", "update")
    start, first = time.perf_counter(), pos.step
    learner.model.train()
    # the first backward through a compiled graph compiles it: a failure is one line, as forward's
    compiled = {"denoiser": args.compile and ("the denoiser (--compile)", "without --compile"),
                "actor_critic": run.graphs and ("the imagination graphs", "with --imagination-graphs off")}.get(name)
    guard = (lambda: compile_failures(run.stop, *compiled)) if compiled else contextlib.nullcontext
    while pos.step < num_steps and not run.stop.requested:
        with guard():
            loss, parts = phase_loss(run, name)
            grad_norm = learner.update(loss)
        log.accumulate({f"losses/{name}": loss, "charts/grad_norm" + ("" if name == "denoiser" else f"_{name}"):
                        grad_norm, **parts})
        pos.step, pos.global_step = pos.step + 1, pos.global_step + 1
        progress.update(1)
        if pos.step % args.log_every == 0 or pos.step == num_steps:
            if not log.finite():
                raise non_finite_failure(f"in epoch {pos.epoch} ({name}, update {pos.step})", run.run_dir)
            count = pos.step % args.log_every or min(args.log_every, pos.step)  # in this window
            means = log.flush(run.writer, pos.global_step, count)
            if name == "denoiser":  # the three models share one warmup schedule
                run.writer.add_scalar("charts/learning_rate", learner.scheduler.get_last_lr()[0], pos.global_step)
            progress.set_postfix(loss=f"{means[f'losses/{name}']:.4f}")
    progress.close()
    if pos.step > first:
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        per_second = (pos.step - first) / (time.perf_counter() - start)
        log.add(f"perf/{name}_steps_per_s", per_second)
        if name == "denoiser" and run.mfu_per_update is not None:  # achieved / peak FLOP/s
            log.add("perf/mfu", per_second * run.mfu_per_update)
        if name == "actor_critic":
            log.add("perf/imagination_frames_per_s", per_second * args.num_imagined_envs * args.backup_every)


@torch.no_grad()
def write_rollout(run: Run, pos: RunPosition):
    """An open-loop imagined rollout from a real segment with its actions: a strip (real row above
    imagined, each frame above its action) in TensorBoard and samples/, an MP4."""
    args, buffer, device, seed = run.args, run.buffer, run.device, run.args.seed * 7919 + pos.epoch
    c, horizon = args.num_conditioning_steps, args.imagination_horizon
    [(index, start)] = buffer.sample_segments(1, c + horizon, torch.Generator().manual_seed(seed))
    start = max(start, min(0, len(buffer.episode(index)["actions"]) + 1 - c - horizon))  # all real if it can
    batch = buffer.segments([(index, start)], c + horizon)
    real, actions = segment_obs(batch, device), batch["actions"].to(device)
    device_generator = torch.Generator(device=device).manual_seed(seed)
    obs, imagined = real[:, :c], []
    for k in range(horizon):
        imagined.append(generate_next_obs(run.learners["denoiser"].model, obs, actions[:, k: k + c], args,
                                          device_generator, run.checked_net, run.autocast))
        obs = torch.cat([obs[:, 1:], imagined[-1][:, None]], dim=1)
    rows = [to_uint8(x).permute(0, 2, 3, 1).cpu().numpy() for x in (real[0, c:], torch.cat(imagined))]
    names = [run.collector.env.action_meanings[a].lower() for a in actions[0, c - 1: c - 1 + horizon].tolist()]
    size = max(64, rows[0].shape[2])  # small frames enlarged: an action's name fits under each
    cells = [np.stack([with_caption(frame, size, [name]) for frame, name in zip(row, names)]) for row in rows]
    grids = [make_grid(row.transpose(0, 3, 1, 2), columns=horizon) for row in cells]
    strip = np.concatenate([with_caption(grid, grid.shape[1], [label])
                            for grid, label in zip(grids, ("real", "imagined"))])
    run.writer.add_image("samples/imagined_vs_real", strip, pos.global_step, dataformats="HWC")
    stem = run.run_dir / "samples" / f"rollout_epoch{pos.epoch:05d}"
    write_png(stem.with_suffix(".png"), strip)
    write_mp4(stem.with_suffix(".mp4"), np.stack([with_caption(np.concatenate(pair, axis=1), 256, [
        "left real, right imagined", f"step {k + 1}  action {names[k]}"]) for k, pair in enumerate(zip(*rows))]))


def evaluate(run: Run, pos: RunPosition, log: EpochLog):
    """Test episodes (not in the last epoch), action shares, imagined vs real returns, test-set
    losses, the rollout, the full pools; a signal abandons it before anything is written."""
    args, collector, env = run.args, run.collector, run.collector.env
    seed = args.seed * 7919 + pos.epoch
    actor_critic, values, test_episodes = run.learners["actor_critic"].model, {}, []
    if not args.world_model_only and pos.epoch < len(run.schedule):
        # with --dataset-dir, DIAMOND plays no game: these test episodes are this script's addition
        what = "real-game test episodes, not in DIAMOND's static-dataset mode" if args.dataset_dir else "test episodes"
        progress = progress_bar(None, 0, f"epoch {pos.epoch} evaluate ({args.eval_episodes} {what})", "env step")
        returns = run_test_episodes(actor_critic, args, args.eval_episodes, seed, run.device, run.autocast,
                                    check=lambda: (run.stop.check(), progress.update(1)), record=test_episodes)
        progress.close()
        # the action shares: a policy collapsed onto one action shows there
        mean, shares = float(np.mean(returns)), action_shares(test_episodes, env.num_actions)
        values = {"eval/episodic_return": mean, "eval/human_normalized_score": env.normalized_score(mean),
                  **{f"eval/action_share_{m}": float(s) for m, s in zip(env.action_meanings, shares)}}
    k = min(collector.num_fork_starts, args.num_imagined_envs, len(collector.fork_starts))
    if k and not args.world_model_only:  # none with --dataset-dir
        run.stop.check()  # an Atari env takes about a second to make
        env = make_env(args, seed)  # a training env: a life lost ends the episode, as in the buffer
        amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
        graphs = ImaginationGraphs(run.wm_env, actor_critic, args, run.device,  # uncompiled: K envs
                                   amp_dtype if run.device.type == "cuda" else None, backend=None)
        returns = imagined_and_real_returns(graphs, collector.fork_starts[-k:], env, args, seed, run.stop.check)
        values.update({f"eval/{key}": value for key, value in returns.items()})
    # test-set losses on episodes never trained on: --dataset-dir's held-out ones, else (as
    # DIAMOND) the test episodes just played (a --world-model-only run that collects has none)
    held_out, ids = run.buffer, sorted(set(range(len(run.buffer.episodes))) - set(run.train_ids or []))
    if args.dataset_dir is None:
        held_out, ids = ReplayBuffer(None, None, args.num_conditioning_steps), list(range(len(test_episodes)))
        for episode in test_episodes:
            held_out.add(episode, write=False)
    if ids:
        values.update({f"eval/{key}": value for key, value in test_set_losses(
            run.learners["denoiser"].model, run.learners["reward_end"].model, held_out, ids, args, run.device, seed,
            run.checked_net, run.autocast).items()})
    write_rollout(run, pos)
    for key, value in {**values, **take_pooled(collector.reward_end_pools)}.items():
        if value is not None:
            log.add(key, value)


def keep_agent_copy(folder: Path, epoch: int, actor_critic: ActorCritic, keep: int):
    """checkpoints/agent_epoch_{epoch}.pt: the actor-critic's weights; the newest `keep` stay."""
    save_checkpoint(folder / f"agent_epoch_{epoch:05d}.pt", {k: v.cpu() for k, v in actor_critic.state_dict().items()})
    for old in sorted(folder.glob("agent_epoch_*.pt"))[:-keep]:
        old.unlink()


# ---- run duration: each phase's seconds per unit (env step, update, evaluation) x work left


def work_left(args: Args, first_collection_steps: int, pos: RunPosition) -> dict[str, int]:
    """Each phase's units of work from pos on (N: initial_collection_steps until decided)."""
    schedule, left = run_schedule(args, first_collection_steps), {}
    for index, name in enumerate(PHASES):
        work = [phase_work(args, schedule, name, epoch) for epoch in range(pos.epoch, len(schedule) + 1)] or [0]
        left[name] = sum(work) - (work[0] if index < pos.phase else pos.step if index == pos.phase else 0)
    return left


def seconds_left(seconds_per_unit: dict[str, float], left: dict[str, int]) -> float:
    """sum over phases of seconds per unit x units left (a phase not timed yet counts 0)."""
    return sum(units * seconds_per_unit.get(name, 0.0) for name, units in left.items())


def time_phases(args: Args, models: dict[str, nn.Module], device: torch.device, autocast,
                left: dict[str, int]) -> dict[str, float]:
    """Seconds per env step and per update of each model, timed on copies and an env of their own
    (the global RNGs put back). On a CPU, batch 1's time x the batch when that is over 2 s."""
    state, copies = rng_state(), {name: copy.deepcopy(model) for name, model in models.items()}
    generator, cpu_generator = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(0)
    buffer = ReplayBuffer(None, None, args.num_conditioning_steps)  # filled by the timed env steps
    collector = Collector(make_env(args, args.seed + 1, torch.Generator().manual_seed(0)), buffer, cpu_generator,
                          device)
    run = Run(args, device, autocast, generator, cpu_generator, buffer, None, build_learners(
        args, copies, device.type == "cuda"), copies["denoiser"].net, *[None] * 8)

    def timed(unit: Callable[[], object], calls: int = 2) -> float:
        """Seconds per call: a warm-up call's if it took over 1 s, else the mean of `calls` more."""
        def once() -> float:
            start = time.perf_counter()
            unit()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - start
        first = once()
        return first if first > 1.0 else sum(once() for _ in range(calls)) / calls

    policy = copies["actor_critic"]
    seconds = {"collect": timed(lambda: collector.step(policy, args, autocast, args.world_model_only), 100)}
    collector.share_partial()  # the buffer the updates sample
    for name in [name for name in ("denoiser", "reward_end", "actor_critic") if left[name]]:
        full = args.num_imagined_envs if name == "actor_critic" else args.batch_size
        for batch in (1, full) if device.type != "cuda" else (full,):  # segments or imagined envs
            run.args = replace(args, batch_size=batch, num_imagined_envs=batch)
            run.wm_env = WorldModelEnv(copies["denoiser"], copies["reward_end"], buffer, run.args, device, generator,
                                       cpu_generator, run.denoiser_net, autocast)
            seconds[name] = timed(lambda: run.learners[name].update(phase_loss(run, name)[0])) * full / batch
            if seconds[name] > 2.0:  # batch 1 x the batch: long enough to say that it is long
                break
    set_rng_state(state)
    return seconds


def run_time_lines(seconds_per_unit: dict[str, float], left: dict[str, int], setup) -> list[str]:
    """The shared run_time_notice in global steps; above a day on a CPU, Catch."""
    steps = left["denoiser"] + left["reward_end"] + left["actor_critic"]
    lines = run_time_notice(seconds_left(seconds_per_unit, left) / max(steps, 1), steps, setup)
    return lines[:1] + [line + "; on a CPU the game to learn is --env-id Catch --preset catch" for line in lines[1:]]


def load_dataset_dir(args: Args, buffer: ReplayBuffer, num_actions: int) -> tuple[list[int], torch.Tensor]:
    """--dataset-dir into the buffer: the training episodes, the last 10%'s transitions."""
    if not Path(args.dataset_dir).is_dir():
        raise UserError(f"--dataset-dir {args.dataset_dir} is not a folder: give the folder of episode .npz files "
                        f"(resuming: put it back where the run read it)")
    paths = sorted(p for p in Path(args.dataset_dir).glob("*.npz") if not p.name.startswith("."))
    if len(paths) < 2:
        raise UserError(f"--dataset-dir {args.dataset_dir} has {len(paths)} episode .npz files (one per episode: "
                        f"obs, actions, rewards, terminated, truncated): give at least 2 (the last 10% are held out)")
    for path in paths:
        buffer.add(load_episode(path, args.obs_size, num_actions, "fix it or move it out of --dataset-dir"), False)
    num_train = len(paths) - max(1, len(paths) // 10)
    pairs = [(e, t) for e in range(num_train, len(paths)) for t in range(len(buffer.episodes[e]["actions"]))]
    picks = np.linspace(0, len(pairs) - 1, min(args.num_heldout_transitions, len(pairs))).round().astype(int)
    return list(range(num_train)), torch.tensor([pairs[i] for i in picks], dtype=torch.long)


def mfu_per_update(args: Args, num_actions: int, peak: Optional[float]) -> Optional[float]:
    """One denoiser update's FLOPs over the device's peak FLOP/s (None: no MFU)."""
    if peak is None:
        return None
    c = args.num_conditioning_steps
    example = (torch.zeros(1, 3, args.obs_size, args.obs_size), torch.zeros(1),
               torch.zeros(1, 3 * c, args.obs_size, args.obs_size), torch.zeros(1, c, dtype=torch.long))
    return 3 * args.batch_size * (1 + args.num_autoregressive_steps) * forward_flops(
        lambda: build_models(args, num_actions)[0].net, *example) / peak


def check_training_memory(setup, args: Args, num_actions: int):
    """One line, before any allocation, if a world-model update (per segment) or an actor-critic
    update (per imagined env: backup_every actor steps and a world-model step) cannot fit."""
    c, size, k = args.num_conditioning_steps, args.obs_size, 1 + args.num_autoregressive_steps
    with torch.device("meta"):  # the saved activations, counted without compute
        denoiser, reward_end_model, actor_critic = build_models(args, num_actions)
        frames = lambda n: torch.zeros(1, n, 3, size, size)  # noqa: E731 - one segment of n frames
        actions = lambda n: torch.zeros(1, n, dtype=torch.long)  # noqa: E731
        segment = (frames(c + k), actions(c + k - 1), torch.ones(1, c + k, dtype=torch.bool))
        denoiser_bytes = saved_activation_bytes(lambda: denoiser_loss(denoiser, *segment, args, None))

        def reward_end_step(length: int):  # over all transitions: meta cannot index by a mask
            obs, classes = frames(length + 1), torch.zeros(length, dtype=torch.long)
            reward_logits, end_logits, _ = reward_end_model(obs[:, :-1], actions(length), obs[:, 1:])
            return F.cross_entropy(reward_logits[0], classes) + F.cross_entropy(end_logits[0], classes)

        reward_end_bytes = saved_activation_bytes(lambda: reward_end_step(args.reward_segment_length - 1))
        world_model_step = max(denoiser_bytes / k, saved_activation_bytes(lambda: reward_end_step(1)))
        actor_hidden = (torch.zeros(1, args.actor_lstm_dim), torch.zeros(1, args.actor_lstm_dim))
        actor_bytes = saved_activation_bytes(lambda: actor_critic(frames(1)[:, 0], actor_hidden))
    num_params = sum(p.numel() for model in (denoiser, reward_end_model, actor_critic) for p in model.parameters())
    check_step_memory(setup, args.batch_size, num_params, max(denoiser_bytes, reward_end_bytes), args.dtype)
    if not args.world_model_only:
        per_env = args.backup_every * actor_bytes + world_model_step
        try:
            check_step_memory(setup, args.num_imagined_envs, num_params, per_env, args.dtype)
        except UserError as e:  # the shared check names --batch-size: here, the imagined envs
            raise UserError(str(e).replace("--batch-size", "--num-imagined-envs").replace(
                "a training step", f"an actor-critic update ({args.backup_every} imagined steps)")) from None


# ==== BEGIN OPTIONAL: play ====
# Play: the world model (or the real game) as a game, in a pygame window or headless from keys.
# Optional: without the play blocks (here, in Args) and the lines ending in "# optional: play", the
# script trains as before (tests/test_optional_blocks.py):
#   sed '/^# ==== BEGIN OPTIONAL: play/,/^# ==== END OPTIONAL: play/d; /# optional: play$/d' diamond_atari.py > x.py

# --play-keys letters of the 18 Atari actions: N noop, F fire, U/D/L/R, the diagonals around S on
# QWERTY (Q up-left, E up-right, Z down-left, C down-right), lowercase adds fire. '/' restarts.
ACTION_LETTERS = {"NOOP": "N", "FIRE": "F", "UP": "U", "DOWN": "D", "LEFT": "L", "RIGHT": "R", "UPLEFT": "Q",
                  "UPRIGHT": "E", "DOWNLEFT": "Z", "DOWNRIGHT": "C", "UPFIRE": "u", "DOWNFIRE": "d", "LEFTFIRE": "l",
                  "RIGHTFIRE": "r", "UPLEFTFIRE": "q", "UPRIGHTFIRE": "e", "DOWNLEFTFIRE": "z", "DOWNRIGHTFIRE": "c"}
RESTART_LETTER = "/"


def parse_play_keys(keys: str, meanings: list[str]) -> list[Optional[int]]:
    """--play-keys -> an action index per step (None: restart); unknown letters refused."""
    index = {ACTION_LETTERS.get(name, name): i for i, name in enumerate(meanings)} | {RESTART_LETTER: None}
    known = ", ".join(f"{ACTION_LETTERS.get(name, name)} {name.lower()}" for name in meanings)
    letters = [letter for letter in keys if not letter.isspace()]
    wrong = [letter for letter in letters if letter not in index]
    if wrong or not letters:
        what = f"{wrong[0]!r} is no action of this game" if wrong else "empty, give one letter per step"
        raise UserError(f"--play-keys: {what}; its letters: {known}, {RESTART_LETTER} restart")
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


class ImaginedGame:
    """The world model as a game from starts()' real frames (1, c, 3, H, W) and actions (1, c - 1):
    next_frame(frames, actions (1, c)) samples the next frame, the reward/end model (if any) the rest."""
    name = "world model"

    def __init__(self, next_frame: Callable, starts: Callable, reward_end_model: Optional[Callable] = None,
                 generator: Optional[torch.Generator] = None):
        self.next_frame, self.starts, self.reward_end_model = next_frame, starts, reward_end_model
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @torch.no_grad()
    def reset(self) -> np.ndarray:
        self.obs, actions = self.starts()
        self.act, self.hidden = F.pad(actions, (0, 1)), None  # the last action: the player's
        if self.reward_end_model is not None:
            _, _, self.hidden = self.reward_end_model(self.obs[:, :-1], actions, self.obs[:, 1:])
        return to_uint8(self.obs[0, -1]).permute(1, 2, 0).cpu().numpy()

    @torch.no_grad()
    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        self.act[:, -1] = action
        next_obs = self.next_frame(self.obs, self.act).clamp(-1, 1)
        reward, end = 0.0, False
        if self.reward_end_model is not None:  # sampled, as in imagination
            reward_logits, end_logits, self.hidden = self.reward_end_model(
                self.obs[:, -1:], self.act[:, -1:], next_obs[:, None], self.hidden)
            reward_probs, end_probs = (x[0, 0].float().softmax(-1).cpu() for x in (reward_logits, end_logits))
            reward = float(torch.multinomial(reward_probs, 1, generator=self.generator)) - 1.0
            end = bool(torch.multinomial(end_probs, 1, generator=self.generator))
        self.obs, self.act = torch.cat([self.obs[:, 1:], next_obs[:, None]], dim=1), F.pad(self.act[:, 1:], (0, 1))
        return to_uint8(next_obs[0]).permute(1, 2, 0).cpu().numpy(), reward, end

    def take_episodes(self) -> list[dict]:
        return []  # imagined sessions are kept as MP4 only


class RealGame:
    """The real game (a life lost ends an episode) as ImaginedGame; the episodes played kept as
    .npz fields until take_episodes."""
    name = "real game"

    def __init__(self, env: Union[AtariEnv, CatchEnv]):
        self.env, self.episodes = env, []

    def reset(self) -> np.ndarray:
        self.env.game_over = True  # a new game, not the next life
        self.episodes.append(new_episode(self.env.reset()))
        return self.episodes[-1]["obs"][0]

    def step(self, action: int) -> tuple[np.ndarray, float, bool]:
        obs, reward, terminated, truncated = self.env.step(action)
        if add_step(self.episodes[-1], action, obs, reward, terminated, truncated):  # next life or game
            self.episodes.append(new_episode(self.env.reset()))
        return self.episodes[-1]["obs"][-1], reward, terminated or truncated

    def take_episodes(self) -> list[dict]:
        """The episodes played (one cut short: truncated); the next goes on from the last frame."""
        done = [episode for episode in self.episodes if episode["actions"]]
        for episode in done:
            episode["truncated"][-1] |= not episode["terminated"][-1]
        self.episodes = [new_episode(self.env.obs)]
        return done


def play_session(game, meanings: list[str]):
    """A session as a generator: sent an action (None: restart), yields the frame, its caption
    (step, action, reward, return, end) and the reward."""
    action = None
    while True:
        if action is None:
            frame, reward, end, step, total = game.reset(), 0.0, False, 0, 0.0
        else:
            frame, reward, end = game.step(action)
            step, total = step + 1, total + reward
        what = "-" if action is None else meanings[action].lower()
        action = yield frame, (f"{game.name}  step {step}  action {what}  reward {reward:+g}  return {total:g}"
                               + ("  END" if end else "")), reward
        total = 0.0 if end else total


def play_keys(game, steps: list[Optional[int]], meanings: list[str], size: int) -> dict:
    """The game played with the actions (None: restart): frames uint8 (T + 1, H, W, 3), the
    captioned frames, rewards, frames per second."""
    session, start = play_session(game, meanings), time.perf_counter()
    frames, lines, rewards = zip(*[session.send(action) for action in [None, *steps]])
    shown = [with_caption(frame, size, [line]) for frame, line in zip(frames, lines)]
    return {"frames": np.stack(frames), "shown": np.stack(shown), "rewards": rewards[1:],
            "fps": len(steps) / max(time.perf_counter() - start, 1e-9)}


def save_play_files(out_dir: Path, stem: str, shown: np.ndarray, episodes: list[dict], fps: float = 15) -> list[Path]:
    """The session's MP4 and the real game's episodes (a .npz each, as --dataset-dir reads)."""
    paths = [out_dir / f"{stem}.mp4"] + [out_dir / f"{stem}_episode_{i:03d}.npz" for i in range(len(episodes))]
    write_mp4(paths[0], shown, fps=int(round(fps)))
    for path, episode in zip(paths[1:], episodes):
        save_episode(path, episode)
    return paths


def import_pygame():
    """pygame (pygame-ce or pygame) for the play window, or one line with the install command."""
    try:
        import pygame
    except ImportError:
        raise UserError("--play opens a window with pygame, which is not installed: pip install pygame-ce (or pip "
                        "install -e '.[play]'); --play-keys KEYS plays headless without it") from None
    return pygame


def play_window(games: dict, meanings: list[str], out_dir: Path, size: int, max_fps: float,
                max_steps: Optional[int] = None) -> float:
    """The live session: the world model (Tab: the real game) steps with the held keys' action at
    most max_fps times a second; Enter restarts, R records, Esc quits. Returns frames per second."""
    pygame = import_pygame()
    pygame.display.init()  # the display alone: no audio device needed
    driver = pygame.display.get_driver()
    if driver in ("offscreen", "dummy") and not os.environ.get("SDL_VIDEODRIVER"):  # no screen: SDL fell back
        raise UserError(f"no display to open a window on (SDL fell back to its {driver} driver): play headless with "
                        f"--play-keys KEYS, or set SDL_VIDEODRIVER={driver} to run the window unseen")
    screen, clock = pygame.display.set_mode((size, size + 8 + 18 * 2)), pygame.time.Clock()
    modes, game, recording, keys, num_frames, started = list(games), None, None, set(), 0, time.perf_counter()
    while max_steps is None or num_frames < max_steps:
        if recording is not None and keys & {pygame.K_r, pygame.K_TAB, pygame.K_ESCAPE}:  # the recording ends
            stem = f"play_{modes[0]}_{time.strftime('%Y%m%d_%H%M%S')}"
            for path in save_play_files(out_dir, stem, np.stack(recording), game.take_episodes(), max_fps):
                print(f"wrote {path}", flush=True)
            recording, keys = None, keys - {pygame.K_r}
        if pygame.K_ESCAPE in keys:
            break
        if pygame.K_r in keys:  # what was played before is not recorded
            recording, _ = [], game.take_episodes()
        if pygame.K_TAB in keys:
            modes.append(modes.pop(0))
        if game is None or pygame.K_TAB in keys:
            game = games[modes[0]]()
            session = play_session(game, meanings)
            print(f"now playing the {game.name}", flush=True)
        pressed = pygame.key.get_pressed()
        held = (pygame.K_UP, pygame.K_DOWN, pygame.K_LEFT, pygame.K_RIGHT, pygame.K_SPACE)
        restart = num_frames == 0 or keys & {pygame.K_RETURN, pygame.K_TAB}
        frame, line, _ = session.send(None if restart else action_from_keys(*(pressed[k] for k in held), meanings))
        image = with_caption(frame, size, [line, f"{clock.get_fps():.1f} fps" + ("" if recording is None else "  REC")])
        recording = None if recording is None else recording + [image]
        screen.blit(pygame.image.frombuffer(image.tobytes(), image.shape[1::-1], "RGB"), (0, 0))
        pygame.display.flip()
        clock.tick(max_fps)
        num_frames += 1
        keys = {pygame.K_ESCAPE if event.type == pygame.QUIT else event.key  # closing it: Esc
                for event in pygame.event.get() if event.type in (pygame.QUIT, pygame.KEYDOWN)}
    pygame.quit()
    return num_frames / (time.perf_counter() - started)


def play(args: Args, run_dir: Path, checkpoint: dict, denoiser: Denoiser,
         reward_end_model: RewardEndModel, meanings: list[str], device: torch.device, autocast):
    """--play: the world model of a checkpoint as a game, in a window or (--play-keys) headless."""
    steps = parse_play_keys(args.play_keys, meanings) if args.play_keys is not None else None
    generator = torch.Generator(device=device).manual_seed(args.seed)  # diffusion noise
    cpu_generator = torch.Generator().manual_seed(args.seed)  # starts, reward and end samples
    # the starts: fresh real segments of up to 16 of the run's episodes (or --dataset-dir's)
    paths = ([run_dir / "episodes" / f"episode_{i:06d}.npz" for i in range(checkpoint["num_buffer_files"])]
             if args.dataset_dir is None else sorted(p for p in Path(args.dataset_dir).glob("*.npz")
                                                     if not p.name.startswith(".")))
    if not paths:
        raise UserError(f"{run_dir} has no episodes yet to start playing from; resume it for an epoch first")
    buffer, c = ReplayBuffer(None, None, args.num_conditioning_steps), args.num_conditioning_steps
    for i in torch.randperm(len(paths), generator=cpu_generator)[:16].sort().values.tolist():
        buffer.add(load_episode(paths[i], args.obs_size, len(meanings), "restore the run's episode files"), False)

    def starts():
        batch = buffer.segments(buffer.sample_segments(1, c, cpu_generator), c)
        return segment_obs(batch, device), batch["actions"].to(device)

    def reward_end(*inputs):
        with autocast:
            return reward_end_model(*inputs)

    next_frame = lambda obs, act: generate_next_obs(denoiser, obs, act, args, generator, autocast=autocast)  # noqa
    games = {"imagined": lambda: ImaginedGame(next_frame, starts, reward_end, cpu_generator),
             "real": lambda: RealGame(make_env(args, args.seed))}
    print("keys: " + ", ".join(f"{ACTION_LETTERS.get(name, name)} {name.lower()}" for name in meanings) + (
        f", {RESTART_LETTER} restart (--play-keys letters)" if steps is not None else
        "; window: arrows and space (fire) pick these, Enter restarts, Tab switches world model / real game, "
        "R records, Esc quits"), flush=True)
    print(f"sampler: {args.sampler}, {args.num_sampling_steps} denoising steps per frame", flush=True)
    # play writes no checkpoint: Ctrl-C or SIGTERM ends a session at once, like Esc (an unsaved
    # recording is lost); the caller's handlers come back after
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if steps is None:
            play_window(games, meanings, run_dir / "play", args.play_size, args.play_fps)
        else:
            play_headless(games, steps, meanings, run_dir / "play", args)
    except KeyboardInterrupt:
        print("play stopped by a signal", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def play_headless(games: dict, steps: list[Optional[int]], meanings: list[str], out_dir: Path, args: Args):
    """--play-keys: each game of --play-world played; its MP4 and episodes written."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    for mode in (("imagined", "real") if args.play_world == "both" else (args.play_world,)):
        game = games[mode]()
        session = play_keys(game, steps, meanings, args.play_size)
        paths = save_play_files(out_dir, f"play_{mode}_{stamp}", session["shown"], game.take_episodes())
        print(f"{game.name}: {len(steps)} steps at {session['fps']:.1f} frames/s, return "
              f"{sum(session['rewards']):g}; wrote {', '.join(map(str, paths))}", flush=True)


# ==== END OPTIONAL: play ====


def episode_to_mp4(path: str, meanings: list[str], size: int = 256) -> Path:
    """--episode-to-mp4: an episode .npz -> PATH.mp4, each frame captioned."""
    episode = read_episode(Path(path), len(meanings), "give an episode .npz and the --env-id it was recorded in")
    T, total, shown = len(episode["actions"]), 0.0, []
    for t, frame in enumerate(episode["obs"]):
        action = meanings[int(episode["actions"][t - 1])].lower() if t else "-"
        reward = float(episode["rewards"][t - 1]) if t else 0.0
        total += reward
        end = "".join(f"  {key}" for key in ("terminated", "truncated") if t and episode[key][t - 1])
        shown.append(with_caption(frame, size, [f"step {t}/{T}  action {action}  reward {reward:+g}  "
                                                f"return {total:g}{end}"]))
    out = Path(path).with_suffix(".mp4")
    write_mp4(out, np.stack(shown))
    print(f"wrote {out} ({T} steps)")
    return out


# --------------------------------------------------------------------------------------------------
# main() and the steps it reads as


def announce_run(run: Run, pos: RunPosition, resumed: bool, game: str, models: dict[str, nn.Module], setup):
    """Prints the run's folder, game, models, length and ETA; returns the phases' rates."""
    args, num_actions = run.args, run.collector.env.num_actions
    imagination = "eager" if run.graphs is None else "CUDA graphs" if setup.use_cuda else "compiled (inductor)"
    sizes = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    print(f"run folder: {run.run_dir}\ngame: {game} ({num_actions} actions); parameters: "
          f"{', '.join(f'{k} {v:,}' for k, v in sizes.items())}; device: {run.device}; imagination: {imagination}")
    for name, size in sizes.items() if not resumed else ():
        run.writer.add_scalar(f"charts/num_parameters_{name}", size, 0)
    length = f"the run: {len(run.schedule)} epochs"
    if not (run.collector.first_collection_steps or args.dataset_dir is not None):
        length += f" if the first collection is {args.initial_collection_steps} env steps (fixed when it ends)"
    print(length + ("" if args.dataset_dir else f", {sum(run.schedule)} env steps"), flush=True)
    if resumed:
        print(f"resuming at {pos}", flush=True)
    left = work_left(args, run.collector.first_collection_steps, pos)
    seconds_per_unit = time_phases(args, models, run.device, run.autocast, left)
    print("\n".join(run_time_lines(seconds_per_unit, left, setup)), flush=True)
    return seconds_per_unit


def save_position(run: Run, pos: RunPosition, log: EpochLog):
    """checkpoints/latest.pt where the run stands; never NaN weights over a good checkpoint."""
    if not log.finite():
        raise non_finite_failure(f"in {pos}", run.run_dir)
    save_checkpoint(run.run_dir / "checkpoints" / "latest.pt", run_checkpoint(run, pos, log))
    # as the progress bars name it: after epoch 2, or inside epoch 3's denoiser phase
    where = f"{pos.epoch - 1}" if pos.phase == 0 and pos.step == 0 else f"{pos.epoch} {pos.name}, step {pos.step}"
    print(f"saved checkpoint at epoch {where}", flush=True)


def end_epoch(run: Run, pos: RunPosition, log: EpochLog, epoch_start: float, seconds_per_unit: dict[str, float]):
    """An epoch's numbers written, its line printed, the agent kept every --save-agent-every."""
    args, collector = run.args, run.collector
    log.add("charts/epoch", pos.epoch)
    log.add("charts/env_steps", collector.env_steps)
    log.add("charts/buffer_transitions", run.buffer.num_transitions())
    for key, values in log.pending.items():
        run.writer.add_scalar(key, float(np.mean(values)), pos.global_step)
    # the epoch's line: each tag's epoch mean (losses: of their windows), the top action
    values = {**log.means, **log.pending}
    labels = {"losses/denoiser": "denoiser loss", "losses/reward_end": "reward/end loss",
              "losses/actor_critic": "actor-critic loss", "charts/episodic_return": "train return",
              "eval/episodic_return": "eval return", "world_model/next_frame_mse_changed": "next-frame mse (changed)",
              "world_model/copy_last_frame_mse_changed": "copy-last-frame mse (changed)",
              "world_model/reward_recall_pos": "rew+ recall", "world_model/reward_precision_pos": "rew+ precision",
              "eval/imagined_minus_real_return": "imag-real gap", "eval/imagined_return": "imag return",
              "eval/real_return": "real return"}
    parts = [f"{label} {np.mean(values[key]):.4g}" for key, label in labels.items() if key in values]
    shares = {key[18:]: value[0] for key, value in values.items() if key.startswith("eval/action_share_")}
    top = max(shares, key=shares.get, default=None)
    eta = seconds_left(seconds_per_unit, work_left(args, collector.first_collection_steps, RunPosition(pos.epoch + 1)))
    print(f"epoch {pos.epoch}/{len(run.schedule)} | env steps {collector.env_steps} | global step {pos.global_step} | "
          f"{' | '.join(parts + ([f'top action {top} {shares[top]:.2f}'] if top else []))} | "
          f"{time.perf_counter() - epoch_start:.1f} s, ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:"
          f"{int(eta % 60):02d}", flush=True)
    if not args.world_model_only and pos.epoch % args.save_agent_every == 0:
        keep_agent_copy(run.run_dir / "checkpoints", pos.epoch, run.learners["actor_critic"].model,
                        args.num_agents_to_keep)


def main(args: Args, given: set[str]):
    # ---- setup: the arguments (a resumed run's from its checkpoint), device, seeds, env, models
    checkpoint, run_dir, trains = None, None, True
    if args.episode_to_mp4 is not None:  # a file conversion: nothing else runs
        return episode_to_mp4(args.episode_to_mp4, make_env(args, args.seed).action_meanings)
    if args.play and args.play_keys is None:  # optional: play
        import_pygame()  # optional: play
    if args.resume:
        trains = not args.eval_only  # --eval-only writes no checkpoint: it reads any checkpoint file
        trains = trains and not (args.play or args.play_keys is not None)  # optional: play
        args, checkpoint, run_dir = resume_run(args, given, trains)  # a trainer locks the run first
    check_args(args, torchrun_world()[0])
    game, env_name = canonical_env_id(args.env_id)
    setup = setup_device(args)
    device, autocast = setup.device, autocast_context(setup, args.dtype)
    # two generators carry every random draw of training; evaluations seed theirs from (seed, epoch)
    cpu_generator = torch.Generator().manual_seed(args.seed)  # no-ops, exploration, replay sampling
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # diffusion, imagination
    stop = StopFlag()  # from here SIGTERM/SIGINT finish the step (or abandon an evaluation), save

    env = make_env(args, args.seed, cpu_generator)
    num_actions = env.num_actions  # the game's minimal action set sizes the networks
    ignored = [f"--{name.replace('_', '-')}" for name in env.ignored_flags if name in given]
    if ignored:  # Atari protocol flags that the game ignores
        print(f"notice: {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect on {game} (Atari "
              f"protocol flags)", flush=True)
    if trains:  # will the updates fit? one line if not
        check_training_memory(setup, args, num_actions)
    built = build_models(args, num_actions)
    models = {name: model.to(device) for name, model in zip(("denoiser", "reward_end", "actor_critic"), built)}
    denoiser, reward_end_model, actor_critic = models.values()
    learners = build_learners(args, models, setup.use_cuda)
    # the user's episodes: sampled by their lengths (recency is about the agent's data)
    buffer = ReplayBuffer(None, args.recency_weights if args.dataset_dir is None else None, args.num_conditioning_steps)
    collector, pos, log = Collector(env, buffer, cpu_generator, device), RunPosition(), EpochLog(device)
    train_ids = None  # None: every episode; with --dataset-dir, all but the held-out ones
    if args.dataset_dir is not None:
        train_ids, collector.heldout = load_dataset_dir(args, buffer, num_actions)
    if checkpoint is not None:
        pos = restore_run(checkpoint, collector, log, learners, cpu_generator, generator)
    # --compile: the U-Net of the denoiser's updates and the eager imagination (not evaluations)
    denoiser_net = torch.compile(denoiser.net, backend=COMPILE_BACKEND, dynamic=False) if args.compile else denoiser.net

    if args.eval_only:  # the checkpoint's agent plays --test-episodes full games
        what = f"{args.test_episodes} test episodes with the agent of epoch {pos.epoch - 1}"
        print(f"running {what} ...", flush=True)
        score_agent(args, actor_critic, env, device, autocast, stop, what, run_dir, pos.global_step)
        return stop.restore()
    if args.play or args.play_keys is not None:  # optional: play
        stop.restore()  # optional: play
        return play(args, run_dir, checkpoint, denoiser.eval(), reward_end_model.eval(),  # optional: play
                    env.action_meanings, device, autocast)  # optional: play
    schedule = run_schedule(args, collector.first_collection_steps)  # final once the first collection is
    if checkpoint is not None and pos.epoch > len(schedule):  # finished: say so, write nothing
        print(f"the run is already at epoch {pos.epoch - 1} of {len(schedule)}: raise --num-epochs to train on, "
              f"or play its test episodes again with --eval-only", flush=True)
        return stop.restore()

    # ---- the run folder (after the signal handlers: always checkpointed), TensorBoard, episodes
    run_dir, writer = open_writer(args, run_dir, pos.global_step, env_name)
    buffer.folder = run_dir / "episodes"  # its first num_buffer_files (any after: after saving)
    for i in range(checkpoint["num_buffer_files"] if checkpoint is not None else 0):
        buffer.add(load_episode(buffer.folder / f"episode_{i:06d}.npz", args.obs_size, num_actions,
                                "restore the file the run wrote there, or start a new run"), write=False)
    collector.share_partial()
    # the imagined episodes live across actor-critic updates, epochs and checkpoints, as in DIAMOND
    wm_env = WorldModelEnv(denoiser, reward_end_model, buffer, args, device, generator,
                           cpu_generator, denoiser_net, autocast, train_ids)
    if checkpoint is not None:
        wm_env.load_state_dict(checkpoint["imagination"])
    graphs = imagination_graphs(args, setup, wm_env, actor_critic, stop)  # compiled, or None
    mfu = mfu_per_update(args, num_actions, peak_flops(setup, args.dtype))
    run = Run(args, device, autocast, generator, cpu_generator, buffer, train_ids, learners, denoiser_net, wm_env,
              graphs, collector, writer, stop, run_dir, mfu, schedule)
    seconds_per_unit = announce_run(run, pos, checkpoint is not None, game, models, setup)

    # ---- train: DIAMOND's Algorithm 1, a phase at a time (a checkpoint may stop inside one)
    run_start, epoch_start = time.perf_counter(), time.perf_counter()
    while pos.epoch <= len(run.schedule):
        name, phase_start, first_step = pos.name, time.perf_counter(), pos.step
        works = phase_work(args, run.schedule, name, pos.epoch) > 0
        works = works and (name != "world_model_eval" or len(collector.heldout) > 0)
        with contextlib.suppress(StopRequested):  # an evaluation abandoned: a resume restarts it
            if works and name in ("denoiser", "reward_end", "actor_critic"):  # the models
                train_model(run, name, pos, log)
            elif works:  # the real game, the world model measured, the evaluation
                {"collect": collect, "world_model_eval": measure_world_model, "evaluate": evaluate}[name](run, pos, log)
        if stop.requested:  # the phase was cut short: save where it stands, not as done
            save_position(run, pos, log)
            print(f"stopped by signal at {pos}", flush=True)
            break
        seconds, steps = time.perf_counter() - phase_start, pos.step - first_step
        if works and (steps or name in ("world_model_eval", "evaluate")):  # evaluations: 1 unit
            seconds_per_unit[name] = seconds / max(steps, 1)  # the ETA's rates
        if pos.epoch == 1 and steps:
            print(f"epoch 1: {name} done ({pos.step} steps, {seconds:.1f} s)", flush=True)
        pos.phase, pos.step = pos.phase + 1, 0
        if pos.phase == len(PHASES):  # the end of the epoch: its numbers, maybe a save
            end_epoch(run, pos, log, epoch_start, seconds_per_unit)
            pos.epoch, pos.phase, epoch_start, log = pos.epoch + 1, 0, time.perf_counter(), EpochLog(device)
            if (pos.epoch - 1) % args.save_every == 0 or pos.epoch > len(run.schedule):
                save_position(run, pos, log)

    # ---- the test: the score the paper reports (full games, epsilon 0), then teardown
    if not stop.requested and not args.world_model_only:
        what = f"{args.test_episodes} test episodes after {len(run.schedule)} epochs, {collector.env_steps} env steps"
        if args.dataset_dir:
            what += " (real-game test episodes: this script's addition, DIAMOND plays none with a static dataset)"
        score_agent(args, actor_critic, env, device, autocast, stop, what, run_dir, pos.global_step, writer)
    print(f"{'stopped' if stop.requested else 'done'} after {time.perf_counter() - run_start:.1f} s: {run_dir}")
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
