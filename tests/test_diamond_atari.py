"""Tests of diamond_atari.py: the Atari protocol, EDM preconditioning, Karras sigmas, Euler/Heun steps, lambda-returns
against hand-computed values; a denoiser that learns; smoke runs as a user runs them (tiny preset, --world-model-only,
--dataset-dir, --eval-only); exact resume after SIGKILL and after SIGTERM; bad inputs.

Expensive runs are shared through module-scoped fixtures. The scripts run with one torch thread (OMP_NUM_THREADS=1):
the tiny preset's small convolutions are faster single-threaded, above all on a shared machine."""
import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import (PYTHON, ROOT, SEED_SHIFT, checkpoint_tensors, load_module, measured, only_run_dir,
                      read_image_tags, read_scalars, run_script, run_until_line_then_kill, script_env)

SCRIPT = "diamond_atari.py"
TINY = ["--env-id", "Breakout-v5", "--num-sampling-steps", "3", "--preset", "tiny"]


@pytest.fixture(scope="module")
def dia():
    return load_module(SCRIPT)


def run(*args, cwd, check=False):
    return run_script(SCRIPT, *args, cwd=cwd, check=check)


def run_until_line_then_signal(*args, line_startswith: str, cwd, sig=signal.SIGTERM, timeout: float = 300):
    """Starts the script, sends `sig` when a stdout line starts with `line_startswith`, and waits for it to exit.
    Returns (stdout, stderr, exit status)."""
    proc = subprocess.Popen([PYTHON, str(ROOT / SCRIPT), *map(str, args)], cwd=cwd, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_startswith):
            proc.send_signal(sig)
            break
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(line.startswith(line_startswith) for line in seen), "".join(seen)[-3000:] + err[-3000:]
    return "".join(seen) + out, err, proc.returncode


def plain_values(obj, prefix=""):
    """Numbers, strings and bools in a nested checkpoint (counters, positions, flags), args excluded."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key not in ("args", "epoch_log", "phase_sums"):
                yield from plain_values(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from plain_values(value, f"{prefix}/{i}")
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        yield prefix, obj


def assert_same_checkpoints(a, b):
    """Bitwise-equal tensors (models, optimizers, schedulers, every RNG, emulator state, partial episode) and equal
    counters and positions."""
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    ta, tb = ({k: v for k, v in t.items() if not k.startswith("/args")} for t in (ta, tb))
    assert ta.keys() == tb.keys()
    assert len(ta) > 50 and any(k.startswith("/env/ale") for k in ta) and any(k.startswith("/rng") for k in ta)
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after resume: {different[:10]}"
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert dict(plain_values(ca)) == dict(plain_values(cb))


def assert_same_episodes(a: Path, b: Path, count: int):
    for i in range(count):
        with np.load(a / "episodes" / f"episode_{i:06d}.npz", allow_pickle=False) as ea, \
                np.load(b / "episodes" / f"episode_{i:06d}.npz", allow_pickle=False) as eb:
            for key in ("obs", "actions", "rewards", "terminated", "truncated"):
                assert np.array_equal(ea[key], eb[key]), (i, key)


# ----------------------------------------------------------------------------------------------------------------------
# Environment id mapping and the Atari 100k protocol


def test_env_id_spellings_map_to_one_game(dia):
    ids = {dia.canonical_env_id(s) for s in ("Breakout-v5", "ALE/Breakout-v5", "BreakoutNoFrameskip-v4")}
    assert ids == {("Breakout", "Breakout-v5")}
    assert dia.canonical_env_id("ALE/MsPacman-v5") == ("MsPacman", "MsPacman-v5")
    with pytest.raises(dia.UserError, match="Breakout-v5"):
        dia.canonical_env_id("Breakot-v5")
    args, given = dia.parse_args(["--game", "ALE/Pong-v5"])  # --game: the seed's field name
    assert args.env_id == "ALE/Pong-v5" and "env_id" in given


def test_preprocessing_skip_maxpool_resize_and_no_sticky_actions(dia):
    import ale_py
    import cv2
    import gymnasium as gym

    env = dia.AtariEnv("Breakout", obs_size=64, generator=torch.Generator().manual_seed(0), seed=3)
    assert env.ale.getFloat("repeat_action_probability") == 0.0  # no sticky actions by default
    assert env.num_actions == 4  # minimal action set
    obs = env.reset()
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    for action in (1, 2, 2, 3):
        env.step(action)
    # A plain frameskip-1 emulator restored to the same state: 4 frames of the action, max of the last two, resized.
    state = env.state_dict()
    gym.register_envs(ale_py)
    raw = gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0).unwrapped
    raw.reset(seed=0)
    for action in (2, 3, 1):
        raw.ale.restoreState(ale_py.ALEState(state["ale"].numpy().tobytes()))
        env.load_state_dict(state)
        frame_before = raw.ale.getEpisodeFrameNumber()
        frames, reward = [], 0.0
        for _ in range(4):
            frame, r, *_ = raw.step(action)
            frames.append(frame)
            reward += r
        expected = cv2.resize(np.maximum(frames[2], frames[3]), (64, 64), interpolation=cv2.INTER_AREA)
        obs, r, terminated, truncated = env.step(action)
        assert raw.ale.getEpisodeFrameNumber() - frame_before == 4  # frame skip 4
        assert env.ale.getEpisodeFrameNumber() == raw.ale.getEpisodeFrameNumber()
        assert np.array_equal(obs, expected)  # max-pool over the last two frames, then INTER_AREA
        assert r == reward
    sticky = dia.AtariEnv("Breakout", sticky_actions=True, seed=0)
    assert sticky.ale.getFloat("repeat_action_probability") == 0.25


def test_life_loss_ends_training_episodes_only(dia):
    train = dia.AtariEnv("Breakout", obs_size=64, end_on_life_loss=True, seed=5)
    test = dia.AtariEnv("Breakout", obs_size=64, end_on_life_loss=False, seed=5)
    train.reset()
    lives = train.lives
    rng = np.random.default_rng(0)
    for _ in range(2000):  # Breakout without FIRE never launches the ball: fire, then move randomly
        state = train.state_dict()
        action = int(rng.integers(4))
        _, _, terminated, truncated = train.step(action)
        if train.lives < lives:
            break
    assert train.lives == lives - 1, "no life was lost in 2000 random steps"
    assert terminated and not truncated and not train.game_over  # the training episode ends, the game goes on
    test.load_state_dict(state)
    test.game_over = False
    _, _, terminated, truncated = test.step(action)
    assert test.lives == lives - 1 and not terminated and not truncated  # a test episode goes on
    obs_before = train.obs.copy()
    assert np.array_equal(train.reset(), obs_before)  # the next training episode continues the same game


def test_replay_segments_padding_mask_and_recency_weights(dia):
    buffer = dia.ReplayBuffer(None, (0.1, 0.1, 0.1, 0.7), num_conditioning_steps=4)
    for k in range(8):  # 8 episodes of 5 transitions; frame t of episode k is filled with 10 k + t
        obs = np.stack([np.full((4, 4, 3), 10 * k + t, np.uint8) for t in range(6)])
        buffer.add({"obs": obs, "actions": np.arange(1, 6), "rewards": np.array([0, 1, 0, -2, 0], np.float32),
                    "terminated": np.array([0, 0, 0, 0, 1], bool), "truncated": np.zeros(5, bool)}, write=False)
    batch = buffer.segments([(0, -3), (1, 3)], 5)
    # frames outside the episode are padding: mid-grey (0.0 in [-1, 1]) as DIAMOND pads them, NOOP actions, masked
    assert batch["obs_mask"].tolist() == [[False, False, False, True, True], [True, True, True, False, False]]
    obs = dia.segment_obs(batch, torch.device("cpu"))[:, :, 0, 0, 0]
    assert torch.equal(obs, torch.tensor([[0.0, 0.0, 0.0, 0 / 127.5 - 1, 1 / 127.5 - 1],
                                          [13 / 127.5 - 1, 14 / 127.5 - 1, 15 / 127.5 - 1, 0.0, 0.0]]))
    assert batch["mask"].tolist() == [[False, False, False, True], [True, True, False, False]]
    assert batch["actions"].tolist() == [[0, 0, 0, 1], [4, 5, 0, 0]]
    assert batch["rewards"].tolist() == [[0, 0, 0, 0], [-2, 0, 0, 0]]
    assert batch["ends"].tolist() == [[False] * 4, [False, True, False, False]]
    refs = buffer.sample_segments(20_000, 6, torch.Generator().manual_seed(0))
    episodes = np.array([e for e, _ in refs])
    starts = np.array([s for _, s in refs])
    assert abs(np.mean(episodes >= 6) - 0.7) < 0.02  # the newest quarter of the episodes gets weight 0.7
    assert starts.min() == -5 and starts.max() == -1  # stop = min(T, t + 1 + U{0..5}) <= T, start = stop - 6


def test_time_limit_truncates_the_game(dia):
    env = dia.AtariEnv("Breakout", max_episode_steps=5, seed=0)
    env.reset()
    flags = [env.step(0)[2:] for _ in range(5)]
    assert flags[:4] == [(False, False)] * 4 and flags[4] == (False, True) and env.game_over
    frame = env.ale.getEpisodeFrameNumber()
    env.reset()  # a new game (with 1 to 30 no-ops)
    assert env.game_steps == 0 and 1 <= env.ale.getEpisodeFrameNumber() <= 30 < frame


# ----------------------------------------------------------------------------------------------------------------------
# EDM preconditioning, Karras sigmas, Euler and Heun, lambda-returns: against hand-computed values


def test_edm_preconditioning_by_hand(dia):
    # sigma_data 0.5, offset 0.3: sigma_eff = sqrt(sigma^2 + 0.09)
    # sigma 0.4: sigma_eff 0.5, c_in 1/sqrt(0.5), c_skip 0.5, c_out 0.5 sqrt(0.5), c_noise ln(0.5)/4
    # sigma 0:   sigma_eff 0.3, c_in 1/sqrt(0.34), c_skip 0.25/0.34, c_out 0.3 sqrt(0.25/0.34), c_noise ln(0.3)/4
    # sigma 5:   sigma_eff sqrt(25.09), c_in 1/sqrt(25.34), c_skip 0.25/25.34, c_out sqrt(25.09) sqrt(0.25/25.34)
    expected = {
        0.4: (1.4142135624, 0.5, 0.3535533906, -0.1732867951),
        0.0: (1.7149858514, 0.7352941176, 0.2572478777, -0.3009932011),
        5.0: (0.1986537166, 0.0098658248, 0.4975274302, 0.4028086700),
    }
    sigma = torch.tensor(list(expected), dtype=torch.float64)
    c_in, c_skip, c_out, c_noise = dia.edm_preconditioning(sigma, 0.5, 0.3)
    for i, values in enumerate(expected.values()):
        got = (float(c_in[i]), float(c_skip[i]), float(c_out[i]), float(c_noise[i]))
        assert got == pytest.approx(values, abs=1e-8)
    # D = c_skip x + c_out F(c_in x, ...): checked through the Denoiser with a stub network F = constant 2
    net = lambda x_in, c_noise, obs, act: torch.full_like(x_in, 2.0)  # noqa: E731
    denoiser = dia.Denoiser(dia.DenoiserNet(4, (32,), 1, 32, 4), 0.5, 0.3)
    x = torch.full((3, 3, 4, 4), 0.8, dtype=torch.float64)
    out, denoised = denoiser(x, sigma, torch.zeros(3, 12, 4, 4), torch.zeros(3, 4, dtype=torch.long), net=net)
    for i, (ci, cs, co, cn) in enumerate(expected.values()):
        assert float(denoised[i, 0, 0, 0]) == pytest.approx(cs * 0.8 + co * 2.0, abs=1e-6)


def test_karras_sigmas(dia):
    assert dia.karras_sigmas(3, 2e-3, 5.0, 7).tolist() == pytest.approx([5.0, 0.2831, 0.002, 0.0], abs=1e-4)
    # EDM's 18-step schedule (sigma_min 0.002, sigma_max 80, rho 7), as listed by EDM's sampler
    edm_18 = [80.0, 57.5860, 40.7856, 28.3746, 19.3525, 12.9101, 8.4009, 5.3152, 3.2568, 1.9233, 1.0882, 0.5853,
              0.2964, 0.1395, 0.0599, 0.0229, 0.0075, 0.0020, 0.0]
    assert dia.karras_sigmas(18, 0.002, 80.0, 7.0).tolist() == pytest.approx(edm_18, abs=1e-4)


def test_euler_and_heun_steps_by_hand(dia):
    denoise_fn = lambda x, sigma: 0.5 * x  # noqa: E731  D(x; sigma) = x / 2
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    x_T = torch.ones(2, 3)
    # Euler: d = (1 - 0.5)/2 = 0.25, x = 1 - 0.25 = 0.75; d = (0.75 - 0.375)/1, x = 0.75 - 0.375 = 0.375
    assert torch.allclose(dia.euler_sample(denoise_fn, x_T, sigmas, order=1), torch.full((2, 3), 0.375))
    # Heun: x' = 0.75, d' = 0.375, x = 1 - (0.25 + 0.375)/2 = 0.6875; the last step (to 0) is Euler: 0.34375
    assert torch.allclose(dia.euler_sample(denoise_fn, x_T, sigmas[:2], order=2), torch.full((2, 3), 0.6875))
    assert torch.allclose(dia.euler_sample(denoise_fn, x_T, sigmas, order=2), torch.full((2, 3), 0.34375))


def test_lambda_returns_with_a_termination(dia):
    # gamma 0.5, lambda 0.5; rewards 1, 2, -3 (sign-clipped to 1, 1, -1); the episode ends at t = 1; V' = 1, 2, 4
    # (V'_t: the value after step t); L3 := V'_2 = 4; L2 = -1 + .5 (.5 * 4 + .5 * 4) = 1; L1 = 1 (ends);
    # L0 = 1 + .5 (.5 * 1 + .5 * 1) = 1.5
    rewards = torch.tensor([[1.0, 2.0, -3.0]])
    ends = torch.tensor([[0.0, 1.0, 0.0]])
    bootstrap = torch.tensor([[1.0, 2.0, 4.0]])
    returns = dia.lambda_returns(rewards, ends, torch.zeros_like(ends), bootstrap, gamma=0.5, lam=0.5)
    assert returns.tolist() == [[1.5, 1.0, 1.0]]


def test_denoiser_parameter_count_is_the_papers(dia):
    denoiser, reward_end, actor_critic = dia.build_models(dia.Args(), num_actions=4)
    assert 4.2e6 < sum(p.numel() for p in denoiser.parameters()) < 4.6e6  # "about 4.4M parameters"


# ----------------------------------------------------------------------------------------------------------------------
# The denoiser learns: a small fixed set of real transitions


@pytest.mark.learning
def test_denoiser_learns_next_frame_better_than_copying(dia, torch_threads):
    """13 real Breakout transitions (32x32), 150 steps: the loss falls 3x and the 3-step Euler sample of the next
    frame beats copying the last frame on the pixels that change, with less than 0.8x its error (0.66x measured)."""
    torch.manual_seed(SEED_SHIFT)
    args = dia.Args(obs_size=32, diffusion_channels=(16, 16, 16), diffusion_res_blocks=1, diffusion_cond_dim=32,
                    learning_rate=2e-3)
    env = dia.AtariEnv("Breakout", obs_size=32, seed=0)
    frames, actions = [env.reset().copy()], []
    rng = np.random.default_rng(0)
    while len(actions) < 16:
        action = 1 if len(actions) % 8 == 0 else int(rng.integers(4))  # FIRE launches the ball
        obs, _, terminated, truncated = env.step(action)
        frames.append(obs.copy())
        actions.append(action)
        assert not (terminated or truncated)
    buffer = dia.ReplayBuffer(None, (1.0,), 4)
    T = len(actions)
    buffer.add({"obs": np.stack(frames), "actions": np.array(actions), "rewards": np.zeros(T, np.float32),
                "terminated": np.zeros(T, bool), "truncated": np.zeros(T, bool)}, write=False)
    refs = [(0, t) for t in range(3, T)]  # the transitions with 4 real past frames
    batch = buffer.segments([(0, t - 3) for _, t in refs], 5)
    obs, acts, mask = dia.segment_obs(batch, torch.device("cpu")), batch["actions"], batch["obs_mask"]
    denoiser = dia.Denoiser(dia.DenoiserNet(4, args.diffusion_channels, 1, 32, 4))
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.learning_rate)
    generator = torch.Generator().manual_seed(SEED_SHIFT)
    losses = []
    for _ in range(150):
        loss = dia.denoiser_loss(denoiser, obs, acts, mask, args, generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) / 3
    reward_end = dia.RewardEndModel(4, 32, 8, 8, 16)
    metrics = dia.world_model_metrics(denoiser, reward_end, buffer, refs, args, torch.device("cpu"), seed=0)
    measured(loss_ratio=np.mean(losses[-20:]) / np.mean(losses[:20]),
             mse_ratio=metrics["next_frame_mse_changed"] / metrics["copy_last_frame_mse_changed"])
    assert metrics["changed_pixel_fraction"] > 0.001  # the ball and the paddle move
    assert metrics["next_frame_mse_changed"] < 0.8 * metrics["copy_last_frame_mse_changed"], metrics


# ----------------------------------------------------------------------------------------------------------------------
# The reward/end model's recall and precision per class: counted on held-out transitions, pooled until 20


def test_reward_end_pools_log_a_class_once_it_has_20_examples_and_never_nan(dia, tmp_path):
    pools = {kind: {name: [0, 0] for name in dia.REWARD_END_CLASSES} for kind in ("recall", "precision")}
    # (hits, predicted, actual) per class, as world_model_metrics counts them
    dia.add_to_pools(pools, {"reward_neg": [0, 0, 3], "reward_zero": [20, 22, 25], "reward_pos": [3, 5, 12],
                             "end": [2, 30, 10]})
    assert dia.take_pooled(pools) == {"world_model/reward_recall_zero": 20 / 25,
                                      "world_model/reward_precision_zero": 20 / 22, "world_model/end_precision": 2 / 30}
    # what a checkpoint holds between two measurements: the pools not yet taken, as plain numbers
    torch.save(pools, tmp_path / "pools.pt")
    restored = torch.load(tmp_path / "pools.pt", weights_only=True)
    assert restored["recall"] == pools["recall"] and restored["precision"] == pools["precision"]
    counts = {"reward_neg": [0, 0, 1], "reward_zero": [1, 2, 3], "reward_pos": [6, 10, 9], "end": [5, 4, 12]}
    for p in (pools, restored):
        dia.add_to_pools(p, counts)
    # +1: recall over 12 + 9 = 21 actual (pooled across both), precision over 5 + 10 = 15 predicted (not yet);
    # zero and end precision started again after they were taken; -1 was never predicted and occurs 4 times
    expected = {"world_model/reward_recall_pos": 9 / 21, "world_model/end_recall": 7 / 22}
    assert dia.take_pooled(pools) == expected and dia.take_pooled(restored) == expected
    assert pools["precision"]["reward_pos"] == [9, 15] and pools["recall"]["reward_pos"] == [0, 0]
    assert pools["precision"]["reward_neg"] == [0, 0] and pools["recall"]["reward_neg"] == [0, 4]
    assert dia.take_pooled(pools) == {}  # nothing new: nothing logged, no 0/0


def test_world_model_metrics_count_each_class_by_hand(dia):
    """The (hits, predicted, actual) counts of the reward/end model's argmax predictions on 10 transitions."""
    args = dia.Args(obs_size=32, num_sampling_steps=1)
    rewards = [0, 0, 1, 0, -1, 0, 0, 1, 0, -1]
    ends = [False] * 9 + [True]
    rng = np.random.default_rng(0)
    buffer = dia.ReplayBuffer(None, None, 4)
    buffer.add({"obs": rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8), "actions": np.zeros(10, np.int64),
                "rewards": np.array(rewards, np.float32), "terminated": np.array(ends),
                "truncated": np.zeros(10, bool)}, write=False)
    predicted_reward = [1, 0, 0, 0, -1, 0, -1, 1, 0, 1]  # signs the stand-in predicts, transition by transition
    predicted_end = [False, False, True, False, False, False, False, False, True, True]

    class StandIn(nn.Module):  # the reward/end model's interface, with the predictions above as logits
        def forward(self, obs, act, next_obs, hidden=None):
            b, t = act.shape
            reward_logits, end_logits = torch.zeros(b, t, 3), torch.zeros(b, t, 2)
            reward_logits[torch.arange(b), -1, torch.tensor(predicted_reward) + 1] = 1.0
            end_logits[torch.arange(b), -1, torch.tensor(predicted_end).long()] = 1.0
            return reward_logits, end_logits, None

    denoiser = dia.Denoiser(dia.DenoiserNet(4, (8, 8), 1, 8, 4))
    metrics = dia.world_model_metrics(denoiser, StandIn(), buffer, [(0, t) for t in range(10)], args,
                                      torch.device("cpu"), seed=0)
    # -1: actual at 4, 9; predicted at 4, 6 -> 1 hit. 0: actual at 0, 1, 3, 5, 6, 8; predicted at 1, 2, 3, 5, 8 ->
    # 4 hits. +1: actual at 2, 7; predicted at 0, 7, 9 -> 1 hit. end: actual at 9; predicted at 2, 8, 9 -> 1 hit.
    assert metrics["counts"] == {"reward_neg": [1, 2, 2], "reward_zero": [4, 5, 6], "reward_pos": [1, 3, 2],
                                 "end": [1, 3, 1]}
    assert metrics["reward_accuracy"] == 6 / 10 and metrics["end_accuracy"] == 8 / 10


# ----------------------------------------------------------------------------------------------------------------------
# Smoke runs as a user runs them


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    result = run(*TINY, "--output-dir", out / "runs", cwd=out, check=True)
    (out / "stderr.txt").write_text(result.stderr)  # the progress bars, for test_progress_bars_*
    return only_run_dir(out / "runs"), result.stdout


EXPECTED_TAGS = [
    "charts/episodic_return", "eval/episodic_return", "eval/human_normalized_score", "eval/test_episodic_return",
    "eval/test_num_episodes", "eval/test_human_normalized_score", "losses/denoiser",
    "losses/reward_end", "losses/actor", "losses/critic", "losses/entropy", "world_model/next_frame_mse",
    "world_model/copy_last_frame_mse", "world_model/next_frame_mse_changed", "world_model/copy_last_frame_mse_changed",
    "world_model/reward_accuracy", "world_model/end_accuracy", "charts/SPS", "perf/denoiser_steps_per_s",
    "perf/imagination_frames_per_s", "world_model/reward_recall_zero", "eval/action_share_NOOP",
    "eval/action_share_FIRE", "eval/imagined_return", "eval/real_return", "eval/imagined_minus_real_return",
]


def test_tiny_run_writes_tags_video_checkpoint_and_episodes(tiny_run, dia):
    run_dir, stdout = tiny_run
    assert run_dir.name.startswith("Breakout-v5__diamond_atari__1__")
    scalars = read_scalars(run_dir)
    missing = [tag for tag in EXPECTED_TAGS if tag not in scalars]
    assert not missing, missing
    assert "perf/mfu" not in scalars  # MFU on CUDA only
    assert "samples/imagined_vs_real" in read_image_tags(run_dir)
    # one global step, the gradient updates of the three models: epoch 1 has 20 + 20 + 5, epoch 2 10 + 10 + 5;
    # losses every 10 updates (--log-every) and at the end of a phase, the epoch's numbers at its end
    assert [step for step, _ in scalars["losses/denoiser"]] == [10, 20, 55]
    assert scalars["charts/epoch"] == [(45, 1.0), (70, 2.0)] and [s for s, _ in scalars["charts/env_steps"]] == [45, 70]
    assert (run_dir / "config.json").exists()
    mp4s = list((run_dir / "samples").glob("*.mp4"))
    assert mp4s and all(p.stat().st_size > 1000 for p in mp4s)
    import cv2

    capture = cv2.VideoCapture(str(mp4s[0]))
    ok, frame = capture.read()
    # real | imagined, 32x32 frames upscaled 4x, above a caption margin (the step and the action)
    assert ok and frame.shape == (128 + 44, 256, 3) and frame[128:].max() > 100
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert checkpoint["script"] == "diamond_atari.py" and checkpoint["epoch"] == 3 and checkpoint["phase"] == "collect"
    assert checkpoint["global_step"] == 70
    assert checkpoint["env"]["ale"].dtype == torch.uint8 and checkpoint["env"]["ale"].numel() > 1000
    assert checkpoint["num_buffer_files"] == len(list((run_dir / "episodes").glob("episode_*.npz"))) > 0
    with np.load(run_dir / "episodes" / "episode_000000.npz", allow_pickle=False) as episode:
        T = len(episode["actions"])
        assert episode["obs"].shape == (T + 1, 32, 32, 3) and episode["obs"].dtype == np.uint8
        assert episode["actions"].dtype == np.int64 and episode["rewards"].dtype == np.float32
        assert episode["terminated"].dtype == bool and episode["truncated"].dtype == bool
        assert episode["terminated"][-1] or episode["truncated"][-1]
    assert "saved checkpoint at epoch 1" in stdout and "saved checkpoint at epoch 2" in stdout
    assert "human-normalised score" in stdout and "random 1.7" in stdout and "human 30.5" in stdout
    assert "config.json" in os.listdir(run_dir)


def test_a_signal_during_eval_only_exits_0_in_one_line(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    stdout, stderr, status = run_until_line_then_signal("--resume", run_dir, "--eval-only", "--test-episodes", "50",
                                                        line_startswith="running 50 test episodes", cwd=tmp_path)
    assert status == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert stdout.count("stopped by signal") == 1 and "mean return" not in stdout


def test_a_finished_run_resumed_says_so_and_writes_nothing(tiny_run, dia, tmp_path, capsys):
    """A resume with nothing left to train (--num-epochs at or below the epochs done) opens no writer: no point of the
    run's TensorBoard is purged, no checkpoint rewritten, no test episodes played as if after fewer epochs."""
    import hashlib
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    for epochs in ([], ["--num-epochs", "1"]):
        dia.main(*dia.parse_args(["--resume", str(run_dir), *epochs]))
        out = capsys.readouterr().out
        assert f"the run is already at epoch 2 of {2 if not epochs else 1}: raise --num-epochs" in out, out
        assert "mean return" not in out and "resuming at" not in out
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()} == digest


def test_eval_only(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    result = run("--resume", run_dir, "--eval-only", "--test-episodes", "1", cwd=tmp_path, check=True)
    assert "1 test episodes with the agent of epoch 2: mean return" in result.stdout
    assert "human-normalised score" in result.stdout
    # logged into the run at the checkpoint's global step under tags of its own, beside the final test's
    scalars = read_scalars(run_dir)
    assert scalars["eval/eval_only_num_episodes"] == [(70, 1.0)] and scalars["eval/test_num_episodes"][-1][0] == 70
    assert all(len({s for s, _ in v}) == len(v) for v in scalars.values())  # no step holds two values of a tag


def test_world_model_only_random_policy_and_dataset_dir(tiny_run, tmp_path):
    run(*TINY, "--world-model-only", "--num-epochs", "1", "--output-dir", tmp_path / "runs", cwd=tmp_path, check=True)
    run_dir = only_run_dir(tmp_path / "runs")
    scalars = read_scalars(run_dir)
    assert {"losses/denoiser", "losses/reward_end", "world_model/next_frame_mse", "world_model/copy_last_frame_mse",
            "world_model/next_frame_mse_changed", "world_model/copy_last_frame_mse_changed",
            "world_model/reward_accuracy", "world_model/end_accuracy", "charts/SPS"} <= scalars.keys()
    assert "losses/actor" not in scalars and "eval/episodic_return" not in scalars
    assert "samples/imagined_vs_real" in read_image_tags(run_dir) and list((run_dir / "samples").glob("*.mp4"))
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert checkpoint["args"]["world_model_only"] and checkpoint["num_buffer_files"] > 0
    # the tiny run's episodes as a user's recorded dataset
    episodes = tiny_run[0] / "episodes"
    run(*TINY, "--world-model-only", "--num-epochs", "1", "--dataset-dir", episodes, "--output-dir", tmp_path / "runs2",
        cwd=tmp_path, check=True)
    run_dir = only_run_dir(tmp_path / "runs2")
    scalars = read_scalars(run_dir)
    assert "world_model/next_frame_mse" in scalars and "charts/episodic_return" not in scalars
    assert not (run_dir / "episodes").exists()  # nothing collected


# ----------------------------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_after_sigkill_is_exact(tiny_run, tmp_path):
    reference, _ = tiny_run
    out = tmp_path / "runs"
    stdout = run_until_line_then_kill(SCRIPT, *TINY, "--output-dir", out, line_startswith="saved checkpoint at epoch 1",
                                      cwd=tmp_path)
    assert "epoch 2/2" not in stdout
    killed = only_run_dir(out)
    run("--resume", killed, cwd=tmp_path, check=True)
    assert_same_checkpoints(reference / "checkpoints" / "latest.pt", killed / "checkpoints" / "latest.pt")
    count = torch.load(killed / "checkpoints" / "latest.pt", weights_only=True)["num_buffer_files"]
    assert_same_episodes(reference, killed, count)
    scalars = read_scalars(killed)
    assert [step for step, _ in scalars["losses/denoiser"]] == [10, 20, 55]  # no point logged twice
    assert [step for step, _ in scalars["charts/epoch"]] == [45, 70]


def test_resume_after_sigterm_inside_an_epoch_is_exact(tiny_run, tmp_path):
    reference, _ = tiny_run
    out = tmp_path / "runs"
    # SIGTERM when the first denoiser phase ends: the run stops inside epoch 1 (in whichever phase the signal lands),
    # finishes its step, saves the phase and the position in it, and exits
    stdout, stderr, status = run_until_line_then_signal(*TINY, "--output-dir", out,
                                                        line_startswith="epoch 1: denoiser done", cwd=tmp_path)
    assert status == 0 and "stopped by signal at epoch 1 (" in stdout and "Traceback" not in stderr, stderr[-2000:]
    assert "epoch 1: reward_end done" not in stdout  # a phase cut short is not reported as done
    stopped = only_run_dir(out)
    saved = torch.load(stopped / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and saved["phase"] != "collect"  # a checkpoint from inside the epoch
    resumed = run("--resume", stopped, cwd=tmp_path, check=True)
    assert f"resuming at epoch 1 ({saved['phase']}, step {saved['position']}" in resumed.stdout
    assert_same_checkpoints(reference / "checkpoints" / "latest.pt", stopped / "checkpoints" / "latest.pt")


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # no ALE banner before the error either
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    assert_one_line_error(run(*TINY, "--env-id", "Breakot-v5", cwd=tmp_path), "Breakot-v5", "Breakout-v5")
    assert_one_line_error(run(*TINY, "--num-sampling-steps", "0", cwd=tmp_path), "--num-sampling-steps")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 100)
    assert_one_line_error(run("--resume", corrupt, cwd=tmp_path), "cannot load checkpoint")
    other = tmp_path / "other.pt"
    torch.save({"script": "ddpm_cifar10.py", "format_version": 1, "args": {}}, other)
    assert_one_line_error(run("--resume", other, cwd=tmp_path), "ddpm_cifar10.py")
    # an episode .npz holding a pickled object array is refused (allow_pickle=False)
    episodes = tmp_path / "episodes"
    episodes.mkdir()
    np.savez(episodes / "a.npz", obs=np.array([{"x": 1}], dtype=object), actions=np.zeros(1, np.int64))
    np.savez(episodes / "b.npz", obs=np.array([{"x": 1}], dtype=object), actions=np.zeros(1, np.int64))
    assert_one_line_error(run(*TINY, "--world-model-only", "--dataset-dir", episodes, cwd=tmp_path), "a.npz")
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made


def numeric_fields(dia) -> list[str]:
    """Every Args field holding numbers: int, float, tuples of them, Optional numbers."""
    def numeric(hint) -> bool:
        if hint in (int, float):
            return True
        if get_origin(hint) in (tuple, Union) or str(get_origin(hint)) == "<class 'types.UnionType'>":
            return any(numeric(h) for h in get_args(hint) if h is not Ellipsis and h is not type(None))
        return False

    return [name for name, hint in get_type_hints(dia.Args).items() if numeric(hint)]


def test_every_numeric_flag_has_a_domain_and_bad_values_are_refused(dia):
    names = numeric_fields(dia)
    assert "recency_weights" in names and "diffusion_channels" in names and "train_sigma_loc" in names
    assert sorted(set(names) - set(dia.flag_marks()[0])) == []
    assert sorted(set(dia.flag_marks()[0]) - set(names)) == []
    for name, value in (("seed", -1), ("learning_rate", -1.0), ("noop_max", -1), ("num_sampling_steps", 0),
                        ("epsilon", 2.0), ("discount_factor", 1.5), ("diffusion_channels", (8, 0)),
                        ("recency_weights", (0.5, 0.0)), ("train_sigma_loc", float("nan")), ("log_every", 0)):
        with pytest.raises(dia.UserError, match=f"--{name.replace('_', '-')}"):
            dia.check_args(dia.Args(**{name: value}), 1)
    dia.check_args(dia.Args(), 1)
    dia.check_args(dia.Args(**dia.PRESETS["tiny"]), 1)


def test_one_process_per_game(dia):
    with pytest.raises(dia.UserError, match="one process per game"):
        dia.check_args(dia.Args(), 2)


def test_sample_and_video_writes_raise_on_failure(dia, tmp_path):
    blocker = tmp_path / "a_file"  # a folder that cannot be made: a file is in the way
    blocker.write_text("x")
    with pytest.raises(OSError):
        dia.write_mp4(blocker / "rollout.mp4", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(OSError):
        dia.write_png(blocker / "rollout.png", np.zeros((8, 8, 3), np.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# The Atari 100k budget, the static-dataset mode, test-set losses, agent copies, progress bars


def test_tiny_run_spends_the_env_step_budget_exactly(tiny_run, dia):
    # the tiny preset scales the protocol down: budget 350, first collection 200..300 growing 50 at a time, 50 env
    # steps per epoch, 1 final epoch without collection
    run_dir, stdout = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    args = checkpoint["args"]
    first = checkpoint["first_collection_steps"]
    assert 200 <= first <= 300 and (first - 200) % 50 == 0
    schedule = dia.collection_schedule(first, args["env_step_budget"], args["collection_steps_per_epoch"],
                                       args["final_epochs_without_collection"])
    assert sum(schedule) == checkpoint["env_steps"] == args["env_step_budget"] == 350
    assert schedule[-1] == 0 and checkpoint["epoch"] - 1 == len(schedule)  # ended after the final epoch
    scalars = read_scalars(run_dir)
    assert scalars["charts/env_steps"][-1][1] == 350 and scalars["charts/epoch"][-1][1] == len(schedule)
    assert f"first collection: {first} env steps" in stdout and f"the run: {len(schedule)} epochs" in stdout


def test_work_left_counts_the_phases_still_ahead_in_the_current_epoch(dia):
    """The run's time estimate: the epoch in progress counts its phases after the current one in full, the current
    one from its step on, and none before it (epoch 1's long first-epoch phases included at the start)."""
    args = dia.Args(num_epochs=2, initial_collection_steps=1000, first_epoch_denoiser_steps=50,
                    denoiser_steps_per_epoch=5, first_epoch_reward_steps=40, reward_steps_per_epoch=4,
                    first_epoch_actor_critic_steps=30, actor_critic_steps_per_epoch=3, eval_every=1)
    start = dia.work_left(args, 1000, dia.RunPosition())
    assert start == {"collect": 1200, "world_model_eval": 2, "denoiser": 55, "reward_end": 44, "actor_critic": 33,
                     "evaluate": 2}
    inside = dia.work_left(args, 1000, dia.RunPosition(epoch=1, phase=dia.PHASES.index("reward_end"), step=10))
    assert inside == {"collect": 100, "world_model_eval": 1, "denoiser": 5, "reward_end": 34, "actor_critic": 33,
                      "evaluate": 2}
    # DIAMOND's start_after_epochs: the actor-critic trains from epoch 2 on, with its per-epoch count, and its phase
    # does not run before (the collector's policy stays the untrained, uniform one)
    later = dia.replace(args, actor_critic_start_after_epochs=1)
    assert dia.work_left(later, 1000, dia.RunPosition())["actor_critic"] == 3
    schedule = dia.run_schedule(later, 1000)
    assert [dia.phase_work(later, schedule, "actor_critic", epoch) for epoch in (1, 2)] == [0, 3]


def test_the_eta_is_each_phases_rate_times_what_is_left_not_the_epochs_mean(dia):
    """By hand, at the paper's plan (first collection 5000: 1000 epochs). Before the first collection: the four timed
    rates x epoch 1's 10k/10k/5k updates + 999 epochs of 400 each and the 100k env steps. After epoch 1: the
    measured rates (evaluations included once timed) x the 999 epochs left; the epochs' mean would take epoch 1's
    1,222 s for each of them: 16x too long."""
    cpu, gpu = dia.Setup(torch.device("cpu")), dia.Setup(torch.device("cuda"))
    start = dia.work_left(dia.Args(), 0, dia.RunPosition())
    timed = {"denoiser": 0.1, "reward_end": 0.04, "actor_critic": 0.2, "collect": 0.008}
    # 409,600 x (0.1 + 0.04) + 404,600 x 0.2 + 100,000 x 0.008 = 57,344 + 80,920 + 800 = 139,064 s = 1 d 14 h 37 min
    assert dia.seconds_left(timed, start) == pytest.approx(139_064)
    lines = dia.run_time_lines(timed, start, cpu)  # the shared estimate, in global steps (the models' updates)
    assert lines == [
        "estimated time to the end of training: 1 d 14 h 37 min (0.114 s per step on cpu, 1,223,800 steps to go, "
        "evaluations not counted)",
        "notice: on this CPU the run takes more than a day: the defaults are the paper's GPU settings (--preset tiny "
        "runs in seconds, --preset cpu is sized for one); on a CPU the game to learn is --env-id Catch --preset catch"]
    assert len(dia.run_time_lines(timed, start, gpu)) == 1  # on a GPU the paper's settings are what is meant
    assert dia.run_time_lines({"denoiser": 0.5}, {**dict.fromkeys(dia.PHASES, 0), "denoiser": 125}, cpu) == [
        "estimated time to the end of training: 1 min 2 s (0.5 s per step on cpu, 125 steps to go, evaluations not "
        "counted)"]
    measured = {"denoiser": 0.05, "reward_end": 0.02, "actor_critic": 0.1, "collect": 0.004, "world_model_eval": 2.0,
                "evaluate": 60.0}
    after_epoch_1 = dia.work_left(dia.Args(), 5000, dia.RunPosition(epoch=2))
    assert after_epoch_1 == {"collect": 949 * 100, "world_model_eval": 949, "denoiser": 999 * 400,
                             "reward_end": 999 * 400, "actor_critic": 999 * 400, "evaluate": 100}
    # 399,600 x (0.05 + 0.02 + 0.1) + 94,900 x 0.004 + 949 x 2 + 100 x 60 = 67,932 + 379.6 + 1,898 + 6,000
    eta = dia.seconds_left(measured, after_epoch_1)
    assert eta == pytest.approx(76_209.6)
    epoch_1 = 10_000 * 0.05 + 10_000 * 0.02 + 5000 * 0.1 + 5100 * 0.004 + 2.0  # 1,222.4 s
    assert 999 * epoch_1 / eta == pytest.approx(16.02, abs=0.01)


def test_timing_the_phases_leaves_the_models_and_the_rngs_as_they_were(dia):
    """The estimate's timing runs on copies, an env and generators of its own: the run's weights and every global
    RNG are as before (the run's numbers, and so an exact resume, do not depend on it)."""
    import contextlib
    import random

    args = dia.parse_args(["--env-id", "Catch", "--preset", "tiny"])[0]
    models = dict(zip(("denoiser", "reward_end", "actor_critic"), dia.build_models(args, 3)))
    weights = {name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in models.items()}
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    seconds = dia.time_phases(args, models, torch.device("cpu"), contextlib.nullcontext(), dict.fromkeys(dia.PHASES, 1))
    assert set(seconds) == {"denoiser", "reward_end", "actor_critic", "collect"}
    assert all(0 < value < 10 for value in seconds.values()), seconds
    assert torch.equal(rngs[0], torch.get_rng_state()) and (rngs[1] == np.random.get_state()[1]).all()
    assert rngs[2] == random.getstate()
    for name, model in models.items():
        assert all(torch.equal(value, weights[name][key]) for key, value in model.state_dict().items()), name


def test_run_schedule_and_num_epochs(dia):
    assert len(dia.run_schedule(dia.Args())) == 1000  # first collection 5000: 950 collecting + 50 final epochs
    assert len(dia.run_schedule(dia.Args(), 10_000)) == 950
    assert dia.run_schedule(dia.Args(num_epochs=3)) == [5100, 100, 100]  # --num-epochs only sets the run length
    longer = dia.run_schedule(dia.Args(num_epochs=1200))
    assert len(longer) == 1200 and sum(longer) == 100_000  # never collects beyond the budget
    assert dia.run_schedule(dia.Args(dataset_dir="episodes")) == [0] * 50  # a static dataset: 50 epochs
    with pytest.raises(dia.UserError, match="--env-step-budget"):
        dia.check_args(dia.Args(env_step_budget=4000), 1)


def test_static_dataset_trains_the_whole_agent(tiny_run, tmp_path, dia):
    episodes = tiny_run[0] / "episodes"
    result = run(*TINY, "--dataset-dir", episodes, "--output-dir", tmp_path / "runs", cwd=tmp_path, check=True)
    run_dir = only_run_dir(tmp_path / "runs")
    assert not (run_dir / "episodes").exists()  # nothing collected
    scalars = read_scalars(run_dir)
    for tag in ("losses/denoiser", "losses/reward_end", "losses/actor", "losses/critic", "eval/denoiser_test_loss",
                "eval/reward_end_test_loss"):
        assert tag in scalars and all(np.isfinite(v) for _, v in scalars[tag]), tag
    assert "charts/episodic_return" not in scalars and scalars["charts/env_steps"][-1][1] == 0
    assert "this script's addition" in result.stdout  # the real-game test is labelled as not DIAMOND's
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    dia.setup_device(dia.Args(seed=1, cuda=False))  # the run's initial weights: seeded as main seeds them, then built
    initial = dia.build_models(dia.Args(**dia.PRESETS["tiny"]), 4)
    for name, model in zip(("denoiser", "reward_end", "actor_critic"), initial):
        trained = checkpoint["models"][name]
        changed = [key for key, value in model.state_dict().items()
                   if value.is_floating_point() and not torch.equal(value, trained[key])]
        assert changed, f"{name}: no weight changed"


def test_test_set_losses_are_logged_and_leave_the_training_rngs_alone(tiny_run, dia):
    scalars = read_scalars(tiny_run[0])
    printed = re.search(r"parameters: (.*?); device", tiny_run[1]).group(1)  # "denoiser 29,563, reward_end ..."
    sizes = {name: int(size.replace(",", "")) for name, size in re.findall(r"(\w+) ([\d,]+)", printed)}
    assert set(sizes) == {"denoiser", "reward_end", "actor_critic"}
    assert {tag: values for tag, values in scalars.items() if tag.startswith("charts/num_parameters_")} == {
        f"charts/num_parameters_{name}": [(0, size)] for name, size in sizes.items()}
    # epoch 1's evaluation plays a test episode (epsilon 0), on which both world-model losses are measured
    assert [step for step, _ in scalars["eval/denoiser_test_loss"]] == [45]
    assert [step for step, _ in scalars["eval/reward_end_test_loss"]] == [45]
    args = dia.Args(**dia.PRESETS["tiny"])
    denoiser, reward_end_model, _ = dia.build_models(args, 4)
    buffer = dia.ReplayBuffer(None, None, args.num_conditioning_steps)
    rng = np.random.default_rng(0)
    for T in (7, 12):
        buffer.add({"obs": rng.integers(0, 256, (T + 1, 32, 32, 3), dtype=np.uint8), "actions": np.zeros(T, np.int64),
                    "rewards": np.zeros(T, np.float32), "terminated": np.eye(T, dtype=bool)[-1],
                    "truncated": np.zeros(T, bool)}, write=False)
    before = torch.get_rng_state()
    a = dia.test_set_losses(denoiser, reward_end_model, buffer, [0, 1], args, torch.device("cpu"), seed=5)
    b = dia.test_set_losses(denoiser, reward_end_model, buffer, [0, 1], args, torch.device("cpu"), seed=5)
    assert a == b and set(a) == {"denoiser_test_loss", "reward_end_test_loss"}
    assert all(np.isfinite(v) and v > 0 for v in a.values()) and torch.equal(before, torch.get_rng_state())


def test_agent_copies_every_nth_epoch_newest_kept(tiny_run, dia, tmp_path):
    run_dir, _ = tiny_run  # the tiny preset keeps an agent every epoch
    latest = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    copies = sorted((run_dir / "checkpoints").glob("agent_epoch_*.pt"))
    assert [p.name for p in copies] == ["agent_epoch_00001.pt", "agent_epoch_00002.pt"]
    agent = torch.load(copies[-1], map_location="cpu", weights_only=True)
    assert agent.keys() == latest["models"]["actor_critic"].keys()
    assert all(torch.equal(agent[k], latest["models"]["actor_critic"][k]) for k in agent)
    actor_critic = dia.build_models(dia.Args(**dia.PRESETS["tiny"]), 4)[2]
    actor_critic.load_state_dict(torch.load(copies[0], weights_only=True))  # loads into the model as it is
    for epoch in range(5, 30, 5):
        dia.keep_agent_copy(tmp_path, epoch, actor_critic, keep=3)
    assert [p.name for p in sorted(tmp_path.glob("agent_epoch_*.pt"))] == [
        "agent_epoch_00015.pt", "agent_epoch_00020.pt", "agent_epoch_00025.pt"]


def test_progress_bars_name_their_phase_and_a_sigterm_reports_where_it_stopped(tiny_run, tmp_path):
    stderr = (tiny_run[0].parent.parent / "stderr.txt").read_text()
    for phase in ("collect", "denoiser", "reward_end", "actor_critic", "evaluate"):
        assert f"epoch 1 {phase}" in stderr, phase
    assert "epoch 1 collect: 100%" in stderr and "350/350" in stderr  # the collect bar grows with the first collection
    # a run whose denoiser phase is lengthened, stopped by SIGTERM on that phase's first progress line (stderr)
    proc = subprocess.Popen([PYTHON, str(ROOT / SCRIPT), *TINY, "--first-epoch-denoiser-steps", "400",
                             "--output-dir", str(tmp_path / "runs")], cwd=tmp_path, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    try:
        while b"epoch 1 denoiser:" not in seen:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, seen.decode()[-2000:]
            seen += chunk
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = out.decode(), (seen + err).decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    saved = torch.load(only_run_dir(tmp_path / "runs") / "checkpoints" / "latest.pt", weights_only=True)
    assert saved["phase"] == "denoiser" and 0 <= saved["position"] < 400
    assert f"stopped by signal at epoch 1 (denoiser, step {saved['position']};" in stdout
    assert "epoch 1: denoiser done" not in stdout and "done after" not in stdout and "stopped after" in stdout
    counts = re.findall(r"epoch 1 denoiser:[^\r\n]*?(\d+)/400", stderr)
    assert int(counts[-1]) == saved["position"]  # the bar's last count is the updates done


# ---------------------------------------------------------------------------------------------------------------------
# --play: the world model (and the real game) as a game; headless with --play-keys


def stand_in_game(dia, seed: int = 0):
    """An ImaginedGame whose 'world model' shifts the last frame right by (action + 1) pixels: no training."""
    frames = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, 4, 3, 16, 16), dtype=np.uint8))

    def starts():
        return dia.to_float(frames), torch.zeros((1, 3), dtype=torch.long)

    def next_frame(obs, act):
        return torch.roll(obs[:, -1], shifts=int(act[0, -1]) + 1, dims=-1)

    return dia.ImaginedGame(next_frame, starts), dia.to_uint8(dia.to_float(frames[0, -1])).permute(1, 2, 0).numpy()


def test_play_wiring_keys_reach_the_model_and_sessions_are_written(dia, tmp_path):
    meanings = ["NOOP", "FIRE", "RIGHT", "LEFT"]  # Breakout's
    assert dia.parse_play_keys("FR L/N", meanings) == [1, 2, 3, None, 0]
    with pytest.raises(dia.UserError, match="'U' is no action of this game; its letters: N noop, F fire"):
        dia.parse_play_keys("FU", meanings)
    assert dia.action_from_keys(True, False, False, True, False, meanings) == 2  # up-right: Breakout has RIGHT
    assert dia.action_from_keys(False, False, True, False, True, meanings) == 3  # left + fire: LEFT (no LEFTFIRE)
    assert dia.action_from_keys(False, False, False, False, True, meanings) == 1
    assert dia.action_from_keys(False, False, False, False, False, meanings) == 0
    sessions = {}
    for keys in ("RRRL", "LLLR", "RRRL"):
        game, first = stand_in_game(dia)
        sessions.setdefault(keys, []).append(dia.play_keys(game, dia.parse_play_keys(keys, meanings), meanings, 64))
    a, b, again = sessions["RRRL"][0], sessions["LLLR"][0], sessions["RRRL"][1]
    assert np.array_equal(a["frames"][0], first) and a["frames"].shape == (5, 16, 16, 3)
    assert np.array_equal(a["frames"][1], np.roll(first, 3, axis=1))  # RIGHT is action 2: shifted by 3 pixels
    assert not np.array_equal(a["frames"][1], b["frames"][1]) and np.array_equal(a["frames"], again["frames"])
    assert a["shown"].shape == (5, 64 + 26, 64, 3)  # enlarged, above a caption line
    paths = dia.save_play_files(tmp_path / "play", "imagined", a["shown"], [])
    import cv2

    capture = cv2.VideoCapture(str(paths[0]))
    assert sum(1 for _ in iter(lambda: capture.read()[0], False)) == 5

    # the real game with the same keys, recorded: a restart ('/') cuts the first episode, so two episode files
    real = dia.RealGame(dia.AtariEnv("Breakout", obs_size=32, seed=1))
    session = dia.play_keys(real, dia.parse_play_keys("FRRRLLL/FRRN", meanings), meanings, 64)
    paths = dia.save_play_files(tmp_path / "episodes", "real", session["shown"], real.take_episodes())
    assert len(paths) == 3
    lengths = []
    for path in paths[1:]:
        with np.load(path, allow_pickle=False) as data:
            assert {k: data[k].dtype for k in data} == {"obs": np.uint8, "actions": np.int64, "rewards": np.float32,
                                                        "terminated": bool, "truncated": bool}
            lengths.append(len(data["actions"]))
            assert data["obs"].shape == (lengths[-1] + 1, 32, 32, 3) and data["truncated"][-1]
        episode = dia.load_episode(path, 32, 4)
        assert np.array_equal(episode["obs"][-1], session["frames"][sum(lengths) + len(lengths) - 1])
    assert lengths == [7, 4] and session["frames"].shape == (13, 32, 32, 3)
    buffer = dia.ReplayBuffer(None, None, 4)
    train_ids, _ = dia.load_dataset_dir(dia.Args(dataset_dir=str(tmp_path / "episodes"), obs_size=32), buffer, 4)
    assert train_ids == [0] and len(buffer.episodes) == 2  # the --dataset-dir checks accept them
    mp4 = dia.episode_to_mp4(str(paths[1]), meanings)
    assert mp4.exists() and mp4.stat().st_size > 1000


def test_play_without_pygame_is_one_line_with_the_install_command(tmp_path, dia, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pygame", None)  # `import pygame` raises ImportError
    with pytest.raises(dia.UserError, match="pip install pygame-ce"):
        dia.import_pygame()
    shim = tmp_path / "shim" / "pygame"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named pygame')\n")
    env = {**script_env(), "PYTHONPATH": str(shim.parent)}
    result = subprocess.run([PYTHON, str(ROOT / SCRIPT), "--resume", str(tmp_path / "no_run"), "--play"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "pip install pygame-ce", "--play-keys")


def test_headless_play_of_a_tiny_run(tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    result = run("--resume", run_dir, "--play-keys", "FRRRLLL/RRN", "--play-world", "both", "--num-sampling-steps",
                 "1", "--sampler", "heun", cwd=tmp_path, check=True)
    assert "keys: N noop, F fire, R right, L left" in result.stdout and "sampler: heun, 1 denoising" in result.stdout
    assert "world model: 11 steps at" in result.stdout and "real game: 11 steps at" in result.stdout
    mp4s = sorted((run_dir / "play").glob("*.mp4"))
    assert [p.name.split("_")[1] for p in mp4s] == ["imagined", "real"] and all(p.stat().st_size > 1000 for p in mp4s)
    assert len(list((run_dir / "play").glob("play_real_*_episode_*.npz"))) >= 2
    # the checkpoint is untouched; the run's arguments other than play and sampling flags still cannot change
    refused = run("--resume", run_dir, "--play-keys", "F", "--batch-size", "3", cwd=tmp_path)
    assert refused.returncode == 2 and "--batch-size" in refused.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_a_play_session_under_the_entry_points_handlers(tiny_run, dia, tmp_path, monkeypatch, capsys,
                                                                      sig):
    """Run as a command, the stop handlers stay until the process exits (they only stop listening when the run is
    over); play still ends its session at a Ctrl-C or SIGTERM, and the handlers come back after it."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)

    def session(*args, **kwargs):
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal did not end the session")

    monkeypatch.setattr(dia, "play_headless", session)
    monkeypatch.setattr(dia.StopFlag, "keep_handlers", True)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        dia.main(*dia.parse_args(["--resume", str(run_dir), "--play-keys", "F", "--num-sampling-steps", "1"]))
        assert "play stopped by a signal" in capsys.readouterr().out
        kept = signal.getsignal(signal.SIGTERM)
        assert getattr(kept, "__self__", None).__class__.__name__ == "StopFlag"  # the run's, silenced
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_play_window_on_a_dummy_display(dia, monkeypatch, tmp_path):
    pytest.importorskip("pygame")  # the optional `play` extra: CI does not install it
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    game, _ = stand_in_game(dia)
    fps = dia.play_window({"imagined": lambda: game}, ["NOOP", "FIRE", "RIGHT", "LEFT"], tmp_path, 64, 1000.0,
                          max_steps=5)
    assert fps > 0


# ----------------------------------------------------------------------------------------------------------------------
# The fast path (--imagination-graphs): the imagination step as compiled graphs (CUDA graphs on CUDA). On the CPU it
# is compiled here with torch.compile's eager backend (dynamo traces the graphs, nothing is code-generated): bitwise
# the same as the functions run uncompiled; inductor's code-generated kernels are compared to eager to 1e-4 on the
# smallest piece (compiling the whole step with inductor takes minutes on 2 shared cores).

GRAPH_ARGS = dict(obs_size=16, diffusion_channels=(4, 4), diffusion_res_blocks=1, diffusion_cond_dim=8,
                  reward_channels=4, reward_cond_dim=4, reward_lstm_dim=8, actor_channels=(4, 4, 4, 4),
                  actor_lstm_dim=8, imagination_horizon=3, backup_every=4, num_imagined_envs=3, num_sampling_steps=1)


def fast_setup(dia, backend):
    """Tiny models, a replay buffer of random 16x16 episodes, the imagined envs and their ImaginationGraphs (backend
    None: the same functions uncompiled), the actor-critic's learner and the run's generator, all seeded alike."""
    from types import SimpleNamespace

    args = dia.Args(**GRAPH_ARGS)
    rng = np.random.default_rng(0)
    buffer = dia.ReplayBuffer(None, args.recency_weights, args.num_conditioning_steps)
    for T in (7, 9, 12, 5):
        buffer.add({"obs": rng.integers(0, 256, (T + 1, 16, 16, 3), dtype=np.uint8), "actions": rng.integers(0, 4, T),
                    "rewards": rng.integers(-1, 2, T).astype(np.float32), "terminated": np.arange(T) == T - 1,
                    "truncated": np.zeros(T, bool)}, write=False)
    torch.manual_seed(0)
    denoiser, reward_end, actor_critic = dia.build_models(args, 4)
    cpu = torch.device("cpu")
    env = dia.WorldModelEnv(denoiser, reward_end, buffer, args, cpu, torch.Generator().manual_seed(1),
                            torch.Generator().manual_seed(2))
    graphs = dia.ImaginationGraphs(env, actor_critic, args, cpu, backend=backend)
    learner = dia.build_learners(args, {"actor_critic": actor_critic}, use_cuda=False)["actor_critic"]
    return SimpleNamespace(args=args, env=env, graphs=graphs, learner=learner,
                           generator=torch.Generator().manual_seed(3))


def fast_updates(dia, s, count: int) -> list[torch.Tensor]:
    """count actor-critic updates through the fast path; the losses."""
    losses = []
    for _ in range(count):
        loss, _ = dia.actor_critic_loss(s.learner.model, s.env, s.args, s.generator, graphs=s.graphs)
        s.learner.update(loss)
        losses.append(loss.detach())
    return losses


@pytest.fixture(scope="session")
def compiled_fast(tmp_path_factory):
    """The session's one compiled fast path (eager backend), and dynamo's counters after its first two updates."""
    import torch._dynamo

    dia = load_module(SCRIPT)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    s = fast_setup(dia, "eager")
    losses = fast_updates(dia, s, 2)
    counters = {key: dict(value) for key, value in torch._dynamo.utils.counters.items()}
    return s, losses, counters


def test_fast_path_is_compiled_bitwise_as_eager_and_actually_taken(dia, compiled_fast):
    s, losses, counters = compiled_fast
    ref = fast_setup(dia, None)
    ref_losses = fast_updates(dia, ref, 2)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))  # bitwise
    for a, b in zip(s.learner.model.parameters(), ref.learner.model.parameters()):
        assert torch.equal(a, b)
    for key in ("obs", "act", "age"):
        assert torch.equal(getattr(s.env, key), getattr(ref.env, key)), key
    assert all(torch.equal(a, b) for a, b in zip(s.env.hidden + s.env.actor_hidden,
                                                 ref.env.hidden + ref.env.actor_hidden))
    assert torch.equal(s.generator.get_state(), ref.generator.get_state())
    # the imagined envs restarted from the pool (ages reset) and the uniforms are consumed the same way
    assert s.env.age.max() < s.args.imagination_horizon
    # taken: per update backup_every world-model calls and backup_every - 1 policy calls (step 0 and the final value
    # run uncompiled), each a dynamo-compiled frame
    assert s.graphs.calls == 2 * (2 * s.args.backup_every - 1)
    assert counters["stats"]["calls_captured"] > 100 and counters["stats"]["unique_graphs"] >= 2
    assert not counters.get("graph_break"), counters.get("graph_break")  # each step is one graph


def fast_step_inputs(s, seed: int = 0):
    """Inputs of one fast step: the imagined envs' state, a restart pool, noise and uniforms, half the envs stopped."""
    env, n = s.env, s.args.num_imagined_envs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start_obs, start_act, start_hidden = env.start(n)
    actor_hidden = tuple(h.clone() for h in env.actor_hidden)
    return dict(start=(start_obs, start_act, start_hidden), noise=torch.randn(n, 3, 16, 16, generator=g),
                uniforms=torch.rand(3, n, generator=g), stopped=torch.arange(n) % 2 == 0, actor_hidden=actor_hidden,
                start_actor_hidden=tuple(torch.randn(h.shape, generator=g) for h in actor_hidden),
                final_value=torch.randn(n, generator=g))


def test_fast_path_step_agrees_with_the_eager_modules(dia, compiled_fast):
    """From identical inputs, the compiled step's pieces (the LSTMs written out, categorical sampling by inverse CDF,
    restarts by mask) agree with the script's eager modules: D(x; sigma) before 8-bit quantisation, the next frame,
    reward/end and policy logits, the swapped-in states."""
    s = compiled_fast[0]
    env, args, graphs, actor_critic = s.env, s.args, s.graphs, s.learner.model
    x = fast_step_inputs(s)
    stopped = x["stopped"]
    # called as the rollout calls them (grad mode on: the policy step learns), so no new graph is compiled
    outputs = graphs.policy(env.obs[:, -1], x["actor_hidden"], stopped, x["start_actor_hidden"], x["final_value"],
                            x["uniforms"][0])
    logits, value, action, bootstrap, swapped, stepped = (v.detach() if torch.is_tensor(v) else v for v in outputs)
    step = graphs.world_model(env.obs, env.act, env.hidden, env.age, action, tuple(h.detach() for h in stepped),
                              x["noise"], x["uniforms"][1:], x["start"])
    with torch.no_grad():
        expected_hidden = tuple(torch.where(stopped[:, None], a, b) for a, b in zip(x["start_actor_hidden"],
                                                                                    x["actor_hidden"]))
        ref_logits, ref_value, ref_stepped = actor_critic(env.obs[:, -1], expected_hidden)  # nn.LSTMCell
        act = torch.cat([env.act[:, :-1], action[:, None]], 1)
        sigmas = dia.karras_sigmas(args.num_sampling_steps, args.sigma_min, args.sigma_max, args.rho)
        _, denoised = env.denoiser(x["noise"], torch.full((3,), float(sigmas[0])), env.obs.flatten(1, 2), act)
        past = env.obs.flatten(1, 2)
        next_obs = dia.euler_sample(lambda x_, sigma: dia.quantize_8bit(env.denoiser(x_, sigma, past, act)[1]),
                                    x["noise"], sigmas).clamp(-1, 1)
        ref_reward, ref_end, _ = env.reward_end_model(env.obs[:, -1:], action[:, None], next_obs[:, None], env.hidden)
    assert all(torch.equal(a.detach(), b) for a, b in zip(swapped, expected_hidden))
    assert (logits - ref_logits).abs().max() < 1e-5 and (value - ref_value).abs().max() < 1e-5
    assert (stepped[0] - ref_stepped[0]).abs().max() < 1e-5
    assert torch.equal(bootstrap, torch.where(stopped, x["final_value"], value))
    # the action by inverse CDF: the class whose cumulative probability interval holds the uniform
    cdf = ref_logits.softmax(-1).cumsum(-1)
    assert torch.equal(action, (cdf <= x["uniforms"][0][:, None]).sum(-1).clamp(max=3))
    assert step["denoised"].shape == (args.num_sampling_steps, 3, 3, 16, 16)
    assert (step["denoised"][0] - denoised).abs().max() < 1e-4  # before 8-bit quantisation
    assert torch.equal(step["next_obs"], next_obs)
    assert (step["reward_logits"] - ref_reward[:, 0]).abs().max() < 1e-4
    assert (step["end_logits"] - ref_end[:, 0]).abs().max() < 1e-4
    # stopped envs took their pool slot: frames, actions, state and age 0
    stop = step["stopped"]
    assert torch.equal(step["obs"][stop], x["start"][0][stop]) and torch.equal(step["act"][stop], x["start"][1][stop])
    assert (step["age"][stop] == 0).all() and (step["age"][~stop] == env.age[~stop] + 1).all()
    assert torch.equal(step["obs"][~stop][:, -1], next_obs[~stop])


def test_inductor_compiled_lstm_step_and_sampling_agree_with_eager_to_1e_4(dia, tmp_path_factory, monkeypatch):
    """inductor's code-generated kernels on the smallest piece of the fast step: the reward/end model's LSTM step as
    the graphs write it out, and the inverse-CDF sampling, against nn.LSTM and the eager function. (The whole step
    compiled by inductor matched too, by hand: 3 updates' losses equal, gradients within 6e-8; but its compilation
    took 11 minutes on 2 shared cores, and the policy alone 2.4, too long for the suite.)"""
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("inductor needs a C compiler on the CPU")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor_cache"))
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile workers on 2 cores
    torch.manual_seed(0)
    lstm = nn.LSTM(12, 8, batch_first=True)
    dia.init_lstm(lstm)

    def piece(x, h, c, uniform):
        h, c = dia.lstm_step(x, (h, c), lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
        return h, c, dia.sample_categorical(h, uniform)

    x, h, c, uniform = torch.randn(5, 12), torch.randn(5, 8), torch.randn(5, 8), torch.rand(5)
    with torch.no_grad():
        compiled_h, compiled_c, compiled_k = torch.compile(piece, backend="inductor", dynamic=False)(x, h, c, uniform)
        _, (ref_h, ref_c) = lstm(x[:, None], (h[None], c[None]))
    assert (compiled_h - ref_h[0]).abs().max() < 1e-4 and (compiled_c - ref_c[0]).abs().max() < 1e-4
    assert torch.equal(compiled_k, dia.sample_categorical(ref_h[0], uniform))


def test_a_fast_path_run_saves_stops_and_resumes_from_the_same_state(dia, compiled_fast, tmp_path):
    """In process: the fast path's state (the imagined envs, the actor-critic and its optimizer, the generators) goes
    into a checkpoint file; two more updates from there, then the checkpoint loaded back (weights_only) and the same
    two updates again: the same losses, weights and imagined envs, bitwise."""
    s = compiled_fast[0]
    learner = s.learner

    def state():
        return {"imagination": s.env.state_dict(), "model": learner.model.state_dict(),
                "optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict(),
                "generator": s.generator.get_state(), "env_generator": s.env.generator.get_state(),
                "cpu_generator": s.env.cpu_generator.get_state(), "calls": s.graphs.calls}

    path = tmp_path / "latest.pt"
    dia.save_checkpoint(path, state())  # atomic, plain tensors and containers
    calls = s.graphs.calls
    first = fast_updates(dia, s, 2)
    after = {k: v.clone() for k, v in s.env.state_dict().items() if torch.is_tensor(v)}
    weights = [p.detach().clone() for p in learner.model.parameters()]
    assert s.graphs.calls == calls + 2 * (2 * s.args.backup_every - 1)  # the compiled steps ran
    saved = torch.load(path, weights_only=True)
    s.env.load_state_dict(saved["imagination"])
    learner.model.load_state_dict(saved["model"])
    learner.optimizer.load_state_dict(saved["optimizer"])
    learner.scheduler.load_state_dict(saved["scheduler"])
    s.generator.set_state(saved["generator"])
    s.env.generator.set_state(saved["env_generator"])
    s.env.cpu_generator.set_state(saved["cpu_generator"])
    second = fast_updates(dia, s, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(weights, learner.model.parameters()))
    assert all(torch.equal(v, getattr(s.env, k)) for k, v in after.items())


def test_lstm_states_stay_float32_under_bfloat16_autocast_in_both_paths(dia):
    """With --dtype bfloat16 the imagined envs' LSTM states (reward/end and actor) are kept in fp32 between steps and
    rollouts, eager and fast path alike (CPU autocast stands in for CUDA's): rounding them to bf16 after every rollout
    would drift the imagined episodes that live across updates."""
    for backend in ("eager-path", None):
        s = fast_setup(dia, None)
        amp = torch.autocast("cpu", dtype=torch.bfloat16)
        s.env.autocast = amp
        graphs = None
        if backend is None:  # the fast path's functions, uncompiled, with autocast entered inside them
            graphs = dia.ImaginationGraphs(s.env, s.learner.model, s.args, torch.device("cpu"), torch.bfloat16, None)
        for _ in range(2):
            loss, _ = dia.actor_critic_loss(s.learner.model, s.env, s.args, s.generator, amp, graphs)
            assert torch.isfinite(loss)
            states = s.env.hidden + s.env.actor_hidden
            assert all(h.dtype == torch.float32 for h in states), (backend, [h.dtype for h in states])


def test_compile_compiles_each_function_once_over_a_tiny_run(dia, tmp_path, monkeypatch):
    """Issue 24: with --compile and --imagination-graphs on, the denoiser compiled about 5 times (evaluation batch
    sizes, segment lengths, grad modes) and the policy step 3 times (step 0's detached LSTM state, the final value
    under no_grad); each is an inductor compile of minutes on a GPU. Over two epochs of a tiny Catch run (training,
    an evaluation with the imagined-vs-real diagnostic, training after it) a counting backend is called once per
    graph: the denoiser's training update, the policy step and the world-model step, once each; with the eager
    imagination (--imagination-graphs off), the denoiser's update and its sampling, once each."""
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append((len(gm.graph.nodes), torch.is_grad_enabled()))
        return gm.forward

    monkeypatch.setattr(dia, "COMPILE_BACKEND", counting_backend)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    compiled = {}
    for graphs_flag, epochs in (("on", "2"), ("off", "1")):
        torch._dynamo.reset()
        graphs.clear()
        try:
            dia.main(*dia.parse_args(["--env-id", "Catch", "--preset", "tiny", "--num-epochs", epochs, "--compile",
                                      "--imagination-graphs", graphs_flag, "--output-dir", str(tmp_path / graphs_flag)]))
        finally:
            torch._dynamo.reset()
            for s, handler in before.items():
                signal.signal(s, handler)
        compiled[graphs_flag] = list(graphs)
    on, off = compiled["on"], compiled["off"]
    assert len(on) == 3, on  # a recompile (shape, stride, grad mode) or a graph break would add one
    assert all(grad for _, grad in on), on  # the sampling inside the world-model step is no_grad inside it
    assert sorted(nodes for nodes, _ in on)[-1] > 1000  # the world-model step: denoiser, reward/end, restarts
    # the eager imagination samples with the compiled denoiser: its update once, its no_grad sampling once
    assert [grad for _, grad in off] == [True, False], off


def test_imagination_graphs_flag_selects_the_fast_path(dia):
    env, actor = object(), object()
    cpu, cuda = dia.Setup(torch.device("cpu")), dia.Setup(torch.device("cuda"))
    pick = lambda setup, **kw: dia.imagination_graphs(dia.Args(**kw), setup, env, actor)  # noqa: E731
    assert pick(cpu) is None and pick(cpu, imagination_graphs="off") is None  # auto: off on the CPU
    on_cpu = pick(cpu, imagination_graphs="on")
    assert isinstance(on_cpu, dia.ImaginationGraphs) and on_cpu.mode is None and on_cpu.backend == "inductor"
    on_cuda = pick(cuda)  # auto: CUDA graphs on CUDA (nothing runs until the first rollout)
    assert on_cuda.mode == "reduce-overhead" and on_cuda.amp_dtype is None
    assert pick(cuda, dtype="bfloat16").amp_dtype == torch.bfloat16
    assert pick(cuda, imagination_graphs="off") is None and pick(cuda, world_model_only=True) is None
    assert "imagination_graphs" in dia.flag_marks()[1]


def test_a_failed_or_interrupted_compilation_is_one_line_or_a_stop(dia):
    """A compilation that fails (e.g. torch's cache left broken by an earlier Ctrl-C: ImportError of a truncated .so)
    is a one-line TrainingFailure naming --imagination-graphs off; the same failure after a signal (Ctrl-C reaches the
    compiler's processes too) is a stop, which the run saves; a bug that is not the compiler's keeps its traceback.
    While it compiled, the stop flag said so (a signal's acknowledgement names it); afterwards it no longer does."""
    from types import SimpleNamespace

    busy = []  # what the stop flag said during each compilation

    def graphs_raising(error, requested):
        graphs = dia.ImaginationGraphs.__new__(dia.ImaginationGraphs)
        graphs.stop = SimpleNamespace(requested=requested, busy="")
        graphs.backend, graphs.calls, graphs.device = "inductor", 0, torch.device("cpu")

        def failing_rollout(generator):
            busy.append(graphs.stop.busy)
            raise error
        graphs._rollout = failing_rollout
        return graphs

    broken_cache = ImportError("/tmp/torchinductor_root/7z/c7zq.main.so: file too short")
    with pytest.raises(dia.TrainingFailure, match="--imagination-graphs off") as failure:
        graphs_raising(broken_cache, requested=False).rollout(None)
    assert "file too short" in str(failure.value) and "\n" not in str(failure.value)
    with pytest.raises(dia.StopRequested):
        graphs_raising(broken_cache, requested=True).rollout(None)
    with pytest.raises(ValueError):
        (graphs := graphs_raising(ValueError("a shape bug"), requested=False)).rollout(None)
    assert busy == ["compiling the imagination step (up to 20 minutes on a CPU)"] * 3 and graphs.stop.busy == ""


def test_a_sigterm_while_the_imagination_step_compiles_is_acknowledged_at_once_then_the_run_saves(
        dia, tmp_path, monkeypatch, capsys):
    """Issue 23: a SIGTERM while --imagination-graphs compiled (minutes on a CPU) waited with no word. In process, a
    backend in inductor's place (COMPILE_BACKEND) sends the signal while it compiles: the acknowledgement, saying that
    the compilation must end first, comes before the backend returns; then the compilation ends, the update it
    belongs to is finished, and the run saves where it stands and stops."""
    import torch._dynamo

    events = []

    def slow_backend(gm, example_inputs):
        events.append("compiling")
        if events.count("compiling") == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        events.append("compiled")
        return gm.forward

    monkeypatch.setattr(dia, "COMPILE_BACKEND", slow_backend)
    monkeypatch.setattr(dia, "say_now", events.append)  # the signal handler's acknowledgement
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch._dynamo.reset()  # nothing compiled by an earlier test is reused
    try:
        dia.main(*dia.parse_args([*TINY, "--imagination-graphs", "on", "--output-dir", str(tmp_path)]))
    finally:
        torch._dynamo.reset()
        for s, handler in before.items():
            signal.signal(s, handler)
    assert events[:3] == ["compiling", "stopping after this step, then saving; compiling the imagination step (up to "
                          "20 minutes on a CPU) must end first; Ctrl-C again to quit without saving", "compiled"]
    assert events.count("compiling") >= 2  # the compilation went on after the signal
    out = capsys.readouterr().out
    assert "saved checkpoint at epoch 1 actor_critic, step 1" in out and "stopped by signal at epoch 1" in out
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoints" / "latest.pt", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["phase"], checkpoint["position"]) == (1, "actor_critic", 1)


def test_a_failed_backward_compilation_is_one_line_naming_the_flag(dia):
    """Issue 24: a compiled graph's backward is compiled at its first backward (in the update, outside the forward's
    guard), so a compiler failure there was a raw traceback. A backend that compiles every forward and fails every
    backward, in the first update of the denoiser (--compile) and of the actor-critic (--imagination-graphs): each is
    one line naming what failed and the flag that avoids it."""
    import torch._dynamo
    import torch._inductor.exc
    from types import SimpleNamespace
    from torch._dynamo.backends.common import aot_autograd

    def failing_backward(gm, example_inputs):
        raise torch._inductor.exc.InductorError(RuntimeError("C++ compile error: cc1plus: out of memory"), "")

    backend = aot_autograd(fw_compiler=lambda gm, _: gm.forward, bw_compiler=failing_backward)
    s = fast_setup(dia, backend)
    denoiser = s.env.denoiser
    s.args.compile = True
    world_model = {"denoiser": denoiser, "reward_end": s.env.reward_end_model}
    learners = {"actor_critic": s.learner, **dia.build_learners(s.args, world_model, use_cuda=False)}
    cpu = torch.device("cpu")
    run = SimpleNamespace(args=s.args, device=cpu, autocast=contextlib.nullcontext(), generator=s.generator,
                          cpu_generator=torch.Generator().manual_seed(4), buffer=s.env.buffer, train_ids=None,
                          learners=learners, denoiser_net=torch.compile(denoiser.net, backend=backend),
                          wm_env=s.env, graphs=s.graphs, stop=SimpleNamespace(requested=False), run_dir=None,
                          schedule=[0])
    torch._dynamo.reset()
    try:
        for name, what, fix in (("denoiser", "the denoiser (--compile)", "rerun without --compile"),
                                ("actor_critic", "the imagination graphs", "--imagination-graphs off")):
            with pytest.raises(dia.TrainingFailure) as failure:
                dia.train_model(run, name, dia.RunPosition(), dia.EpochLog(cpu))
            message = str(failure.value)
            assert message.startswith(f"compiling {what} failed (InductorError: ") and "out of memory" in message
            assert fix in message and "\n" not in message
    finally:
        torch._dynamo.reset()


def test_a_stop_while_the_test_envs_are_made_makes_no_more_of_them(dia, monkeypatch, capsys):
    """Issue 23: the test episodes make up to 16 Atari envs (about a second each) before their first step; a signal
    while they are made stopped nothing until all were. Now one requested before makes none, and one that comes
    while the second is made stops before the third."""
    made = []

    def make_env(args, seed, generator=None, training=True):
        made.append(seed)
        if len(made) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return object()  # never stepped: the episodes are abandoned before their first step

    monkeypatch.setattr(dia, "make_env", make_env)
    args = dia.parse_args(TINY)[0]
    actor_critic = dia.build_models(args, 4)[2]
    stop = dia.StopFlag()
    try:
        stop.requested = True
        with pytest.raises(dia.StopRequested):
            dia.run_test_episodes(actor_critic, args, 16, 0, torch.device("cpu"), check=stop.check)
        assert made == []
        stop.requested = False
        with pytest.raises(dia.StopRequested):
            dia.run_test_episodes(actor_critic, args, 16, 0, torch.device("cpu"), check=stop.check)
        assert len(made) == 2
    finally:
        stop.restore()
    assert "stopping after this step, then saving" in capsys.readouterr().out


def test_updates_that_cannot_fit_are_refused_in_one_line_naming_the_flag_and_a_value_that_fits(dia, tmp_path,
                                                                                                 monkeypatch):
    """Issue 23: --batch-size 2000000 was accepted and hung in the first denoiser phase. At start-up, counted on the
    meta device, the denoiser and reward/end updates at --batch-size and the actor-critic update (its imagination
    rollout) at --num-imagined-envs are refused in one line naming the flag and the largest value that fits, before
    the run folder exists; the value named fits; the tiny preset fits in the memory this machine has."""
    monkeypatch.setattr(dia, "available_memory", lambda setup: 16 * 2**30)
    cpu = dia.Setup(torch.device("cpu"))
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for flag in ("--batch-size", "--num-imagined-envs"):
            with pytest.raises(dia.UserError) as refused:
                dia.main(*dia.parse_args(["--env-id", "Breakout-v5", flag, "2000000", "--output-dir",
                                          str(tmp_path / "runs")]))
            message = str(refused.value)
            assert "\n" not in message and message.startswith(f"{flag} 2000000 needs about "), message
            fits = int(re.search(rf"use {flag} (\d+) or less$", message).group(1))
            assert 4 <= fits < 2000  # the paper's networks in 16 GiB: tens of segments, hundreds of envs
            dia.check_training_memory(cpu, dia.parse_args(["--env-id", "Breakout-v5", flag, str(fits)])[0], 4)
            with pytest.raises(dia.UserError):  # and it is the largest
                dia.check_training_memory(cpu, dia.parse_args(["--env-id", "Breakout-v5", flag, str(fits + 1)])[0], 4)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    dia.check_training_memory(cpu, dia.parse_args(TINY)[0], 4)
