"""Tests of diamond_atari.py on bsuite's Catch (--env-id Catch): the rules and the frames of CatchEnv against bsuite's
(Osband et al. 2020; deepmind/bsuite, bsuite/environments/catch.py), its determinism and its state; the environment
seam (make_env); a tiny run as a user runs it, its exact resume after SIGKILL, --eval-only, --play-keys and
--dataset-dir on it, and the notice for the Atari flags Catch ignores."""
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import (checkpoint_tensors, load_module, only_run_dir, read_scalars, run_script,
                      run_until_line_then_kill)

SCRIPT = "diamond_atari.py"
TINY = ["--env-id", "Catch", "--preset", "tiny"]
ROWS, COLUMNS = 10, 5


@pytest.fixture(scope="module")
def dia():
    return load_module(SCRIPT)


def run(*args, cwd, check=False):
    return run_script(SCRIPT, *args, cwd=cwd, check=check)


def play_games(env, policy, num_games: int) -> list[dict]:
    """num_games whole games with policy(env) -> action; each game's rewards, flags and the states seen."""
    games = []
    for _ in range(num_games):
        env.reset()
        game = {"rewards": [], "terminated": [], "truncated": [], "ball_col": env.ball_col}
        while not env.game_over:
            _, reward, terminated, truncated = env.step(policy(env))
            for key, value in (("rewards", reward), ("terminated", terminated), ("truncated", truncated)):
                game[key].append(value)
        games.append(game)
    return games


# ----------------------------------------------------------------------------------------------------------------------
# CatchEnv: bsuite's rules, the frames, the seed and the state


def test_catch_rules_random_policy_catches_one_in_five_and_a_tracker_all(dia):
    env = dia.CatchEnv(obs_size=32, seed=0)
    assert env.num_actions == 3 and env.action_meanings == ["LEFT", "NOOP", "RIGHT"]  # bsuite's (-1, 0, +1)
    rng = np.random.default_rng(0)
    games = play_games(env, lambda env: int(rng.integers(3)), 1000)
    for game in games:  # the ball falls 9 rows: 9 steps, 0 reward until the last, which is +1 or -1 and terminates
        assert game["rewards"][:-1] == [0.0] * 8 and game["rewards"][-1] in (1.0, -1.0)
        assert game["terminated"] == [False] * 8 + [True] and not any(game["truncated"])
    assert env.game_return == games[-1]["rewards"][-1] and env.game_steps == 9
    assert {game["ball_col"] for game in games} == set(range(COLUMNS))
    # the ball's column is uniform and independent of a random paddle: P(catch) = 1/5 exactly
    caught = np.mean([game["rewards"][-1] == 1.0 for game in games])
    sigma = math.sqrt(0.2 * 0.8 / len(games))
    assert abs(caught - 0.2) < 4 * sigma, caught
    # a tracker moves the paddle toward the ball's column: 9 steps reach any column from the middle one
    tracker = play_games(env, lambda env: 1 + int(np.sign(env.ball_col - env.paddle_col)), 200)
    assert all(game["rewards"][-1] == 1.0 for game in tracker)
    # a paddle that only moves away misses every ball not in its corner; the paddle stops at the wall
    env.reset()
    for _ in range(3):
        env.step(0)
    assert env.paddle_col == 0 and env.ball_row == 3


def cell(frame: np.ndarray, row: int, col: int) -> np.ndarray:
    """The pixels of a grid cell: squares of size // 10 pixels, the 10 x 5 grid centred in the frame."""
    size = frame.shape[0]
    c = size // ROWS
    top, left = (size - ROWS * c) // 2 + row * c, (size - COLUMNS * c) // 2 + col * c
    return frame[top: top + c, left: left + c]


@pytest.mark.parametrize("size", [32, 64])
def test_catch_frames_show_the_ball_and_the_paddle_where_the_state_says(dia, size):
    env = dia.CatchEnv(obs_size=size, seed=3)
    frames, states = [env.reset().copy()], [(env.ball_row, env.ball_col, env.paddle_col)]
    for action in (0, 2, 2, 2, 1, 0, 0, 2, 1):
        frames.append(env.step(action)[0].copy())
        states.append((env.ball_row, env.ball_col, env.paddle_col))
    assert states[0][0] == 0 and states[0][2] == 2 and states[-1][0] == ROWS - 1  # top row; the middle column
    assert [s[2] for s in states] == [2, 1, 2, 3, 4, 4, 3, 2, 3, 3]  # LEFT, RIGHT x3 (the wall), NOOP, ...
    ball, paddle = (tuple(cell(frames[0], r, c)[0, 0]) for r, c in ((0, states[0][1]), (ROWS - 1, 2)))
    background = tuple(cell(frames[0], 5, (states[0][1] + 1) % COLUMNS)[0, 0])
    assert len({ball, paddle, background}) == 3 and max(ball) > 200 and max(paddle) > 200 and max(background) < 60
    c = size // ROWS
    top, left = (size - ROWS * c) // 2, (size - COLUMNS * c) // 2
    for frame, (ball_row, ball_col, paddle_col) in zip(frames, states):
        assert frame.shape == (size, size, 3) and frame.dtype == np.uint8
        expected = np.zeros_like(frame)  # black outside the grid
        grid = expected[top: top + ROWS * c, left: left + COLUMNS * c]
        grid[:] = background
        cell(expected, ROWS - 1, paddle_col)[:] = paddle
        cell(expected, ball_row, ball_col)[:] = ball  # over the paddle when caught
        assert np.array_equal(frame, expected), (ball_row, ball_col, paddle_col)


def test_catch_is_deterministic_from_its_seed_and_resumes_from_its_state(dia, tmp_path):
    def columns(seed):
        env = dia.CatchEnv(obs_size=16, seed=seed)
        return [game["ball_col"] for game in play_games(env, lambda env: 1, 40)]

    assert columns(7) == columns(7) and columns(7) != columns(8)
    env = dia.CatchEnv(obs_size=32, seed=11)
    play_games(env, lambda env: 2, 3)
    env.reset()
    env.step(0)
    path = tmp_path / "env.pt"
    torch.save({"env": env.state_dict()}, path)  # as a checkpoint holds it: plain numbers, loaded weights_only
    restored = dia.CatchEnv(obs_size=32, seed=999)
    restored.load_state_dict(torch.load(path, weights_only=True)["env"])
    assert np.array_equal(restored.obs, env.obs)
    rng = np.random.default_rng(1)
    actions = [int(a) for a in rng.integers(3, size=60)]
    for a in actions:  # the rest of this game and the next ones (new ball columns from the restored Generator)
        for e in (env, restored):
            e.reset()
        step, step_restored = env.step(a), restored.step(a)
        assert np.array_equal(step[0], step_restored[0]) and step[1:] == step_restored[1:]
    assert env.state_dict() == restored.state_dict()


def test_make_env_is_the_one_seam(dia):
    for spelling in ("Catch", "catch", " CATCH "):
        assert dia.canonical_env_id(spelling) == ("Catch", "Catch")
    catch = dia.make_env(dia.Args(env_id="catch", obs_size=32), seed=0)
    assert isinstance(catch, dia.CatchEnv) and catch.normalized_score(1.0) is None
    assert set(catch.ignored_flags) == {"frame_skip", "noop_max", "sticky_actions", "max_episode_steps"}
    assert catch.reset().shape == (32, 32, 3)
    with pytest.raises(dia.UserError, match="--obs-size 8 is too small for Catch"):
        dia.make_env(dia.Args(env_id="Catch", obs_size=8), seed=0)
    breakout = dia.make_env(dia.Args(env_id="ALE/Breakout-v5", obs_size=32), seed=0)
    assert isinstance(breakout, dia.AtariEnv) and breakout.end_on_life_loss and breakout.ignored_flags == ()
    assert breakout.action_meanings == ["NOOP", "FIRE", "RIGHT", "LEFT"] and breakout.num_actions == 4
    assert breakout.normalized_score(30.5) == pytest.approx(1.0)  # (30.5 - random 1.7) / (human 30.5 - 1.7)
    assert not dia.make_env(dia.Args(), seed=0, training=False).end_on_life_loss  # test episodes: whole games


# ----------------------------------------------------------------------------------------------------------------------
# Runs as a user runs them


@pytest.fixture(scope="module")
def catch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("catch")
    result = run(*TINY, "--output-dir", out / "runs", cwd=out, check=True)
    return only_run_dir(out / "runs"), result.stdout


def test_catch_tiny_run_writes_a_checkpoint_episodes_and_a_raw_score(catch_run):
    run_dir, stdout = catch_run
    assert run_dir.name.startswith("Catch__diamond_atari__1__")
    assert "game: Catch (3 actions)" in stdout and "notice: --" not in stdout  # the tiny preset's flags: no notice
    assert "raw score only" in stdout and "human-normalised" not in stdout
    scalars = read_scalars(run_dir)
    for tag in ("charts/episodic_return", "eval/episodic_return", "losses/denoiser", "losses/reward_end",
                "losses/actor", "world_model/next_frame_mse", "world_model/reward_accuracy"):
        assert tag in scalars, tag
    assert "eval/human_normalized_score" not in scalars
    assert all(-1 <= value <= 1 for _, value in scalars["charts/episodic_return"])  # a game's return: +1 or -1
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert checkpoint["env_steps"] == 350 and checkpoint["models"]["actor_critic"]["actor_linear.weight"].shape[0] == 3
    state = checkpoint["env"]
    assert set(state) == {"ball_row", "ball_col", "paddle_col", "game_over", "game_steps", "game_return", "rng"}
    assert state["rng"]["bit_generator"] == "PCG64"
    assert checkpoint["num_buffer_files"] == len(list((run_dir / "episodes").glob("episode_*.npz"))) > 30
    with np.load(run_dir / "episodes" / "episode_000000.npz", allow_pickle=False) as episode:
        assert episode["obs"].shape == (10, 32, 32, 3) and episode["obs"].dtype == np.uint8
        assert episode["rewards"].tolist()[:-1] == [0.0] * 8 and episode["rewards"][-1] in (-1.0, 1.0)
        assert episode["terminated"].tolist() == [False] * 8 + [True] and not episode["truncated"].any()


def plain_values(obj, prefix=""):
    """Numbers, strings and bools in a nested checkpoint (counters, positions, Catch's state), args and the epoch's
    timings excluded."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key not in ("args", "epoch_log", "phase_sums"):
                yield from plain_values(value, f"{prefix}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from plain_values(value, f"{prefix}/{i}")
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        yield prefix, obj


def test_catch_resume_after_sigkill_is_exact(catch_run, tmp_path):
    reference, _ = catch_run
    out = tmp_path / "runs"
    stdout = run_until_line_then_kill(SCRIPT, *TINY, "--output-dir", out, line_startswith="saved checkpoint at epoch 1",
                                      cwd=tmp_path)
    assert "epoch 2/" not in stdout
    killed = only_run_dir(out)
    run("--resume", killed, cwd=tmp_path, check=True)
    a, b = (checkpoint_tensors(run_dir / "checkpoints" / "latest.pt") for run_dir in (reference, killed))
    a, b = ({k: v for k, v in t.items() if not k.startswith("/args")} for t in (a, b))
    assert a.keys() == b.keys() and len(a) > 50 and any(k.startswith("/rng") for k in a)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ after resume: {different[:10]}"
    ca, cb = (torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
              for run_dir in (reference, killed))
    values = dict(plain_values(ca))
    assert "/env/rng/state/state" in values and values == dict(plain_values(cb))  # Catch's state and its Generator's
    for i in range(ca["num_buffer_files"]):
        with np.load(reference / "episodes" / f"episode_{i:06d}.npz") as ea, \
                np.load(killed / "episodes" / f"episode_{i:06d}.npz") as eb:
            assert all(np.array_equal(ea[key], eb[key]) for key in ea), i


def test_catch_eval_only_play_keys_and_dataset_dir(catch_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(catch_run[0], run_dir)
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    result = run("--resume", run_dir, "--eval-only", "--test-episodes", "5", cwd=tmp_path, check=True)
    assert f"5 test episodes with the agent of epoch {checkpoint['epoch'] - 1}: mean return" in result.stdout
    assert "raw score only" in result.stdout
    scalars = read_scalars(run_dir)  # at the checkpoint's global step, beside the final test
    assert (checkpoint["global_step"], 5.0) in scalars["eval/eval_only_num_episodes"]
    assert "eval/eval_only_human_normalized_score" not in scalars
    # headless play: Catch's letters, the world model and the real game, the real game's episodes recorded
    result = run("--resume", run_dir, "--play-keys", "LLRRN/RRLLNNRRLN", "--play-world", "both", "--num-sampling-steps",
                 "1", cwd=tmp_path, check=True)
    assert "keys: L left, N noop, R right" in result.stdout
    assert "world model: 16 steps at" in result.stdout and "real game: 16 steps at" in result.stdout
    assert [p.name.split("_")[1] for p in sorted((run_dir / "play").glob("*.mp4"))] == ["imagined", "real"]
    recorded = sorted((run_dir / "play").glob("play_real_*_episode_*.npz"))
    lengths = [len(np.load(path)["actions"]) for path in recorded]
    assert lengths == [5, 9, 1]  # cut by the restart; a whole game (9 steps, terminated); cut by the end of the keys
    refused = run("--resume", run_dir, "--play-keys", "F", cwd=tmp_path)
    assert refused.returncode == 2 and "'F' is no action of this game" in refused.stderr
    # the run's episodes as a static dataset: the world model alone, nothing collected
    run(*TINY, "--world-model-only", "--num-epochs", "1", "--dataset-dir", run_dir / "episodes", "--output-dir",
        tmp_path / "runs", cwd=tmp_path, check=True)
    scalars = read_scalars(only_run_dir(tmp_path / "runs"))
    assert "world_model/next_frame_mse" in scalars and "charts/episodic_return" not in scalars


def test_atari_flags_given_with_catch_are_named_in_one_notice(tmp_path):
    stdout = run_until_line_then_kill(SCRIPT, *TINY, "--frame-skip", "2", "--noop-max", "0", "--sticky-actions",
                                      "--output-dir", tmp_path / "runs", line_startswith="run folder:", cwd=tmp_path)
    notices = [line for line in stdout.splitlines() if line.startswith("notice: --")]
    assert notices == ["notice: --frame-skip, --noop-max, --sticky-actions have no effect on Catch (Atari protocol "
                       "flags)"], stdout
