# cleanworlds: DIAMOND (Alonso et al. 2024) on Atari 100k. Docs and measured results: README.md and benchmark/RESULTS.md
"""
DIAMOND: a diffusion world model (EDM denoiser on the last 4 frames and actions), a reward/termination model and an
actor-critic trained entirely in the world model's imagination, on the Atari 100k benchmark, in one file.

Reproduce the paper (Breakout 132.5, mean human-normalised score 1.46 over 26 games; about 3 days per game) on one GPU:
    python diamond_atari.py --env-id Breakout-v5 --num-sampling-steps 3
The same with smaller or larger networks (TorchWM's presets; medium is the paper's):
    python diamond_atari.py --env-id Pong-v5 --preset small
End to end in about 15 seconds on a CPU, offline (a shrunken protocol: small first epoch, short episodes):
    python diamond_atari.py --preset tiny
Only the world model, on a random policy's data or on your own recorded episodes (one .npz per episode):
    python diamond_atari.py --world-model-only --env-id Breakout-v5
    python diamond_atari.py --world-model-only --env-id Breakout-v5 --dataset-dir path/to/episodes
Continue a run, or run the 100 test episodes with its agent:
    python diamond_atari.py --resume runs/Breakout-v5__diamond_atari__1__1700000000
    python diamond_atari.py --resume runs/Breakout-v5__diamond_atari__1__1700000000 --eval-only
Watch it (world_model/* says whether the world model beats copying the last frame):
    tensorboard --logdir runs
"""
import argparse
import contextlib
import difflib
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT_NAME = "diamond_atari.py"
CHECKPOINT_FORMAT_VERSION = 1


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """deterministic algorithms (on CUDA also sets CUBLAS_WORKSPACE_CONFIG=:4096:8)"""
    cuda: bool = True
    """use CUDA when available (falls back to the CPU with a notice)"""
    track: bool = False
    """log to Weights and Biases as well as TensorBoard"""
    wandb_project_name: str = "cleanworlds"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    output_dir: str = "runs"
    """runs are written to {output_dir}/{run_name}/"""
    preset: Optional[Literal["tiny", "small", "medium", "large"]] = None
    """tiny = a full run in about 15 s on a CPU; small/medium/large = TorchWM's network sizes (medium: the paper's)"""
    config: Optional[str] = None
    """a config.json written by an earlier run: its values become the defaults (flags still win)"""
    resume: Optional[str] = None
    """a run folder or checkpoint file to continue exactly where it stopped"""
    eval_only: bool = False
    """with --resume: only run --test-episodes test episodes with the checkpoint's agent"""
    world_model_only: bool = False
    """train and evaluate only the world model (denoiser, reward/end model), on random-policy data or --dataset-dir"""
    compile: bool = False
    """torch.compile the denoiser's U-Net"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """float32 (with TF32 matmuls on CUDA, as DIAMOND's reference), or bfloat16/float16 autocast on CUDA (float16
    uses GradScalers); the CPU always computes in float32"""

    # Environment: Atari 100k as DIAMOND runs it
    env_id: Annotated[str, tyro.conf.arg(aliases=("--game",))] = "Breakout-v5"
    """Atari game: Breakout-v5, ALE/Breakout-v5 or BreakoutNoFrameskip-v4 (same protocol); alias --game"""
    sticky_actions: bool = False
    """sticky actions (repeat_action_probability 0.25, the ALE v5 default); off in Atari 100k as DIAMOND runs it"""
    noop_max: int = 30
    """at most this many no-op frames after each reset (a random number from 1 to noop_max)"""
    frame_skip: int = 4
    """each action is repeated this many frames; the observation is the max over the last two"""
    obs_size: int = 64
    """observations are RGB obs_size x obs_size (cv2.INTER_AREA)"""
    max_episode_steps: int = 27_000
    """an episode (a whole game) is truncated after this many agent steps (108,000 frames)"""
    epsilon: float = 0.01
    """probability of a uniformly random action when collecting (test episodes use 0)"""
    dataset_dir: Optional[str] = None
    """with --world-model-only: train on the episode .npz files in this folder instead of collecting"""

    # Denoiser (the diffusion world model)
    diffusion_channels: tuple[int, ...] = (64, 64, 64, 64)
    """channels of the U-Net levels (each level after the first halves the resolution)"""
    diffusion_res_blocks: int = 2
    """residual blocks per U-Net level on the way down (one more on the way up)"""
    diffusion_cond_dim: int = 256
    """size of the noise-level + action embedding that drives the adaptive group norms"""
    num_conditioning_steps: int = 4
    """past frames and actions the world model is conditioned on"""
    sigma_data: float = 0.5
    """EDM sigma_data: the standard deviation of the (scaled) frames"""
    sigma_offset_noise: float = 0.3
    """offset noise: a per-(image, channel) constant noise of this scale is added in training"""
    train_sigma_loc: float = -0.4
    """training noise levels: ln(sigma) ~ N(loc, scale^2)"""
    train_sigma_scale: float = 1.2
    """training noise levels: ln(sigma) ~ N(loc, scale^2)"""
    train_sigma_min: float = 2e-3
    """training noise levels are clipped to [train_sigma_min, train_sigma_max]"""
    train_sigma_max: float = 20.0
    """training noise levels are clipped to [train_sigma_min, train_sigma_max]"""
    num_autoregressive_steps: int = 1
    """extra denoiser predictions per training segment, each conditioned on the previous one's 8-bit output (DIAMOND:
    1, i.e. segments of num_conditioning_steps + 2 frames and two predictions; 0: one prediction)"""

    # Sampler
    sampler: Literal["euler", "heun"] = "euler"
    """ODE solver over the Karras sigmas: euler (DIAMOND) or heun (order 2, about twice the network calls)"""
    num_sampling_steps: int = 3
    """denoising steps per generated frame"""
    sigma_min: float = 2e-3
    """smallest sigma of the Karras schedule"""
    sigma_max: float = 5.0
    """largest sigma of the Karras schedule"""
    rho: float = 7.0
    """rho of the Karras schedule"""
    edm_initial_noise: bool = False
    """start sampling from sigma_max * noise (EDM) instead of unit-variance noise (DIAMOND's reference code)"""

    # Reward / termination model
    reward_channels: int = 32
    """channels of the reward/end model's convolutional encoder"""
    reward_cond_dim: int = 128
    """action embedding size of the reward/end model"""
    reward_lstm_dim: int = 512
    """LSTM size of the reward/end model"""
    reward_segment_length: int = 19
    """frames per reward/end training segment, so one transition fewer (DIAMOND: imagination horizon 15 + 4
    conditioning steps)"""

    # Actor-critic
    actor_channels: tuple[int, ...] = (32, 32, 64, 64)
    """channels of the actor-critic's encoder stages (each halves the resolution)"""
    actor_lstm_dim: int = 512
    """LSTM size of the actor-critic"""
    imagination_horizon: int = 15
    """an imagined episode is truncated after this many steps and restarts from a real segment"""
    backup_every: int = 15
    """imagined steps per actor-critic update (the imagined episodes go on across updates)"""
    num_imagined_envs: int = 32
    """imagined environments per actor-critic update"""
    discount_factor: float = 0.985
    """discount gamma of the lambda-returns"""
    td_lambda: float = 0.95
    """lambda of the lambda-returns"""
    entropy_weight: float = 0.001
    """weight of the entropy bonus"""

    # Training loop
    num_epochs: int = 1000
    """epochs to train for (collect, then train denoiser, reward/end model, actor-critic)"""
    initial_collection_steps: int = 5000
    """env steps collected in epoch 1"""
    max_initial_collection_steps: int = 10_000
    """epoch 1 keeps collecting (100 steps at a time) until --min-nonzero-rewards rewards are seen, up to this"""
    min_nonzero_rewards: int = 10
    """epoch 1 collects until the buffer holds this many transitions with a non-zero reward"""
    collection_steps_per_epoch: int = 100
    """env steps collected in each epoch after the first collection (epoch 1 included)"""
    env_step_budget: int = 100_000
    """env steps collected in the whole run (Atari 100k): the first collection, then collection_steps_per_epoch per
    epoch until the budget is spent"""
    final_epochs_without_collection: int = 50
    """epochs that only train, after the budget is spent"""
    denoiser_steps_per_epoch: int = 400
    """denoiser gradient steps per epoch"""
    reward_steps_per_epoch: int = 400
    """reward/end model gradient steps per epoch"""
    actor_critic_steps_per_epoch: int = 400
    """actor-critic gradient steps per epoch"""
    first_epoch_denoiser_steps: int = 10_000
    """denoiser gradient steps in epoch 1"""
    first_epoch_reward_steps: int = 10_000
    """reward/end model gradient steps in epoch 1"""
    first_epoch_actor_critic_steps: int = 5000
    """actor-critic gradient steps in epoch 1"""
    batch_size: int = 32
    """segments per denoiser and reward/end model batch"""
    recency_weights: tuple[float, ...] = (0.1, 0.1, 0.1, 0.7)
    """replay sampling weight of each chronological slice of the episodes (oldest first; with fewer episodes than
    slices, episodes are weighted by their length)"""
    learning_rate: float = 1e-4
    """AdamW learning rate (all three components)"""
    adam_eps: float = 1e-8
    """AdamW epsilon"""
    warmup_steps: int = 100
    """linear learning-rate warmup steps"""
    weight_decay: float = 1e-2
    """AdamW weight decay of the denoiser and the reward/end model (the actor-critic uses none)"""
    denoiser_max_grad_norm: float = 1.0
    """gradient clipping norm of the denoiser"""
    max_grad_norm: float = 100.0
    """gradient clipping norm of the reward/end model and the actor-critic"""
    save_every: int = 1
    """write checkpoints/latest.pt every N epochs"""
    eval_every: int = 10
    """every N epochs: test episodes and an imagined rollout beside the real one"""
    eval_episodes: int = 4
    """test episodes at each evaluation"""
    test_episodes: int = 100
    """test episodes at the end (the score the paper reports) and with --eval-only"""
    num_heldout_transitions: int = 100
    """unseen real transitions the world_model/* metrics are computed on"""


PRESETS = {
    # A full run in ~15 s on 2 CPU cores: 32x32 frames, small networks, a short first epoch, 200-step episodes.
    "tiny": dict(
        obs_size=32, diffusion_channels=(8, 8, 8), diffusion_res_blocks=1, diffusion_cond_dim=16, reward_channels=8,
        reward_cond_dim=8, reward_lstm_dim=16, actor_channels=(8, 8, 8, 8), actor_lstm_dim=16, imagination_horizon=4,
        backup_every=4, num_imagined_envs=4, reward_segment_length=8, num_epochs=2, initial_collection_steps=200,
        max_initial_collection_steps=300, min_nonzero_rewards=1, collection_steps_per_epoch=50,
        final_epochs_without_collection=0, denoiser_steps_per_epoch=10, reward_steps_per_epoch=10,
        actor_critic_steps_per_epoch=5, first_epoch_denoiser_steps=20, first_epoch_reward_steps=20,
        first_epoch_actor_critic_steps=5, batch_size=8, learning_rate=1e-3, warmup_steps=5, max_episode_steps=200,
        eval_every=1, eval_episodes=1, test_episodes=2, num_heldout_transitions=32,
    ),
    "small": dict(diffusion_channels=(32, 32, 32, 32), diffusion_cond_dim=128, reward_channels=16,
                  reward_lstm_dim=256, actor_channels=(16, 16, 32, 32), actor_lstm_dim=256),
    "medium": dict(),  # the paper's networks: the defaults
    "large": dict(diffusion_channels=(128, 128, 128, 128), diffusion_res_blocks=3, diffusion_cond_dim=512,
                  reward_channels=64, reward_lstm_dim=1024, actor_channels=(64, 64, 128, 128), actor_lstm_dim=1024),
}
# Flags that may change when a run is resumed: the run length, checkpoint/eval cadence, logging and evaluation.
RESUME_MUTABLE_FIELDS = {
    "num_epochs", "save_every", "eval_every", "track", "wandb_project_name", "wandb_entity", "resume", "eval_only",
    "eval_episodes", "test_episodes", "cuda", "compile", "config", "output_dir",
}
FLAG_ALIASES = {"--game": "env_id"}


class UserError(Exception):
    """Bad input: printed as one line, exit status 2."""


class TrainingFailure(Exception):
    """The run cannot go on (a non-finite loss): printed as one line, exit status 1, last checkpoint kept."""


# ----------------------------------------------------------------------------------------------------------------------
# Data: Atari with DIAMOND's protocol, episodes as .npz files, and the replay buffer.

# (random, human) scores for the human-normalised score HNS = (score - random) / (human - random), Atari 100k games.
ATARI_SCORES = {
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0), "Asterix": (210.0, 8503.3),
    "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5), "Boxing": (0.1, 12.1), "Breakout": (1.7, 30.5),
    "ChopperCommand": (811.0, 7387.8), "CrazyClimber": (10780.5, 35829.4), "DemonAttack": (152.1, 1971.0),
    "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5), "Hero": (1027.0, 30826.4),
    "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0), "Krull": (1598.0, 2665.5),
    "KungFuMaster": (258.5, 22736.3), "MsPacman": (307.3, 6951.6), "Pong": (-20.7, 14.6),
    "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0), "RoadRunner": (11.5, 7845.0),
    "Seaquest": (68.4, 42054.7), "UpNDown": (533.4, 11693.2),
}


def atari_games() -> list[str]:
    """Every game ale-py ships (from gymnasium's registry of ALE/<Game>-v5 ids)."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Warning)  # no banner on stderr: an error stays one line
    return sorted(key[len("ALE/"): -len("-v5")] for key in gym.registry
                  if key.startswith("ALE/") and key.endswith("-v5"))


def canonical_env_id(env_id: str) -> tuple[str, str]:
    """Breakout-v5, ALE/Breakout-v5, BreakoutNoFrameskip-v4 (or Breakout) -> ("Breakout", "Breakout-v5").

    The spelling only names the game: the protocol (no sticky actions, our own frame skip) is the same for all three,
    and so is the id in the run name (which has no slash)."""
    match = re.fullmatch(r"(?:ALE/)?([A-Za-z0-9]+?)(?:NoFrameskip-v4|-v5|-v4)?", env_id.strip())
    games = atari_games()
    if match and match.group(1) in games:
        return match.group(1), f"{match.group(1)}-v5"
    spellings = [f"{g}-v5" for g in games]
    close = difflib.get_close_matches(env_id.replace("ALE/", "").replace("NoFrameskip-v4", "-v5"), spellings, n=3,
                                      cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"games are named like {', '.join(spellings[:3])}, ..."
    raise UserError(f"unknown Atari env id {env_id!r}: {hint} (Breakout-v5, ALE/Breakout-v5 and "
                    f"BreakoutNoFrameskip-v4 are accepted for every ALE game)")


class AtariEnv:
    """One ALE game with DIAMOND's Atari 100k protocol, on gymnasium 1.x / ale-py.

    The emulator is made with frameskip=1 and no sticky actions (ALE v5 defaults to frameskip 4 and sticky actions
    0.25), and this class does the rest itself: up to noop_max no-ops after a reset, each action repeated frame_skip
    frames with the reward summed and the observation the max over the last two frames (Atari sprites flicker),
    RGB resized to obs_size x obs_size with INTER_AREA. With end_on_life_loss (training), losing a life ends the
    episode (terminated) but not the game: the next episode continues from the same screen. Its whole state
    (emulator with its RNG, lives, counters, current observation) goes into checkpoints for an exact resume."""

    def __init__(self, game: str, obs_size: int = 64, frame_skip: int = 4, noop_max: int = 30,
                 sticky_actions: bool = False, max_episode_steps: int = 27_000, end_on_life_loss: bool = True,
                 generator: Optional[torch.Generator] = None, seed: int = 0):
        import ale_py
        import gymnasium as gym

        gym.register_envs(ale_py)
        # max_num_frames_per_episode=0: the time limit is counted here, in agent steps, so that it is part of our state
        self.env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.25 if sticky_actions else 0.0,
                            full_action_space=False, max_num_frames_per_episode=0).unwrapped
        self.ale = self.env.ale
        self.num_actions = int(self.env.action_space.n)  # the minimal action set
        self.obs_size, self.frame_skip, self.noop_max = obs_size, frame_skip, noop_max
        self.max_episode_steps, self.end_on_life_loss = max_episode_steps, end_on_life_loss
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.env.reset(seed=seed)  # seeds the emulator's RNG once; later game resets continue its stream
        self.game_over, self.lives, self.game_steps, self.game_return = True, 0, 0, 0.0
        self.obs = np.zeros((obs_size, obs_size, 3), dtype=np.uint8)

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        import cv2

        return cv2.resize(frame, (self.obs_size, self.obs_size), interpolation=cv2.INTER_AREA)

    def reset(self) -> np.ndarray:
        """Starts an episode: a new game (with random no-ops) after a game over, else the next life of this game."""
        if self.game_over:
            self.env.reset()
            frame = self.ale.getScreenRGB()
            num_noops = int(torch.randint(1, self.noop_max + 1, (1,), generator=self.generator)) if self.noop_max else 0
            for _ in range(num_noops):
                frame, _, terminated, truncated, _ = self.env.step(0)
                if terminated or truncated:
                    self.env.reset()
                    frame = self.ale.getScreenRGB()
            self.obs = self.preprocess(frame)
            self.game_over, self.lives, self.game_steps, self.game_return = False, self.ale.lives(), 0, 0.0
        return self.obs

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool]:
        """(obs, reward, terminated, truncated); self.game_over says whether the whole game ended."""
        reward, last_frames, game_over = 0.0, [], False
        for k in range(self.frame_skip):
            frame, r, terminated, truncated, _ = self.env.step(action)
            reward += float(r)
            last_frames = (last_frames + [frame])[-2:]
            if terminated or truncated:
                game_over = True
                break
        pooled = np.maximum(last_frames[0], last_frames[-1])  # max over the last two frames: sprites flicker
        self.obs = self.preprocess(pooled)
        self.game_steps += 1
        self.game_return += reward
        lives = self.ale.lives()
        life_lost, self.lives = lives < self.lives, lives
        time_out = self.game_steps >= self.max_episode_steps and not game_over
        self.game_over = game_over or time_out
        terminated = game_over or (self.end_on_life_loss and life_lost)
        return self.obs, reward, terminated, time_out and not terminated

    def state_dict(self) -> dict:
        # cloneState(include_rng=True): the emulator and its RNG (sticky actions), serialised to bytes -> uint8 tensor
        ale_state = self.ale.cloneState(include_rng=True).serialize()
        return {"ale": torch.frombuffer(bytearray(ale_state), dtype=torch.uint8).clone(), "game_over": self.game_over,
                "lives": self.lives, "game_steps": self.game_steps, "game_return": self.game_return,
                "obs": torch.from_numpy(self.obs.copy())}

    def load_state_dict(self, state: dict):
        import ale_py

        self.ale.restoreState(ale_py.ALEState(state["ale"].numpy().tobytes()))
        self.game_over, self.lives = state["game_over"], state["lives"]
        self.game_steps, self.game_return = state["game_steps"], state["game_return"]
        self.obs = state["obs"].numpy().copy()


EPISODE_KEYS = {"obs": np.uint8, "actions": np.int64, "rewards": np.float32, "terminated": np.bool_,
                "truncated": np.bool_}


def save_episode(path: Path, episode: dict):
    """One .npz per episode (CONTRACT section 3), written atomically: obs uint8 (T+1, H, W, 3), actions int64 (T,),
    rewards float32 (T,), terminated and truncated bool (T,)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **{key: np.asarray(episode[key], dtype=dtype) for key, dtype in EPISODE_KEYS.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_episode(path: Path, num_actions: int, fix: str) -> dict:
    """An episode .npz (CONTRACT section 3), read with allow_pickle=False (a file cannot run code) and checked field by
    field; a bad file is refused with one line naming it, the field and `fix`. Returns the fields in their dtypes."""
    def bad(problem: str) -> UserError:
        return UserError(f"{path}: {problem}; {fix}")

    try:
        with np.load(path, allow_pickle=False) as data:
            episode = {key: data[key] for key in EPISODE_KEYS if key in data}
    except Exception as e:  # noqa: BLE001 - a missing, corrupt or pickled file is the same user-facing error
        reason = str(e).splitlines()[0][:150] if str(e) else e.__class__.__name__
        raise bad(f"cannot read it as an episode .npz ({reason})") from None
    missing = [key for key in EPISODE_KEYS if key not in episode]
    if missing:
        raise bad(f"no {', '.join(missing)} (an episode .npz holds obs uint8 (T+1, H, W, 3), actions int64 (T,), "
                  f"rewards float32 (T,), terminated and truncated bool (T,))")
    obs = episode["obs"]
    if obs.dtype != np.uint8 or obs.ndim != 4 or obs.shape[-1] != 3 or min(obs.shape[:3]) < 1:
        raise bad(f"obs is {obs.dtype} {obs.shape}, not uint8 (T+1, H, W, 3) RGB frames")
    if len(obs) < 2:
        raise bad("obs holds a single frame: an episode needs at least one step")
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
    return {"obs": obs, "actions": actions.astype(np.int64), "rewards": rewards.astype(np.float32),
            "terminated": episode["terminated"], "truncated": episode["truncated"]}


def load_episode(path: Path, obs_size: int, num_actions: int, fix: str = "fix the file or remove it") -> dict:
    """An episode file (read_episode), its frames resized to obs_size."""
    import cv2

    episode = read_episode(path, num_actions, fix)
    if episode["obs"].shape[1:3] != (obs_size, obs_size):
        episode["obs"] = np.stack([cv2.resize(frame, (obs_size, obs_size), interpolation=cv2.INTER_AREA)
                                   for frame in episode["obs"]])
    return episode


class ReplayBuffer:
    """Finished episodes (in memory, and one .npz file each in the run folder) plus the episode being collected.

    Sampling as DIAMOND's reference does it: an episode with the recency weights over chronological slices of the
    episodes (DIAMOND: [0.1, 0.1, 0.1, 0.7] over quarters; fewer episodes than slices, or no weights: in proportion to
    their length), a time step t uniformly inside it, then a segment around t. Frames outside the episode are padding:
    mid-grey (0.0 in [-1, 1]), action 0, and masked out of every loss."""

    def __init__(self, folder: Optional[Path], recency_weights: Optional[tuple[float, ...]],
                 num_conditioning_steps: int):
        self.folder, self.recency_weights, self.num_cond = folder, recency_weights, num_conditioning_steps
        self.episodes: list[dict] = []
        self.partial: Optional[dict] = None  # the episode being collected (sampled too, as the newest)

    @staticmethod
    def to_tensors(episode: dict) -> dict:
        return {"obs": torch.from_numpy(np.ascontiguousarray(np.asarray(episode["obs"]).transpose(0, 3, 1, 2))),
                **{key: torch.from_numpy(np.asarray(episode[key], dtype=EPISODE_KEYS[key]))
                   for key in ("actions", "rewards", "terminated", "truncated")}}

    def add(self, episode: dict, write: bool = True):
        if write and self.folder is not None:
            save_episode(self.folder / f"episode_{len(self.episodes):06d}.npz", episode)
        self.episodes.append(self.to_tensors(episode))

    def episode(self, index: int) -> dict:
        return self.partial if index == -1 else self.episodes[index]

    def sampleable(self) -> list[int]:
        ids = list(range(len(self.episodes)))
        if self.partial is not None and len(self.partial["actions"]) > 0:
            ids.append(-1)
        return ids

    def num_transitions(self) -> int:
        return sum(len(self.episode(i)["actions"]) for i in self.sampleable())

    def episode_weights(self, ids: list[int]) -> torch.Tensor:
        """Sampling probability of each episode in ids (oldest first). With k recency weights and n >= k episodes, the
        weight w_s is shared by the n // k episodes of slice s, and the newest slice also takes the n % k leftovers;
        with n < k (or no weights): p_i = T_i / sum_j T_j."""
        n, weights = len(ids), self.recency_weights
        lengths = torch.tensor([len(self.episode(i)["actions"]) for i in ids], dtype=torch.float64)
        if weights is None or n < len(weights):
            return lengths / lengths.sum()
        k = len(weights)
        sizes = [n // k] * (k - 1) + [n // k + n % k]  # chronological slices; the leftovers go to the newest
        probs = torch.tensor([w / size for w, size in zip(weights, sizes) for _ in range(size)], dtype=torch.float64)
        return probs / probs.sum()

    def sample_segments(self, batch_size: int, num_obs: int, generator: torch.Generator,
                        ids: Optional[list[int]] = None, beyond_end: bool = False) -> list[tuple[int, int]]:
        """(episode id, start) of batch_size segments of num_obs frames. t ~ U{0..T-1} in the chosen episode; then
        beyond_end=False (denoiser, imagination starts): stop = min(T, t + 1 + U{0..L-1}), start = stop - L, so the
        segment ends at or before frame T-1 and may start before the episode; beyond_end=True (reward/end model):
        start = t - U{0..L-1}, padded on both sides."""
        ids = self.sampleable() if ids is None else ids
        chosen = torch.multinomial(self.episode_weights(ids), batch_size, replacement=True, generator=generator)
        lengths = torch.tensor([len(self.episode(ids[k])["actions"]) for k in chosen.tolist()])
        t = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * lengths).long()  # U{0..T-1}
        offset = torch.randint(num_obs, (batch_size,), generator=generator)  # U{0..L-1}
        starts = t - offset if beyond_end else torch.minimum(lengths, t + 1 + offset) - num_obs
        return [(ids[k], s) for k, s in zip(chosen.tolist(), starts.tolist())]

    def segments(self, refs: list[tuple[int, int]], num_obs: int) -> dict:
        """Batches segments of num_obs frames starting at the given (episode, start): obs uint8 (B, L, 3, H, W) with
        obs_mask (B, L) (True where the frame belongs to the episode: frames 0..T); actions/rewards/ends (B, L-1) and
        mask (B, L-1) (True where the transition is real). Padding holds 0 in obs (segment_obs turns it into 0.0) and
        in actions and rewards."""
        out = {key: [] for key in ("obs", "obs_mask", "actions", "rewards", "ends", "mask")}
        for index, start in refs:
            ep = self.episode(index)
            T = len(ep["actions"])
            frames = torch.arange(start, start + num_obs)
            real_frame = (frames >= 0) & (frames <= T)
            steps = frames[:-1]
            valid = (steps >= 0) & (steps < T)
            clipped = steps.clamp(0, T - 1)
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
    """[-1, 1] -> {0..255}, rounding: the exact inverse of to_float on 8-bit frames (for storing and showing frames)."""
    return ((obs.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """The denoiser's output as an 8-bit frame, back in [-1, 1], as DIAMOND's reference quantises it: clamp, then
    floor((x + 1) / 2 * 255) (a cast to uint8), then q / 255 * 2 - 1."""
    return ((x.float().clamp(-1, 1) + 1) / 2 * 255).floor() / 127.5 - 1.0


def segment_obs(batch: dict, device: torch.device) -> torch.Tensor:
    """The segments' frames on the device, in [-1, 1], with padding frames mid-grey (0.0) as DIAMOND pads them."""
    obs = to_float(batch["obs"].to(device, non_blocking=True))
    return torch.where(batch["obs_mask"].to(device)[:, :, None, None, None], obs, 0.0)


def sample_denoiser_batch(buffer: ReplayBuffer, args: Args, generator: torch.Generator, device: torch.device,
                          ids: Optional[list[int]] = None) -> dict:
    """A denoiser batch: segments of c + 1 + num_autoregressive_steps frames (DIAMOND: 4 + 1 + 1 = 6) as
    denoiser_loss takes them: obs float (B, L, 3, H, W), actions (B, L - 1), obs_mask (B, L)."""
    num_obs = args.num_conditioning_steps + 1 + args.num_autoregressive_steps
    batch = buffer.segments(buffer.sample_segments(args.batch_size, num_obs, generator, ids), num_obs)
    return {"obs": segment_obs(batch, device), "actions": batch["actions"].to(device),
            "obs_mask": batch["obs_mask"].to(device)}


def sample_reward_end_batch(buffer: ReplayBuffer, args: Args, generator: torch.Generator, device: torch.device,
                            ids: Optional[list[int]] = None) -> dict:
    """A reward/end batch: segments of reward_segment_length frames (DIAMOND: 19, i.e. 18 transitions) starting at
    t - U{0..18}, padded on both sides: obs float (B, L, 3, H, W), actions/rewards/ends/mask (B, L - 1)."""
    num_obs = args.reward_segment_length
    batch = buffer.segments(buffer.sample_segments(args.batch_size, num_obs, generator, ids, beyond_end=True), num_obs)
    return {"obs": segment_obs(batch, device),
            **{key: batch[key].to(device) for key in ("actions", "rewards", "ends", "mask")}}


# ----------------------------------------------------------------------------------------------------------------------
# Diffusion (EDM, Karras et al. 2022), as DIAMOND uses it: preconditioning with offset noise, log-normal sigmas.


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5, sigma_offset_noise: float = 0.3):
    """(c_in, c_skip, c_out, c_noise) for D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

    The noisy input also carries offset noise of scale sigma_offset_noise, so (like DIAMOND's reference code) the
    coefficients use the effective level sigma_eff = sqrt(sigma^2 + sigma_offset^2)."""
    sigma_eff = (sigma ** 2 + sigma_offset_noise ** 2).sqrt()
    c_in = 1 / (sigma_eff ** 2 + sigma_data ** 2).sqrt()  # unit-variance network input
    c_skip = sigma_data ** 2 / (sigma_eff ** 2 + sigma_data ** 2)
    c_out = sigma_eff * c_skip.sqrt()  # = sigma_eff sigma_data / sqrt(sigma_eff^2 + sigma_data^2)
    c_noise = sigma_eff.log() / 4
    return c_in, c_skip, c_out, c_noise


def sample_training_sigma(batch_size: int, args: Args, generator: torch.Generator, device) -> torch.Tensor:
    """ln(sigma) ~ N(loc, scale^2), clipped to [train_sigma_min, train_sigma_max]."""
    log_sigma = args.train_sigma_loc + args.train_sigma_scale * torch.randn(batch_size, generator=generator,
                                                                           device=device)
    return log_sigma.exp().clip(args.train_sigma_min, args.train_sigma_max)


def karras_sigmas(n: int, sigma_min: float = 2e-3, sigma_max: float = 5.0, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < n, then 0 appended."""
    if n == 1:
        ramp = torch.zeros(1, dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


# ----------------------------------------------------------------------------------------------------------------------
# Model: DIAMOND's denoiser U-Net (about 4.4M parameters for a 4-action game), reward/end model, actor-critic.


def init_lstm(lstm: nn.Module):
    """Xavier input weights, orthogonal recurrent weights, zero biases except the forget gate's (1)."""
    for name, p in lstm.named_parameters():
        if "weight_ih" in name:
            nn.init.xavier_uniform_(p)
        elif "weight_hh" in name:
            nn.init.orthogonal_(p)
        elif "bias" in name:
            nn.init.zeros_(p)
            if "bias_ih" in name:  # gates are ordered input, forget, cell, output
                nn.init.ones_(p[p.shape[0] // 4: p.shape[0] // 2])


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weights of linear, convolution and LSTM layers only (not on biases, norms, embeddings)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_weight = name == "weight" or name.startswith("weight_")
            decayed = is_weight and isinstance(module, (nn.Linear, nn.Conv2d, nn.LSTM, nn.LSTMCell))
            (decay if decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_norm(channels: int, affine: bool = True) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 32), channels, eps=1e-5, affine=affine)  # groups of 32 channels


class FourierFeatures(nn.Module):
    """Random Fourier features of the scalar noise level: [cos(2 pi w c), sin(2 pi w c)], w ~ N(0, 1) fixed."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(1, dim // 2))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        # always fp32: in bf16 the angles 2 pi w c_noise (up to ~20 rad) would lose about 0.1 rad
        with torch.autocast(c_noise.device.type, enabled=False):
            angles = 2 * math.pi * c_noise[:, None].float() @ self.weight.float()
            return torch.cat([angles.cos(), angles.sin()], dim=1)


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then x (1 + scale) + shift with scale, shift = Linear(cond)."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = group_norm(channels, affine=False)
        self.linear = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(cond)[:, :, None, None].chunk(2, dim=1)
        return self.norm(x) * (1 + scale) + shift


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions (head dim 8), zero-initialised output projection.

    As in DIAMOND's reference code, the residual adds the attention output to the group-normalised input (not to the
    raw input): the block computes GN(x) + proj(attention(GN(x)))."""

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
    """AdaGN-SiLU-conv3x3, AdaGN-SiLU-conv3x3 (zero-init), + 1x1 shortcut if channels change, optional attention."""

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


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        nn.init.orthogonal_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """DIAMOND's U-Net: per level res_blocks ResBlocks down and res_blocks + 1 up (skip concat), a stride-2 conv
    between levels, and the only self-attention in the 2-block middle at the lowest resolution."""

    def __init__(self, cond_dim: int, channels: tuple[int, ...], res_blocks: int):
        super().__init__()
        self.down_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(channels):
            c_prev = channels[max(0, i - 1)]
            self.down_blocks.append(ResBlocks([c_prev] + [c] * (res_blocks - 1), [c] * res_blocks, cond_dim))
            # up: res_blocks blocks concatenate a block output (c), the last one the level's input (c_prev)
            self.up_blocks.append(ResBlocks([2 * c] * res_blocks + [c + c_prev], [c] * res_blocks + [c_prev],
                                            cond_dim))
        self.mid_blocks = ResBlocks([channels[-1]] * 2, [channels[-1]] * 2, cond_dim, attention=True)
        self.downsamples = nn.ModuleList([nn.Identity()] + [Downsample(c) for c in channels[:-1]])
        self.upsamples = nn.ModuleList([nn.Identity()] + [Upsample(c) for c in reversed(channels[:-1])])

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
    """F_theta(c_in x, c_noise, past frames, past actions): the network inside the EDM preconditioning.

    The 4 past frames (divided by sigma_data) are concatenated on channels with the scaled noisy next frame; the past
    actions are embedded, flattened and added to the Fourier features of c_noise, and this vector drives the adaptive
    group norms of every ResBlock."""

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
    """D(x; sigma, past) = c_skip x + c_out F(c_in x, c_noise, past / sigma_data, actions), frames in [-1, 1]."""

    def __init__(self, net: DenoiserNet, sigma_data: float = 0.5, sigma_offset_noise: float = 0.3):
        super().__init__()
        self.net, self.sigma_data, self.sigma_offset_noise = net, sigma_data, sigma_offset_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, act: torch.Tensor, net=None):
        """Returns (F output, D(x)). x: (B, 3, H, W) noisy next frame; sigma: (B,); obs: (B, 4*3, H, W) past frames;
        act: (B, 4) past actions. net: the (possibly compiled) network to call."""
        c_in, c_skip, c_out, c_noise = edm_preconditioning(sigma.float(), self.sigma_data, self.sigma_offset_noise)
        c_in, c_skip, c_out = (c[:, None, None, None] for c in (c_in, c_skip, c_out))
        model_output = (net or self.net)(c_in * x, c_noise, obs / self.sigma_data, act).float()
        return model_output, c_skip * x + c_out * model_output

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, obs: torch.Tensor, act: torch.Tensor, net=None):
        """D(x; sigma) for sampling: clamped to [-1, 1] and quantised to 8 bits by flooring (the frames are 8-bit
        images; DIAMOND's reference casts to uint8)."""
        _, denoised = self(x, sigma, obs, act, net)
        return quantize_8bit(denoised)


def denoiser_loss(denoiser: Denoiser, obs: torch.Tensor, actions: torch.Tensor, obs_mask: torch.Tensor, args: Args,
                  generator: torch.Generator, net=None) -> torch.Tensor:
    """EDM loss on segments of c + 1 + n frames (DIAMOND: c = 4, n = num_autoregressive_steps = 1, so 6 frames):
    obs (B, c + 1 + n, 3, H, W) in [-1, 1], actions (B, >= c + n), obs_mask (B, c + 1 + n) (True for real frames).

    Prediction k = 0..n denoises frame c + k from frames k..c+k-1 and actions k..c+k-1:
    x_noisy = x0 + sigma_offset n_bc + sigma n; loss_k = || F(...) - (x0 - c_skip x_noisy) / c_out ||^2 (plain MSE,
    which with the EDM c_out equals the weighted loss on D), over the segments whose frame c + k is real. Frame c + k
    is then replaced by D's clamped, 8-bit-quantised output (no gradient through it), which prediction k + 1 sees as
    its last past frame, as it would in imagination. loss = mean_k loss_k."""
    c = args.num_conditioning_steps
    num_predictions = obs.shape[1] - c  # 1 + num_autoregressive_steps (the segment length decides, as in DIAMOND)
    obs = obs.clone()
    b, _, ch, h, w = obs.shape
    total = obs.new_zeros(())
    for k in range(num_predictions):
        past, next_obs = obs[:, k: k + c].reshape(b, c * ch, h, w), obs[:, k + c]
        act, valid = actions[:, k: k + c], obs_mask[:, k + c].float()
        sigma = sample_training_sigma(b, args, generator, obs.device)
        offset_noise = args.sigma_offset_noise * torch.randn((b, ch, 1, 1), generator=generator, device=obs.device)
        noise = torch.randn(next_obs.shape, generator=generator, device=obs.device)
        noisy = next_obs + offset_noise + sigma[:, None, None, None] * noise  # x0 + sigma_offset n_bc + sigma n
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
    """Predicts the sign of the reward (3 classes: -1, 0, +1) and whether the episode ends (2 classes) of a transition
    (obs_t, a_t, obs_t+1): a conv encoder with action-conditioned ResBlocks (64 -> 8 pixels), flattened into an LSTM
    that carries the history, then an MLP head."""

    def __init__(self, num_actions: int, obs_size: int = 64, channels: int = 32, cond_dim: int = 128,
                 lstm_dim: int = 512, img_channels: int = 3):
        super().__init__()
        self.act_emb = nn.Embedding(num_actions, cond_dim)
        self.conv_in = nn.Conv2d(2 * img_channels, channels, 3, padding=1)
        # 4 stages of 2 ResBlocks without attention (DIAMOND's attn_depths [0, 0, 0, 0]), 3 downsamples between
        # them, then 2 ResBlocks with attention at the lowest resolution
        self.stages = nn.ModuleList(ResBlocks([channels] * 2, [channels] * 2, cond_dim) for _ in range(4))
        self.downsamples = nn.ModuleList(Downsample(channels) for _ in range(3))
        self.mid_blocks = ResBlocks([channels] * 2, [channels] * 2, cond_dim, attention=True)
        self.lstm = nn.LSTM(channels * (obs_size // 8) ** 2, lstm_dim, batch_first=True)
        self.head = nn.Sequential(nn.Linear(lstm_dim, lstm_dim), nn.SiLU(), nn.Linear(lstm_dim, 3 + 2, bias=False))
        init_lstm(self.lstm)

    def forward(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor, hidden=None):
        """obs, next_obs: (B, T, 3, H, W) in [-1, 1]; act: (B, T). Returns reward logits (B, T, 3), end logits
        (B, T, 2) and the LSTM state."""
        b, t = act.shape
        cond = self.act_emb(act.reshape(b * t))
        x = self.conv_in(torch.cat([obs, next_obs], dim=2).flatten(0, 1))
        for i, stage in enumerate(self.stages):
            x, _ = stage(x, cond)
            if i < 3:
                x = self.downsamples[i](x)
        x, _ = self.mid_blocks(x, cond)
        x = x.reshape(b, t, -1)
        x, hidden = self.lstm(x, hidden)
        logits = self.head(x)
        return logits[..., :3], logits[..., 3:], hidden


def reward_end_loss(reward_end_model: RewardEndModel, batch: dict) -> torch.Tensor:
    """CE(reward sign + 1) + CE(end) over the real transitions of reward/end segments (sample_reward_end_batch),
    the LSTM starting from a zero state at each segment's first frame."""
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
    """conv 3 -> channels[0], then per stage a SmallResBlock and a 2x2 max-pool (64 -> 4 pixels), an LSTMCell, and
    zero-initialised policy and value heads (the initial policy is uniform)."""

    def __init__(self, num_actions: int, obs_size: int = 64, channels: tuple[int, ...] = (32, 32, 64, 64),
                 lstm_dim: int = 512, img_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(img_channels, channels[0], 3, padding=1)]
        for c_prev, c in zip((channels[0],) + tuple(channels[:-1]), channels):
            layers += [SmallResBlock(c_prev, c), nn.MaxPool2d(2)]
        self.encoder = nn.Sequential(*layers)
        self.lstm = nn.LSTMCell(channels[-1] * (obs_size // 2 ** len(channels)) ** 2, lstm_dim)
        self.actor_linear = nn.Linear(lstm_dim, num_actions)
        self.critic_linear = nn.Linear(lstm_dim, 1)
        for layer in (self.actor_linear, self.critic_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        init_lstm(self.lstm)

    def forward(self, obs: torch.Tensor, hidden=None):
        """obs (B, 3, H, W) in [-1, 1] -> policy logits (B, A), value (B,), new LSTM state (hx, cx)."""
        hx, cx = self.lstm(self.encoder(obs).flatten(1), hidden)
        return self.actor_linear(hx), self.critic_linear(hx).squeeze(-1), (hx, cx)


def build_models(args: Args, num_actions: int) -> tuple[Denoiser, RewardEndModel, ActorCritic]:
    net = DenoiserNet(num_actions, args.diffusion_channels, args.diffusion_res_blocks, args.diffusion_cond_dim,
                      args.num_conditioning_steps)
    return (Denoiser(net, args.sigma_data, args.sigma_offset_noise),
            RewardEndModel(num_actions, args.obs_size, args.reward_channels, args.reward_cond_dim,
                           args.reward_lstm_dim),
            ActorCritic(num_actions, args.obs_size, args.actor_channels, args.actor_lstm_dim))


def lambda_returns(rewards: torch.Tensor, ends: torch.Tensor, truncs: torch.Tensor, bootstrap: torch.Tensor,
                   gamma: float, lam: float) -> torch.Tensor:
    """Lambda-returns on sign-clipped rewards, with truncation apart from termination (DIAMOND's
    compute_lambda_returns). rewards, ends, truncs, bootstrap: (B, H); bootstrap[:, t] = V'_t, the value of the
    frame after step t (of the final frame where the episode stopped at t).

    Lambda_t = sign(r_t) + gamma (1 - end_t) [trunc_t V'_t + (1 - trunc_t) ((1 - lambda) V'_t + lambda Lambda_t+1)],
    with Lambda_H = V'_(H-1): a terminated step stops the return, a truncated one bootstraps from V'_t alone."""
    rewards, not_end = rewards.sign(), 1.0 - ends.float()
    truncs = truncs.float()
    returns = torch.empty_like(rewards)
    next_return = bootstrap[:, -1]
    for t in reversed(range(rewards.shape[1])):
        v = bootstrap[:, t]
        continued = (1 - lam) * v + lam * next_return
        next_return = rewards[:, t] + gamma * not_end[:, t] * (truncs[:, t] * v + (1 - truncs[:, t]) * continued)
        returns[:, t] = next_return
    return returns


# ----------------------------------------------------------------------------------------------------------------------
# Samplers: Euler (DIAMOND) or Heun over the Karras sigmas, and the batched imagined environment.


@torch.no_grad()
def euler_sample(denoise_fn: Callable, x_T: torch.Tensor, sigmas: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma over the sigmas (ending with 0).

    denoise_fn(x, sigma) returns D(x; sigma) for a (B,) tensor sigma. order 1: Euler; order 2: Heun, except on the
    last step to sigma = 0 (EDM's algorithm 1, s_churn 0)."""
    x = x_T
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_batch = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32)
        d = (x - denoise_fn(x, sigma_batch)) / sigma  # d = (x - D(x; sigma)) / sigma
        x_next = x + d * (sigma_next - sigma)
        if order == 2 and sigma_next > 0:  # Heun: average the slopes at both ends of the step
            d_next = (x_next - denoise_fn(x_next, torch.full_like(sigma_batch, sigma_next))) / sigma_next
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
        x = x_next
    return x


def generate_next_obs(denoiser: Denoiser, obs: torch.Tensor, act: torch.Tensor, args: Args,
                      generator: torch.Generator, net=None, autocast=contextlib.nullcontext()) -> torch.Tensor:
    """The next frame (B, 3, H, W) in [-1, 1] from past frames (B, c, 3, H, W) and actions (B, c)."""
    b, c, ch, h, w = obs.shape
    past = obs.reshape(b, c * ch, h, w)
    sigmas = karras_sigmas(args.num_sampling_steps, args.sigma_min, args.sigma_max, args.rho)
    # DIAMOND's reference starts from unit-variance noise x ~ N(0, I), not from EDM's sigma_max * N(0, I); its
    # agents' scores come from that sampler (the first step's D(x; sigma_max) hardly depends on x: c_skip(5) ~ 0.01).
    x_T = torch.randn((b, ch, h, w), generator=generator, device=obs.device)
    if args.edm_initial_noise:
        x_T = float(sigmas[0]) * x_T

    def denoise_fn(x, sigma):
        with autocast:
            return denoiser.denoise(x, sigma, past, act, net)

    return euler_sample(denoise_fn, x_T, sigmas, order=2 if args.sampler == "heun" else 1).clamp(-1, 1)


class WorldModelEnv:
    """num_imagined_envs imagined environments that live across actor-critic updates, as in DIAMOND. Each starts from
    a real segment (c frames, c - 1 actions) from the replay buffer, burns the reward/end model's LSTM in on its real
    transitions, then steps: the denoiser generates the next frame, the reward/end model samples the reward sign and
    the end flag. An imagined episode ends when the end flag is sampled (terminated) or after imagination_horizon
    steps of its own life (truncated), and restarts from a new real segment at the same step. Its state (frames,
    actions, LSTM states, ages, and the actor's LSTM state kept here for actor_critic_loss) goes into checkpoints."""

    def __init__(self, denoiser: Denoiser, reward_end_model: RewardEndModel, buffer: ReplayBuffer, args: Args,
                 device: torch.device, generator: torch.Generator, cpu_generator: torch.Generator, net=None,
                 autocast=contextlib.nullcontext()):
        self.denoiser, self.reward_end_model, self.buffer, self.args = denoiser, reward_end_model, buffer, args
        self.device, self.generator, self.cpu_generator, self.net, self.autocast = (device, generator, cpu_generator,
                                                                                     net, autocast)
        self.obs: Optional[torch.Tensor] = None  # (n, c, 3, H, W); None until the first reset
        self.act = self.hidden = self.age = self.actor_hidden = None

    @torch.no_grad()
    def start(self, num_envs: int):
        """Fresh segments: (frames (n, c, 3, H, W), actions (n, c) whose last slot is for the actor, reward/end LSTM
        state after the burn-in on the c - 1 real transitions). Frames before an episode are mid-grey padding."""
        c = self.args.num_conditioning_steps
        batch = self.buffer.segments(self.buffer.sample_segments(num_envs, c, self.cpu_generator), c)
        obs = segment_obs(batch, self.device)  # (n, c, 3, H, W)
        actions = batch["actions"].to(self.device)  # (n, c - 1)
        with self.autocast:
            _, _, hidden = self.reward_end_model(obs[:, :-1], actions, obs[:, 1:])
        act = torch.cat([actions, torch.zeros_like(actions[:, :1])], dim=1)  # the last slot: the actor's action
        return obs, act, hidden

    def reset(self):
        """Starts every env: returns the current frames (n, 3, H, W) and the c - 1 earlier ones for the actor."""
        self.obs, self.act, self.hidden = self.start(self.args.num_imagined_envs)
        self.age = torch.zeros(self.args.num_imagined_envs, dtype=torch.long, device=self.device)
        return self.obs[:, -1], self.obs[:, :-1]

    @torch.no_grad()
    def step(self, action: torch.Tensor):
        """Returns (next frame, reward sign, end, truncated, restarted). Envs that ended or were truncated restart:
        their returned frame is the new start, and restarted = (indices, burn-in frames (k, c - 1, 3, H, W), final
        frames (k, 3, H, W) of the episodes that stopped), or None."""
        self.act[:, -1] = action
        next_obs = generate_next_obs(self.denoiser, self.obs, self.act, self.args, self.generator, self.net,
                                     self.autocast)
        with self.autocast:
            reward_logits, end_logits, self.hidden = self.reward_end_model(
                self.obs[:, -1:], action[:, None], next_obs[:, None], self.hidden)
        reward = torch.multinomial(reward_logits[:, 0].float().softmax(-1), 1, generator=self.generator)[:, 0] - 1
        end = torch.multinomial(end_logits[:, 0].float().softmax(-1), 1, generator=self.generator)[:, 0]
        self.age += 1
        truncated = (self.age >= self.args.imagination_horizon) & (end == 0)  # the horizon, unless it ended anyway
        self.obs = torch.cat([self.obs[:, 1:], next_obs[:, None]], dim=1)
        self.act = torch.cat([self.act[:, 1:], torch.zeros_like(self.act[:, :1])], dim=1)
        restarted = None
        stopped = ((end == 1) | truncated).nonzero()[:, 0]
        if len(stopped):  # a host sync, as in DIAMOND: restart these envs from new real segments
            obs, act, hidden = self.start(len(stopped))
            self.obs[stopped], self.act[stopped], self.age[stopped] = obs, act, 0
            self.hidden = tuple(hc.index_copy(1, stopped, new) for hc, new in zip(self.hidden, hidden))
            restarted = (stopped, obs[:, :-1], next_obs[stopped])
        return self.obs[:, -1], reward.float(), end.float(), truncated.float(), restarted

    def state_dict(self) -> dict:
        if self.obs is None:
            return {}
        copy = lambda x: x.detach().cpu().clone()  # noqa: E731 - a copy: stepping changes act and age in place
        return {"obs": copy(self.obs), "act": copy(self.act), "hidden": [copy(h) for h in self.hidden],
                "age": copy(self.age), "actor_hidden": [copy(h) for h in self.actor_hidden]}

    def load_state_dict(self, state: dict):
        if not state:
            self.obs = self.act = self.hidden = self.age = self.actor_hidden = None
            return
        self.obs, self.act, self.age = (state[key].to(self.device) for key in ("obs", "act", "age"))
        self.hidden = tuple(h.to(self.device) for h in state["hidden"])
        self.actor_hidden = tuple(h.to(self.device) for h in state["actor_hidden"])


def actor_burn_in(actor_critic: ActorCritic, frames: torch.Tensor, autocast=contextlib.nullcontext()):
    """The actor-critic's LSTM state after the frames (n, k, 3, H, W), from a zero state, without gradients."""
    hidden = None
    with torch.no_grad(), autocast:
        for k in range(frames.shape[1]):
            _, _, hidden = actor_critic(frames[:, k], hidden)
    return tuple(h.float() for h in hidden)


def actor_critic_loss(actor_critic: ActorCritic, wm_env: WorldModelEnv, args: Args, generator: torch.Generator,
                      autocast=contextlib.nullcontext()):
    """backup_every more steps of the persistent imagined episodes (num_imagined_envs of them) and the actor-critic
    losses on them: value MSE to the lambda-returns, REINFORCE with the baseline V, and an entropy bonus.

    The actor's LSTM state carries over from the last update (detached); an episode that stops at step t bootstraps
    from V of its final frame (the actor's state stepped on it), then the actor's memory is burnt in on the new
    segment's c - 1 earlier frames."""
    if wm_env.obs is None:  # the first update: start the imagined episodes
        _, burn_in = wm_env.reset()
        wm_env.actor_hidden = actor_burn_in(actor_critic, burn_in, autocast)
    obs, hidden = wm_env.obs[:, -1], tuple(h.detach() for h in wm_env.actor_hidden)
    logits_list, values, bootstrap, actions, rewards, ends, truncs = [], [], [], [], [], [], []
    stopped = None  # (indices, V(final frame)) of the episodes that stopped at the previous step
    for t in range(args.backup_every):
        with autocast:
            logits, value, hidden = actor_critic(obs, hidden)
        action = torch.multinomial(logits.detach().float().softmax(-1), 1, generator=generator)[:, 0]
        if t > 0:  # V'_(t-1) = V(s_t), or V(final frame) where the episode stopped at t - 1
            bootstrap.append(value.detach().float() if stopped is None else
                             value.detach().float().index_copy(0, *stopped))
        obs, reward, end, trunc, restarted = wm_env.step(action)
        stopped = None
        if restarted is not None:
            index, frames, final_obs = restarted
            with torch.no_grad(), autocast:
                _, final_value, _ = actor_critic(final_obs, tuple(h[index] for h in hidden))
            stopped = (index, final_value.float())
            new_hidden = actor_burn_in(actor_critic, frames, autocast)  # the actor's memory restarts too
            hidden = tuple(h.index_copy(0, index, new.to(h.dtype)) for h, new in zip(hidden, new_hidden))
        logits_list.append(logits.float())
        values.append(value.float())
        actions.append(action)
        rewards.append(reward)
        ends.append(end)
        truncs.append(trunc)
    with torch.no_grad(), autocast:
        _, last_value, _ = actor_critic(obs, hidden)  # V(s_H), without stepping the kept LSTM state
    bootstrap.append(last_value.float() if stopped is None else last_value.float().index_copy(0, *stopped))
    wm_env.actor_hidden = tuple(h.detach() for h in hidden)
    logits, values, bootstrap = torch.stack(logits_list, 1), torch.stack(values, 1), torch.stack(bootstrap, 1)
    actions, rewards = torch.stack(actions, 1), torch.stack(rewards, 1)
    ends, truncs = torch.stack(ends, 1), torch.stack(truncs, 1)
    with torch.no_grad():
        returns = lambda_returns(rewards, ends, truncs, bootstrap, args.discount_factor, args.td_lambda)
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()
    advantage = (returns - values).detach()
    actor_loss = -(log_probs.gather(-1, actions[..., None])[..., 0] * advantage).mean()
    critic_loss = F.mse_loss(values, returns)
    loss = actor_loss + critic_loss - args.entropy_weight * entropy
    return loss, {"actor": actor_loss.detach(), "critic": critic_loss.detach(), "entropy": entropy.detach(),
                  "imagined_reward": rewards.mean(), "imagined_end": ends.mean()}


# ----------------------------------------------------------------------------------------------------------------------
# Schedules: Atari 100k's env-step budget, the learning-rate warmup.


def collection_schedule(first_collection_steps: int, env_step_budget: int = 100_000, steps_per_epoch: int = 100,
                        final_epochs: int = 50) -> list[int]:
    """Env steps to collect in each epoch (item e - 1 for epoch e), as DIAMOND spends the Atari 100k budget: the first
    collection of N steps, then steps_per_epoch in each of (budget - N) / steps_per_epoch epochs, epoch 1 included
    (so epoch 1 collects N + steps_per_epoch), then final_epochs epochs that only train. The items sum to exactly
    env_step_budget; N = 5000 gives 950 + 50 = 1000 epochs. A remainder (budget - N not a multiple of
    steps_per_epoch) is collected in the last collecting epoch."""
    if not 0 < first_collection_steps <= env_step_budget:
        raise ValueError(f"the first collection ({first_collection_steps} steps) must be within the env-step budget "
                         f"({env_step_budget})")
    remaining = env_step_budget - first_collection_steps
    collecting_epochs = max(1, math.ceil(remaining / steps_per_epoch))  # epoch 1 always collects (the first N)
    steps = [min(steps_per_epoch, remaining - steps_per_epoch * e) for e in range(collecting_epochs)]
    steps[0] += first_collection_steps
    return steps + [0] * final_epochs


def lr_warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup from 0, as DIAMOND's reference: lr_s = lr * min(1, s / warmup_steps) (0 on the first step)."""
    return 1.0 if step >= warmup_steps else step / max(1, warmup_steps)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: test episodes, human-normalised score, world-model metrics on unseen real transitions, rollout videos.


def human_normalized_score(game: str, score: float) -> Optional[float]:
    if game not in ATARI_SCORES:
        return None
    random_score, human_score = ATARI_SCORES[game]
    return (score - random_score) / (human_score - random_score)


def report_score(game: str, returns: list[float], what: str):
    mean = float(np.mean(returns))
    score = human_normalized_score(game, mean)
    line = f"{what}: mean return {mean:.2f} (std {np.std(returns):.2f})"
    if score is not None:
        random_score, human_score = ATARI_SCORES[game]
        line += (f"; human-normalised score {score:.3f} = ({mean:.2f} - random {random_score}) / "
                 f"(human {human_score} - random {random_score})")
    else:
        line += f" ({game} has no random/human reference scores here: raw score only)"
    print(line, flush=True)


def log_test_returns(writer, game: str, returns: list[float], step: int):
    mean = float(np.mean(returns))
    writer.add_scalar("eval/episodic_return", mean, step)
    writer.add_scalar("eval/num_test_episodes", len(returns), step)
    score = human_normalized_score(game, mean)
    if score is not None:
        writer.add_scalar("eval/human_normalized_score", score, step)


@torch.no_grad()
def run_test_episodes(actor_critic: ActorCritic, game: str, args: Args, num_episodes: int, seed: int,
                      device: torch.device, autocast=contextlib.nullcontext(), max_parallel: int = 16) -> list[float]:
    """Full games (life loss does not end them), epsilon 0, actions sampled from the policy; up to max_parallel games
    at once with a batched policy. Seeded by `seed` only, so that evaluating never moves the training RNGs."""
    generator = torch.Generator().manual_seed(seed)
    returns = []
    while len(returns) < num_episodes:
        n = min(max_parallel, num_episodes - len(returns))
        envs = [AtariEnv(game, args.obs_size, args.frame_skip, args.noop_max, args.sticky_actions,
                         args.max_episode_steps, end_on_life_loss=False, generator=generator,
                         seed=seed * 1000 + len(returns) + i) for i in range(n)]
        obs = [env.reset() for env in envs]
        hidden, active = None, list(range(n))
        while active:
            x = to_float(torch.from_numpy(np.stack([obs[i] for i in active])).permute(0, 3, 1, 2).to(device))
            with autocast:
                logits, _, hidden = actor_critic(x, hidden)
            actions = torch.multinomial(logits.float().softmax(-1).cpu(), 1, generator=generator)[:, 0].tolist()
            still = []
            for row, (i, action) in enumerate(zip(active, actions)):
                obs[i], _, terminated, truncated = envs[i].step(action)
                if not (terminated or truncated):
                    still.append(row)
            if len(still) < len(active):
                keep = torch.tensor(still, dtype=torch.long, device=device)
                hidden = tuple(h[keep] for h in hidden)
                active = [active[row] for row in still]
        returns += [env.game_return for env in envs]
    return returns


@torch.no_grad()
def world_model_metrics(denoiser: Denoiser, reward_end_model: RewardEndModel, buffer: ReplayBuffer,
                        refs: list[tuple[int, int]], args: Args, device: torch.device, seed: int, net=None,
                        autocast=contextlib.nullcontext()) -> dict:
    """On real transitions (episode, t): the sampled next frame vs the true one, beside copying the last frame, over
    all pixels and over the pixels that change (where predicting matters); reward-sign and end accuracy."""
    c = args.num_conditioning_steps
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {key: 0.0 for key in ("mse", "copy", "mse_changed", "copy_changed", "changed", "pixels", "reward", "end")}
    for first in range(0, len(refs), 64):
        batch = buffer.segments([(e, t - (c - 1)) for e, t in refs[first: first + 64]], c + 1)
        obs = segment_obs(batch, device)  # (B, c + 1, 3, H, W)
        actions = batch["actions"].to(device)
        predicted = generate_next_obs(denoiser, obs[:, :-1], actions, args, generator, net, autocast)
        target, last = (obs[:, -1] + 1) / 2, (obs[:, -2] + 1) / 2  # pixels in [0, 1]
        predicted = (predicted + 1) / 2
        changed = ((target - last).abs().amax(dim=1, keepdim=True) > 0).float().expand_as(target)
        for key, error in (("mse", (predicted - target) ** 2), ("copy", (last - target) ** 2)):
            sums[key] += float(error.sum())
            sums[f"{key}_changed"] += float((error * changed).sum())
        sums["changed"] += float(changed.sum())
        sums["pixels"] += target.numel()
        with autocast:
            reward_logits, end_logits, _ = reward_end_model(obs[:, :-1], actions, obs[:, 1:])
        reward_class = batch["rewards"][:, -1].sign().long() + 1
        sums["reward"] += float((reward_logits[:, -1].argmax(-1).cpu() == reward_class).sum())
        sums["end"] += float((end_logits[:, -1].argmax(-1).cpu() == batch["ends"][:, -1].long()).sum())
    n, changed = len(refs), max(sums["changed"], 1.0)
    return {"next_frame_mse": sums["mse"] / sums["pixels"], "copy_last_frame_mse": sums["copy"] / sums["pixels"],
            "next_frame_mse_changed": sums["mse_changed"] / changed,
            "copy_last_frame_mse_changed": sums["copy_changed"] / changed,
            "changed_pixel_fraction": sums["changed"] / sums["pixels"], "reward_accuracy": sums["reward"] / n,
            "end_accuracy": sums["end"] / n}


@torch.no_grad()
def imagined_vs_real(denoiser: Denoiser, buffer: ReplayBuffer, args: Args, device: torch.device, seed: int,
                     net=None, autocast=contextlib.nullcontext()) -> tuple[np.ndarray, np.ndarray]:
    """An open-loop imagined rollout from a real segment with the real actions, beside the real frames:
    uint8 (H, 3, h, w) each, H = imagination_horizon (or what the episode has)."""
    c, horizon = args.num_conditioning_steps, args.imagination_horizon
    generator = torch.Generator().manual_seed(seed)
    ids = [i for i in buffer.sampleable() if len(buffer.episode(i)["actions"]) >= c + horizon] or buffer.sampleable()
    index = ids[int(torch.randint(len(ids), (1,), generator=generator))]
    T = len(buffer.episode(index)["actions"])
    horizon = min(horizon, T - c) if T > c else 1
    start = int(torch.randint(max(T - c - horizon + 1, 1), (1,), generator=generator)) if T > c else -(c - 1)
    batch = buffer.segments([(index, start)], c + horizon)
    real = segment_obs(batch, device)
    actions = batch["actions"].to(device)
    device_generator = torch.Generator(device=device).manual_seed(seed)
    obs, imagined = real[:, :c], []
    for k in range(horizon):
        next_obs = generate_next_obs(denoiser, obs, actions[:, k: k + c], args, device_generator, net, autocast)
        imagined.append(next_obs)
        obs = torch.cat([obs[:, 1:], next_obs[:, None]], dim=1)
    return to_uint8(real[0, c:]).cpu().numpy(), to_uint8(torch.cat(imagined)).cpu().numpy()


def write_mp4(path: Path, frames: np.ndarray, fps: int = 15, scale: int = 4):
    """uint8 (N, 3, H, W) frames -> an MP4 (opencv, mp4v), each frame upscaled by `scale` (nearest)."""
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    _, _, h, w = frames.shape
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w * scale, h * scale))
    for frame in frames:
        big = cv2.resize(frame.transpose(1, 2, 0), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        writer.write(np.ascontiguousarray(big[:, :, ::-1]))
    writer.release()


# ----------------------------------------------------------------------------------------------------------------------
# Utilities: config, checkpoints, RNG state, throughput.


def parse_args(argv: Optional[list[str]] = None) -> tuple[Args, set[str]]:
    """defaults < --preset < --config < flags on the command line. Returns the args and the fields given as flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    defaults = Args()
    if known.preset is not None:
        if known.preset not in PRESETS:
            raise UserError(f"unknown --preset {known.preset}: choose from {', '.join(PRESETS)}")
        defaults = replace(defaults, preset=known.preset, **PRESETS[known.preset])
    if known.config is not None:
        defaults = replace(defaults, **read_config(known.config))
    args = tyro.cli(Args, default=defaults, args=argv)
    given = {f.name for f in fields(Args) for token in argv
             if token.split("=")[0] in (f"--{f.name.replace('_', '-')}", f"--no-{f.name.replace('_', '-')}")}
    given |= {name for token in argv for flag, name in FLAG_ALIASES.items() if token.split("=")[0] == flag}
    return args, given


def read_config(path: str) -> dict:
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read --config {path}: {e}") from None
    return normalise_args_dict(values, f"--config {path}")


def normalise_args_dict(values: dict, source: str) -> dict:
    known = {f.name: f for f in fields(Args)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{source} has fields this script does not know: {', '.join(unknown)}")
    # JSON turns tuples into lists; the dataclass holds tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def check_args(args: Args):
    if args.num_sampling_steps < 1:
        raise UserError(f"--num-sampling-steps must be at least 1 (DIAMOND uses 3), not {args.num_sampling_steps}")
    if args.eval_only and not args.resume:
        raise UserError("--eval-only needs --resume RUN_FOLDER_OR_CHECKPOINT")
    if args.eval_only and args.world_model_only:
        raise UserError("--eval-only runs the agent's test episodes: a --world-model-only run has no trained agent")
    if args.dataset_dir is not None and not args.world_model_only:
        raise UserError("--dataset-dir needs --world-model-only (the agent learns from the episodes it collects)")
    for name in ("num_epochs", "batch_size", "save_every", "eval_every", "num_conditioning_steps", "frame_skip",
                 "imagination_horizon", "backup_every", "num_imagined_envs", "max_episode_steps",
                 "num_heldout_transitions"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.num_autoregressive_steps < 0:
        raise UserError(f"--num-autoregressive-steps must be at least 0 (DIAMOND uses 1), not "
                        f"{args.num_autoregressive_steps}")
    if args.reward_segment_length < 2:
        raise UserError(f"--reward-segment-length must be at least 2 frames (one transition), not "
                        f"{args.reward_segment_length}")
    if args.num_conditioning_steps < 2:
        raise UserError(f"--num-conditioning-steps must be at least 2 (the actor's memory is burnt in on the earlier "
                        f"frames), not {args.num_conditioning_steps}")
    if args.diffusion_cond_dim % args.num_conditioning_steps:
        raise UserError(f"--diffusion-cond-dim {args.diffusion_cond_dim} must be divisible by "
                        f"--num-conditioning-steps {args.num_conditioning_steps} (one action embedding per step)")
    if args.obs_size % 2 ** max(len(args.diffusion_channels) - 1, len(args.actor_channels), 3):
        raise UserError(f"--obs-size {args.obs_size} must be divisible by 2^{len(args.actor_channels)} "
                        f"(the actor-critic's max-pools) and 2^{len(args.diffusion_channels) - 1} (the U-Net levels)")
    if len(args.recency_weights) < 1 or min(args.recency_weights) <= 0:
        raise UserError("--recency-weights must be positive numbers")
    if not (0 < args.sigma_min < args.sigma_max):
        raise UserError(f"need 0 < --sigma-min < --sigma-max, got {args.sigma_min} and {args.sigma_max}")


def resolve_checkpoint_path(resume: str) -> Path:
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise UserError(f"--resume {resume}: no checkpoint at {path}")
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        # weights_only=True: a checkpoint holds tensors and plain containers only, so a malicious file cannot run code
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the same user-facing error
        raise UserError(f"cannot load checkpoint {path} (corrupt, or not a safe checkpoint): "
                        f"{str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != SCRIPT_NAME:
        found = checkpoint.get("script") if isinstance(checkpoint, dict) else None
        raise UserError(f"{path} is a checkpoint of {found or 'something else'}, not of {SCRIPT_NAME}")
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {checkpoint.get('format_version')}, this script reads "
                        f"{CHECKPOINT_FORMAT_VERSION}")
    return checkpoint


def merge_resumed_args(args: Args, given: set[str], saved: dict) -> Args:
    """The run's arguments come from the checkpoint; only RESUME_MUTABLE_FIELDS may be changed by flags."""
    saved = normalise_args_dict(saved, "the checkpoint's args")
    for name in sorted(given - RESUME_MUTABLE_FIELDS):
        if getattr(args, name) != saved.get(name):
            flag = f"--{name.replace('_', '-')}"
            raise UserError(f"{flag} is {saved.get(name)!r} in the checkpoint and cannot change on --resume (only the "
                            f"run length, cadence, logging and evaluation flags can); drop {flag} or start a new run")
    return replace(Args(**saved), **{name: getattr(args, name) for name in given & RESUME_MUTABLE_FIELDS - {"resume"}},
                   resume=args.resume)


def save_checkpoint(path: Path, state: dict):
    """Atomic: write a temporary file in the same folder, flush and fsync, then rename over the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's state as plain values: weights_only=True refuses numpy objects
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def matmul_peak_flops(device: torch.device) -> float:
    """The device's peak FLOP/s for MFU: bf16 dense from a table on CUDA, a measured 2048^2 fp32 matmul on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                 "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
        if "H100" in name and "PCIe" in name:
            return 756e12
        return next((peak for key, peak in table.items() if key in name), float("nan"))
    a = torch.randn(2048, 2048)
    torch.mm(a, a)
    start = time.perf_counter()
    for _ in range(3):
        torch.mm(a, a)
    return 3 * 2 * 2048 ** 3 / (time.perf_counter() - start)  # a (n x n) matmul is 2 n^3 FLOPs


def forward_flops(model: nn.Module, *inputs) -> float:
    """FLOPs of one forward pass, counted by torch's FLOP counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return float(counter.get_total_flops())


def make_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 (N, 3, H, W) -> one uint8 (rows*(H+pad)+pad, columns*(W+pad)+pad, 3) image."""
    n, _, h, w = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = \
            images[i].transpose(1, 2, 0)
    return grid


def write_samples(folder: Path, stem: str, images: np.ndarray, columns: Optional[int] = None) -> Path:
    """A PNG grid and an .npz of the uint8 (N, H, W, 3) images (arr_0, the layout FID tools read)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{stem}.png"), make_grid(images[:256], columns)[:, :, ::-1])
    np.savez(folder / f"{stem}.npz", images.transpose(0, 2, 3, 1))
    return folder / f"{stem}.png"


# ----------------------------------------------------------------------------------------------------------------------

# Each epoch runs these phases in order; a checkpoint records the phase and the position inside it.
PHASES = ("collect", "world_model_eval", "denoiser", "reward_end", "actor_critic", "evaluate")


def main(args: Args, given: set[str]):
    checkpoint, run_dir = None, None
    if args.resume:
        checkpoint_path = resolve_checkpoint_path(args.resume)
        checkpoint = load_checkpoint(checkpoint_path)
        args = merge_resumed_args(args, given, checkpoint["args"])
        run_dir = checkpoint_path.parent.parent
    check_args(args)
    game, env_name = canonical_env_id(args.env_id)

    use_cuda = args.cuda and torch.cuda.is_available()
    if args.cuda and not use_cuda:
        print("notice: CUDA is not available, running on the CPU")
    if args.torch_deterministic and use_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    device = torch.device("cuda" if use_cuda else "cpu")
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    if args.torch_deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # ...without its NaN fill of every new uninitialised tensor: one extra kernel per allocation, 10 to 12% of a
        # DDPM or DIAMOND training step on an H100 (benchmark/RESULTS.md); no kernel reads memory it did not write.
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls/convs on Ampere+: ~free speed for fp32 parts
    torch.backends.cudnn.allow_tf32 = True
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    autocast = (torch.autocast("cuda", dtype=autocast_dtype) if use_cuda and autocast_dtype
                else contextlib.nullcontext())

    peak_flops = matmul_peak_flops(device)  # before seeding: its random matrix must not move the saved RNG states

    # Seeding. Two explicit generators carry every random draw of training, so that their saved states make a resume
    # exact; evaluation uses generators seeded from (seed, epoch) and never moves them.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cpu_generator = torch.Generator().manual_seed(args.seed)  # no-ops, exploration, replay sampling
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)  # diffusion noise, imagination

    # The training environment (its minimal action set sizes the networks)
    env = AtariEnv(game, args.obs_size, args.frame_skip, args.noop_max, args.sticky_actions, args.max_episode_steps,
                   end_on_life_loss=True, generator=cpu_generator, seed=args.seed)
    num_actions = env.num_actions

    # Models, optimizers (AdamW with linear warmup), grad scalers
    denoiser, reward_end_model, actor_critic = (m.to(device) for m in build_models(args, num_actions))
    models = {"denoiser": denoiser, "reward_end": reward_end_model, "actor_critic": actor_critic}
    weight_decay = {"denoiser": args.weight_decay, "reward_end": args.weight_decay, "actor_critic": 0.0}
    max_grad_norm = {"denoiser": args.denoiser_max_grad_norm, "reward_end": args.max_grad_norm,
                     "actor_critic": args.max_grad_norm}
    optimizers = {name: torch.optim.AdamW(weight_decay_groups(model, weight_decay[name]), lr=args.learning_rate,
                                          eps=args.adam_eps, fused=use_cuda)
                  for name, model in models.items()}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_warmup_factor(s, args.warmup_steps))
                  for name, opt in optimizers.items()}
    scalers = {name: torch.amp.GradScaler("cuda", enabled=use_cuda and args.dtype == "float16") for name in models}
    num_params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}

    # Training state: the position in the run is (epoch, phase, position inside the phase)
    epoch, phase, position, env_steps = 1, 0, 0, 0
    partial: Optional[dict] = None  # the episode being collected: lists of obs, actions, rewards, flags
    collect_hidden = None  # the actor's LSTM state while collecting
    heldout = torch.zeros((0, 2), dtype=torch.long)  # (episode, t) of the transitions world_model/* is computed on
    epoch_log: dict[str, list[float]] = {}
    phase_sums: dict[str, float] = {}
    num_buffer_files = 0
    if checkpoint is not None:
        try:
            for name, model in models.items():
                model.load_state_dict(checkpoint["models"][name])
        except RuntimeError as e:
            raise UserError(f"checkpoint weights do not fit these models ({str(e).splitlines()[0]})") from None
        for name in models:
            optimizers[name].load_state_dict(checkpoint["optimizers"][name])
            schedulers[name].load_state_dict(checkpoint["schedulers"][name])
            scalers[name].load_state_dict(checkpoint["scalers"][name])
        set_rng_state(checkpoint["rng"])
        cpu_generator.set_state(checkpoint["cpu_generator"])
        generator.set_state(checkpoint["generator"])  # a CPU ByteTensor, for CUDA generators too
        epoch, phase, position = checkpoint["epoch"], PHASES.index(checkpoint["phase"]), checkpoint["position"]
        env_steps, num_buffer_files = checkpoint["env_steps"], checkpoint["num_buffer_files"]
        env.load_state_dict(checkpoint["env"])
        saved_partial = checkpoint["partial"]
        if saved_partial is not None:
            partial = {"obs": list(saved_partial["obs"].numpy()),
                       **{key: saved_partial[key].tolist() for key in ("actions", "rewards", "terminated",
                                                                        "truncated")}}
        collect_hidden = (None if checkpoint["collect_hidden"] is None
                          else tuple(h.to(device) for h in checkpoint["collect_hidden"]))
        heldout, epoch_log, phase_sums = checkpoint["heldout"], checkpoint["epoch_log"], checkpoint["phase_sums"]

    denoiser_net = torch.compile(denoiser.net) if args.compile else denoiser.net

    if args.eval_only:
        completed = checkpoint["epoch"] - 1
        returns = run_test_episodes(actor_critic, game, args, args.test_episodes, args.seed * 7919 + 1_000_003,
                                    device, autocast)
        report_score(game, returns, f"{args.test_episodes} test episodes with the agent of epoch {completed}")
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run_dir)) as writer:
            log_test_returns(writer, game, returns, completed)
        return

    # The replay buffer: episodes this run collected (the first num_buffer_files files: a killed run may have written
    # more after its last checkpoint, and those are rewritten), or the user's recorded episodes.
    # (a static dataset is sampled in proportion to episode lengths, as DIAMOND does: the recency weights are about
    # the agent's own data)
    buffer = ReplayBuffer(None, args.recency_weights if args.dataset_dir is None else None,
                          args.num_conditioning_steps)
    train_ids: Optional[list[int]] = None  # None: every episode; with --dataset-dir, all but the held-out ones
    if args.dataset_dir is not None:
        paths = sorted(p for p in Path(args.dataset_dir).glob("*.npz") if not p.name.startswith("."))  # no temp files
        paths = paths if Path(args.dataset_dir).is_dir() else []
        if not paths:
            raise UserError(f"--dataset-dir {args.dataset_dir}: no episode .npz files (one per episode: obs, "
                            f"actions, rewards, terminated, truncated)")
        if len(paths) < 2:
            raise UserError(f"--dataset-dir {args.dataset_dir} has 1 episode: give at least 2 (the last 10% of the "
                            f"episodes are held out to measure the world model)")
        for path in paths:
            buffer.add(load_episode(path, args.obs_size, num_actions, "fix it or move it out of --dataset-dir"),
                       write=False)
        num_heldout_episodes = max(1, len(paths) // 10)
        train_ids = list(range(len(paths) - num_heldout_episodes))
        pairs = [(e, t) for e in range(len(paths) - num_heldout_episodes, len(paths))
                 for t in range(len(buffer.episodes[e]["actions"]))]
        picks = np.linspace(0, len(pairs) - 1, min(args.num_heldout_transitions, len(pairs))).round().astype(int)
        heldout = torch.tensor([pairs[i] for i in picks], dtype=torch.long)

    # Run folder, TensorBoard, wandb
    from torch.utils.tensorboard import SummaryWriter

    if run_dir is None:
        run_name = f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = Path(args.output_dir) / run_name
        while run_dir.exists():  # never overwrite an earlier run
            run_dir = run_dir.with_name(run_dir.name + "_")
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(args), indent=2))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_dir.name, id=run_dir.name, resume="allow", save_code=True)
    # purge_step: a resumed run drops the points a killed run logged after its last checkpoint (all logging happens
    # at the end of an epoch, at step = epoch)
    writer = SummaryWriter(str(run_dir), purge_step=epoch if checkpoint is not None else None)
    if checkpoint is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{key}|{value}|" for key, value in asdict(args).items()))
        for name, count in num_params.items():
            writer.add_scalar(f"charts/num_parameters_{name}", count, 0)

    if args.dataset_dir is None:
        buffer.folder = run_dir / "episodes"
        for i in range(num_buffer_files):
            buffer.add(load_episode(buffer.folder / f"episode_{i:06d}.npz", args.obs_size, num_actions,
                                    "restore the file the run wrote there, or start a new run"),
                       write=False)

    def partial_tensors():
        if partial is None:
            return None
        return {"obs": torch.from_numpy(np.stack(partial["obs"])),
                **{key: torch.tensor(partial[key], dtype=dtype) for key, dtype in
                   (("actions", torch.int64), ("rewards", torch.float32), ("terminated", torch.bool),
                    ("truncated", torch.bool))}}

    def sync_partial():  # the episode being collected is sampled too (as the newest episode)
        buffer.partial = None if partial is None else ReplayBuffer.to_tensors(partial)

    sync_partial()
    print(f"run folder: {run_dir}")
    print(f"game: {game} ({num_actions} actions); parameters: denoiser {num_params['denoiser']:,}, reward/end "
          f"{num_params['reward_end']:,}, actor-critic {num_params['actor_critic']:,}; device: {device}")

    # Throughput accounting: a training step is about 3x the forward FLOPs (forward + backward).
    c = args.num_conditioning_steps
    example = (torch.zeros(1, 3, args.obs_size, args.obs_size, device=device), torch.zeros(1, device=device),
               torch.zeros(1, 3 * c, args.obs_size, args.obs_size, device=device),
               torch.zeros(1, c, dtype=torch.long, device=device))
    denoiser_flops_per_sample = forward_flops(denoiser.net, *example)

    # SIGTERM / SIGINT: finish the current step, save, exit 0.
    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    sums: dict[str, torch.Tensor] = {key: torch.tensor(value, device=device) for key, value in phase_sums.items()}

    def add_sum(key: str, value: torch.Tensor):  # accumulated on the device: no host sync in the hot loop
        sums[key] = sums[key] + value.detach().float() if key in sums else value.detach().float().clone()

    def check_finite():
        bad = [key for key, value in sums.items() if not math.isfinite(value.item())]
        if bad:
            raise TrainingFailure(f"{', '.join(bad)} became non-finite in epoch {epoch} ({PHASES[phase]}); the last "
                                  f"good checkpoint is kept in {run_dir}/checkpoints (try a lower --learning-rate "
                                  f"or --dtype float32)")

    def save():
        check_finite()  # never save NaN weights
        save_checkpoint(run_dir / "checkpoints" / "latest.pt", {
            "script": SCRIPT_NAME, "format_version": CHECKPOINT_FORMAT_VERSION, "args": asdict(args),
            "epoch": epoch, "phase": PHASES[phase], "position": position, "env_steps": env_steps,
            "num_buffer_files": len(buffer.episodes) if args.dataset_dir is None else 0,
            "models": {name: model.state_dict() for name, model in models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
            "scalers": {name: scaler.state_dict() for name, scaler in scalers.items()},
            "rng": rng_state(), "cpu_generator": cpu_generator.get_state(), "generator": generator.get_state().cpu(),
            "env": env.state_dict(), "partial": partial_tensors(),
            "collect_hidden": None if collect_hidden is None else tuple(h.cpu() for h in collect_hidden),
            "heldout": heldout, "epoch_log": epoch_log, "imagination": wm_env.state_dict(),
            "phase_sums": {key: value.item() for key, value in sums.items()},
        })
        where = "" if phase == 0 and position == 0 else f" (inside epoch {epoch}: {PHASES[phase]}, step {position})"
        print(f"saved checkpoint at epoch {epoch - 1}{where}", flush=True)

    def log_value(key: str, value: float):
        epoch_log.setdefault(key, []).append(float(value))

    def phase_length(name: str) -> int:
        first = epoch == 1
        return {"denoiser": args.first_epoch_denoiser_steps if first else args.denoiser_steps_per_epoch,
                "reward_end": args.first_epoch_reward_steps if first else args.reward_steps_per_epoch,
                "actor_critic": args.first_epoch_actor_critic_steps if first else args.actor_critic_steps_per_epoch,
                }[name]

    def gradient_step(name: str, loss: torch.Tensor) -> torch.Tensor:
        optimizer, scaler, model = optimizers[name], scalers[name], models[name]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm[name])
        scaler.step(optimizer)
        scaler.update()
        schedulers[name].step()
        return grad_norm

    def collect_step(random_policy: bool):
        """One env step with the agent (epsilon-greedy over a sampled policy) or a uniform random policy."""
        nonlocal partial, collect_hidden, env_steps
        if partial is None:
            partial = {"obs": [env.reset().copy()], "actions": [], "rewards": [], "terminated": [], "truncated": []}
        explore = float(torch.rand(1, generator=cpu_generator)) < args.epsilon
        random_action = int(torch.randint(num_actions, (1,), generator=cpu_generator))
        if random_policy:
            action = random_action
        else:
            x = to_float(torch.from_numpy(partial["obs"][-1]).permute(2, 0, 1)[None].to(device))
            with torch.no_grad(), autocast:
                logits, _, collect_hidden = actor_critic(x, collect_hidden)
            sampled = int(torch.multinomial(logits.float().softmax(-1).cpu(), 1, generator=cpu_generator))
            action = random_action if explore else sampled
        obs, reward, terminated, truncated = env.step(action)
        env_steps += 1
        for key, value in (("obs", obs.copy()), ("actions", action), ("rewards", reward),
                           ("terminated", terminated), ("truncated", truncated)):
            partial[key].append(value)
        if terminated or truncated:
            buffer.add({key: np.asarray(value) for key, value in partial.items()})
            if env.game_over:
                log_value("charts/episodic_return", env.game_return)
                log_value("charts/episodic_length", env.game_steps)
            partial, collect_hidden = None, None
        return reward

    # The imagined episodes live across actor-critic updates and epochs (and checkpoints), as in DIAMOND
    wm_env = WorldModelEnv(denoiser, reward_end_model, buffer, args, device, generator, cpu_generator, denoiser_net,
                           autocast)
    if checkpoint is not None:
        wm_env.load_state_dict(checkpoint.get("imagination", {}))

    run_start, epoch_start, first_epoch = time.perf_counter(), time.perf_counter(), epoch
    collect_epochs = args.num_epochs - args.final_epochs_without_collection
    while epoch <= args.num_epochs:
        name = PHASES[phase]
        phase_start = time.perf_counter()
        steps_at_start = position

        if name == "collect" and args.dataset_dir is None and epoch <= max(collect_epochs, 1):
            nonzero = sum(int((buffer.episode(i)["rewards"] != 0).sum()) for i in buffer.sampleable())
            while True:
                if epoch == 1:  # at least initial_collection_steps, then 100 more at a time until enough rewards
                    done = position >= args.max_initial_collection_steps or (
                        position >= args.initial_collection_steps and nonzero >= args.min_nonzero_rewards
                        and (position - args.initial_collection_steps) % 100 == 0)
                else:
                    done = position >= args.collection_steps_per_epoch
                if done or stop_requested:
                    break
                # the transition about to be collected, as (index its episode will have in the buffer, t)
                ref = (len(buffer.episodes), 0 if partial is None else len(partial["actions"]))
                nonzero += collect_step(random_policy=args.world_model_only) != 0
                heldout = torch.cat([heldout if position else heldout[:0], torch.tensor([ref])])
                heldout = heldout[-args.num_heldout_transitions:]
                position += 1
            sync_partial()
            if position > steps_at_start:
                log_value("charts/SPS", (position - steps_at_start) / (time.perf_counter() - phase_start))

        elif name == "world_model_eval" and len(heldout):
            # The transitions just collected (or the held-out episodes of --dataset-dir): never trained on yet.
            refs = [(e if e < len(buffer.episodes) else -1, t) for e, t in heldout.tolist()]
            metrics = world_model_metrics(denoiser, reward_end_model, buffer, refs, args, device,
                                          args.seed * 7919 + epoch, denoiser_net, autocast)
            for key, value in metrics.items():
                log_value(f"world_model/{key}", value)
            if args.dataset_dir is None:  # trained on from now on: epochs that collect nothing log no world_model/*
                heldout = heldout[:0]

        elif name in ("denoiser", "reward_end", "actor_critic") and not (
                name == "actor_critic" and args.world_model_only):
            num_steps = phase_length(name)
            model = models[name]
            while position < num_steps and not stop_requested:
                if name == "denoiser":
                    batch = sample_denoiser_batch(buffer, args, cpu_generator, device, train_ids)
                    with autocast:
                        loss = denoiser_loss(denoiser, batch["obs"], batch["actions"], batch["obs_mask"], args,
                                             generator, denoiser_net)
                elif name == "reward_end":
                    batch = sample_reward_end_batch(buffer, args, cpu_generator, device, train_ids)
                    with autocast:
                        loss = reward_end_loss(reward_end_model, batch)
                else:
                    loss, parts = actor_critic_loss(actor_critic, wm_env, args, generator, autocast)
                    for key, value in parts.items():
                        add_sum(key, value)
                model.train()
                grad_norm = gradient_step(name, loss)
                add_sum(f"{name}_loss", loss)
                add_sum(f"{name}_grad_norm", grad_norm)
                position += 1
            done_steps = position - steps_at_start
            if done_steps and position == num_steps:
                check_finite()
                count = float(num_steps)
                log_value(f"losses/{name}", sums.pop(f"{name}_loss").item() / count)
                # the denoiser's as charts/grad_norm and charts/learning_rate (the three share one schedule)
                suffix = "" if name == "denoiser" else f"_{name}"
                log_value(f"charts/grad_norm{suffix}", sums.pop(f"{name}_grad_norm").item() / count)
                if name == "denoiser":
                    log_value("charts/learning_rate", schedulers[name].get_last_lr()[0])
                if name == "actor_critic":
                    for key in ("actor", "critic", "entropy"):
                        log_value(f"losses/{key}", sums.pop(key).item() / count)
                    for key in ("imagined_reward", "imagined_end"):
                        log_value(f"charts/{key}", sums.pop(key).item() / count)
            if done_steps:
                if use_cuda:
                    torch.cuda.synchronize()
                per_second = done_steps / (time.perf_counter() - phase_start)
                log_value(f"perf/{name}_steps_per_s", per_second)
                if name == "denoiser":
                    flops = 3 * denoiser_flops_per_sample * args.batch_size * (1 + args.num_autoregressive_steps)
                    log_value("perf/mfu", per_second * flops / peak_flops)
                if name == "actor_critic":
                    log_value("perf/imagination_frames_per_s",
                              per_second * args.num_imagined_envs * args.backup_every)

        elif name == "evaluate" and (epoch % args.eval_every == 0 or epoch == args.num_epochs):
            real, imagined = imagined_vs_real(denoiser, buffer, args, device, args.seed * 7919 + epoch, denoiser_net,
                                              autocast)
            strip = make_grid(np.concatenate([real, imagined]), columns=len(real))  # top: real, bottom: imagined
            writer.add_image("samples/imagined_vs_real", strip, epoch, dataformats="HWC")
            write_mp4(run_dir / "samples" / f"rollout_epoch{epoch:05d}.mp4", np.concatenate([real, imagined], axis=3))
            write_samples(run_dir / "samples", f"rollout_epoch{epoch:05d}", np.concatenate([real, imagined]),
                          columns=len(real))
            if not args.world_model_only and epoch < args.num_epochs:  # the last epoch gets the full test below
                returns = run_test_episodes(actor_critic, game, args, args.eval_episodes, args.seed * 7919 + epoch,
                                            device, autocast)
                log_value("eval/episodic_return", float(np.mean(returns)))
                score = human_normalized_score(game, float(np.mean(returns)))
                if score is not None:
                    log_value("eval/human_normalized_score", score)

        if epoch == 1 and position > steps_at_start:  # the first epoch is long (25k gradient steps): say where it is
            print(f"epoch 1: {name} done ({position} steps, {time.perf_counter() - phase_start:.1f} s)", flush=True)
        if stop_requested:
            save()
            print(f"stopped by signal in epoch {epoch} ({name}, step {position})")
            break
        phase, position = phase + 1, 0
        if phase == len(PHASES):  # end of the epoch: log everything at step = epoch, then maybe save
            log_value("charts/env_steps", env_steps)
            log_value("charts/buffer_transitions", buffer.num_transitions())
            for key, values in epoch_log.items():
                writer.add_scalar(key, float(np.mean(values)), epoch)
            parts = [f"{label} {np.mean(epoch_log[key]):.4g}" for key, label in (
                ("losses/denoiser", "denoiser loss"), ("losses/reward_end", "reward/end loss"),
                ("losses/actor_critic", "actor-critic loss"), ("charts/episodic_return", "train return"),
                ("eval/episodic_return", "eval return")) if key in epoch_log]
            if "world_model/next_frame_mse_changed" in epoch_log:
                model_error = epoch_log["world_model/next_frame_mse_changed"][0]
                copy_error = epoch_log["world_model/copy_last_frame_mse_changed"][0]
                parts.append(f"next-frame mse on changed pixels {model_error:.4g} (copy-last-frame {copy_error:.4g})")
            elapsed = time.perf_counter() - epoch_start
            epochs_here = epoch - first_epoch + 1  # ETA from this process's epochs (epoch 1 is the long one)
            eta = (time.perf_counter() - run_start) / epochs_here * (args.num_epochs - epoch)
            print(f"epoch {epoch}/{args.num_epochs} | env steps {env_steps} | {' | '.join(parts)} | {elapsed:.1f} s, "
                  f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", flush=True)
            epoch_log, epoch, phase, epoch_start = {}, epoch + 1, 0, time.perf_counter()
            if (epoch - 1) % args.save_every == 0 or epoch > args.num_epochs:
                save()

    if not stop_requested and not args.world_model_only:
        returns = run_test_episodes(actor_critic, game, args, args.test_episodes, args.seed * 7919 + 1_000_003,
                                    device, autocast)
        report_score(game, returns, f"{args.test_episodes} test episodes after {args.num_epochs} epochs, "
                                    f"{env_steps} env steps")
        log_test_returns(writer, game, returns, args.num_epochs)
    print(f"done in {time.perf_counter() - run_start:.1f} s: {run_dir}")
    writer.close()
    if args.track:
        import wandb

        wandb.finish()


if __name__ == "__main__":
    try:
        main(*parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingFailure as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
