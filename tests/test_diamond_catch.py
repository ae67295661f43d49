"""Tests of diamond_atari.py on bsuite's Catch (--env-id Catch): the rules and the frames of CatchEnv against bsuite's
(Osband et al. 2020; deepmind/bsuite, bsuite/environments/catch.py), its determinism and its state; the environment
seam (make_env); a tiny run as a user runs it, its exact resume after SIGKILL, --eval-only, --play-keys and
--dataset-dir on it, and the notice for the Atari flags Catch ignores."""
import contextlib
import math
import re
import shutil
import types

import numpy as np
import pytest
import torch
from conftest import (SEED_SHIFT, checkpoint_tensors, load_module, measured, only_run_dir, read_scalars, run_script,
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
# The evaluation's diagnostics of the policy: its action shares, its imagined return against the real one


def test_action_shares_sum_to_1_and_match_a_hand_made_policy(dia):
    assert dia.action_shares([{"actions": np.array([0, 2, 2])}, {"actions": np.array([2])}], 3).tolist() == [
        0.25, 0.0, 0.75]
    assert dia.action_shares([], 3).tolist() == [0.0, 0.0, 0.0]  # no actions: no shares, not NaN
    args = dia.Args(**{**dia.PRESETS["tiny"], "env_id": "Catch"})
    actor_critic = dia.build_models(args, 3)[2]  # its actor head is zero: the logits are the bias, set by hand
    for probs, games in (([0.0, 0.0, 1.0], 3), ([0.2, 0.3, 0.5], 60)):
        actor_critic.actor_linear.bias.data = torch.tensor(probs).clamp(min=1e-30).log()
        recorded = []
        dia.run_test_episodes(actor_critic, args, games, seed=0, device=torch.device("cpu"), record=recorded)
        shares, steps = dia.action_shares(recorded, 3), 9 * games  # a Catch game: 9 steps
        assert sum(len(game["actions"]) for game in recorded) == steps and shares.sum() == pytest.approx(1.0)
        sigma = np.sqrt(np.array(probs) * (1 - np.array(probs)) / steps)
        assert np.all(np.abs(shares - probs) <= 4 * sigma), (shares, probs)


def read_catch_state(env, frame: np.ndarray) -> tuple[int, int, int]:
    """(ball row, ball column, paddle column) read off a Catch frame uint8 (H, W, 3) by the cells' colours."""
    colour = lambda row, col: tuple(int(v) for v in frame[env.cell_pixels(row, col)][0, 0])  # noqa: E731
    (ball_row, ball_col), = [(r, c) for r in range(ROWS) for c in range(COLUMNS)
                             if colour(r, c) == env.colours["ball"]]
    paddle = [c for c in range(COLUMNS) if colour(ROWS - 1, c) == env.colours["paddle"]]
    return ball_row, ball_col, paddle[0] if paddle else ball_col  # no paddle colour: the ball is over it


def catch_world_models(dia):
    """Stand-ins for the imagination step's world model (ImaginationGraphs.world_model_step): Catch itself (it reads
    the state off the last frame and steps bsuite's rules), and Catch with a reward model that pays +1 every step."""

    class PerfectCatch(dia.ImaginationGraphs):
        def reward(self, reward: float) -> float:
            return reward

        @torch.no_grad()
        def world_model_step(self, obs, act, hidden, age, action, actor_hidden, noise, uniforms, start):
            env, frames, rewards, ends = dia.CatchEnv(self.args.obs_size), [], [], []
            for frame, a in zip(dia.to_uint8(obs[:, -1]).permute(0, 2, 3, 1).numpy(), action.tolist()):
                env.ball_row, env.ball_col, env.paddle_col = read_catch_state(env, frame)
                env.game_over = False
                if env.ball_row == ROWS - 1:  # a game that is over stays over (its steps are not counted)
                    next_frame, reward, end = frame, 0.0, True
                else:
                    next_frame, reward, end, _ = env.step(a)
                frames.append(next_frame)
                rewards.append(self.reward(reward))
                ends.append(end)
            next_obs = dia.to_float(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
            return {"obs": torch.cat([obs[:, 1:], next_obs[:, None]], 1),
                    "act": torch.cat([act[:, 1:-1], action[:, None], torch.zeros_like(act[:, :1])], 1),
                    "hidden": hidden, "age": age + 1, "reward": torch.tensor(rewards), "end": torch.tensor(ends).float()}

    class WrongReward(PerfectCatch):
        def reward(self, reward: float) -> float:
            return 1.0

    return PerfectCatch, WrongReward


def collected_catch(dia):
    """A few Catch games collected by a random policy (the collector saves an env state every 3 env steps), a tiny
    world model and a policy that looks at the frames (random actor weights)."""
    args = dia.Args(**{**dia.PRESETS["tiny"], "env_id": "Catch", "imagination_horizon": 10, "num_imagined_envs": 8,
                       "num_heldout_transitions": 24})
    cpu, torch_generator = torch.device("cpu"), torch.Generator().manual_seed(0)
    buffer = dia.ReplayBuffer(None, None, args.num_conditioning_steps)
    collector = dia.Collector(dia.CatchEnv(args.obs_size, seed=0), buffer, torch.Generator().manual_seed(0), cpu)
    denoiser, reward_end_model, actor_critic = dia.build_models(args, 3)
    actor_critic.actor_linear.weight.data = torch.randn(actor_critic.actor_linear.weight.shape,
                                                        generator=torch_generator)
    for _ in range(40):
        collector.step(actor_critic, args, contextlib.nullcontext(), random_policy=True)
    collector.share_partial()
    wm_env = dia.WorldModelEnv(denoiser, reward_end_model, buffer, args, cpu, torch.Generator().manual_seed(1),
                               torch.Generator().manual_seed(2))
    return args, collector, wm_env, actor_critic


def test_imagined_and_real_returns_agree_in_a_perfect_world_model_and_not_in_a_wrong_one(dia):
    args, collector, wm_env, actor_critic = collected_catch(dia)
    starts = collector.fork_starts
    assert len(starts) == 8 and [t for _, t, _ in starts] != sorted(t for _, t, _ in starts)  # across games
    PerfectCatch, WrongReward = catch_world_models(dia)
    cpu = torch.device("cpu")
    generators = (torch.get_rng_state(), collector.generator.get_state(), wm_env.generator.get_state(),
                  wm_env.cpu_generator.get_state())
    perfect = dia.imagined_and_real_returns(PerfectCatch(wm_env, actor_critic, args, cpu, backend=None), starts,
                                            dia.CatchEnv(args.obs_size, seed=99), args, seed=3)
    # the same starts, frames, LSTM states and uniforms: the same actions, the same games (each ends within H = 10)
    assert perfect["imagined_return"] == perfect["real_return"] and perfect["imagined_minus_real_return"] == 0.0
    assert perfect["real_return"] != 0.0  # the games were caught or missed: a return to agree on
    wrong = dia.imagined_and_real_returns(WrongReward(wm_env, actor_critic, args, cpu, backend=None), starts,
                                          dia.CatchEnv(args.obs_size, seed=99), args, seed=3)
    assert wrong["real_return"] == perfect["real_return"] and wrong["imagined_return"] >= 1.0
    gap = wrong["imagined_minus_real_return"]
    assert gap > 0 and gap == pytest.approx(wrong["imagined_return"] - wrong["real_return"])
    # the imagination step itself (the denoiser and the reward/end model, untrained): finite, seeded, repeatable
    graphs = dia.ImaginationGraphs(wm_env, actor_critic, args, cpu, backend=None)
    a, b = (dia.imagined_and_real_returns(graphs, starts, dia.CatchEnv(args.obs_size), args, seed=3) for _ in "ab")
    assert a == b and all(math.isfinite(v) for v in a.values())
    assert abs(a["imagined_return"]) <= args.imagination_horizon
    assert a["real_return"] == perfect["real_return"]  # the real games do not depend on the world model
    assert all(torch.equal(x, y) for x, y in zip(generators, (
        torch.get_rng_state(), collector.generator.get_state(), wm_env.generator.get_state(),
        wm_env.cpu_generator.get_state())))  # the training RNGs did not move


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
    mean, rate = re.search(r"test episodes after .*: mean return (-?[\d.]+) .*; catch rate (\d\.\d{3}) \(random 0.2\)",
                           stdout).groups()
    assert float(rate) == pytest.approx((float(mean) + 1) / 2, abs=0.006)  # a game returns +1 or -1
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


def test_catch_tiny_run_logs_the_diagnostics_of_the_reward_end_model_and_the_policy(catch_run):
    run_dir, stdout = catch_run
    scalars = read_scalars(run_dir)
    shares = [scalars[f"eval/action_share_{action}"] for action in ("LEFT", "NOOP", "RIGHT")]
    steps = [step for step, _ in shares[0]]  # the evaluations that play test episodes: all but the last epoch's
    assert steps == [45, 70, 95] and all([step for step, _ in share] == steps for share in shares)
    assert all(sum(values) == pytest.approx(1.0, abs=1e-6) for values in zip(*[[v for _, v in s] for s in shares]))
    imagined, real, gap = (scalars[f"eval/{key}"] for key in ("imagined_return", "real_return",
                                                              "imagined_minus_real_return"))
    assert [step for step, _ in gap] == [45, 70, 95, 120]  # every evaluation, the last one's too
    for (_, i), (_, r), (_, g) in zip(imagined, real, gap):
        assert abs(i) <= 4 and abs(r) <= 1 and g == pytest.approx(i - r, abs=1e-6)  # tiny: H = 4
    rates = {tag: values for tag, values in scalars.items() if "_recall" in tag or "_precision" in tag}
    assert "world_model/reward_recall_zero" in rates  # 32 held-out transitions a measurement: 20 zeros at least
    assert set(rates) <= {f"world_model/{what}_{kind}{sign}" for what, signs in (("reward", ("_neg", "_zero", "_pos")),
                                                                                  ("end", ("",)))
                          for kind in ("recall", "precision") for sign in signs}
    assert all(0 <= value <= 1 for values in rates.values() for _, value in values)  # never NaN
    epoch_lines = [line for line in stdout.splitlines() if line.startswith("epoch 1/")]
    assert "imag-real gap " in epoch_lines[0] and "top action " in epoch_lines[0]
    checkpoint = torch.load(run_dir / "checkpoints" / "latest.pt", map_location="cpu", weights_only=True)
    assert len(checkpoint["fork_starts"]) == 8 and set(checkpoint["fork_starts"][0]["env"]) == set(checkpoint["env"])
    assert set(checkpoint["reward_end_pools"]) == {"recall", "precision"}


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


# ----------------------------------------------------------------------------------------------------------------------
# benchmark/diamond_catch_diagnosis.py: why a run on Catch did or did not learn (RESULTS.md 3e)


def test_catch_diagnosis_reads_states_steps_catch_as_a_model_and_reports_a_run(dia, catch_run, capsys):
    diagnosis = load_module("benchmark/diamond_catch_diagnosis.py")
    env = dia.CatchEnv(32, seed=5)
    for _ in range(40):  # the state read off a real frame, every cell of the grid visited
        env.reset()
        for action in np.random.default_rng(env.ball_col).integers(0, 3, 9):
            assert diagnosis.read_state(env, env.render()) == (env.ball_row, env.ball_col, env.paddle_col) or \
                env.ball_row == ROWS - 1 and env.paddle_col == env.ball_col  # a catch shows no paddle
            if env.ball_row == ROWS - 1:
                break
            env.step(int(action))
    # Catch as the imagined envs' model: from a rendered frame, the next frame, reward and end are Catch's own
    run_dir, _ = catch_run
    args, _, denoiser, reward_end, buffer = diagnosis.load_run(dia, run_dir)
    args.num_imagined_envs = 3
    model = diagnosis.catch_as_model(dia, dia.WorldModelEnv)(denoiser, reward_end, buffer, args, torch.device("cpu"),
                                                              torch.Generator().manual_seed(0),
                                                              torch.Generator().manual_seed(1))
    model.obs, model.act, model.hidden = model.start(3)  # the imagined envs started, as the first rollout does
    model.age = torch.zeros(3, dtype=torch.long)
    games = [dia.CatchEnv(32, seed=s) for s in range(3)]
    for game in games:
        game.reset()
        game.ball_row = ROWS - 2  # the last decision: RIGHT, NOOP, LEFT below
    model.obs[:, -1] = torch.stack([dia.to_float(torch.from_numpy(g.render()).permute(2, 0, 1)) for g in games])
    actor_critic = dia.build_models(args, 3)[2]
    graphs = dia.ImaginationGraphs(model, actor_critic, args, torch.device("cpu"), backend=None)
    actor_hidden = (torch.zeros(3, args.actor_lstm_dim), torch.zeros(3, args.actor_lstm_dim))
    step = graphs.world_model_step(model.obs, model.act, model.hidden, model.age, torch.tensor([2, 1, 0]),
                                   actor_hidden, torch.randn(3, 3, 32, 32), torch.rand(2, 3), None)
    for i, (game, action) in enumerate(zip(games, (2, 1, 0))):
        frame, reward, terminated, _ = game.step(action)
        assert step["reward"][i] == reward and step["end"][i] == terminated == 1 and step["stopped"][i]
        # the Euler sampler's output: Catch's next frame, within one 8-bit level (D is quantised by flooring)
        real = torch.from_numpy(frame).permute(2, 0, 1).int()
        assert (dia.to_uint8(step["next_obs"][i]).int() - real).abs().max() <= 1
    # the report on a tiny run: both measurements, every figure a rate
    assert diagnosis.main([str(run_dir), "--updates", "2", "--every", "1", "--test-games", "4"]) == 0
    out = capsys.readouterr().out
    rates = [float(x) for x in re.findall(r"(?:accuracy|rate|,) (\d\.\d{3})", out)]
    assert len(re.findall("actor-critic from scratch in", out)) == 2 and rates and all(0 <= r <= 1 for r in rates)
    # the run's curve of agents: each kept copy and the last agent on the same games
    assert diagnosis.main([str(run_dir), "--agents", "--test-games", "2"]) == 0
    tested = re.findall(r"^(\S+\.pt): catch rate (\d\.\d{3}) over 2 games$", capsys.readouterr().out, re.M)
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("agent_epoch_*.pt"))
    assert [name for name, _ in tested] == kept + ["latest.pt"] and len(kept) >= 1


@pytest.mark.learning
def test_the_actor_critic_learns_catch_in_a_perfect_world_model(dia, torch_threads):
    """The RL side alone: the catch preset's actor-critic (16x16 frames), trained by the script's own imagination,
    lambda-returns and loss with Catch itself as the world model (diamond_catch_diagnosis.py's catch_as_model) from
    the starts of 60 random games, catches well above a random paddle's 0.2 after 400 updates (200 test games: one
    sigma 0.03). The whole loop on Catch takes 20 minutes a seed (benchmark/diamond_catch.sh); this is its RL half.
    Measured over training seeds 0, 1, 2 x 1, 2 threads (benchmark/threshold_spread.py, RESULTS 7): catch rate
    after 400 updates 0.525 to 0.995 (learning starts after 200 to 400 updates); the threshold 0.3 is 3 sigma above
    random and below every configuration's rate."""
    diagnosis = load_module("benchmark/diamond_catch_diagnosis.py")
    seed = SEED_SHIFT
    args = dia.Args(**{**dia.PRESETS["catch"], "env_id": "Catch", "obs_size": 16, "seed": seed})
    env = dia.CatchEnv(16, seed=seed)
    buffer = dia.ReplayBuffer(None, args.recency_weights, args.num_conditioning_steps)
    rng = np.random.default_rng(seed)
    for _ in range(60):  # the replay buffer: 60 random games, where the imagination starts
        obs, actions, rewards = [env.reset()], [], []
        while not env.game_over:
            actions.append(int(rng.integers(3)))
            frame, reward, _, _ = env.step(actions[-1])
            obs.append(frame)
            rewards.append(reward)
        steps = len(actions)
        buffer.add({"obs": np.stack(obs), "actions": np.array(actions), "rewards": np.array(rewards, np.float32),
                    "terminated": np.arange(steps) == steps - 1, "truncated": np.zeros(steps, bool)}, write=False)
    torch.manual_seed(seed)
    denoiser, reward_end, _ = dia.build_models(args, 3)  # replaced by Catch's rules inside catch_as_model
    opts = types.SimpleNamespace(seed=seed, lr=args.learning_rate, updates=400, every=400, test_games=200)
    [(_, catch_rate)] = diagnosis.train_actor_critic(dia, args, env, denoiser, reward_end, buffer, "Catch", opts)
    measured(catch_rate=catch_rate)
    assert catch_rate >= 0.3, f"catch rate {catch_rate:.3f} after 400 updates in Catch itself (random: 0.2)"
